"""Issue T, item 5: the copy verified at the switch (spec.verify), on real parts (API server,
libvirtd, QEMU, the agent as a process), with a writing guest (support.guestwrites: every
write it acknowledged must be on the image it ends on).

- test_the_default_check_pivots_with_every_write: spec.verify left out (Sample): the guest
  is paused, 1,024 blocks compared, pivoted; status.verification says Match, with the pause.
- test_a_destination_changed_behind_qemus_back_is_caught: 8 MiB of the (raw) destination
  overwritten by another process while Mirrored (a destination that lies): no pivot, Failed
  VerifyMismatch, the VM on its source with every write.
- test_verify_none_pivots_unchecked / test_full_on_raw_pivots: the two other values.
- test_a_group_with_one_corrupt_member_stays_on_its_sources: a disk group switches all or
  none: vdb's destination overwritten behind QEMU's back, pivot: true on both members:
  neither pivots (vdb Failed VerifyMismatch, vda Mirrored GroupMemberMismatch), the live
  domain XML shows both disks on their sources, every write the guest acknowledged is there;
  then vda's abort ends its job on its source.
"""

from __future__ import annotations

import os

from support.guestwrites import Verified, last_acknowledged, paused, verify
from support.images import image_digest
from support.libvirt_probes import domstate, live_disk_source, live_mirror
from support.objects import condition, copy_spec
from support.vms import VM, wait_guest_writing
from support.waits import events_of, wait_for

DISK = {"size": "128M", "data_per_layer": "8M"}  # 16 MiB of layer data, writes beyond
SLOTS = 64
MiB = 1 << 20


def _writing_vm(vms) -> VM:
    vm = vms(guest_writes=True, write_slots=SLOTS, **DISK)
    wait_guest_writing(vm)
    _more_writes(vm, 20)
    return vm


def _garble(path: str) -> None:
    """8 MiB of the layers' data (at [4, 12) MiB) overwritten by another process, without
    QEMU knowing (a device that drops or misplaces writes)."""
    with open(path, "r+b") as f:
        f.seek(4 * MiB)
        f.write(os.urandom(8 * MiB))
        f.flush()
        os.fsync(f.fileno())


def _failed_on_the_garbled_blocks(blockcopies, name: str) -> dict:
    """The copy ended Failed VerifyMismatch, its check naming the garbled range."""
    status = blockcopies.wait_phase(name, "Failed", "Pivoted", timeout=120)
    assert status["phase"] == "Failed", status
    failed = condition(status, "Failed")
    assert failed is not None and failed["reason"] == "VerifyMismatch", status["conditions"]
    check = status["verification"]
    assert check["result"] == "Mismatch" and check["mismatches"] > 100, check
    assert 4 * MiB <= check["firstMismatch"] < 12 * MiB, check
    return status


def _more_writes(vm: VM, n: int = 10, timeout: float = 90) -> int:
    target = last_acknowledged(vm) + n
    return wait_for(lambda: (seq := last_acknowledged(vm)) >= target and seq, timeout,
                    interval=0.3, what=f"{n} more acknowledged guest writes")


def _runs_on(vm: VM, image: str, scenario: str) -> Verified:
    """The VM runs on ``image`` without a job and writes on; paused, every acknowledged write
    is there."""
    assert domstate(vm) == "running"  # resumed after the check
    assert live_disk_source(vm, "vda") == image
    assert live_mirror(vm, "vda") is None
    _more_writes(vm)
    with paused(vm):
        result = verify(vm, image)
    print(f"VERIFY [{scenario}]: {result}")
    assert result.writes > 0
    return result


def test_the_default_check_pivots_with_every_write(agent, vms, blockcopies, core):
    vm = _writing_vm(vms)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, pivot=True))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=180)
    assert status["phase"] == "Pivoted", status
    check = status["verification"]
    assert check["method"] == "Sample" and check["result"] == "Match", check
    assert check["samples"] == 1024 and check["blockSize"] == 4096 and check["mismatches"] == 0
    print(f"VERIFY [default]: guest paused {check['pauseMs']} ms for 1024 blocks")
    assert 0 < check["pauseMs"] < 5000
    verified = condition(status, "Verified")
    assert verified is not None and verified["status"] == "True", status["conditions"]
    events = wait_for(events_of(blockcopies, core, name, "Verified", type="Normal"), 15)
    assert "1024 sampled blocks" in events[0].message
    _runs_on(vm, dest, "default check")


def test_a_destination_changed_behind_qemus_back_is_caught(agent, vms, blockcopies, core):
    vm = _writing_vm(vms)
    dest = os.path.join(vm.workdir, "copy.raw")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, format="raw"))
    blockcopies.wait_phase(name, "Mirrored", timeout=180)
    # The layers' data is at [0, 16 MiB): 8 MiB of it garbled on the destination, by another
    # process, without QEMU knowing (a device that drops or misplaces writes).
    _garble(dest)
    _more_writes(vm)
    blockcopies.patch_spec(name, {"pivot": True})
    status = _failed_on_the_garbled_blocks(blockcopies, name)
    assert condition(status, "Verified")["reason"] == "VerifyMismatch"
    wait_for(events_of(blockcopies, core, name, "VerifyMismatch", type="Warning"), 15)
    _runs_on(vm, vm.chain[0], "mismatch: stays on the source")


def test_verify_none_pivots_unchecked(agent, vms, blockcopies):
    vm = _writing_vm(vms)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, pivot=True,
                                        verify="None"))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=180)
    assert status["phase"] == "Pivoted", status
    assert status["verification"]["result"] == "NotVerified"
    assert condition(status, "Verified")["reason"] == "NotAsked"
    _runs_on(vm, dest, "verify None")


def test_full_on_raw_pivots(agent, vms, blockcopies):
    vm = _writing_vm(vms)
    dest = os.path.join(vm.workdir, "copy.raw")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, format="raw",
                                        pivot=True, verify="Full"))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed", "Mirrored", timeout=180)
    if status["phase"] == "Mirrored":  # pivot=True: a Mirrored object only passes through
        status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=120)
    assert status["phase"] == "Pivoted", status
    check = status["verification"]
    assert check["method"] == "Full" and check["result"] == "Match", check
    print(f"VERIFY [Full, 128 MiB]: guest paused {check['pauseMs']} ms")
    _runs_on(vm, dest, "Full on raw")


def test_a_group_with_one_corrupt_member_stays_on_its_sources(agent, vms, blockcopies, core):
    # Two disks with chains of their own (16 MiB of layer data each, at [0, 16 MiB)); the
    # guest writes vda (beyond the layers' data) and never vdb.
    vm = vms(guest_writes=True, write_slots=SLOTS, disks=2, **DISK)
    wait_guest_writing(vm)
    _more_writes(vm, 20)
    dests = {d: os.path.join(vm.workdir, f"{d}.copy.raw") for d in ("vda", "vdb")}
    names = {d: blockcopies.create(copy_spec(vm, node=agent.node, dest=dests[d], disk=d,
                                             format="raw", group="g"), name=f"g-{d}")
             for d in ("vda", "vdb")}
    for name in names.values():
        blockcopies.wait_phase(name, "Mirrored", timeout=180)
    # 8 MiB of vdb's layer data garbled on its destination, by another process, without
    # QEMU knowing (a device that drops or misplaces writes); vda's copy is right.
    _garble(dests["vdb"])
    _more_writes(vm)
    for name in names.values():
        blockcopies.patch_spec(name, {"pivot": True})
    # vdb: exactly as a single disk's mismatch.
    bad = _failed_on_the_garbled_blocks(blockcopies, names["vdb"])
    check = bad["verification"]
    # vda: held by its group, Mirrored, its own check a match; the group's reason names vdb.
    good = wait_for(lambda: (s := blockcopies.status(names["vda"])) and (
        (condition(s, "Verified") or {}).get("reason") == "GroupMemberMismatch") and s, 60,
        what="vda held by its group's mismatch")
    assert good["phase"] == "Mirrored", good
    held = condition(good, "Verified")
    assert held["status"] == "False" and names["vdb"] in held["message"], held
    assert good["verification"]["result"] == "Match", good["verification"]
    assert good["verification"]["pauseMs"] == check["pauseMs"]  # one pause for the group
    wait_for(events_of(blockcopies, core, names["vdb"], "VerifyMismatch", type="Warning"), 15)
    wait_for(events_of(blockcopies, core, names["vda"], "GroupMemberMismatch",
                       type="Warning"), 15)
    # Neither disk switched: the live domain says so, and the VM runs on.
    assert domstate(vm) == "running"
    assert live_disk_source(vm, "vda") == vm.disk_chains["vda"][0]
    assert live_disk_source(vm, "vdb") == vm.disk_chains["vdb"][0]
    assert live_mirror(vm, "vdb") is None  # its job ended in the pause
    assert live_mirror(vm, "vda") is not None  # still mirroring, held
    _more_writes(vm)
    with paused(vm):
        result = verify(vm, vm.chain[0])
        assert image_digest(vm.disk_chains["vdb"][0]) == vm.initial_digests["vdb"]
    print(f"VERIFY [group mismatch: vda stays on its source]: {result}")
    assert result.writes > 0
    # ... and it stays so: the group gate holds vda (a member is Failed), looked at again
    # after the held pivot's back-off (5 s).
    status = wait_for(lambda: (s := blockcopies.status(names["vda"])) and
                      f"{names['vdb']} is Failed" in s.get("message", "") and s, 60,
                      what="vda held by the group gate")
    assert status["phase"] == "Mirrored", status
    assert condition(status, "Verified")["reason"] == "GroupMemberMismatch"  # kept
    assert live_disk_source(vm, "vda") == vm.disk_chains["vda"][0]
    # The user ends the group: vda's job ends on its source, with every write (its pivot
    # given up: the API server refuses pivot and abort both true).
    blockcopies.patch_spec(names["vda"], {"abort": True, "pivot": False})
    aborted = blockcopies.wait_phase(names["vda"], "Aborted", "Failed", "Pivoted", timeout=60)
    assert aborted["phase"] == "Aborted", aborted
    _runs_on(vm, vm.chain[0], "group mismatch, then aborted")
