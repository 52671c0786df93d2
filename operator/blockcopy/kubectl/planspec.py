"""``plan create``: a BlockCopyPlan from the command line's flags, checked as the plan
controller checks it (``blockcopy.model.plan.parse_plan``) before anything is sent. Pure."""

from __future__ import annotations

import argparse
import posixpath
import re
from collections.abc import Sequence
from typing import Any

from blockcopy.kubectl.errors import USAGE, PluginError
from blockcopy.model.api import GROUP, VERSION, Verify
from blockcopy.model.plan import MAX_NAME, PLAN_KIND, PivotMode, PlanError, Retention, parse_plan

# A plan's name: a DNS subdomain that is also a label value (its children carry it).
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*"
                        r"[A-Za-z0-9])?")


def _choice(kind: type[PivotMode] | type[Retention] | type[Verify]) -> Any:
    """An argparse type: a value of ``kind`` in any case (manual, AUTOMATIC)."""
    def parse(text: str) -> str:
        for member in kind:
            if member.value.lower() == text.strip().lower():
                return member.value
        raise argparse.ArgumentTypeError(
            f"{text!r}: one of {', '.join(m.value for m in kind)}")
    parse.__name__ = kind.__name__
    return parse


pivot_mode = _choice(PivotMode)
retention = _choice(Retention)
verify_mode = _choice(Verify)


def split_items(values: Sequence[str] | None) -> list[str]:
    """Repeated and comma-separated flag values, in order, each once."""
    return list(dict.fromkeys(v.strip() for item in values or [] for v in item.split(",")
                              if v.strip()))


def node_selector(items: Sequence[str]) -> dict[str, Any] | None:
    """``--node-selector`` as a label selector: ``key=value`` (also ``key==value``),
    ``key!=value``, ``key`` (the label exists) and ``!key`` (it does not), as in ``kubectl
    get -l``. None for no item."""
    labels: dict[str, str] = {}
    expressions: list[dict[str, Any]] = []
    for item in items:
        key, op, value = item, "", ""
        for sep in ("!=", "==", "="):
            if sep in item:
                key, value = (s.strip() for s in item.split(sep, 1))
                op = sep
                break
        negated = not op and key.startswith("!")
        key = key.removeprefix("!").strip() if negated else key
        if not _LABEL_KEY.fullmatch(key) or len(key) > 317 or (op and len(value) > 63):
            raise PluginError(f"--node-selector {item!r}: not KEY=VALUE, KEY!=VALUE, KEY or "
                              "!KEY with a label key", USAGE)
        if op in ("=", "=="):
            if labels.get(key, value) != value:
                raise PluginError(f"--node-selector: {key} given twice", USAGE)
            labels[key] = value
        elif op == "!=":
            expressions.append({"key": key, "operator": "NotIn", "values": [value]})
        else:
            expressions.append({"key": key, "operator": "DoesNotExist" if negated
                                else "Exists"})
    selector: dict[str, Any] = {}
    if labels:
        selector["matchLabels"] = labels
    if expressions:
        selector["matchExpressions"] = expressions
    return selector or None


def _prefix(flag: str, value: str) -> str:
    if not posixpath.isabs(value):
        raise PluginError(f"{flag} must be an absolute directory, not {value!r}", USAGE)
    normal = posixpath.normpath(value)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    if normal == "/":
        raise PluginError(f"{flag} must be a directory below /, not {value!r}", USAGE)
    return normal


def plan_body(*, name: str, namespace: str, source: str, dest: str,
              domains: Sequence[str] = (), nodes: Sequence[str] = (),
              format: str | None = None, backing_chain: str | None = None,
              bandwidth: str | None = None, convergence: str | None = None,
              max_active: int | None = None, max_active_per_node: int | None = None,
              pivot: str = PivotMode.MANUAL.value, preview: bool = False,
              source_retention: str | None = None, verify: str | None = None,
              detect_zeroes: bool | None = None) -> dict[str, Any]:
    """The BlockCopyPlan the flags describe. Fields not given are left out (the API server
    fills its defaults: maxActive 4, maxActivePerNode 1, sourceRetention Keep), except
    ``pivot``, always written (Manual unless asked), and ``dryRun: true`` with ``preview``
    (the controller lists the disks in status.disks and copies nothing). ``verify`` and
    ``detect_zeroes`` are left out unless given: the children then keep BlockCopy's defaults
    (an absent verify is not an explicit Sample: see docs/api.md). Raises PluginError
    (USAGE) with the reason for what the controller or the API server would refuse."""
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        raise PluginError(f"plan name {name!r}: lower-case letters, digits, '-' and '.', at "
                          f"most {MAX_NAME} characters (its children are named after it)",
                          USAGE)
    src: dict[str, Any] = {"pathPrefix": _prefix("--from", source)}
    if domains:
        src["domains"] = list(domains)
    selector = node_selector(nodes)
    if selector is not None:
        src["nodeSelector"] = selector
    dst: dict[str, Any] = {"pathPrefix": _prefix("--to", dest)}
    for key, value in (("format", format), ("backingChain", backing_chain),
                       ("bandwidth", bandwidth), ("convergence", convergence),
                       ("detectZeroes", detect_zeroes)):
        if value is not None:
            dst[key] = value
    spec: dict[str, Any] = {"source": src, "destination": dst}
    if max_active is not None:
        spec["maxActive"] = max_active
    if max_active_per_node is not None:
        spec["maxActivePerNode"] = max_active_per_node
    spec["pivot"] = pivot
    if verify is not None:
        spec["verify"] = verify
    if source_retention is not None:
        spec["sourceRetention"] = source_retention
    if preview:
        spec["dryRun"] = True
    try:
        parse_plan(spec)
    except PlanError as exc:
        flag = {"spec.destination.bandwidth": "--bandwidth", "spec.maxActive ": "--max-active ",
                "spec.maxActivePerNode": "--max-active-per-node",
                "spec.destination.format": "--format",
                "spec.destination.backingChain": "--backing-chain",
                "spec.destination.detectZeroes": "--no-detect-zeroes", "spec.verify": "--verify",
                "spec.destination.pathPrefix": "--to", "spec.source.pathPrefix": "--from"}
        message = str(exc)
        for field, option in flag.items():
            message = message.replace(field, option)
        raise PluginError(message, USAGE) from None
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": PLAN_KIND,
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def from_args(args: argparse.Namespace, namespace: str) -> dict[str, Any]:
    """``plan create``'s flags as the plan's body (see plan_body)."""
    return plan_body(
        name=args.name, namespace=namespace, source=args.source, dest=args.dest,
        domains=split_items(args.domain), nodes=split_items(args.node_selector),
        format=args.format, backing_chain=args.backing_chain, bandwidth=args.bandwidth,
        convergence=args.convergence, max_active=args.max_active,
        max_active_per_node=args.max_active_per_node, pivot=args.pivot,
        preview=args.preview, source_retention=args.source_retention, verify=args.verify,
        detect_zeroes=False if args.no_detect_zeroes else None)
