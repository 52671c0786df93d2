"""The per-node limit on copies at once: the slots (pure), and the follow loops of five
objects with two slots on the FAKES: Queued with their place, first come first served, the
next one starting as soon as a copy finishes, fails or is deleted."""

from __future__ import annotations

import asyncio

import pytest

from blockcopy.core.slots import CopySlots
from blockcopy.model.api import NODE_LABEL
from support.agent_on_fakes import FakeNode


def test_first_come_first_served():
    changes = []
    slots = CopySlots(2, on_change=lambda: changes.append(True))
    assert slots.request(("ns", "a"), created="1") == 0
    assert slots.request(("ns", "b"), created="2") == 0
    assert slots.request(("ns", "d"), created="4") == 1
    assert slots.request(("ns", "c"), created="3") == 1  # the queue is ordered by creation
    assert slots.request(("ns", "d"), created="4") == 2
    slots.release(("ns", "a"))
    assert changes == [True]
    assert slots.request(("ns", "d"), created="4") == 2  # c first
    assert slots.request(("ns", "c"), created="3") == 0
    assert changes == [True, True]  # c left the queue: d is told it moved up
    assert slots.request(("ns", "d"), created="4") == 1


def test_a_running_job_holds_a_slot_over_the_limit_and_no_limit_means_none():
    slots = CopySlots(1)
    slots.hold(("ns", "adopted-1"))
    slots.hold(("ns", "adopted-2"))
    assert slots.request(("ns", "new"), created="1") == 1
    assert CopySlots(0).request(("ns", "x"), created="1") == 0


def test_a_deleted_waiter_moves_the_queue_up():
    changes = []
    slots = CopySlots(1, on_change=lambda: changes.append(True))
    slots.request(("ns", "a"), created="1")
    slots.request(("ns", "b"), created="2")
    assert slots.request(("ns", "c"), created="3") == 2
    slots.release(("ns", "b"))  # deleted while queued: the waiters are told, c moves up
    assert changes == [True] and slots.request(("ns", "c"), created="3") == 1


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_five_copies_on_two_slots(tmp_path):
    node = FakeNode(tmp_path, max_active_copies=2)
    hv, kube, agent, stop, tasks, bodies = node.hv, node.kube, node.agent, node.stop, [], {}
    for i in range(5):
        hv.add_domain(f"vm{i}")
        bodies[i] = kube.add(f"bc{i}", {"domain": f"vm{i}", "disk": "vda", "pivot": True,
                                        "dest": str(tmp_path / f"c{i}.qcow2")},
                             labels={NODE_LABEL: "n"})
        tasks.append(asyncio.create_task(agent.follow(bodies[i], stop)))
    await asyncio.sleep(2)

    def phases():
        return [kube.status_of(f"bc{i}").get("phase") for i in range(5)]
    assert phases() == ["Copying", "Copying", "Queued", "Queued", "Queued"]
    assert [kube.status_of(f"bc{i}")["message"].split(": ")[1].split(" in")[0]
            for i in (2, 3, 4)] == ["1st", "2nd", "3rd"]
    hv.make_ready("vm0")  # bc0 pivots and is done: bc2 starts at once
    t = asyncio.get_running_loop().time()
    while phases()[2] != "Copying":
        await asyncio.sleep(0.01)
    assert asyncio.get_running_loop().time() - t < 0.5
    assert phases()[:2] == ["Pivoted", "Copying"]
    assert kube.status_of("bc3")["message"].startswith("waiting for a free copy slot on this "
                                                       "node: 1st in the queue")
    hv.fail_job("vm1")  # a failure frees a slot too
    while phases()[3] != "Copying":
        await asyncio.sleep(0.01)
    assert phases()[1] == "Failed"
    bodies[4]["metadata"]["deletionTimestamp"] = "now"  # deleted while queued
    stop.set()
    await asyncio.gather(*tasks)
    assert hv.verbs().count("start_copy") == 4
