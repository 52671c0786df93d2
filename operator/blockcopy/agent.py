"""The node agent: runs one follow loop per BlockCopy it owns, wiring the pure phase logic
(reconcile), the libvirt driver (hypervisor), status building (status) and the API (kube)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import Any

from blockcopy import hypervisor, reconcile, status
from blockcopy.api import NODE_LABEL, TERMINAL_PHASES, Flag, Phase, SpecError, parse_spec
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
    status_interval: float = 1.0  # at most one status write per object per interval
    poll_interval: float = 5.0  # fallback polling when no event arrives
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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def phase_of(raw_status: Mapping[str, Any] | None) -> Phase | None:
    try:
        return Phase((raw_status or {}).get("phase"))
    except ValueError:
        return None


class Agent:
    def __init__(self, config: AgentConfig, kube: Kube, hv: Hypervisor, post_event: EventPoster):
        self.config = config
        self.kube = kube
        self.hv = hv
        self.post_event = post_event
        self._tracked: dict[tuple[str, str], _Tracked] = {}
        hv.add_listener(self._on_job_event)

    # -- ownership -------------------------------------------------------------------
    def owns(self, body: Mapping[str, Any]) -> bool:
        spec_node = (body.get("spec") or {}).get("nodeName")
        if spec_node:
            return spec_node == self.config.node_name
        labels = (body.get("metadata") or {}).get("labels") or {}
        return labels.get(NODE_LABEL) == self.config.node_name

    def is_unclaimed(self, body: Mapping[str, Any]) -> bool:
        spec_node = (body.get("spec") or {}).get("nodeName")
        labels = (body.get("metadata") or {}).get("labels") or {}
        return not spec_node and not labels.get(NODE_LABEL)

    async def try_claim(self, body: Mapping[str, Any]) -> bool:
        """Claim an unclaimed object if this node's libvirt runs its domain."""
        if phase_of(body.get("status")) in TERMINAL_PHASES:
            return False
        domain = (body.get("spec") or {}).get("domain")
        if not isinstance(domain, str) or not domain:
            return False
        try:
            here = await asyncio.to_thread(self.hv.has_running_domain, domain)
        except HypervisorError:
            return False
        if not here:
            return False
        meta = body["metadata"]
        return await self.kube.claim(meta["namespace"], meta["name"], self.config.node_name,
                                     meta["resourceVersion"])

    def poke(self, namespace: str, name: str) -> None:
        tracked = self._tracked.get((namespace, name))
        if tracked is not None:
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
        failures = 0
        try:
            while not stopped:
                if body.get("metadata", {}).get("deletionTimestamp"):
                    return  # the deletion handler takes over
                tracked.wake.clear()
                try:
                    done, busy = await self._step(body, tracked)
                    failures = 0
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
                    timeout = (self.config.status_interval if phase == Phase.COPYING
                               else self.config.poll_interval)
                    await self._sleep(tracked, stopped, timeout)
        finally:
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
        generation = meta.get("generation")
        try:
            spec = parse_spec(body.get("spec"))
        except SpecError as exc:
            decision = Decision(Phase.FAILED, message=f"invalid spec: {exc}", reason="InvalidSpec")
            await self._record(body, tracked, decision, previous, None, generation)
            return True, False

        # Once started, follow the disk by target: a source path changes with the pivot.
        disk_ref = previous.get("target") or spec.disk
        disk = await asyncio.to_thread(self.hv.observe, spec.domain, disk_ref)
        tracked.domain_uuid, tracked.target = disk.domain_uuid, disk.target
        decision = reconcile.decide(spec, current, disk, last_event=tracked.last_event,
                                    was_mirrored=bool(previous.get("mirroredTime")))
        started: dict[str, Any] | None = None
        action_failed = False
        async with tracked.lock:
            if decision.action in (Action.PIVOT, Action.ABORT):
                # Record the intent first: if the agent dies mid-way, the phase tells the
                # restarted agent to finish the same thing (the mirror state is re-checked).
                await self._record(body, tracked, decision, previous, disk, generation)
                previous = self._known_status(body, tracked)
            try:
                started = await self._act(spec, disk, decision)
            except HypervisorUnavailable:
                raise
            except HypervisorError as exc:
                decision = self._action_failed(decision, current, exc)
                action_failed = True
        if decision.action == Action.START_COPY and started is not None:
            tracked.last_event = None
        await self._record(body, tracked, decision, previous, disk, generation, started)
        terminal = decision.phase in TERMINAL_PHASES
        # After a successful action, look again at once; after a refused one, back off.
        return terminal, decision.action != Action.NONE and not terminal and not action_failed

    async def _act(self, spec, disk: DiskState, decision: Decision) -> dict[str, Any] | None:
        target = disk.target or spec.disk
        match decision.action:
            case Action.START_COPY:
                flags = set(spec.flags)
                if disk.domain_persistent:
                    # QEMU refuses copies on persistent domains without it (see README).
                    flags.add(Flag.TRANSIENT_JOB)
                fmt = spec.format
                if fmt is None and Flag.REUSE_EXTERNAL in flags:
                    fmt = await asyncio.to_thread(hypervisor.probe_format, spec.dest)
                fmt = fmt or disk.source_format or "raw"
                await asyncio.to_thread(
                    self.hv.start_copy, spec.domain, target, spec.dest, fmt=fmt, flags=flags,
                    bandwidth=spec.bandwidth, granularity=spec.granularity,
                    buf_size=spec.buf_size)
                return {"source": disk.source, "target": target,
                        "flags": sorted(f.value for f in flags),
                        "startTime": status.timestamp(_now()), "bandwidth": spec.bandwidth}
            case Action.PIVOT:
                await asyncio.to_thread(self.hv.pivot, spec.domain, target)
            case Action.ABORT:
                await asyncio.to_thread(self.hv.cancel, spec.domain, target)
            case Action.SET_BANDWIDTH:
                await asyncio.to_thread(self.hv.set_bandwidth, spec.domain, target, spec.bandwidth)
        return None

    @staticmethod
    def _action_failed(decision: Decision, current: Phase | None,
                       exc: HypervisorError) -> Decision:
        match decision.action:
            case Action.START_COPY:
                return Decision(Phase.FAILED, reason="CopyRefused",
                                message=f"libvirt refused to start the copy: {exc}")
            case Action.PIVOT:
                # The job keeps mirroring; the VM stays on its source. Retried next round.
                return Decision(Phase.MIRRORED, reason="PivotRefused",
                                message=f"libvirt refused the pivot, will retry: {exc}")
            case _:
                verb = decision.action.value
                return Decision(current or Phase.COPYING,
                                reason=f"{verb[0].upper()}{verb[1:]}Failed",
                                message=f"{verb} failed, will retry: {exc}")

    async def _record(self, body, tracked: _Tracked, decision: Decision, previous: dict,
                      disk: DiskState | None, generation, started=None) -> None:
        new = status.build_status(decision, previous=previous, disk=disk,
                                  node_name=self.config.node_name, generation=generation,
                                  now=_now(), started=started)
        assert tracked.writer is not None
        await tracked.writer.write(new, previous=previous)
        tracked.status = new
        event = status.phase_event(previous.get("phase"), decision)
        if event is not None:
            self.post_event(body, *event)
            log.info("%s/%s: %s", body["metadata"]["namespace"], body["metadata"]["name"],
                     event[2])

    @staticmethod
    def _known_status(body: Mapping[str, Any], tracked: _Tracked) -> dict[str, Any]:
        known = tracked.status if tracked.status is not None else body.get("status") or {}
        return {k: v for k, v in known.items() if k != "kopf"}

    async def _note_unreachable(self, body, tracked: _Tracked, message: str, delay: float):
        previous = self._known_status(body, tracked)
        text = f"libvirt unreachable, retrying in {delay:g}s: {message}"
        if previous.get("message") != text:
            assert tracked.writer is not None
            new = {**previous, "message": text}
            await tracked.writer.write(new, previous=previous)
            tracked.status = new

    # -- deletion ------------------------------------------------------------------------
    async def cancel_for_deletion(self, body: Mapping[str, Any]) -> str:
        """Cancel our job (if still running) before the object goes; the VM stays on its
        source and the destination file is left in place. Returns what was done."""
        raw = body.get("status") or {}
        if phase_of(raw) in TERMINAL_PHASES:
            return "nothing to cancel: the copy had ended"
        try:
            spec = parse_spec(body.get("spec"))
        except SpecError:
            return "nothing to cancel: the spec was invalid"
        meta = body["metadata"]
        tracked = self._track(meta["namespace"], meta["name"])
        async with tracked.lock:
            disk_ref = (body.get("status") or {}).get("target") or spec.disk
            disk = await asyncio.to_thread(self.hv.observe, spec.domain, disk_ref)
            mirror = disk.mirror
            if mirror is None or not reconcile.same_path(mirror.dest, spec.dest):
                return "nothing to cancel: no job of this BlockCopy is running"
            await asyncio.to_thread(self.hv.cancel, spec.domain, disk.target or spec.disk)
        return f"cancelled the copy to {spec.dest}; the VM stays on {disk.source}"
