"""How often each copy's progress is looked at and written: a budget for the whole agent.

Progress (cur, end, rate, time left) is a convenience; what users and tools wait on are phase
changes, and those are written at once whatever this says. Each progress refresh costs one
look at libvirt (several calls and the domain XML), one status PATCH, and the watch event the
PATCH sends back to the agent. One refresh per second per copy is cheap for a few copies and
was a quarter of a core at 50 (``make bench``), with 50 PATCHes a second on the API server.
So the agent shares ``budget`` refreshes per second among the copies that are Copying: each
gets ``max(interval, copying / budget)`` seconds between refreshes. With the defaults (1 s,
10 per second) up to 10 copies refresh every second; 50 refresh every 5 s. Pure.
"""

from __future__ import annotations

from collections.abc import Callable

DEFAULT_BUDGET = 10.0  # progress refreshes per second, for the whole agent


class ProgressPace:
    def __init__(self, *, interval: float, budget: float = DEFAULT_BUDGET,
                 copying: Callable[[], int] = lambda: 0):
        """``interval``: the shortest time between two refreshes of one copy (the
        ``--status-interval``); ``budget``: refreshes per second for all copies together
        (0: no budget); ``copying``: how many copies are Copying now."""
        if interval < 0 or budget < 0:
            raise ValueError("interval and budget must not be negative")
        self.base, self.budget, self._copying = interval, budget, copying

    def interval(self) -> float:
        """Seconds between two progress refreshes of one copy, for as many as copy now."""
        if not self.budget:
            return self.base
        return max(self.base, self._copying() / self.budget)
