"""Disk groups: BlockCopies of disks of one domain, in one namespace, with the same
``spec.group``, pivot together and abort together.

libvirt has no multi-disk transaction. The pivot needs none: each mirror holds every write
until it is ended, so the group waits until every member is Mirrored with ``pivot: true``,
then each member pivots (all at once, in a row). Who is a member is asked of the API server
at that moment, not taken from the objects this agent already follows: members created
together arrive one by one (claimed, then followed), and a fast member must not take a
group of one for the whole group. Members created within GROUP_SETTLE seconds of the
newest one the API server shows may still be on their way, so the group waits that long
after the newest member's creation. The abort needs a common point in time for a
crash-consistent copy across disks: the guest's file systems are frozen through its guest
agent when one answers, otherwise the VM is suspended; every member's job is cancelled (each
destination then holds the disk as it was at that instant); then the guest is thawed or
resumed, always, whatever failed, within a bounded time. All members of a group are on one
node (one domain), so one agent coordinates them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from blockcopy.api import JOB_PHASES, Phase
from blockcopy.ports import Hypervisor, HypervisorError, Kube
from blockcopy.recorder import ObjectRecorder

log = logging.getLogger(__name__)

GroupKey = tuple[str, str, str]  # (namespace, group, domain)
FREEZE_TIMEOUT = 10.0  # s: a guest agent that does not answer is given up on
CANCEL_TIMEOUT = 20.0  # s: all members' cancels together
GROUP_SETTLE = 5.0  # s after the newest member's creation before the group may pivot
LIST_RETRY = 5.0  # s: the members could not be listed; look again then


class Follower(Protocol):
    """What the group needs of a member's follow loop."""

    body: Mapping[str, Any]
    recorder: ObjectRecorder
    wake: asyncio.Event
    target: str | None


def key_of(body: Mapping[str, Any]) -> GroupKey | None:
    spec = body.get("spec") or {}
    group = spec.get("group")
    if not isinstance(group, str) or not group:
        return None
    return body["metadata"]["namespace"], group, str(spec.get("domain"))


def _created(body: Mapping[str, Any]) -> dt.datetime | None:
    stamp = (body.get("metadata") or {}).get("creationTimestamp")
    try:
        return dt.datetime.strptime(str(stamp), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


class Groups:
    def __init__(self, hv: Hypervisor, followers: Callable[[], Sequence[Follower]], *,
                 kube: Kube, clock: Callable[[], dt.datetime]):
        self.hv, self.kube, self.clock = hv, kube, clock
        self._followers = followers
        self._aborting: dict[GroupKey, asyncio.Task[str]] = {}

    def members(self, key: GroupKey) -> list[Follower]:
        return [f for f in self._followers() if key_of(f.body) == key]

    def changed(self, key: GroupKey, *, by: Follower) -> None:
        """A member's phase or spec changed: the others look again."""
        for member in self.members(key):
            if member is not by:
                member.wake.set()

    def summary(self, key: GroupKey) -> dict[str, Any]:
        """status.group of each member: the group's name and its members' phases."""
        members = sorted(self.members(key), key=lambda f: f.recorder.ref.name)
        return {"name": key[1],
                "members": [{"name": m.recorder.ref.name,
                             "phase": str(m.recorder.phase or "")} for m in members]}

    # -- pivot --------------------------------------------------------------------------
    async def pivot_blocked(self, key: GroupKey, *, by: Follower
                            ) -> tuple[str | None, float | None]:
        """(None, None) when every member is Mirrored (or further) with pivot: true and no
        member can still be on its way; else (why not, when to look again without a wake-up
        or None). ``by``: the member asking, whose mirror is ready."""
        namespace = key[0]
        try:
            listed = await self.kube.list_namespace(namespace)
        except Exception as exc:  # no pivot on a partial view: stay on the source
            log.warning("group %s/%s: cannot list its members: %s", namespace, key[1], exc)
            return (f"the mirror is ready; group {key[1]} pivots when every member is Mirrored "
                    f"with pivot: true (its members cannot be listed: {exc})"), LIST_RETRY
        in_api = {b["metadata"]["name"]: b for b in listed
                  if key_of(b) == key and not b["metadata"].get("deletionTimestamp")}
        followed = {m.recorder.ref.name: m for m in self.members(key)}
        blocked = []
        for name in sorted(set(in_api) | set(followed)):
            member = followed.get(name)
            if member is not None:
                phase = Phase.MIRRORED if member is by else member.recorder.phase
                spec = member.body.get("spec") or {}
            else:
                body = in_api[name]
                raw = (body.get("status") or {}).get("phase")
                phase = Phase(raw) if raw in {p.value for p in Phase} else None
                spec = body.get("spec") or {}
            if phase in (Phase.PIVOTING, Phase.PIVOTED):
                continue
            if phase != Phase.MIRRORED:
                blocked.append(f"{name} is {phase or 'not started'}")
            elif spec.get("pivot") is not True:
                blocked.append(f"{name} has no pivot: true")
        recheck = None
        created = [c for c in map(_created, in_api.values()) if c is not None]
        if created and not blocked:
            age = (self.clock() - max(created)).total_seconds()
            if age < GROUP_SETTLE:
                recheck = GROUP_SETTLE - age
                blocked.append(f"members created up to {GROUP_SETTLE:g} s after the newest "
                               f"one may still join; pivoting in {recheck:.0f} s")
        if not blocked:
            return None, None
        return (f"the mirror is ready; group {key[1]} pivots when every member is Mirrored "
                f"with pivot: true ({'; '.join(blocked)})"), recheck

    # -- abort --------------------------------------------------------------------------
    def abort_blocked(self, key: GroupKey) -> str | None:
        waiting = [m.recorder.ref.name for m in self.members(key)
                   if (m.body.get("spec") or {}).get("abort") is not True
                   and m.recorder.phase in (*JOB_PHASES, None)]
        if not waiting:
            return None
        return (f"group {key[1]} aborts together, for a copy consistent across its disks: "
                f"waiting for abort: true on {', '.join(sorted(waiting))}")

    async def abort(self, key: GroupKey, domain: str, *, by: Follower) -> str:
        """End every member's job at one instant (once for all the members that ask at the
        same time; the first one posts the Event). Returns what was done."""
        task = self._aborting.get(key)
        if task is None or task.done():
            task = self._aborting[key] = asyncio.create_task(self._abort(key, domain, by))
        return await asyncio.shield(task)

    async def _abort(self, key: GroupKey, domain: str, by: Follower) -> str:
        targets = sorted({m.target for m in self.members(key)
                          if m.target and m.recorder.phase in JOB_PHASES})
        started = time.monotonic()
        how = await self._hold_still(domain)
        try:
            await asyncio.wait_for(asyncio.gather(
                *(self.hv.cancel(domain, t) for t in targets), return_exceptions=True),
                CANCEL_TIMEOUT)
        finally:
            await self._release(domain, how)
        held = (time.monotonic() - started) * 1000
        for member in self.members(key):
            member.wake.set()
        what = {"frozen": "the guest's file systems frozen through its guest agent",
                "suspended": "the VM suspended", "none": "the VM running"}[how]
        done = (f"group {key[1]}: the jobs of {', '.join(targets)} ended at one instant, with "
                f"{what} for {held:.0f} ms")
        by.recorder.event("Normal", "GroupAborted", done)
        return done

    async def _hold_still(self, domain: str) -> str:
        try:
            return await asyncio.wait_for(self.hv.quiesce(domain), FREEZE_TIMEOUT)
        except (HypervisorError, TimeoutError) as exc:
            log.warning("group abort: cannot freeze or suspend %s (%s); the copies are only "
                        "crash-consistent per disk", domain, exc)
            return "none"

    async def _release(self, domain: str, how: str) -> None:
        if how == "none":
            return
        for attempt in range(5):  # always resume: retry, a stuck VM is worse than a log line
            try:
                await asyncio.wait_for(self.hv.unquiesce(domain, how), FREEZE_TIMEOUT)
                return
            except (HypervisorError, TimeoutError) as exc:
                log.error("group abort: resuming %s (%s) failed (attempt %d): %s", domain, how,
                          attempt + 1, exc)
                await asyncio.sleep(1)
