"""The CRD: names, schema enums in step with the code, and its CEL immutability rules
evaluated with cel-python (the local 1.20 API server cannot run them)."""

from __future__ import annotations

import pathlib
import re

import celpy
import pytest
import yaml

from blockcopy.core import verify
from blockcopy.model.api import GROUP, KIND, PLURAL, VERSION, Flag, Phase, Verify
from blockcopy.model.startedspec import IMMUTABLE_FIELDS

CRD = yaml.safe_load((pathlib.Path(__file__).parents[2] / "crds" / "blockcopy.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
SPEC = SCHEMA["properties"]["spec"]
STATUS = SCHEMA["properties"]["status"]


def test_names_and_printer_columns():
    assert CRD["metadata"]["name"] == f"{PLURAL}.{GROUP}" and CRD["spec"]["group"] == GROUP
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (KIND, PLURAL, ["bc"])
    version = CRD["spec"]["versions"][0]
    assert version["name"] == VERSION and version["subresources"] == {"status": {}}
    # kubectl get blockcopy-all: copies and plans. Not "blockcopy": a category named like the
    # singular makes `kubectl delete blockcopy NAME` fail ("you must specify only one
    # resource"), kubectl expanding the category first.
    assert names["categories"] == ["blockcopy-all"]
    assert names["singular"] not in names["categories"]
    columns = version["additionalPrinterColumns"]
    # kubectl get bc: readable at a glance; -o wide adds the priority-1 columns after Age.
    assert [c["name"] for c in columns if not c.get("priority")] == \
        ["Phase", "Progress", "ETA", "Domain", "Disk", "Node", "Age"]
    assert [c["name"] for c in columns if c.get("priority") == 1] == \
        ["Dest", "Rate", "Group", "Message"]
    assert {c.get("priority", 0) for c in columns} == {0, 1}
    # No raw byte count at a glance: integer columns (bytes, bytes/s) only with -o wide.
    assert all(c.get("priority") == 1 for c in columns if c["type"] == "integer")
    paths = {c["jsonPath"] for c in columns}
    assert not paths & {".status.cur", ".status.end"}
    # Every column reads a field the schema has (the API server prints nothing otherwise).
    for c in columns:
        parts = c["jsonPath"].split(".")[1:]
        if parts[0] == "metadata":
            continue
        node = SCHEMA
        for part in parts:
            node = node["properties"][part]
        assert node["type"] == c["type"], c


def test_schema_matches_the_code():
    assert set(SPEC["required"]) == {"domain", "disk", "dest"}
    assert SPEC["properties"]["flags"]["items"]["enum"] == [f.value for f in Flag]
    assert STATUS["properties"]["phase"]["enum"] == [p.value for p in Phase]
    # Every field is documented (kubectl explain), and every status field the agent writes is
    # in the schema (the API server silently prunes unknown fields).
    for name, prop in {**SPEC["properties"], **STATUS["properties"]}.items():
        assert prop.get("description"), name
    written = {"phase", "cur", "end", "progress", "bandwidth", "nodeName", "source", "target",
               "format", "flags", "startedSpec", "startTime", "mirroredTime", "completionTime",
               "message", "observedGeneration", "conditions", "kopf", "rate", "eta", "plan",
               "layers", "createdFiles", "group", "verification"}
    assert written <= set(STATUS["properties"])
    assert SPEC["properties"]["verify"]["enum"] == [v.value for v in Verify]
    verification = STATUS["properties"]["verification"]["properties"]
    assert set(verification) == {"method", "result", "samples", "blockSize", "mismatches",
                                 "firstMismatch", "pauseMs", "time", "message"}
    assert verification["result"]["enum"] == [verify.MATCH, verify.MISMATCH,
                                              verify.NOT_VERIFIED]


RULES = [(r["rule"], r["message"]) for r in SCHEMA["x-kubernetes-validations"]]
ENV = celpy.Environment()
PROGRAMS = [(ENV.program(ENV.compile(rule)), message) for rule, message in RULES]


def violations(old: dict, new: dict) -> list[str]:
    activation = {"self": celpy.json_to_cel(new), "oldSelf": celpy.json_to_cel(old)}
    return [message for program, message in PROGRAMS if not program.evaluate(activation)]


BASE = {"domain": "vm", "disk": "vda", "dest": "/var/lib/libvirt/images/c.qcow2",
        "nodeName": "n1", "format": "qcow2", "flags": ["shallow"]}
STARTED = {"phase": "Copying", "startTime": "2026-01-01T00:00:00Z"}
CHANGES = {"backingChain": "copy", "group": "g2",
           "domain": "vm2", "disk": "vdb", "dest": "/var/lib/libvirt/images/d.qcow2",
           "nodeName": "n2", "format": "raw", "base": "/b.qcow2", "flags": ["reuseExternal"],
           "granularity": 131072, "bufSize": 1048576, "detectZeroes": False,
           "deleteSourcesUnder": "/var/lib/libvirt/images/old"}


def test_there_is_one_rule_per_immutable_field():
    assert len(RULES) == len(IMMUTABLE_FIELDS)
    for field in IMMUTABLE_FIELDS:
        assert any(f"spec.{field} cannot change" in m for _, m in RULES), field


@pytest.mark.parametrize("field", IMMUTABLE_FIELDS)
def test_immutable_fields_refused_after_the_start(field):
    old = {"spec": BASE, "status": STARTED}
    assert violations(old, {"spec": {**BASE, field: CHANGES[field]}, "status": STARTED}) == [
        f"spec.{field} cannot change once the copy started"]


@pytest.mark.parametrize("field", ["nodeName", "format", "flags"])
def test_adding_or_removing_an_optional_field_counts_as_a_change(field):
    old = {"spec": BASE, "status": STARTED}
    without = {k: v for k, v in BASE.items() if k != field}
    assert violations(old, {"spec": without, "status": STARTED})
    assert violations({"spec": without, "status": STARTED}, {"spec": BASE, "status": STARTED})


@pytest.mark.parametrize("field", IMMUTABLE_FIELDS)
def test_changes_allowed_before_the_start(field):
    for status in (None, {"phase": "Pending"}):
        old = {"spec": BASE} if status is None else {"spec": BASE, "status": status}
        assert violations(old, {"spec": {**BASE, field: CHANGES[field]}}) == []


def test_mutable_fields_change_freely_after_the_start():
    old = {"spec": BASE, "status": STARTED}
    new = {"spec": {**BASE, "pivot": True, "abort": True, "bandwidth": "10Mi"},
           "status": STARTED}
    assert violations(old, new) == []


def _named_before(text: str, marker: str) -> set[str]:
    """The `names` of the paragraph (or table cell) that ``marker`` (once in ``text``) ends."""
    assert text.count(marker) == 1, marker
    before = text.partition(marker)[0]
    start = max(before.rfind("\n\n"), before.rfind("| "))
    return set(re.findall(r"`([A-Za-z]+)`", before[start:]))


def test_the_documentation_names_every_immutable_field():
    """docs/api.md, the README's troubleshooting and kubectl explain list the fields that
    cannot change once the job started: exactly those the CEL rules and the agent hold."""
    root = pathlib.Path(__file__).parents[2]
    api_md = (root / "docs" / "api.md").read_text()
    readme = (root / "README.md").read_text()
    assert _named_before(api_md, " cannot change once the job") == set(IMMUTABLE_FIELDS)
    assert _named_before(readme, " are fixed once the job started") == set(IMMUTABLE_FIELDS)
    started = " ".join(STATUS["properties"]["startedSpec"]["description"].split())
    listed = started.partition("(")[2].partition(")")[0].split(", ")
    assert set(listed) == set(IMMUTABLE_FIELDS)
