"""Issue [T] 1, 2 and 4 end to end, on real libvirt + QEMU: what libvirt does not guarantee
and the agent does.

1. Never write onto an image in use: a destination that is another domain's image (running,
   or defined and shut off, whose image QEMU does not lock), another VM's backing file, or
   the disk's own source or chain, is refused before anything starts; one that another
   domain takes while the copy is Mirrored holds the pivot.
2. The destination at the pivot is the file the copy went to: deleted, renamed away or
   replaced by another file of the same name, the pivot is held and the VM stays on its
   source (its guest writing all along), until the user aborts.
4. Zeros the guest wrote are not copied as data (zero detection on the destination), unless
   the spec turns it off.

Each test checks the API (phase, conditions, Events) and the real thing: the live domain
XML, the block job, the bytes of the images."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from support.agents import free_port, http_get
from support.assertions import assert_on_source
from support.guestwrites import acknowledged_writes, paused, verify
from support.images import file_sha256, image_digest, qemu_img_compare, qemu_img_info
from support.libvirt_probes import (
    inactive_xml,
    live_disk_source,
    live_mirror,
    no_block_job,
    qemu_version,
    virsh,
)
from support.objects import condition, copy_spec
from support.vms import IMAGES, VM, destroy_vm, wait_guest_writing
from support.waits import events_of, status_where, wait_for

MiB = 1 << 20
REUSE = ["reuseExternal"]


def _intact(blockcopies, name: str, reason: str, timeout: float = 30) -> dict:
    """The status once its DestinationIntact condition is False with ``reason``."""
    return wait_for(status_where(
        blockcopies, name,
        lambda s: (c := condition(s, "DestinationIntact")) is not None
        and (c["status"], c["reason"]) == ("False", reason),
        f"{name}: DestinationIntact False ({reason})"), timeout)


@pytest.fixture
def metrics_port(agent_factory) -> int:
    """The test's agent, serving its metrics on the port returned."""
    port = free_port()
    agent_factory(extra_args=["--metrics-port", str(port)])
    return port


def _held_attempts(port: int, reason: str) -> float:
    """blockcopy_errors_total{reason}: the agent counts every pivot attempt it held."""
    _, body = http_get(port, "/metrics")
    for line in body.splitlines():
        if line.startswith(f'blockcopy_errors_total{{reason="{reason}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _another_attempt_held(port: int, reason: str) -> None:
    """Returns once the agent held the pivot again after the attempt(s) counted now (its
    follow loop tries again every 5 s): a positive sign, not a quiet pause."""
    first = wait_for(lambda: _held_attempts(port, reason) or None, 10,
                     what=f"a pivot attempt held ({reason}) counted")
    wait_for(lambda: _held_attempts(port, reason) > first, 20,
             what=f"another pivot attempt held ({reason})")


def _assert_held(vm: VM, status: dict, reason: str, dest: str) -> None:
    """The pivot held: still Mirrored, the reason in status, the VM on its source with the
    mirror to ``dest`` in place."""
    assert status["phase"] == "Mirrored", status
    intact = condition(status, "DestinationIntact")
    assert (intact["status"], intact["reason"]) == ("False", reason), status
    assert dest in intact["message"] and intact["message"] == status["message"], status
    assert live_disk_source(vm) == vm.chain[0]
    mirror = live_mirror(vm)
    assert mirror is not None and mirror["ready"] == "yes", mirror
    assert mirror["source"] == dest, mirror


# ------------------------------------------------------------------ 1. before the start


def _refused(blockcopies, core, name: str, reason: str) -> dict:
    status = blockcopies.wait_phase(name, "Failed", "Copying", "Mirrored")
    assert status["phase"] == "Failed", status
    assert condition(status, "Failed")["reason"] == reason, status
    assert not status.get("startTime") and not status.get("createdFiles")
    events = wait_for(events_of(blockcopies, core, name, reason), 10)
    assert [e.type for e in events] == ["Warning"]
    assert events[0].message.endswith(status["message"]) or \
        status["message"] in events[0].message
    return status


@pytest.mark.parametrize("case", ["running", "running-backing", "stopped", "stopped-backing"])
def test_another_domains_image_is_never_a_destination(case, agent, vms, blockcopies, node,
                                                      core):
    """reuseExternal onto another domain's image or backing file, that domain running (QEMU
    locks its top image, only shares its backing file) or defined and shut off (QEMU locks
    nothing): DestInUse, naming that domain, and not one byte of it written."""
    vm = vms(layers=1)
    other = vms(layers=2, persistent=True, start=not case.startswith("stopped"))
    image = other.chain[1] if case.endswith("backing") else other.chain[0]
    before = file_sha256(image)
    name = blockcopies.create(copy_spec(vm, node=node, dest=image, flags=REUSE, pivot=True))
    status = _refused(blockcopies, core, name, "DestInUse")
    assert status["message"].startswith(f"dest {image} is ")
    role = "a backing image" if case.endswith("backing") else "the image"
    state = "not running" if case.startswith("stopped") else "running"
    assert f"is {role} of disk vda of domain {other.name!r} ({state})" in status["message"]
    assert "nothing was started" in status["message"]
    assert_on_source(vm)
    assert file_sha256(image) == before
    # the other domain is as it was: same image, same state
    assert other.chain[0] in inactive_xml(other)
    assert virsh("domstate", other.name) == ("shut off" if case.startswith("stopped")
                                             else "running")


def test_under_the_tenant_policy_another_tenants_domain_is_not_named(
        agent_factory, vms, blockcopies, node, core, namespace, tmp_path):
    """With the tenant policy, a namespace may copy its VM into a root where another
    tenant's stopped VM has its image (a misplaced image): refused all the same, and the
    other domain is not named to a namespace that may not see it."""
    vm = vms(layers=1)
    other = vms(layers=1, persistent=True, start=False)
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"rules": [{
        "namespaces": [namespace], "domains": [vm.name], "destinations": [str(IMAGES)]}]}))
    agent_factory(extra_args=["--policy", str(policy)])
    before = file_sha256(other.chain[0])
    name = blockcopies.create(copy_spec(vm, node=node, dest=other.chain[0], flags=REUSE))
    status = _refused(blockcopies, core, name, "DestInUse")
    assert "the image of a disk of another domain on this node" in status["message"]
    # (the path names its directory, which the namespace chose: the domain is not named)
    assert f"domain {other.name!r}" not in status["message"]
    assert all(f"domain {other.name!r}" not in (e.message or "")
               for e in blockcopies.events(core, name))
    assert_on_source(vm)
    assert file_sha256(other.chain[0]) == before


@pytest.mark.parametrize("which, reason", [("source", "DestIsSource"),
                                           ("backing", "DestInSourceChain")])
def test_the_disks_own_chain_is_never_a_destination(which, reason, agent, vms, blockcopies,
                                                    node, core):
    vm = vms(layers=2)
    image = vm.chain[0] if which == "source" else vm.chain[1]
    before = file_sha256(vm.chain[1])
    name = blockcopies.create(copy_spec(vm, node=node, dest=image, flags=REUSE, pivot=True))
    status = _refused(blockcopies, core, name, reason)
    assert image in status["message"]
    assert_on_source(vm)
    assert file_sha256(vm.chain[1]) == before


# ------------------------------------------------------------------ 1. at the pivot


@pytest.mark.parametrize("how", ["defined", "attached"])
def test_a_destination_another_domain_takes_holds_the_pivot(how, metrics_port, vms, users,
                                                            blockcopies, node, core):
    """While Mirrored, another domain starts using the destination (a new definition on it,
    or a disk attached to a running VM's persistent definition): the pivot asked for is
    held (DestinationIntact False, DestInUse), the VM stays on its source. Once that domain
    lets go of it (undefined / detached), the pivot goes on."""
    vm = vms(layers=2)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest))
    blockcopies.wait_phase(name, "Mirrored")
    if how == "defined":
        other = users(dest)
    else:
        other = vms(layers=1, persistent=True)
        virsh("attach-disk", other.name, dest, "vdb", "--config", "--subdriver", "qcow2")
        assert dest in inactive_xml(other)
    blockcopies.patch_spec(name, {"pivot": True})
    status = _intact(blockcopies, name, "DestInUse")
    _assert_held(vm, status, "DestInUse", dest)
    assert other.name in condition(status, "DestinationIntact")["message"]
    events = wait_for(events_of(blockcopies, core, name, "DestInUse"), 10)
    assert [e.type for e in events] == ["Warning"]
    _another_attempt_held(metrics_port, "DestInUse")  # held too, one Event in all
    _assert_held(vm, blockcopies.status(name), "DestInUse", dest)
    assert len([e for e in blockcopies.events(core, name) if e.reason == "DestInUse"]) == 1

    if how == "defined":
        destroy_vm(other)
    else:
        virsh("detach-disk", other.name, "vdb", "--config")
    status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=60)
    assert status["phase"] == "Pivoted", status
    assert (condition(status, "DestinationIntact")["status"],
            condition(status, "DestinationIntact")["reason"]) == ("True", "Checked")
    assert live_disk_source(vm) == dest and live_mirror(vm) is None
    assert_identical_to_initial(vm, dest)


def assert_identical_to_initial(vm: VM, image: str) -> None:
    assert image_digest(image, "qcow2") == vm.initial_digest


# ------------------------------------------------------------------ 2. destination identity


def _mirrored_writing_copy(vms, blockcopies, node) -> tuple[VM, str, str]:
    vm = vms(layers=1, size="64M", guest_writes=True)
    wait_guest_writing(vm)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest))
    status = blockcopies.wait_phase(name, "Mirrored")
    identity = status["destIdentity"]
    st = os.stat(dest)
    assert (identity["device"], identity["inode"]) == (st.st_dev, st.st_ino), identity
    return vm, dest, name


def _abort_and_check_source(vm: VM, blockcopies, name: str) -> None:
    """Abort (pivot back to false: the API refuses both): the VM goes on on its source,
    every write the guest acknowledged there."""
    blockcopies.patch_spec(name, {"pivot": False, "abort": True})
    status = blockcopies.wait_phase(name, "Aborted", "Failed")
    assert status["phase"] == "Aborted", status
    assert live_disk_source(vm) == vm.chain[0] and live_mirror(vm) is None
    assert no_block_job(vm)
    wait_guest_writing(vm, writes=len(acknowledged_writes(vm)) + 2)  # still writing
    with paused(vm):
        verified = verify(vm, vm.chain[0], fmt="qcow2")
    print(verified)
    assert verified.writes > 0


@pytest.mark.parametrize("how", ["deleted", "renamed"])
def test_a_vanished_destination_is_never_pivoted_onto(how, metrics_port, vms, blockcopies,
                                                      node, core):
    vm, dest, name = _mirrored_writing_copy(vms, blockcopies, node)
    if how == "deleted":
        os.unlink(dest)
    else:
        os.rename(dest, dest + ".moved")
    blockcopies.patch_spec(name, {"pivot": True})
    status = _intact(blockcopies, name, "DestVanished")
    _assert_held(vm, status, "DestVanished", dest)
    assert "is gone" in status["message"] and "spec.abort" in status["message"]
    events = wait_for(events_of(blockcopies, core, name, "DestVanished"), 10)
    assert [e.type for e in events] == ["Warning"]
    _another_attempt_held(metrics_port, "DestVanished")  # still held
    _assert_held(vm, blockcopies.status(name), "DestVanished", dest)
    assert not os.path.exists(dest)
    _abort_and_check_source(vm, blockcopies, name)


def test_a_replaced_destination_is_never_pivoted_onto(agent, vms, blockcopies, node, core):
    """The destination deleted and another file created under its name (QEMU still writes
    the old one): DestReplaced, and the new file is never written."""
    vm, dest, name = _mirrored_writing_copy(vms, blockcopies, node)
    os.unlink(dest)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", dest, "64M"], check=True)
    before = file_sha256(dest)
    blockcopies.patch_spec(name, {"pivot": True})
    status = _intact(blockcopies, name, "DestReplaced")
    _assert_held(vm, status, "DestReplaced", dest)
    assert "is another file now" in status["message"]
    events = wait_for(events_of(blockcopies, core, name, "DestReplaced"), 10)
    assert [e.type for e in events] == ["Warning"]
    _abort_and_check_source(vm, blockcopies, name)
    assert file_sha256(dest) == before  # the impostor was never written


# ------------------------------------------------------------------ 4. zeros


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("detect", [True, False], ids=["detect", "no-detect"])
def test_written_zeros_are_not_copied_as_data(fmt, detect, agent, vms, blockcopies, node):
    """A 2 GiB disk with 8 MiB of data and 256 MiB of written zeros (real zero bytes,
    allocated in the source): by default the copy holds the data only; with
    spec.detectZeroes: false it holds the zeros too, like `virsh blockcopy` on the same stack:
    the source's allocation, except a raw file on QEMU 10 (the backports stack), which the
    mirror zeroes in full before copying (measured with virsh: 2,048 of 2,048 MiB; qcow2
    264 MiB)."""
    vm = vms(layers=1, size="2G", data_per_layer="8M",
             extra_writes=[(0, 8 * MiB, 256 * MiB)])
    assert _allocated(vm.chain[0]) > 264 * MiB  # the zeros are data in the source
    dest = os.path.join(vm.workdir, f"copy.{fmt}")
    fields = {} if detect else {"detectZeroes": False}
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, format=fmt, pivot=True,
                                        **fields))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=180)
    assert status["phase"] == "Pivoted", status
    assert live_disk_source(vm) == dest
    result = qemu_img_compare(vm.chain[0], dest)
    assert result.returncode == 0, result.stdout + result.stderr
    assert image_digest(dest, fmt) == vm.initial_digest
    allocated = _allocated(dest)
    actual = qemu_img_info(dest)["actual-size"]
    print(f"{fmt} detect={detect}: {allocated / MiB:.1f} MiB allocated "
          f"(qemu-img: {actual / MiB:.1f} MiB)")
    if detect:
        assert status["zeroDetection"] == "unmap", status
        assert allocated < 25 * MiB and actual < 25 * MiB
    else:
        assert status["zeroDetection"] == "off (spec.detectZeroes: false)", status
        if fmt == "raw" and qemu_version() >= (10, 0, 0):
            assert allocated >= 2048 * MiB
        else:
            assert 260 * MiB < allocated < 280 * MiB
