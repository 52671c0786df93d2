"""Status building: conditions in the standard shape, progress, timestamps, Events."""

from __future__ import annotations

import datetime as dt

from blockcopy.core.reconcile import Decision
from blockcopy.core.status import build_status, flipped_to_true, phase_event, progress_text
from blockcopy.model.api import Phase
from blockcopy.model.observation import DiskState, JobProgress, Mirror, MirrorReady

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(seconds=30)
DISK = DiskState(domain_found=True, domain_running=True, disk_found=True, target="vda",
                 source="/s", job=JobProgress(cur=25, end=100, bandwidth=0),
                 mirror=Mirror("/d", MirrorReady.COPYING))


def test_progress_text():
    assert progress_text(None, None) == "0%"
    assert progress_text(0, 1) == "0%"  # libvirt's "not started yet"
    assert progress_text(25, 100) == "25%"
    assert progress_text(999, 1000) == "99%"  # never 100% before the end
    assert progress_text(1000, 1000) == "100%"


def test_copying_status_has_counters_and_standard_conditions():
    s = build_status(Decision(Phase.COPYING, message="copying"), previous={}, disk=DISK,
                     node_name="n1", generation=3, now=T0)
    assert (s["phase"], s["cur"], s["end"], s["progress"]) == ("Copying", 25, 100, "25%")
    assert s["nodeName"] == "n1" and s["observedGeneration"] == 3
    types = {c["type"]: c for c in s["conditions"]}
    assert set(types) == {"Mirrored", "Pivoted", "Aborted", "Failed", "Ready", "Reconciling",
                          "Stalled"}
    assert types["Reconciling"]["status"] == "True" and types["Ready"]["status"] == "False"
    for c in types.values():
        assert set(c) == {"type", "status", "reason", "message", "lastTransitionTime",
                          "observedGeneration"}
        assert c["status"] in ("True", "False")
    assert types["Mirrored"]["status"] == "False"


def test_transition_time_moves_only_when_a_condition_flips():
    s0 = build_status(Decision(Phase.COPYING), previous={}, disk=DISK, node_name="n",
                      generation=1, now=T0)
    ready = DiskState(**{**DISK.__dict__, "mirror": Mirror("/d", MirrorReady.READY)})
    s1 = build_status(Decision(Phase.MIRRORED), previous=s0, disk=ready, node_name="n",
                      generation=1, now=T1)
    c0 = {c["type"]: c for c in s0["conditions"]}
    c1 = {c["type"]: c for c in s1["conditions"]}
    assert c1["Mirrored"]["status"] == "True"
    assert c1["Mirrored"]["lastTransitionTime"] == "2026-01-01T12:00:30Z"
    assert c1["Failed"]["lastTransitionTime"] == c0["Failed"]["lastTransitionTime"]
    assert s1["mirroredTime"] == "2026-01-01T12:00:30Z" and s1["cur"] == s1["end"]


def test_mirrored_stays_true_after_pivot_and_after_abort_of_a_ready_mirror():
    prev = {"mirroredTime": "2026-01-01T12:00:30Z", "phase": "Mirrored"}
    for phase in (Phase.PIVOTED, Phase.ABORTED):
        s = build_status(Decision(phase), previous=prev, disk=None, node_name="n",
                         generation=1, now=T1)
        assert {c["type"]: c["status"] for c in s["conditions"]}["Mirrored"] == "True"
        assert s["completionTime"] == "2026-01-01T12:00:30Z"


def test_events_one_per_phase_change_warning_on_failure():
    assert phase_event("Copying", Decision(Phase.COPYING)) is None
    assert phase_event("Copying", Decision(Phase.MIRRORED, message="in sync"))[0] == "Normal"
    etype, reason, message = phase_event("Copying", Decision(Phase.FAILED, reason="JobFailed",
                                                             message="boom"))
    assert (etype, reason) == ("Warning", "JobFailed") and "boom" in message


def test_kstatus_conditions_follow_the_phase():
    expected = {  # phase: (Ready, Reconciling, Stalled)
        Phase.PENDING: ("False", "True", "False"), Phase.COPYING: ("False", "True", "False"),
        Phase.MIRRORED: ("True", "False", "False"), Phase.PIVOTING: ("False", "True", "False"),
        Phase.PIVOTED: ("True", "False", "False"), Phase.ABORTING: ("False", "True", "False"),
        Phase.ABORTED: ("True", "False", "False"), Phase.FAILED: ("False", "False", "True"),
    }
    for phase, (ready, reconciling, stalled) in expected.items():
        s = build_status(Decision(phase), previous={}, disk=None, node_name="n", generation=1,
                         now=T0)
        got = {c["type"]: c["status"] for c in s["conditions"]}
        assert (got["Ready"], got["Reconciling"], got["Stalled"]) == (ready, reconciling,
                                                                       stalled), phase


def test_only_trouble_conditions_flipping_to_true_get_a_warning_event():
    before = [{"type": "Converging", "status": "False"},
              {"type": "SpecChangeRefused", "status": "False"}]
    now = [{"type": "Converging", "status": "True", "message": "what remains shrinks"},
           {"type": "ConvergenceAssist", "status": "True", "message": "write-blocking"},
           {"type": "SpecChangeRefused", "status": "True", "message": "dest cannot change"}]
    assert [c["type"] for c in flipped_to_true(before, now)] == ["SpecChangeRefused"]
    assert flipped_to_true(now, now) == []  # already True: no second Event
