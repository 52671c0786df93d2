"""A BlockCopyPlan's status: counts per phase, bytes, rate and time left for the whole plan,
per-node counts (bounded), the disks with their state, and the kstatus conditions (Ready,
Reconciling, Stalled). Pure: the caller passes the clock."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from blockcopy.core.planning import (
    ACTIVE_PHASES,
    FINAL_STATES,
    WAITING,
    Child,
    PlannedDisk,
    child_name,
)
from blockcopy.core.progress import ProgressWindow, duration
from blockcopy.core.status import bounded, timestamp
from blockcopy.model.api import Phase
from blockcopy.model.plan import PivotMode, PlanSpec

MAX_NODES = 256  # status.nodes lists at most this many nodes (status.nodesTruncated says so)


class PlanPhase:
    PENDING = "Pending"  # nothing selected yet (no inventory)
    PLANNED = "Planned"  # dryRun: status.disks lists what would be copied
    RUNNING = "Running"
    AWAITING_PIVOT = "AwaitingPivot"  # Manual: every copy Mirrored, none pivots until asked
    COMPLETED = "Completed"
    FAILED = "Failed"  # every disk ended, some failed (or the spec cannot be acted on)


@dataclasses.dataclass
class Counts:
    total: int = 0
    queued: int = 0
    copying: int = 0
    mirrored: int = 0
    pivoted: int = 0
    failed: int = 0
    waiting: int = 0
    bytes_done: int = 0
    bytes_total: int = 0

    def to_status(self) -> dict[str, int]:
        return {"total": self.total, "queued": self.queued, "copying": self.copying,
                "mirrored": self.mirrored, "pivoted": self.pivoted, "failed": self.failed,
                "waiting": self.waiting}


def bucket(child: Child | None, state: str | None) -> str:
    """Which count a disk is in."""
    if child is None:
        if state in FINAL_STATES:
            return "failed"
        return "waiting" if state == WAITING else "queued"
    if child.phase in (Phase.PENDING, Phase.QUEUED, None):
        return "queued"
    if child.phase in (Phase.PREPARING, Phase.COPYING):
        return "copying"
    if child.phase in (Phase.MIRRORED, Phase.PIVOTING):
        return "mirrored"
    if child.phase is Phase.PIVOTED:
        return "pivoted"
    return "failed"  # Aborting, Aborted, Failed


def count(disks: Sequence[PlannedDisk], children: Mapping[int, Child],
          states: Mapping[int, tuple[str, str]]) -> tuple[Counts, dict[str, Counts]]:
    """The plan's counts and each node's."""
    whole, nodes = Counts(), dict[str, Counts]()
    for disk in disks:
        child = children.get(disk.index)
        which = bucket(child, (states.get(disk.index) or ("", ""))[0])
        size = max(disk.bytes, child.end if child else 0)
        done = 0
        if child is not None:
            done = size if which in ("mirrored", "pivoted") else min(child.cur, size)
        node = nodes.setdefault(disk.node, Counts())
        for counts in (whole, node):
            counts.total += 1
            setattr(counts, which, getattr(counts, which) + 1)
            counts.bytes_total += size
            counts.bytes_done += done
    return whole, nodes


def phase_of(spec: PlanSpec, counts: Counts, *, selected: bool) -> tuple[str, str]:
    """The plan's phase and a sentence about it."""
    if spec.dry_run:
        return PlanPhase.PLANNED, f"dry run: {counts.total} disks would be copied"
    if not selected:
        return PlanPhase.PENDING, "no disk inventory to select from yet"
    ended = counts.pivoted + counts.failed
    if ended == counts.total:
        if counts.failed:
            return PlanPhase.FAILED, (f"{counts.pivoted} of {counts.total} disks pivoted, "
                                      f"{counts.failed} failed")
        return PlanPhase.COMPLETED, f"all {counts.total} disks pivoted"
    if spec.pivot is PivotMode.MANUAL and ended + counts.mirrored == counts.total:
        return PlanPhase.AWAITING_PIVOT, (f"{counts.mirrored} disks Mirrored: set spec.pivot "
                                          "to Automatic to pivot them")
    waiting = f", {counts.waiting} waiting for their node's agent" if counts.waiting else ""
    return PlanPhase.RUNNING, (f"{counts.pivoted + counts.mirrored} of {counts.total} disks "
                               f"mirrored or pivoted, {counts.copying} copying, "
                               f"{counts.queued} queued{waiting}")


def conditions(phase: str, message: str, *, generation: int | None, now: dt.datetime,
               previous: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """kstatus: Ready when done (or planned), Reconciling while it works, Stalled when it
    cannot go on (failed disks, or a spec it cannot act on)."""
    values = {
        "Ready": phase in (PlanPhase.COMPLETED, PlanPhase.PLANNED),
        "Reconciling": phase in (PlanPhase.PENDING, PlanPhase.RUNNING),
        "Stalled": phase == PlanPhase.FAILED,
    }
    before = {c.get("type"): c for c in previous or ()}
    result = []
    for ctype, is_true in values.items():
        value = "True" if is_true else "False"
        old = before.get(ctype)
        same = old is not None and old.get("status") == value
        result.append({"type": ctype, "status": value, "reason": phase,
                       "message": bounded(message, 1024),
                       "lastTransitionTime": old.get("lastTransitionTime")
                       if same and old is not None else timestamp(now),
                       "observedGeneration": generation})
    return result


def disk_entries(disks: Sequence[PlannedDisk], children: Mapping[int, Child],
                 states: Mapping[int, tuple[str, str]], plan: str) -> list[dict[str, Any]]:
    entries = []
    for disk in disks:
        entry = disk.to_status()
        child = children.get(disk.index)
        state, message = states.get(disk.index) or ("", "")
        if child is not None:
            entry["child"] = child.name
            entry["phase"] = child.phase.value if child.phase else Phase.PENDING.value
            if child.phase is Phase.FAILED and child.message:
                entry["message"] = bounded(child.message, 1024)
        elif state:
            entry["state"] = state
            entry["message"] = bounded(message, 1024)
        else:
            entry["child"] = child_name(plan, disk.index)  # the name it will have
        entries.append(entry)
    return entries


def node_entries(nodes: Mapping[str, Counts]) -> tuple[list[dict[str, Any]], bool]:
    names = sorted(nodes)
    return ([{"name": n, **nodes[n].to_status()} for n in names[:MAX_NODES]],
            len(names) > MAX_NODES)


def estimate(window: ProgressWindow, counts: Counts, now: float) -> dict[str, Any]:
    """rate (bytes/s) and eta of the whole plan, from the plan's samples over time."""
    window.add(now, counts.bytes_done, counts.bytes_total)
    guess = window.estimate()
    if guess is None:
        return {}
    out: dict[str, Any] = {"rate": max(0, guess.rate)}
    remaining = counts.bytes_total - counts.bytes_done
    if remaining <= 0:
        out["eta"] = "0s"
    elif guess.rate > 0:
        out["eta"] = duration(remaining / guess.rate)
    return out


def active_count(children: Mapping[int, Child]) -> int:
    return sum(1 for c in children.values() if c.phase in ACTIVE_PHASES)


def build(spec: PlanSpec, *, plan: str, disks: Sequence[PlannedDisk],
          children: Mapping[int, Child], states: Mapping[int, tuple[str, str]],
          selected: bool, excluded: Sequence[str], generation: int | None,
          previous: Mapping[str, Any], now: dt.datetime, window: ProgressWindow,
          clock: float) -> dict[str, Any]:
    whole, nodes = count(disks, children, states)
    phase, message = phase_of(spec, whole, selected=selected)
    node_list, truncated = node_entries(nodes)
    status: dict[str, Any] = {
        "phase": phase, "message": message, **whole.to_status(),
        "active": active_count(children),
        "bytesDone": whole.bytes_done, "bytesTotal": whole.bytes_total,
        "progress": f"{whole.pivoted}/{whole.total}",
        "nodes": node_list, "nodesTruncated": truncated,
        "disks": disk_entries(disks, children, states, plan),
        "excluded": list(excluded),
        "observedGeneration": generation,
        "conditions": conditions(phase, message, generation=generation, now=now,
                                 previous=previous.get("conditions")),
    }
    if selected and not spec.dry_run:
        status.update({"rate": 0, "eta": None, **estimate(window, whole, clock)})
    if phase in (PlanPhase.COMPLETED, PlanPhase.FAILED):
        status["rate"], status["eta"] = 0, None
    status["startTime"] = previous.get("startTime") or timestamp(now)
    return status


def invalid(message: str, *, generation: int | None, now: dt.datetime,
            previous: Mapping[str, Any]) -> dict[str, Any]:
    """The status of a plan whose spec cannot be acted on (nothing is selected)."""
    return {"phase": PlanPhase.FAILED, "message": message, "observedGeneration": generation,
            "conditions": conditions(PlanPhase.FAILED, message, generation=generation, now=now,
                                     previous=previous.get("conditions"))}
