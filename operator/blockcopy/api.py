"""The BlockCopy API: names, phases, flags and the parsed spec. Pure: no I/O."""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from collections.abc import Mapping
from typing import Any

GROUP = "blockcopy.dev"
VERSION = "v1alpha1"
KIND = "BlockCopy"
PLURAL = "blockcopies"

# Label that records which node's agent owns an object (server-side selectable).
NODE_LABEL = "blockcopy.dev/node"
# The finalizer that makes deleting an object wait until its agent cancelled the job.
FINALIZER = f"{GROUP}/cancel-job"


class Phase(enum.StrEnum):
    PENDING = "Pending"
    COPYING = "Copying"
    MIRRORED = "Mirrored"
    PIVOTING = "Pivoting"
    PIVOTED = "Pivoted"
    ABORTING = "Aborting"
    ABORTED = "Aborted"
    FAILED = "Failed"


TERMINAL_PHASES = frozenset({Phase.PIVOTED, Phase.ABORTED, Phase.FAILED})
# Phases in which a libvirt job of ours may exist on the disk.
JOB_PHASES = frozenset({Phase.COPYING, Phase.MIRRORED, Phase.PIVOTING, Phase.ABORTING})


class Flag(enum.StrEnum):
    SHALLOW = "shallow"
    REUSE_EXTERNAL = "reuseExternal"
    TRANSIENT_JOB = "transientJob"
    SYNCHRONOUS_WRITES = "synchronousWrites"


# Fields that cannot change once the job started (the agent keeps what it started with).
# granularity and bufSize act only at the start, so a later change could only be ignored.
IMMUTABLE_FIELDS = ("domain", "nodeName", "disk", "dest", "format", "base", "flags",
                    "granularity", "bufSize")


def _normal(field: str, value: Any) -> Any:
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
               if _normal(f, raw.get(f) or None) != _normal(f, started.get(f) or None)]
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
    return parse_spec(raw), problems


def started_fields(raw_spec: Mapping[str, Any]) -> dict[str, Any]:
    """The immutable fields of a spec, as recorded in status when the job starts."""
    return {f: raw_spec[f] for f in IMMUTABLE_FIELDS if raw_spec.get(f) not in (None, "", [])}


class SpecError(ValueError):
    """The spec cannot be acted on; the message is shown to the user as is."""


@dataclasses.dataclass(frozen=True)
class BlockCopySpec:
    domain: str
    disk: str
    dest: str
    node_name: str | None = None
    format: str | None = None
    base: str | None = None
    flags: frozenset[Flag] = frozenset()
    bandwidth: int = 0  # bytes/s, 0 = unlimited
    granularity: int = 0
    buf_size: int = 0
    pivot: bool = False
    abort: bool = False


# Binary and decimal suffixes of Kubernetes quantities, for byte rates.
_QUANTITY_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "": 1,
}


def parse_bandwidth(value: Any) -> int:
    """A Kubernetes quantity (``100Mi``, ``5M``, ``1048576``) as whole bytes per second."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise SpecError(f"bandwidth must be a quantity such as 100Mi, not {value!r}")
    if isinstance(value, int):
        number, multiplier = value, 1
    elif isinstance(value, str):
        text = value.strip()
        suffix = next((s for s in sorted(_QUANTITY_SUFFIXES, key=len, reverse=True)
                       if s and text.endswith(s)), "")
        digits = text[: len(text) - len(suffix)] if suffix else text
        try:
            number = int(digits) if digits.isdigit() else float(digits)
        except ValueError:
            raise SpecError(f"bandwidth {value!r} is not a quantity such as 100Mi") from None
        multiplier = _QUANTITY_SUFFIXES[suffix]
    else:
        raise SpecError(f"bandwidth must be a quantity such as 100Mi, not {value!r}")
    if not math.isfinite(number) or number < 0:
        raise SpecError(f"bandwidth must be a finite, non-negative quantity: {value!r}")
    result = int(number * multiplier)
    if result >= 2**63:
        raise SpecError(f"bandwidth {value!r} is too large")
    return result


def _string(raw: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = raw.get(key)
    if value is None or value == "":
        if required:
            raise SpecError(f"spec.{key} is required")
        return None
    if not isinstance(value, str):
        raise SpecError(f"spec.{key} must be a string, not {type(value).__name__}")
    if "\x00" in value:
        raise SpecError(f"spec.{key} must not contain NUL characters")
    return value


def _non_negative_int(raw: Mapping[str, Any], key: str) -> int:
    value = raw.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"spec.{key} must be a non-negative integer, not {value!r}")
    if value < 0 or value >= 2**63:
        raise SpecError(f"spec.{key} must be a non-negative integer, not {value!r}")
    return value


def _bool(raw: Mapping[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SpecError(f"spec.{key} must be true or false, not {value!r}")
    return value


def parse_spec(raw: Any) -> BlockCopySpec:
    """Validate a BlockCopy's spec as the agent needs it; raise SpecError with a clear message."""
    if not isinstance(raw, Mapping):
        raise SpecError("spec must be an object")
    domain = _string(raw, "domain", required=True)
    disk = _string(raw, "disk", required=True)
    dest = _string(raw, "dest", required=True)
    assert domain and disk and dest  # for the type checker: required above
    if not os.path.isabs(dest):
        raise SpecError(f"spec.dest must be an absolute path, not {dest!r}")
    if dest.endswith("/"):
        raise SpecError(f"spec.dest must name a file or block device, not a directory: {dest!r}")
    fmt = _string(raw, "format")
    if fmt is not None and not fmt.replace("-", "").replace("_", "").isalnum():
        raise SpecError(f"spec.format {fmt!r} is not an image format name such as raw or qcow2")
    base = _string(raw, "base")
    if base is not None and not os.path.isabs(base):
        raise SpecError(f"spec.base must be an absolute path, not {base!r}")

    raw_flags = raw.get("flags") or []
    if not isinstance(raw_flags, list):
        raise SpecError("spec.flags must be a list")
    flags = set()
    for item in raw_flags:
        try:
            flags.add(Flag(item))
        except ValueError:
            known = ", ".join(f.value for f in Flag)
            raise SpecError(f"unknown flag {item!r} in spec.flags; known flags: {known}") from None
    if base is not None and Flag.SHALLOW in flags:
        raise SpecError("spec.base and the shallow flag cannot be combined: shallow already "
                        "means base = the top image's backing file")

    return BlockCopySpec(
        domain=domain,
        disk=disk,
        dest=os.path.normpath(dest),
        node_name=_string(raw, "nodeName"),
        format=fmt,
        base=base,
        flags=frozenset(flags),
        bandwidth=parse_bandwidth(raw.get("bandwidth")),
        granularity=_non_negative_int(raw, "granularity"),
        buf_size=_non_negative_int(raw, "bufSize"),
        pivot=_bool(raw, "pivot"),
        abort=_bool(raw, "abort"),
    )
