"""The phase logic, exhaustively: every observed disk state x spec x current phase x last
libvirt event, checked against the safety rules, plus the expected path of each scenario."""

from __future__ import annotations

import itertools

import pytest

from blockcopy.core.reconcile import Action, decide
from blockcopy.model.api import JOB_PHASES, TERMINAL_PHASES, BlockCopySpec, Phase
from blockcopy.model.observation import DiskState, JobEvent, JobProgress, Mirror, MirrorReady

SRC, DEST, OTHER = "/img/src.qcow2", "/img/dest.qcow2", "/img/other.qcow2"
RUNNING = dict(domain_found=True, domain_uuid="u", domain_name="vm", domain_running=True,
               disk_found=True, target="vda", source=SRC, source_format="qcow2")


def job(bandwidth=0):
    return JobProgress(cur=5, end=10, bandwidth=bandwidth)


# Every kind of disk the agent can observe, by name.
DISKS: dict[str, DiskState] = {
    "no-domain": DiskState(domain_found=False),
    "stopped": DiskState(domain_found=True, domain_running=False),
    "no-disk": DiskState(domain_found=True, domain_running=True),
    "idle": DiskState(**RUNNING),
    "idle-on-dest": DiskState(**{**RUNNING, "source": DEST}),
    "other-job-no-mirror": DiskState(**RUNNING, job=job()),
    "other-copy": DiskState(**RUNNING, job=job(), mirror=Mirror(OTHER, MirrorReady.READY)),
    **{f"ours-{r.name.lower()}": DiskState(**RUNNING, job=job(), mirror=Mirror(DEST, r))
       for r in MirrorReady},
    "ours-ready-throttled": DiskState(**RUNNING, job=job(bandwidth=1 << 20),
                                      mirror=Mirror(DEST, MirrorReady.READY)),
}
SPECS = {
    f"pivot={p},abort={a}": BlockCopySpec(domain="vm", disk="vda", dest=DEST, pivot=p, abort=a)
    for p, a in itertools.product([False, True], repeat=2)
}
PHASES = [None, *Phase]
EVENTS = [None, *JobEvent]

CASES = list(itertools.product(DISKS, SPECS, PHASES, EVENTS, [False, True]))


# The actions each decided phase may carry: anything else is a bug of the phase logic.
ACTIONS_OF = {
    Phase.COPYING: {Action.NONE, Action.START_COPY, Action.SET_BANDWIDTH},
    Phase.MIRRORED: {Action.NONE, Action.SET_BANDWIDTH},
    Phase.PIVOTING: {Action.NONE, Action.PIVOT},
    Phase.ABORTING: {Action.NONE, Action.ABORT},
    **{p: {Action.NONE} for p in (Phase.PENDING, Phase.QUEUED, Phase.PREPARING, *TERMINAL_PHASES)},
}


def check_safety(disk_name, spec_name, phase, event, was_mirrored) -> int:
    """The safety rules for one case; returns how many rules applied (at least one)."""
    disk, spec = DISKS[disk_name], SPECS[spec_name]
    d = decide(spec, phase, disk, last_event=event, was_mirrored=was_mirrored)
    ours = disk.mirror is not None and disk.mirror.dest == DEST
    case = (disk_name, spec_name, phase, event, was_mirrored, d)
    # Every decision: an action its phase may carry.
    assert d.action in ACTIONS_OF[d.phase], case
    applied = 1
    if phase in TERMINAL_PHASES:  # finished objects never change and never act
        assert (d.phase, d.action) == (phase, Action.NONE), case
        return applied + 1
    # A job of ours once started never goes back to before the job.
    if phase in JOB_PHASES:
        assert d.phase not in (Phase.PENDING, Phase.QUEUED, Phase.PREPARING), case
        applied += 1
    # Pivot only onto our own mirror, only when libvirt says ready, only when asked.
    if d.action == Action.PIVOT:
        assert ours and disk.mirror.ready == MirrorReady.READY and spec.pivot and \
            not spec.abort, case
        applied += 1
    # Never touch someone else's job.
    if d.action in (Action.PIVOT, Action.ABORT, Action.SET_BANDWIDTH):
        assert ours, case
        applied += 1
    # Start only on an idle, running disk, once.
    if d.action == Action.START_COPY:
        assert phase in (None, Phase.PENDING, Phase.QUEUED, Phase.PREPARING), case
        assert disk_name == "idle" and not spec.abort and d.phase == Phase.COPYING, case
        applied += 1
    # Pivoted only when the VM really runs on the destination.
    if d.phase == Phase.PIVOTED:
        assert disk.source == DEST, case
        applied += 1
    # A failure always says why.
    if d.phase == Phase.FAILED:
        assert d.message and d.reason, case
        applied += 1
    # Mirrored / Pivoting only on a ready mirror of ours.
    if d.phase == Phase.MIRRORED or d.action == Action.PIVOT:
        assert ours and disk.mirror.ready == MirrorReady.READY, case
        applied += 1
    return applied


def test_safety_rules_hold_everywhere():
    """One test over the whole enumerated state space (disks x specs x phases x events x
    was_mirrored): every case checked, each against every rule that applies to it."""
    applied = [check_safety(*case) for case in CASES]
    assert len(applied) == len(CASES) == 12 * 4 * 11 * 5 * 2  # disks, specs, phases, events
    assert min(applied) >= 1
    # The rules are not vacuous: each kind of decision occurs in the space.
    decided = {decide(SPECS[s], p, DISKS[d], last_event=e, was_mirrored=m).action
               for d, s, p, e, m in CASES}
    assert decided == set(Action) - {Action.PREPARE}


def path(spec, steps):
    """Feed (disk, event) observations through decide, carrying the phase along."""
    phase, was_mirrored, seen = None, False, []
    for disk_name, event in steps:
        d = decide(spec, phase, DISKS[disk_name], last_event=event, was_mirrored=was_mirrored)
        phase = d.phase
        was_mirrored = was_mirrored or phase == Phase.MIRRORED
        seen.append((phase.value, d.action.value))
    return seen


def test_happy_path_with_pivot_requested_later():
    spec = SPECS["pivot=False,abort=False"]
    assert path(spec, [("idle", None), ("ours-copying", None), ("ours-ready", JobEvent.READY),
                       ("ours-ready", None)]) == [
        ("Copying", "startCopy"), ("Copying", "none"), ("Mirrored", "none"), ("Mirrored", "none")]
    spec = SPECS["pivot=True,abort=False"]
    assert decide(spec, Phase.MIRRORED, DISKS["ours-ready"]).action == Action.PIVOT
    assert decide(spec, Phase.PIVOTING, DISKS["ours-pivoting"]).phase == Phase.PIVOTING
    assert decide(spec, Phase.PIVOTING, DISKS["idle-on-dest"]).phase == Phase.PIVOTED


def test_pivot_from_the_start_waits_for_ready_not_for_cur_equal_end():
    spec = SPECS["pivot=True,abort=False"]
    done = DiskState(**RUNNING, job=JobProgress(cur=10, end=10, bandwidth=0),
                     mirror=Mirror(DEST, MirrorReady.COPYING))
    d = decide(spec, Phase.COPYING, done)
    assert (d.phase, d.action) == (Phase.COPYING, Action.NONE)


@pytest.mark.parametrize("was_mirrored,word", [(True, "consistent point-in-time"),
                                               (False, "incomplete")])
def test_abort_says_whether_the_copy_is_usable(was_mirrored, word):
    spec = SPECS["pivot=False,abort=True"]
    d = decide(spec, Phase.MIRRORED if was_mirrored else Phase.COPYING, DISKS["ours-ready"])
    assert (d.phase, d.action) == (Phase.ABORTING, Action.ABORT)
    d = decide(spec, Phase.ABORTING, DISKS["idle"], was_mirrored=was_mirrored)
    assert d.phase == Phase.ABORTED and word in d.message


def test_abort_wins_over_pivot():
    spec = SPECS["pivot=True,abort=True"]
    assert decide(spec, Phase.MIRRORED, DISKS["ours-ready"]).action == Action.ABORT


def test_abort_before_start_copies_nothing():
    d = decide(SPECS["pivot=False,abort=True"], None, DISKS["idle"])
    assert (d.phase, d.action) == (Phase.ABORTED, Action.NONE)


def test_restart_adopts_a_running_job_instead_of_starting_another():
    spec = SPECS["pivot=False,abort=False"]
    assert decide(spec, None, DISKS["ours-copying"]).phase == Phase.COPYING
    assert decide(spec, None, DISKS["ours-copying"]).action == Action.NONE
    assert decide(spec, Phase.PENDING, DISKS["ours-ready"]).phase == Phase.MIRRORED


def test_restart_mid_pivot_finishes_the_pivot():
    spec = SPECS["pivot=True,abort=False"]
    assert decide(spec, Phase.PIVOTING, DISKS["ours-ready"]).action == Action.PIVOT


@pytest.mark.parametrize("disk_name,reason", [
    ("no-domain", "DomainNotFound"), ("stopped", "DomainNotRunning"), ("no-disk", "DiskNotFound"),
    ("other-copy", "DiskBusy"), ("other-job-no-mirror", "DiskBusy"),
    ("idle-on-dest", "DestIsSource"),
])
def test_refusals_before_start(disk_name, reason):
    d = decide(SPECS["pivot=False,abort=False"], None, DISKS[disk_name])
    assert (d.phase, d.reason, d.action) == (Phase.FAILED, reason, Action.NONE)


@pytest.mark.parametrize("disk_name,event,reason", [
    ("no-domain", None, "DomainGone"), ("stopped", None, "DomainStopped"),
    ("idle", JobEvent.FAILED, "JobFailed"), ("idle", JobEvent.CANCELED, "JobCanceled"),
    ("idle", None, "JobLost"),
])
def test_failures_during_the_copy_stay_on_the_source(disk_name, event, reason):
    d = decide(SPECS["pivot=True,abort=False"], Phase.COPYING, DISKS[disk_name], last_event=event)
    assert (d.phase, d.reason) == (Phase.FAILED, reason)
    assert "source" in d.message or "lost" in d.message


def test_pivot_that_ended_on_the_source_is_a_failure_not_a_success():
    d = decide(SPECS["pivot=True,abort=False"], Phase.PIVOTING, DISKS["idle"])
    assert (d.phase, d.reason) == (Phase.FAILED, "PivotFailed")


def test_bandwidth_change_is_applied_live():
    spec = BlockCopySpec(domain="vm", disk="vda", dest=DEST, bandwidth=2 << 20)
    assert decide(spec, Phase.COPYING, DISKS["ours-copying"]).action == Action.SET_BANDWIDTH
    assert decide(spec, Phase.MIRRORED, DISKS["ours-ready"]).action == Action.SET_BANDWIDTH
    unlimited = BlockCopySpec(domain="vm", disk="vda", dest=DEST)
    d = decide(unlimited, Phase.MIRRORED, DISKS["ours-ready-throttled"])
    assert d.action == Action.SET_BANDWIDTH
