"""Issue A end to end: real kube-apiserver + etcd, real libvirtd + QEMU VM, the agent as a
real process. Each test checks the API status, the live domain XML and the image bytes.

Isolation (tests/support/isolation.py): the agent has the test's node name and watches only
the test's namespace; objects name that node, except where the test exercises claiming by
domain (the first test, the persistent domain named by UUID, and the Pending one)."""

from __future__ import annotations

import os

from blockcopy.model.api import NODE_LABEL
from support.images import image_digest, qemu_img_compare, qemu_img_info
from support.libvirt_probes import blockjob_text, domstate, live_disk_source, live_mirror, virsh
from support.objects import condition, copy_spec
from support.vms import expected_digest
from support.waits import events_of, gone, wait_for


def _assert_pivoted_onto_copy(blockcopies, name, vm, dest, before_digest):
    status = blockcopies.wait_phase(name, "Pivoted")
    # libvirt: the live domain now runs on the copy, with no mirror left.
    assert live_disk_source(vm, "vda") == dest
    assert live_mirror(vm, "vda") is None
    # bytes: the copy holds exactly what the old chain holds (full copy: no backing file).
    result = qemu_img_compare(vm.chain[0], dest)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backing-filename" not in qemu_img_info(dest)
    assert image_digest(dest) == before_digest
    # API: finished, counters agree, conditions say so.
    assert status["cur"] == status["end"] > 0
    assert status["progress"] == "100%"
    assert condition(status, "Pivoted")["status"] == "True"
    assert condition(status, "Mirrored")["status"] == "True"
    assert condition(status, "Failed")["status"] == "False"
    assert status["source"] == vm.chain[0]
    assert status["completionTime"] >= status["startTime"]
    return status


def test_copy_mirror_then_pivot_on_request(agent, vms, blockcopies, core):
    vm = vms(layers=2)
    before = expected_digest(vm)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=None, dest=dest))

    status = blockcopies.wait_phase(name, "Mirrored")
    assert status["nodeName"] == agent.node  # claimed: no nodeName in the spec
    assert blockcopies.get(name)["metadata"]["labels"][NODE_LABEL] == agent.node
    assert condition(status, "Mirrored")["status"] == "True"
    assert status["mirroredTime"]
    mirror = live_mirror(vm, "vda")
    assert mirror is not None and mirror["ready"] == "yes", mirror
    assert live_disk_source(vm, "vda") == vm.chain[0]  # still on the source

    blockcopies.patch_spec(name, {"pivot": True})
    _assert_pivoted_onto_copy(blockcopies, name, vm, dest, before)
    # Exactly one Event per phase change (Event timestamps have 1 s resolution: no order),
    # and one for the check at the switch (spec.verify left out: Sample).
    events = blockcopies.events(core, name)
    assert [e.reason for e in events].count("Verified") == 1, [e.reason for e in events]
    phases = sorted(e.message.split(":")[0] for e in events if e.reason != "Verified")
    assert phases == ["Copying", "Mirrored", "Pivoted", "Pivoting"], phases
    assert {e.type for e in events} == {"Normal"}
    # The agent wrote status only: the spec is exactly what the user wrote.
    spec = blockcopies.get(name)["spec"]
    assert spec == {"domain": vm.name, "disk": "vda", "dest": dest, "pivot": True,
                    "abort": False}


def test_pivot_true_from_the_start(agent, vms, blockcopies):
    vm = vms(layers=2)
    before = expected_digest(vm)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, disk=vm.chain[0],
                                        pivot=True))
    _assert_pivoted_onto_copy(blockcopies, name, vm, dest, before)


def test_delete_before_pivot_cancels_and_stays_on_source(agent, vms, blockcopies):
    vm = vms(layers=2)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest))
    blockcopies.wait_phase(name, "Mirrored")
    assert live_mirror(vm, "vda") is not None

    blockcopies.delete(name)
    wait_for(gone(blockcopies, name), 30)
    # The job is gone, the VM still runs, on its source; the destination file stays.
    assert live_mirror(vm, "vda") is None
    assert blockjob_text(vm) == "No current block job for vda"
    assert domstate(vm) == "running"
    assert live_disk_source(vm, "vda") == vm.chain[0]
    assert os.path.exists(dest)


def test_persistent_domain(agent, vms, blockcopies):
    vm = vms(layers=2, persistent=True)
    before = expected_digest(vm)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    # Named by UUID and without spec.nodeName: the claimer finds the domain by its UUID.
    name = blockcopies.create(copy_spec(vm.uuid, node=None, dest=dest, pivot=True))
    status = _assert_pivoted_onto_copy(blockcopies, name, vm, dest, before)
    assert "transientJob" in status["flags"]  # added for the persistent domain
    # Still a defined domain, still running.
    assert domstate(vm) == "running"
    persistent = virsh("dominfo", vm.name, uri=vm.uri)
    assert "Persistent:     yes" in persistent


def test_object_no_node_runs_is_pending_with_an_event(agent, blockcopies, core):
    name = blockcopies.create(copy_spec(
        "bct-runs-nowhere", node=None, dest="/var/lib/libvirt/images/blockcopy-test/nowhere.qcow2"))
    status = blockcopies.wait_phase(name, "Pending", timeout=30)
    assert "not running on any node with an agent" in status["message"]
    assert NODE_LABEL not in (blockcopies.get(name)["metadata"].get("labels") or {})
    events = wait_for(events_of(blockcopies, core, name), 15)
    assert [(e.type, e.reason) for e in events] == [("Normal", "Pending")]
    blockcopies.delete(name)  # unclaimed: no finalizer, gone at once
    wait_for(gone(blockcopies, name), 10)
