"""Issue F end to end, every disk layout on real libvirt + QEMU: a base at every depth of a
4-layer chain, a whole chain moved (the oVirt flow, automated), NBD exports as destinations
(TCP and a Unix socket, served by qemu-nbd), and no copy started that cannot fit. Checked in
the live domain XML, in the images (qemu-img), and in what QEMU itself reads after the pivot
(the monitor's qemu-io, through QEMU's own caches)."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

import pytest

from support.assertions import assert_untouched
from support.images import assert_identical, image_digest, qemu_img_info
from support.libvirt_probes import (
    domstate,
    live_disk,
    live_disk_source,
    live_mirror,
    live_read_matches,
    no_block_job,
)
from support.objects import condition, copy_spec
from support.vms import VM, parse_size
from support.waits import events_of, wait_for

MiB = 1 << 20
DATA = 4 * MiB  # per layer


def _own_region(vm: VM, image_index: int) -> tuple[int, int, int]:
    """(offset, length, pattern) that only image ``image_index`` (0 = base) provides in the
    guest view (support.vms.layer_plan: each layer overwrites half of the one below)."""
    layers = len(vm.chain)
    top = image_index == layers - 1
    offset = image_index * DATA + (0 if top else DATA // 2)
    return offset, DATA if top else DATA // 2, 0xA0 + image_index


def _live_chain(vm: VM) -> list[str]:
    """The active image and its backing chain, from the live domain XML."""
    disk = live_disk(vm)
    chain = [disk.find("source").get("file")]
    store = disk.find("backingStore")
    while store is not None and store.find("source") is not None:
        chain.append(store.find("source").get("file"))
        store = store.find("backingStore")
    return chain


def _assert_qemu_reads_every_layer(vm: VM) -> None:
    for index in range(len(vm.chain)):
        offset, length, pattern = _own_region(vm, index)
        assert live_read_matches(vm, offset, length, pattern), (index, offset, pattern)
    # and the check can fail: a wrong pattern is seen as wrong
    offset, length, pattern = _own_region(vm, 0)
    assert not live_read_matches(vm, offset, length, pattern ^ 0xFF)


# ------------------------------------------------------------------ any base


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_base_at_every_depth_of_a_four_layer_chain(depth, agent, vms, blockcopies, node):
    """chain: top -> L2 -> L1 -> base (vm.chain[0..3]); base = vm.chain[depth]. Depth 1 is
    the top's backing file (a plain shallow copy); deeper ones are prepared by the agent."""
    vm = vms(layers=4, size="64M", data_per_layer="4M")
    base = vm.chain[depth]
    dest = os.path.join(vm.workdir, "new", "top.qcow2")
    os.makedirs(os.path.dirname(dest))
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, base=base, pivot=True))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=120)
    assert status["phase"] == "Pivoted", status
    assert "shallow" in status["flags"]
    if depth > 1:
        assert status["plan"] == {"kind": "base", "chain": vm.chain, "targets": [dest]}
        assert status["createdFiles"] == [dest]
        assert "reuseExternal" in status["flags"]
    # The VM runs on dest -> base (-> what lies below base), nothing else.
    assert _live_chain(vm) == [dest, *vm.chain[depth:]]
    assert live_mirror(vm) is None
    assert qemu_img_info(dest)["full-backing-filename"] == base
    # The guest sees exactly what it saw before, in the files and through QEMU itself.
    assert image_digest(dest) == vm.initial_digest
    assert_identical(vm.chain[0], dest)
    _assert_qemu_reads_every_layer(vm)


def test_a_deeper_base_is_prepared_in_its_own_phase(agent, vms, blockcopies, node, core):
    vm = vms(layers=4, size="64M", data_per_layer="4M")
    dest = os.path.join(vm.workdir, "d.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, base=vm.chain[3]))
    blockcopies.wait_phase(name, "Mirrored", timeout=120)
    phases = [e.message.split(":")[0] for e in blockcopies.events(core, name)]
    # (Event timestamps have a 1 s resolution: the order within a second is unknown.)
    assert sorted(phases) == ["Copying", "Mirrored", "Preparing"], phases
    assert os.path.exists(dest) and live_mirror(vm)["source"] == dest
    # Aborting leaves the prepared file (listed, never deleted) and the VM on its source.
    blockcopies.patch_spec(name, {"abort": True})
    status = blockcopies.wait_phase(name, "Aborted")
    assert status["createdFiles"] == [dest] and os.path.exists(dest)
    assert f"left in place: {dest}" in status["message"]
    assert_untouched(vm)


# ------------------------------------------------------------------ the whole chain


def test_the_whole_chain_moves_with_the_disk(agent, vms, blockcopies, node):
    vm = vms(layers=3, size="64M", data_per_layer="4M")
    newdir = os.path.join(vm.workdir, "moved")
    os.mkdir(newdir)
    dest = os.path.join(newdir, os.path.basename(vm.chain[0]))
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, backingChain="copy",
                                        pivot=True))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=180)
    assert status["phase"] == "Pivoted", status
    targets = [os.path.join(newdir, os.path.basename(p)) for p in vm.chain]
    assert status["plan"] == {"kind": "chain", "chain": vm.chain, "targets": targets}
    assert [(layer["source"], layer["dest"], layer["state"]) for layer in status["layers"]] == [
        (s, t, "Verified") for s, t in zip(vm.chain[1:], targets[1:], strict=True)]
    assert sorted(status["createdFiles"]) == sorted(targets)
    # The VM runs on the new chain, each image backed by the next under a relative name.
    assert _live_chain(vm) == targets
    for upper, lower in itertools.pairwise(targets):
        assert qemu_img_info(upper)["backing-filename"] == os.path.basename(lower)
    assert "backing-filename" not in qemu_img_info(targets[-1])
    # Every layer's guest view is the old one's, and QEMU reads every layer's data.
    for old, new in zip(vm.chain, targets, strict=True):
        assert_identical(old, new)
    assert image_digest(dest) == vm.initial_digest
    _assert_qemu_reads_every_layer(vm)


def test_a_chain_move_into_an_existing_file_is_refused_before_anything(agent, vms,
                                                                        blockcopies, node):
    vm = vms(layers=2)
    newdir = os.path.join(vm.workdir, "moved")
    os.mkdir(newdir)
    squatter = os.path.join(newdir, os.path.basename(vm.chain[1]))
    with open(squatter, "w") as f:
        f.write("someone's data")
    dest = os.path.join(newdir, "top.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, backingChain="copy"))
    status = blockcopies.wait_phase(name, "Failed", "Copying", "Preparing")
    assert status["phase"] == "Failed" and condition(status, "Failed")["reason"] == "DestExists"
    assert open(squatter).read() == "someone's data"
    assert os.listdir(newdir) == [os.path.basename(squatter)]
    assert_untouched(vm)


# ------------------------------------------------------------------ NBD destinations


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix-socket"])
def test_copy_and_pivot_onto_an_nbd_export(unix, agent_factory, vms, blockcopies, node, nbd):
    vm = vms(layers=2, size="64M", data_per_layer="4M")
    server = nbd(vm, unix=unix)
    agent_factory(extra_args=["--allowed-network-dest", server.allowed])
    name = blockcopies.create(copy_spec(vm, node=node, dest=server.uri, pivot=True))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=120)
    assert status["phase"] == "Pivoted", status
    assert status["format"] == "raw" and "reuseExternal" in status["flags"]
    disk = live_disk(vm)
    assert disk.get("type") == "network" and disk.find("source").get("protocol") == "nbd"
    assert disk.find("source").get("name") == "exp"
    assert live_disk_source(vm) in (server.uri, "exp")
    assert domstate(vm) == "running"  # the VM runs on the export now
    # The export holds the guest's data; QEMU reads it through the NBD connection.
    subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", server.image,
                    vm.chain[0]], check=True)
    offset, length, pattern = _own_region(vm, 0)
    assert live_read_matches(vm, offset, length, pattern)


def test_abort_onto_nbd_leaves_the_vm_on_its_source(agent_factory, vms, blockcopies, node, nbd):
    vm = vms(layers=2, size="64M", data_per_layer="4M")
    server = nbd(vm, unix=False)
    agent_factory(extra_args=["--allowed-network-dest", server.allowed])
    name = blockcopies.create(copy_spec(vm, node=node, dest=server.uri))
    blockcopies.wait_phase(name, "Mirrored", timeout=120)
    blockcopies.patch_spec(name, {"abort": True})
    status = blockcopies.wait_phase(name, "Aborted")
    assert "consistent point-in-time copy" in status["message"]
    assert_untouched(vm)
    subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", server.image,
                    vm.chain[0]], check=True)


def test_a_network_destination_not_allowed_is_refused(agent, vms, blockcopies, node, nbd, core):
    vm = vms(layers=1)
    server = nbd(vm, unix=False)
    before = image_digest(server.image, "raw")
    name = blockcopies.create(copy_spec(vm, node=node, dest=server.uri, pivot=True))
    status = blockcopies.wait_phase(name, "Failed", "Copying")
    assert status["phase"] == "Failed"
    assert condition(status, "Failed")["reason"] == "DestNotAllowed"
    assert "--allowed-network-dest" in status["message"]
    wait_for(events_of(blockcopies, core, name, "DestNotAllowed"), 10)
    assert_untouched(vm)
    assert image_digest(server.image, "raw") == before  # nothing was sent


def test_an_nbd_export_of_another_size_is_refused(agent_factory, vms, blockcopies, node, nbd):
    vm = vms(layers=1, size="128M")  # the export is 64M
    server = nbd(vm, unix=False)
    agent_factory(extra_args=["--allowed-network-dest", server.allowed])
    name = blockcopies.create(copy_spec(vm, node=node, dest=server.uri))
    status = blockcopies.wait_phase(name, "Failed", "Copying")
    assert status["phase"] == "Failed"
    assert condition(status, "Failed")["reason"] == "DestNoSpace"
    assert str(parse_size("64M")) in status["message"]
    assert no_block_job(vm)


# ------------------------------------------------------------------ space


def test_a_copy_that_cannot_fit_never_starts(agent, vms, blockcopies, node, core, small_fs):
    small = small_fs("16M")
    vm = vms(size="128M", data_per_layer="48M")
    dest = os.path.join(small, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, pivot=True))
    status = blockcopies.wait_phase(name, "Failed", "Copying")
    assert status["phase"] == "Failed"
    assert condition(status, "Failed")["reason"] == "DestNoSpace"
    assert "MiB free" in status["message"] and "needs about" in status["message"]
    events = wait_for(events_of(blockcopies, core, name, "DestNoSpace"), 10)
    assert [e.type for e in events] == ["Warning"]
    assert os.listdir(small) == [] and not status.get("startTime")
    assert_untouched(vm)
    assert shutil.disk_usage(small).used == 0
