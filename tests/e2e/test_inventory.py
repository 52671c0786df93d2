"""The node inventory on real parts: the agent as a process, libvirtd and QEMU, the API
server. A VM shows up in its node's DiskInventory within seconds of its creation (sizes and
backing chain as libvirt and qemu-img see them), so does a disk hot-plugged into it, its
disk's source changes after a pivot, it
shows Stopped after a destroy (the chains of its qcow2 images read with qemu-img), and it
disappears after undefine. `kubectl blockcopy move` finds the VM's node and disks there:
ambiguous when two nodes list it (both agents here share one libvirtd), picked with --node.

Isolation: the agents publish under the test's unique node names; the agent fixture deletes
their DiskInventories at teardown. Other sessions' agents may share this libvirtd: only this
test's VMs are looked at."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from blockcopy.model.inventory import DiskType, DomainState
from support.images import backing_chain
from support.inventories import raw_inventory, wait_domain
from support.isolation import unique_node
from support.libvirt_probes import inactive_xml, virsh
from support.objects import copy_spec
from support.paths import KUBECONFIG, KUBECTL

pytestmark = pytest.mark.e2e

PLUGIN_BIN = Path(sys.executable).parent  # the venv's bin: where pip put kubectl-blockcopy
SOON = 15.0  # seconds: an event, at most the 2 s gap between two looks, a look, a write (on a
#             machine shared with other sessions)


def test_a_vm_in_its_nodes_inventory_from_creation_to_undefine(agent_factory, node, vms,
                                                               blockcopies, api):
    agent_factory()
    vm = vms("inv", persistent=True, disks=2, hotplug=True)
    started = time.monotonic()
    dom = wait_domain(api, node, vm.name, lambda d: d is not None and d.state == "Running",
                      timeout=SOON)
    appeared = time.monotonic() - started
    assert dom is not None and dom.uuid == vm.uuid
    assert [d.target for d in dom.disks] == ["vda", "vdb"]
    for disk in dom.disks:
        chain = vm.disk_chains[disk.target]
        assert (disk.type, disk.source, disk.format) == (DiskType.FILE, chain[0], "qcow2")
        assert disk.virtual_size == vm.size
        assert disk.allocation is not None and 0 < disk.allocation
        assert [(b.path, b.format) for b in disk.backing_chain] == \
            [(p, "qcow2") for p in chain[1:]]
    status = raw_inventory(api, node)["status"]  # type: ignore[index]
    assert status["nodeName"] == node and status["truncated"] is False
    assert status["domainCount"] == len(status["domains"]) >= 1
    updated = dt.datetime.fromisoformat(status["updated"].replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - updated).total_seconds()) < 60
    print(f"in the inventory {appeared:.1f} s after create_vm returned")

    # A disk hot-plugged (a device-added event): listed within seconds, with its size.
    extra = str(Path(vm.workdir) / "extra.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", extra, "32M"], check=True)
    os.chmod(extra, 0o644)
    virsh("attach-disk", vm.name, extra, "vdc", "--driver", "qemu", "--subdriver", "qcow2",
          "--targetbus", "virtio", "--live", uri=vm.uri)
    plugged = time.monotonic()
    dom = wait_domain(api, node, vm.name,
                      lambda d: d is not None and d.disk("vdc") is not None, timeout=SOON,
                      what="the hot-plugged vdc in the inventory")
    print(f"the hot-plugged disk in the inventory {time.monotonic() - plugged:.1f} s later")
    vdc = dom.disk("vdc")  # type: ignore[union-attr]
    assert vdc is not None and (vdc.source, vdc.format, vdc.virtual_size) == \
        (extra, "qcow2", 32 << 20)

    # A pivot (full copy of vda): its source is the copy, no backing chain any more.
    to = Path(vm.workdir) / "moved"
    to.mkdir()
    to.chmod(0o755)  # QEMU runs as libvirt-qemu
    dest = str(to / "vda.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, pivot=True))
    blockcopies.wait_phase(name, "Pivoted", timeout=120)
    pivoted = time.monotonic()
    dom = wait_domain(api, node, vm.name,
                      lambda d: d is not None and d.disk("vda").source == dest,  # type: ignore[union-attr]
                      timeout=SOON, what="vda's new source in the inventory")
    print(f"the pivot in the inventory {time.monotonic() - pivoted:.1f} s after Pivoted")
    vda = dom.disk("vda")  # type: ignore[union-attr]
    assert vda is not None and vda.backing_chain == () and vda.format == "qcow2"
    assert dom.disk("vdb") == next(d for d in dom.disks if d.target == "vdb")  # type: ignore[union-attr]

    # Destroyed: Stopped, its definition's sources; the qcow2 chains from qemu-img.
    virsh("destroy", vm.name, uri=vm.uri)
    dom = wait_domain(api, node, vm.name,
                      lambda d: d is not None and d.state == DomainState.STOPPED,
                      timeout=SOON, what=f"{vm.name} Stopped")
    assert dom is not None
    defined = {t.get("dev"): s.get("file") for disk in
               ET.fromstring(inactive_xml(vm)).iterfind("./devices/disk")
               if (t := disk.find("target")) is not None and (s := disk.find("source")) is not None}
    for disk in dom.disks:
        assert disk.source == defined[disk.target]
        expected = qemu_img_chain(disk.source)  # type: ignore[arg-type]
        assert [(b.path, b.format) for b in disk.backing_chain] == expected
    assert [(b.path, b.format) for b in dom.disk("vdb").backing_chain] == \
        [(p, "qcow2") for p in vm.disk_chains["vdb"][1:]]  # type: ignore[union-attr]

    # Undefined: gone from the inventory.
    virsh("undefine", vm.name, uri=vm.uri)
    wait_domain(api, node, vm.name, lambda d: d is None, timeout=SOON,
                what=f"{vm.name} gone from the inventory")


def qemu_img_chain(path: str) -> list[tuple[str, str]]:
    """The backing images of ``path`` (nearest first), resolved, with their formats."""
    return [(os.path.realpath(layer["filename"]), layer["format"])
            for layer in backing_chain(path)[1:]]


def plugin(*args: str, expect: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(KUBECONFIG),
           "PATH": f"{PLUGIN_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.run([str(KUBECTL), "blockcopy", *args], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def test_move_finds_the_node_in_the_inventories(agent_factory, node, namespace, vms, api):
    """Two agents on one libvirtd: both list the VM, so `move` asks which node; with --node it
    takes that node and the disks from its inventory."""
    other = unique_node()
    agent_factory()
    agent_factory(other)
    vm = vms("inv-move", disks=2)
    for n in (node, other):
        wait_domain(api, n, vm.name, lambda d: d is not None, timeout=SOON)
    to = str(Path(vm.workdir) / "fast")
    ambiguous = plugin("move", vm.name, "--to", to, "-n", namespace, "--dry-run", expect=2)
    assert "is on several nodes" in ambiguous.stderr and "--node" in ambiguous.stderr
    assert node in ambiguous.stderr and other in ambiguous.stderr
    # By UUID too, and on the node named.
    picked = plugin("move", vm.uuid, "--to", to, "--node", other, "-n", namespace,
                    "--dry-run", expect=0)
    bodies = list(yaml.safe_load_all(picked.stdout))
    assert [(b["spec"]["nodeName"], b["spec"]["domain"], b["spec"]["disk"], b["spec"]["dest"])
            for b in bodies] == [
        (other, vm.name, t, f"{to}/{os.path.basename(vm.disk_chains[t][0])}")
        for t in ("vda", "vdb")]
    # A node without an inventory is said to have none.
    missing = plugin("move", vm.name, "--to", to, "--node", unique_node(), "-n", namespace,
                     "--dry-run", expect=3)
    assert "has no node inventory" in missing.stderr
