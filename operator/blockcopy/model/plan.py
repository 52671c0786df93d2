"""The BlockCopyPlan API: names and the parsed spec. A plan selects disks (by the path prefix
of their active image, domain globs and a node selector) and a destination rule; the
controller (``blockcopy.controller``) creates one ordinary BlockCopy per selected disk. Pure:
no I/O."""

from __future__ import annotations

import dataclasses
import enum
import posixpath
from collections.abc import Mapping
from typing import Any

from blockcopy.model.api import (
    GROUP,
    BackingChain,
    Convergence,
    SpecError,
    Verify,
    parse_bandwidth,
)

PLAN_KIND = "BlockCopyPlan"
PLAN_PLURAL = "blockcopyplans"
# On every child: which plan (in the child's namespace) made it.
PLAN_LABEL = f"{GROUP}/plan"
# The controller's finalizer on plans: children not pivoted are cancelled before a plan goes.
PLAN_FINALIZER = f"{GROUP}/plan-children"

MAX_ACTIVE_LIMIT = 1000  # maxActive above this is refused (also by the CRD's schema)
MAX_ACTIVE_PER_NODE_LIMIT = 64
DEFAULT_MAX_ACTIVE = 4
DEFAULT_MAX_ACTIVE_PER_NODE = 1
MAX_NAME = 52  # a plan's name (its children are NAME-0001, its groups NAME-vm0001)
MAX_DISKS = 2000  # a plan holds at most this many disks (its status lists them all)


class PlanError(ValueError):
    """The plan's spec cannot be acted on; the message is shown to the user as is."""


class PivotMode(enum.StrEnum):
    MANUAL = "Manual"  # every copy stops at Mirrored; switching to Automatic pivots them
    AUTOMATIC = "Automatic"


class Retention(enum.StrEnum):
    KEEP = "Keep"
    DELETE = "Delete"


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One matchExpressions entry of a label selector."""

    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@dataclasses.dataclass(frozen=True)
class LabelSelector:
    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.match_labels)
                and all(r.matches(labels) for r in self.match_expressions))


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    source_prefix: str
    dest_prefix: str
    domains: tuple[str, ...] = ()  # globs; empty: every domain
    node_selector: LabelSelector | None = None
    format: str | None = None
    backing_chain: BackingChain | None = None
    bandwidth: int = 0  # bytes/s per copy, 0 = unlimited
    convergence: Convergence | None = None
    # Passed to each child only when set: absent on the plan, absent on the child, which then
    # keeps BlockCopy's defaults exactly (zero detection on; Sample, yet a check that cannot
    # be made still pivots, where an explicit Sample or Full holds the copy).
    detect_zeroes: bool | None = None
    verify: Verify | None = None
    max_active: int = DEFAULT_MAX_ACTIVE
    max_active_per_node: int = DEFAULT_MAX_ACTIVE_PER_NODE
    pivot: PivotMode = PivotMode.MANUAL
    dry_run: bool = False
    retention: Retention = Retention.KEEP


def _prefix(raw: Mapping[str, Any], where: str) -> str:
    value = raw.get("pathPrefix")
    if not isinstance(value, str) or not value:
        raise PlanError(f"spec.{where}.pathPrefix is required")
    if not posixpath.isabs(value) or "\x00" in value:
        raise PlanError(f"spec.{where}.pathPrefix must be an absolute path, not {value!r}")
    normal = posixpath.normpath(value)
    if normal == "/":
        raise PlanError(f"spec.{where}.pathPrefix must not be / (a directory below it)")
    return normal


def _limit(raw: Mapping[str, Any], key: str, default: int, top: int) -> int:
    value = raw.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise PlanError(f"spec.{key} must be an integer from 1 to {top}, not {value!r}")
    return value


def _choice(raw: Mapping[str, Any], key: str, kind: type[enum.StrEnum], default: Any, *,
            where: str = "spec") -> Any:
    value = raw.get(key)
    if value is None:
        return default
    try:
        return kind(value)
    except ValueError:
        names = ", ".join(m.value for m in kind)
        raise PlanError(f"{where}.{key} {value!r}: one of {names}") from None


def parse_selector(raw: Any) -> LabelSelector | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise PlanError("spec.source.nodeSelector must be a label selector")
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise PlanError("spec.source.nodeSelector.matchLabels must map strings to strings")
    requirements = []
    for item in raw.get("matchExpressions") or []:
        if not isinstance(item, Mapping):
            raise PlanError("spec.source.nodeSelector.matchExpressions: objects only")
        op, key, values = item.get("operator"), item.get("key"), item.get("values") or []
        if op not in ("In", "NotIn", "Exists", "DoesNotExist") or not isinstance(key, str):
            raise PlanError(f"spec.source.nodeSelector: bad expression {dict(item)!r}")
        if (op in ("In", "NotIn")) != bool(values):
            needs = "needs" if op in ("In", "NotIn") else "takes no"
            raise PlanError(f"spec.source.nodeSelector: {op} {needs} values")
        requirements.append(Requirement(key, op, tuple(str(v) for v in values)))
    return LabelSelector(tuple(sorted(labels.items())), tuple(requirements))


def inside(path: str, prefix: str) -> bool:
    """``path`` lies below ``prefix`` (or is it); both normalised."""
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def parse_plan(raw: Any) -> PlanSpec:
    """Validate a plan's spec; raise PlanError with a clear message."""
    if not isinstance(raw, Mapping):
        raise PlanError("spec must be an object")
    source, dest = raw.get("source"), raw.get("destination")
    if not isinstance(source, Mapping) or not isinstance(dest, Mapping):
        raise PlanError("spec.source and spec.destination are required")
    src_prefix, dst_prefix = _prefix(source, "source"), _prefix(dest, "destination")
    if inside(dst_prefix, src_prefix) or inside(src_prefix, dst_prefix):
        raise PlanError(f"spec.destination.pathPrefix {dst_prefix} and spec.source.pathPrefix "
                        f"{src_prefix} must not lie inside each other")
    domains = source.get("domains") or []
    if not isinstance(domains, list) or not all(isinstance(d, str) and d for d in domains):
        raise PlanError("spec.source.domains must be a list of glob patterns")
    fmt = dest.get("format")
    if fmt is not None and (not isinstance(fmt, str)
                            or not fmt.replace("-", "").replace("_", "").isalnum()):
        raise PlanError(f"spec.destination.format {fmt!r} is not an image format name")
    chain = _choice(dest, "backingChain", BackingChain, None, where="spec.destination")
    if chain is not None and fmt not in (None, "qcow2"):
        raise PlanError("spec.destination.backingChain: copy writes qcow2 images")
    try:
        bandwidth = parse_bandwidth(dest.get("bandwidth"))
    except SpecError as exc:
        raise PlanError(f"spec.destination.{exc}") from None
    detect_zeroes = dest.get("detectZeroes")
    if detect_zeroes is not None and not isinstance(detect_zeroes, bool):
        raise PlanError(f"spec.destination.detectZeroes must be true or false, not "
                        f"{detect_zeroes!r}")
    dry_run = raw.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise PlanError(f"spec.dryRun must be true or false, not {dry_run!r}")
    return PlanSpec(
        source_prefix=src_prefix, dest_prefix=dst_prefix, domains=tuple(domains),
        node_selector=parse_selector(source.get("nodeSelector")),
        format=fmt, backing_chain=chain, bandwidth=bandwidth,
        convergence=_choice(dest, "convergence", Convergence, None, where="spec.destination"),
        detect_zeroes=detect_zeroes,
        verify=_choice(raw, "verify", Verify, None),
        max_active=_limit(raw, "maxActive", DEFAULT_MAX_ACTIVE, MAX_ACTIVE_LIMIT),
        max_active_per_node=_limit(raw, "maxActivePerNode", DEFAULT_MAX_ACTIVE_PER_NODE,
                                   MAX_ACTIVE_PER_NODE_LIMIT),
        pivot=_choice(raw, "pivot", PivotMode, PivotMode.MANUAL),
        dry_run=dry_run,
        retention=_choice(raw, "sourceRetention", Retention, Retention.KEEP),
    )
