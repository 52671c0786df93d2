"""The API's names (blockcopy.model.api, .inventory) where files that cannot import them
spell them out: the RBAC and admission rules of the chart's templates (BlockCopies,
DiskInventories), the examples, and the audit policy of hack/cluster-up.sh (`make bench`
counts the agent's requests from it). The CRD's names are checked by test_crd.py; the
rendered chart (helm) by tests/chart."""

from __future__ import annotations

import re

import pytest
import yaml

from blockcopy.model.api import GROUP, KIND, PLURAL, VERSION
from blockcopy.model.inventory import INVENTORY_PLURAL
from blockcopy.model.plan import PLAN_KIND, PLAN_PLURAL
from support.paths import CHART, EXAMPLES, HACK

TEMPLATES = sorted((CHART / "templates").glob("*.yaml"))
RULE_LIST = re.compile(r"^\s*(?:- )?(apiGroups|resources):\s*\[(.*)\]\s*$")


def rules(text: str) -> list[tuple[list[str], list[str]]]:
    """(apiGroups, resources) of each rule of a template, from its flow lists."""
    found: list[tuple[list[str], list[str]]] = []
    groups: list[str] | None = None
    for line in text.splitlines():
        m = RULE_LIST.match(line)
        if not m:
            continue
        values = [v.strip().strip('"') for v in m[2].split(",")]
        if m[1] == "apiGroups":
            groups = values
        elif groups is not None:
            found.append((groups, values))
            groups = None
    return found


def ours(group: str) -> bool:
    return group not in ("", "*") and not group.endswith(".k8s.io")


def test_every_rule_of_the_chart_names_our_group_and_resources_as_the_code_does():
    named = {}
    for template in TEMPLATES:
        for groups, resources in rules(template.read_text()):
            for group in filter(ours, groups):
                assert group == GROUP, f"{template.name}: apiGroups {groups}"
                assert set(resources) <= {PLURAL, f"{PLURAL}/status", INVENTORY_PLURAL,
                                          f"{INVENTORY_PLURAL}/status", PLAN_PLURAL,
                                          f"{PLAN_PLURAL}/status"}, \
                    f"{template.name}: resources {resources}"
                named[template.name] = resources
    # The agent's ClusterRole, the user roles, the admission policy, the spec guard and the
    # plan controller's ClusterRole.
    assert set(named) == {"clusterrole.yaml", "userroles.yaml", "admissionpolicy.yaml",
                          "specguard.yaml", "controller.yaml"}, named


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_the_examples_are_objects_of_this_api(example):
    docs = [d for d in yaml.safe_load_all(example.read_text()) if d]
    assert docs and all(d["apiVersion"] == f"{GROUP}/{VERSION}" and d["kind"] in (KIND, PLAN_KIND)
                        for d in docs)


def test_the_audit_policy_of_the_local_cluster_logs_our_group():
    script = (HACK / "cluster-up.sh").read_text()
    policy = yaml.safe_load(script.split("audit-policy.yaml.tmp\" <<'EOF'\n", 1)[1]
                            .split("\nEOF\n", 1)[0])
    (logged,) = [r for r in policy["rules"] if r["level"] == "Metadata"]
    assert {"group": GROUP} in logged["resources"]
