"""Reading PromQL well enough to check the chart's dashboard and alerts against what the agent
exports: which metrics and labels an expression selects and groups by, and the sample names
and labels of a Prometheus text exposition (a real agent's /metrics, or the registry's)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# Labels a series gets from Prometheus, not from the agent: the target's (instance, job), those
# a ServiceMonitor adds (namespace, pod, service, container, endpoint) and the chart's
# relabeling (node). A scraped label that clashes with one of them would be renamed
# exported_<name>: the agent's own labels must not be among them.
TARGET_LABELS = {"instance", "job", "namespace", "pod", "service", "container", "endpoint",
                 "node"}
# Series Prometheus makes for every target, with only the target's labels.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

FUNCTIONS = {"abs", "absent", "ceil", "changes", "clamp_max", "clamp_min", "delta", "deriv",
             "exp", "floor", "histogram_quantile", "idelta", "increase", "irate",
             "label_join", "label_replace", "ln", "max_over_time", "min_over_time",
             "avg_over_time", "rate", "resets", "round", "scalar", "sort", "sort_desc",
             "time", "timestamp", "vector", "last_over_time"}
AGGREGATIONS = {"sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk",
                "quantile", "count_values", "group"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
OPERATORS = {"and", "or", "unless", "bool", "offset"}

TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<range>\[[^\]]+\])
  | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}])
""", re.X)


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        assert m, f"cannot read {expr[pos:]!r} in {expr!r}"
        pos = m.end()
        if m.lastgroup != "ws":
            out.append((str(m.lastgroup), m.group()))
    return out


def parse(expr: str) -> dict[str, Any]:
    """What a PromQL expression uses: its selectors (metric name, label names matched), the
    labels it groups by, and its functions. Fails on what it cannot read (an unbalanced
    bracket, an unknown function, a matcher without a metric name)."""
    toks, i = tokens(expr), 0
    found: dict[str, Any] = {"selectors": [], "grouping": set(), "functions": set()}
    depth = 0
    while i < len(toks):
        kind, text = toks[i]
        after = toks[i + 1][1] if i + 1 < len(toks) else None
        if kind == "ident" and text in GROUPING and after == "(":
            j = i + 2
            while toks[j][1] != ")":
                if toks[j][0] == "ident":
                    found["grouping"].add(toks[j][1])
                else:
                    assert toks[j][1] == ",", expr
                j += 1
            i = j + 1
            continue
        if kind == "ident" and after == "(":
            assert text in FUNCTIONS | AGGREGATIONS, f"unknown function {text} in {expr}"
            found["functions"].add(text)
        elif kind == "ident" and text in AGGREGATIONS and after in GROUPING:
            found["functions"].add(text)
        elif kind == "ident" and text not in OPERATORS:
            labels: set[str] = set()
            j = i + 1
            if after == "{":
                j = i + 2
                while toks[j][1] != "}":
                    (k1, label), (_, op), (k3, _value) = toks[j:j + 3]
                    assert k1 == "ident" and op in ("=", "!=", "=~", "!~") and k3 == "string", \
                        f"bad matcher in {expr}"
                    labels.add(label)
                    j += 3
                    if toks[j][1] == ",":
                        j += 1
                j += 1
            found["selectors"].append((text, labels))
            i = j
            continue
        elif text == "{":
            raise AssertionError(f"a selector without a metric name in {expr}")
        elif text == "(":
            depth += 1
        elif text == ")":
            depth -= 1
            assert depth >= 0, f"unbalanced ) in {expr}"
        i += 1
    assert depth == 0, f"unbalanced ( in {expr}"
    return found


def exported(exposition: str) -> dict[str, set[str]]:
    """Sample names of a Prometheus text exposition, each with the label names seen on it.
    Families without samples yet (a labelled metric no event has touched) still count by
    their type: counter NAME_total, histogram NAME_bucket/_sum/_count, gauge NAME."""
    names: dict[str, set[str]] = {}
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count",
                "_created"], "summary": ["", "_sum", "_count", "_created"]}
    for family in text_string_to_metric_families(exposition):
        for suffix in suffixes.get(family.type, [""]):
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def check(exprs: Iterable[tuple[str, str]], metrics: dict[str, set[str]], *,
          labels: bool) -> set[str]:
    """Every expression's metrics are in ``metrics`` or made by Prometheus (and, with
    ``labels``, their matched and grouping labels are the metric's or the target's). The
    metrics used. ``exprs``: (where, PromQL)."""
    metrics = {**{name: set() for name in SCRAPE_SERIES}, **metrics}
    used: set[str] = set()
    problems: list[str] = []
    for where, expr in exprs:
        found = parse(expr)
        assert found["selectors"], f"{where}: no metric in {expr}"
        known_labels = set(TARGET_LABELS)
        for name, matched in found["selectors"]:
            used.add(name)
            if name not in metrics:
                problems.append(f"{where}: {name} is not exported")
                continue
            known_labels |= metrics[name]
            if labels and not matched <= metrics[name] | TARGET_LABELS:
                problems.append(f"{where}: {name} has no label {matched - metrics[name]}")
        if labels and not found["grouping"] <= known_labels:
            problems.append(f"{where}: groups by unknown {found['grouping'] - known_labels}")
    assert problems == [], "\n".join(problems)
    return used
