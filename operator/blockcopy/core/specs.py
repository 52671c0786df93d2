"""Which spec a step acts on. While a job runs, what the user changed after the start must
not orphan it: immutable fields are kept as started, an invalid new value of a mutable field
is replaced by the one in effect, and both are refused in the SpecChangeRefused condition.
Pure."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from blockcopy.core import status
from blockcopy.model.api import (
    BEFORE_JOB_PHASES,
    BlockCopySpec,
    Phase,
    SpecError,
    parse_spec,
)
from blockcopy.model.startedspec import parse_running_spec, pin_started_fields


@dataclasses.dataclass(frozen=True)
class SpecReading:
    """The spec a step acts on: while a job runs, its immutable fields as started and an
    invalid edit of a mutable one replaced by the value in effect (refused in the
    SpecChangeRefused condition); before, the spec as written. ``error``: unusable
    (before any job: the object fails with InvalidSpec)."""

    spec: BlockCopySpec | None
    raw: dict[str, Any]
    started_job: bool
    conditions: list[dict[str, Any]]
    error: str | None = None


def read_spec(raw_spec: Any, previous: Mapping[str, Any], current: Phase | None) -> SpecReading:
    raw, changed = pin_started_fields(raw_spec or {}, previous.get("startedSpec"))
    started_job = current not in (None, *BEFORE_JOB_PHASES)
    invalid: list[str] = []
    try:
        if started_job:
            spec, invalid = parse_running_spec(raw, previous.get("startedSpec"),
                                               int(previous.get("bandwidth") or 0))
        else:
            spec = parse_spec(raw)
    except SpecError as exc:
        return SpecReading(None, raw, started_job, [], error=f"invalid spec: {exc}")
    conditions = status.spec_change_conditions(changed=changed, invalid=invalid,
                                               previous=previous.get("conditions"))
    return SpecReading(spec, raw, started_job, conditions)
