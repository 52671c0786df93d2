"""Status, conditions and Events of a BlockCopy, built from decisions. Pure: the caller
passes the clock and does the writing."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from blockcopy.core.reconcile import Decision
from blockcopy.model.api import BlockCopySpec, Phase
from blockcopy.model.observation import DiskState

# Condition types, each True in the phases named, so `kubectl wait --for=condition=X` works.
MIRRORED = "Mirrored"  # the destination reached sync (stays True after a pivot)
PIVOTED = "Pivoted"
ABORTED = "Aborted"
FAILED = "Failed"
# kstatus conventions (Flux's health checks, kubectl-wait-style tooling):
READY = "Ready"  # the object reached what its spec asks for (Mirrored, Pivoted, Aborted)
RECONCILING = "Reconciling"  # a transition is in progress
STALLED = "Stalled"  # it cannot progress (Failed)

_WARNING_PHASES = {Phase.FAILED}
# The CRD bounds status.message and condition messages (the API server refuses longer ones);
# libvirt's messages are short, but a path-heavy one must not make a status write fail.
MESSAGE_LIMIT = 32768


def bounded(message: str, limit: int = MESSAGE_LIMIT) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


def timestamp(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def progress_text(cur: int | None, end: int | None) -> str:
    """cur/end in whole percent; 100% only once cur == end."""
    if not end or cur is None or (end <= 1 and cur == 0):
        return "0%"
    if cur >= end:
        return "100%"
    return f"{min(99, cur * 100 // end)}%"


def where_asked(phase: Phase, spec: BlockCopySpec | None) -> bool:
    """Is the object where its spec asks (kstatus' Ready)? A finished object is (nothing more
    will happen); a Mirrored one only when neither a pivot nor an abort is asked for. Without
    a spec (unparsable), Mirrored counts as done."""
    if phase in (Phase.PIVOTED, Phase.ABORTED):
        return True
    if phase != Phase.MIRRORED:
        return False
    return spec is None or not (spec.pivot or spec.abort)


def _condition_states(phase: Phase, was_mirrored: bool, spec: BlockCopySpec | None
                      ) -> dict[str, bool]:
    ready = where_asked(phase, spec)
    return {
        MIRRORED: phase in (Phase.MIRRORED, Phase.PIVOTING, Phase.PIVOTED)
        or (was_mirrored and phase in (Phase.ABORTING, Phase.ABORTED)),
        PIVOTED: phase == Phase.PIVOTED,
        ABORTED: phase == Phase.ABORTED,
        FAILED: phase == Phase.FAILED,
        READY: ready,
        RECONCILING: not ready and phase != Phase.FAILED,  # something asked is not done yet
        STALLED: phase == Phase.FAILED,
    }


def conditions(
    phase: Phase,
    *,
    reason: str,
    message: str,
    was_mirrored: bool,
    generation: int | None,
    now: dt.datetime,
    previous: Sequence[Mapping[str, Any]] | None,
    extra: Sequence[Mapping[str, Any]] = (),
    spec: BlockCopySpec | None = None,
) -> list[dict[str, Any]]:
    """The standard-shaped conditions list; lastTransitionTime moves only on a flip."""
    before = {c.get("type"): c for c in previous or ()}
    result = []
    for ctype, is_true in _condition_states(phase, was_mirrored, spec).items():
        value = "True" if is_true else "False"
        old = before.get(ctype)
        changed = old is None or old.get("status") != value
        result.append({
            "type": ctype,
            "status": value,
            "reason": reason or phase.value,
            "message": bounded(message) if is_true else f"phase is {phase.value}",
            "lastTransitionTime": timestamp(now) if changed or old is None
            else old.get("lastTransitionTime"),
            "observedGeneration": generation,
        })
    for cond in extra:
        old = before.get(cond["type"])
        same = old is not None and old.get("status") == cond["status"]
        result.append({**cond, "observedGeneration": generation,
                       "lastTransitionTime": old.get("lastTransitionTime")
                       if same and old is not None else timestamp(now)})
    return result


def build_status(
    decision: Decision,
    *,
    previous: Mapping[str, Any],
    disk: DiskState | None,
    node_name: str,
    generation: int | None,
    now: dt.datetime,
    started: Mapping[str, Any] | None = None,
    extra_conditions: Sequence[Mapping[str, Any]] = (),
    spec: BlockCopySpec | None = None,
) -> dict[str, Any]:
    """The whole status (except kopf's own stanza) for a decision.

    ``started`` carries the fields recorded when a job was started (source, flags, start time).
    """
    old_phase = previous.get("phase")
    phase = decision.phase
    status: dict[str, Any] = {
        k: previous[k] for k in ("cur", "end", "bandwidth", "source", "target", "format", "flags",
                                 "startedSpec", "startTime", "mirroredTime", "completionTime",
                                 "plan", "layers", "createdFiles", "group", "copyMode",
                                 "destIdentity", "zeroDetection", "verification")
        if k in previous
    }
    status.update(started or {})
    job = disk.job if disk is not None else None
    if job is not None and disk is not None and disk.mirror is not None:
        status["cur"], status["end"], status["bandwidth"] = job.cur, job.end, job.bandwidth
    if phase in (Phase.PIVOTED, Phase.MIRRORED) and "end" in status:
        status["cur"] = status["end"]  # a finished mirror has copied everything
    status["progress"] = progress_text(status.get("cur"), status.get("end"))
    if phase in (Phase.MIRRORED, Phase.PIVOTING) and not status.get("mirroredTime"):
        status["mirroredTime"] = timestamp(now)
    if phase in (Phase.PIVOTED, Phase.ABORTED, Phase.FAILED) and old_phase != phase.value:
        status["completionTime"] = timestamp(now)
    status.update({
        "phase": phase.value,
        "nodeName": node_name,
        "message": bounded(decision.message),
        "observedGeneration": generation,
        "conditions": conditions(
            phase, reason=decision.reason, message=decision.message,
            was_mirrored=bool(status.get("mirroredTime")), generation=generation, now=now,
            previous=previous.get("conditions"), extra=extra_conditions, spec=spec),
    })
    return status


def flipped_to_true(previous: Sequence[Mapping[str, Any]] | None,
                    conditions: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The trouble conditions that are True now and were not True before (each deserves a
    Warning Event). Only SpecChangeRefused is trouble when True: Converging True is good
    news, and ConvergenceAssist posts its own Event where it acts. (A Warning for every
    Converging flip was most of the Events of 50 copies on a busy node.)"""
    before = {c.get("type"): c.get("status") for c in previous or ()}
    return [c for c in conditions if c["type"] == SPEC_CHANGE_REFUSED
            and c["status"] == "True" and before.get(c["type"]) != "True"]


def phase_event(old_phase: str | None, decision: Decision) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Event for a phase change, or None if no change."""
    if old_phase == decision.phase.value:
        return None
    etype = "Warning" if decision.warning or decision.phase in _WARNING_PHASES else "Normal"
    return etype, decision.reason or decision.phase.value, \
        f"{decision.phase.value}: {decision.message}" if decision.message else decision.phase.value


SPEC_CHANGE_REFUSED = "SpecChangeRefused"


def spec_change_conditions(*, changed: Sequence[str], invalid: Sequence[str],
                           previous: Sequence[Mapping[str, Any]] | None
                           ) -> list[dict[str, Any]]:
    """The SpecChangeRefused condition: True while an immutable field differs from what the
    job started with (or a mutable one has an invalid value), False once it matches again,
    absent if it never was refused."""
    was = any(c.get("type") == SPEC_CHANGE_REFUSED for c in previous or ())
    if changed:
        return [{"type": SPEC_CHANGE_REFUSED, "status": "True", "reason": "ImmutableField",
                 "message": f"spec.{', spec.'.join(changed)} cannot change once the job "
                 "started; the agent keeps working from the values it started with"}]
    if invalid:
        return [{"type": SPEC_CHANGE_REFUSED, "status": "True", "reason": "InvalidValue",
                 "message": f"refused an invalid change ({'; '.join(invalid)}); the job "
                 "goes on with the values in effect"}]
    if was:
        return [{"type": SPEC_CHANGE_REFUSED, "status": "False", "reason": "SpecMatches",
                 "message": "the immutable fields match what the job started with"}]
    return []
