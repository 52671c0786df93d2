"""What the API server would say about an object of this API, offline: the object as written
in a file users copy from (examples/, a YAML block of the documentation) against its CRD in
crds/: the OpenAPI schema (jsonschema), the fields the server would silently prune (a typo in
a field name is not refused, it is dropped), and the CEL rules (cel-python). Transition rules
(those reading oldSelf) do not apply to a create, and rules calling Kubernetes' own CEL
libraries (quantity) are left to the real server (tests/e2e/test_invalid_specs_on_server.py).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import celpy
import jsonschema
import yaml
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

from support.paths import CRDS

SERVER_ONLY = ("isQuantity(", "quantity(")  # Kubernetes' CEL libraries: not in cel-python


@functools.cache
def crds_by_kind() -> dict[str, dict[str, Any]]:
    """Every CRD of crds/ by its kind."""
    found = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        found[crd["spec"]["names"]["kind"]] = crd
    return found


@functools.cache
def program(rule: str) -> Any:
    """A CEL rule compiled by cel-python (once per rule)."""
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _pruned(schema: dict[str, Any], value: Any, path: str) -> Iterator[str]:
    """The paths under ``value`` that the API server would drop (structural pruning)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or path == ".metadata":
        return
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                yield from _pruned(props[key], item, f"{path}.{key}")
            elif isinstance(extra, dict):
                yield from _pruned(extra, item, f"{path}.{key}")
            elif extra is not True:
                yield f"{path}.{key}"
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _pruned(schema["items"], item, f"{path}[{i}]")


def _cel_refusals(schema: dict[str, Any], value: Any, path: str) -> Iterator[str]:
    """The messages of the CEL rules that refuse ``value`` (a field's rules where it is set)."""
    for rule in schema.get("x-kubernetes-validations", []):
        text = rule["rule"]
        if "oldSelf" in text or any(f in text for f in SERVER_ONLY):
            continue
        try:
            passed = program(text).evaluate({"self": json_to_cel(value)})
        except CELEvalError as exc:
            yield f"{path or '.'}: the rule {text!r} could not be evaluated: {exc}"
            continue
        if not passed:
            yield f"{path or '.'}: {' '.join(rule.get('message', text).split())}"
    if isinstance(value, dict):
        for key, item in value.items():
            if key in schema.get("properties", {}):
                yield from _cel_refusals(schema["properties"][key], item, f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                yield from _cel_refusals(schema["additionalProperties"], item, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _cel_refusals(schema["items"], item, f"{path}[{i}]")


def refusals(obj: dict[str, Any]) -> list[str]:
    """Why the API server would refuse (or silently change) ``obj`` on create: [] if it
    would store it as written."""
    kind = obj.get("kind")
    crd = crds_by_kind().get(str(kind))
    if crd is None:
        return [f"kind {kind!r} is none of this API's ({', '.join(crds_by_kind())})"]
    version = crd["spec"]["versions"][0]
    if obj.get("apiVersion") != f"{crd['spec']['group']}/{version['name']}":
        return [f"apiVersion {obj.get('apiVersion')!r} is not this API's"]
    schema = version["schema"]["openAPIV3Schema"]
    found = [f"schema: {'.'.join(map(str, e.absolute_path)) or '.'}: {e.message}"
             for e in jsonschema.Draft4Validator(schema).iter_errors(obj)]
    found += [f"pruned: {p}" for p in _pruned(schema, obj, "")]
    if not found:  # CEL runs on what the schema admitted
        found += [f"CEL: {m}" for m in _cel_refusals(schema, obj, "")]
    return found
