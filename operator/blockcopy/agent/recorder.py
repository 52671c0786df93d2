"""Recording what happened: status (through each object's StatusWriter), Kubernetes Events
and Prometheus metrics. The follower decides and acts; this module only writes it down, the
same way for every decision (decide, act, then always record)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from blockcopy import __version__
from blockcopy.agent.writer import StatusWriter
from blockcopy.core import status
from blockcopy.core.convergence import CONVERGING
from blockcopy.core.pace import DEFAULT_BUDGET, ProgressPace
from blockcopy.core.progress import Estimate
from blockcopy.core.reconcile import Decision
from blockcopy.model.api import NODE_LABEL, TERMINAL_PHASES, BlockCopySpec, Phase
from blockcopy.model.kubeapi import Kube, ObjectRef
from blockcopy.model.metrics import NULL_METRICS, Key, Metrics
from blockcopy.model.observation import DiskState

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _seconds(start: str, end: str) -> float:
    parse = dt.datetime.fromisoformat
    return max(0.0, (parse(end) - parse(start)).total_seconds())


def phase_of(raw_status: Mapping[str, Any] | None) -> Phase | None:
    try:
        return Phase(str((raw_status or {}).get("phase")))
    except ValueError:
        return None


def without_kopf(raw_status: Mapping[str, Any] | None) -> dict[str, Any]:
    """The status fields the agent owns (kopf keeps its own bookkeeping under status.kopf)."""
    return {k: v for k, v in (raw_status or {}).items() if k != "kopf"}


class PhaseCounts:
    """The phase of every object this agent owns, and how far each job has copied: keeps
    the per-phase gauge and the copied-bytes counters of the metrics equal to them."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._phases: dict[Key, str] = {}
        self._cur: dict[Key, int] = {}

    def set(self, key: Key, phase: str | None) -> None:
        old = self._phases.pop(key, None)
        if phase is not None:
            self._phases[key] = phase
        for changed in {old, phase} - {None}:
            assert changed is not None
            self.metrics.objects(changed, self.count(changed))

    def count(self, phase: str) -> int:
        """How many of the objects are in ``phase`` now."""
        return sum(1 for p in self._phases.values() if p == phase)

    def forget(self, key: Key) -> None:
        self.set(key, None)
        self._cur.pop(key, None)

    def copied(self, key: Key, cur: int | None) -> None:
        """Count the growth of libvirt's cur for one job (a restart adopts the last value)."""
        if cur is None:
            return
        last = self._cur.get(key)
        grown = cur - last if last is not None else cur
        if grown > 0:
            self.metrics.copied(key, grown)
        self._cur[key] = max(cur, last or 0)


class Recorder:
    """Agent-wide: the API client for Events, the metrics and per-phase counts, the progress
    pace, the clock."""

    def __init__(self, *, kube: Kube, node_name: str, status_interval: float,
                 progress_budget: float = DEFAULT_BUDGET, clock: Clock = utc_now,
                 metrics: Metrics = NULL_METRICS):
        self.kube, self.node_name = kube, node_name
        self.clock = clock
        self.metrics = metrics
        self.phase_counts = PhaseCounts(self.metrics)
        self.pace = ProgressPace(interval=status_interval, budget=progress_budget,
                                 copying=lambda: self.phase_counts.count(Phase.COPYING))
        self._posting: set[asyncio.Task[None]] = set()  # asyncio holds tasks weakly

    def for_object(self, ref: ObjectRef, stored_status: Mapping[str, Any] | None
                   ) -> ObjectRecorder:
        return ObjectRecorder(self, ref, without_kopf(stored_status))

    def post_event(self, ref: ObjectRef, *, type: str, reason: str, message: str) -> None:
        """Fire and forget: an Event must never hold up a status write or an action."""
        task = asyncio.get_running_loop().create_task(
            self.kube.post_event(ref, type=type, reason=reason, message=message))
        self._posting.add(task)
        task.add_done_callback(self._posting.discard)

    def watch_event(self, stream: str, body: Mapping[str, Any]) -> None:
        """Count a watch event by whose object it was (other-node must stay 0: the API
        server filters them out)."""
        label = ((body.get("metadata") or {}).get("labels") or {}).get(NODE_LABEL)
        owner = "unclaimed" if not label else \
            "this-node" if label == self.node_name else "other-node"
        self.metrics.watch_event(stream, owner)

    def forget(self, key: Key) -> None:
        """The object is gone: drop it from the counts and its per-copy series."""
        self.phase_counts.forget(key)
        self.metrics.forget(key)

    async def drain(self) -> None:
        """Wait for the Events being posted (at shutdown, and in tests)."""
        while self._posting:
            await asyncio.gather(*list(self._posting), return_exceptions=True)


@dataclasses.dataclass
class ObjectRecorder:
    """One object: its writer, the status as this agent last wrote it (kopf's view of the
    object lags one watch event behind our own writes), and metric bookkeeping."""

    agent: Recorder
    ref: ObjectRef
    status: dict[str, Any]
    writer: StatusWriter = dataclasses.field(init=False)
    pivot_issued: float | None = None  # loop time of the pivot call, for its latency

    def __post_init__(self) -> None:
        self.writer = StatusWriter(self.agent.kube, namespace=self.ref.namespace,
                                   name=self.ref.name, interval=self.agent.pace.interval,
                                   stored=dict(self.status) or None)
        self.agent.phase_counts.set(self.key, self.status.get("phase"))

    @property
    def key(self) -> tuple[str, str]:
        return self.ref.namespace, self.ref.name

    @property
    def phase(self) -> Phase | None:
        return phase_of(self.status)

    async def record(self, decision: Decision, *, disk: DiskState | None,
                     generation: int | None, started: Mapping[str, Any] | None = None,
                     extra: Sequence[Mapping[str, Any]] = (), intent: bool = False,
                     fields: Mapping[str, Any] | None = None,
                     spec: BlockCopySpec | None = None) -> bool:
        """Write the status of ``decision``, with its Events and metrics. A phase change is
        written at once; ``intent``: wait until it is stored (it must precede an action).
        Returns whether the phase changed (and so its Event was posted)."""
        previous = self.status
        new = status.build_status(decision, previous=previous, disk=disk,
                                  node_name=self.agent.node_name, generation=generation,
                                  now=self.agent.clock(), started=started,
                                  extra_conditions=extra, spec=spec)
        new["agentVersion"] = __version__  # read by `kubectl blockcopy version`
        if fields:
            new.update(fields)  # None values delete a field (a JSON merge patch)
        self.status = new
        phase_changed = bool(new["phase"] != previous.get("phase"))
        if intent:
            await self.writer.write(new)
        else:
            self.writer.submit(new, urgent=phase_changed or decision.phase in TERMINAL_PHASES)
        self._update_metrics(previous, new, decision.reason or decision.phase.value)
        event = status.phase_event(previous.get("phase"), decision)
        if event is not None:
            etype, reason, message = event
            self.event(etype, reason, message)
            log.info("%s/%s: %s", *self.key, message)
        for cond in status.flipped_to_true(previous.get("conditions"), extra):
            self.event("Warning", cond["type"], cond["message"])
            log.warning("%s/%s: %s", *self.key, cond["message"])
        return phase_changed

    def progress(self, phase: Phase, estimate: Estimate | None,
                 conditions: Sequence[Mapping[str, Any]]) -> None:
        """The estimate metrics of a Copying copy (gone once it is not Copying; its byte
        counter stays until the object is deleted)."""
        metrics = self.agent.metrics
        if phase != Phase.COPYING or estimate is None:
            metrics.idle(self.key)
            return
        metrics.progress(self.key, eta=estimate.eta,
                         not_converging=any(c.get("type") == CONVERGING and
                                            c.get("status") == "False" for c in conditions))

    def note(self, message: str) -> None:
        """Only the message changes (say, libvirt unreachable): written in a progress slot."""
        new = {**self.status, "message": status.bounded(message)}
        self.status = new
        self.writer.submit(new, urgent=False)

    def update(self, **fields: Any) -> None:
        """Some fields change (say a chain move's layers): written in a progress slot."""
        new = {**self.status, **fields}
        self.status = new
        self.writer.submit(new, urgent=False)

    def event(self, type: str, reason: str, message: str) -> None:
        self.agent.post_event(self.ref, type=type, reason=reason, message=message)

    def refused(self, decision: Decision, *, phase_changed: bool) -> None:
        """An action libvirt refused. Its Event, unless the phase change already posted one
        (the first refused pivot turns Pivoting back into Mirrored)."""
        if not phase_changed:
            self.event("Warning", decision.reason, decision.message)
        self.agent.metrics.error(decision.reason)

    async def close(self) -> None:
        await self.writer.flush()

    def _update_metrics(self, previous: Mapping[str, Any], new: Mapping[str, Any],
                        reason: str) -> None:
        old_phase, phase = previous.get("phase"), new["phase"]
        counts = self.agent.phase_counts
        counts.set(self.key, phase)
        if phase in (Phase.COPYING, Phase.MIRRORED, Phase.PIVOTING, Phase.PIVOTED):
            counts.copied(self.key, new.get("cur"))
        if old_phase == phase:
            return
        metrics = self.agent.metrics
        if new.get("mirroredTime") and not previous.get("mirroredTime") and new.get("startTime"):
            metrics.duration("copy", _seconds(new["startTime"], new["mirroredTime"]))
        if phase in (Phase.PIVOTED, Phase.ABORTED) and new.get("mirroredTime"):
            metrics.duration("mirror", _seconds(new["mirroredTime"], new["completionTime"]))
        if phase == Phase.PIVOTED and self.pivot_issued is not None:
            metrics.duration("pivot", asyncio.get_running_loop().time() - self.pivot_issued)
        if phase == Phase.FAILED:
            metrics.error(reason)
