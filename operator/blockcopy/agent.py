"""The node agent: claims BlockCopies whose domain runs here and runs one follow loop per
object it owns, wiring the pure phase logic (reconcile), the destination checks, the libvirt
driver (hypervisor), status building (status) and the API client (kube)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from blockcopy import destination, metrics, reconcile, status
from blockcopy.api import (
    NODE_LABEL,
    TERMINAL_PHASES,
    BlockCopySpec,
    Flag,
    Phase,
    SpecError,
    parse_running_spec,
    parse_spec,
    pin_started_fields,
    started_fields,
)
from blockcopy.hypervisor import Hypervisor, HypervisorError, HypervisorUnavailable
from blockcopy.kube import Kube, StatusWriter
from blockcopy.observation import DiskState, JobEvent
from blockcopy.reconcile import Action, Decision

log = logging.getLogger(__name__)

EventPoster = Callable[[Any, str, str, str], None]  # (body, type, reason, message)


@dataclasses.dataclass
class AgentConfig:
    node_name: str
    libvirt_uri: str = "qemu:///system"
    allowed_paths: tuple[str, ...] = destination.DEFAULT_ALLOWED_PATHS
    status_interval: float = 1.0  # at most one status write per object per interval
    poll_interval: float = 5.0  # fallback polling when no event arrives
    claim_interval: float = 30.0  # re-check of unclaimed objects
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    retry_backoff: tuple[float, ...] = (1, 2, 5, 10, 30)


@dataclasses.dataclass
class _Tracked:
    """Per-object runtime state (not persisted: everything needed survives in status)."""

    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    writer: StatusWriter | None = None
    # The status as this agent last wrote it: the only writer of status is this agent, and
    # kopf's live body lags behind our own writes by one watch event.
    status: dict[str, Any] | None = None
    domain_uuid: str | None = None
    target: str | None = None
    last_event: JobEvent | None = None
    unreachable_since: str | None = None
    pivot_issued: float | None = None  # monotonic time of the pivot call, for its latency
    generation: int | None = None  # the spec generation last seen, to wake only on changes
    spec_changed: bool = False  # the last wake-up came from a spec change (or a deletion)
    action_failures: int = 0  # refused actions in a row, for the back-off


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _seconds(start: str, end: str) -> float:
    parse = dt.datetime.fromisoformat
    return max(0.0, (parse(end) - parse(start)).total_seconds())


def phase_of(raw_status: Mapping[str, Any] | None) -> Phase | None:
    try:
        return Phase((raw_status or {}).get("phase"))
    except ValueError:
        return None


SPEC_CHANGE_REFUSED = "SpecChangeRefused"


class Agent:
    def __init__(self, config: AgentConfig, kube: Kube, hv: Hypervisor, post_event: EventPoster):
        self.config = config
        self.kube = kube
        self.hv = hv
        self.post_event = post_event
        self._tracked: dict[tuple[str, str], _Tracked] = {}
        self.phase_counts = metrics.PhaseCounts()
        # Starts are serialized so that two BlockCopies of one disk cannot both start.
        self._start_lock = asyncio.Lock()
        hv.add_listener(self._on_job_event)

    # -- ownership -------------------------------------------------------------------
    @property
    def own_selector(self) -> str:
        """Server-side label selector of the objects this agent owns."""
        return f"{NODE_LABEL}={self.config.node_name}"

    def owns(self, body: Mapping[str, Any]) -> bool:
        labels = (body.get("metadata") or {}).get("labels") or {}
        return labels.get(NODE_LABEL) == self.config.node_name

    async def run_claimer(self) -> None:
        """Watch the unclaimed objects (server-side filtered) and claim those that are ours.

        The watch restarts every claim_interval, which re-lists every unclaimed object: that
        is the periodic re-check of objects whose domain was not running anywhere.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def pump(namespace: str | None) -> None:  # a thread: the client's watch is blocking
            delay = 1.0
            while not stop.is_set():
                try:
                    for obj in self.kube.iter_unclaimed(int(self.config.claim_interval),
                                                        namespace):
                        loop.call_soon_threadsafe(queue.put_nowait, obj)
                        delay = 1.0
                except Exception as exc:  # API outage: retry with backoff
                    log.warning("watching unclaimed BlockCopies failed: %s", exc)
                    stop.wait(delay)
                    delay = min(delay * 2, 30.0)

        for namespace in self.config.namespaces or (None,):
            threading.Thread(target=pump, args=(namespace,), name=f"claimer:{namespace or '*'}",
                             daemon=True).start()
        try:
            while True:
                obj = await queue.get()
                try:
                    await self.consider_unclaimed(obj)
                except Exception:
                    log.exception("claiming %s failed", obj.get("metadata", {}).get("name"))
        finally:
            stop.set()

    async def consider_unclaimed(self, body: Mapping[str, Any]) -> str:
        """Claim the object if it is ours; otherwise mark it Pending once. Returns what it did."""
        meta = body["metadata"]
        namespace, name, version = meta["namespace"], meta["name"], meta["resourceVersion"]
        if meta.get("deletionTimestamp") or phase_of(body.get("status")) in TERMINAL_PHASES:
            return "ignored"
        spec = body.get("spec") or {}
        spec_node, domain = spec.get("nodeName"), spec.get("domain")
        if spec_node:
            mine = spec_node == self.config.node_name
            waiting = f"waiting for the agent on node {spec_node} to claim it"
        else:
            mine = isinstance(domain, str) and bool(domain) and await self._runs_domain(domain)
            waiting = (f"no agent has claimed it: domain {domain!r} is not running on any node "
                       f"with an agent (re-checked every {self.config.claim_interval:g} s)")
        if mine:
            if await self.kube.claim(namespace, name, self.config.node_name, version):
                log.info("%s/%s: claimed for node %s", namespace, name, self.config.node_name)
                return "claimed"
            log.info("%s/%s: another agent claimed it first", namespace, name)
            return "lost the race"
        if not (body.get("status") or {}).get("phase"):
            pending = {"phase": Phase.PENDING.value, "message": waiting, "progress": "0%",
                       "observedGeneration": meta.get("generation")}
            if await self.kube.patch_status(namespace, name, pending, resource_version=version):
                self.post_event(body, "Normal", Phase.PENDING.value, f"Pending: {waiting}")
            return "pending"
        return "not mine"

    async def _runs_domain(self, domain: str) -> bool:
        try:
            return await asyncio.to_thread(self.hv.has_running_domain, domain)
        except HypervisorError as exc:
            log.warning("cannot check domain %r: %s", domain, exc)
            return False

    def poke(self, namespace: str, name: str, generation: int | None, deleting: bool) -> None:
        """Wake the follow loop for a spec change or a deletion. Not for status changes: the
        agent's own writes come back as watch events and must not cut its back-offs short."""
        tracked = self._tracked.get((namespace, name))
        if tracked is not None and (deleting or generation != tracked.generation):
            tracked.generation = generation
            tracked.spec_changed = True
            tracked.wake.set()

    def _on_job_event(self, domain_uuid: str, target: str, event: JobEvent) -> None:
        for tracked in self._tracked.values():
            if tracked.domain_uuid == domain_uuid and tracked.target == target:
                tracked.last_event = event
                tracked.wake.set()

    def _track(self, namespace: str, name: str) -> _Tracked:
        tracked = self._tracked.get((namespace, name))
        if tracked is None:
            tracked = self._tracked[(namespace, name)] = _Tracked()
            tracked.writer = StatusWriter(self.kube, namespace, name, self.config.status_interval)
        return tracked

    # -- the follow loop ---------------------------------------------------------------
    async def follow(self, body: Mapping[str, Any], stopped: Any) -> None:
        """Drive one BlockCopy until it reaches a terminal phase or the agent stops.

        ``body`` is kopf's live view of the object (it updates as the object changes).
        """
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        tracked = self._track(namespace, name)
        self.phase_counts.set((namespace, name), self._known_status(body, tracked).get("phase"))
        failures = 0
        try:
            while not stopped:
                if body.get("metadata", {}).get("deletionTimestamp"):
                    return  # the deletion handler takes over
                tracked.wake.clear()
                tracked.spec_changed = False
                try:
                    done, busy = await self._step(body, tracked)
                    failures = 0
                    if tracked.unreachable_since is not None:
                        log.info("%s/%s: libvirt reachable again (unreachable since %s)",
                                 namespace, name, tracked.unreachable_since)
                        self.post_event(body, "Normal", "LibvirtReachable",
                                        f"libvirt reachable again after an outage since "
                                        f"{tracked.unreachable_since}")
                        tracked.unreachable_since = None
                except HypervisorUnavailable as exc:
                    backoff = self.config.retry_backoff
                    delay = backoff[min(failures, len(backoff) - 1)]
                    failures += 1
                    await self._note_unreachable(body, tracked, str(exc), delay)
                    await self._sleep(tracked, stopped, delay)
                    continue
                if done:
                    return
                if not busy:
                    phase = phase_of(self._known_status(body, tracked))
                    if tracked.action_failures:  # libvirt refused an action: back off
                        if not tracked.spec_changed:
                            # A libvirt event that arrived during the refused action (say the
                            # READY that raced our poll) is already reflected in it: only a
                            # spec change may cut the back-off short.
                            tracked.wake.clear()
                        backoff = self.config.retry_backoff
                        timeout = max(self.config.poll_interval,
                                      backoff[min(tracked.action_failures - 1, len(backoff) - 1)])
                    elif phase == Phase.COPYING:
                        timeout = self.config.status_interval  # cur/end stay fresh
                    else:
                        timeout = self.config.poll_interval  # events do the work; a fallback
                    await self._sleep(tracked, stopped, timeout)
        finally:
            if tracked.writer is not None:
                await tracked.writer.flush()
            self._tracked.pop((namespace, name), None)

    async def _sleep(self, tracked: _Tracked, stopped: Any, timeout: float) -> None:
        """Wait for a libvirt event, an object change, the timeout or the stop signal."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not stopped:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(tracked.wake.wait(), timeout=min(left, 1.0))
                return
            except TimeoutError:
                continue

    async def _step(self, body: Mapping[str, Any], tracked: _Tracked) -> tuple[bool, bool]:
        """One observe-decide-act-record round. Returns (terminal, act-again-at-once)."""
        meta = body["metadata"]
        previous = self._known_status(body, tracked)
        current = phase_of(previous)
        if current in TERMINAL_PHASES:
            return True, False
        generation = tracked.generation = meta.get("generation")
        raw_spec, changed = pin_started_fields(body.get("spec") or {}, previous.get("startedSpec"))
        started_job = current not in (None, Phase.PENDING)
        invalid: list[str] = []
        try:
            if started_job:
                # A job runs: a bad edit is refused, never a reason to lose track of the job.
                spec, invalid = parse_running_spec(raw_spec, previous.get("startedSpec"),
                                                   int(previous.get("bandwidth") or 0))
            else:
                spec = parse_spec(raw_spec)
        except SpecError as exc:
            decision = Decision(Phase.FAILED, message=f"invalid spec: {exc}", reason="InvalidSpec")
            await self._record(body, tracked, decision, previous, None, generation)
            return True, False
        extra = self._spec_change_condition(changed, invalid, previous)
        if not started_job:
            refused = destination.refusal(spec, self.config.allowed_paths)
            if refused is not None:  # before libvirt is called, nothing is created
                decision = Decision(Phase.FAILED, reason=refused[0], message=refused[1])
                await self._record(body, tracked, decision, previous, None, generation)
                return True, False

        started: dict[str, Any] | None = None
        action_failed = False
        async with tracked.lock:
            if not started_job:
                # Starts are serialized and decided on a fresh look under the lock: of two
                # BlockCopies for one disk, the second then sees the first's job (DiskBusy).
                async with self._start_lock:
                    disk, decision = await self._observe_and_decide(spec, current, previous,
                                                                    tracked)
                    if decision.action == Action.START_COPY:
                        try:
                            started = await self._start(spec, disk, raw_spec)
                        except HypervisorUnavailable:
                            raise
                        except HypervisorError as exc:
                            decision = Decision(Phase.FAILED, reason="CopyRefused",
                                                message=f"libvirt refused to start the copy: {exc}")
                        else:
                            decision = dataclasses.replace(
                                decision, message=self._started_message(spec, disk, started))
                            tracked.last_event = None
            else:
                disk, decision = await self._observe_and_decide(spec, current, previous, tracked)
                if decision.action in (Action.PIVOT, Action.ABORT) and not tracked.action_failures:
                    # Record the intent first: if the agent dies mid-way, the phase tells the
                    # restarted agent to finish the same thing (the mirror is re-checked).
                    # Not again on retries: a refused pivot stays Mirrored, without flapping.
                    await self._record(body, tracked, decision, previous, disk, generation,
                                       extra=extra, wait=True)
                    previous = self._known_status(body, tracked)
                if decision.action != Action.NONE:
                    try:
                        await self._act(spec, disk, decision, tracked)
                    except HypervisorUnavailable:
                        raise
                    except HypervisorError as exc:
                        decision = self._action_failed(decision, current, exc)
                        action_failed = True
                    tracked.action_failures = tracked.action_failures + 1 if action_failed else 0
        await self._record(body, tracked, decision, previous, disk, generation, started,
                           extra=extra)
        if action_failed and decision.phase not in TERMINAL_PHASES:
            # The phase did not change, so no phase Event was posted: say it anyway.
            self.post_event(body, "Warning", decision.reason, decision.message)
            metrics.ERRORS.labels(decision.reason).inc()
        terminal = decision.phase in TERMINAL_PHASES
        # After a successful action, look again at once; after a refused one, back off.
        return terminal, decision.action != Action.NONE and not terminal and not action_failed

    async def _observe_and_decide(self, spec: BlockCopySpec, current: Phase | None,
                                  previous: Mapping[str, Any], tracked: _Tracked
                                  ) -> tuple[DiskState, Decision]:
        # Once started, follow the disk by target: a source path changes with the pivot.
        disk_ref = previous.get("target") or spec.disk
        disk = await asyncio.to_thread(self.hv.observe, spec.domain, disk_ref)
        tracked.domain_uuid, tracked.target = disk.domain_uuid, disk.target
        decision = reconcile.decide(spec, current, disk, last_event=tracked.last_event,
                                    was_mirrored=bool(previous.get("mirroredTime")))
        return disk, decision

    async def _start(self, spec: BlockCopySpec, disk: DiskState,
                     raw_spec: Mapping[str, Any]) -> dict[str, Any]:
        flags = reconcile.copy_flags(spec, disk)
        fmt = spec.format
        if fmt is None and Flag.REUSE_EXTERNAL in flags:
            fmt = await asyncio.to_thread(destination.probe_format, spec.dest)
        fmt = fmt or disk.source_format or "raw"
        target = disk.target or spec.disk
        await asyncio.to_thread(
            self.hv.start_copy, spec.domain, target, spec.dest, fmt=fmt, flags=flags,
            bandwidth=spec.bandwidth, granularity=spec.granularity, buf_size=spec.buf_size)
        return {"source": disk.source, "target": target, "format": fmt,
                "flags": sorted(f.value for f in flags), "startTime": status.timestamp(_now()),
                "bandwidth": spec.bandwidth, "startedSpec": started_fields(raw_spec)}

    @staticmethod
    def _started_message(spec: BlockCopySpec, disk: DiskState, started: Mapping) -> str:
        notes = []
        if Flag.TRANSIENT_JOB in started["flags"] and Flag.TRANSIENT_JOB not in spec.flags:
            notes.append("transientJob added: the domain is persistent, and the job is lost "
                         "if the VM stops")
        if spec.base is not None:
            notes.append("shallow: base is the top image's backing file")
        tail = f" ({'; '.join(notes)})" if notes else ""
        return f"copying {disk.source} to {spec.dest} as {started['format']}{tail}"

    async def _act(self, spec: BlockCopySpec, disk: DiskState, decision: Decision,
                   tracked: _Tracked) -> None:
        target = disk.target or spec.disk
        match decision.action:
            case Action.PIVOT:
                tracked.pivot_issued = time.monotonic()
                await asyncio.to_thread(self.hv.pivot, spec.domain, target)
            case Action.ABORT:
                await asyncio.to_thread(self.hv.cancel, spec.domain, target)
            case Action.SET_BANDWIDTH:
                await asyncio.to_thread(self.hv.set_bandwidth, spec.domain, target, spec.bandwidth)

    @staticmethod
    def _action_failed(decision: Decision, current: Phase | None,
                       exc: HypervisorError) -> Decision:
        if decision.action == Action.PIVOT:
            # The job keeps mirroring; the VM stays on its source. Retried after a backoff.
            return Decision(Phase.MIRRORED, reason="PivotRefused",
                            message=f"libvirt refused the pivot, will retry: {exc}")
        verb = decision.action.value
        return Decision(current or Phase.COPYING, reason=f"{verb[0].upper()}{verb[1:]}Failed",
                        message=f"{verb} failed, will retry: {exc}")

    def _spec_change_condition(self, changed: list[str], invalid: list[str],
                               previous: Mapping[str, Any]) -> list[dict[str, Any]]:
        was = any(c.get("type") == SPEC_CHANGE_REFUSED for c in previous.get("conditions") or [])
        if not changed and not invalid and not was:
            return []
        if changed:
            return [{"type": SPEC_CHANGE_REFUSED, "status": "True", "reason": "ImmutableField",
                     "message": f"spec.{', spec.'.join(changed)} cannot change once the job "
                     "started; the agent keeps working from the values it started with"}]
        if invalid:
            return [{"type": SPEC_CHANGE_REFUSED, "status": "True", "reason": "InvalidValue",
                     "message": f"refused an invalid change ({'; '.join(invalid)}); the job "
                     "goes on with the values in effect"}]
        return [{"type": SPEC_CHANGE_REFUSED, "status": "False", "reason": "SpecMatches",
                 "message": "the immutable fields match what the job started with"}]

    async def _record(self, body, tracked: _Tracked, decision: Decision, previous: dict,
                      disk: DiskState | None, generation, started=None, extra=(),
                      wait: bool = False) -> None:
        new = status.build_status(decision, previous=previous, disk=disk,
                                  node_name=self.config.node_name, generation=generation,
                                  now=_now(), started=started, extra_conditions=extra)
        assert tracked.writer is not None
        if wait or decision.phase in TERMINAL_PHASES:
            await tracked.writer.write(new, previous=previous)
        else:
            tracked.writer.submit(new, previous=previous)
        tracked.status = new
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        self._update_metrics((ns, name), tracked, previous, new,
                             decision.reason or decision.phase.value)
        event = status.phase_event(previous.get("phase"), decision)
        if event is not None:
            self.post_event(body, *event)
            log.info("%s/%s: %s", ns, name, event[2])
        for cond in status.flipped_to_true(previous.get("conditions"), extra):
            self.post_event(body, "Warning", cond["type"], cond["message"])
            log.warning("%s/%s: %s", ns, name, cond["message"])

    def _update_metrics(self, key: tuple[str, str], tracked: _Tracked,
                        previous: Mapping[str, Any], new: Mapping[str, Any],
                        reason: str) -> None:
        old_phase, phase = previous.get("phase"), new["phase"]
        self.phase_counts.set(key, phase)
        if phase in (Phase.COPYING, Phase.MIRRORED, Phase.PIVOTING, Phase.PIVOTED):
            self.phase_counts.copied(key, new.get("cur"))
        if old_phase == phase:
            return
        if new.get("mirroredTime") and not previous.get("mirroredTime") and new.get("startTime"):
            metrics.COPY_SECONDS.observe(_seconds(new["startTime"], new["mirroredTime"]))
        if phase in (Phase.PIVOTED, Phase.ABORTED) and new.get("mirroredTime"):
            metrics.MIRROR_SECONDS.observe(_seconds(new["mirroredTime"], new["completionTime"]))
        if phase == Phase.PIVOTED and tracked.pivot_issued is not None:
            metrics.PIVOT_SECONDS.observe(time.monotonic() - tracked.pivot_issued)
        if phase == Phase.FAILED:
            metrics.ERRORS.labels(reason).inc()

    @staticmethod
    def _known_status(body: Mapping[str, Any], tracked: _Tracked) -> dict[str, Any]:
        known = tracked.status if tracked.status is not None else body.get("status") or {}
        return {k: v for k, v in known.items() if k != "kopf"}

    async def _note_unreachable(self, body, tracked: _Tracked, message: str, delay: float):
        previous = self._known_status(body, tracked)
        if tracked.unreachable_since is None:
            tracked.unreachable_since = status.timestamp(_now())
            self.post_event(body, "Warning", "LibvirtUnreachable", message)
            log.warning("libvirt unreachable: %s", message)
        text = (f"libvirt unreachable since {tracked.unreachable_since}, retrying in "
                f"{delay:g}s: {message}")
        new = {**previous, "message": text}
        assert tracked.writer is not None
        tracked.writer.submit(new, previous=previous)
        tracked.status = new

    # -- deletion ------------------------------------------------------------------------
    async def cancel_for_deletion(self, body: Mapping[str, Any]) -> str:
        """Cancel our job (if still running) before the object goes; the VM stays on its
        source and the destination file is left in place. Returns what was done."""
        raw = body.get("status") or {}
        if phase_of(raw) == Phase.PIVOTED:
            return "nothing to cancel: the VM runs on the copy"
        if not raw.get("startTime") and phase_of(raw) in TERMINAL_PHASES:
            return "nothing to cancel: this BlockCopy never started a job"
        try:
            spec, _ = parse_running_spec(body.get("spec") or {}, raw.get("startedSpec"), 0)
        except SpecError:
            return "nothing to cancel: the spec was invalid before any job started"
        meta = body["metadata"]
        # Share the follow loop's lock if it still runs; never register a new entry here.
        tracked = self._tracked.get((meta["namespace"], meta["name"])) or _Tracked()
        async with tracked.lock:
            disk_ref = raw.get("target") or spec.disk
            disk = await asyncio.to_thread(self.hv.observe, spec.domain, disk_ref)
            mirror = disk.mirror
            if mirror is None or not reconcile.same_path(mirror.dest, spec.dest):
                return "nothing to cancel: no job of this BlockCopy is running"
            await asyncio.to_thread(self.hv.cancel, spec.domain, disk.target or spec.disk)
        return f"cancelled the copy to {spec.dest}; the VM stays on {disk.source}"
