"""Retry delays: one type for every "try again later" of the agent.

The claimer's watch after an API error, a follow loop that cannot reach libvirtd, an action
that libvirt refused: each counts its failures in a row and waits the schedule's delay for
that count, and a success resets the count (KubeVirt's virt-handler keeps the same rule in
one retry manager instead of a schedule per call site). Pure: no clock, no I/O.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Delays in seconds after the 1st, 2nd, ... failure in a row; the last one repeats."""

    delays: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.delays or any(d < 0 for d in self.delays):
            raise ValueError(f"a schedule needs non-negative delays, not {self.delays!r}")

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` failures in a row (``failures`` >= 1)."""
        return self.delays[min(max(failures, 1), len(self.delays)) - 1]

    def describe(self) -> str:
        """'1, 2, 5, 10, then every 30 s' (for messages and docs/api.md)."""
        head = ", ".join(f"{d:g}" for d in self.delays[:-1])
        return f"{head}, then every {self.delays[-1]:g} s" if head else \
            f"every {self.delays[-1]:g} s"


class Backoff:
    """Failures in a row against a schedule: ``failed()`` returns the wait before the next
    try, ``succeeded()`` starts over."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.failures = 0

    def failed(self) -> float:
        self.failures += 1
        return self.schedule.delay(self.failures)

    def succeeded(self) -> None:
        self.failures = 0

    @property
    def active(self) -> bool:
        """True after a failure, until the next success."""
        return self.failures > 0


# The schedules of the agent (docs/api.md, "Phases": the retry timings users see in Events).
LIBVIRT_UNREACHABLE = Schedule((1, 2, 5, 10, 30))
REFUSED_ACTION = Schedule((5, 5, 5, 10, 30))
API_WATCH = Schedule((1, 2, 4, 8, 16, 30))
