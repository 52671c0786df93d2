"""What ``kubectl blockcopy plan`` prints of BlockCopyPlans (their rows, the summary and the
disks of ``plan status``) and what ``plan wait`` decides. Pure: objects in, text out."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from blockcopy.kubectl.output import age
from blockcopy.kubectl.text import human_rate, table
from blockcopy.model.api import GROUP
from blockcopy.model.plan import PLAN_PLURAL

PLAN_RESOURCE = f"{PLAN_PLURAL}.{GROUP}"  # as kubectl prints it
# The plan's phases (blockcopy.core.plan_status.PlanPhase, which the plugin does not import).
PLAN_PHASES = ("Pending", "Planned", "Running", "AwaitingPivot", "Completed", "Failed")
PLAN_TERMINAL = frozenset({"Completed", "Failed"})
# `plan wait --for Mirrored`: every disk Mirrored or past it (pivoted), whatever the phase.
MIRRORED = "Mirrored"
WAIT_FOR = (*PLAN_PHASES, MIRRORED)
COUNTS = ("total", "pivoted", "mirrored", "copying", "queued", "failed", "waiting")


def wait_target(text: str) -> str:
    """A phase ``plan wait --for`` takes, in any case (argparse type)."""
    for phase in WAIT_FOR:
        if phase.lower() == text.strip().lower():
            return phase
    raise argparse.ArgumentTypeError(f"unknown plan phase {text!r}; one of "
                                     f"{', '.join(WAIT_FOR)}")


def human_bytes(value: Any) -> str:
    """Bytes in binary units (``1.5 GiB``); empty when unknown."""
    rate = human_rate(value)
    return rate.removesuffix("/s")


def _status(plan: Mapping[str, Any]) -> Mapping[str, Any]:
    return plan.get("status") or {}


def _num(status: Mapping[str, Any], key: str) -> int:
    value = status.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def plan_phase(plan: Mapping[str, Any]) -> str:
    return str(_status(plan).get("phase") or "")


def bytes_cell(status: Mapping[str, Any]) -> str:
    if "bytesTotal" not in status:
        return ""
    return f"{human_bytes(_num(status, 'bytesDone'))}/{human_bytes(_num(status, 'bytesTotal'))}"


def plan_rows(plans: Sequence[Mapping[str, Any]], *, namespaces: bool, wide: bool,
              now: dt.datetime | None = None) -> tuple[list[str], list[list[Any]]]:
    """``plan list``: one row per plan (wide: and the prefixes, the pivot mode, the copies
    active of the limit, the age)."""
    headers = ["NAME", "PHASE", "PIVOTED", "MIRRORED", "COPYING", "QUEUED", "FAILED",
               "BYTES", "RATE", "ETA"]
    if namespaces:
        headers.insert(0, "NAMESPACE")
    if wide:
        headers += ["WAITING", "FROM", "TO", "PIVOT", "ACTIVE", "AGE"]
    when = now or dt.datetime.now(dt.UTC)
    rows = []
    for plan in plans:
        meta, spec, status = plan["metadata"], plan.get("spec") or {}, _status(plan)
        phase = plan_phase(plan)
        has = "total" in status
        row: list[Any] = [
            meta["name"], phase, status.get("progress") or "",
            *(status.get(k) if has else "" for k in ("mirrored", "copying", "queued",
                                                     "failed")),
            bytes_cell(status), human_rate(status.get("rate")) if phase == "Running" else "",
            status.get("eta") or ""]
        if namespaces:
            row.insert(0, meta.get("namespace"))
        if wide:
            limit = f"{spec.get('maxActive', 4)}/{spec.get('maxActivePerNode', 1)}"
            row += [status.get("waiting") if has else "",
                    (spec.get("source") or {}).get("pathPrefix"),
                    (spec.get("destination") or {}).get("pathPrefix"),
                    "dry run" if spec.get("dryRun") else spec.get("pivot") or "Manual",
                    f"{_num(status, 'active')} of {limit}",
                    age(meta.get("creationTimestamp"), when)]
        rows.append(row)
    return headers, rows


def summary(plan: Mapping[str, Any]) -> str:
    """``plan status``: the plan's phase, counts, bytes, rate and ETA, as ``kubectl
    describe`` lays fields out."""
    meta, spec, status = plan["metadata"], plan.get("spec") or {}, _status(plan)
    source, dest = spec.get("source") or {}, spec.get("destination") or {}
    phase = plan_phase(plan) or "(no status yet)"
    message = " ".join(str(status.get("message") or "").split())
    pivot = spec.get("pivot") or "Manual"
    fields: list[tuple[str, str]] = [
        ("Name", meta["name"]), ("Namespace", str(meta.get("namespace") or "")),
        ("Phase", phase + (f": {message}" if message else "")),
        ("Pivot", pivot + (" (dry run: nothing is copied)" if spec.get("dryRun") else "")),
        ("From", f"{source.get('pathPrefix')} -> {dest.get('pathPrefix')}"
         + (f" (domains {', '.join(source['domains'])})" if source.get("domains") else "")),
    ]
    if "total" in status:
        counts = ", ".join(f"{_num(status, k)} {k}" for k in COUNTS[1:])
        fields.append(("Disks", f"{_num(status, 'total')}: {counts}"))
        done, total = _num(status, "bytesDone"), _num(status, "bytesTotal")
        share = f" ({100 * done // total}%)" if total else ""
        fields.append(("Bytes", f"{human_bytes(done)} of {human_bytes(total)}{share}"))
        rate = human_rate(status.get("rate")) if plan_phase(plan) == "Running" else ""
        fields.append(("Rate", (rate or "-") + f", ETA {status.get('eta') or '-'}"))
        fields.append(("Active", f"{_num(status, 'active')} (at most "
                       f"{spec.get('maxActive', 4)}, {spec.get('maxActivePerNode', 1)} a node)"))
    if status.get("excluded"):
        fields.append(("Excluded", "; ".join(str(e) for e in status["excluded"])))
    if status.get("observedGeneration") not in (None, meta.get("generation")):
        fields.append(("Note", "the controller has not seen the latest spec yet"))
    width = max(len(k) for k, _ in fields) + 2
    return "\n".join(f"{k + ':':<{width}}{v}" for k, v in fields)


def disk_rows(plan: Mapping[str, Any], children: Sequence[Mapping[str, Any]], *,
              wide: bool) -> tuple[list[str], list[list[Any]]]:
    """``plan status``: the plan's disks (status.disks) with their child BlockCopy's live
    phase, progress, rate and ETA (the plan's own entry when the child is not there)."""
    by_name = {c["metadata"]["name"]: c for c in children}
    headers = ["CHILD", "NODE", "DOMAIN", "DISK", "PHASE", "PROGRESS", "RATE", "ETA"]
    if wide:
        headers += ["SOURCE", "DEST", "SIZE"]
    headers.append("MESSAGE")
    rows = []
    for entry in _status(plan).get("disks") or []:
        child = by_name.get(str(entry.get("child") or ""))
        cst = (child or {}).get("status") or {}
        made = child is not None
        phase = cst.get("phase") or (entry.get("state") or entry.get("phase") or
                                     ("Pending" if made else "(not created)"))
        message = cst.get("message") if made else entry.get("message")
        row: list[Any] = [
            entry.get("child") if made or not entry.get("state") else "-",
            entry.get("node"), entry.get("domain"), entry.get("disk"), phase,
            cst.get("progress") or "",
            human_rate(cst.get("rate")) if phase == "Copying" else "", cst.get("eta") or ""]
        if wide:
            row += [entry.get("source"), entry.get("destination"),
                    human_bytes(entry.get("bytes"))]
        row.append(" ".join(str(message or "").split()))
        rows.append(row)
    return headers, rows


def status_text(plan: Mapping[str, Any], children: Sequence[Mapping[str, Any]], *,
                wide: bool) -> str:
    text = summary(plan)
    headers, rows = disk_rows(plan, children, wide=wide)
    if rows:
        return f"{text}\n\n{table(headers, rows)}"
    spec = plan.get("spec") or {}
    why = ("no disk is selected yet" if not plan_phase(plan) or plan_phase(plan) == "Pending"
           else "the plan has no disk" if not spec.get("dryRun") else "no disk would be copied")
    return f"{text}\n\n({why})"


def reached(plan: Mapping[str, Any], want: str) -> bool:
    """Whether ``plan`` is in phase ``want``; ``Mirrored``: every one of its disks is
    Mirrored or pivoted."""
    status = _status(plan)
    if want == MIRRORED:
        total = _num(status, "total")
        return total > 0 and _num(status, "mirrored") + _num(status, "pivoted") == total
    return plan_phase(plan) == want


def cannot_reach(plan: Mapping[str, Any], want: str) -> str | None:
    """Why ``plan`` will never be ``want`` (it ended otherwise, or a disk of it failed while
    waiting for every disk Mirrored), or None."""
    status, phase = _status(plan), plan_phase(plan)
    message = " ".join(str(status.get("message") or "").split())
    name = plan["metadata"]["name"]
    if reached(plan, want):
        return None
    if phase in PLAN_TERMINAL and phase != want:
        return f"{name} is {phase}" + (f": {message}" if message else "")
    if want == MIRRORED and _num(status, "failed"):
        return f"{name}: {_num(status, 'failed')} of its disks failed"
    return None


def pending(plan: Mapping[str, Any]) -> str:
    """Where ``plan`` is, for a timeout's message."""
    status = _status(plan)
    progress = f", {status['progress']} pivoted" if status.get("progress") else ""
    mirrored = f", {_num(status, 'mirrored')} mirrored" if "total" in status else ""
    return f"{plan['metadata']['name']} is {plan_phase(plan) or 'new'}{progress}{mirrored}"
