"""The chart's README says what the chart installs: every CRD of crds/ (in its table of
objects, its one-source-of-truth list and its uninstall command, as the top README's
uninstall does), the plan controller, and the agent's ClusterRole rule by rule as
templates/clusterrole.yaml grants it (the real API server's view of those rights is
tests/chart/test_helm_install_rbac.py's)."""

from __future__ import annotations

import re

import yaml

from support.paths import CHART, CRDS, ROOT

README = (CHART / "README.md").read_text()
FLOW = re.compile(r"^\s*(?:- )?(apiGroups|resources|verbs):\s*\[(.*)\]\s*$")


def crd_names() -> list[str]:
    return [yaml.safe_load(p.read_text())["metadata"]["name"] for p in sorted(CRDS.glob("*.yaml"))]


def section(text: str, heading: str) -> str:
    return text.partition(f"\n{heading}\n")[2].partition("\n#")[0]


def granted() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verbs) of every rule of the agent's ClusterRole template, the
    conditional ones included."""
    found, rule = set(), {}
    for line in (CHART / "templates" / "clusterrole.yaml").read_text().splitlines():
        if m := FLOW.match(line):
            rule[m[1]] = [v.strip().strip('"') for v in m[2].split(",")]
            if m[1] == "verbs":
                found |= {(g, r, ", ".join(rule["verbs"]))
                          for g in rule["apiGroups"] for r in rule["resources"]}
                rule = {}
    return found


def documented() -> set[tuple[str, str, str]]:
    rows = set()
    for line in section(README, "## RBAC").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("API group", "---"):
            group = "" if cells[0].startswith('""') else cells[0]
            rows.add((group, cells[1], cells[2]))
    return rows


def test_every_crd_is_named_where_the_chart_says_what_it_installs_and_removes():
    created = section(README, "What the chart creates:")
    remove = " ".join(README.partition("To remove everything")[2].partition("\n- ")[0].split())
    top_uninstall = section((ROOT / "README.md").read_text(), "## Uninstall")
    for name in crd_names():
        assert f"`{name}`" in created, name
        assert name in remove, name
        assert name in top_uninstall, name
    truth = README.partition("**One source of truth.**")[2].partition("symbolic link")[0]
    assert set(re.findall(r"`([\w.-]+\.yaml)`", truth)) == {
        p.name for p in CRDS.glob("*.yaml")}


def test_the_plan_controller_is_in_the_list_of_objects():
    created = section(README, "What the chart creates:")
    assert "Deployment" in created and "`controller.enabled`" in created


def test_the_rbac_table_is_the_agents_clusterrole():
    assert ("blockcopy.dev", "blockcopies", "list, watch, patch") in granted()  # the parse
    table = documented()
    # The table may split one rule's verbs over rows (one reason each).
    merged: dict[tuple[str, str], set[str]] = {}
    for group, resource, verbs in table:
        merged.setdefault((group, resource), set()).update(v.strip() for v in verbs.split(","))
    assert merged == {(g, r): set(v.split(", ")) for g, r, v in granted()}
