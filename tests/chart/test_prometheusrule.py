"""The chart's optional PrometheusRule (templates/prometheusrule.yaml): rendered only when
asked, with the alerts a user of the agent needs (agent down, libvirt unreachable, copies
Failed, a copy not converging, a copy stuck), each expression naming only series the agent
exports (offline here, against prometheus-client's registry; against a real agent's /metrics
in tests/chart/test_dashboard.py's e2e test) and selecting the chart's own metrics job."""

from __future__ import annotations

import re

import pytest

from support import promql
from support.helm import by_kind, one

ALERTS = {"BlockCopyAgentDown", "BlockCopyLibvirtUnreachable", "BlockCopyFailed",
          "BlockCopyNotConverging", "BlockCopyStuck"}


def rule(helm, *args: str) -> dict:
    return one(helm.render("--set", "metrics.prometheusRule.enabled=true", *args),
               "PrometheusRule")


def test_only_when_enabled(helm):
    assert by_kind(helm.render(), "PrometheusRule") == []


def test_the_alerts(helm):
    docs = helm.render("--set", "metrics.prometheusRule.enabled=true",
                       "--set", "metrics.prometheusRule.labels.release=kps")
    pr = one(docs, "PrometheusRule")
    assert pr["apiVersion"] == "monitoring.coreos.com/v1"
    assert pr["metadata"]["name"] == "bc-blockcopy-operator"
    assert pr["metadata"]["namespace"] == "blockcopy-system"
    assert pr["metadata"]["labels"]["release"] == "kps"
    assert pr["metadata"]["labels"]["app.kubernetes.io/instance"] == "bc"
    rules = [r for group in pr["spec"]["groups"] for r in group["rules"]]
    assert {r["alert"] for r in rules} == ALERTS
    service = one(docs, "Service")["metadata"]["name"]
    for r in rules:
        assert r["labels"]["severity"] in {"warning", "critical"}, r
        assert r["annotations"]["summary"] and r["annotations"]["description"], r
        # Each one selects the chart's own agents: the job a ServiceMonitor gives the
        # metrics Service's targets.
        assert set(re.findall(r'job="([^"]*)"', r["expr"])) == {service}, r["expr"]
        if "for" in r:
            assert re.fullmatch(r"\d+m", r["for"]), r
        # Prometheus expands annotations as Go templates: helm leaves $labels to it, and a
        # per-copy alert names the BlockCopy by the agent's labels.
        if "blockcopy_not_converging" in r["expr"]:
            assert "{{ $labels.blockcopy_namespace }}/{{ $labels.blockcopy_name }}" in \
                r["annotations"]["description"], r


def test_expressions_name_what_the_agent_exports(helm):
    from prometheus_client import REGISTRY, generate_latest

    import blockcopy.adapters.metrics  # noqa: F401  (registers the agent's metrics)
    exprs = [(r["alert"], r["expr"]) for group in rule(helm)["spec"]["groups"]
             for r in group["rules"]]
    used = promql.check(exprs, promql.exported(generate_latest(REGISTRY).decode()),
                        labels=False)
    assert "blockcopy_libvirt_up" in used and "blockcopy_copy_bytes_total" in used
    with pytest.raises(AssertionError, match="blockcopy_copy_rate is not exported"):
        promql.check([("x", "rate(blockcopy_copy_rate[5m]) == 0")], {}, labels=False)


@pytest.mark.parametrize("args, message", [
    (["--set", "metrics.prometheusRule.enabled=yes"], "prometheusRule"),
    (["--set", "metrics.prometheusRule.enabeld=true"], "enabeld"),
    (["--set-json", 'metrics.prometheusRule.labels={"release":1}'], "release"),
])
def test_schema_rejects_bad_values(helm, args, message):
    stderr = helm.schema_refusal(*args)
    assert message in stderr, stderr


def test_needs_metrics(helm):
    proc = helm.template("--set", "metrics.prometheusRule.enabled=true",
                         "--set", "metrics.enabled=false", check=False)
    assert proc.returncode != 0
    assert "metrics.prometheusRule.enabled needs metrics.enabled" in proc.stderr
