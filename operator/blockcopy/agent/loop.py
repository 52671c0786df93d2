"""The follow loop: run a follower's steps until its object is terminal, deleted, or the
agent stops, and sleep between them until something happens (a libvirt event, a spec
change, the stop signal) or a timeout passes.

Retries belong to the loop, not to the calls (``retries``): an unreachable libvirtd and a
failed look each back off on their own schedule; a refused action backs off through the
follower's wait time. Waking up: libvirt's block-job events and spec changes set ``wake``;
the agent's own status writes come back as watch events but never wake the loop (they would
cut back-offs short).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

from blockcopy.agent.retries import Retries
from blockcopy.agent.writer import ObjectGone
from blockcopy.model.ports import HypervisorError, HypervisorUnavailable


class StopSignal(Protocol):
    """kopf's DaemonStopped, or an equivalent: true once stopping, and awaitable."""

    def __bool__(self) -> bool: ...

    def wait(self) -> Awaitable[Any]: ...


class Step(enum.Enum):
    DONE = "done"  # terminal phase reached
    AGAIN = "again"  # an action succeeded: look again at once
    WAIT = "wait"  # nothing to do until something happens


class Stepper(Protocol):
    """What the loop drives (the follower)."""

    body: Mapping[str, Any]
    wake: asyncio.Event
    spec_changed: bool
    retries: Retries

    async def step(self) -> Step: ...

    def wait_time(self) -> float: ...

    async def close(self) -> None: ...


class FollowLoop:
    def __init__(self, stepper: Stepper):
        self.stepper = stepper

    async def run(self, stop: StopSignal) -> None:
        s = self.stepper
        try:
            while not stop:
                if s.body.get("metadata", {}).get("deletionTimestamp"):
                    return  # the deletion handler takes over
                s.wake.clear()
                s.spec_changed = False
                try:
                    step = await s.step()
                except HypervisorUnavailable as exc:
                    await self._sleep(stop, s.retries.unreachable(str(exc)))
                    continue
                except HypervisorError as exc:
                    # libvirt failed a look, not an action (those are decided on): say a
                    # transient domain went away mid-query ("Unable to read from monitor").
                    await self._sleep(stop, s.retries.look_failed(str(exc)))
                    continue
                except ObjectGone:
                    # Deleted while an intent was being stored: nothing was acted on (the
                    # intent precedes its action), and the deletion handler takes over.
                    return
                s.retries.looked()
                if step is Step.DONE:
                    return
                if step is Step.WAIT:
                    await self._sleep(stop, s.wait_time())
        finally:
            await s.close()

    async def _sleep(self, stop: StopSignal, timeout: float) -> None:
        """Until a wake-up, the stop signal or the timeout, whichever comes first."""
        wake = self.stepper.wake
        if wake.is_set() or stop:
            return
        waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
