"""BlockCopyPlan on simulated hypervisor nodes (hack/cluster-nodes.sh: 4 session libvirtds,
an agent each, the plan controller): real API server, libvirt and QEMU.

- A dry run lists exactly the disks under the prefix (node, domain, disk, source,
  destination, bytes) of the domains it names, and creates nothing.
- A plan over VMs of 1-3 disks on 4 nodes (the same domain name on two of them, a disk of a
  matching VM outside the prefix) moves every disk under the prefix, never more than
  maxActive 3 copies active in all nor maxActivePerNode 1 on a node (sampled every 200 ms
  for the whole run), pivots each VM's disks together (Automatic), and each destination
  holds its source's guest view; the disk outside the prefix is left alone.
- Deleting a running plan cancels its children: the VMs stay on their sources. That plan
  also sets verify: None and destination.detectZeroes: false, which its children carry (and
  their agents start them without zero detection).

The nodes' DiskInventory objects come from their agents where this checkout's agents publish
them; otherwise the test publishes them from the nodes' libvirt in the same shape
(support.plans.ensure_inventories). The destination directories do not exist: the agents
make them (the children's spec.createDirectories) like the matching source directories.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import libvirt
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from blockcopy.model.api import FINALIZER, NODE_LABEL
from blockcopy.model.plan import PLAN_KIND, PLAN_LABEL
from support import multinode
from support.images import image_digest, qemu_img_compare
from support.libvirt_probes import live_disk_source, live_mirror, live_xml
from support.paths import EXAMPLES
from support.plans import (
    ALLOWED_ROOT,
    Plans,
    Sampler,
    apply_crds,
    assert_moved,
    delete_inventories,
    destroy_vms_named,
    ensure_inventories,
    plans_on,
)
from support.vms import VM, create_vm, destroy_vm, destroy_vm_by_name
from support.waits import wait_for

pytestmark = pytest.mark.e2e



@pytest.fixture(scope="module")
def nodes(cluster) -> list[multinode.Node]:
    return multinode.with_controller(4)


@pytest.fixture(scope="module")
def tag() -> str:
    return uuid.uuid4().hex[:5]


@pytest.fixture(scope="module")
def dirs(tag) -> Iterator[dict[str, pathlib.Path]]:
    """A destination root and a directory outside the source prefix, both under the agents'
    allowed root; removed at the end (after the VMs)."""
    made = {"dst": ALLOWED_ROOT / f"bct-plans-dst-{tag}",
            "out": ALLOWED_ROOT / f"bct-plans-out-{tag}"}
    for path in made.values():
        path.mkdir(mode=0o755)
        path.chmod(0o755)
    yield made
    for path in made.values():
        shutil.rmtree(path, ignore_errors=True)


def one_vm_on_each(nodes: list[multinode.Node], name: str, vms: list[VM], published: list[str],
                   api, *, disks: list[int] | None = None, **kw) -> list[VM]:
    """A VM NAME-x, NAME-y, ... on each node (``disks[i]`` disks on the i-th), kept in
    ``vms`` for the teardown, listed in its node's inventory."""
    made = [node.create_vm(f"{name}-{suffix}", **kw, **({"disks": disks[i]} if disks else {}))
            for i, (node, suffix) in enumerate(zip(nodes, "xyzw", strict=False))]
    vms.extend(made)
    published.extend(ensure_inventories(api, nodes, {
        node.name: {vm.name} for node, vm in zip(nodes, made, strict=True)}))
    return made


@pytest.fixture(scope="module")
def plans(api, nodes, kubectl) -> Iterator[Plans]:
    yield from plans_on(api, nodes, kubectl)


@pytest.fixture(scope="module")
def vms(dirs) -> Iterator[list[VM]]:
    made: list[VM] = []
    yield made
    for vm in made:
        destroy_vm(vm)


@pytest.fixture(scope="module")
def published(api) -> Iterator[list[str]]:
    written: list[str] = []
    yield written
    delete_inventories(api, written)


def expected_disks(vms_on: dict[str, list[VM]], src: str, dst: str) -> set[tuple]:
    return {(node, vm.name, target, chain[0], dst + chain[0][len(src):])
            for node, vms in vms_on.items() for vm in vms
            for target, chain in vm.disk_chains.items()
            if chain[0].startswith(src + "/")}


def test_dry_run_then_a_plan_over_four_nodes(nodes, plans, vms, dirs, tag, api, published,
                                              kubectl):
    src_prefix = str(nodes[0].images_dir.parent)
    dst_prefix = str(dirs["dst"])
    a, b, c, d = nodes
    name = f"bct-pl{tag}"
    layout = {a.name: [a.create_vm(f"{name}-a", layers=1, disks=3),
                       a.create_vm(f"{name}-b", layers=2, disks=1)],
              b.name: [b.create_vm(f"{name}-a", layers=1, disks=1)],  # same name as on a
              c.name: [c.create_vm(f"{name}-c", layers=1, disks=2)],
              d.name: [d.create_vm(f"{name}-d", layers=1, disks=2)]}
    outside = create_vm(f"{name}-out", uri=d.libvirt_uri, images_dir=dirs["out"], layers=1)
    for made in layout.values():
        vms.extend(made)
    vms.append(outside)
    domains = {n: {vm.name for vm in made} for n, made in layout.items()}
    domains[d.name].add(outside.name)
    published.extend(ensure_inventories(api, nodes, domains))
    expected = expected_disks(layout, src_prefix, dst_prefix)
    assert len(expected) == 9

    spec = {"source": {"pathPrefix": src_prefix, "domains": [f"{name}-*"]},
            "destination": {"pathPrefix": dst_prefix, "bandwidth": "2Mi"},
            "maxActive": 3, "maxActivePerNode": 1, "pivot": "Automatic"}

    # The dry run: what would be copied, nothing created.
    preview = plans.create(f"{name}-dry", {**spec, "dryRun": True})
    status = plans.wait_phase(preview, "Planned", "Failed", timeout=60)
    assert status["phase"] == "Planned", status
    listed = {(e["node"], e["domain"], e["disk"], e["source"], e["destination"])
              for e in status["disks"]}
    assert listed == expected
    assert all(e["bytes"] == 64 << 20 for e in status["disks"])
    assert status["total"] == 9 and plans.children(preview) == []
    plans.delete(preview)

    # The plan itself.
    apply_crds(kubectl)
    plan = plans.create(name, spec)
    with Sampler(plans, plan) as sampler:
        status = plans.wait_phase(plan, "Completed", "Failed", timeout=600)
    assert sampler.error is None, sampler.error
    assert status["phase"] == "Completed", status
    assert (status["total"], status["pivoted"], status["failed"]) == (9, 9, 0)
    assert status["bytesDone"] == status["bytesTotal"] > 0
    assert {n["name"]: n["pivoted"] for n in status["nodes"]} == {
        a.name: 4, b.name: 1, c.name: 2, d.name: 2}
    # The limits held for the whole run (and the sampler did see copies running).
    assert sampler.samples > 20 and sampler.copying_seen > 0
    assert sampler.max_total <= 3 and sampler.max_status_active <= 3
    assert max(sampler.max_per_node.values()) == 1, sampler.max_per_node
    assert sampler.max_total >= 2  # more than one node copied at once

    children = plans.children(plan)
    assert len(children) == 9
    plan_uid = plans.get(plan)["metadata"]["uid"]
    for child in children:
        meta = child["metadata"]
        assert meta["labels"][PLAN_LABEL] == plan
        assert meta["labels"][NODE_LABEL] == child["spec"]["nodeName"]
        (owner,) = meta["ownerReferences"]
        assert (owner["kind"], owner["uid"]) == (PLAN_KIND, plan_uid)
        assert child["status"]["phase"] == "Pivoted", child["status"]
        assert FINALIZER in meta.get("finalizers", [FINALIZER])
    groups = {}
    for child in children:
        groups.setdefault((child["spec"]["nodeName"], child["spec"]["domain"]), set()).add(
            child["spec"]["group"])
    assert all(len(g) == 1 for g in groups.values()) and len(groups) == 5
    assert len({g for gs in groups.values() for g in gs}) == 5  # one group per VM

    # Every disk runs on its copy, which holds its source's guest view.
    by_name = {(n, vm.name): vm for n, made in layout.items() for vm in made}
    for node_name, domain, target, source, dest in expected:
        vm = by_name[(node_name, domain)]
        assert live_disk_source(vm, target) == dest
        assert live_mirror(vm, target) is None
        result = qemu_img_compare(source, dest)
        assert result.returncode == 0, result.stdout + result.stderr
        node = multinode.by_name(nodes, node_name)
        assert pathlib.Path(dest).stat().st_uid == node.uid
        # Its directories, made by the agent like the source's.
        for made, like in ((pathlib.Path(dest).parent, pathlib.Path(source).parent),
                           (pathlib.Path(dest).parent.parent, node.images_dir)):
            assert (made.stat().st_uid, made.stat().st_gid, made.stat().st_mode) == \
                (like.stat().st_uid, like.stat().st_gid, like.stat().st_mode), made
    # The disk outside the prefix was left alone.
    assert live_disk_source(outside, "vda") == outside.chain[0]
    assert not any(c["spec"]["domain"] == outside.name for c in children)


def test_the_example_plan_starts_with_a_dry_run(nodes, plans, vms, dirs, tag, api, published):
    """examples/move-a-pool.yaml, its prefixes and domain glob moved onto two of the nodes: it
    lists the disks under the prefix (Planned) and creates nothing."""
    example = yaml.safe_load((EXAMPLES / "move-a-pool.yaml").read_text())
    spec = example["spec"]
    assert spec["dryRun"] is True and spec["source"]["domains"] == ["my-vm*"]
    name = f"bct-ex{tag}"
    made = one_vm_on_each(nodes[:2], name, vms, published, api, layers=1)
    src_prefix, dst_prefix = str(nodes[0].images_dir.parent), str(dirs["dst"])
    spec["source"].update(pathPrefix=src_prefix, domains=[f"{name}-*"])
    spec["destination"]["pathPrefix"] = dst_prefix
    plan = plans.create(f"{name}-{example['metadata']['name']}", spec)
    status = plans.wait_phase(plan, "Planned", "Failed", timeout=60)
    assert status["phase"] == "Planned", status
    expected = expected_disks({node.name: [vm] for node, vm in zip(nodes, made, strict=False)},
                              src_prefix, dst_prefix)
    assert expected
    assert {(e["node"], e["domain"], e["disk"], e["source"], e["destination"])
            for e in status["disks"]} == expected
    assert status["total"] == len(expected) and plans.children(plan) == []
    plans.delete(plan)


def test_deleting_a_running_plan_cancels_its_copies(nodes, plans, vms, dirs, tag, api,
                                                    published, kubectl):
    """Also the plan's verify and destination.detectZeroes, copied into its children's
    specs (the unit tests show they are left out when absent; test_guarantees.py and
    test_verify_at_the_switch.py what they do on a BlockCopy): checked while they copy, at no
    extra wait."""
    src_prefix = str(nodes[0].images_dir.parent)
    dst_prefix = str(dirs["dst"]) + "-del"
    os.mkdir(dst_prefix)
    try:
        name = f"bct-pd{tag}"
        made = one_vm_on_each(nodes[:2], name, vms, published, api,
                              layers=1, data_per_layer="16M")
        apply_crds(kubectl)
        plan = plans.create(name, {
            "source": {"pathPrefix": src_prefix, "domains": [f"{name}-*"]},
            "destination": {"pathPrefix": dst_prefix, "bandwidth": "256Ki",
                            "detectZeroes": False},
            "maxActive": 2, "maxActivePerNode": 1, "pivot": "Automatic", "verify": "None"})

        def copying() -> list[dict] | None:
            kids = plans.children(plan)
            phases = [(k.get("status") or {}).get("phase") for k in kids]
            return kids if len(kids) == 2 and phases.count("Copying") == 2 else None

        children = wait_for(copying, 120, what=f"both children of {plan} Copying")
        assert all(live_mirror(vm, "vda") is not None for vm in made)
        for child in children:
            assert (child["spec"]["verify"], child["spec"]["detectZeroes"]) == ("None", False)
            # Written with the start: the agent read the child's field.
            assert child["status"]["zeroDetection"] == "off (spec.detectZeroes: false)", \
                child["status"]
        plans.delete(plan, wait=180)
        # Cancelled: each VM on its source, no job left.
        for vm in made:
            assert live_disk_source(vm, "vda") == vm.chain[0]
            assert live_mirror(vm, "vda") is None
    finally:
        shutil.rmtree(dst_prefix, ignore_errors=True)


@pytest.mark.parametrize(("spec", "message"), [
    ({"source": {"pathPrefix": "/var/lib/libvirt/images/a"},
      "destination": {"pathPrefix": "/var/lib/libvirt/images/a/b"}},
     "must not lie inside spec.source.pathPrefix"),
    ({"source": {"pathPrefix": "/var/lib/libvirt/images/a/b"},
      "destination": {"pathPrefix": "/var/lib/libvirt/images/a"}},
     "must not lie inside spec.destination.pathPrefix"),
    ({"source": {"pathPrefix": "images/a"}, "destination": {"pathPrefix": "/b"}},
     "an absolute, normalised directory"),
    ({"source": {"pathPrefix": "/a"}, "destination": {"pathPrefix": "/b/../c"}},
     "an absolute, normalised directory"),
    ({"source": {"pathPrefix": "/a"}, "destination": {"pathPrefix": "/b"}, "maxActive": 0},
     "maxActive"),
    ({"source": {"pathPrefix": "/a"}, "destination": {"pathPrefix": "/b"},
      "maxActivePerNode": 1000}, "maxActivePerNode"),
    ({"source": {"pathPrefix": "/a"}, "destination": {"pathPrefix": "/b"}, "pivot": "Now"},
     "pivot"),
    ({"source": {"pathPrefix": "/a"}, "destination": {"pathPrefix": "/b"}, "verify": "Quick"},
     "spec.verify"),
    ({"source": {"pathPrefix": "/a"},
      "destination": {"pathPrefix": "/b", "detectZeroes": "no"}},
     "spec.destination.detectZeroes"),
    ({"source": {"pathPrefix": "/a"},
      "destination": {"pathPrefix": "/b", "bandwidth": "fast"}},
     "spec.destination.bandwidth must be a quantity of bytes per second"),
], ids=["dest-inside", "source-inside", "relative", "dotdot", "zero", "absurd", "pivot",
        "verify", "detect-zeroes", "bandwidth"])
def test_bad_plans_refused_at_admission(plans, kubectl, tag, spec, message):
    """The API server itself refuses them (the CRD's schema and CEL rules): nothing exists."""
    apply_crds(kubectl)
    name = f"bct-bad{tag}"
    with pytest.raises(ApiException) as refused:
        plans.create(name, spec)
    assert refused.value.status == 422 and message in refused.value.body, refused.value.body
    assert not plans.exists(name)


def test_controller_killed_mid_plan_carries_on(nodes, plans, vms, dirs, tag, api, published,
                                               kubectl):
    """SIGKILL of the plan controller while copies run: started again, it takes the plan's
    fixed disk set from its status and its children from the API, creates no duplicate and
    never exceeds the limits; the plan completes."""
    src_prefix = str(nodes[0].images_dir.parent)
    dst_prefix = str(dirs["dst"]) + "-kill"
    os.mkdir(dst_prefix)
    try:
        name = f"bct-pk{tag}"
        made = one_vm_on_each(nodes[:2], name, vms, published, api, layers=1,
                              disks=[2, 1], data_per_layer="8M")
        apply_crds(kubectl)
        plan = plans.create(name, {
            "source": {"pathPrefix": src_prefix, "domains": [f"{name}-*"]},
            "destination": {"pathPrefix": dst_prefix, "bandwidth": "1Mi"},
            "maxActive": 2, "maxActivePerNode": 1, "pivot": "Automatic"})
        with Sampler(plans, plan) as sampler:
            wait_for(lambda: any((c.get("status") or {}).get("phase") == "Copying"
                                 for c in plans.children(plan)), 120,
                     what=f"a child of {plan} Copying")
            try:
                multinode.stop_controller(signal.SIGKILL)
                before = {c["metadata"]["uid"] for c in plans.children(plan)}
            finally:
                multinode.start_controller()
            status = plans.wait_phase(plan, "Completed", "Failed", timeout=300)
        assert status["phase"] == "Completed", status
        assert (status["total"], status["pivoted"]) == (3, 3)
        children = plans.children(plan)
        assert len(children) == 3 and before <= {c["metadata"]["uid"] for c in children}
        assert sampler.error is None and sampler.max_total <= 2
        assert max(sampler.max_per_node.values()) == 1
        assert_moved(made, src_prefix, dst_prefix)
    finally:
        if multinode.controller_pid() is None:
            multinode.start_controller()
        destroy_vms_named(vms, f"bct-pk{tag}")
        shutil.rmtree(dst_prefix, ignore_errors=True)


def test_agent_killed_mid_plan_the_others_go_on(nodes, plans, vms, dirs, tag, api, published,
                                                kubectl):
    """SIGKILL of one node's agent while its copy runs: the other node's disks go on; started
    again, the agent picks its copy up and the plan completes."""
    src_prefix = str(nodes[0].images_dir.parent)
    dst_prefix = str(dirs["dst"]) + "-agent"
    os.mkdir(dst_prefix)
    victim, other = nodes[2], nodes[3]
    try:
        name = f"bct-pa{tag}"
        made = {victim.name: victim.create_vm(f"{name}-v", layers=1, data_per_layer="8M"),
                other.name: other.create_vm(f"{name}-o", layers=1, disks=2,
                                            data_per_layer="8M")}
        vms.extend(made.values())
        published.extend(ensure_inventories(api, [victim, other], {
            n: {vm.name} for n, vm in made.items()}))
        apply_crds(kubectl)
        plan = plans.create(name, {
            "source": {"pathPrefix": src_prefix, "domains": [f"{name}-*"]},
            "destination": {"pathPrefix": dst_prefix, "bandwidth": "1Mi"},
            "maxActive": 2, "maxActivePerNode": 1, "pivot": "Automatic"})

        def phases() -> dict[str, str | None]:
            return {c["spec"]["nodeName"] + "/" + c["spec"]["disk"]:
                    (c.get("status") or {}).get("phase") for c in plans.children(plan)}

        wait_for(lambda: phases().get(f"{victim.name}/vda") == "Copying", 120,
                 what=f"the copy on {victim.name} Copying")
        try:
            victim.stop_agent(signal.SIGKILL)
            # The other node's disks go on: both end Mirrored or Pivoted meanwhile.
            wait_for(lambda: [p for k, p in phases().items() if k.startswith(other.name)]
                     in (["Pivoted", "Pivoted"],), 180,
                     what=f"{other.name}'s disks pivoted while {victim.name} has no agent")
            assert plans.status(plan)["phase"] == "Running"
        finally:
            victim.start_agent()
        status = plans.wait_phase(plan, "Completed", "Failed", timeout=300)
        assert status["phase"] == "Completed", status
        assert (status["total"], status["pivoted"]) == (3, 3)
        assert_moved(made.values(), src_prefix, dst_prefix)
    finally:
        if victim.agent_pid() is None:
            victim.start_agent()
        destroy_vms_named(vms, f"bct-pa{tag}")
        shutil.rmtree(dst_prefix, ignore_errors=True)


def test_delete_retention_keeps_a_shared_backing_file(nodes, plans, vms, dirs, tag, api,
                                                      published, kubectl):
    """sourceRetention Delete: after the pivot, the old top image (used by nobody) is
    deleted; its backing file, also the backing file of another (defined, stopped) VM's
    disk, is kept; status.reclaimedSources says both."""
    node = nodes[0]
    src_prefix = str(node.images_dir.parent)
    dst_prefix = str(dirs["dst"]) + "-ret"
    os.mkdir(dst_prefix)
    name = f"bct-pr{tag}"
    sharer = f"{name}-sharer"
    try:
        vm = node.create_vm(f"{name}-m", layers=2)
        vms.append(vm)
        top, base = vm.chain
        overlay = dirs["out"] / f"{sharer}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base,
                        str(overlay)], check=True)
        os.chown(overlay, node.uid, -1)
        domain_type = ET.fromstring(live_xml(vm)).get("type")
        with libvirt.open(node.libvirt_uri) as conn:
            conn.defineXML(f"""<domain type='{domain_type}'><name>{sharer}</name>
              <memory unit='MiB'>64</memory><os><type>hvm</type></os><devices>
              <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
              <source file='{overlay}'/><target dev='vda' bus='virtio'/></disk>
              </devices></domain>""")
        published.extend(ensure_inventories(api, [node], {node.name: {vm.name, sharer}}))
        apply_crds(kubectl)
        plan = plans.create(name, {
            "source": {"pathPrefix": src_prefix, "domains": [f"{name}-*"]},
            "destination": {"pathPrefix": dst_prefix}, "pivot": "Automatic",
            "sourceRetention": "Delete"})
        status = plans.wait_phase(plan, "Completed", "Failed", timeout=300)
        assert status["phase"] == "Completed", status
        assert status["total"] == 1  # the stopped sharer is not selected
        assert len(plans.children(plan)) == 1
        reclaimed = wait_for(lambda: (plans.children(plan)[0].get("status") or {})
                             .get("reclaimedSources"), 60, what="the sources reclaimed")
        assert reclaimed["deleted"] == [top], reclaimed
        assert any(k.startswith(f"{base}: used by domain {sharer}") for k in reclaimed["kept"])
        assert not os.path.exists(top) and os.path.exists(base)
        dest = dst_prefix + top[len(src_prefix):]
        assert live_disk_source(vm, "vda") == dest
        assert image_digest(dest, "qcow2") == vm.initial_digests["vda"]
    finally:
        destroy_vm_by_name(sharer, uri=node.libvirt_uri, images_dir=dirs["out"])
        for made in list(vms):
            if made.name.startswith(name):
                destroy_vm(made)
                vms.remove(made)
        shutil.rmtree(dst_prefix, ignore_errors=True)
