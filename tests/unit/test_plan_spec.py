"""BlockCopyPlan's spec as the controller parses it, and the CRD's CEL rules (cel-python)."""

from __future__ import annotations

import datetime as dt
import pathlib

import celpy
import pytest
import yaml

from blockcopy.core import plan_status
from blockcopy.core.progress import ProgressWindow
from blockcopy.model.api import GROUP, VERSION, Verify
from blockcopy.model.plan import (
    MAX_NAME,
    PLAN_KIND,
    PLAN_PLURAL,
    LabelSelector,
    PivotMode,
    PlanError,
    Requirement,
    Retention,
    parse_plan,
)

CRD = yaml.safe_load((pathlib.Path(__file__).parents[2] / "crds" / "blockcopyplan.yaml")
                     .read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
BASE = {"source": {"pathPrefix": "/pool/a"}, "destination": {"pathPrefix": "/pool/b"}}


def spec(**kw):
    return {**BASE, **kw}


def test_defaults():
    parsed = parse_plan(BASE)
    assert (parsed.source_prefix, parsed.dest_prefix) == ("/pool/a", "/pool/b")
    assert (parsed.max_active, parsed.max_active_per_node) == (4, 1)
    assert parsed.pivot is PivotMode.MANUAL and parsed.retention is Retention.KEEP
    assert not parsed.dry_run and parsed.node_selector is None and parsed.domains == ()
    # Absent stays absent (not Sample, not true): the children keep BlockCopy's own defaults.
    assert parsed.verify is None and parsed.detect_zeroes is None


def test_everything_parsed():
    parsed = parse_plan({
        "source": {"pathPrefix": "/pool/a/", "domains": ["web-*"],
                   "nodeSelector": {"matchLabels": {"rack": "r1"},
                                    "matchExpressions": [{"key": "x", "operator": "In",
                                                          "values": ["1", "2"]}]}},
        "destination": {"pathPrefix": "/pool/b", "format": "qcow2", "backingChain": "copy",
                        "bandwidth": "10Mi", "convergence": "auto", "detectZeroes": False},
        "maxActive": 3, "maxActivePerNode": 2, "pivot": "Automatic", "dryRun": True,
        "sourceRetention": "Delete", "verify": "Full"})
    assert parsed.source_prefix == "/pool/a" and parsed.bandwidth == 10 << 20
    assert parsed.node_selector == LabelSelector((("rack", "r1"),),
                                                 (Requirement("x", "In", ("1", "2")),))
    assert parsed.node_selector.matches({"rack": "r1", "x": "2"})
    assert not parsed.node_selector.matches({"rack": "r1", "x": "3"})
    assert not parsed.node_selector.matches({"rack": "r2", "x": "1"})
    assert parsed.pivot is PivotMode.AUTOMATIC and parsed.dry_run
    assert parsed.retention is Retention.DELETE
    assert parsed.verify is Verify.FULL and parsed.detect_zeroes is False


@pytest.mark.parametrize("verify", list(Verify))
@pytest.mark.parametrize("detect", [True, False])
def test_verify_and_detect_zeroes_kept_as_given(verify, detect):
    parsed = parse_plan(spec(verify=verify.value,
                             destination={"pathPrefix": "/pool/b", "detectZeroes": detect}))
    assert (parsed.verify, parsed.detect_zeroes) == (verify, detect)


@pytest.mark.parametrize(("raw", "message"), [
    (spec(source={"pathPrefix": "pool/a"}), "absolute"),
    (spec(destination={"pathPrefix": "/"}), "must not be /"),
    (spec(destination={"pathPrefix": "/pool/a/new"}), "inside each other"),
    (spec(destination={"pathPrefix": "/pool"}), "inside each other"),
    (spec(destination={"pathPrefix": "/pool/a"}), "inside each other"),
    (spec(maxActive=0), "from 1 to 1000"),
    (spec(maxActive=10**6), "from 1 to 1000"),
    (spec(maxActivePerNode=65), "from 1 to 64"),
    (spec(maxActive=True), "from 1 to 1000"),
    (spec(pivot="Now"), "Manual, Automatic"),
    (spec(sourceRetention="Shred"), "Keep, Delete"),
    (spec(dryRun="yes"), "true or false"),
    (spec(destination={"pathPrefix": "/b", "convergence": "fast"}),
     "spec.destination.convergence 'fast': one of auto"),
    (spec(destination={"pathPrefix": "/b", "backingChain": "move"}),
     "spec.destination.backingChain 'move': one of copy"),
    (spec(verify="none"), r"spec.verify 'none': one of None, Sample, Full"),
    (spec(verify=True), "spec.verify True: one of None, Sample, Full"),
    (spec(verify=["Full"]), "spec.verify"),
    (spec(destination={"pathPrefix": "/b", "detectZeroes": "false"}),
     "spec.destination.detectZeroes must be true or false, not 'false'"),
    (spec(destination={"pathPrefix": "/b", "detectZeroes": 0}),
     "spec.destination.detectZeroes must be true or false"),
    ({"source": {"pathPrefix": "/a"}}, "required"),
    (spec(destination={"pathPrefix": "/b", "format": "raw", "backingChain": "copy"}), "qcow2"),
    (spec(destination={"pathPrefix": "/b", "bandwidth": "fast"}), "bandwidth"),
    (spec(source={"pathPrefix": "/a", "nodeSelector": {"matchExpressions": [
        {"key": "k", "operator": "In"}]}}), "needs values"),
])
def test_bad_specs_refused_with_a_reason(raw, message):
    with pytest.raises(PlanError, match=message):
        parse_plan(raw)


def test_prefixes_sharing_a_name_start_are_not_inside_each_other():
    parsed = parse_plan(spec(destination={"pathPrefix": "/pool/a2"}))
    assert parsed.dest_prefix == "/pool/a2"


# ------------------------------------------------------------------ the CRD

def test_crd_names():
    assert CRD["metadata"]["name"] == f"{PLAN_PLURAL}.{GROUP}"
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (PLAN_KIND, PLAN_PLURAL,
                                                                     ["bcp"])
    # In the API's category with BlockCopy (kubectl get blockcopy-all).
    assert names["categories"] == ["blockcopy-all"] and CRD["spec"]["scope"] == "Namespaced"
    version = CRD["spec"]["versions"][0]
    assert version["name"] == VERSION and version["subresources"] == {"status": {}}
    columns = version["additionalPrinterColumns"]
    # kubectl get bcp: readable at a glance, no raw byte count (the rate in bytes/s only with
    # -o wide, after Age, as for BlockCopy); every column reads a field the schema has.
    assert [c["name"] for c in columns if not c.get("priority")] == \
        ["Phase", "Pivoted", "Copying", "Failed", "ETA", "Age"]
    assert [c["name"] for c in columns if c.get("priority") == 1] == ["Rate", "Pivot"]
    assert all(c.get("priority") == 1 for c in columns if c.get("format") == "int64")
    for c in columns:
        parts = c["jsonPath"].split(".")[1:]
        if parts[0] != "metadata":
            node = SCHEMA
            for part in parts:
                node = node["properties"][part]
            assert node["type"] == c["type"], c
    limits = SCHEMA["properties"]["spec"]["properties"]
    assert (limits["maxActive"]["minimum"], limits["maxActive"]["maximum"]) == (1, 1000)
    assert (limits["maxActivePerNode"]["minimum"],
            limits["maxActivePerNode"]["maximum"]) == (1, 64)


def test_crd_verify_and_detect_zeroes_as_on_a_blockcopy_without_defaults():
    """The same values as BlockCopy's fields, and no default: one filled in by the API
    server would be an explicit value on every child (an explicit Sample holds a copy whose
    check cannot be made, where an absent one lets it pivot)."""
    props = SCHEMA["properties"]["spec"]["properties"]
    verify = props["verify"]
    zeroes = props["destination"]["properties"]["detectZeroes"]
    assert verify["type"] == "string" and verify["enum"] == [v.value for v in Verify]
    assert zeroes["type"] == "boolean"
    assert "default" not in verify and "default" not in zeroes
    assert verify["description"] and zeroes["description"]


def test_status_schema_holds_what_the_controller_writes():
    written = plan_status.build(
        parse_plan(BASE), plan="p", disks=(), children={}, states={}, selected=True,
        excluded=(), generation=1, previous={}, now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        window=ProgressWindow(), clock=0.0)
    assert set(written) <= set(SCHEMA["properties"]["status"]["properties"])
    phases = SCHEMA["properties"]["status"]["properties"]["phase"]["enum"]
    assert {v for k, v in vars(plan_status.PlanPhase).items() if k.isupper()} == set(phases)


def _rules(node):
    if isinstance(node, dict):
        yield from node.get("x-kubernetes-validations", [])
        for value in node.values():
            yield from _rules(value)


ENV = celpy.Environment()
ROOT = [(ENV.program(ENV.compile(r["rule"])), r["message"])
        for r in SCHEMA["x-kubernetes-validations"]]
PREFIX_RULE = ENV.program(ENV.compile(
    SCHEMA["properties"]["spec"]["properties"]["destination"]["properties"]["pathPrefix"]
    ["x-kubernetes-validations"][0]["rule"]))


def root_violations(new, old=None):
    obj = {"metadata": {"name": "plan"}, **new}
    activation = {"self": celpy.json_to_cel(obj),
                  "oldSelf": celpy.json_to_cel({"metadata": {"name": "plan"}, **(old or new)})}
    return [m for program, m in ROOT if not program.evaluate(activation)]


@pytest.mark.parametrize(("src", "dst", "refused"), [
    ("/pool/a", "/pool/b", False),
    ("/pool/a", "/pool/a2", False),
    ("/pool/a", "/pool/a/b", True),
    ("/pool/a/", "/pool/a/b", True),
    ("/pool/a", "/pool/a", True),
    ("/pool/a/b", "/pool/a", True),
    ("/pool/a/b", "/pool/a/", True),
])
def test_cel_refuses_prefixes_inside_each_other(src, dst, refused):
    found = root_violations({"spec": {"source": {"pathPrefix": src},
                                      "destination": {"pathPrefix": dst}}})
    assert bool(found) == refused, found


def test_cel_refuses_long_names_and_a_changed_source_once_started():
    base = {"spec": {"source": {"pathPrefix": "/a"}, "destination": {"pathPrefix": "/b"}}}
    long = {"metadata": {"name": "x" * (MAX_NAME + 1)}, **base}
    activation = {"self": celpy.json_to_cel(long), "oldSelf": celpy.json_to_cel(long)}
    assert any(not p.evaluate(activation) for p, _ in ROOT)
    started = {**base, "status": {"startTime": "2026-01-01T00:00:00Z"}}
    moved = {"spec": {"source": {"pathPrefix": "/c"}, "destination": {"pathPrefix": "/b"}},
             "status": started["status"]}
    assert root_violations(moved, started) == [
        "spec.source cannot change once the plan started (its disk set is fixed)"]
    assert root_violations(moved, base) == []


@pytest.mark.parametrize(("prefix", "ok"), [("/pool/b", True), ("/", False), ("pool", False),
                                            ("/pool/../etc", False), ("/pool/./b", False)])
def test_cel_prefix_rule(prefix, ok):
    assert bool(PREFIX_RULE.evaluate({"self": celpy.json_to_cel(prefix)})) == ok
    assert len(list(_rules(SCHEMA))) >= 7
