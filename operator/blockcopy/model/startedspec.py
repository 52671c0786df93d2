"""The spec of a copy whose job runs: the immutable fields as they were when the job started
(recorded in ``status.startedSpec``), and what an edit of a running copy may change. Apart
from ``model.api`` (the names and the parse of a spec) because only a started copy has it.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockcopy.model.api import (
    BlockCopySpec,
    SpecError,
    Verify,
    choice,
    parse_bandwidth,
    parse_spec,
)

# Fields that cannot change once the job started (the agent keeps what it started with).
# granularity and bufSize act only at the start, so a later change could only be ignored.
IMMUTABLE_FIELDS = ("domain", "nodeName", "disk", "dest", "format", "base", "flags",
                    "granularity", "bufSize", "backingChain", "group", "detectZeroes",
                    "deleteSourcesUnder")
# Fields whose absence means true.
TRUE_BY_DEFAULT = ("detectZeroes",)


def _normal(field: str, value: Any) -> Any:
    """A field's value as compared (absent, empty and the default are the same)."""
    if field in TRUE_BY_DEFAULT:
        return value is not False
    value = value or None
    if field == "flags":
        return sorted(set(value)) if isinstance(value, list) else value
    return value


def pin_started_fields(raw_spec: Mapping[str, Any], started: Mapping[str, Any] | None
                       ) -> tuple[dict[str, Any], list[str]]:
    """The spec to act on, with immutable fields as they were when the job started, and
    the names of the immutable fields the user changed since (refused)."""
    raw = dict(raw_spec) if isinstance(raw_spec, Mapping) else {}
    if not started:
        return raw, []
    changed = [f for f in IMMUTABLE_FIELDS
               if _normal(f, raw.get(f)) != _normal(f, started.get(f))]
    for field in IMMUTABLE_FIELDS:
        raw.pop(field, None)
        if started.get(field) is not None:
            raw[field] = started[field]
    return raw, changed


def parse_running_spec(raw_spec: Mapping[str, Any], started: Mapping[str, Any] | None,
                       bandwidth_in_effect: int) -> tuple[BlockCopySpec, list[str]]:
    """The spec of a copy whose job runs: immutable fields as started, and a mutable field
    with an invalid new value replaced by what is in effect (an edit can never orphan a
    running job). Returns the spec and the messages of the refused values."""
    raw, _ = pin_started_fields(raw_spec, started)
    try:
        return parse_spec(raw), []
    except SpecError as exc:
        problems = [str(exc)]
    try:
        parse_bandwidth(raw.get("bandwidth"))
    except SpecError:
        raw["bandwidth"] = bandwidth_in_effect
    for field in ("pivot", "abort"):
        if not isinstance(raw.get(field, False), bool):
            raw[field] = False
    try:
        choice(raw, "verify", Verify)
    except SpecError:
        raw.pop("verify", None)  # the default (Sample) until a valid value is set
    return parse_spec(raw), problems


def started_fields(raw_spec: Mapping[str, Any]) -> dict[str, Any]:
    """The immutable fields of a spec, as recorded in status when the job starts."""
    return {f: raw_spec[f] for f in IMMUTABLE_FIELDS if raw_spec.get(f) not in (None, "", [])}
