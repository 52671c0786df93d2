"""support.guestwrites: the verifier finds every kind of lost or damaged write, on images
built here block by block (qemu-img only), and on a real writing guest (libvirtd + QEMU)."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

from support.guestwrites import (
    BLOCK,
    WRITE_MARK,
    LostWrites,
    WritePlan,
    acknowledged,
    acknowledged_writes,
    block_bytes,
    checksum,
    last_acknowledged,
    paused,
    plan_writes,
    point_in_time,
    verify,
)
from support.vms import VM, wait_guest_writing
from support.waits import wait_for

MiB = 1 << 20


# ---------------------------------------------------------------- images built here


def _vm(tmp_path: pathlib.Path) -> VM:
    """A VM record (no domain) for an 8 MiB disk: two 1 MiB layers, 16 write slots."""
    plan = plan_writes(2 * MiB, 8 * MiB, slots=16)
    return VM(name="bct-fake", uuid="", uri="", workdir=str(tmp_path), chain=[],
              guest_writes=True, console_log=str(tmp_path / "console.log"), size=8 * MiB,
              layers=2, data_per_layer=MiB, write_plan=plan)


def _vm_and_image(tmp_path: pathlib.Path, writes: range) -> tuple[VM, pathlib.Path]:
    """`_vm` and a raw image of its disk: the layers' data, then ``writes`` as the guest
    makes them."""
    vm, path = _vm(tmp_path), tmp_path / "disk.raw"
    data = bytearray(vm.size)
    for pattern, off, length in vm.initial_layout():
        data[off:off + length] = bytes([pattern]) * length
    for seq in writes:
        off = vm.write_plan.offset(seq)
        data[off:off + BLOCK] = block_bytes(off, seq)
    path.write_bytes(data)
    return vm, path


def _poke(path: pathlib.Path, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def _log(vm: VM, writes: range, *, tail: str = "") -> None:
    lines = [f"{WRITE_MARK} {n} off={vm.write_plan.offset(n)} seq={n} "
             f"md5={checksum(vm.write_plan.offset(n), n)} rc=0" for n in writes]
    pathlib.Path(vm.console_log).write_text("booting\n" + "\n".join(lines) + "\n" + tail)


def _verify_finds(vm: VM, image: pathlib.Path, acknowledged: range, lost: str) -> None:
    """With ``acknowledged`` in the guest's log, verify fails saying ``lost`` (a regex)."""
    _log(vm, acknowledged)
    with pytest.raises(LostWrites, match=lost):
        verify(vm, str(image), fmt="raw")


def test_plan_covers_the_free_part_of_the_disk():
    plan = plan_writes(16 * MiB, 128 * MiB)
    offsets = plan.slot_offsets()
    assert plan.slots == 128 and len(set(offsets)) == 128
    assert min(offsets) == 16 * MiB and max(offsets) < 128 * MiB
    assert sorted(plan.offset(n) for n in range(128)) == offsets  # each slot once per round
    assert plan.offset(5) == plan.offset(5 + 128)
    assert plan.latest(130) == {plan.offset(n): n for n in range(3, 131)}
    assert plan.cmdline() == f"bct.writes={plan.start},{plan.stride},128,{plan.mult} " \
                             "bct.pause=50000"
    with pytest.raises(ValueError, match="no room"):
        plan_writes(8 * MiB, 8 * MiB)


def test_block_format():
    block = block_bytes(8 * MiB, 42)
    assert len(block) == BLOCK
    assert block.startswith(b"BCTW off=000008388608 seq=0000000042 md5=")
    assert block[127:128] == b"\n"
    assert block[128:160] == b"off=000008388608 seq=0000000042\n"


def test_intact_image_is_verified(tmp_path):
    vm, image = _vm_and_image(tmp_path, range(40))
    _log(vm, range(40), tail=f"{WRITE_MARK} 40 off=")  # the last line still being written
    result = verify(vm, str(image), fmt="raw")
    assert (result.writes, result.newest, result.written, result.newer) == (40, 39, 16, 0)
    assert result.blocks == 8 * MiB // BLOCK
    assert point_in_time(vm, str(image), fmt="raw").seq == 39


def test_a_newer_unlogged_write_is_fine(tmp_path):
    vm, image = _vm_and_image(tmp_path, range(41))
    _log(vm, range(40))
    assert verify(vm, str(image), fmt="raw").newer == 1


def test_failed_writes_are_not_acknowledged(tmp_path):
    vm = _vm(tmp_path)
    _log(vm, range(3), tail=f"{WRITE_MARK} 3 off={vm.write_plan.offset(3)} seq=3 "
                            f"md5={checksum(vm.write_plan.offset(3), 3)} rc=1\n")
    assert [a.seq for a in acknowledged_writes(vm)] == [0, 1, 2]


def test_a_log_that_does_not_match_the_plan_is_refused():
    plan = WritePlan(start=512, stride=4, slots=16, mult=5)
    wrong = f"{WRITE_MARK} 1 off={plan.offset(2)} seq=1 md5={checksum(plan.offset(2), 1)} rc=0\n"
    with pytest.raises(AssertionError, match="not meant to make"):
        acknowledged(wrong, plan)


def test_lost_overwrite_is_detected(tmp_path):
    """The block still holds the previous write to its slot: the newest acknowledged one
    (a write the mirror did not copy again after the guest changed the block) is lost."""
    vm, image = _vm_and_image(tmp_path, range(40))
    lost = 37
    _poke(image, vm.write_plan.offset(lost), block_bytes(vm.write_plan.offset(lost), lost - 16))
    _verify_finds(vm, image, range(40), rf"LOST: block at {vm.write_plan.offset(lost)} "
                                        rf"holds write {lost - 16}, but write {lost}")
    with pytest.raises(LostWrites, match="no point-in-time copy"):
        point_in_time(vm, str(image), fmt="raw")


def test_lost_first_write_is_detected(tmp_path):
    vm, image = _vm_and_image(tmp_path, range(10))
    # write 10 acknowledged, never in the image
    _verify_finds(vm, image, range(11), rf"LOST: block at {vm.write_plan.offset(10)} holds no "
                                        "write, but write 10")


def test_torn_block_is_detected(tmp_path):
    vm, image = _vm_and_image(tmp_path, range(40))
    off = vm.write_plan.offset(39)
    _poke(image, off + 512, block_bytes(off, 23)[512:])  # only the first sector is new
    _verify_finds(vm, image, range(40), "checksum mismatch")


def test_misplaced_block_is_detected(tmp_path):
    vm, image = _vm_and_image(tmp_path, range(40))
    _poke(image, vm.write_plan.offset(39), block_bytes(vm.write_plan.offset(38), 38))
    _verify_finds(vm, image, range(38), "found at offset")


def test_damage_outside_the_slots_is_detected(tmp_path):
    vm, image = _vm_and_image(tmp_path, range(40))
    _poke(image, MiB + 4 * BLOCK, b"\x00" * BLOCK)  # in the layers' data
    _verify_finds(vm, image, range(40), f"block at {MiB + 4 * BLOCK} .* initial data")


def test_point_in_time_refuses_a_mix_of_instants(tmp_path):
    vm, image = _vm_and_image(tmp_path, range(30))
    off = vm.write_plan.offset(35)  # a later write, without the ones before it
    _poke(image, off, block_bytes(off, 35))
    # Writes 30..34 are missing: their slots hold the previous round's writes.
    with pytest.raises(LostWrites, match=f"block at {vm.write_plan.offset(32)} holds write 16, "
                                         "but the disk right after write 35 has write 32"):
        point_in_time(vm, str(image), fmt="raw")


# ---------------------------------------------------------------- a real writing guest


def test_real_guest_writes_verify_and_a_stale_copy_does_not(vms, tmp_path):
    vm = vms(guest_writes=True, size="64M")
    wait_guest_writing(vm)
    first = _acknowledged(vm, 20)
    stale = tmp_path / "stale.qcow2"
    with paused(vm):
        result = verify(vm, vm.chain[0])
        subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", vm.chain[0], str(stale)],
                       check=True)
    assert result.writes >= first and result.newest >= first - 1
    print(result)
    _acknowledged(vm, result.newest + 5)
    with paused(vm):
        assert verify(vm, vm.chain[0]).writes > result.writes
        with pytest.raises(LostWrites, match="LOST"):
            verify(vm, str(stale))


def _acknowledged(vm: VM, n: int) -> int:
    """Wait until the guest acknowledged ``n`` writes (or more); how many."""
    return wait_for(lambda: (s := last_acknowledged(vm) + 1) >= n and s, 90,
                    what=f"{n} acknowledged writes")


def test_a_guest_with_a_load_fills_its_scratch_area_and_its_writes_still_verify(vms):
    """guest_load_mib: random MiBs rotate over the scratch area (second half of the space
    after the layers' data), the verified slots share the first half."""
    vm = vms(guest_writes=True, size="64M", data_per_layer="4M", guest_load_mib=1)
    plan = vm.write_plan
    assert (plan.load_mib, plan.scratch_start_mib, plan.scratch_mib) == (1, 36, 28)
    assert all(o < 36 * MiB for o in plan.slot_offsets())
    assert not any(plan.in_scratch(o) for o in plan.slot_offsets())
    wait_guest_writing(vm)
    _acknowledged(vm, 40)  # 40 MiB of load, more than the 28 MiB area: it wrapped around
    with paused(vm):
        result = verify(vm, vm.chain[0])
        image = subprocess.run(["qemu-img", "map", "-U", "--output=json", vm.chain[0]],
                               capture_output=True, text=True, check=True).stdout
    assert result.writes >= 40
    # the scratch area is allocated in the active image: the load really wrote there
    in_top = sum(e["length"] for e in json.loads(image)
                 if e["data"] and e["depth"] == 0 and plan.in_scratch(e["start"]))
    assert in_top >= 20 * MiB, in_top


def test_plan_writes_with_a_load_keeps_slots_data_and_scratch_apart():
    plan = plan_writes(8 * MiB, 256 * MiB, slots=128, load_mib=1)
    assert (plan.scratch_start_mib, plan.scratch_mib) == (132, 124)
    offsets = plan.slot_offsets()
    assert min(offsets) >= 8 * MiB and max(offsets) + BLOCK <= 132 * MiB
    assert "bct.load=1,132,124" in plan.cmdline()
    assert "bct.load" not in plan_writes(8 * MiB, 256 * MiB).cmdline()
    with pytest.raises(ValueError):
        plan_writes(63 * MiB, 64 * MiB, load_mib=1)
