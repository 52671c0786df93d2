"""A block device as the destination: the agent detects it (`<disk type='block'>`), copies
into it and pivots; the live domain then runs on the device. The agent has the test's node
name and namespace (tests/support/isolation.py)."""

from __future__ import annotations

import os
import subprocess

import pytest

from support.images import qemu_img_compare
from support.libvirt_probes import live_disk_source, virsh
from support.objects import copy_spec


@pytest.fixture
def loop_device(vms):
    """A loop device backed by a file in a throwaway VM's directory; detached afterwards."""
    holder = vms(size="64M")  # only for its workdir (removed with the VM)
    backing = os.path.join(holder.workdir, "loop-backing.img")
    subprocess.run(["truncate", "-s", "64M", backing], check=True)
    device = subprocess.run(["losetup", "--find", "--show", backing], check=True,
                            capture_output=True, text=True).stdout.strip()
    yield device
    subprocess.run(["losetup", "-d", device], check=False)


def test_copy_into_a_block_device_and_pivot(agent_factory, node, vms, blockcopies,
                                            loop_device):
    # Devices are allowed one by one (or by directory, e.g. /dev/mapper) with --allowed-path.
    agent_factory(node, extra_args=["--allowed-path", "/var/lib/libvirt/images",
                                    "--allowed-path", loop_device])
    vm = vms(size="64M")
    spec = copy_spec(vm, node=node, dest=loop_device, format="raw", pivot=True)

    # Without reuseExternal the existing device is refused, untouched.
    refused = blockcopies.create(spec)
    status = blockcopies.wait_phase(refused, "Failed")
    assert "already exists" in status["message"]

    name = blockcopies.create({**spec, "flags": ["reuseExternal"]})
    blockcopies.wait_phase(name, "Pivoted")
    xml = virsh("dumpxml", vm.name, uri=vm.uri)
    assert f"<source dev='{loop_device}'" in xml and "<disk type='block'" in xml
    assert live_disk_source(vm) == loop_device
    # -U: read without taking QEMU's lock (this guest has no OS, so nothing writes).
    result = qemu_img_compare(vm.chain[0], loop_device)
    assert result.returncode == 0, result.stdout + result.stderr
