"""Issue [T] 3 end to end, on real libvirt + QEMU: an encrypted disk (a LUKS qcow2, its
passphrase in a libvirt secret, <encryption format='luks'> in the disk XML) stays encrypted.
Its copy, qcow2 or raw, is LUKS with the same secret and holds the guest's data (compared
through the passphrase, and never in the clear on the destination's storage); a pre-created
plain destination and an NBD export are refused before anything is written; a raw copy,
a LUKS container written whole, is refused where it cannot fit. The VM restarted on its
qcow2 copy runs, QEMU reading the guest's data through the secret."""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET

import pytest

from support.assertions import assert_on_source
from support.images import file_sha256, image_digest, qemu_img_compare, qemu_img_info
from support.libvirt_probes import (
    domstate,
    live_disk,
    live_disk_source,
    live_mirror,
    live_read_matches,
    no_block_job,
    virsh,
)
from support.objects import condition, copy_spec
from support.vms import VM
from support.waits import events_of, wait_for

MiB = 1 << 20
PATTERN = bytes([0xA0]) * 4096  # the data the VM's image holds (support.vms.layer_plan)


def _encrypted_vm(vms, **kw) -> VM:
    vm = vms(layers=1, size="64M", data_per_layer="8M", encrypted=True, **kw)
    info = qemu_img_info(vm.chain[0])
    assert info["encrypted"] and info["format-specific"]["data"]["encrypt"]["format"] == "luks"
    assert not _holds_plaintext(vm.chain[0])
    return vm


def _holds_plaintext(path: str) -> bool:
    """Whether a 4 KiB block of the guest's data lies in the file as it is stored."""
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            if PATTERN in chunk:
                return True
    return False


def _encryption_of(element: ET.Element) -> ET.Element | None:
    found = element.find("encryption")  # either placement libvirt keeps
    return found if found is not None else element.find("source/encryption")


def _refused(blockcopies, core, name: str, reason: str) -> dict:
    status = blockcopies.wait_phase(name, "Failed", "Copying", "Mirrored")
    assert status["phase"] == "Failed", status
    assert condition(status, "Failed")["reason"] == reason, status
    assert "nothing was started" in status["message"]
    assert not status.get("startTime")
    events = wait_for(events_of(blockcopies, core, name, reason), 10)
    assert [e.type for e in events] == ["Warning"]
    return status


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_an_encrypted_disk_is_copied_encrypted(fmt, agent, vms, users, blockcopies, node):
    vm = _encrypted_vm(vms)
    dest = os.path.join(vm.workdir, f"copy.{fmt}")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, format=fmt, pivot=True))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=120)
    assert status["phase"] == "Pivoted", status
    assert status["zeroDetection"] == "off (an encrypted destination)"
    # libvirt: the VM runs on the copy, with the disk's secret
    disk = live_disk(vm)
    assert live_disk_source(vm) == dest and live_mirror(vm) is None
    encryption = _encryption_of(disk)
    assert encryption is not None and encryption.get("format") == "luks", ET.tostring(disk)
    assert encryption.find("secret").get("uuid") == vm.secret_uuid
    # the image: LUKS (inside qcow2, or a raw LUKS container), never the data in the clear
    info = qemu_img_info(dest)
    assert info["encrypted"], info
    if fmt == "qcow2":
        assert info["format"] == "qcow2"
        assert info["format-specific"]["data"]["encrypt"]["format"] == "luks", info
    else:
        assert info["format"] == "luks", info
    assert not _holds_plaintext(dest)
    # the guest's view, through the passphrase: the source's, byte for byte
    result = qemu_img_compare(vm.chain[0], dest, luks=vm.luks, b_format=fmt)
    assert result.returncode == 0, result.stdout + result.stderr
    assert image_digest(dest, fmt, luks=vm.luks) == vm.initial_digest
    if fmt == "qcow2":  # the VM restarted on its copy: QEMU opens it with the secret
        virsh("destroy", vm.name)
        restarted = users(dest, secret_uuid=vm.secret_uuid)
        virsh("start", restarted.name)
        assert domstate(restarted) == "running"
        assert _encryption_of(live_disk(restarted)) is not None
        assert live_read_matches(restarted, 0, vm.data_per_layer, PATTERN[0])


def test_a_plain_precreated_destination_is_refused(agent, vms, blockcopies, node, core):
    vm = _encrypted_vm(vms)
    dest = os.path.join(vm.workdir, "plain.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", dest, "64M"], check=True)
    before = file_sha256(dest)
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, flags=["reuseExternal"],
                                        pivot=True))
    status = _refused(blockcopies, core, name, "DestNotEncrypted")
    assert dest in status["message"] and "encrypt.format=luks" in status["message"]
    assert_on_source(vm)
    assert file_sha256(dest) == before


def test_a_precreated_luks_destination_is_used(agent, vms, blockcopies, node):
    """The other side of DestNotEncrypted: a pre-created LUKS qcow2 with the disk's
    passphrase is copied into and pivoted onto."""
    vm = _encrypted_vm(vms)
    assert vm.luks is not None
    dest = os.path.join(vm.workdir, "luks.qcow2")
    vm.luks.create(dest, "qcow2", vm.size)
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, flags=["reuseExternal"],
                                        format="qcow2", pivot=True))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=120)
    assert status["phase"] == "Pivoted", status
    assert live_disk_source(vm) == dest
    assert qemu_img_info(dest)["encrypted"] and not _holds_plaintext(dest)
    result = qemu_img_compare(vm.chain[0], dest, luks=vm.luks)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_nbd_destination_is_refused(agent_factory, vms, blockcopies, node, core, nbd):
    vm = _encrypted_vm(vms)
    server = nbd(vm, unix=False)
    agent_factory(extra_args=["--allowed-network-dest", server.allowed])
    before = image_digest(server.image, "raw")
    name = blockcopies.create(copy_spec(vm, node=node, dest=server.uri, pivot=True))
    status = _refused(blockcopies, core, name, "EncryptionNotKept")
    assert "encrypted (LUKS)" in status["message"] and "network destination" in status["message"]
    assert_on_source(vm)
    assert no_block_job(vm)
    assert image_digest(server.image, "raw") == before  # nothing was sent


def test_a_raw_copy_is_refused_where_its_luks_container_cannot_fit(agent, vms, blockcopies,
                                                                   node, core, small_fs):
    """A raw copy of an encrypted disk is a LUKS container that QEMU writes whole (its zeros
    are ciphertext): the disk's capacity plus the LUKS header (about 2 MiB), whatever the
    source holds. On a file system with room for the data but not for that, it never
    starts; a qcow2 copy (LUKS inside, unwritten clusters stay unallocated) fits there."""
    small = small_fs("32M")
    vm = _encrypted_vm(vms)
    dest = os.path.join(small, "copy.raw")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, format="raw", pivot=True))
    status = _refused_for_space(blockcopies, core, name)
    assert "MiB free" in status["message"] and "needs about" in status["message"]
    assert os.listdir(small) == []
    assert_on_source(vm)

    dest = os.path.join(small, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, format="qcow2", pivot=True))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=120)
    assert status["phase"] == "Pivoted", status
    result = qemu_img_compare(vm.chain[0], dest, luks=vm.luks)
    assert result.returncode == 0, result.stdout + result.stderr


def _refused_for_space(blockcopies, core, name: str) -> dict:
    status = blockcopies.wait_phase(name, "Failed", "Mirrored", "Pivoted", timeout=120)
    assert status["phase"] == "Failed", status
    assert condition(status, "Failed")["reason"] == "DestNoSpace", status
    assert not status.get("startTime")
    events = wait_for(events_of(blockcopies, core, name, "DestNoSpace"), 10)
    assert [e.type for e in events] == ["Warning"]
    return status
