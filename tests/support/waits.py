"""Polling, and the named conditions the tests wait for. A condition is a function returning
a truthy value once it holds (that value is what `wait_for` returns), with a `what` that
says what was awaited when it times out."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from blockcopy.model.api import NODE_LABEL

if TYPE_CHECKING:
    from support.objects import BlockCopies


def wait_for(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.2,
             what: str | None = None) -> Any:
    """Poll until ``predicate()`` is truthy and return it; fail with the last value seen."""
    what = what or getattr(predicate, "what", "condition")
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def named(what: str, predicate: Callable[[], Any]) -> Callable[[], Any]:
    """``predicate`` with a description for `wait_for`'s timeout message."""
    predicate.what = what  # type: ignore[attr-defined]
    return predicate


def phase_in(blockcopies: BlockCopies, name: str, *phases: str) -> Callable[[], Any]:
    """The status, once its phase is one of ``phases``."""
    def check():
        status = blockcopies.status(name)
        return status if status.get("phase") in phases else None
    return named(f"{name} in phase {phases}", check)


def copying_with(blockcopies: BlockCopies, name: str, *, counter: str = "end",
                 above: int = 1) -> Callable[[], Any]:
    """The status, once Copying with libvirt's ``counter`` above ``above`` (end > 1: the job
    started; cur > 0: bytes copied). Any phase past Copying fails at once."""
    def check():
        status = blockcopies.status(name)
        if status.get("phase") == "Copying" and status.get(counter, 0) > above:
            return status
        assert status.get("phase") in (None, "Pending", "Copying"), status
        return None
    return named(f"{name} Copying with counters", check)


def status_where(blockcopies: BlockCopies, name: str, test: Callable[[dict], Any],
                 what: str) -> Callable[[], Any]:
    """The status, once ``test(status)`` holds."""
    def check():
        status = blockcopies.status(name)
        return status if status and test(status) else None
    return named(what, check)


def gone(blockcopies: BlockCopies, name: str) -> Callable[[], bool]:
    """True once the object no longer exists."""
    return named(f"{name} to be gone", lambda: not blockcopies.exists(name))


def claimed(blockcopies: BlockCopies, name: str) -> Callable[[], str | None]:
    """The node label, once some agent claimed the object."""
    return named(f"{name} to be claimed",
                 lambda: (blockcopies.get(name)["metadata"].get("labels") or {}).get(NODE_LABEL))


def events_of(blockcopies: BlockCopies, core, name: str, reason: str | None = None,
              type: str | None = None) -> Callable[[], list]:
    """The object's Events (of that reason and type, when given), once there is one."""
    def check():
        return [e for e in blockcopies.events(core, name)
                if (reason is None or e.reason == reason) and (type is None or e.type == type)]
    label = " ".join(p for p in (type, reason) if p) or "an"
    return named(f"{label} Event for {name}", check)
