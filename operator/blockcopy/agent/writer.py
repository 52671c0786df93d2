"""One object's status writes: phase changes at once, progress at most once per interval.

A BlockCopy changes phase a handful of times per copy, and each change (and each intent that
must be stored before its action, such as Pivoting) is what users and tools wait for: it is
written at once, one PATCH. Progress (cur, end, message) changes every second while copying:
those writes are coalesced to at most one per ``interval``, the newest state replacing an
older pending one. A phase change carries the newest progress with it (the status is always
written whole), and a write equal to what is stored is skipped.

Timing uses the event loop's clock, so the tests run it on a fake one (looptime).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from blockcopy.model.kubeapi import StatusStore

log = logging.getLogger(__name__)

Status = dict[str, Any]


class ObjectGone(Exception):
    """The object was deleted while a write was pending."""


class StatusWriter:
    def __init__(self, store: StatusStore, *, namespace: str, name: str,
                 interval: float | Callable[[], float], stored: Status | None = None):
        """``interval``: seconds between two progress writes, or a function that says it
        now (the agent's progress pace: it grows with the number of copies)."""
        self._store, self._namespace, self._name = store, namespace, name
        self._interval: Callable[[], float] = (
            interval if callable(interval) else lambda: interval)
        self._last_time: float | None = None  # loop time of the last write
        self._written: Status | None = stored  # what the API holds, as far as we know
        self._pending: Status | None = None
        self._urgent = asyncio.Event()  # set: write the pending status without waiting
        self._task: asyncio.Task[None] | None = None
        self._gone = False
        self.writes = 0  # PATCHes sent (for tests and the benchmark)

    def submit(self, status: Status, *, urgent: bool) -> None:
        """Store ``status`` soon: at once when ``urgent`` (a phase change), else in the next
        progress slot. Returns at once; ``flush()`` waits."""
        if self._gone:
            return
        if status == self._written:
            self._pending = None  # the newest state is stored already
            return
        self._pending = status
        if urgent:
            self._urgent.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name=f"status:{self._name}")

    async def write(self, status: Status) -> None:
        """Store ``status`` at once and return when it is stored (an intent that must
        precede its action). Raises ObjectGone if the object was deleted."""
        self.submit(status, urgent=True)
        await self.flush()
        if self._gone:
            raise ObjectGone(f"{self._namespace}/{self._name}")

    async def flush(self) -> None:
        """Wait until nothing is pending (retrying failed writes meanwhile)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _wait_for_slot(self) -> None:
        loop = asyncio.get_running_loop()
        if self._urgent.is_set() or self._last_time is None:
            return
        wait = self._last_time + self._interval() - loop.time()
        if wait <= 0:
            return
        try:
            await asyncio.wait_for(self._urgent.wait(), timeout=wait)
        except TimeoutError:
            pass

    def _still_pending(self) -> Status | None:
        """The pending state read again after an await (mypy keeps the loop's narrowing of
        ``self._pending`` across it, though submit() may have dropped it meanwhile)."""
        return self._pending

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending is not None:
            await self._wait_for_slot()
            if self._still_pending() is None:
                # While this waited, submit() saw the API already holding the newest state
                # and dropped the pending one: nothing to write (writing None would delete
                # the whole status, kopf's bookkeeping and startTime with it).
                break
            status, self._pending = self._pending, None
            self._urgent.clear()
            try:
                self.writes += 1
                stored = await self._store.patch_status(self._namespace, self._name, status)
            except Exception as exc:  # an API hiccup: keep the newest state, retry later
                log.warning("status write of %s/%s failed: %s", self._namespace, self._name,
                            exc)
                if self._pending is None:
                    self._pending = status
                self._last_time = loop.time()
                await asyncio.sleep(self._interval())
                continue
            self._last_time = loop.time()
            if not stored:  # 404: deleted meanwhile
                self._gone, self._pending = True, None
                return
            self._written = status
