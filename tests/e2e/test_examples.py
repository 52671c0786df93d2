"""Every manifest in examples/ applied to a real VM (domain and paths replaced, and the test's
node named in spec.nodeName: tests/support/isolation.py), with its promised outcome checked in
libvirt and in the images, so the examples cannot rot."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest
import yaml

from support.agents import free_port
from support.images import qemu_img_compare, qemu_img_info
from support.libvirt_probes import blockjob_text, live_disk_source, live_mirror, virsh
from support.objects import condition
from support.paths import EXAMPLES
from support.vms import VM
from support.waits import wait_for


def load(name: str, vm: VM, dest: str, node: str, **replace: str) -> dict:
    manifest = yaml.safe_load((EXAMPLES / name).read_text())
    assert manifest["spec"]["domain"] == "my-vm" and manifest["spec"]["dest"].startswith(
        ("/var/lib/libvirt/images/", "nbd://"))
    for field in replace:  # other paths of the example, placed in the test VM's directory
        assert manifest["spec"][field].startswith("/var/lib/libvirt/images/"), field
    manifest["spec"].update(domain=vm.name, dest=dest, nodeName=node, **replace)
    manifest["metadata"]["name"] += "-" + vm.name.rsplit("-", 1)[-1]
    return manifest


def apply(blockcopies, manifest: dict) -> str:
    blockcopies.apply_manifest(manifest)
    return manifest["metadata"]["name"]


def test_every_example_is_covered():
    tested = {"full-copy.yaml", "shallow-reuse-external.yaml", "format-conversion.yaml",
              "bandwidth-limited.yaml", "pivot-from-start.yaml", "abort-point-in-time.yaml",
              "any-base.yaml", "chain-move.yaml", "nbd-destination.yaml", "disk-group.yaml"}
    # A plan needs the simulated nodes and the plan controller: tests/e2e/test_plans.py.
    on_the_nodes = {"move-a-pool.yaml"}
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == tested | on_the_nodes
    plans_tests = (pathlib.Path(__file__).parent / "test_plans.py").read_text()
    assert all(f'"{name}"' in plans_tests for name in on_the_nodes)
    readme = (EXAMPLES / "README.md").read_text()
    for name in tested | on_the_nodes:
        assert f"`{name}`" in readme, name


def test_full_copy(agent, vms, blockcopies):
    vm = vms()
    dest = os.path.join(vm.workdir, "full.qcow2")
    name = apply(blockcopies, load("full-copy.yaml", vm, dest, agent.node))
    blockcopies.wait_phase(name, "Mirrored")
    blockcopies.patch_spec(name, {"pivot": True})  # what the Git commit would do
    blockcopies.wait_phase(name, "Pivoted")
    assert live_disk_source(vm) == dest
    assert "backing-filename" not in qemu_img_info(dest)
    assert qemu_img_compare(vm.chain[0], dest).returncode == 0


def test_shallow_reuse_external_ovirt_flow(agent, vms, blockcopies):
    vm = vms()
    newdir = os.path.join(vm.workdir, "new")
    os.makedirs(newdir)
    base_name = os.path.basename(vm.chain[1])
    dest = os.path.join(newdir, "top.qcow2")
    # The read-only backing image copied to the new storage, then the top pre-created on it
    # with a relative backing name.
    subprocess.run(["cp", "--sparse=always", vm.chain[1], os.path.join(newdir, base_name)],
                   check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base_name,
                    dest], check=True, cwd=newdir)
    name = apply(blockcopies, load("shallow-reuse-external.yaml", vm, dest, agent.node))
    status = blockcopies.wait_phase(name, "Pivoted")
    assert live_disk_source(vm) == dest
    assert qemu_img_info(dest)["backing-filename"] == base_name  # still relative
    assert set(status["flags"]) == {"shallow", "reuseExternal"}
    assert qemu_img_compare(vm.chain[0], dest).returncode == 0


def test_format_conversion(agent, vms, blockcopies):
    vm = vms()
    dest = os.path.join(vm.workdir, "converted.raw")
    name = apply(blockcopies, load("format-conversion.yaml", vm, dest, agent.node))
    blockcopies.wait_phase(name, "Mirrored")
    assert qemu_img_info(dest)["format"] == "raw"
    blockcopies.patch_spec(name, {"pivot": True})
    blockcopies.wait_phase(name, "Pivoted")
    xml = virsh("dumpxml", vm.name, uri=vm.uri)
    assert f"<source file='{dest}'" in xml and "type='raw'" in xml
    assert qemu_img_compare(vm.chain[0], dest).returncode == 0


def test_bandwidth_limited(agent, vms, blockcopies):
    vm = vms(size="256M", data_per_layer="64M")
    dest = os.path.join(vm.workdir, "throttled.qcow2")
    manifest = load("bandwidth-limited.yaml", vm, dest, agent.node)
    assert manifest["spec"]["bandwidth"] == "50Mi"
    manifest["spec"]["bandwidth"] = "2Mi"  # small enough to catch it while Copying
    name = apply(blockcopies, manifest)
    blockcopies.wait_phase(name, "Copying")
    wait_for(lambda: "Bandwidth limit: 2097152 bytes/s" in blockjob_text(
        vm, in_bytes=True, check=False), 20, what="the limit in libvirt")
    wait_for(lambda: blockcopies.status(name).get("bandwidth") == 2097152, 10,
             what="status.bandwidth")
    blockcopies.patch_spec(name, {"bandwidth": 0})
    blockcopies.wait_phase(name, "Mirrored", timeout=120)


def test_pivot_from_start(agent, vms, blockcopies, core):
    vm = vms()
    dest = os.path.join(vm.workdir, "moved.qcow2")
    name = apply(blockcopies, load("pivot-from-start.yaml", vm, dest, agent.node))
    blockcopies.wait_phase(name, "Pivoted")
    assert live_disk_source(vm) == dest
    reasons = {e.message.split(":")[0] for e in blockcopies.events(core, name)}
    assert {"Copying", "Pivoting", "Pivoted"} <= reasons


@pytest.mark.parametrize("when", ["Mirrored"])
def test_abort_point_in_time(agent, vms, blockcopies, when):
    vm = vms()
    dest = os.path.join(vm.workdir, "snapshot.qcow2")
    name = apply(blockcopies, load("abort-point-in-time.yaml", vm, dest, agent.node))
    blockcopies.wait_phase(name, when)
    blockcopies.patch_spec(name, {"abort": True})
    status = blockcopies.wait_phase(name, "Aborted")
    assert "consistent point-in-time copy" in status["message"]
    assert condition(status, "Aborted")["status"] == "True"
    assert condition(status, "Mirrored")["status"] == "True"
    assert live_disk_source(vm) == vm.chain[0] and live_mirror(vm) is None
    assert qemu_img_compare(vm.chain[0], dest).returncode == 0


def test_any_base(agent, vms, blockcopies):
    vm = vms(layers=3)
    dest = os.path.join(vm.workdir, "flat.qcow2")
    name = apply(blockcopies, load("any-base.yaml", vm, dest, agent.node, base=vm.chain[2]))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=120)
    assert status["phase"] == "Pivoted", status
    assert live_disk_source(vm) == dest
    assert qemu_img_info(dest)["full-backing-filename"] == vm.chain[2]
    assert qemu_img_compare(vm.chain[0], dest).returncode == 0


def test_chain_move(agent, vms, blockcopies):
    vm = vms(layers=3)
    newdir = os.path.join(vm.workdir, "new")
    os.mkdir(newdir)
    dest = os.path.join(newdir, "top.qcow2")
    name = apply(blockcopies, load("chain-move.yaml", vm, dest, agent.node))
    status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=180)
    assert status["phase"] == "Pivoted", status
    assert {layer["state"] for layer in status["layers"]} == {"Verified"}
    assert live_disk_source(vm) == dest
    assert qemu_img_info(dest)["backing-filename"] == os.path.basename(vm.chain[1])
    assert qemu_img_compare(vm.chain[0], dest).returncode == 0


def test_nbd_destination(agent_factory, vms, blockcopies, node):
    vm = vms(layers=2)
    image = os.path.join(vm.workdir, "export.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", image, "64M"], check=True)
    port = free_port()
    pidfile = os.path.join(vm.workdir, "nbd.pid")
    subprocess.run(["qemu-nbd", "--fork", "--persistent", "--shared=0", "-f", "raw",
                    "-x", "my-vm-vda", "-b", "127.0.0.1", "-p", str(port), "--pid-file",
                    pidfile, image], check=True)
    try:
        agent = agent_factory(extra_args=["--allowed-network-dest", f"127.0.0.1:{port}"])
        manifest = load("nbd-destination.yaml", vm, f"nbd://127.0.0.1:{port}/my-vm-vda",
                        agent.node)
        name = apply(blockcopies, manifest)
        status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=120)
        assert status["phase"] == "Pivoted", status
        assert "type='network'" in virsh("dumpxml", vm.name, uri=vm.uri)
        subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", image,
                        vm.chain[0]], check=True)
    finally:
        subprocess.run(["kill", open(pidfile).read().strip()], check=False)


def test_disk_group(agent, vms, blockcopies):
    """Both members in one apply (as the example says): each pivots, the VM runs on both
    copies, each holding its disk's guest view."""
    vm = vms(disks=2, layers=1, size="64M", data_per_layer="16M")
    docs = [d for d in yaml.safe_load_all((EXAMPLES / "disk-group.yaml").read_text()) if d]
    dests, names = {}, {}
    for doc in docs:
        spec = doc["spec"]
        assert spec["domain"] == "my-vm" and spec["group"] == "my-vm" and spec["pivot"] is True
        assert spec["dest"].startswith("/var/lib/libvirt/images/")
        disk = spec["disk"]
        dests[disk] = os.path.join(vm.workdir, f"{disk}.group.qcow2")
        spec.update(domain=vm.name, dest=dests[disk], nodeName=agent.node, group=vm.name)
        doc["metadata"]["name"] += "-" + vm.name.rsplit("-", 1)[-1]
        names[disk] = doc["metadata"]["name"]
    assert set(names) == {"vda", "vdb"}
    blockcopies.apply_manifest({"apiVersion": "v1", "kind": "List", "items": docs})
    for name in names.values():
        status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=120)
        assert status["phase"] == "Pivoted", status
    for disk, dest in dests.items():
        assert live_disk_source(vm, disk) == dest and live_mirror(vm, disk) is None
        assert qemu_img_compare(vm.disk_chains[disk][0], dest).returncode == 0
