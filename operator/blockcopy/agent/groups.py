"""Disk groups: BlockCopies of disks of one domain, in one namespace, with the same
``spec.group``, pivot together and abort together.

libvirt has no multi-disk transaction. The pivot needs none: each mirror holds every write
until it is ended, so the group waits until every member is Mirrored with ``pivot: true``,
then the whole group switches in one pause of the guest, all or none
(``agent.groupswitch``). Who is a member is asked of the API server at that moment, not
taken from the objects this agent already follows: members created together arrive one by
one (claimed, then followed), and a fast member must not take a group of one for the whole
group (``core.gates.group_pivot_blocked`` decides on the view this module observes). The
abort needs a common point in time for a crash-consistent copy across disks: the guest's
file systems are frozen through its guest agent when one answers, otherwise the VM is
suspended; every member's job is cancelled (each destination then holds the disk as it was
at that instant); then the guest is thawed or resumed, always, whatever failed, within a
bounded time. All members of a group are on one node (one domain), so one agent
coordinates them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid as uuidlib
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

from blockcopy.core.verify import Copy
from blockcopy.model.api import JOB_PHASES, NODE_LABEL, TERMINAL_PHASES, Phase
from blockcopy.model.kubeapi import Kube
from blockcopy.model.observation import GroupMember, GroupView
from blockcopy.model.ports import Hypervisor, HypervisorError, HypervisorUnavailable

log = logging.getLogger(__name__)

GroupKey = tuple[str, str, str]  # (namespace, group, domain)
FREEZE_TIMEOUT = 10.0  # s: a guest agent that does not answer is given up on
CANCEL_TIMEOUT = 20.0  # s: all members' cancels together
RESUME_ATTEMPTS = 5


class Member(Protocol):
    """What the group needs of a member's follow loop."""

    @property
    def body(self) -> Mapping[str, Any]: ...

    @property
    def name(self) -> str: ...

    @property
    def phase(self) -> Phase | None: ...

    @property
    def target(self) -> str | None: ...

    @property
    def vm(self) -> tuple[str, str]:
        """The VM's name and UUID as this member's last look found them ("" before it)."""

    def poke(self) -> None:
        """Look again soon (a member's phase or spec changed)."""

    def note_event(self, type: str, reason: str, message: str) -> None: ...

    async def switch_copy(self) -> Copy | str:
        """The copy as it is now, for the group's switch (``agent.groupswitch``): the spec in
        effect, the disk just observed, its target and the destination's format; or why this
        member is not ready for the pivot after all (its mirror, its destination)."""


def key_of(body: Mapping[str, Any]) -> GroupKey | None:
    spec = body.get("spec") or {}
    group = spec.get("group")
    if not isinstance(group, str) or not group:
        return None
    return body["metadata"]["namespace"], group, str(spec.get("domain"))


def _vm_ref(ref: str) -> str:
    """A domain reference as libvirt reads it: a UUID in any case, with or without its
    hyphens, is one VM (``adapters.hypervisor`` looks such a reference up by UUID); a name
    is case-sensitive."""
    try:
        return str(uuidlib.UUID(ref))
    except ValueError:
        return ref


def _aliases(listed: Sequence[Mapping[str, Any]], key: GroupKey,
             vm: Collection[str]) -> tuple[tuple[str, str], ...]:
    """Objects of the group's namespace and name whose ``spec.domain`` is another name of the
    same VM: libvirt takes a domain by name or by UUID (in any spelling of it), and a group
    is keyed by how its members name it (one spelling, one group). One that ended (or is
    being deleted) is not: it switches nothing any more."""
    names = {_vm_ref(n) for n in (*vm, key[2]) if n}
    found = []
    for body in listed:
        spec = body.get("spec") or {}
        domain = str(spec.get("domain"))
        if (body["metadata"].get("namespace") == key[0] and spec.get("group") == key[1]
                and domain != key[2] and _vm_ref(domain) in names
                and not body["metadata"].get("deletionTimestamp")
                and (body.get("status") or {}).get("phase") not in TERMINAL_PHASES):
            found.append((str(body["metadata"]["name"]), domain))
    return tuple(sorted(found))


def _created(body: Mapping[str, Any]) -> dt.datetime | None:
    stamp = (body.get("metadata") or {}).get("creationTimestamp")
    try:
        return dt.datetime.strptime(str(stamp), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def _listed_member(body: Mapping[str, Any], *, node: str) -> GroupMember:
    spec = body.get("spec") or {}
    raw = (body.get("status") or {}).get("phase")
    phase = raw if raw in {p.value for p in Phase} else None
    claimed = ((body["metadata"].get("labels") or {}).get(NODE_LABEL)) or None
    return GroupMember(name=body["metadata"]["name"], phase=phase,
                       pivot=spec.get("pivot") is True, abort=spec.get("abort") is True,
                       followed=False, elsewhere=claimed if claimed != node else None)


class Groups:
    """The disk groups of one agent: what a member observes of its group, the status summary,
    wake-ups between members, and the coordinated abort."""

    def __init__(self, hv: Hypervisor, followers: Callable[[], Sequence[Member]], *,
                 kube: Kube, clock: Callable[[], dt.datetime], node: str = ""):
        self.hv, self.kube, self.clock, self.node = hv, kube, clock, node
        self._followers = followers
        self._aborting: dict[GroupKey, asyncio.Task[str]] = {}

    def members(self, key: GroupKey | None) -> list[Member]:
        if key is None:
            return []
        return [f for f in self._followers() if key_of(f.body) == key]

    def changed(self, key: GroupKey | None, *, by: Member) -> None:
        """A member's phase or spec changed, or it is no longer followed: the others look
        again. Those naming the VM another way too (same namespace and group, another key):
        an alias that ends releases their hold now, not at their next fallback look."""
        if key is None:
            return
        for member in self._followers():
            other = key_of(member.body)
            if member is not by and other is not None and other[:2] == key[:2]:
                member.poke()

    def summary(self, key: GroupKey | None) -> dict[str, Any] | None:
        """status.group of each member: the group's name and its members' phases."""
        if key is None:
            return None
        members = sorted(self.members(key), key=lambda m: m.name)
        return {"name": key[1],
                "members": [{"name": m.name, "phase": str(m.phase or "")} for m in members]}

    async def view(self, key: GroupKey | None, *, listing: bool,
                   vm: Collection[str] = ()) -> GroupView | None:
        """The group as a member sees it now. ``listing`` (a pivot is due): ask the API
        server for every member too, those no agent follows yet included. ``vm``: the VM's
        name and UUID, as the member's look found them: an object of the group that names
        the VM the other way is an alias (``GroupView.aliases``)."""
        if key is None:
            return None
        followed = {m.name: GroupMember(
            name=m.name, phase=m.phase.value if m.phase else None,
            pivot=(m.body.get("spec") or {}).get("pivot") is True,
            abort=(m.body.get("spec") or {}).get("abort") is True) for m in self.members(key)}
        if not listing:
            return GroupView(key[1], tuple(followed.values()))
        try:
            listed = await self.kube.list_namespace(key[0])
        except Exception as exc:  # no pivot on a partial view: stay on the source
            log.warning("group %s/%s: cannot list its members: %s", key[0], key[1], exc)
            return GroupView(key[1], tuple(followed.values()), listing_error=str(exc),
                             listed=True)
        in_api = [b for b in listed
                  if key_of(b) == key and not b["metadata"].get("deletionTimestamp")]
        members = dict(followed)
        for body in in_api:
            members.setdefault(body["metadata"]["name"], _listed_member(body, node=self.node))
        created = [c for c in map(_created, in_api) if c is not None]
        age = (self.clock() - max(created)).total_seconds() if created else None
        return GroupView(key[1], tuple(members.values()), newest_age=age, listed=True,
                         aliases=_aliases(listed, key, vm))

    # -- abort --------------------------------------------------------------------------
    async def abort(self, key: GroupKey, domain: str, *, by: Member) -> str:
        """End every member's job at one instant (once for all the members that ask at the
        same time; the first one posts the Event; one asking once every job ended holds
        nothing still). Returns what was done."""
        task = self._aborting.get(key)
        if task is None or task.done():
            task = self._aborting[key] = asyncio.create_task(self._abort(key, domain, by))
        return await asyncio.shield(task)

    async def _abort(self, key: GroupKey, domain: str, by: Member) -> str:
        loop = asyncio.get_running_loop()
        targets = sorted({t for m in self.members(key)
                          if (t := m.target) and m.phase in JOB_PHASES})
        # A member whose step looked before the group's last abort ended its job asks again
        # once it is over: nothing is left to end, and the guest is not held still again.
        targets = [t for t in targets if await self._has_job(domain, t)]
        if not targets:
            for member in self.members(key):
                member.poke()
            return f"group {key[1]}: no job left to end"
        started = loop.time()
        how = await self._hold_still(domain)
        try:
            # (asyncio.timeout, not wait_for: a cancelled wait_for leaves the gather's
            # CancelledError unretrieved, logged whenever the GC finds it.)
            async with asyncio.timeout(CANCEL_TIMEOUT):
                await asyncio.gather(*(self.hv.cancel(domain, t) for t in targets),
                                     return_exceptions=True)
        finally:
            await self._release(domain, how)
        held = (loop.time() - started) * 1000
        for member in self.members(key):
            member.poke()
        what = {"frozen": "the guest's file systems frozen through its guest agent",
                "suspended": "the VM suspended", "none": "the VM running"}[how]
        done = (f"group {key[1]}: the jobs of {', '.join(targets)} ended at one instant, with "
                f"{what} for {held:.0f} ms")
        by.note_event("Normal", "GroupAborted", done)
        return done

    async def _has_job(self, domain: str, target: str) -> bool:
        try:
            return await self.hv.job_progress(domain, target) is not None
        except HypervisorUnavailable:
            raise
        except HypervisorError:
            return True  # the cancel finds out, as before

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
        for attempt in range(RESUME_ATTEMPTS):  # always resume: a stuck VM is worse
            try:
                await asyncio.wait_for(self.hv.unquiesce(domain, how), FREEZE_TIMEOUT)
                return
            except (HypervisorError, TimeoutError) as exc:
                log.error("group abort: resuming %s (%s) failed (attempt %d): %s", domain, how,
                          attempt + 1, exc)
                await asyncio.sleep(1)
