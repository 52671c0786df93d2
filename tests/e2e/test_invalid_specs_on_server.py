"""Every invalid spec the agent knows (tests/support/invalid_specs.py) refused by a real API
server at admission, with the message the table gives: the CRD's OpenAPI schema and CEL rules
as the server compiles, costs and runs them. And the other way round: of the fuzz test's
random specs, every one the agent refuses is refused by the server too.

The CRD is this checkout's crds/blockcopy.yaml under a group of this module's own (as in
test_crd_on_server.py): on a cluster shared by several checkouts, another one applying its
version of blockcopies.blockcopy.dev cannot change what is tested here. Creates are dry
runs except where a user's path needs a stored object (an edit)."""

from __future__ import annotations

import copy
import json
import types
import uuid
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings

from blockcopy.model.api import GROUP, KIND, PLURAL, VERSION, SpecError, parse_spec
from support import isolation
from support.cluster import custom_objects
from support.invalid_specs import INVALID, VALID, Invalid, spec
from support.paths import CRD
from support.waits import named, wait_for

FUZZ_EXAMPLES = 600


@pytest.fixture(scope="module")
def group(kubectl) -> Iterator[str]:
    """This module's copy of the CRD, established, under a group of its own."""
    group = f"t{uuid.uuid4().hex[:8]}.{GROUP}"
    crd = yaml.safe_load(CRD.read_text())
    crd["metadata"]["name"] = f"{PLURAL}.{group}"
    crd["spec"]["group"] = group
    name = crd["metadata"]["name"]
    proc = kubectl("create", "-f", "-", input=yaml.safe_dump(crd), check=False)
    assert proc.returncode == 0, proc.stderr
    try:
        kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
        yield group
    finally:
        kubectl("delete", "crd", name, "--ignore-not-found", "--wait=false")


@pytest.fixture(scope="module")
def api(cluster) -> kubernetes.client.CustomObjectsApi:
    """The admin's client, without conftest's api fixture: that one applies the shared CRD,
    which this module does not need."""
    return custom_objects(cluster)


@pytest.fixture(scope="module")
def namespace(kubectl) -> Iterator[str]:
    name = isolation.create_namespace(kubectl)
    yield name
    kubectl("delete", "namespace", name, "--wait=false")


def _body(group: str, raw: Any, name: str | None = None) -> dict[str, Any]:
    return {"apiVersion": f"{group}/{VERSION}", "kind": KIND,
            "metadata": {"name": name or f"bad-{uuid.uuid4().hex[:6]}"}, "spec": raw}


def _refusal(api, group: str, namespace: str, raw: Any) -> str | None:
    """None if the server admits it (dry run), else its refusal."""
    try:
        api.create_namespaced_custom_object(group, VERSION, namespace, PLURAL,
                                            _body(group, raw), dry_run="All")
    except kubernetes.client.ApiException as exc:
        assert exc.status in (400, 422), (exc.status, exc.body)
        return str(json.loads(exc.body)["message"])
    return None


@pytest.mark.parametrize("row", INVALID, ids=lambda r: r.id)
def test_refused_at_admission_with_its_message(row: Invalid, api, group, namespace):
    refusal = _refusal(api, group, namespace, row.spec)
    assert refusal is not None, f"{row.id}: admitted"
    assert row.server in refusal, refusal


@pytest.mark.parametrize("raw", VALID, ids=lambda raw: str(sorted(raw.items()))[:80])
def test_the_valid_edges_are_admitted(raw: dict[str, Any], api, group, namespace):
    assert _refusal(api, group, namespace, raw) is None


def test_kubectl_apply_says_why(group, namespace, kubectl):
    """What a user sees: kubectl apply fails, nothing is stored, the message names the rule."""
    body = _body(group, spec(base="/var/lib/libvirt/images/base.qcow2", flags=["shallow"]),
                 name="shallow")
    proc = kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body),
                   check=False)
    assert proc.returncode != 0
    assert "spec.base and the shallow flag cannot be combined" in proc.stderr, proc.stderr
    proc = kubectl("get", f"{PLURAL}.{group}", "shallow", "-n", namespace, check=False)
    assert proc.returncode != 0 and "NotFound" in proc.stderr, proc.stderr


def test_an_edit_to_pivot_and_abort_at_once_is_refused(group, namespace, kubectl):
    """pivot: true set early, then abort: true: refused until pivot is set back to false
    (the agent would let abort win; the server says so instead of guessing)."""
    resource = f"{PLURAL}.{group}"
    kubectl("apply", "-n", namespace, "-f", "-",
            input=yaml.safe_dump(_body(group, spec(pivot=True), name="armed")))

    def patch(fields: dict[str, Any]):
        return kubectl("patch", resource, "armed", "-n", namespace, "--type=merge",
                       "-p", json.dumps({"spec": fields}), check=False)
    proc = patch({"abort": True})
    assert proc.returncode != 0
    assert "spec.pivot and spec.abort cannot both be true" in proc.stderr, proc.stderr
    proc = patch({"abort": True, "pivot": False})
    assert proc.returncode == 0, proc.stderr
    stored = json.loads(kubectl("get", resource, "armed", "-n", namespace, "-o",
                                "json").stdout)["spec"]
    assert (stored["pivot"], stored["abort"]) == (False, True)


def test_every_fuzz_spec_the_agent_refuses_is_refused_at_admission(api, group, namespace):
    """The fuzz test's strategies (paths with .., NBD URIs, quantities, any Unicode, values of
    any type), without a VM: whatever parse_spec refuses, the API server must refuse too;
    the other way round is allowed (the CRD is stricter in places, invalid_specs.py)."""
    from e2e.test_fuzz_api import strategies

    vm = types.SimpleNamespace(name="bct-fuzz-vm", uuid=str(uuid.uuid4()),
                               chain=["/var/lib/libvirt/images/t/vm/top.qcow2",
                                      "/var/lib/libvirt/images/t/vm/base.qcow2"],
                               workdir="/var/lib/libvirt/images/t/vm")
    top = "/var/lib/libvirt/images/t"
    ground = {"vm": vm, "allowed": f"{top}/allowed", "outside": "/srv/outside",
              "lookalike": f"{top}/allowed-not", "sentinel": "/srv/sentinel", "top": top,
              "tmp_prefix": "/tmp/bct-fuzz", "closed_port": 1, "nbd_dir": "/run/bct-nbd",
              "victims": ["/srv/outside/victim.qcow2"]}
    slipped: list[tuple[Any, str]] = []
    counts = {"agent refused": 0}

    @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(raw=strategies(ground, "node-a", "node-b"))
    def check(raw: Any) -> None:
        try:
            parse_spec(raw)
            return
        except SpecError as exc:
            why = str(exc)
        counts["agent refused"] += 1
        if _refusal(api, group, namespace, raw) is None:
            slipped.append((raw, why))

    check()
    assert counts["agent refused"] > FUZZ_EXAMPLES // 10
    assert slipped == [], slipped[:10]


def test_the_module_used_its_own_copy_of_the_crd(group, kubectl):
    served = json.loads(kubectl("get", "crd", f"{PLURAL}.{group}", "-o", "json").stdout)
    mine = copy.deepcopy(yaml.safe_load(CRD.read_text()))
    schema = mine["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert served["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
        "spec"] == schema


def test_an_object_admitted_before_the_rules_can_still_be_finished(kubectl, api, namespace):
    """Upgrading the CRD does not lock objects in: one created under a CRD without the spec
    rules (an older release) keeps taking what the agent writes (status, the claim label,
    its finalizer's removal) once the rules are there (the API server ratchets unchanged
    invalid fields, Kubernetes >= 1.30), so it can fail with InvalidSpec, be repaired by its
    user, and be deleted."""
    group = f"t{uuid.uuid4().hex[:8]}.{GROUP}"
    crd = yaml.safe_load(CRD.read_text())
    crd["metadata"]["name"] = name = f"{PLURAL}.{group}"
    crd["spec"]["group"] = group
    old = copy.deepcopy(crd)
    old_spec = old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    old_spec.pop("x-kubernetes-validations")
    for prop in old_spec["properties"].values():
        prop.pop("x-kubernetes-validations", None)
    resource = f"{PLURAL}.{group}"
    kubectl("create", "-f", "-", input=yaml.safe_dump(old))
    try:
        kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
        bad = spec(bandwidth="fast", pivot=True, abort=True)
        body = {**_body(group, bad, name="old"),
                "metadata": {"name": "old", "finalizers": ["blockcopy.dev/cancel-job"]}}
        kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))
        kubectl("replace", "-f", "-", input=yaml.safe_dump(
            {**crd, "metadata": {**crd["metadata"], "resourceVersion": json.loads(kubectl(
                "get", "crd", name, "-o", "json").stdout)["metadata"]["resourceVersion"]}}))
        # The rules are served: the same spec is refused for a new object. The API server
        # takes the updated CRD's schema up asynchronously (its storage for the resource is
        # rebuilt after the update is stored), so a create right after the replace may still
        # meet the old one: wait for the refusal (the soak's first repetition: admitted once).
        wait_for(named("the updated CRD's rules served",
                       lambda: _refusal(api, group, namespace, bad)), timeout=30)
        # What the agent writes still goes through.
        api.patch_namespaced_custom_object_status(
            group, VERSION, namespace, PLURAL, "old",
            {"status": {"phase": "Failed", "message": "invalid spec: bandwidth 'fast' ..."}})
        kubectl("label", resource, "old", "-n", namespace, "blockcopy.dev/node=n1")
        # A user's edit that repairs the spec is admitted.
        kubectl("patch", resource, "old", "-n", namespace, "--type=merge",
                "-p", json.dumps({"spec": {"bandwidth": "1Mi", "pivot": False}}))
        kubectl("patch", resource, "old", "-n", namespace, "--type=json",
                "-p", json.dumps([{"op": "remove", "path": "/metadata/finalizers"}]))
        kubectl("delete", resource, "old", "-n", namespace, "--timeout=30s")
    finally:
        kubectl("delete", "crd", name, "--ignore-not-found", "--wait=false")
