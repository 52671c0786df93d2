"""`kubectl blockcopy` end to end: the plugin as installed (the console script kubectl-blockcopy
of this package, found by the real kubectl on PATH), against the real API server, real QEMU VMs
(disks found in the node inventory the agent publishes) and the agent as a real process. Each
test checks what the plugin printed and its exit code, the objects in the API, and, where the
agent acted, libvirt.

Isolation (tests/support/isolation.py): every object names the test's node (`move --node`),
whose agent watches only the test's namespace."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from blockcopy.kubectl.names import GROUP_LABEL, RESOURCE
from blockcopy.model.api import GROUP, PLURAL, VERSION
from support.images import assert_identical
from support.inventories import wait_domain
from support.isolation import unique_node
from support.libvirt_probes import live_disk_source, live_mirror
from support.paths import KUBECONFIG, KUBECTL
from support.waits import wait_for

PLUGIN_BIN = Path(sys.executable).parent  # the venv's bin: where pip put kubectl-blockcopy


class Plugin:
    """``kubectl blockcopy ARGS`` through the real kubectl, with the test's kubeconfig."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.env = {**os.environ, "KUBECONFIG": str(KUBECONFIG),
                    "PATH": f"{PLUGIN_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.pop("KUBERNETES_SERVICE_HOST", None)

    def __call__(self, *args: str, namespaced: bool = True, expect: int | None = 0,
                 timeout: float = 600) -> subprocess.CompletedProcess:
        ns = ["-n", self.namespace] if namespaced else []
        proc = subprocess.run([str(KUBECTL), "blockcopy", *args, *ns], env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if expect is not None:
            assert proc.returncode == expect, (
                f"kubectl blockcopy {' '.join(args)}: exit {proc.returncode}, not {expect}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc


@pytest.fixture
def plugin(namespace) -> Plugin:
    run = Plugin(namespace)
    assert (PLUGIN_BIN / "kubectl-blockcopy").exists(), "pip install -e . puts it there"
    found = subprocess.run([str(KUBECTL), "plugin", "list", "--name-only"], env=run.env,
                           capture_output=True, text=True)
    assert "kubectl-blockcopy" in found.stdout.split(), found.stdout + found.stderr
    return run


def parse_table(text: str) -> list[dict[str, str]]:
    """The plugin's table as dicts, cut at the header's column starts (cells may be empty)."""
    lines = [line for line in text.splitlines() if line.strip()]
    columns = [(m.group(), m.start()) for m in re.finditer(r"\S+", lines[0])]
    ends = [start for _, start in columns[1:]] + [None]
    return [{name: line[start:end].strip() for (name, start), end
             in zip(columns, ends, strict=True)}
            for line in lines[1:]]


def dest_dir(vm, name: str = "moved") -> Path:
    path = Path(vm.workdir) / name
    path.mkdir()
    path.chmod(0o755)  # QEMU runs as libvirt-qemu
    return path


def one_line(text: str | None) -> str:
    return " ".join(str(text or "").split())


def test_move_a_two_disk_vm_list_status_pivot_the_group_and_wait(
        plugin, agent_factory, node, namespace, vms, blockcopies, tmp_path, api):
    agent_factory()
    vm = vms("plugin", disks=2)
    # The plugin reads the disks from the node inventory the agent publishes (seconds after
    # the VM started).
    wait_domain(api, node, vm.name, lambda d: d is not None)
    to = dest_dir(vm)
    dests = {t: str(to / os.path.basename(chain[0])) for t, chain in vm.disk_chains.items()}
    names = {t: f"{vm.name}-{t}" for t in ("vda", "vdb")}

    # move: one BlockCopy per disk, the disks read from the node's inventory.
    moved = plugin("move", vm.name, "--to", str(to), "--node", node, "--bandwidth", "512Mi")
    for target, name in names.items():
        assert f"{RESOURCE}/{name} created ({vm.name} {target} -> " \
               f"{dests[target]})" in moved.stdout
        obj = blockcopies.get(name)
        spec = obj["spec"]
        assert {k: spec[k] for k in ("domain", "nodeName", "disk", "dest", "bandwidth",
                                     "pivot")} == {
            "domain": vm.name, "nodeName": node, "disk": target, "dest": dests[target],
            "bandwidth": "512Mi", "pivot": False}
        assert obj["metadata"]["labels"][GROUP_LABEL] == vm.name
        # spec.group passes through; a server whose CRD predates groups prunes it, and the
        # plugin says so.
        assert spec.get("group") == vm.name or "dropped spec.group" in moved.stderr, \
            (spec, moved.stderr)
    assert len(blockcopies.api.list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL)["items"]) == 2

    # wait --group: both copies reach Mirrored (the agent copies both disks).
    waited = plugin("wait", "--group", vm.name, "--for", "Mirrored", "--timeout", "300s")
    assert all(f"{name} Mirrored" in waited.stdout for name in names.values()), waited.stdout

    # list: the test's namespace; -A: every namespace, ours included; without -n: the
    # namespace of the kubeconfig's context (here a copy of the admin's, given by --kubeconfig).
    rows = parse_table(plugin("list").stdout)
    assert [r["NAME"] for r in rows] == sorted(names.values())
    for row in rows:
        assert row["PHASE"] == "Mirrored" and row["PROGRESS"] == "100%", row
        assert row["NODE"] == node and row["GROUP"] == vm.name and row["DOMAIN"] == vm.name
        assert row["RATE"] == "" and "NAMESPACE" not in row
    every = parse_table(plugin("list", "-A", namespaced=False).stdout)
    assert sorted(r["NAME"] for r in every if r["NAMESPACE"] == namespace) == \
        sorted(names.values())
    config = yaml.safe_load(KUBECONFIG.read_text())
    current = next(c for c in config["contexts"] if c["name"] == config["current-context"])
    current["context"]["namespace"] = namespace
    own = tmp_path / "kubeconfig"
    own.write_text(yaml.safe_dump(config))
    listed = plugin("list", "--group", vm.name, "--kubeconfig", str(own), namespaced=False)
    assert [r["NAME"] for r in parse_table(listed.stdout)] == sorted(names.values())

    # status: the same columns and the agent's message.
    (row,) = parse_table(plugin("status", names["vdb"]).stdout)
    status = blockcopies.status(names["vdb"])
    assert row["NAME"] == names["vdb"] and row["PHASE"] == "Mirrored"
    assert row["MESSAGE"] == one_line(status["message"]) != ""

    # pivot --group: both specs patched; the agent pivots each (the group gate is the agent's).
    pivoted = plugin("pivot", "--group", vm.name)
    for name in names.values():
        assert f"{RESOURCE}/{name} patched (spec.pivot: true" in pivoted.stdout
        assert blockcopies.get(name)["spec"]["pivot"] is True
    waited = plugin("wait", *names.values(), "--for", "Pivoted", "--timeout", "300s")
    assert all(f"{name} Pivoted" in waited.stdout for name in names.values())
    for target, name in names.items():
        assert blockcopies.status(name)["phase"] == "Pivoted"
        assert live_disk_source(vm, target) == dests[target]  # libvirt: the VM runs on the copy
        assert live_mirror(vm, target) is None
        assert_identical(vm.disk_chains[target][0], dests[target])

    # Done: again is harmless, and what cannot happen any more is said, not done.
    again = plugin("pivot", names["vda"])
    assert "unchanged (spec.pivot is already true; phase Pivoted)" in again.stdout
    late = plugin("abort", "--group", vm.name)
    assert late.stdout.count("not patched: it is already Pivoted, nothing to abort") == 2
    assert all(blockcopies.get(n)["spec"].get("abort") in (None, False) for n in names.values())
    never = plugin("wait", names["vda"], "--for", "Aborted", "--timeout", "60s", expect=1)
    assert f"{names['vda']} is Pivoted" in never.stderr and "will never be Aborted" in never.stderr


def test_abort_a_copy_while_it_copies_showing_its_rate(plugin, agent_factory, node, vms,
                                                       blockcopies, api):
    agent_factory()
    vm = vms("plugin-abort", size="256M", data_per_layer="64M")  # 128 MiB to copy
    wait_domain(api, node, vm.name, lambda d: d is not None)  # --disk checked against it
    to = dest_dir(vm)
    plugin("move", vm.name, "--to", str(to), "--disk", "vda", "--node", node,
           "--bandwidth", "8Mi", "--group", "slow")
    name = f"{vm.name}-vda"
    assert blockcopies.get(name)["metadata"]["labels"][GROUP_LABEL] == "slow"

    # While Copying at about 8 MiB/s, list shows the rate in human units (and status the ETA
    # the agent computed, when it has one).
    def copying_row():
        rows = parse_table(plugin("list").stdout)
        return rows[0] if rows and rows[0]["PHASE"] == "Copying" and rows[0]["RATE"] else None
    row = wait_for(copying_row, 90, interval=0.5, what="a Copying row with a rate")
    assert re.fullmatch(r"\d+(\.\d)? (B|KiB|MiB)/s", row["RATE"]), row
    assert row["GROUP"] == "slow" and row["NODE"] == node

    aborted = plugin("abort", name)
    assert f"{RESOURCE}/{name} patched (spec.abort: true" in aborted.stdout
    assert blockcopies.get(name)["spec"]["abort"] is True
    plugin("wait", "--group", "slow", "--for", "Aborted", "--timeout", "300s")
    assert live_disk_source(vm, "vda") == vm.chain[0]  # libvirt: still on the source
    assert live_mirror(vm, "vda") is None
    (row,) = parse_table(plugin("status", name).stdout)
    assert row["PHASE"] == "Aborted"
    never = plugin("wait", name, "--for", "Pivoted", "--timeout", "60s", expect=1)
    assert f"{name} is Aborted" in never.stderr


def test_wait_exits_1_on_failed_and_on_timeout_and_errors_are_clear(
        plugin, agent_factory, node, vms, blockcopies):
    agent_factory()
    vm = vms("plugin-fail")
    outside = f"/tmp/blockcopy-plugin-{uuid.uuid4().hex[:6]}"  # not under an allowed root
    plugin("move", vm.name, "--to", outside, "--disk", "vda", "--node", node)
    name = f"{vm.name}-vda"
    failed = plugin("wait", name, "--for", "Mirrored", "--timeout", "300s", expect=1)
    status = blockcopies.status(name)
    assert status["phase"] == "Failed"
    assert f"{name} is Failed: {one_line(status['message'])}" in failed.stderr
    assert "will never be Mirrored" in failed.stderr
    plugin("wait", name, "--for", "failed", "--timeout", "10s")  # what it waits for: 0
    (row,) = parse_table(plugin("status", name).stdout)
    assert row["PHASE"] == "Failed" and row["MESSAGE"] == one_line(status["message"])
    pivot = plugin("pivot", name)
    assert "not patched: it is already Failed" in pivot.stdout

    # No agent on this node: the copy stays without a status, and wait times out (exit 1).
    nobody = unique_node("nobody")
    plugin("move", vm.name, "--to", str(dest_dir(vm)), "--disk", "vda", "--node", nobody,
           "--group", "orphans", "--prefix", "orphan")
    timed_out = plugin("wait", "--group", "orphans", "--for", "Mirrored", "--timeout", "3s",
                       expect=1)
    assert "timed out after 3s waiting for Mirrored" in timed_out.stderr

    # Clear errors with their exit codes.
    again = plugin("move", vm.name, "--to", outside, "--disk", "vda", "--node", node, expect=4)
    assert f"creating blockcopy '{name}'" in again.stderr and "already exists" in again.stderr
    assert "--prefix); nothing was created" in again.stderr
    missing = plugin("status", "no-such-copy", expect=3)
    assert "blockcopy 'no-such-copy'" in missing.stderr and "not found" in missing.stderr
    plugin("pivot", "--group", "no-such-group", expect=3)
    unknown = plugin("move", "bct-no-such-vm", "--to", "/var/lib/libvirt/images", expect=3)
    assert "no domain 'bct-no-such-vm'" in unknown.stderr
    plugin("wait", name, "--for", "Done", expect=2)
    assert len(blockcopies.api.list_namespaced_custom_object(
        GROUP, VERSION, plugin.namespace, PLURAL)["items"]) == 2
