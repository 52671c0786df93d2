"""core.groupswitch (and the group's rules in core.verify and core.gates): a disk group
switches all or none. Which members pass, what the group does with its members' checks, and
what a held member records (reason, message, condition, decision). Pure: no fakes."""

from __future__ import annotations

from blockcopy.core import gates, groupswitch, verify
from blockcopy.core.reconcile import Action, Decision
from blockcopy.model.api import Phase, Verify, parse_spec
from blockcopy.model.observation import GroupMember, GroupView

PIVOT = Decision(Phase.PIVOTING, Action.PIVOT, reason="Pivoting")
MATCH = verify.matched(Verify.SAMPLE, 1024, 40)
BAD = verify.mismatched(Verify.SAMPLE, 1024, 3, 8 << 20, 40)
STRICT = verify.not_verified(parse_spec({"domain": "vm", "disk": "vdb", "dest": "/i/b",
                                         "verify": "Sample"}), "the disk is encrypted")
LENIENT = verify.not_verified(parse_spec({"domain": "vm", "disk": "vdc", "dest": "/i/c"}),
                              "the disk is encrypted")


# -- which members pass ------------------------------------------------------------------

def test_a_member_passes_as_a_single_disk_would_pivot():
    assert groupswitch.passes(MATCH)
    assert groupswitch.passes(verify.not_asked())  # verify: None
    assert groupswitch.passes(LENIENT)  # cannot check, not asked for explicitly
    assert not groupswitch.passes(BAD)
    assert not groupswitch.passes(STRICT)
    assert not groupswitch.passes(groupswitch.unchecked(Verify.SAMPLE))


# -- the verdict ---------------------------------------------------------------------------

def test_every_member_passes_then_all_pivot_with_their_own_results():
    results = {"a": MATCH, "b": verify.not_asked(), "c": LENIENT}
    verdict = groupswitch.verdict("g", results)
    assert verdict.pivot and verdict.cancel == () and verdict.results == results


def test_a_mismatch_ends_that_job_and_holds_every_other_member():
    verdict = groupswitch.verdict("g", {"a": MATCH, "b": BAD, "c": verify.not_asked()})
    assert not verdict.pivot and verdict.cancel == ("b",)
    assert verdict.results["b"] is BAD  # Failed VerifyMismatch, exactly as a single disk
    held = verdict.results["a"]
    assert held.reason == "GroupMemberMismatch" and held.held and held.kept_mirrored
    # its own check is kept (status.verification), the group's reason in the condition
    assert (held.result, held.samples, held.mismatches) == ("Match", 1024, 0)
    assert "group g: the copy of b differs" in held.message
    assert "no member of the group pivoted" in held.message
    assert "this disk's own check matched (1024 sampled blocks)" in held.message
    # what to do, as the API server takes it (it refuses pivot and abort both true)
    assert "abort: true with pivot: false" in held.message
    assert "kubectl blockcopy abort --group g" in held.message
    assert "not checked (spec.verify: None)" in verdict.results["c"].message


def test_two_mismatches_are_both_ended_and_named():
    verdict = groupswitch.verdict("g", {"c": BAD, "a": MATCH, "b": BAD})
    assert verdict.cancel == ("b", "c")
    assert "the copy of b and c differ from" in verdict.results["a"].message


def test_a_check_asked_for_that_cannot_be_made_holds_all_without_ending_a_job():
    verdict = groupswitch.verdict("g", {"a": MATCH, "b": STRICT,
                                        "c": groupswitch.unchecked(None)})
    assert not verdict.pivot and verdict.cancel == ()
    assert verdict.results["b"] is STRICT
    for name in ("a", "c"):
        held = verdict.results[name]
        assert held.reason == "GroupMemberNotVerifiable" and held.kept_mirrored
        assert "cannot be made on b" in held.message and "refusal back-off" in held.message
    assert "this disk was not checked" in verdict.results["c"].message


def test_a_mismatch_outweighs_a_check_that_cannot_be_made():
    verdict = groupswitch.verdict("g", {"a": BAD, "b": STRICT})
    assert verdict.cancel == ("a",)
    assert verdict.results["b"].reason == "GroupMemberMismatch"


# -- what a held member records ------------------------------------------------------------

def test_a_member_held_by_a_mismatch_stays_mirrored_with_a_false_condition():
    held = groupswitch.verdict("g", {"a": MATCH, "b": BAD}).results["a"]
    decided = verify.decision(held, PIVOT)
    assert (decided.phase, decided.action, decided.reason, decided.warning) == (
        Phase.MIRRORED, Action.NONE, "GroupMemberMismatch", True)
    assert verify.condition(held)["status"] == "False"
    assert verify.condition(held)["reason"] == "GroupMemberMismatch"
    assert verify.event(held) is None  # the held pivot's Warning tells it
    field = verify.status_field(held, "t")
    assert field["result"] == "Match" and field["message"] == held.message


def test_a_member_held_by_another_ones_check_stays_mirrored():
    held = groupswitch.verdict("g", {"a": MATCH, "b": STRICT}).results["a"]
    decided = verify.decision(held, PIVOT)
    assert (decided.phase, decided.reason) == (Phase.MIRRORED, "GroupMemberNotVerifiable")
    assert verify.condition(held)["status"] == "False"


def test_the_single_disk_rules_are_unchanged():
    assert not MATCH.held and verify.condition(MATCH)["status"] == "True"
    assert verify.decision(BAD, PIVOT).reason == "VerifyMismatch"
    assert verify.decision(STRICT, PIVOT).reason == "NotVerifiable" and STRICT.kept_mirrored
    assert not BAD.kept_mirrored


# -- messages ------------------------------------------------------------------------------

def test_names():
    assert groupswitch.names([]) == ""
    assert groupswitch.names(["a"]) == "a"
    assert groupswitch.names(["a", "b", "c"]) == "a, b and c"


def test_a_refused_pivot_mid_group_says_who_pivoted_already():
    told = groupswitch.refused("g", "not ready", member="b", pivoted=["a"], this="b")
    assert told.startswith("libvirt refused the pivot, will retry: not ready")
    assert "a of group g pivoted before it (a pivot cannot be undone)" in told
    rest = groupswitch.refused("g", "not ready", member="b", pivoted=["a"], this="c")
    assert rest.startswith("libvirt refused the pivot of b, will retry")
    first = groupswitch.refused("g", "not ready", member="a", pivoted=[], this="a")
    assert first == "libvirt refused the pivot, will retry: not ready"


def test_waiting_and_cancel_refused():
    assert "b is Copying" in groupswitch.waiting("g", ["b is Copying"])
    assert "libvirt refused to end the job" in groupswitch.cancel_refused("busy")


# -- the gate: all or none needs every member followed ------------------------------------

def _view(*members: GroupMember) -> GroupView:
    return GroupView("g", members, newest_age=60.0, listed=True)


def test_a_mirrored_member_this_agent_does_not_follow_yet_holds_the_group():
    view = _view(GroupMember("a", "Mirrored", pivot=True),
                 GroupMember("b", "Mirrored", pivot=True, followed=False))
    blocked, _ = gates.group_pivot_blocked(view, asking="a")
    assert blocked is not None and "b is Mirrored but not followed by this agent yet" in blocked
    view = _view(GroupMember("a", "Mirrored", pivot=True),
                 GroupMember("b", "Pivoting", pivot=True, followed=False))
    assert gates.group_pivot_blocked(view, asking="a")[0] is not None
    view = _view(GroupMember("a", "Mirrored", pivot=True),
                 GroupMember("b", "Pivoted", pivot=True, followed=False))
    assert gates.group_pivot_blocked(view, asking="a") == (None, None)


def test_the_switch_asks_on_every_members_own_phase():
    view = _view(GroupMember("a", "Pivoting", pivot=True), GroupMember("b", "Mirrored",
                                                                       pivot=True))
    assert gates.group_pivot_blocked(view, asking="") == (None, None)
    view = _view(GroupMember("a", "Pivoting", pivot=True), GroupMember("b", "Copying",
                                                                       pivot=True))
    assert "b is Copying" in str(gates.group_pivot_blocked(view, asking="")[0])


def test_a_member_the_last_switch_pivoted_or_ended_is_not_switched_again():
    assert groupswitch.settled("b", groupswitch.Switched(MATCH, pivoted=True)) == \
        "b pivoted already"
    assert "the copy of b differs" in str(groupswitch.settled("b", groupswitch.Switched(BAD)))
    # its job still runs: a held member, or a mismatch whose job libvirt would not end
    held = groupswitch.verdict("g", {"b": MATCH, "c": BAD}).results["b"]
    assert groupswitch.settled("b", groupswitch.Switched(held)) is None
    assert groupswitch.settled("b", groupswitch.Switched(BAD, refused="busy")) is None


def test_a_member_another_nodes_agent_follows_holds_the_group_and_says_so():
    """Not a member this agent will follow in a moment: the group can never switch in one
    pause (a VM of the same name on another node), and the message must not say "yet"."""
    view = _view(GroupMember("a", "Mirrored", pivot=True),
                 GroupMember("b", "Mirrored", pivot=True, followed=False, elsewhere="n2"))
    blocked, recheck = gates.group_pivot_blocked(view, asking="a")
    assert blocked is not None and recheck is None
    assert "b is Mirrored on node n2, whose agent follows it" in blocked
    assert "one VM on one node" in blocked and "yet" not in blocked


# -- every member is in the switch, or it does not go on -----------------------------------

def _phases(**phases):
    return GroupView("g", tuple(GroupMember(name, phase, pivot=True)
                                for name, phase in phases.items()))


def test_a_member_that_left_mirrored_during_the_listing_holds_the_switch():
    """The view was built before the listing (vdb Mirrored); during it, vdb's follower found
    its job gone (Failed): the switch may not go on with vda and vdc alone."""
    view = _phases(vda="Mirrored", vdb="Mirrored", vdc="Mirrored")
    why = groupswitch.left_out("g", view, followed={"vda": "Mirrored", "vdb": "Failed",
                                                     "vdc": "Mirrored"},
                               switching=["vda", "vdc"])
    assert why is not None and "vdb is Failed" in why and "vda" not in why


def test_a_member_no_longer_followed_is_named_with_its_listed_phase():
    view = _phases(vda="Mirrored", vdb="Pivoting")
    why = groupswitch.left_out("g", view, followed={"vda": "Mirrored"}, switching=["vda"])
    assert why is not None and "vdb is Pivoting" in why


def test_pivoted_members_and_those_switched_now_let_the_switch_go_on():
    view = _phases(vda="Pivoted", vdb="Mirrored", vdc="Pivoting")
    assert groupswitch.left_out("g", view, followed={"vdb": "Mirrored", "vdc": "Pivoting"},
                                switching=["vdb", "vdc"]) is None
    assert groupswitch.left_out("g", view, followed={"vdb": None}, switching=["vdc"]) == \
        groupswitch.waiting("g", ["vdb is not started"])
