"""The check at the switch for a disk group, as pure rules: a group switches all or none.

The agent (``agent.groupswitch``) pauses the guest once for the whole group, checks every
member's copy in that pause (``core.verify``'s rules, member by member), and then either
pivots every member or none. This module says which: a member passes when its copy matched,
or when its check is not asked for (``verify: None``) or cannot be made and was not asked
for explicitly, exactly as for a single disk. A mismatch ends the job of the member that
mismatched (Failed, VerifyMismatch) and holds the others Mirrored (GroupMemberMismatch); a
check asked for that cannot be made holds every member Mirrored (NotVerifiable for the
member, GroupMemberNotVerifiable for the others), retried on the refusal back-off. A held
member keeps what its own check found (``status.verification``), with the group's reason in
its ``Verified`` condition. Pure: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from blockcopy.core import verify
from blockcopy.core.verify import MATCH, MISMATCH, NOT_VERIFIED, Result
from blockcopy.model.api import Phase, Verify
from blockcopy.model.observation import GroupView

NOT_CHECKED = "NotChecked"  # the check was not made: another member held the group first


@dataclasses.dataclass(frozen=True)
class Switched:
    """One member's share of its group's switch. ``result``: its check (None when the group
    was not switched now, or when its pivot did not happen: the retry's check is recorded);
    ``pivoted``: its pivot was issued; ``refused``: its pivot (or the end of its job) did not
    happen and is retried, said why; ``waiting``: the group was not switched now, because a
    member is not ready (said which)."""

    result: Result | None = None
    pivoted: bool = False
    refused: str | None = None
    waiting: str | None = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the group does with its members' checks: ``pivot`` every member, or none (then
    the jobs of the members in ``cancel`` end: their copies differ). ``results``: each
    member's result as recorded (the held ones with the group's reason)."""

    pivot: bool
    cancel: tuple[str, ...]
    results: dict[str, Result]


def names(members: Sequence[str]) -> str:
    """a; a and b; a, b and c."""
    members = list(members)
    if len(members) < 2:
        return "".join(members)
    return f"{', '.join(members[:-1])} and {members[-1]}"


def passes(result: Result) -> bool:
    """Does this member let the group pivot? A match, a check not asked for, or one that
    cannot be made and was not asked for explicitly (as a single disk would pivot)."""
    return not result.held and result.reason != NOT_CHECKED


def unchecked(method: Verify | None) -> Result:
    """A member whose check was not made: another member held the group before the pause."""
    return Result(method or Verify.SAMPLE, NOT_VERIFIED, reason=NOT_CHECKED,
                  message="not checked")


def verdict(group: str, results: Mapping[str, Result]) -> Verdict:
    """All or none: every member passes, then all pivot; a member mismatched, then its job
    ends and the others are held; a check asked for cannot be made, then all are held."""
    mismatched = sorted(n for n, r in results.items() if r.result == MISMATCH)
    if mismatched:
        return Verdict(False, tuple(mismatched), {
            n: r if n in mismatched else held_by_mismatch(r, group, mismatched)
            for n, r in results.items()})
    unverifiable = sorted(n for n, r in results.items() if r.reason == "NotVerifiable")
    if unverifiable:
        return Verdict(False, (), {
            n: r if n in unverifiable else held_by_unverifiable(r, group, unverifiable)
            for n, r in results.items()})
    return Verdict(all(passes(r) for r in results.values()), (), dict(results))


def _own(result: Result) -> str:
    """What this member's own check found, in a few words."""
    if result.result == MATCH:
        what = "every block" if result.method == Verify.FULL else \
            f"{result.samples} sampled blocks"
        return f"this disk's own check matched ({what})"
    if result.reason == "NotAsked":
        return "this disk is not checked (spec.verify: None)"
    if result.reason == "NotVerified":
        return "this disk could not be checked (spec.verify left out)"
    return "this disk was not checked"


def held_by_mismatch(own: Result, group: str, mismatched: Sequence[str]) -> Result:
    """A member whose group did not pivot because another member's copy differs."""
    them = names(mismatched)
    verb = "differs" if len(mismatched) == 1 else "differ"
    return dataclasses.replace(
        own, reason=verify.GROUP_MISMATCH,
        message=f"group {group}: the copy of {them} {verb} from what the guest sees "
        f"(VerifyMismatch: its job was ended), so no member of the group pivoted; "
        f"{_own(own)}. The VM stays on its sources: end the other members' jobs (abort: "
        f"true with pivot: false, as `kubectl blockcopy abort --group {group}` sets them), "
        "or start the group again")


def held_by_unverifiable(own: Result, group: str, unverifiable: Sequence[str]) -> Result:
    """A member whose group did not pivot because another member's check, asked for
    explicitly, cannot be made."""
    them = names(unverifiable)
    return dataclasses.replace(
        own, reason=verify.GROUP_NOT_VERIFIABLE,
        message=f"group {group}: the check spec.verify asks for cannot be made on {them} "
        f"(see its Verified condition), so no member pivots; {_own(own)}. The group stays "
        "on its sources, Mirrored, and tries again on the refusal back-off")


def settled(name: str, share: Switched) -> str | None:
    """Why a member cannot be switched again while its follower has yet to record its share
    of the last switch: its disk pivoted, or its job ended on a mismatch."""
    if share.pivoted:
        return f"{name} pivoted already"
    if share.result is not None and share.result.result == MISMATCH and share.refused is None:
        return f"the copy of {name} differs from what the guest sees (VerifyMismatch)"
    return None


def left_out(group: str, view: GroupView, *, followed: Mapping[str, str | None],
             switching: Sequence[str]) -> str | None:
    """Why the switch may not go on: a member of the group (as listed) that is neither
    Pivoted nor among those switched now (``switching``), with its phase as this agent's
    follower has it now (``followed``) where it has one. None: every member is in."""
    out = []
    for member in sorted(view.members, key=lambda m: m.name):
        phase = followed.get(member.name, member.phase)
        if member.name not in switching and phase != Phase.PIVOTED.value:
            out.append(f"{member.name} is {phase or 'not started'}")
    return waiting(group, out) if out else None


def waiting(group: str, why: Sequence[str]) -> str:
    """The group was not switched now: a member is not ready after all."""
    return (f"the mirror is ready; group {group} switches all or none and a member is not "
            f"ready for it ({'; '.join(why)}); will try again")


def refused(group: str, error: str, *, member: str, pivoted: Sequence[str],
            this: str) -> str:
    """The message of a member that did not pivot because libvirt refused ``member``'s
    pivot (``this``: the member told). Those in ``pivoted`` pivoted before the refusal, and
    a pivot cannot be undone."""
    whose = "the pivot" if member == this else f"the pivot of {member}"
    tail = ""
    if pivoted:
        tail = (f"; {names(pivoted)} of group {group} pivoted before it (a pivot cannot be "
                "undone): the rest of the group switches on the retry, checked again")
    return f"libvirt refused {whose}, will retry: {error}{tail}"


def cancel_refused(error: str) -> str:
    """A mismatched member whose job libvirt would not end."""
    return (f"the copy differs from what the guest sees, and libvirt refused to end the job "
            f"(no pivot: the VM stays on its source), will retry: {error}")
