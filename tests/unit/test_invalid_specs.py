"""The table of invalid specs (tests/support/invalid_specs.py) in step with the agent and the
CRD: every SpecError the agent can raise has a row that raises it, every CEL rule of the
spec has a row it refuses (evaluated here with cel-python; the real API server runs every row
in tests/e2e/test_invalid_specs_on_server.py), and every other refusal reason of the agent is
listed as not checkable at admission, with why."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from typing import Any

import celpy
import pytest
import yaml

from blockcopy.model import api
from blockcopy.model.api import SpecError, parse_spec
from support.admission import SERVER_ONLY, program
from support.invalid_specs import INVALID, NOT_IN_CEL, VALID, Invalid
from support.paths import CRD, ROOT

SPEC_SCHEMA = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"][
    "openAPIV3Schema"]["properties"]["spec"]

# Reasons the agent gives that are not refusals of a spec: progress, and what happened to a
# copy after it started (a job that failed, a domain that stopped...).
NOT_A_REFUSAL = {"Started", "Queued", "Preparing", "Pivoted", "Aborted", "Adopted",
                 "AbortedBeforeStart", "WaitingForGroup", "WaitingForLayers", "JobFailed",
                 "JobCanceled", "JobLost", "PivotFailed", "PivotRefused", "CopyRefused",
                 "PreparationFailed", "LayerCopyFailed", "ChainChanged", "DomainStopped",
                 "DomainGone", "Match", "NotAsked", "NotVerified"}


def _raise_site(exc: BaseException) -> int:
    """The line of model/api.py that raised ``exc``."""
    tb, line = exc.__traceback__, -1
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == api.__file__:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _spec_error_sites() -> set[int]:
    tree = ast.parse(open(api.__file__).read())
    return {node.lineno for node in ast.walk(tree) if isinstance(node, ast.Raise)
            and isinstance(node.exc, ast.Call) and getattr(node.exc.func, "id", "") == "SpecError"}


@pytest.mark.parametrize("row", INVALID, ids=lambda r: r.id)
def test_the_agent_refuses_each_row_as_the_table_says(row: Invalid):
    if row.agent is None:
        parse_spec(row.spec)  # refused at admission only
        return
    with pytest.raises(SpecError) as err:
        parse_spec(row.spec)
    assert row.agent in str(err.value)


def test_every_spec_error_of_the_agent_has_a_row():
    hit = set()
    for row in INVALID:
        try:
            parse_spec(row.spec)
        except SpecError as exc:
            hit.add(_raise_site(exc))
    missing = _spec_error_sites() - hit
    lines = open(api.__file__).read().splitlines()
    assert missing == set(), [lines[n - 1].strip() for n in sorted(missing)]


def test_ids_are_unique_and_valid_specs_parse():
    assert len({r.id for r in INVALID}) == len(INVALID)
    for raw in VALID:
        parse_spec(raw)


# ------------------------------------------------------------------ the CRD's CEL rules



def _rules() -> Iterator[tuple[str | None, str, str]]:
    """(field or None for the spec, rule, message) of every CEL rule of spec."""
    for rule in SPEC_SCHEMA.get("x-kubernetes-validations", []):
        yield None, rule["rule"], " ".join(rule["message"].split())
    for field, prop in SPEC_SCHEMA["properties"].items():
        for rule in prop.get("x-kubernetes-validations", []):
            yield field, rule["rule"], " ".join(rule["message"].split())


RULES = list(_rules())
PROGRAMS = {rule: program(rule) for _, rule, _ in RULES
            if not any(f in rule for f in SERVER_ONLY)}


def cel_refusals(raw: dict[str, Any]) -> list[str]:
    """The messages of the CEL rules that refuse ``raw``, as the API server evaluates them
    once the OpenAPI schema accepted it: a field's rules only when the field is there."""
    refused = []
    for field, rule, message in RULES:
        if rule not in PROGRAMS or (field is not None and field not in raw):
            continue
        this = celpy.json_to_cel(raw if field is None else raw[field])
        if not PROGRAMS[rule].evaluate({"self": this}):
            refused.append(message)
    return refused


def _rule_of(row: Invalid) -> str | None:
    """The CEL rule whose message the row expects (None: an OpenAPI refusal)."""
    return next((rule for _, rule, message in RULES if row.server in message), None)


@pytest.mark.parametrize("row", [r for r in INVALID if _rule_of(r) in PROGRAMS],
                         ids=lambda r: r.id)
def test_cel_refuses_each_row_with_its_message(row: Invalid):
    assert any(row.server in m for m in cel_refusals(row.spec)), row.id


@pytest.mark.parametrize("raw", VALID, ids=lambda raw: re.sub(r"\W+", "-", str(raw))[:60])
def test_cel_accepts_the_valid_edges(raw: dict[str, Any]):
    assert cel_refusals(raw) == []


def test_every_cel_rule_of_the_spec_has_a_row():
    untested = [m for _, _, m in RULES if not any(row.server in m for row in INVALID)]
    assert untested == []


# ------------------------------------------------------------------ the other refusals


def _reasons_in_the_code() -> set[str]:
    pattern = re.compile(r'(?:reason=|failed\(|Refusal\(|return \()"([A-Z][A-Za-z]+)"')
    found = set()
    for path in (ROOT / "operator" / "blockcopy").rglob("*.py"):
        if "kubectl" not in path.parts:
            found |= set(pattern.findall(path.read_text()))
    return found


def test_every_other_refusal_is_listed_with_why_admission_cannot_check_it():
    reasons = _reasons_in_the_code()
    assert {"InvalidSpec", "DestNotAllowed", "DiskBusy"} <= reasons  # the scan works
    unlisted = reasons - {"InvalidSpec"} - set(NOT_IN_CEL) - NOT_A_REFUSAL
    assert unlisted == set(), f"list these in NOT_IN_CEL or NOT_A_REFUSAL: {unlisted}"
    assert set(NOT_IN_CEL) <= reasons, set(NOT_IN_CEL) - reasons  # none left over
    assert NOT_A_REFUSAL <= reasons, NOT_A_REFUSAL - reasons
    assert all(len(why) > 20 for why in NOT_IN_CEL.values())
