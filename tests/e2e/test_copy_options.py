"""Issue B end to end: every copy option of the BlockCopy spec with its visible effect in
libvirt, QEMU and the image files (shallow, base, reuseExternal / the oVirt flow, format
conversion, bandwidth, granularity / bufSize, synchronousWrites, abort, pivot under guest
writes, `kubectl wait`, refused changes of immutable fields).

Each test runs on its own throwaway VM (support.vms) with the agent as a real process.
The agent has the test's node name and watches only the test's namespace, and every object
names that node (tests/support/isolation.py): other test sessions share this API server and
libvirtd.

What each test makes libvirt / QEMU do:
- shallow, base = backing file, oVirt flow: blockCopy with SHALLOW (and REUSE_EXT into a
  pre-created qcow2 with a relative backing name), pivot; a base outside the chain: no
  libvirt call.
- raw conversion / raw reuse: a qcow2 chain mirrored into a raw file, then pivot.
- bandwidth: the BANDWIDTH typed parameter, then blockJobSetSpeed live (2Mi, then 0).
- granularity / bufSize: the GRANULARITY and BUF_SIZE typed parameters (granularity shows as
  the mirror's dirty-bitmap granularity in QMP query-block).
- synchronousWrites / pivot from the start: a guest writing 1 MiB every ~0.2 s during the
  copy (write-blocking mirror; background mirror that must reach READY before the pivot).
- abort: blockJobAbort without PIVOT, before and after READY.
- an unparsable bandwidth written mid-copy, then the object deleted.
Note: while a mirror job runs, QEMU locks its target against consistent readers, even
`qemu-img -U`: destinations are compared with the source after the job ended."""

from __future__ import annotations

import calendar
import json
import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET

import libvirt

from support.assertions import assert_untouched
from support.images import assert_identical, image_digest, qemu_img_compare, qemu_img_info
from support.libvirt_probes import (
    BlockJobEvents,
    blockjob_text,
    domstate,
    live_disk,
    live_disk_source,
    live_mirror,
    no_block_job,
    virsh,
)
from support.objects import condition, copy_spec
from support.vms import VM, WRITE_MARK, layer_plan, wait_guest_writing
from support.waits import events_of, gone, status_where, wait_for

MiB = 1 << 20


# ---------------------------------------------------------------- helpers: libvirt / QEMU


def _block_job_info(vm: VM) -> str:
    return blockjob_text(vm, in_bytes=True)


def _job_bandwidth(vm: VM) -> int | None:
    """The job's bandwidth limit as libvirt reports it (virsh blockjob --info --bytes); 0 if the
    job runs unlimited, None if there is no job."""
    info = _block_job_info(vm)
    if "No current block job" in info:
        return None
    match = re.search(r"Bandwidth limit:\s*(\d+) bytes/s", info)
    return int(match.group(1)) if match else 0


def _live_driver_type(vm: VM) -> str:
    return live_disk(vm, "vda").find("driver").get("type")


def _live_backing_source(vm: VM) -> str | None:
    backing = live_disk(vm, "vda").find("backingStore")
    source = backing.find("source") if backing is not None else None
    return source.get("file") if source is not None else None


def _mirror_bitmaps(vm: VM) -> list[dict]:
    """Dirty bitmaps on any block node of the VM: while a copy job runs, the mirror job's own
    (anonymous) bitmap, with the job's granularity. QEMU 7.2 keeps it on the source's format
    node; QEMU 10 on the job's mirror_top filter node, which query-block no longer shows:
    query-named-block-nodes lists both."""
    out = virsh("qemu-monitor-command", vm.name,
                '{"execute":"query-named-block-nodes","arguments":{"flat":true}}', uri=vm.uri)
    return [bitmap for node in json.loads(out)["return"]
            for bitmap in node.get("dirty-bitmaps") or []]


def _write_blocking(vm: VM) -> bool:
    """Whether QEMU runs vda's ready mirror in write-blocking ("active") mode. QEMU >= 8.2
    says so in query-block-jobs (actively-synced). QEMU 7.2 does not, but there the job's
    dirty bitmap stops recording in that mode (guest writes go to both sides instead);
    QEMU 10's bitmap never records (its filter node marks what is dirty), so that sign is
    only read where actively-synced is missing."""
    out = virsh("qemu-monitor-command", vm.name, '{"execute":"query-block-jobs"}', uri=vm.uri)
    (job,) = [j for j in json.loads(out)["return"] if j.get("type") == "mirror"]
    if "actively-synced" in job:
        return job["actively-synced"]
    (bitmap,) = _mirror_bitmaps(vm)
    return not bitmap["recording"]


def _libvirt_job_flags(vm: VM) -> int:
    """The flags libvirt recorded for the running copy job of vda, from its domain status
    file (the only place libvirt shows them): <blockjob ... jobflags='0x..'>."""
    root = ET.parse(f"/run/libvirt/qemu/{vm.name}.xml").getroot()
    for job in root.iterfind(".//blockjobs/blockjob"):
        disk = job.find("disk")
        if job.get("type") == "copy" and disk is not None and disk.get("dst") == "vda":
            return int(job.get("jobflags"), 16)
    raise AssertionError("libvirt's status file records no copy job on vda")


# ---------------------------------------------------------------- helpers: images and guest


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _own_data_ranges(path: str) -> list[tuple[int, int]]:
    """Guest ranges whose data is stored in the image itself (depth 0), not in its backing
    chain, per `qemu-img map`."""
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", path], check=True,
                         capture_output=True, text=True).stdout
    return _merge([(e["start"], e["start"] + e["length"]) for e in json.loads(out)
                   if e["depth"] == 0 and e["data"]])


def _top_layer_ranges(layers: int, per_layer: int) -> list[tuple[int, int]]:
    """The ranges support.vms wrote into the top (active) image of the chain."""
    top = layer_plan(layers, per_layer)[-1]
    return _merge([(off, off + length) for _pattern, off, length in top])


def _guest_write_results(vm: VM) -> list[int]:
    """Exit codes of the guest's writes to vda, one per write, from the console log
    (complete lines only: QEMU may be in the middle of writing the last one)."""
    with open(vm.console_log, errors="replace") as f:
        lines = f.read().split("\n")[:-1]
    return [int(m.group(1)) for line in lines if WRITE_MARK in line
            and (m := re.search(r"rc=(\d+)$", line.strip()))]


def _guest_writes(vm: VM) -> int:
    return len(_guest_write_results(vm))


def _assert_guest_keeps_writing(vm: VM, writes: int = 3) -> None:
    """The guest goes on writing to its disk, and its writes succeed."""
    before = _guest_writes(vm)
    wait_for(lambda: _guest_writes(vm) >= before + writes, 60, interval=0.5,
             what=f"{writes} more guest writes")
    after = _guest_write_results(vm)[before:]
    assert after and set(after) == {0}, after
    assert domstate(vm) == "running"


def _events(blockcopies, core, name: str, reason: str) -> list:
    return events_of(blockcopies, core, name, reason)()


def _slow_vm(vms) -> VM:
    """A VM whose full copy is 128 MiB of data: minutes at 1 MiB/s, so it stays Copying."""
    return vms(size="256M", data_per_layer="64M")


# ---------------------------------------------------------------- shallow and base


def test_shallow_copies_only_the_top_layer(agent, vms, blockcopies):
    """flags [shallow]: the destination's backing file is the source's backing file, only the
    top image's data lands in it, and after the pivot the guest sees the same disk."""
    vm = vms(layers=2)
    dest = os.path.join(vm.workdir, "shallow.qcow2")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, flags=["shallow"],
                                        pivot=True))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed")
    assert status["phase"] == "Pivoted", status
    assert "shallow" in status["flags"]

    # libvirt: the VM runs on the copy, whose backing chain is the old one minus the top.
    assert live_disk_source(vm, "vda") == dest
    assert live_mirror(vm, "vda") is None
    assert _live_backing_source(vm) == vm.chain[1]
    # image: backed by the source's backing file, holding only the top layer's data.
    info = qemu_img_info(dest)
    assert info["full-backing-filename"] == vm.chain[1]
    assert info["backing-filename-format"] == "qcow2"
    assert _own_data_ranges(dest) == _top_layer_ranges(2, 4 * MiB)
    assert _own_data_ranges(dest) == _own_data_ranges(vm.chain[0])
    # guest view: unchanged.
    assert_identical(vm.chain[0], dest)
    assert image_digest(dest) == vm.initial_digest


def test_base_equal_to_top_backing_file_is_shallow(agent, vms, blockcopies):
    """base = the top image's backing file (3-layer chain): the same as the shallow flag."""
    vm = vms(layers=3)
    dest = os.path.join(vm.workdir, "based.qcow2")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, base=vm.chain[1],
                                        pivot=True))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed")
    assert status["phase"] == "Pivoted", status
    assert "shallow" in status["flags"]

    assert live_disk_source(vm, "vda") == dest
    assert _live_backing_source(vm) == vm.chain[1]
    assert qemu_img_info(dest)["full-backing-filename"] == vm.chain[1]
    assert _own_data_ranges(dest) == _top_layer_ranges(3, 4 * MiB)
    assert_identical(vm.chain[0], dest)
    assert image_digest(dest) == vm.initial_digest


def test_base_outside_the_chain_is_refused(agent, vms, blockcopies, core):
    """base = an image that is not in the disk's chain: Failed (BaseNotInChain) before
    libvirt is asked for anything: no job, no destination file, the VM untouched. (A base
    deeper in the chain is supported: tests/e2e/test_layouts.py.)"""
    vm = vms(layers=3)
    other = vms(layers=2)
    dest = os.path.join(vm.workdir, "deep.qcow2")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, base=other.chain[1],
                                        pivot=True))
    status = blockcopies.wait_phase(name, "Failed", "Copying", "Mirrored", "Pivoted")
    assert status["phase"] == "Failed", status
    assert condition(status, "Failed")["status"] == "True"
    assert condition(status, "Failed")["reason"] == "BaseNotInChain"
    assert other.chain[1] in status["message"] and vm.chain[2] in status["message"]
    warnings = wait_for(events_of(blockcopies, core, name, "BaseNotInChain"), 10)
    assert [e.type for e in warnings] == ["Warning"], warnings

    assert_untouched(vm)
    assert not os.path.lexists(dest)
    assert image_digest(vm.chain[0]) == vm.initial_digest


# ---------------------------------------------------------------- reuseExternal


def test_reuse_external_ovirt_flow_with_relative_backing(agent, vms, blockcopies):
    """The oVirt flow: a pre-created qcow2 whose backing name is relative, flags [shallow,
    reuseExternal], pivot from the start, format omitted (taken from the existing file)."""
    vm = vms(layers=2)
    backing_name = os.path.basename(vm.chain[1])  # base.qcow2, next to the destination
    dest = os.path.join(vm.workdir, "ovirt.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    backing_name, dest], check=True, cwd=vm.workdir)
    assert qemu_img_info(dest)["backing-filename"] == backing_name

    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, flags=["shallow",
                                        "reuseExternal"], pivot=True))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed")
    assert status["phase"] == "Pivoted", status
    assert status["format"] == "qcow2"  # the existing file's format
    assert {"shallow", "reuseExternal"} <= set(status["flags"])

    # libvirt: on the destination, over the source's backing file.
    assert live_disk_source(vm, "vda") == dest
    assert _live_driver_type(vm) == "qcow2"
    assert _live_backing_source(vm) == vm.chain[1]
    # image: the relative backing name was kept (not rewritten to an absolute path).
    info = qemu_img_info(dest)
    assert info["backing-filename"] == backing_name
    assert info["full-backing-filename"] == vm.chain[1]
    assert _own_data_ranges(dest) == _top_layer_ranges(2, 4 * MiB)
    assert_identical(vm.chain[0], dest)
    assert image_digest(dest) == vm.initial_digest


def test_reuse_external_raw_dest_keeps_its_format(agent, vms, blockcopies):
    """reuseExternal without format into a pre-created raw file: the copy is raw."""
    vm = vms(layers=2)
    dest = os.path.join(vm.workdir, "precreated.raw")
    size = qemu_img_info(vm.chain[0])["virtual-size"]
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", dest, str(size)], check=True)

    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, flags=["reuseExternal"],
                                        pivot=True))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed")
    assert status["phase"] == "Pivoted", status
    assert status["format"] == "raw"

    assert live_disk_source(vm, "vda") == dest
    assert _live_driver_type(vm) == "raw"
    assert qemu_img_info(dest)["format"] == "raw"
    assert_identical(vm.chain[0], dest)
    assert image_digest(dest, "raw") == vm.initial_digest


# ---------------------------------------------------------------- format conversion


def test_qcow2_to_raw_conversion(agent, vms, blockcopies):
    """format raw on a qcow2 chain: a flat raw copy, and the VM runs on it as raw."""
    vm = vms(layers=2)
    dest = os.path.join(vm.workdir, "converted.raw")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, format="raw", pivot=True))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed")
    assert status["phase"] == "Pivoted", status
    assert status["format"] == "raw"

    info = qemu_img_info(dest)
    assert info["format"] == "raw"
    assert "backing-filename" not in info
    assert live_disk_source(vm, "vda") == dest
    assert _live_driver_type(vm) == "raw"
    assert _live_backing_source(vm) is None
    assert_identical(vm.chain[0], dest)
    assert image_digest(dest, "raw") == vm.initial_digest


# ---------------------------------------------------------------- bandwidth, granularity, bufSize


def test_bandwidth_limit_and_live_changes(agent, vms, blockcopies):
    """bandwidth 1Mi is the job's limit in libvirt; 2Mi is applied live; 0 lifts the limit
    and the copy completes."""
    vm = _slow_vm(vms)
    dest = os.path.join(vm.workdir, "throttled.qcow2")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, bandwidth="1Mi"))
    blockcopies.wait_phase(name, "Copying")
    assert _job_bandwidth(vm) == 1048576
    status = wait_for(status_where(blockcopies, name, lambda s: s.get("bandwidth") == 1048576,
                                   "status.bandwidth 1048576"), 20)
    assert status["phase"] == "Copying"
    mirror = live_mirror(vm, "vda")
    assert mirror is not None and mirror["source"] == dest and "ready" not in mirror, mirror

    blockcopies.patch_spec(name, {"bandwidth": "2Mi"})
    wait_for(lambda: _job_bandwidth(vm) == 2097152, 20, what="libvirt's job bandwidth 2Mi")
    wait_for(lambda: blockcopies.status(name).get("bandwidth") == 2097152, 20,
             what="status.bandwidth 2097152")
    assert blockcopies.status(name)["phase"] == "Copying"  # 2 MiB/s: still far from done

    blockcopies.patch_spec(name, {"bandwidth": 0})
    status = blockcopies.wait_phase(name, "Mirrored", "Failed", timeout=120)
    assert status["phase"] == "Mirrored", status
    assert _job_bandwidth(vm) == 0  # libvirt: no limit any more
    assert status["bandwidth"] == 0
    assert live_mirror(vm, "vda")["ready"] == "yes"

    # (While the job runs QEMU locks the destination against readers, even `qemu-img -U`:
    # the content is compared once the VM runs on it.)
    blockcopies.patch_spec(name, {"pivot": True})
    blockcopies.wait_phase(name, "Pivoted")
    assert live_disk_source(vm, "vda") == dest
    assert_identical(vm.chain[0], dest)
    assert image_digest(dest) == vm.initial_digest


def test_invalid_bandwidth_change_never_orphans_the_job(agent, vms, blockcopies, kubectl):
    """An unparsable bandwidth written while Copying is refused by the API server (the
    CRD's isQuantity rule): the job goes on untouched at the old limit. Where the edit gets
    in anyway (a CRD without the rule, e.g. another checkout's on a shared test cluster),
    the agent may refuse the change and go on, or fail and end the job, but it must never
    leave a libvirt job running that nobody follows any more. And deleting the object
    cancels a job that has not pivoted."""
    vm = _slow_vm(vms)
    dest = os.path.join(vm.workdir, "edited.qcow2")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, bandwidth="1Mi"))
    blockcopies.wait_phase(name, "Copying")
    generation = blockcopies.get(name)["metadata"]["generation"]

    edit = kubectl("patch", "bc", name, "-n", blockcopies.namespace, "--type=merge",
                   "-p", json.dumps({"spec": {"bandwidth": "fast"}}), check=False)
    if edit.returncode != 0:
        assert "spec.bandwidth must be a quantity of bytes per second" in edit.stderr
        assert blockcopies.get(name)["metadata"]["generation"] == generation
        assert blockcopies.get(name)["spec"]["bandwidth"] == "1Mi"
        status = wait_for(status_where(blockcopies, name,
                                       lambda s: s.get("bandwidth") == 2**20,
                                       "the limit in effect"), 20)
        assert status["phase"] == "Copying", status
        assert live_mirror(vm, "vda") is not None
    else:
        generation = blockcopies.get(name)["metadata"]["generation"]
        status = wait_for(status_where(blockcopies, name,
                                       lambda s: s.get("observedGeneration") == generation,
                                       "the agent to observe the edit"), 20)
        if status["phase"] in ("Failed", "Aborted", "Pivoted"):
            # Terminal: the agent no longer follows the copy, so no job of it may be left.
            mirror = live_mirror(vm, "vda")
            assert mirror is None and no_block_job(vm), (
                f"phase {status['phase']} ({status['message']}) but libvirt still runs the "
                f"copy to {mirror and mirror['source']}: {_block_job_info(vm)}")

    blockcopies.delete(name)
    wait_for(gone(blockcopies, name), 30)
    assert_untouched(vm)
    assert os.path.exists(dest)  # user data: never deleted


def test_granularity_and_buf_size_are_passed_to_qemu(agent, vms, blockcopies):
    """granularity and bufSize are accepted; QEMU's mirror bitmap has the requested (non
    default: QEMU's default is 64 KiB) granularity; the copy pivots with identical content."""
    vm = vms(layers=2)
    dest = os.path.join(vm.workdir, "granular.qcow2")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, granularity=131072,
                                        bufSize=1048576))
    status = blockcopies.wait_phase(name, "Mirrored", "Failed")
    assert status["phase"] == "Mirrored", status
    bitmaps = _mirror_bitmaps(vm)
    assert [b["granularity"] for b in bitmaps] == [131072], bitmaps
    # Background copy mode (no synchronousWrites).
    assert not _write_blocking(vm)
    assert _libvirt_job_flags(vm) & libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES == 0

    blockcopies.patch_spec(name, {"pivot": True})
    blockcopies.wait_phase(name, "Pivoted")
    assert live_disk_source(vm, "vda") == dest
    assert _mirror_bitmaps(vm) == []  # the job and its bitmap are gone
    assert_identical(vm.chain[0], dest)


# ---------------------------------------------------------------- guest writes


def test_synchronous_writes_under_guest_writes(agent, vms, blockcopies):
    """synchronousWrites: libvirt and QEMU run the job in write-blocking mode; the copy
    converges and pivots while the guest writes, and the guest keeps writing afterwards."""
    vm = vms(guest_writes=True)
    wait_guest_writing(vm)
    dest = os.path.join(vm.workdir, "sync.qcow2")
    writes_at_start = _guest_writes(vm)
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest,
                                        flags=["synchronousWrites"]))
    status = blockcopies.wait_phase(name, "Mirrored", "Failed", timeout=120)
    assert status["phase"] == "Mirrored", status
    assert "synchronousWrites" in status["flags"]
    # libvirt got the flag ...
    flags = _libvirt_job_flags(vm)
    assert flags & libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES, hex(flags)
    # ... and QEMU runs the mirror in write-blocking ("active") mode.
    assert len(_mirror_bitmaps(vm)) == 1
    assert _write_blocking(vm)
    assert live_mirror(vm, "vda")["ready"] == "yes"
    assert _guest_writes(vm) > writes_at_start  # the guest wrote during the copy

    blockcopies.patch_spec(name, {"pivot": True})
    status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=60)
    assert status["phase"] == "Pivoted", status
    assert live_disk_source(vm, "vda") == dest
    assert live_mirror(vm, "vda") is None
    assert no_block_job(vm)
    # The guest keeps writing, now to the destination, without I/O errors.
    _assert_guest_keeps_writing(vm)



def _epoch(ts: str) -> int:
    return calendar.timegm(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ"))


def test_pivot_from_start_under_guest_writes_waits_for_ready(agent, vms, blockcopies, core):
    """pivot true from the start on a VM that keeps writing: the agent pivots only after
    libvirt reported the mirror ready (never on cur == end alone), and the VM keeps running."""
    vm = vms(guest_writes=True)
    wait_guest_writing(vm)
    dest = os.path.join(vm.workdir, "pivoted.qcow2")
    events = BlockJobEvents(vm)
    try:
        writes_at_start = _guest_writes(vm)
        name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, pivot=True))
        status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=120)
        assert status["phase"] == "Pivoted", status
        wait_for(lambda: libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED in events.statuses(), 10,
                 what="libvirt's COMPLETED event")
    finally:
        events.close()

    # libvirt: READY came first, then the pivot completed; nothing failed or was cancelled.
    seen = events.statuses()
    assert seen.count(libvirt.VIR_DOMAIN_BLOCK_JOB_READY) >= 1, seen
    assert (seen.index(libvirt.VIR_DOMAIN_BLOCK_JOB_READY)
            < seen.index(libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED)), seen
    assert libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED not in seen, seen
    assert libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED not in seen, seen
    # The agent: it never tried a pivot libvirt refused, and it saw the mirror ready no
    # earlier than libvirt said so (timestamps have 1 s resolution; 1 s of slack for the
    # event delivery to this process racing the agent's read of the live XML).
    assert not _events(blockcopies, core, name, "PivotRefused")
    assert status["mirroredTime"] and status["mirroredTime"] <= status["completionTime"]
    assert _epoch(status["mirroredTime"]) >= int(
        events.first(libvirt.VIR_DOMAIN_BLOCK_JOB_READY)) - 1
    assert condition(status, "Mirrored")["status"] == "True"
    assert condition(status, "Pivoted")["status"] == "True"
    phases = sorted(e.message.split(":")[0] for e in blockcopies.events(core, name))
    assert "Failed" not in phases and "Pivoted" in phases, phases
    # The VM runs on the destination and the guest wrote during and after the copy.
    assert live_disk_source(vm, "vda") == dest
    assert live_mirror(vm, "vda") is None
    assert _guest_writes(vm) > writes_at_start
    _assert_guest_keeps_writing(vm)


# ---------------------------------------------------------------- abort


def test_abort_while_copying_leaves_an_incomplete_copy(agent, vms, blockcopies):
    """abort during a bandwidth-limited copy: Aborted, the message says the destination is
    incomplete, the VM stays on its source with no job, the destination file is kept."""
    vm = _slow_vm(vms)
    dest = os.path.join(vm.workdir, "partial.qcow2")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, bandwidth="1Mi"))
    blockcopies.wait_phase(name, "Copying")
    wait_for(lambda: blockcopies.status(name).get("cur", 0) > 0, 20, what="some progress")
    assert live_mirror(vm, "vda") is not None

    blockcopies.patch_spec(name, {"abort": True})
    status = blockcopies.wait_phase(name, "Aborted", "Failed", "Mirrored", "Pivoted")
    assert status["phase"] == "Aborted", status
    assert "incomplete" in status["message"]
    assert condition(status, "Aborted")["status"] == "True"
    assert condition(status, "Mirrored")["status"] == "False"
    assert status["completionTime"]

    assert_untouched(vm)
    assert os.path.exists(dest)
    assert qemu_img_compare(vm.chain[0], dest).returncode == 1  # really incomplete
    assert image_digest(vm.chain[0]) == vm.initial_digest


def test_abort_while_mirrored_keeps_a_point_in_time_copy(agent, vms, blockcopies):
    """abort after Mirrored: Aborted, the message says the destination is a consistent
    point-in-time copy (and it is: identical to the source), Mirrored stays True."""
    vm = vms(layers=2)
    dest = os.path.join(vm.workdir, "snapshot.qcow2")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest))
    blockcopies.wait_phase(name, "Mirrored")
    assert live_mirror(vm, "vda")["ready"] == "yes"

    blockcopies.patch_spec(name, {"abort": True})
    status = blockcopies.wait_phase(name, "Aborted", "Failed", "Pivoted")
    assert status["phase"] == "Aborted", status
    assert "consistent point-in-time copy" in status["message"]
    assert condition(status, "Aborted")["status"] == "True"
    assert condition(status, "Mirrored")["status"] == "True"
    assert condition(status, "Pivoted")["status"] == "False"

    assert_untouched(vm)
    assert_identical(vm.chain[0], dest)
    assert "backing-filename" not in qemu_img_info(dest)  # a full, standalone copy
    assert image_digest(dest) == vm.initial_digest


# ---------------------------------------------------------------- kubectl wait


def test_kubectl_wait_for_mirrored_and_pivoted(agent, vms, blockcopies, kubectl):
    """`kubectl wait --for=condition=Mirrored` (then Pivoted) works on BlockCopy objects."""
    vm = vms(layers=2)
    dest = os.path.join(vm.workdir, "waited.qcow2")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest))
    ns = blockcopies.namespace

    result = kubectl("wait", "-n", ns, "--for=condition=Mirrored", f"bc/{name}",
                     "--timeout=90s", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "condition met" in result.stdout
    assert live_mirror(vm, "vda")["ready"] == "yes"
    assert live_disk_source(vm, "vda") == vm.chain[0]

    blockcopies.patch_spec(name, {"pivot": True})
    result = kubectl("wait", "-n", ns, "--for=condition=Pivoted", f"bc/{name}",
                     "--timeout=60s", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert live_disk_source(vm, "vda") == dest
    assert_identical(vm.chain[0], dest)


# ---------------------------------------------------------------- immutable fields


def test_changing_dest_while_copying_is_refused(agent, vms, blockcopies, core, kubectl):
    """spec.dest changed while Copying. The API server refuses it (the CRD's rule); and where
    a server does not evaluate the rules, the agent refuses it too: SpecChangeRefused
    condition and Warning Event, the job keeps copying to the original destination and the
    pivot lands on it. Such a server is emulated by editing while the rule cannot see that
    the copy started: the agent is stopped and status.startTime (what the rule keys on) is
    removed; the restarted agent still knows the started spec (status.startedSpec)."""
    vm = _slow_vm(vms)
    dest = os.path.join(vm.workdir, "original.qcow2")
    other = os.path.join(vm.workdir, "other.qcow2")
    name = blockcopies.create(copy_spec(vm, node=agent.node, dest=dest, bandwidth="1Mi"))
    blockcopies.wait_copying(name)

    refused = kubectl("patch", "bc", name, "-n", blockcopies.namespace, "--type=merge",
                      "-p", json.dumps({"spec": {"dest": other}}), check=False)
    assert refused.returncode != 0
    assert "spec.dest cannot change once the copy started" in refused.stderr, refused.stderr

    agent.stop()
    blockcopies.patch_status(name, {"startTime": None})
    blockcopies.patch_spec(name, {"dest": other})  # accepted: the rule sees no started copy
    agent.start()
    status = wait_for(status_where(
        blockcopies, name,
        lambda s: (condition(s, "SpecChangeRefused") or {}).get("status") == "True",
        "SpecChangeRefused=True"), 20)
    assert "spec.dest" in condition(status, "SpecChangeRefused")["message"]
    assert status["phase"] == "Copying"
    warnings = wait_for(events_of(blockcopies, core, name, "SpecChangeRefused"), 10)
    assert [e.type for e in warnings] == ["Warning"], warnings
    # libvirt: the same job, still to the original destination; nothing written elsewhere.
    mirror = live_mirror(vm, "vda")
    assert mirror is not None and mirror["source"] == dest, mirror
    assert not os.path.lexists(other)

    # Mutable fields still work: lift the limit (by removing it) and pivot, while the spec
    # still says `other`.
    blockcopies.patch_spec(name, {"bandwidth": None, "pivot": True})
    status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=120)
    assert status["phase"] == "Pivoted", status
    assert condition(status, "SpecChangeRefused")["status"] == "True"
    # One refusal, one Event (not one per status write).
    assert len(_events(blockcopies, core, name, "SpecChangeRefused")) == 1
    assert live_disk_source(vm, "vda") == dest
    assert not os.path.lexists(other)
    assert_identical(vm.chain[0], dest)
    assert image_digest(dest) == vm.initial_digest


