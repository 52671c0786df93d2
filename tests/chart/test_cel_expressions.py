"""CEL shipped with the chart, evaluated quickly with cel-python for every case: the optional
spec guard (ValidatingAdmissionPolicy; the real API server enforces it in
test_helm_install_rbac.py) and the Flux health-check expressions that deploy/argocd/README.md
recommends (Flux evaluates them; no Flux runs here)."""

from __future__ import annotations

import celpy
import pytest
import yaml

from blockcopy.model.api import FINALIZER, GROUP, KIND, NODE_LABEL, PLURAL, VERSION
from support.helm import one
from support.paths import ROOT

ENV = celpy.Environment()
SPEC = {"domain": "vm", "disk": "vda", "dest": "/var/lib/libvirt/images/c.qcow2",
        "pivot": False}


def evaluate(expression: str, activation: dict) -> bool:
    program = ENV.program(ENV.compile(expression))
    return bool(program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()}))


# ------------------------------------------------------------------ spec guard

@pytest.fixture(scope="module")
def policy(helm) -> dict:
    docs = helm.render("--set", "specGuard.enabled=true", namespace="vm-ops", release="bc")
    return one(docs, "ValidatingAdmissionPolicy")


def admitted(policy: dict, username: str, old: dict, new: dict) -> bool:
    """What the API server decides for an UPDATE: every matchCondition true -> validations."""
    activation = {"request": {"userInfo": {"username": username}, "operation": "UPDATE"},
                  "object": new, "oldObject": old}
    if not all(evaluate(c["expression"], activation) for c in policy["spec"]["matchConditions"]):
        return True
    return all(evaluate(v["expression"], activation) for v in policy["spec"]["validations"])


AGENT = "system:serviceaccount:vm-ops:bc-blockcopy-operator"


def bc(spec: dict, labels: dict | None = None, finalizers: list | None = None) -> dict:
    return {"metadata": {"name": "x", "labels": labels or {}, "finalizers": finalizers or []},
            "spec": spec}


def test_spec_guard_targets_the_main_resource_only(policy):
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == [PLURAL] and rule["operations"] == ["UPDATE"]
    assert rule["apiGroups"] == [GROUP]


def test_spec_guard_lets_the_agent_claim_and_finalize(policy):
    old = bc(SPEC)
    assert admitted(policy, AGENT, old, bc(SPEC, labels={NODE_LABEL: "n1"}))
    assert admitted(policy, AGENT, old, bc(SPEC, finalizers=[FINALIZER]))


@pytest.mark.parametrize("change", [{"pivot": True}, {"abort": True},
                                    {"dest": "/var/lib/libvirt/images/other.qcow2"}])
def test_spec_guard_refuses_spec_writes_by_the_agent(policy, change):
    assert not admitted(policy, AGENT, bc(SPEC), bc({**SPEC, **change}))


def test_spec_guard_leaves_everyone_else_alone(policy):
    # Users and GitOps controllers (and an agent of another release) change spec as they like.
    for user in ("alice", "system:serviceaccount:argocd:argocd-application-controller",
                 "system:serviceaccount:other-ns:bc-blockcopy-operator"):
        assert admitted(policy, user, bc(SPEC), bc({**SPEC, "pivot": True}))


# ------------------------------------------------------------------ Flux health checks

def flux_exprs() -> dict:
    readme = (ROOT / "deploy" / "argocd" / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```yaml")[1:]]
    (kustomization,) = [yaml.safe_load(b) for b in blocks if "kind: Kustomization" in b]
    (exprs,) = kustomization["spec"]["healthCheckExprs"]
    assert (exprs["apiVersion"], exprs["kind"]) == (f"{GROUP}/{VERSION}", KIND)
    return exprs


def flux_verdict(obj: dict) -> str:
    """Flux's order: inProgress, then failed, then current (first true wins)."""
    exprs = flux_exprs()
    for verdict in ("inProgress", "failed", "current"):
        if evaluate(exprs[verdict], obj):
            return verdict
    return "none"


@pytest.mark.parametrize("phase, pivot, expected", [
    ("Pending", False, "inProgress"),
    ("Queued", False, "inProgress"),
    ("Preparing", False, "inProgress"),
    ("Copying", False, "inProgress"),
    ("Mirrored", False, "current"),       # waits for the user's commit: not a hang
    ("Mirrored", True, "inProgress"),
    ("Pivoting", True, "inProgress"),
    ("Pivoted", True, "current"),
    ("Aborting", False, "inProgress"),
    ("Aborted", False, "current"),
    ("Failed", False, "failed"),
])
def test_flux_health_expressions(phase, pivot, expected):
    obj = {"metadata": {"name": "x", "generation": 1}, "spec": {**SPEC, "pivot": pivot},
           "status": {"phase": phase, "observedGeneration": 1}}
    assert flux_verdict(obj) == expected


def test_flux_health_without_pivot_field():
    spec = {k: v for k, v in SPEC.items() if k != "pivot"}
    obj = {"metadata": {"name": "x"}, "spec": spec, "status": {"phase": "Mirrored"}}
    assert flux_verdict(obj) == "current"
