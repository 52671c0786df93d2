"""Several hypervisor nodes on one machine (hack/cluster-nodes.sh): two libvirt session
daemons of their own users, an agent each, two Node objects. What must hold for multi-node
work to be testable here at all:

- the nodes are registered as tainted, labelled Node objects that selectors can pick;
- the same domain name runs on both nodes at once, and a BlockCopy naming a node in
  spec.nodeName is copied and pivoted on that node's hypervisor, never the other's (each
  domain's live XML through its own URI, the bytes with qemu-img compare, the copy owned by
  the node's user, whose QEMU wrote it);
- a node's agent killed (SIGKILL) before it claimed an object, and again while its copy of
  a writing guest's disk is Mirrored, picks the object up when started again, and pivots it;
- an agent started from other code than the test's is restarted on bring-up, not reused.

The agents are the script's long-lived processes: they watch the namespace(s) it gave them
(nodes.json "namespaces"), so the objects here live there, with names of their own.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import uuid
from collections.abc import Iterator

import pytest

from blockcopy.model.api import NODE_LABEL
from support import multinode
from support.guestwrites import WRITE_MARK
from support.images import image_digest, qemu_img_compare, qemu_img_info
from support.libvirt_probes import live_disk_source, live_mirror
from support.objects import BlockCopies, condition, copy_spec
from support.vms import VM, destroy_vm, wait_guest_writing
from support.waits import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def nodes(cluster) -> list[multinode.Node]:
    """Two nodes at least (hack/cluster-nodes.sh when missing: a larger set stays)."""
    return multinode.bring_up(2)


@pytest.fixture
def mn_blockcopies(api, kubectl, nodes) -> Iterator[BlockCopies]:
    """BlockCopies in the namespace the node agents watch (a namespace of the test's own when
    they watch all of them); the test's objects are deleted at teardown."""
    namespace = nodes[0].namespaces[0] if nodes[0].namespaces else None
    own = namespace is None
    if own:
        namespace = f"mn-{uuid.uuid4().hex[:6]}"
        kubectl("create", "namespace", namespace)
    blockcopies = _Tracking(api, namespace, kubectl)
    yield blockcopies
    for name in blockcopies.made:
        kubectl("delete", "blockcopy", name, "-n", namespace, "--ignore-not-found",
                "--timeout=60s")
    if own:
        kubectl("delete", "namespace", namespace, "--wait=false")


class _Tracking(BlockCopies):
    def __init__(self, *args):
        super().__init__(*args)
        self.made: list[str] = []

    def create(self, spec: dict, name: str | None = None, labels: dict | None = None) -> str:
        name = super().create(spec, name or f"mn-{uuid.uuid4().hex[:6]}", labels)
        self.made.append(name)
        return name


@pytest.fixture
def node_vms() -> Iterator[list[VM]]:
    """VMs made on the nodes, destroyed at teardown (after the test's objects: take this
    fixture before mn_blockcopies)."""
    made: list[VM] = []
    yield made
    for vm in made:
        destroy_vm(vm)


def test_nodes_are_registered_labelled_and_tainted(nodes, kubectl):
    assert len({n.libvirt_uri for n in nodes}) == len(nodes)
    for node in nodes:
        obj = json.loads(kubectl("get", "node", node.name, "-o", "json").stdout)
        labels = obj["metadata"]["labels"]
        assert labels[multinode.NODE_LABEL] == node.name
        assert labels == {**labels, **node.labels}
        taints = obj["spec"].get("taints") or []
        assert {"key": multinode.TAINT_KEY, "value": "true", "effect": "NoSchedule"} in taints
        # kube-controller-manager may mark the kubelet-less node unreachable, nothing else.
        assert {t["key"] for t in taints} <= {multinode.TAINT_KEY,
                                              "node.kubernetes.io/unreachable",
                                              "node.kubernetes.io/not-ready"}, taints
        # A selector picks exactly that node.
        picked = kubectl("get", "nodes", "-l", f"{multinode.NODE_LABEL}={node.name}",
                         "-o", "name").stdout.split()
        assert picked == [f"node/{node.name}"]
        assert node.agent_pid() is not None
        assert node.images_dir.is_dir() and node.images_dir.stat().st_uid == node.uid
    group = nodes[0].labels[multinode.GROUP_LABEL]
    listed = kubectl("get", "nodes", "-l", f"{multinode.GROUP_LABEL}={group}",
                     "-o", "name").stdout.split()
    assert sorted(listed) == sorted(f"node/{n.name}" for n in nodes)


def test_same_domain_on_two_nodes_each_copy_on_its_own_hypervisor(nodes, node_vms,
                                                                  mn_blockcopies):
    first, second = nodes[:2]
    name = f"bct-mn-{uuid.uuid4().hex[:6]}"
    # Same name, different content: two layers on the first node, one on the second.
    vms = {first.name: first.create_vm(name, layers=2),
           second.name: second.create_vm(name, layers=1)}
    node_vms.extend(vms.values())
    assert image_digest(vms[first.name].chain[0]) != image_digest(vms[second.name].chain[0])

    objects = {}
    for node in (first, second):
        vm = vms[node.name]
        dest = os.path.join(vm.workdir, "copy.qcow2")
        objects[node.name] = (mn_blockcopies.create(
            copy_spec(vm, node=node.name, dest=dest, pivot=True)), dest)

    for node in (first, second):
        vm, (obj, dest) = vms[node.name], objects[node.name]
        status = mn_blockcopies.wait_phase(obj, "Pivoted", "Failed", timeout=120)
        assert status["phase"] == "Pivoted", status
        assert status["nodeName"] == node.name
        assert condition(status, "Pivoted")["status"] == "True"
        # That node's hypervisor runs its domain on the copy now, with no mirror left...
        assert live_disk_source(vm, "vda") == dest
        assert live_mirror(vm, "vda") is None
        # ...and the copy holds that node's chain, not the other's.
        result = qemu_img_compare(vm.chain[0], dest)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "backing-filename" not in qemu_img_info(dest)
        other = vms[second.name if node is first else first.name]
        assert qemu_img_compare(other.chain[0], dest).returncode == 1
        # Written by the node's QEMU: its user owns the file.
        assert pathlib.Path(dest).stat().st_uid == node.uid


def test_killed_agent_picks_up_again(nodes, node_vms, mn_blockcopies):
    node, other = nodes[:2]
    # A guest that writes (the kernel and initrd read by the node's QEMU, as its user).
    vm = node.create_vm(f"bct-mnk-{uuid.uuid4().hex[:6]}", guest_writes=True)
    node_vms.append(vm)
    wait_guest_writing(vm)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    try:
        # Dead before the object exists: no other node's agent receives it (field selector
        # on spec.nodeName), so it stays without a status, unclaimed.
        node.stop_agent(signal.SIGKILL)
        other_since = other.agent_log_size()
        obj = mn_blockcopies.create(copy_spec(vm, node=node.name, dest=dest))
        # The positive signal first: the other agent's next full pass over the unclaimed
        # objects (every claim interval, 30 s) ran after the object existed.
        wait_for(lambda: "claimer pass over " in other.agent_log_text(other_since),
                 60, interval=1, what=f"a claimer pass of {other.name}'s agent")
        unclaimed = mn_blockcopies.get(obj)
        assert not unclaimed.get("status"), unclaimed["status"]
        assert NODE_LABEL not in (unclaimed["metadata"].get("labels") or {})
        # Started again: claims, copies.
        since = node.agent_log_size()
        node.start_agent()
        status = mn_blockcopies.wait_phase(obj, "Mirrored", "Failed", timeout=120)
        assert status["phase"] == "Mirrored", status
        assert status["nodeName"] == node.name
        assert live_mirror(vm, "vda")["ready"] == "yes"
        assert f"claimed for node {node.name}" in node.agent_log_text(since)
        # Dead while Mirrored (the job runs on in QEMU), started again: pivots on request.
        node.stop_agent(signal.SIGKILL)
        assert live_mirror(vm, "vda") is not None
        node.start_agent()
    finally:
        if node.agent_pid() is None:
            node.start_agent()
    mn_blockcopies.patch_spec(obj, {"pivot": True})
    status = mn_blockcopies.wait_phase(obj, "Pivoted", "Failed", timeout=120)
    assert status["phase"] == "Pivoted", status
    assert live_disk_source(vm, "vda") == dest
    assert live_mirror(vm, "vda") is None
    # The guest kept writing, now to the copy (its old chain is stale from the pivot on).
    writes = pathlib.Path(vm.console_log).read_text().count(WRITE_MARK)
    wait_guest_writing(vm, writes=writes + 2)
    assert other.agent_pid() is not None


def test_an_agent_started_from_other_code_is_restarted_not_reused(nodes):
    """The nodes' agents and the plan controller outlive a test session: one started from
    other code (the checkout edited since, or another checkout's tests on this cluster)
    would be judged in this run's place. Bring-up restarts exactly those, and only those."""
    node, other = nodes[:2]
    before = {n.name: n.agent_pid() for n in (node, other)}
    controller = multinode.controller_pid()
    assert None not in before.values() and controller is not None
    assert not multinode.runs_other_code(node.agent_pid_file)
    # As if node's agent had been started from another checkout.
    node.agent_pid_file.with_suffix(".code").write_text("0123456789abcdef\n")
    assert multinode.runs_other_code(node.agent_pid_file)
    since = node.agent_log_size()
    try:
        multinode.bring_up(2)
    finally:
        if node.agent_pid() is None:
            node.start_agent()
    restarted = node.agent_pid()
    assert restarted is not None and restarted != before[node.name]
    assert "agent ready" in node.agent_log_text(since)
    assert not multinode.runs_other_code(node.agent_pid_file)
    # The rest ran this code already: left running.
    assert other.agent_pid() == before[other.name]
    assert multinode.controller_pid() == controller
    # Nothing differs now: a second bring-up restarts nothing.
    multinode.bring_up(2)
    assert node.agent_pid() == restarted and multinode.controller_pid() == controller
