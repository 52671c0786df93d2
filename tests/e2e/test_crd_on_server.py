"""The CRD on a current Kubernetes API server (issue D): created as users create it, its CEL
rules compiled and cost-estimated by the server, explained, field-selectable, and its
immutability rules enforced by the API server itself while a real copy runs. Objects live in
the test's namespace and name the test's node (tests/support/isolation.py)."""

from __future__ import annotations

import copy
import json
import os
import uuid

import pytest
import yaml

from blockcopy.model.api import GROUP, PLURAL
from support.isolation import unique_node
from support.objects import copy_spec
from support.paths import CRD as CRD_PATH
from support.waits import wait_for

CRD = yaml.safe_load(CRD_PATH.read_text())


def _renamed_crd(group: str) -> dict:
    """The same CRD under another group, so a test can really create it (the shared one
    already exists on the server)."""
    crd = copy.deepcopy(CRD)
    crd["metadata"]["name"] = f"{crd['spec']['names']['plural']}.{group}"
    crd["spec"]["group"] = group
    return crd


def test_the_crd_is_created_established_and_without_warnings(kubectl):
    """A real create: the server compiles every CEL rule and estimates its cost, and refuses
    the whole CRD if one could exceed the budget (cel-python cannot check that)."""
    group = f"t{uuid.uuid4().hex[:8]}.{GROUP}"
    crd = _renamed_crd(group)
    name = crd["metadata"]["name"]
    try:
        proc = kubectl("create", "-f", "-", input=yaml.safe_dump(crd), check=False)
        assert proc.returncode == 0, proc.stderr
        assert "Warning" not in proc.stderr, proc.stderr
        kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
        stored = json.loads(kubectl("get", "crd", name, "-o", "json").stdout)
        conditions = {c["type"]: c["status"] for c in stored["status"]["conditions"]}
        assert conditions == {"NamesAccepted": "True", "Established": "True"}, conditions
        # Every rule made it to the server (none dropped as unknown).
        rules = stored["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
            "x-kubernetes-validations"]
        assert len(rules) == len(CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
            "x-kubernetes-validations"])
    finally:
        kubectl("delete", "crd", name, "--ignore-not-found", "--wait=false")


def test_a_rule_over_the_cost_budget_is_what_the_bounds_prevent(kubectl):
    """Proof that the server does estimate costs (so the test above can fail): the same CRD
    with the bounds of spec.dest and spec.flags removed is refused at creation."""
    group = f"t{uuid.uuid4().hex[:8]}.{GROUP}"
    crd = _renamed_crd(group)
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for prop in spec["properties"].values():
        prop.pop("maxLength", None)
        prop.pop("maxItems", None)
        prop.get("items", {}).pop("maxLength", None)
    # Rules that compare whole unbounded strings many times over blow any budget.
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"].append(
        {"rule": "self.spec.flags.all(a, self.spec.flags.all(b, self.spec.dest.contains(a + b"
                 " + self.spec.disk + self.spec.domain)))", "message": "too costly"})
    proc = kubectl("create", "-f", "-", input=yaml.safe_dump(crd), check=False)
    if proc.returncode == 0:
        kubectl("delete", "crd", crd["metadata"]["name"], "--wait=false")
    assert proc.returncode != 0
    assert "cost" in proc.stderr.lower(), proc.stderr


def test_apply_as_users_do_reports_no_warnings(kubectl, api):
    proc = kubectl("apply", "-f", str(CRD_PATH))
    assert "Warning" not in proc.stderr, proc.stderr


def test_kubectl_explain_prints_the_descriptions(kubectl, api):
    # Established is not the end: the discovery document catches up a moment later.
    wait_for(lambda: kubectl("explain", "bc", check=False).returncode == 0, 30,
             what="BlockCopy in the API discovery")
    out = kubectl("explain", "bc.spec.dest").stdout
    assert "an absolute path of a file" in out and "NBD export" in out, out
    assert "allowed roots" in out, out
    out = kubectl("explain", f"{PLURAL}.status.phase").stdout
    assert "Pending, Queued, Preparing, Copying, Mirrored" in out, out


def test_field_selectors_on_node_and_domain(blockcopies, kubectl, node):
    a = blockcopies.create(copy_spec("dom-a", node=node, dest="/var/lib/libvirt/images/a.qcow2"))
    b = blockcopies.create(copy_spec("dom-b", node=node, dest="/var/lib/libvirt/images/b.qcow2"))
    blockcopies.create(copy_spec("dom-a", node=f"{node}-other",
                                 dest="/var/lib/libvirt/images/c.qcow2"))

    def names(*selector: str) -> set[str]:
        out = kubectl("get", "bc", "-n", blockcopies.namespace, "-o", "name",
                      "--field-selector", ",".join(selector)).stdout.split()
        return {n.split("/")[-1] for n in out}
    assert names(f"spec.nodeName={node}") == {a, b}
    assert names(f"spec.nodeName={node}", "spec.domain=dom-a") == {a}
    # A field that is not selectable is refused by the server, not silently ignored.
    proc = kubectl("get", "bc", "-n", blockcopies.namespace, "--field-selector",
                   "spec.dest=/x", check=False)
    assert proc.returncode != 0 and "field label not supported" in proc.stderr, proc.stderr


IMMUTABLE_CHANGES = {
    "domain": "another-domain",
    "nodeName": "another-node",
    "disk": "vdb",
    "dest": "/var/lib/libvirt/images/elsewhere.qcow2",
    "format": "raw",
    "base": "/var/lib/libvirt/images/base.qcow2",
    "flags": ["synchronousWrites"],
    "granularity": 131072,
    "bufSize": 1048576,
    "backingChain": "copy",
    "group": "g1",
}


def _patch(kubectl, namespace: str, name: str, spec: dict, *extra: str):
    return kubectl("patch", "bc", name, "-n", namespace, "--type=merge",
                   "-p", json.dumps({"spec": spec}), *extra, check=False)


def test_immutable_fields_refused_by_the_api_server_once_the_copy_started(
        agent_factory, node, vms, blockcopies, kubectl):
    vm = vms(layers=1, size="256M", data_per_layer="64M")
    dest = os.path.join(vm.workdir, "copy.qcow2")
    spec = copy_spec(vm, node=node, dest=dest, bandwidth="1Mi")
    name = blockcopies.create(spec)
    ns = blockcopies.namespace

    # Before the copy starts (no agent on that node yet), every field may change, and back
    # (one at a time: together, some would meet the spec's cross-field rules, e.g. a base
    # needs a qcow2 destination).
    restore = {f: spec.get(f) for f in IMMUTABLE_CHANGES}  # None removes the field
    for field, value in IMMUTABLE_CHANGES.items():
        proc = _patch(kubectl, ns, name, {field: value})
        assert proc.returncode == 0, (field, proc.stderr)
        proc = _patch(kubectl, ns, name, {field: restore[field]})
        assert proc.returncode == 0, (field, proc.stderr)
    assert {k: v for k, v in blockcopies.get(name)["spec"].items()
            if k in IMMUTABLE_CHANGES} == {k: v for k, v in restore.items() if v is not None}

    agent_factory(node)
    blockcopies.wait_copying(name)
    generation = blockcopies.get(name)["metadata"]["generation"]

    # Refused by the API server (the agent never sees these edits), with the rule's message.
    for field, value in IMMUTABLE_CHANGES.items():
        proc = _patch(kubectl, ns, name, {field: value})
        assert proc.returncode != 0, field
        assert f"spec.{field} cannot change once the copy started" in proc.stderr, proc.stderr
    assert blockcopies.get(name)["metadata"]["generation"] == generation  # nothing stored
    stored = blockcopies.get(name)["spec"]
    assert stored["dest"] == dest and stored.get("flags") is None

    # The mutable fields still change: abort (server-side dry run: it would end the copy),
    # bandwidth and pivot for real, and the copy then finishes on the destination.
    proc = _patch(kubectl, ns, name, {"abort": True}, "--dry-run=server")
    assert proc.returncode == 0, proc.stderr
    assert _patch(kubectl, ns, name, {"pivot": True}).returncode == 0
    assert _patch(kubectl, ns, name, {"bandwidth": 0}).returncode == 0
    status = blockcopies.wait_phase(name, "Pivoted", timeout=120)
    assert status["source"] == vm.chain[0]
    # The agent never had to refuse anything: the server kept the edits out.
    assert not any(c["type"] == "SpecChangeRefused" for c in status["conditions"])


OTHER_VALUES = {"domain": "d2", "nodeName": "n2", "disk": "vdc",
                "dest": "/var/lib/libvirt/images/y.qcow2", "format": "qcow2", "base": "/b2",
                "flags": ["shallow"], "granularity": 65536, "bufSize": 4096,
                "backingChain": None,  # its only value is "copy": removing it is the change
                "group": "g2"}


@pytest.mark.parametrize("field", sorted(IMMUTABLE_CHANGES))
def test_each_rule_needs_a_started_copy(field, blockcopies, kubectl):
    """The rules key on status.startTime: a status without it (Pending, or Failed before the
    start) leaves the spec editable; with it, the field is frozen. Status written directly
    here (as the agent would) to check every field quickly; the test above does it for real."""
    name = blockcopies.create(copy_spec("d", node=unique_node("nobody"),
                                        dest="/var/lib/libvirt/images/x.qcow2"))
    ns = blockcopies.namespace
    blockcopies.patch_status(name, {"phase": "Failed", "message": "test"})
    assert _patch(kubectl, ns, name, {field: IMMUTABLE_CHANGES[field]}).returncode == 0
    blockcopies.patch_status(name, {"phase": "Copying", "startTime": "2026-01-01T00:00:00Z"})
    proc = _patch(kubectl, ns, name, {field: OTHER_VALUES[field]})
    assert proc.returncode != 0
    assert f"spec.{field} cannot change once the copy started" in proc.stderr, proc.stderr
