"""The plan controller (controller.plans) on fakes: rounds against an in-memory API with the
nodes' inventories, the agents' part played by the test (phases moved forward)."""

from __future__ import annotations

import datetime as dt

import pytest

from blockcopy.controller.plans import INVENTORY_TTL, ControllerConfig, PlanController
from blockcopy.core.plan_status import PlanPhase
from blockcopy.model.api import FINALIZER, NODE_LABEL, Verify, parse_spec
from blockcopy.model.plan import PLAN_LABEL
from support.plan_fakes import NOW, FakePlanKube, domain, inventory, plan

pytestmark = pytest.mark.asyncio


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def tick(self, seconds: float = 1.0) -> None:
        self.t += seconds

    def mono(self) -> float:
        return self.t

    def now(self) -> dt.datetime:
        return NOW + dt.timedelta(seconds=self.t)


@pytest.fixture
def kube() -> FakePlanKube:
    k = FakePlanKube()
    k.inventory["n1"] = inventory("n1", [
        domain("web", {"vda": "/src/web/a.qcow2", "vdb": "/src/web/b.qcow2",
                       "vdc": "/elsewhere/c.qcow2"}),
        domain("db", {"vda": "/src/db/a.qcow2"})])
    k.inventory["n2"] = inventory("n2", [domain("web", {"vda": "/src/web/a.qcow2"},
                                                uuid="u-n2")])
    return k


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def controller(kube, clock) -> PlanController:
    return PlanController(kube, ControllerConfig(agent_timeout=300), clock=clock.mono,
                          now=clock.now)


def status(kube, name="p"):
    return kube.plans[("ns", name)]["status"]


async def test_dry_run_lists_and_creates_nothing(kube, controller):
    body = kube.add_plan(plan(dryRun=True))
    await controller.round(body)
    st = status(kube)
    assert st["phase"] == PlanPhase.PLANNED and st["total"] == 4 and kube.copies == {}
    assert [(d["node"], d["domain"], d["disk"], d["source"], d["destination"], d["bytes"])
            for d in st["disks"]] == [
        ("n1", "db", "vda", "/src/db/a.qcow2", "/dst/db/a.qcow2", 1 << 20),
        ("n1", "web", "vda", "/src/web/a.qcow2", "/dst/web/a.qcow2", 1 << 20),
        ("n1", "web", "vdb", "/src/web/b.qcow2", "/dst/web/b.qcow2", 1 << 20),
        ("n2", "web", "vda", "/src/web/a.qcow2", "/dst/web/a.qcow2", 1 << 20)]
    assert "startTime" not in st
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


async def test_a_plan_runs_to_completion_within_its_limits(kube, controller, clock):
    body = kube.add_plan(plan(maxActive=2, maxActivePerNode=1, pivot="Automatic",
                              destination={"pathPrefix": "/dst", "bandwidth": "1Mi"}))
    await controller.round(body)
    assert sorted(kube.created) == ["p-0000", "p-0003"]  # one per node
    child = kube.copies[("ns", "p-0000")]
    assert child["metadata"]["labels"] == {PLAN_LABEL: "p", NODE_LABEL: "n1"}
    assert child["metadata"]["finalizers"] == [FINALIZER]
    assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-p"
    assert child["spec"] == {"domain": "db", "nodeName": "n1", "disk": "vda",
                             "dest": "/dst/db/a.qcow2", "group": "p-vm0000", "pivot": False,
                             "createDirectories": True, "bandwidth": 1 << 20}
    st = status(kube)
    assert (st["phase"], st["total"], st["queued"], st["active"]) == ("Running", 4, 4, 2)
    assert st["startTime"]
    # The agents' part: phases move, the controller follows.
    for _ in range(30):
        for name, obj in kube.children_of("p").items():
            phase = (obj.get("status") or {}).get("phase")
            nxt = {None: "Copying", "Copying": "Mirrored"}.get(phase)
            if phase == "Mirrored" and obj["spec"]["pivot"]:
                nxt = "Pivoted"
            if nxt:
                kube.set_phase(name, nxt, cur=1 << 19, end=1 << 20)
                break
        clock.tick()
        await controller.round(body)
        assert max(kube.active_seen) <= 2
        assert kube.active("n1") <= 1 and kube.active("n2") <= 1
        if status(kube)["phase"] == PlanPhase.COMPLETED:
            break
    st = status(kube)
    assert (st["phase"], st["pivoted"], st["failed"]) == (PlanPhase.COMPLETED, 4, 0)
    assert st["bytesDone"] == st["bytesTotal"] == 4 << 20
    assert {n["name"]: n["pivoted"] for n in st["nodes"]} == {"n1": 3, "n2": 1}
    # web's two disks on n1 were asked to pivot in the same round (one group)
    web = [kube.copies[("ns", n)] for n in ("p-0001", "p-0002")]
    assert {c["spec"]["group"] for c in web} == {"p-vm0001"}
    assert [e.reason for e in kube.events][-1] == PlanPhase.COMPLETED


async def test_manual_waits_at_mirrored_then_automatic_pivots(kube, controller):
    kube.inventory.pop("n2")
    body = kube.add_plan(plan(maxActive=5, maxActivePerNode=5))
    await controller.round(body)
    for name in kube.children_of("p"):
        kube.set_phase(name, "Mirrored")
    await controller.round(body)
    assert status(kube)["phase"] == PlanPhase.AWAITING_PIVOT
    assert not any(c["spec"]["pivot"] for c in kube.children_of("p").values())
    body["spec"]["pivot"] = "Automatic"
    body["metadata"]["generation"] = 2
    await controller.round(body)
    assert all(c["spec"]["pivot"] for c in kube.children_of("p").values())


async def test_conflicts_are_reported_with_the_holder(kube, controller):
    kube.add_copy("other", "hand", {"domain": "web", "disk": "vda", "nodeName": "n1",
                                    "dest": "/x"})
    body = kube.add_plan(plan(maxActive=10, maxActivePerNode=10))
    await controller.round(body)
    st = status(kube)
    web_vda = next(d for d in st["disks"] if (d["node"], d["domain"], d["disk"]) ==
                   ("n1", "web", "vda"))
    assert web_vda["state"] == "Conflict" and "other/hand" in web_vda["message"]
    assert "p-0001" not in kube.created and len(kube.created) == 3
    assert "Conflict" in [e.reason for e in kube.events]
    # A second plan over the same disks: each disk held by the first plan's child.
    second = kube.add_plan(plan("q", maxActive=10, maxActivePerNode=10))
    await controller.round(second)
    assert kube.children_of("q") == {}
    assert all(d["state"] == "Conflict" for d in status(kube, "q")["disks"])
    assert "(plan ns/p)" in status(kube, "q")["disks"][0]["message"]


async def test_node_without_agent_waits_then_goes(kube, controller, clock):
    kube.inventory["n2"] = inventory("n2", kube.inventory["n2"]["status"]["domains"],
                                     updated=NOW - dt.timedelta(hours=1))
    body = kube.add_plan(plan(maxActive=10, maxActivePerNode=10))
    await controller.round(body)
    st = status(kube)
    assert st["waiting"] == 1 and "p-0003" not in kube.created
    assert "waiting for node n2" in st["disks"][3]["message"]
    kube.inventory["n2"]["status"]["updated"] = clock.now().strftime("%Y-%m-%dT%H:%M:%SZ")
    clock.tick(INVENTORY_TTL)  # the inventories are listed again
    await controller.round(body)
    assert "p-0003" in kube.created and status(kube)["waiting"] == 0


async def test_vanished_disk_reported_and_the_set_is_fixed(kube, controller, clock):
    body = kube.add_plan(plan(maxActive=1, maxActivePerNode=1))
    await controller.round(body)
    # A new VM appears, db's disk goes: neither changes the set; db is reported.
    kube.inventory["n1"]["status"]["domains"].append(domain("new", {"vda": "/src/new.qcow2"}))
    kube.inventory["n1"]["status"]["domains"][0]["disks"][1]["source"] = "/moved/b.qcow2"
    kube.set_phase("p-0000", "Mirrored")
    clock.tick(INVENTORY_TTL)
    await controller.round(body)
    st = status(kube)
    assert st["total"] == 4 and {d["domain"] for d in st["disks"]} == {"db", "web"}
    assert st["disks"][2]["state"] == "Vanished" and "/moved/b.qcow2" in st["disks"][2]["message"]
    assert st["failed"] == 1 and "Vanished" in [e.reason for e in kube.events]
    # The controller restarted (its memory gone): the set comes from status.
    fresh = PlanController(kube, ControllerConfig(), clock=lambda: 0.0, now=lambda: NOW)
    await fresh.round(body)
    assert status(kube)["total"] == 4 and status(kube)["disks"][2]["state"] == "Vanished"


async def test_invalid_spec_and_deletion(kube, controller):
    bad = kube.add_plan(plan("bad", maxActive=0))
    await controller.round(bad)
    assert status(kube, "bad")["phase"] == PlanPhase.FAILED
    assert "from 1 to 1000" in status(kube, "bad")["message"]
    await controller.round(bad)
    assert [e.reason for e in kube.events] == ["InvalidPlan"]  # once per generation
    body = kube.add_plan(plan(maxActive=10, maxActivePerNode=10))
    await controller.round(body)
    kube.set_phase("p-0000", "Pivoted")
    kube.set_phase("p-0001", "Mirrored")
    cancelled = await controller.cancel(body)
    assert sorted(cancelled) == ["p-0001", "p-0002", "p-0003"]
    assert list(kube.children_of("p")) == ["p-0000"]


async def test_inventories_listed_once_per_ttl_and_idle_status_not_rewritten(kube, controller,
                                                                             clock):
    first = kube.add_plan(plan("p", maxActive=1))
    second = kube.add_plan(plan("q", maxActive=1, source={"pathPrefix": "/nothing"}))
    await controller.round(first)
    await controller.round(second)
    assert kube.inventory_lists == 2  # each selected its disks from a fresh list
    writes = kube.status_writes
    for _ in range(3):
        await controller.round(first)
        await controller.round(second)
    assert kube.inventory_lists == 2
    assert kube.status_writes == writes  # nothing changed since
    clock.tick(INVENTORY_TTL)
    await controller.round(first)
    assert kube.inventory_lists == 3


async def test_delete_retention_asks_the_agents_to_reclaim_the_sources(kube, controller):
    body = kube.add_plan(plan(sourceRetention="Delete", maxActive=1))
    await controller.round(body)
    (child,) = kube.children_of("p").values()
    assert child["spec"]["deleteSourcesUnder"] == "/src"
    kept = kube.add_plan(plan("k", maxActive=1))
    await controller.round(kept)
    assert all("deleteSourcesUnder" not in c["spec"] for c in kube.children_of("k").values())


@pytest.mark.parametrize(("verify", "detect"), [("None", False), ("Full", True),
                                              ("Sample", False)])
async def test_verify_and_detect_zeroes_are_copied_to_every_child(kube, controller, verify,
                                                                  detect):
    body = kube.add_plan(plan(maxActive=10, maxActivePerNode=10, verify=verify,
                              destination={"pathPrefix": "/dst", "detectZeroes": detect}))
    await controller.round(body)
    children = kube.children_of("p").values()
    assert len(children) == 4
    for child in children:
        assert (child["spec"]["verify"], child["spec"]["detectZeroes"]) == (verify, detect)
        parsed = parse_spec(child["spec"])  # as the agent reads it
        assert (parsed.verify, parsed.detect_zeroes) == (Verify(verify), detect)


async def test_verify_and_detect_zeroes_left_out_of_the_children_when_the_plan_has_none(
        kube, controller):
    """Absent stays absent: the child's verify is BlockCopy's default, not an explicit
    Sample (which would hold a copy whose check cannot be made instead of pivoting it)."""
    body = kube.add_plan(plan(maxActive=10, maxActivePerNode=10))
    await controller.round(body)
    children = kube.children_of("p").values()
    assert len(children) == 4
    for child in children:
        assert "verify" not in child["spec"] and "detectZeroes" not in child["spec"]
        parsed = parse_spec(child["spec"])
        assert parsed.verify is None and parsed.detect_zeroes is True


@pytest.mark.parametrize(("spec", "message"), [
    ({"verify": "Quick"}, "spec.verify 'Quick': one of None, Sample, Full"),
    ({"destination": {"pathPrefix": "/dst", "detectZeroes": "no"}},
     "spec.destination.detectZeroes must be true or false, not 'no'"),
])
async def test_a_bad_verify_or_detect_zeroes_fails_the_plan_with_the_reason(kube, controller,
                                                                            spec, message):
    body = kube.add_plan(plan(**spec))
    await controller.round(body)
    st = status(kube)
    assert st["phase"] == PlanPhase.FAILED and message in st["message"]
    assert [(e.reason, message in e.message) for e in kube.events] == [("InvalidPlan", True)]
    assert kube.copies == {}


async def test_a_failed_disk_aborts_its_vms_other_disks_that_were_asked_to_pivot(kube,
                                                                                 controller):
    """web's two disks were asked to pivot (Automatic, both Mirrored); the group's switch
    finds vdb's copy differs: vdb Failed (VerifyMismatch), vda Mirrored, held by its group
    (GroupMemberMismatch). The controller aborts vda, giving up its pivot: the API server
    refuses pivot and abort both true."""
    kube.inventory.pop("n2")
    body = kube.add_plan(plan(maxActive=5, maxActivePerNode=5, pivot="Automatic",
                              source={"pathPrefix": "/src", "domains": ["web"]}))
    await controller.round(body)
    for name in kube.children_of("p"):
        kube.set_phase(name, "Mirrored")
    await controller.round(body)
    assert all(c["spec"]["pivot"] for c in kube.children_of("p").values())
    kube.set_phase("p-0001", "Failed")
    await controller.round(body)
    vda = kube.copies[("ns", "p-0000")]["spec"]
    assert (vda["abort"], vda["pivot"]) == (True, False)
    kube.set_phase("p-0000", "Aborted")
    await controller.round(body)
    assert status(kube)["phase"] == PlanPhase.FAILED
