"""The follow loop of one BlockCopy: observe libvirt, decide, act, record, then sleep until
something happens (a libvirt event, a spec change, the stop signal) or a timeout passes.

Retries belong to the loop, not to the calls: an unreachable libvirtd and an action libvirt
refused each back off on their own schedule (``backoff``), and a success starts over.
Waking up: libvirt's block-job events and spec changes set ``wake``; the agent's own status
writes come back as watch events but never wake the loop (they would cut back-offs short).
After a refused action only a spec change may cut the back-off short: an event that arrived
during the refused call (say the READY that raced our look) is already reflected in it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

from blockcopy import destination, reconcile, status
from blockcopy.api import (
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
from blockcopy.backoff import LIBVIRT_UNREACHABLE, REFUSED_ACTION, Backoff
from blockcopy.observation import DiskState, JobEvent
from blockcopy.policy import Policy
from blockcopy.ports import CopyRequest, Hypervisor, HypervisorError, HypervisorUnavailable
from blockcopy.reconcile import Action, Decision
from blockcopy.recorder import ObjectRecorder

log = logging.getLogger(__name__)


class StopSignal(Protocol):
    """kopf's DaemonStopped, or an equivalent: true once stopping, and awaitable."""

    def __bool__(self) -> bool: ...

    def wait(self) -> Awaitable[Any]: ...


@dataclasses.dataclass(frozen=True)
class FollowSettings:
    allowed_paths: tuple[str, ...]
    # Who may copy what (none: anyone, within the allowed roots).
    policy: Policy = dataclasses.field(default_factory=Policy)
    status_interval: float = 1.0  # cur/end refresh while Copying
    poll_interval: float = 5.0  # fallback look when no event arrives


class Step(enum.Enum):
    DONE = "done"  # terminal phase reached
    AGAIN = "again"  # an action succeeded: look again at once
    WAIT = "wait"  # nothing to do until something happens


class Follower:
    """Drives one BlockCopy until it reaches a terminal phase or the agent stops.

    ``body`` is kopf's live view of the object (updated in place as watch events arrive).
    """

    def __init__(self, body: Mapping[str, Any], *, hv: Hypervisor, recorder: ObjectRecorder,
                 settings: FollowSettings, start_lock: asyncio.Lock):
        self.body = body
        self.hv, self.recorder, self.settings = hv, recorder, settings
        self.start_lock = start_lock  # of two BlockCopies for one disk only one may start
        self.lock = asyncio.Lock()  # shared with the deletion handler
        self.wake = asyncio.Event()
        self.domain_uuid: str | None = None  # where libvirt's events for us come from
        self.target: str | None = None
        self.last_event: JobEvent | None = None
        self.generation: int | None = body.get("metadata", {}).get("generation")
        self.spec_changed = False
        self.unreachable = Backoff(LIBVIRT_UNREACHABLE)
        self.unreachable_since: str | None = None
        self.refusals = Backoff(REFUSED_ACTION)
        self._refusal_delay = 0.0

    # -- wake-ups (called on the event loop) ------------------------------------------
    def on_job_event(self, domain_uuid: str, target: str, event: JobEvent) -> None:
        if domain_uuid == self.domain_uuid and target == self.target:
            self.last_event = event
            self.wake.set()

    def on_spec_change(self, generation: int | None) -> None:
        if generation != self.generation:
            self.generation = generation
            self.spec_changed = True
            self.wake.set()

    # -- the loop --------------------------------------------------------------------
    async def run(self, stop: StopSignal) -> None:
        try:
            while not stop:
                if self.body.get("metadata", {}).get("deletionTimestamp"):
                    return  # the deletion handler takes over
                self.wake.clear()
                self.spec_changed = False
                try:
                    step = await self.step()
                except HypervisorUnavailable as exc:
                    delay = self.unreachable.failed()
                    self._note_unreachable(str(exc), delay)
                    await self._sleep(stop, delay)
                    continue
                if step is Step.DONE:
                    return
                if step is Step.WAIT:
                    await self._sleep(stop, self._wait_time())
        finally:
            await self.recorder.close()

    def _wait_time(self) -> float:
        if self.refusals.active:
            if not self.spec_changed:
                self.wake.clear()  # only a spec change may cut a refusal's back-off short
            return self._refusal_delay
        if self.recorder.phase == Phase.COPYING:
            return self.settings.status_interval  # cur/end stay fresh
        return self.settings.poll_interval  # events do the work; this is a fallback

    async def _sleep(self, stop: StopSignal, timeout: float) -> None:
        """Until a wake-up, the stop signal or the timeout, whichever comes first."""
        if self.wake.is_set() or stop:
            return
        waiters = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _note_unreachable(self, message: str, delay: float) -> None:
        if self.unreachable_since is None:
            self.unreachable_since = status.timestamp(self.recorder.agent.clock())
            self.recorder.event("Warning", "LibvirtUnreachable", message)
            log.warning("libvirt unreachable: %s", message)
        self.recorder.note(f"libvirt unreachable since {self.unreachable_since}, retrying in "
                           f"{delay:g}s: {message}")

    def _note_reachable(self) -> None:
        self.unreachable.succeeded()
        if self.unreachable_since is not None:
            log.info("%s/%s: libvirt reachable again (unreachable since %s)",
                     *self.recorder.key, self.unreachable_since)
            self.recorder.event("Normal", "LibvirtReachable",
                                f"libvirt reachable again after an outage since "
                                f"{self.unreachable_since}")
            self.unreachable_since = None

    # -- one round: observe, decide, act, record --------------------------------------
    async def step(self) -> Step:
        previous = self.recorder.status
        current = self.recorder.phase
        if current in TERMINAL_PHASES:
            return Step.DONE
        generation = self.generation = self.body.get("metadata", {}).get("generation")
        raw_spec, changed = pin_started_fields(self.body.get("spec") or {},
                                               previous.get("startedSpec"))
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
            await self.recorder.record(
                Decision(Phase.FAILED, message=f"invalid spec: {exc}", reason="InvalidSpec"),
                disk=None, generation=generation)
            return Step.DONE
        extra = status.spec_change_conditions(changed=changed, invalid=invalid,
                                              previous=previous.get("conditions"))
        if not started_job:
            refusal = destination.refusal(spec, self.settings.allowed_paths)
            forbidden = self.settings.policy.precheck(namespace=self.recorder.ref.namespace,
                                                      dest=spec.dest)
            if forbidden is not None:
                refusal = ("Forbidden", forbidden)
            if refusal is not None:  # before libvirt is called: nothing is created
                await self.recorder.record(
                    Decision(Phase.FAILED, reason=refusal[0], message=refusal[1]),
                    disk=None, generation=generation)
                return Step.DONE

        started: dict[str, Any] | None = None
        refused = False
        async with self.lock:
            if not started_job:
                # Starts are serialized and decided on a fresh look under the lock: of two
                # BlockCopies for one disk, the second then sees the first's job (DiskBusy).
                async with self.start_lock:
                    disk, decision = await self._observe_and_decide(spec, current)
                    if decision.action == Action.START_COPY:
                        decision = (self._refuse_by_policy(spec, disk)
                                    or self._refuse_own_chain(spec, disk) or decision)
                    if decision.action == Action.START_COPY:
                        decision, started = await self._start(spec, disk, raw_spec, decision)
            else:
                disk, decision = await self._observe_and_decide(spec, current)
                if decision.action in (Action.PIVOT, Action.ABORT) and not self.refusals.active:
                    # Record the intent first: if the agent dies mid-way, the phase tells the
                    # restarted agent to finish the same thing (the mirror is re-checked).
                    # Not again on retries: a refused pivot stays Mirrored, without flapping.
                    await self.recorder.record(decision, disk=disk, generation=generation,
                                               extra=extra, intent=True)
                if decision.action != Action.NONE:
                    try:
                        await self._act(spec, disk, decision)
                    except HypervisorUnavailable:
                        raise
                    except HypervisorError as exc:
                        decision = reconcile.refused(decision, current, str(exc))
                        refused = True
                if refused:
                    self._refusal_delay = self.refusals.failed()
                else:
                    self.refusals.succeeded()
        phase_changed = await self.recorder.record(decision, disk=disk, generation=generation,
                                                   started=started, extra=extra)
        terminal = decision.phase in TERMINAL_PHASES
        if refused and not terminal:
            self.recorder.refused(decision, phase_changed=phase_changed)
        if terminal:
            return Step.DONE
        # After a successful action, look again at once; after a refused one, back off.
        return Step.AGAIN if decision.action != Action.NONE and not refused else Step.WAIT

    async def _observe_and_decide(self, spec: BlockCopySpec, current: Phase | None
                                  ) -> tuple[DiskState, Decision]:
        # Once started, follow the disk by target: a source path changes with the pivot.
        disk_ref = self.recorder.status.get("target") or spec.disk
        disk = await self.hv.observe(spec.domain, disk_ref)
        self._note_reachable()
        self.domain_uuid, self.target = disk.domain_uuid, disk.target
        decision = reconcile.decide(spec, current, disk, last_event=self.last_event,
                                    was_mirrored=bool(self.recorder.status.get("mirroredTime")))
        return disk, decision

    def _refuse_by_policy(self, spec: BlockCopySpec, disk: DiskState) -> Decision | None:
        forbidden = self.settings.policy.check(
            namespace=self.recorder.ref.namespace, domain=spec.domain,
            tenant=disk.domain_tenant, dest=spec.dest)
        if forbidden is None:
            return None
        return Decision(Phase.FAILED, reason="Forbidden",
                        message=f"{forbidden} (the agent's policy); nothing was started")

    @staticmethod
    def _refuse_own_chain(spec: BlockCopySpec, disk: DiskState) -> Decision | None:
        image = destination.chain_member(spec.dest, [disk.source, *disk.chain])
        if image is None:
            return None
        what = "the disk's active image" if image == disk.source else \
            "an image of the disk's backing chain"
        return Decision(Phase.FAILED, reason="DestInSourceChain",
                        message=f"dest {spec.dest} is {image}, {what}: a copy into its own "
                        "chain would overwrite what it reads; nothing was started")

    async def _start(self, spec: BlockCopySpec, disk: DiskState, raw_spec: Mapping[str, Any],
                     decision: Decision) -> tuple[Decision, dict[str, Any] | None]:
        flags = reconcile.copy_flags(spec, disk)
        fmt = spec.format
        if fmt is None and Flag.REUSE_EXTERNAL in flags:
            fmt = await asyncio.to_thread(destination.probe_format, spec.dest)
        fmt = fmt or disk.source_format or "raw"
        target = disk.target or spec.disk
        request = CopyRequest(domain=spec.domain, target=target, dest=spec.dest, format=fmt,
                              flags=flags, block_device=destination.is_block_device(spec.dest),
                              bandwidth=spec.bandwidth, granularity=spec.granularity,
                              buf_size=spec.buf_size)
        try:
            await self.hv.start_copy(request)
        except HypervisorUnavailable:
            raise
        except HypervisorError as exc:
            return Decision(Phase.FAILED, reason="CopyRefused",
                            message=f"libvirt refused to start the copy: {exc}"), None
        self.last_event = None
        started = {"source": disk.source, "target": target, "format": fmt,
                   "flags": sorted(f.value for f in flags),
                   "startTime": status.timestamp(self.recorder.agent.clock()),
                   "bandwidth": spec.bandwidth, "startedSpec": started_fields(raw_spec)}
        message = reconcile.started_message(spec, source=disk.source, fmt=fmt, flags=flags)
        return dataclasses.replace(decision, message=message), started

    async def _act(self, spec: BlockCopySpec, disk: DiskState, decision: Decision) -> None:
        target = disk.target or spec.disk
        match decision.action:
            case Action.PIVOT:
                self.recorder.pivot_issued = asyncio.get_running_loop().time()
                await self.hv.pivot(spec.domain, target)
            case Action.ABORT:
                await self.hv.cancel(spec.domain, target)
            case Action.SET_BANDWIDTH:
                await self.hv.set_bandwidth(spec.domain, target, spec.bandwidth)
