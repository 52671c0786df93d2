"""`kubectl blockcopy plan` end to end: the plugin as installed (run by the real kubectl from
PATH) against the real API server, simulated hypervisor nodes (hack/cluster-nodes.sh: libvirt
session daemons with real QEMU, an agent each) and the plan controller.

One plan over two VMs on two nodes (three disks), driven by the plugin only: its YAML
preview (--dry-run, then --dry-run=server: nothing is created), a --preview plan (the
controller lists the disks, copies nothing), started; `plan list`; `plan wait --for Mirrored`
with pivot Manual (every disk Mirrored, the plan AwaitingPivot, the VMs still on their
sources); `plan wait --for Completed` gives up at its timeout, saying the plan waits for its
pivot; `kubectl blockcopy pivot plan/NAME`; `plan wait --for Completed`; then the plan's
status in the API, its children Pivoted, and each VM's live disk on its copy, which holds
its source's guest view; completion names the plan. Not-found plans exit 3."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest
import yaml
from test_kubectl_plugin import Plugin, parse_table

from blockcopy.kubectl.errors import FAILURE, NOT_FOUND, NOT_REACHED, USAGE
from blockcopy.kubectl.plantext import PLAN_RESOURCE
from support import multinode
from support.images import qemu_img_compare
from support.libvirt_probes import live_disk_source, live_mirror
from support.paths import KUBECTL
from support.plans import (
    ALLOWED_ROOT,
    Plans,
    apply_crds,
    delete_inventories,
    ensure_inventories,
    plans_on,
)
from support.vms import VM, destroy_vm

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def nodes(cluster) -> list[multinode.Node]:
    return multinode.with_controller(2)


@pytest.fixture(scope="module")
def plans(api, nodes, kubectl) -> Iterator[Plans]:
    yield from plans_on(api, nodes, kubectl)


@pytest.fixture(scope="module")
def dest_root() -> Iterator[pathlib.Path]:
    path = ALLOWED_ROOT / f"bct-kplan-dst-{uuid.uuid4().hex[:5]}"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def vms() -> Iterator[list[VM]]:
    made: list[VM] = []
    yield made
    for vm in made:
        destroy_vm(vm)


@pytest.fixture(scope="module")
def published(api) -> Iterator[list[str]]:
    written: list[str] = []
    yield written
    delete_inventories(api, written)


def test_a_plan_from_the_plugin_preview_wait_pivot_complete(nodes, plans, vms, dest_root, api,
                                                            published, kubectl):
    a, b = nodes
    src_prefix, dst_prefix = str(a.images_dir.parent), str(dest_root)
    name = f"bct-kp{uuid.uuid4().hex[:5]}"
    made = {a.name: a.create_vm(f"{name}-a", layers=1, disks=2),
            b.name: b.create_vm(f"{name}-b", layers=1, disks=1)}
    vms.extend(made.values())
    published.extend(ensure_inventories(api, nodes, {n: {vm.name} for n, vm in made.items()}))
    expected = {(node, vm.name, target, chain[0], dst_prefix + chain[0][len(src_prefix):])
                for node, vm in made.items() for target, chain in vm.disk_chains.items()}
    assert len(expected) == 3 and all(e[3].startswith(src_prefix + "/") for e in expected)
    plugin = Plugin(plans.namespace)
    apply_crds(kubectl)
    create = ["plan", "create", name, "--from", src_prefix, "--to", dst_prefix,
              "--domain", f"{name}-*", "--max-active", "2"]

    # The YAML preview: client side, then as the API server would store it. Nothing made.
    shown = yaml.safe_load(plugin(*create, "--dry-run").stdout)
    assert shown["kind"] == "BlockCopyPlan" and shown["metadata"]["name"] == name
    assert shown["spec"] == {"source": {"pathPrefix": src_prefix, "domains": [f"{name}-*"]},
                             "destination": {"pathPrefix": dst_prefix}, "maxActive": 2,
                             "pivot": "Manual"}
    checked = yaml.safe_load(plugin(*create, "--dry-run=server").stdout)
    assert checked["spec"]["maxActivePerNode"] == 1  # the CRD's defaults, filled by the server
    assert checked["spec"]["sourceRetention"] == "Keep" and checked["spec"]["dryRun"] is False
    assert not plans.exists(name)
    # What the controller would refuse is a usage error before anything is sent; what only
    # the API server's schema refuses (65 domain globs) comes back as it says it.
    refused = plugin("plan", "create", name, "--from", src_prefix, "--to",
                     f"{src_prefix}/inner", "--dry-run=server", expect=USAGE)
    assert "must not lie inside" in refused.stderr
    refused = plugin(*create, "--domain", ",".join(f"d{i}" for i in range(65)),
                     "--dry-run=server", expect=FAILURE)
    assert f"creating blockcopyplan '{name}'" in refused.stderr
    assert "spec.source.domains" in refused.stderr and not plans.exists(name)

    # The controller's preview (spec.dryRun): the disks it would copy, no child.
    out = plugin(*create, "--preview").stdout
    plans.made.append(name)
    assert f"{PLAN_RESOURCE}/{name} created" in out and "plan start" in out
    plugin("plan", "wait", name, "--for", "Planned", "--timeout", "120s")
    status = plans.status(name)
    assert {(e["node"], e["domain"], e["disk"], e["source"], e["destination"])
            for e in status["disks"]} == expected
    assert plans.children(name) == []
    preview = plugin("plan", "status", name, "-o", "wide").stdout
    assert "Pivot:     Manual (dry run: nothing is copied)" in preview
    rows = parse_table(preview.split("\n\n", 1)[1])
    assert {(r["NODE"], r["DOMAIN"], r["DISK"], r["SOURCE"], r["DEST"]) for r in rows} == \
        expected

    # Started: copies until every disk is Mirrored, and waits there (pivot Manual).
    assert "patched (spec.dryRun: false; phase Planned" in \
        plugin("plan", "start", name).stdout
    (row,) = parse_table(plugin("plan", "list").stdout)
    assert row["NAME"] == name and row["PHASE"] in ("Planned", "Pending", "Running",
                                                    "AwaitingPivot")
    waited = plugin("plan", "wait", name, "--for", "Mirrored", "--timeout", "600s")
    assert f"{PLAN_RESOURCE}/{name} every disk Mirrored" in waited.stdout
    status = plans.status(name)
    assert (status["phase"], status["total"], status["mirrored"], status["pivoted"],
            status["failed"]) == ("AwaitingPivot", 3, 3, 0, 0), status
    children = plans.children(name)
    assert len(children) == 3
    assert all(c["status"]["phase"] == "Mirrored" and c["spec"]["pivot"] is False
               for c in children)
    for node, _domain, target, source, _dest in expected:
        vm = made[node]
        assert live_disk_source(vm, target) == source  # not pivoted: still on its source
        assert live_mirror(vm, target) is not None
    shown_status = plugin("plan", "status", name).stdout
    assert "Phase:     AwaitingPivot" in shown_status and "Disks:     3: 0 pivoted, 3 mirrored" \
        in shown_status
    rows = parse_table(shown_status.split("\n\n", 1)[1])
    assert sorted(r["CHILD"] for r in rows) == sorted(c["metadata"]["name"] for c in children)
    assert {r["PHASE"] for r in rows} == {"Mirrored"}
    (row,) = parse_table(plugin("plan", "list", "-o", "wide").stdout)
    assert (row["PHASE"], row["MIRRORED"], row["PIVOT"]) == ("AwaitingPivot", "3", "Manual")
    # Completed cannot come without the pivot: the wait says so and gives up at its timeout.
    gave_up = plugin("plan", "wait", name, "--for", "Completed", "--timeout", "3s",
                     expect=NOT_REACHED)
    assert "waits for its pivot" in gave_up.stderr and "timed out after 3s" in gave_up.stderr

    # The pivot, as the issue writes it.
    pivoted = plugin("pivot", f"plan/{name}").stdout
    assert f"{PLAN_RESOURCE}/{name} patched (spec.pivot: Automatic; phase AwaitingPivot" in \
        pivoted
    assert plans.get(name)["spec"]["pivot"] == "Automatic"
    done = plugin("plan", "wait", name, "--for", "Completed", "--timeout", "600s")
    assert f"{PLAN_RESOURCE}/{name} Completed" in done.stdout
    assert "unchanged (spec.pivot is already Automatic; phase Completed)" in \
        plugin("plan", "pivot", name).stdout

    status = plans.status(name)
    assert (status["phase"], status["total"], status["pivoted"], status["failed"]) == \
        ("Completed", 3, 3, 0), status
    assert status["progress"] == "3/3" and status["bytesDone"] == status["bytesTotal"] > 0
    assert all(c["status"]["phase"] == "Pivoted" for c in plans.children(name))
    for node, _domain, target, source, dest in expected:
        vm = made[node]
        assert live_disk_source(vm, target) == dest
        assert live_mirror(vm, target) is None
        result = qemu_img_compare(source, dest)
        assert result.returncode == 0, result.stdout + result.stderr
    (row,) = parse_table(plugin("plan", "list").stdout)
    assert (row["PHASE"], row["PIVOTED"], row["FAILED"]) == ("Completed", "3/3", "0")
    doc = yaml.safe_load(plugin("plan", "status", name, "-o", "yaml").stdout)
    assert [i["kind"] for i in doc["items"]] == ["BlockCopyPlan"] + ["BlockCopy"] * 3

    # kubectl's own completion (kubectl >= 1.26 runs kubectl_complete-blockcopy): the plan's
    # name from the API server, for `plan status` and for `pivot plan/`.
    def complete(*words: str) -> list[str]:
        proc = subprocess.run([str(KUBECTL), "__complete", "blockcopy", *words],
                              env=plugin.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [line.split("\t")[0] for line in proc.stdout.splitlines()[:-1]]

    assert complete("plan", "status", "-n", plans.namespace, name[:5]) == [name]
    assert complete("pivot", "-n", plans.namespace, "plan/") == [f"plan/{name}"]

    # A plan that does not exist: exit 3, named.
    missing = plugin("plan", "status", f"{name}-nope", expect=NOT_FOUND)
    assert f"blockcopyplan '{name}-nope'" in missing.stderr and "not found" in missing.stderr
    plugin("plan", "wait", f"{name}-nope", "--for", "Completed", expect=NOT_FOUND)
    plugin("pivot", f"plan/{name}-nope", expect=NOT_FOUND)
