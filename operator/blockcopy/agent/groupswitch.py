"""The check at the switch for a disk group (rules in ``core.groupswitch``): all or none.

When a group's gate opens (``core.gates.group_pivot_blocked``), its members' followers reach
their pivot at about the same moment. They share one switch per group: the first starts it,
the others wait for it, and each takes its own member's share (``Switched``). A member whose
follower is busy, or asleep, takes its share on its next step (its disk is pivoted by then,
or its job ended, or it is held): the shares are kept here until taken, or until the
follower ends (a share made for a follower that ended during the switch is not kept); a
switch that ended is not kept either. A follower whose step comes while a switch of its group
is under way waits for it before it acts (its look may have seen the switch's work half
done: its disk pivoted, its share not given out yet); so does the deletion handler of a
member (``Agent.cancel_for_deletion``), which would otherwise end its job between the others'
pivots. A member being deleted is not taken into a switch (its job is about to end).

The switch: the gate again, on a fresh listing of the group; each member's copy as it is now
(``Member.switch_copy``: its mirror ready, its destination still the copy's); each check
planned before the pause (``Verifier.plan``); then ONE pause of the guest for the whole
group: every mirror settled, one flush, every checked member compared; then every member
pivots inside that pause (one pivot per disk), or none does (the jobs of the members whose
copy differs end there; a member whose job is gone by then holds them all); the guest is
resumed whatever happened. A check asked for that
cannot be made holds every member without a pause; with no check to make at all (verify:
None, or not verifiable and not asked for) the members pivot one after the other without a
pause, as a single disk would. A pivot libvirt refuses mid-way cannot be undone: the members
pivoted before it stay pivoted, it and the rest stay Mirrored and are retried.

Restart safety: nothing is written here; each member's follower records its own share (its
intent, phase Pivoting, was written before it asked for the switch). An agent that dies
mid-way leaves each disk pivoted or not, its job running or ended: the next agent's followers
find out from libvirt (``core.reconcile``), and resume a pause it left
(``Agent.resume_left_paused``). An agent that stops cancels a switch under way, its guest
resumed, before its libvirt connection is closed (``stop``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from blockcopy.agent.groups import GroupKey, Groups, Member, key_of
from blockcopy.agent.verifier import Planned, Verifier
from blockcopy.core import gates, groupswitch
from blockcopy.core.groupswitch import Switched, Verdict
from blockcopy.core.verify import Copy, Result
from blockcopy.model.api import Phase
from blockcopy.model.ports import HypervisorError, HypervisorUnavailable

log = logging.getLogger(__name__)

SWITCHABLE = (Phase.MIRRORED, Phase.PIVOTING)


def _uid(member: Member) -> str:
    meta = member.body.get("metadata") or {}
    return str(meta.get("uid") or f"{meta.get('namespace')}/{member.name}")


def _retrieved(task: asyncio.Task[None]) -> None:
    """Its exception is each waiting member's; none may be left unretrieved."""
    if not task.cancelled():
        task.exception()


class GroupSwitch:
    """Agent-wide: one switch per group at a time; each member's share kept until taken."""

    def __init__(self, verifier: Verifier, groups: Groups):
        self.verifier, self.groups, self.hv = verifier, groups, verifier.hv
        self._running: dict[GroupKey, asyncio.Task[None]] = {}
        self._shares: dict[str, Switched] = {}  # by the member's uid

    def take(self, member: Member) -> Switched | None:
        """This member's share of the last switch of its group (once)."""
        return self._shares.pop(_uid(member), None)

    async def share_of(self, member: Member) -> Switched | None:
        """This member's share, once a switch of its group under way ended. Its follower's
        own look may have seen its disk pivoted (or its job ended) by that switch, whose
        shares are given out only after the guest's resume: it waits for them rather than
        record a bare outcome (no check, zero detection left on)."""
        await self.ended(key_of(member.body))
        return self.take(member)

    async def ended(self, key: GroupKey | None) -> None:
        """Once the switch of this group under way (if any) ended. Its outcome is the
        starter's: not raised here."""
        task = self._running.get(key) if key is not None else None
        if task is not None and not task.done():
            await asyncio.wait([task])

    def forget(self, member: Member) -> None:
        """The member is no longer followed: a share it did not take goes."""
        self._shares.pop(_uid(member), None)

    async def stop(self) -> None:
        """The agent stops: end the switches under way (each guest resumed) before the
        libvirt connection goes. A switch runs apart from every follower, so stopping the
        followers does not end it (a lone disk's check, in its follower, ends with it)."""
        running = [task for task in self._running.values() if not task.done()]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def pivot(self, key: GroupKey, *, by: Member) -> Switched:
        """Switch the group ``by`` is a member of (or wait for its switch under way);
        ``by``'s share. Raises what the switch raised when it left ``by`` no share."""
        share = self.take(by)
        if share is not None:  # a switch ended while ``by`` recorded its intent
            return share
        task = self._running.get(key)
        if task is None or task.done():
            task = self._running[key] = asyncio.create_task(self._switch(key),
                                                            name=f"switch of group {key[1]}")
            task.add_done_callback(_retrieved)
            task.add_done_callback(lambda done: self._ended(key, done))
        try:
            await asyncio.shield(task)
        except Exception:
            share = self.take(by)
            if share is None:
                raise
            return share
        share = self.take(by)
        if share is None:  # not a member the switch could see: look again
            return Switched(waiting=groupswitch.waiting(key[1], [f"{by.name} was not part of "
                                                                  "the switch"]))
        return share

    def _ended(self, key: GroupKey, task: asyncio.Task[None]) -> None:
        """A switch that ended is not kept (an agent switches many groups in its life)."""
        if self._running.get(key) is task:
            del self._running[key]

    async def _switch(self, key: GroupKey) -> None:
        shares: dict[Member, Switched] = {}
        try:
            await self._run(key, shares)
        finally:
            followed = self.groups.members(key)
            for member, share in shares.items():
                if member not in followed:  # its follower ended meanwhile (``forget``)
                    continue
                if share.waiting is None:
                    self._shares[_uid(member)] = share
                    member.poke()  # its follower records it (if it is not waiting for it)
                elif _uid(member) not in self._shares:  # (a share not taken yet tells more)
                    self._shares[_uid(member)] = share

    async def _run(self, key: GroupKey, shares: dict[Member, Switched]) -> None:
        group = key[1]
        # The VM's other names, as the members' looks found them: an object of the group
        # created since those looks that names it the other way holds the switch too.
        vm = sorted({n for m in self.groups.members(key) for n in m.vm if n})
        view = await self.groups.view(key, listing=True, vm=vm)
        assert view is not None  # (a key gives a view)
        blocked, _ = gates.group_pivot_blocked(view, asking="")  # on the members' own phases
        followed = {m.name: m for m in self.groups.members(key)}
        members = sorted((m for m in followed.values() if m.phase in SWITCHABLE),
                         key=lambda m: m.name)
        if blocked is None:
            # The view's phases of this agent's members are those before the listing: a
            # member may have left Mirrored meanwhile (its job found gone, say). All or none:
            # every member not Pivoted is switched now, or none is.
            blocked = groupswitch.left_out(group, view, followed={
                name: m.phase.value if m.phase else None for name, m in followed.items()},
                switching=[m.name for m in members])
        if blocked is not None:
            shares.update((m, Switched(waiting=blocked)) for m in members)
            return
        copies: dict[Member, Copy] = {}
        why: list[str] = []
        for member in members:
            pending = self._shares.get(_uid(member))
            done = groupswitch.settled(member.name, pending) if pending else None
            if done is not None:
                why.append(done)
                continue
            got = await member.switch_copy()
            if isinstance(got, str):
                why.append(got)
            else:
                copies[member] = got
        if why or not members:
            message = groupswitch.waiting(group, why)
            shares.update((m, Switched(waiting=message)) for m in members)
            return
        plans = {m: await self.verifier.plan(copies[m]) for m in members}
        early = {m.name: p for m, p in plans.items() if isinstance(p, Result)}
        checking = [(m, p) for m, p in plans.items() if isinstance(p, Planned)]
        if not checking or any(r.reason == "NotVerifiable" for r in early.values()):
            # Held before the pause (a check asked for cannot be made), or nothing to check:
            # no pause.
            verdict = groupswitch.verdict(group, {
                **early, **{m.name: groupswitch.unchecked(p.copy.spec.verify)
                            for m, p in checking}})
            await self._apply(group, members, copies, verdict, shares)
            return
        domain, uuid = copies[members[0]].spec.domain, copies[members[0]].disk.domain_uuid
        async with self.verifier.paused(domain, uuid=uuid) as pause:
            checked = await self.verifier.check(pause, [p for _, p in checking])
            verdict = groupswitch.verdict(group, {
                **early, **{m.name: r for (m, _), r in zip(checking, checked, strict=True)}})
            await self._apply(group, members, copies, verdict, shares)
            if verdict.pivot or verdict.cancel:
                pause.step("pivot" if verdict.pivot else "cancel")
        pause.log(domain, f"group {group}, {len(members)} members: " + ", ".join(
            f"{m.name} {verdict.results[m.name].result}" for m in members))
        for member, _ in checking:  # the pause they were checked in
            share = shares[member]
            if share.result is not None:
                shares[member] = dataclasses.replace(share, result=dataclasses.replace(
                    share.result, pause_ms=pause.ms))

    async def _apply(self, group: str, members: list[Member], copies: dict[Member, Copy],
                     verdict: Verdict, shares: dict[Member, Switched]) -> None:
        """Every member pivots, or none (the jobs of those whose copy differs end; or a
        member's job is gone: the group waits, that member then ends Failed)."""
        if not verdict.pivot:
            for member in members:
                result = verdict.results[member.name]
                if member.name in verdict.cancel:  # its share once its job ended (or not)
                    try:
                        await self.hv.cancel(copies[member].spec.domain, copies[member].target)
                    except HypervisorUnavailable:
                        raise
                    except HypervisorError as exc:
                        shares[member] = Switched(result,
                                                  refused=groupswitch.cancel_refused(str(exc)))
                        continue
                shares[member] = Switched(result)
            log.warning("group %s: no member pivoted (%s)", group, ", ".join(
                f"{n} {verdict.results[n].reason}" for n in sorted(verdict.results)))
            return
        # A job that ended since the member was looked at (its destination failed, say)
        # cannot pivot: then no member does (its own check, if any, only said it was gone).
        gone = [m.name for m in members if await self.hv.job_progress(
            copies[m].spec.domain, copies[m].target) is None]
        if gone:
            message = groupswitch.waiting(group, [f"the block job of {n} is gone" for n in gone])
            shares.update((m, Switched(waiting=message)) for m in members)
            log.warning("group %s: no member pivoted (the block job of %s is gone)", group,
                        ", ".join(gone))
            return
        pivoted: list[str] = []
        for i, member in enumerate(members):
            try:
                await self.hv.pivot(copies[member].spec.domain, copies[member].target)
            except HypervisorUnavailable:
                raise
            except HypervisorError as exc:
                for rest in members[i:]:  # the switch stops here: retried with the rest
                    # No check recorded (its messages say pivoted): the retry checks again,
                    # as for a single disk whose pivot libvirt refuses.
                    shares[rest] = Switched(refused=groupswitch.refused(
                        group, str(exc), member=member.name, pivoted=pivoted, this=rest.name))
                log.warning("group %s: libvirt refused the pivot of %s (%s) after %s pivoted",
                            group, member.name, exc, ", ".join(pivoted) or "no member")
                return
            pivoted.append(member.name)
            shares[member] = Switched(verdict.results[member.name], pivoted=True)
