"""The act step of a follower before its job runs: from "no job of ours on the disk" to a
started, queued, adopted or refused copy. Apart from the follower for the same reason as
``agent.actor`` (the follower keeps the order of the four steps), and because the start has
its own order of locks: the object's lock (shared with the deletion handler), then the agent's
start lock (one start per disk at a time), with the disk looked at again under each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from blockcopy.agent.startchecks import StartChecks
from blockcopy.agent.starter import Starter
from blockcopy.agent.steps import Outcome
from blockcopy.core import gates, reconcile
from blockcopy.core.reconcile import Action, Decision
from blockcopy.core.slots import CopySlots
from blockcopy.model.api import BlockCopySpec, Phase
from blockcopy.model.observation import DiskState

Observe = Callable[[BlockCopySpec], Awaitable[DiskState]]


class JobLauncher:
    """Starts (or adopts, queues, refuses) the job of one follower's object ``key``."""

    def __init__(self, *, checks: StartChecks, starter: Starter, slots: CopySlots,
                 key: tuple[str, str], lock: asyncio.Lock, start_lock: asyncio.Lock,
                 observe: Observe, holder: Callable[[], str | None],
                 holds: Callable[[bool], None]):
        """``lock``: the object's (the deletion handler takes it too); ``start_lock``: the
        agent's; ``observe``: a fresh look at the disk; ``holder``: which other object of
        this agent holds the disk's job; ``holds``: told, under the start lock, whether this
        object now holds it (what ``holder`` answers the others)."""
        self.checks, self.starter, self.slots, self.key = checks, starter, slots, key
        self.lock, self.start_lock, self.observe, self.holder = lock, start_lock, observe, holder
        self.holds = holds

    async def launch(self, spec: BlockCopySpec, raw: Mapping[str, Any], current: Phase | None,
                     conditions: list[dict[str, Any]], *, created: str) -> Outcome:
        """``created``: the object's creationTimestamp (its place in the queue)."""
        # Before libvirt is asked anything (nothing created, and no domain's existence told to
        # a namespace the policy keeps away). An existing dest waits for the look below: it
        # may be the file of a job of ours that a restarted agent adopts.
        refusal = self.checks.refusal(spec, current)
        # spec.createDirectories: the starter makes them, once the source's are known.
        if refusal is not None and spec.create_directories and \
                refusal.reason == "DestNotCreatable":
            refusal = None
        if refusal is not None and refusal.reason != "DestExists":
            return Outcome(refusal, None, conditions)
        async with self.lock:
            if current == Phase.PREPARING:
                # The plan's files, made outside the start lock (a rebase takes a while).
                disk = await self.observe(spec)
                if reconcile.decide(spec, current, disk).action == Action.START_COPY:
                    failed = await self.starter.prepare(spec, disk)
                    if failed is not None:
                        return Outcome(failed, disk, conditions)
            # Starts are serialized and decided on a fresh look under the lock: of two
            # BlockCopies for one disk, the second then sees the first's job (DiskBusy).
            # The chain is checked once more right before the job starts.
            async with self.start_lock:
                disk = await self.observe(spec)
                decision = gates.decide_start(
                    spec, current, disk, holder=self.holder(), limit=self.slots.limit,
                    place=self.slots.place(self.key, created=created))
                if refusal is not None and decision.action == Action.START_COPY:
                    return Outcome(refusal, disk, conditions)
                return await self._act(spec, raw, current, disk, decision, conditions,
                                       created=created)

    async def _act(self, spec: BlockCopySpec, raw: Mapping[str, Any], current: Phase | None,
                   disk: DiskState, decision: Decision, conditions: list[dict[str, Any]], *,
                   created: str) -> Outcome:
        if decision.reason == "Adopted":
            self.holds(True)
        if decision.phase == Phase.QUEUED:
            self.slots.wait(self.key, created=created)
        if decision.action != Action.START_COPY:
            return Outcome(decision, disk, conditions)
        self.slots.hold(self.key)
        started = await self.starter.start(spec, disk, raw, decision, current)
        self.holds(started.fields is not None)  # a job, or a plan for one
        return Outcome(started.decision, disk, conditions, started=started.fields,
                       intent=started.decision.action == Action.PREPARE)
