"""The chart's Grafana dashboard (charts/blockcopy-operator/dashboards/blockcopy.json): a valid
dashboard (schema version, templating, panels with a data source and queries), shipped as a
ConfigMap for Grafana's sidecar only when asked, and every PromQL query naming only metrics,
and labels, that the agent really exports: offline against prometheus-client's registry once
blockcopy.adapters.metrics is imported, and (e2e) against the /metrics of a real agent process
scraped during a real copy and a real failure; the chart's alert rules
(templates/prometheusrule.yaml, tests/chart/test_prometheusrule.py) against the same scrape."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import kubernetes_validate
import pytest

from support import promql
from support.agents import free_port, http_get
from support.helm import by_kind, one
from support.objects import copy_spec
from support.paths import CHART
from support.promql import exported, parse
from support.waits import wait_for

DASHBOARD = CHART / "dashboards" / "blockcopy.json"
DS = {"type": "prometheus", "uid": "${datasource}"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> Iterator[dict]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(board: dict) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and templating query."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
            assert m, var
            yield f"variable {var['name']}", f"{m[1]}{{{m[2]}!=\"\"}}"


def check_queries(board: dict, metrics: dict[str, set[str]], *, labels: bool) -> set[str]:
    return promql.check(queries(board), metrics, labels=labels)


def alert_exprs(helm) -> list[tuple[str, str]]:
    """(where, PromQL) of every alert of the chart's PrometheusRule."""
    docs = helm.render("--set", "metrics.prometheusRule.enabled=true")
    (rule,) = by_kind(docs, "PrometheusRule")
    return [(f"alert {r['alert']}", r["expr"]) for group in rule["spec"]["groups"]
            for r in group["rules"]]


# ------------------------------------------------------------------ the JSON


def test_dashboard_is_a_grafana_dashboard():
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["uid"] == "blockcopy-operator" and board["title"] and board["id"] is None
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["node"]["includeAll"] and variables["node"]["allValue"] == ".*"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    drawn = [p for p in panels(board) if p["type"] != "row"]
    assert len(drawn) >= 10
    for panel in drawn:
        assert panel["type"] in {"timeseries", "stat", "table", "bargauge", "gauge"}, panel
        assert panel["datasource"] == DS, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DS and target["expr"].strip(), panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        assert panel["description"]
    # No two panels overlap.
    cells = {}
    for panel in panels(board):
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[(x, y)] = panel["title"]


def test_every_metric_of_the_agent_has_a_panel():
    used = {name for _, expr in queries(dashboard())
            for name, _ in parse(expr)["selectors"]}
    for family in ("blockcopy_objects", "blockcopy_copied_bytes_total",
                   "blockcopy_copy_duration_seconds_bucket",
                   "blockcopy_mirror_duration_seconds_bucket",
                   "blockcopy_pivot_latency_seconds_bucket", "blockcopy_errors_total",
                   "blockcopy_watch_events_total", "blockcopy_copy_bytes_total",
                   "blockcopy_copy_eta_seconds", "blockcopy_not_converging",
                   "blockcopy_libvirt_up", "blockcopy_build_info"):
        assert family in used, family
    grouped = {g for _, expr in queries(dashboard()) for g in parse(expr)["grouping"]}
    assert {"phase", "reason", "le", "stream", "owner", "blockcopy_namespace",
            "blockcopy_name", "version"} <= grouped


def test_the_query_reader_rejects_what_it_should():
    assert parse('sum by (phase) (blockcopy_objects{node=~"$node"})') == {
        "selectors": [("blockcopy_objects", {"node"})], "grouping": {"phase"},
        "functions": {"sum"}}
    for bad in ("sum(rate(x[5m])", 'nosuchfn(x)', '{__name__="x"}', "x{a=b}"):
        with pytest.raises(AssertionError):
            parse(bad)
    with pytest.raises(AssertionError, match="blockcopy_copied_bytes is not exported"):
        check_queries({"panels": [{"title": "t", "targets": [
            {"refId": "A", "expr": "rate(blockcopy_copied_bytes[5m])"}]}],
            "templating": {"list": []}}, {"blockcopy_copied_bytes_total": set()},
            labels=False)


def test_queries_name_metrics_of_the_agents_registry():
    # Offline: the names blockcopy.adapters.metrics registers (the e2e test below scrapes a
    # real agent).
    from prometheus_client import REGISTRY, generate_latest

    import blockcopy.adapters.metrics  # noqa: F401  (registers the agent's metrics)
    check_queries(dashboard(), exported(generate_latest(REGISTRY).decode()), labels=False)


# ------------------------------------------------------------------ the ConfigMap


def test_configmap_only_when_enabled(helm):
    assert by_kind(helm.render(), "ConfigMap") == []
    docs = helm.render("--set", "dashboard.enabled=true")
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["name"] == "bc-blockcopy-operator-dashboard"
    assert cm["metadata"]["namespace"] == "blockcopy-system"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["labels"]["app.kubernetes.io/instance"] == "bc"
    assert "annotations" not in cm["metadata"]
    (key,) = cm["data"]
    assert key.endswith(".json") and json.loads(cm["data"][key]) == dashboard()
    kubernetes_validate.validate(cm, kubernetes_validate.utils.latest_version(), strict=True)


def test_configmap_labels_annotations_and_namespace(helm):
    docs = helm.render("--set", "dashboard.enabled=true", "--set", "dashboard.namespace=monitoring",
                       "--set-json", 'dashboard.labels={"grafana_dashboard":null,"team":"storage"}',
                       "--set", "dashboard.annotations.grafana_folder=Storage")
    cm = one(docs, "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["team"] == "storage"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Storage"}


@pytest.mark.parametrize("args, message", [
    (["--set", "dashboard.enabled=maybe"], "dashboard"),
    (["--set", "dashboard.enabeld=true"], "enabeld"),
    (["--set-json", 'dashboard.labels={"grafana_dashboard":1}'], "grafana_dashboard"),
    (["--set", "dashboard.namespace=Not_A_Namespace"], "namespace"),
])
def test_schema_rejects_bad_dashboard_values(helm, args, message):
    stderr = helm.schema_refusal(*args)
    assert message in stderr, stderr


def test_dashboard_needs_metrics(helm):
    proc = helm.template("--set", "dashboard.enabled=true", "--set", "metrics.enabled=false",
                         check=False)
    assert proc.returncode != 0 and "dashboard.enabled needs metrics.enabled" in proc.stderr


# ------------------------------------------------------------------ against a real agent


@pytest.mark.e2e
def test_queries_name_only_what_a_real_agent_exports(agent_factory, node, vms, blockcopies,
                                                     helm):
    """Scrape a real agent while a copy runs (the per-copy gauges exist only then) after a
    failure (errors_total gets its reason label): every query's and every alert's metrics
    and labels exist, and no label of the agent's is one Prometheus gives the target."""
    port = free_port()
    agent_factory(node, extra_args=["--metrics-port", str(port)])
    vm = vms("dashboard", size="256M", data_per_layer="64M")  # 128 MiB to copy
    bad = blockcopies.create(copy_spec(vm, node=node, dest="/tmp/outside-the-roots.qcow2"))
    blockcopies.wait_phase(bad, "Failed")
    name = blockcopies.create(copy_spec(vm, node=node, dest=os.path.join(vm.workdir, "c.qcow2"),
                                        bandwidth="8Mi"))

    def scrape_with_every_family():
        metrics = exported(http_get(port, "/metrics")[1])
        wanted = ("blockcopy_copy_bytes_total", "blockcopy_copy_eta_seconds",
                  "blockcopy_not_converging", "blockcopy_errors_total",
                  "blockcopy_watch_events_total", "blockcopy_build_info")
        return metrics if all(metrics.get(w) for w in wanted) else None
    metrics = wait_for(scrape_with_every_family, 90, interval=0.5,
                       what="a scrape with every labelled family")
    for per_copy in ("blockcopy_copy_bytes_total", "blockcopy_copy_eta_seconds",
                     "blockcopy_not_converging"):
        assert metrics[per_copy] == {"blockcopy_namespace", "blockcopy_name"}, per_copy
    assert metrics["blockcopy_errors_total"] == {"reason"}
    assert metrics["blockcopy_build_info"] == {"version", "python_version", "libvirt_python"}
    assert "blockcopy_libvirt_up" in metrics
    clashing = {name: labels & promql.TARGET_LABELS for name, labels in metrics.items()
                if labels & promql.TARGET_LABELS}
    assert clashing == {}, clashing
    used = check_queries(dashboard(), metrics, labels=True)
    assert {m for m in used if m.startswith("blockcopy_")} == used
    used = promql.check(alert_exprs(helm), metrics, labels=True)
    assert used == {"up", "blockcopy_libvirt_up", "blockcopy_objects",
                    "blockcopy_not_converging", "blockcopy_copy_bytes_total"}
    blockcopies.patch_spec(name, {"abort": True})
    blockcopies.wait_phase(name, "Aborted", timeout=120)
