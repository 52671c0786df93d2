"""core.plan_status: counts, bytes, rate and time left of a whole plan, per-node counts
(bounded), conditions that move their lastTransitionTime only on a flip."""

from __future__ import annotations

import datetime as dt

from blockcopy.core import plan_status
from blockcopy.core.plan_status import PlanPhase
from blockcopy.core.planning import CONFLICT, WAITING, Child, PlannedDisk
from blockcopy.core.progress import ProgressWindow
from blockcopy.model.api import Phase
from blockcopy.model.plan import parse_plan

T0 = dt.datetime(2026, 12, 4, 5, 0, tzinfo=dt.UTC)
SPEC = parse_plan({"source": {"pathPrefix": "/s"}, "destination": {"pathPrefix": "/d"},
                   "pivot": "Automatic"})
MANUAL = parse_plan({"source": {"pathPrefix": "/s"}, "destination": {"pathPrefix": "/d"}})


def disk(i, node="n1", size=1000):
    return PlannedDisk(i, node, f"vm{i}", "", "vda", f"/s/{i}", f"/d/{i}", size, i)


def test_counts_per_phase_and_node():
    disks = [disk(i, node=f"n{i % 2}") for i in range(8)]
    children = {0: Child("c0", 0, Phase.COPYING, False, "n0", cur=500, end=1000),
                1: Child("c1", 1, Phase.MIRRORED, False, "n1", cur=900, end=1000),
                2: Child("c2", 2, Phase.PIVOTED, True, "n0"),
                3: Child("c3", 3, Phase.FAILED, False, "n1", message="boom"),
                4: Child("c4", 4, None, False, "n0")}
    states = {5: (WAITING, "waiting for node n1"), 6: (CONFLICT, "held by ns/x")}
    whole, nodes = plan_status.count(disks, children, states)
    assert whole.to_status() == {"total": 8, "queued": 2, "copying": 1, "mirrored": 1,
                                 "pivoted": 1, "failed": 2, "waiting": 1}
    assert (whole.bytes_done, whole.bytes_total) == (500 + 1000 + 1000, 8000)
    assert nodes["n0"].total == 4 and (nodes["n0"].failed, nodes["n1"].failed) == (1, 1)
    entries = plan_status.disk_entries(disks, children, states, "p")
    assert entries[3]["message"] == "boom" and entries[3]["phase"] == "Failed"
    assert entries[6]["state"] == CONFLICT and "child" not in entries[6]
    assert entries[7]["child"] == "p-0007"


def test_phases():
    def phase(spec, **counts):
        return plan_status.phase_of(spec, plan_status.Counts(**counts), selected=True)[0]

    assert phase(SPEC, total=2, pivoted=2) == PlanPhase.COMPLETED
    assert phase(SPEC, total=2, pivoted=1, failed=1) == PlanPhase.FAILED
    assert phase(SPEC, total=2, pivoted=1, mirrored=1) == PlanPhase.RUNNING
    assert phase(MANUAL, total=2, failed=1, mirrored=1) == PlanPhase.AWAITING_PIVOT
    assert phase(MANUAL, total=2, mirrored=1, queued=1) == PlanPhase.RUNNING
    assert plan_status.phase_of(SPEC, plan_status.Counts(), selected=False)[0] == \
        PlanPhase.PENDING


def test_rate_and_eta_over_rounds():
    disks = [disk(0, size=10_000)]
    window = ProgressWindow()
    previous: dict = {}
    for second, cur in enumerate((0, 1000, 2000, 3000)):
        children = {0: Child("c", 0, Phase.COPYING, False, "n1", cur=cur, end=10_000)}
        previous = plan_status.build(SPEC, plan="p", disks=disks, children=children,
                                     states={}, selected=True, excluded=(), generation=3,
                                     previous=previous,
                                     now=T0 + dt.timedelta(seconds=second),
                                     window=window, clock=float(second))
    assert previous["rate"] == 1000 and previous["eta"] == "7s"
    assert previous["bytesDone"] == 3000 and previous["progress"] == "0/1"
    assert previous["startTime"] == "2026-12-04T05:00:00Z"
    assert previous["observedGeneration"] == 3


def test_conditions_flip_with_their_time():
    first = plan_status.conditions(PlanPhase.RUNNING, "m", generation=1, now=T0, previous=None)
    assert {c["type"]: c["status"] for c in first} == {"Ready": "False", "Reconciling": "True",
                                                        "Stalled": "False"}
    later = T0 + dt.timedelta(minutes=5)
    same = plan_status.conditions(PlanPhase.RUNNING, "m2", generation=1, now=later,
                                  previous=first)
    assert {c["lastTransitionTime"] for c in same} == {"2026-12-04T05:00:00Z"}
    done = plan_status.conditions(PlanPhase.FAILED, "x", generation=1, now=later,
                                  previous=same)
    by_type = {c["type"]: c for c in done}
    assert by_type["Stalled"]["status"] == "True"
    assert by_type["Stalled"]["lastTransitionTime"] == "2026-12-04T05:05:00Z"
    assert by_type["Ready"]["lastTransitionTime"] == "2026-12-04T05:00:00Z"


def test_node_list_is_bounded():
    nodes = {f"n{i:04d}": plan_status.Counts(total=1) for i in range(300)}
    listed, truncated = plan_status.node_entries(nodes)
    assert len(listed) == plan_status.MAX_NODES and truncated
    assert listed[0]["name"] == "n0000"
