"""Gates: what may change the phase logic's decision once the rest of the agent is taken into
account. ``reconcile.decide`` knows one object and its disk; a gate knows one more thing
(another object holding the job, the node's copy slots, the disk group, a chain move's lower
layers, the files left behind) and may hold the decision back or turn it into another one.
Each gate is a pure function of the decision and an observation, applied in a fixed order
by ``decide_start`` and ``decide_running``. Pure: no I/O, no clock (ages are observed).
"""

from __future__ import annotations

import dataclasses

from blockcopy.core import reconcile
from blockcopy.core.reconcile import Action, Decision
from blockcopy.model.api import JOB_PHASES, BlockCopySpec, Phase
from blockcopy.model.observation import DiskState, GroupView, JobEvent, LayersView

GROUP_SETTLE = 5.0  # s after the newest member's creation before a group may pivot
LIST_RETRY = 5.0  # s: the group's members could not be listed; look again then


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# ------------------------------------------------------------------ before the job

def adopt(decision: Decision, *, holder: str | None, target: str | None,
          dest: str) -> Decision:
    """A job to our dest runs and our status does not say we started it: ours if the agent
    restarted before recording it (``holder`` None), not if another object of this agent
    started it (two BlockCopies to one dest both pass the destination check before the first
    job exists)."""
    if decision.reason != "Adopted" or holder is None:
        return decision
    return Decision(Phase.FAILED, reason="DiskBusy",
                    message=f"disk {target} already has a block job, the copy to {dest} of "
                    f"BlockCopy {holder}; one block copy per disk at a time")


def queue(decision: Decision, *, place: int, limit: int) -> Decision:
    """Beyond --max-active-copies a start waits in the Queued phase, first come first served
    (``place``: 0 = may start now, else the place in the queue)."""
    if decision.action != Action.START_COPY or place == 0:
        return decision
    return Decision(Phase.QUEUED, reason="Queued",
                    message=f"waiting for a free copy slot on this node: {ordinal(place)} in "
                    f"the queue (at most {limit} copies at once, --max-active-copies)")


def decide_start(spec: BlockCopySpec, current: Phase | None, disk: DiskState, *,
                 holder: str | None, place: int, limit: int) -> Decision:
    """The decision before our job exists: the phase logic, then adoption, then the queue."""
    decision = reconcile.decide(spec, current, disk)
    decision = adopt(decision, holder=holder, target=disk.target, dest=spec.dest)
    return queue(decision, place=place, limit=limit)


# ------------------------------------------------------------------ while the job runs

def layers(decision: Decision, view: LayersView) -> Decision:
    """A chain move: hold the pivot until every lower image is verified; end the job on the
    source if one failed."""
    if not view.chain_move:
        return decision
    if view.failure is not None:
        if decision.phase in (Phase.COPYING, Phase.MIRRORED) or decision.action == Action.PIVOT:
            return Decision(Phase.ABORTING, Action.ABORT, reason="LayerCopyFailed",
                            message=f"copying a lower image failed ({view.failure}); ending "
                            "the job, the VM stays on its source")
        if decision.phase == Phase.ABORTED:
            return Decision(Phase.FAILED, reason="LayerCopyFailed",
                            message=f"copying a lower image failed ({view.failure}); the VM "
                            "stays on its source; the files made are listed in "
                            "status.createdFiles")
        return decision
    if decision.action == Action.PIVOT and not view.all_verified:
        return Decision(Phase.MIRRORED, reason="WaitingForLayers",
                        message=f"the mirror is ready; waiting for the lower images "
                        f"({view.verified} of {view.total} verified) before the pivot")
    return decision


def group_pivot_blocked(view: GroupView, *, asking: str) -> tuple[str | None, float | None]:
    """(None, None) when every member is Mirrored (or further) with pivot: true, followed by
    this agent unless Pivoted, and no member can still be on its way; else (why not, s until
    a look again without a wake-up, or None). ``asking``: the member whose mirror is ready
    (the group's switch asks with "": every member's own phase counts)."""
    prefix = (f"the mirror is ready; group {view.name} pivots when every member is Mirrored "
              "with pivot: true")
    if view.listing_error is not None:  # no pivot on a partial view: stay on the source
        return f"{prefix} (its members cannot be listed: {view.listing_error})", LIST_RETRY
    blocked = [f"{name} names this VM {domain!r} in the same group: libvirt takes a VM by "
               "name or by UUID, and a group's members must all name it the same way, or the "
               "disks do not switch together; abort or delete one of them and create it again "
               "naming the VM as the others do" for name, domain in view.aliases]
    for member in sorted(view.members, key=lambda m: m.name):
        phase = Phase.MIRRORED.value if member.name == asking else member.phase
        if phase in (Phase.MIRRORED, Phase.PIVOTING) and not member.followed:
            # The group switches all or none, in one pause of this agent: a member it does
            # not follow yet (say, just restarted) cannot be switched with the others, nor
            # ever one another node's agent follows (a VM of the same name there).
            blocked.append(
                f"{member.name} is {phase} on node {member.elsewhere}, whose agent follows it: "
                "a group switches in one pause of one agent, so its members must be disks of "
                "one VM on one node; delete the members that are not" if member.elsewhere
                else f"{member.name} is {phase} but not followed by this agent yet")
            continue
        if phase in (Phase.PIVOTING, Phase.PIVOTED):
            continue
        if phase != Phase.MIRRORED:
            blocked.append(f"{member.name} is {phase or 'not started'}")
        elif not member.pivot:
            blocked.append(f"{member.name} has no pivot: true")
    recheck = None
    if not blocked and view.newest_age is not None and view.newest_age < GROUP_SETTLE:
        recheck = GROUP_SETTLE - view.newest_age
        blocked.append(f"members created up to {GROUP_SETTLE:g} s after the newest one may "
                       f"still join; pivoting in {recheck:.0f} s")
    if not blocked:
        return None, None
    return f"{prefix} ({'; '.join(blocked)})", recheck


def group_abort_blocked(view: GroupView) -> str | None:
    """Why the group may not abort yet: a member with a job (or none yet) lacks abort: true."""
    job_phases = {p.value for p in JOB_PHASES}
    waiting = sorted(m.name for m in view.members
                     if m.followed and not m.abort and (m.phase is None or m.phase in job_phases))
    if not waiting:
        return None
    return (f"group {view.name} aborts together, for a copy consistent across its disks: "
            f"waiting for abort: true on {', '.join(waiting)}")


def group(decision: Decision, view: GroupView | None, *, asking: str,
          current: Phase | None) -> tuple[Decision, float | None]:
    """A member of a disk group pivots and aborts with the others. Returns the decision and
    when to look again without a wake-up (a group that may pivot in a few seconds)."""
    if view is None:
        return decision, None
    if decision.action == Action.PIVOT:
        blocked, recheck = group_pivot_blocked(view, asking=asking)
        if blocked is not None:
            return Decision(Phase.MIRRORED, reason="WaitingForGroup", message=blocked), recheck
    if decision.action == Action.ABORT and decision.reason != "LayerCopyFailed":
        blocked = group_abort_blocked(view)
        if blocked is not None:
            return Decision(current or Phase.COPYING, reason="WaitingForGroup",
                            message=blocked), None
    return decision, None


def left_behind(decision: Decision, created_files: list[str]) -> Decision:
    """A job that ended without the pivot leaves its files: say which (never deleted)."""
    if decision.phase not in (Phase.FAILED, Phase.ABORTED) or not created_files or \
            "left in place" in decision.message:
        return decision
    return dataclasses.replace(decision, message=f"{decision.message}; left in place: "
                               f"{', '.join(created_files)}")


def decide_running(spec: BlockCopySpec, current: Phase, disk: DiskState, *,
                   was_mirrored: bool, last_event: JobEvent | None, layers_view: LayersView,
                   group_view: GroupView | None, asking: str,
                   created_files: list[str]) -> tuple[Decision, float | None]:
    """The decision while our job runs (or just ended): the phase logic, then the chain
    move's layers, the group, and the files left behind. Returns it and when a waiting
    group looks again."""
    decision = reconcile.decide(spec, current, disk, last_event=last_event,
                                was_mirrored=was_mirrored)
    decision = layers(decision, layers_view)
    decision, recheck = group(decision, group_view, asking=asking, current=current)
    return left_behind(decision, created_files), recheck


def pivot_due(spec: BlockCopySpec, current: Phase, disk: DiskState) -> bool:
    """Would the phase logic pivot now? Then a group member's observation lists the group
    from the API server (only then: a list per look would cost the API server)."""
    return reconcile.decide(spec, current, disk).action == Action.PIVOT
