"""Issue A end to end: real kube-apiserver + etcd, real libvirtd + QEMU VM, the agent as a
real process. Each test checks the API status, the live domain XML and the image bytes."""

from __future__ import annotations

import os
import subprocess

from e2elib import condition, qemu_img_compare, qemu_img_info, wait_for

import testvm


def _assert_pivoted_onto_copy(blockcopies, name, vm, dest, before_digest):
    status = blockcopies.wait_phase(name, "Pivoted")
    # libvirt: the live domain now runs on the copy, with no mirror left.
    assert testvm.live_disk_source(vm, "vda") == dest
    assert testvm.live_mirror(vm, "vda") is None
    # bytes: the copy holds exactly what the old chain holds (full copy: no backing file).
    result = qemu_img_compare(vm.chain[0], dest)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backing-filename" not in qemu_img_info(dest)
    assert testvm.image_digest(dest) == before_digest
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
    before = testvm.expected_digest(vm)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create({"domain": vm.name, "disk": "vda", "dest": dest})

    status = blockcopies.wait_phase(name, "Mirrored")
    assert status["nodeName"] == "node-a"  # claimed: no nodeName in the spec
    assert blockcopies.get(name)["metadata"]["labels"]["blockcopy.dev/node"] == "node-a"
    assert condition(status, "Mirrored")["status"] == "True"
    assert status["mirroredTime"]
    mirror = testvm.live_mirror(vm, "vda")
    assert mirror is not None and mirror["ready"] == "yes", mirror
    assert testvm.live_disk_source(vm, "vda") == vm.chain[0]  # still on the source

    blockcopies.patch_spec(name, {"pivot": True})
    _assert_pivoted_onto_copy(blockcopies, name, vm, dest, before)
    # Exactly one Event per phase change (Event timestamps have 1 s resolution: no order).
    events = blockcopies.events(core, name)
    phases = sorted(e.message.split(":")[0] for e in events)
    assert phases == ["Copying", "Mirrored", "Pivoted", "Pivoting"], phases
    assert {e.type for e in events} == {"Normal"}
    # The agent wrote status only: the spec is exactly what the user wrote.
    spec = blockcopies.get(name)["spec"]
    assert spec == {"domain": vm.name, "disk": "vda", "dest": dest, "pivot": True,
                    "abort": False}


def test_pivot_true_from_the_start(agent, vms, blockcopies):
    vm = vms(layers=2)
    before = testvm.expected_digest(vm)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create({"domain": vm.name, "disk": vm.chain[0], "dest": dest,
                               "pivot": True, "nodeName": "node-a"})
    _assert_pivoted_onto_copy(blockcopies, name, vm, dest, before)


def test_delete_before_pivot_cancels_and_stays_on_source(agent, vms, blockcopies):
    vm = vms(layers=2)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create({"domain": vm.name, "disk": "vda", "dest": dest})
    blockcopies.wait_phase(name, "Mirrored")
    assert testvm.live_mirror(vm, "vda") is not None

    blockcopies.delete(name)
    wait_for(lambda: not blockcopies.exists(name), 30, what="the object to be gone")
    # The job is gone, the VM still runs, on its source; the destination file stays.
    assert testvm.live_mirror(vm, "vda") is None
    assert _block_job_info(vm) == "No current block job for vda"
    assert _domain_state(vm) == "running"
    assert testvm.live_disk_source(vm, "vda") == vm.chain[0]
    assert os.path.exists(dest)


def test_persistent_domain(agent, vms, blockcopies):
    vm = vms(layers=2, persistent=True)
    before = testvm.expected_digest(vm)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create({"domain": vm.uuid, "disk": "vda", "dest": dest, "pivot": True})
    status = _assert_pivoted_onto_copy(blockcopies, name, vm, dest, before)
    assert "transientJob" in status["flags"]  # added for the persistent domain
    # Still a defined domain, still running.
    assert _domain_state(vm) == "running"
    persistent = subprocess.run(["virsh", "-c", vm.uri, "dominfo", vm.name], check=True,
                                capture_output=True, text=True).stdout
    assert "Persistent:     yes" in persistent


def _block_job_info(vm) -> str:
    return subprocess.run(["virsh", "-c", vm.uri, "blockjob", vm.name, "vda", "--info"],
                          check=True, capture_output=True, text=True).stdout.strip()


def _domain_state(vm) -> str:
    return subprocess.run(["virsh", "-c", vm.uri, "domstate", vm.name], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_object_no_node_runs_is_pending_with_an_event(agent, blockcopies, core):
    name = blockcopies.create({"domain": "bct-runs-nowhere", "disk": "vda",
                               "dest": "/var/lib/libvirt/images/blockcopy-test/nowhere.qcow2"})
    status = blockcopies.wait_phase(name, "Pending", timeout=30)
    assert "not running on any node with an agent" in status["message"]
    assert "blockcopy.dev/node" not in (blockcopies.get(name)["metadata"].get("labels") or {})
    events = wait_for(lambda: blockcopies.events(core, name), 15, what="the Pending Event")
    assert [(e.type, e.reason) for e in events] == [("Normal", "Pending")]
    blockcopies.delete(name)  # unclaimed: no finalizer, gone at once
    wait_for(lambda: not blockcopies.exists(name), 10, what="the object to be gone")
