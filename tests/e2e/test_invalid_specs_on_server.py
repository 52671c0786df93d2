"""Every invalid spec the agent knows (tests/support/invalid_specs.py) refused by a real API
server at admission, with the message the table gives: the CRD's OpenAPI schema and CEL rules
as the server compiles, costs and runs them. Creates are server-side dry runs in the test's
namespace (nothing is stored); the user's own path (kubectl apply, an edit of a live object)
is run for real too."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
import yaml

from blockcopy.model.api import GROUP, KIND, PLURAL, VERSION
from support import isolation
from support.invalid_specs import INVALID, VALID, Invalid, spec
from support.isolation import unique_node
from support.paths import CRD

SPEC_SCHEMA = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"][
    "openAPIV3Schema"]["properties"]["spec"]


def _served_spec_schema(kubectl) -> dict:
    crd = json.loads(kubectl("get", "crd", f"{PLURAL}.{GROUP}", "-o", "json").stdout)
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


@pytest.fixture(scope="module")
def dry_runs(api, kubectl) -> Iterator[str]:
    """One namespace for the dry runs. The server must serve this checkout's spec schema,
    before and after: on a cluster shared by several checkouts, another one may apply its
    own CRD meanwhile, and then this module's results say nothing (re-run it)."""
    name = isolation.create_namespace(kubectl)
    assert _served_spec_schema(kubectl) == SPEC_SCHEMA, \
        "the API server serves another checkout's CRD: apply this one and re-run"
    yield name
    isolation.release_namespace(api, kubectl, name)
    assert _served_spec_schema(kubectl) == SPEC_SCHEMA, \
        "another checkout applied its CRD during this run: re-run"


def _dry_run_create(api, namespace: str, raw: Any) -> str | None:
    """None if the server admits it, else its refusal."""
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": f"bad-{uuid.uuid4().hex[:6]}"}, "spec": raw}
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body,
                                            dry_run="All")
    except kubernetes.client.ApiException as exc:
        assert exc.status == 422, (exc.status, exc.body)
        return str(json.loads(exc.body)["message"])
    return None


@pytest.mark.parametrize("row", INVALID, ids=lambda r: r.id)
def test_refused_at_admission_with_its_message(row: Invalid, api, dry_runs):
    refusal = _dry_run_create(api, dry_runs, row.spec)
    assert refusal is not None, f"{row.id}: admitted"
    assert row.server in refusal, refusal


@pytest.mark.parametrize("raw", VALID, ids=lambda raw: str(sorted(raw.items()))[:80])
def test_the_valid_edges_are_admitted(raw: dict[str, Any], api, dry_runs):
    assert _dry_run_create(api, dry_runs, raw) is None


def test_kubectl_apply_says_why(blockcopies, kubectl):
    """What a user sees: kubectl apply fails, nothing is stored, the message names the rule."""
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "shallow"},
            "spec": spec(base="/var/lib/libvirt/images/base.qcow2", flags=["shallow"],
                         nodeName=unique_node("nobody"))}
    proc = kubectl("apply", "-n", blockcopies.namespace, "-f", "-",
                   input=yaml.safe_dump(body), check=False)
    assert proc.returncode != 0
    assert "spec.base and the shallow flag cannot be combined" in proc.stderr, proc.stderr
    assert not blockcopies.exists("shallow")


def test_an_edit_to_pivot_and_abort_at_once_is_refused(blockcopies, kubectl):
    """pivot: true set early, then abort: true: refused until pivot is set back to false
    (the agent would let abort win; the server says so instead of guessing)."""
    name = blockcopies.create(spec(nodeName=unique_node("nobody"), pivot=True))
    proc = kubectl("patch", "bc", name, "-n", blockcopies.namespace, "--type=merge",
                   "-p", json.dumps({"spec": {"abort": True}}), check=False)
    assert proc.returncode != 0
    assert "spec.pivot and spec.abort cannot both be true" in proc.stderr, proc.stderr
    proc = kubectl("patch", "bc", name, "-n", blockcopies.namespace, "--type=merge",
                   "-p", json.dumps({"spec": {"abort": True, "pivot": False}}), check=False)
    assert proc.returncode == 0, proc.stderr
    stored = blockcopies.get(name)["spec"]
    assert (stored["pivot"], stored["abort"]) == (False, True)
