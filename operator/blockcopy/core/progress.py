"""Rate, time left, and whether a copy converges, from libvirt's cur/end samples.

libvirt's ``cur`` counts bytes copied; ``end`` the bytes to copy, and it grows while the
guest writes (each write dirties a region that must be copied again). Over a window of
recent samples: the rate is how fast ``cur`` grows, the growth how fast ``end`` grows, and
the time left is what remains divided by the difference. When ``end`` grows at least as fast
as ``cur`` (the guest writes faster than the copy copies), what remains does not shrink:
the copy will never become Mirrored as things are. Pure: the caller passes the clock.
"""

from __future__ import annotations

import collections
import dataclasses

WINDOW = 10.0  # seconds of samples a rate is measured over


@dataclasses.dataclass(frozen=True)
class Sample:
    time: float
    cur: int
    end: int

    @property
    def remaining(self) -> int:
        return max(0, self.end - self.cur)


@dataclasses.dataclass(frozen=True)
class Estimate:
    rate: int  # bytes/s copied, over the window
    growth: int  # bytes/s that end grew, over the window
    eta: float | None  # seconds left, None when it does not shrink
    converging: bool | None  # None until a whole window was seen


class ProgressWindow:
    def __init__(self, window: float = WINDOW):
        self.window = window
        self._samples: collections.deque[Sample] = collections.deque()

    def add(self, time: float, cur: int, end: int) -> None:
        # cur only grows within a job: less is a new job. (end may shrink a little: QEMU
        # counts the bytes in flight in it.)
        if self._samples and cur < self._samples[-1].cur:
            self._samples.clear()
        self._samples.append(Sample(time, cur, end))
        # Keep one sample at or beyond the window's start, for a full window's span.
        while len(self._samples) > 2 and time - self._samples[1].time >= self.window:
            self._samples.popleft()

    def clear(self) -> None:
        self._samples.clear()

    def estimate(self) -> Estimate | None:
        if len(self._samples) < 2:
            return None
        first, last = self._samples[0], self._samples[-1]
        span = last.time - first.time
        if span <= 0:
            return None
        rate = (last.cur - first.cur) / span
        growth = (last.end - first.end) / span
        eta = last.remaining / (rate - growth) if rate > growth else None
        if last.remaining == 0:
            eta = 0.0
        converging = None
        if span >= self.window:
            converging = last.remaining < first.remaining or last.remaining == 0
        return Estimate(rate=int(rate), growth=int(growth), eta=eta, converging=converging)


def duration(seconds: float) -> str:
    """``1h2m3s``, ``1m30s``, ``45s`` (whole seconds, rounded up: never "0s" while copying)."""
    total = max(0, int(-(-seconds // 1)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
