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
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from blockcopy import metrics, reconcile, status
from blockcopy.api import (
    BEFORE_JOB_PHASES,
    TERMINAL_PHASES,
    BlockCopySpec,
    Convergence,
    Phase,
    SpecError,
    parse_running_spec,
    parse_spec,
    pin_started_fields,
)
from blockcopy.backoff import LIBVIRT_UNREACHABLE, REFUSED_ACTION, Backoff
from blockcopy.groups import GroupKey, Groups, key_of
from blockcopy.layers import LayerCopies
from blockcopy.observation import DiskState, JobEvent
from blockcopy.plans import Plan, PlanKind
from blockcopy.ports import Hypervisor, HypervisorError, HypervisorUnavailable, Images
from blockcopy.progress import ProgressWindow, duration
from blockcopy.reconcile import Action, Decision
from blockcopy.recorder import ObjectRecorder
from blockcopy.slots import CopySlots
from blockcopy.starting import Starter, StartSettings

log = logging.getLogger(__name__)


CONVERGING = "Converging"
ASSIST = "ConvergenceAssist"  # what spec.convergence auto did


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class StopSignal(Protocol):
    """kopf's DaemonStopped, or an equivalent: true once stopping, and awaitable."""

    def __bool__(self) -> bool: ...

    def wait(self) -> Awaitable[Any]: ...


@dataclasses.dataclass(frozen=True)
class FollowSettings:
    start: StartSettings
    poll_interval: float = 5.0  # fallback look when no event arrives


class Step(enum.Enum):
    DONE = "done"  # terminal phase reached
    AGAIN = "again"  # an action succeeded: look again at once
    WAIT = "wait"  # nothing to do until something happens


class Follower:
    """Drives one BlockCopy until it reaches a terminal phase or the agent stops.

    ``body`` is kopf's live view of the object (updated in place as watch events arrive).
    """

    def __init__(self, body: Mapping[str, Any], *, hv: Hypervisor, images: Images,
                 recorder: ObjectRecorder, settings: FollowSettings, start_lock: asyncio.Lock,
                 slots: CopySlots | None = None, groups: Groups | None = None,
                 job_holder: Callable[[Follower], str | None] = lambda _: None):
        self.body = body
        self.hv, self.images, self.recorder, self.settings = hv, images, recorder, settings
        self.starter = Starter(hv=hv, images=images, recorder=recorder, settings=settings.start)
        self.slots = slots if slots is not None else CopySlots(0)
        self.groups = groups
        self.layers: LayerCopies | None = None  # a chain move's lower images, copied aside
        self.window = ProgressWindow()  # rate, time left, convergence
        self._chain: tuple[str, ...] = ()  # the disk's backing chain as last seen
        self._chain_formats: tuple[str, ...] = ()
        self.start_lock = start_lock  # of two BlockCopies for one disk only one may start
        # Which other object of this agent holds the job on our disk (the agent knows them).
        self.job_holder = job_holder
        self.holds_job = False  # this object started (or adopted) the disk's job
        self.lock = asyncio.Lock()  # shared with the deletion handler
        self.wake = asyncio.Event()
        self.domain_uuid: str | None = None  # where libvirt's events for us come from
        self.target: str | None = None
        self.last_event: JobEvent | None = None
        self.generation: int | None = body.get("metadata", {}).get("generation")
        self.spec_changed = False
        self.unreachable = Backoff(LIBVIRT_UNREACHABLE)
        self.look_failures = Backoff(LIBVIRT_UNREACHABLE)
        self.unreachable_since: str | None = None
        self.refusals = Backoff(REFUSED_ACTION)
        self._refusal_delay = 0.0
        self._group_recheck: float | None = None  # s until a waiting group may pivot

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
                except HypervisorError as exc:
                    # libvirt failed a look, not an action (those are decided on): say a
                    # transient domain went away mid-query ("Unable to read from monitor").
                    # Look again soon; the next look sees what became of the domain.
                    delay = self.look_failures.failed()
                    log.warning("%s/%s: libvirt failed to report the disk, looking again in "
                                "%gs: %s", *self.recorder.key, delay, exc)
                    self.recorder.note(f"libvirt failed to report the disk, looking again in "
                                       f"{delay:g}s: {exc}")
                    await self._sleep(stop, delay)
                    continue
                self.look_failures.succeeded()
                if step is Step.DONE:
                    return
                if step is Step.WAIT:
                    await self._sleep(stop, self._wait_time())
        finally:
            if self.layers is not None:
                await self.layers.stop()  # a restarted agent copies again what was not verified
            await self.recorder.close()

    def _wait_time(self) -> float:
        if self.refusals.active:
            if not self.spec_changed:
                self.wake.clear()  # only a spec change may cut a refusal's back-off short
            return self._refusal_delay
        if self.recorder.phase == Phase.COPYING:
            return self.recorder.agent.pace.interval()  # cur/end stay fresh, within budget
        if self._group_recheck is not None:  # the group may pivot then without a wake-up
            return min(self._group_recheck, self.settings.poll_interval)
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
        started_job = current not in (None, *BEFORE_JOB_PHASES)
        self.holds_job = self.holds_job or started_job
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
            refusal = self.starter.refusal(spec)
            if refusal is not None:  # before libvirt is called: nothing is created
                await self.recorder.record(refusal, disk=None, generation=generation)
                return Step.DONE

        started: dict[str, Any] | None = None
        fields: dict[str, Any] | None = None
        refused = False
        async with self.lock:
            if not started_job:
                if current == Phase.PREPARING:
                    # The plan's files, made outside the start lock (a rebase takes a while).
                    disk, decision = await self._observe_and_decide(spec, current)
                    if decision.action == Action.START_COPY:
                        failed = await self.starter.prepare(spec, disk)
                        if failed is not None:
                            await self.recorder.record(failed, disk=disk, generation=generation)
                            return Step.DONE
                # Starts are serialized and decided on a fresh look under the lock: of two
                # BlockCopies for one disk, the second then sees the first's job (DiskBusy).
                # The chain is checked once more right before the job starts.
                async with self.start_lock:
                    disk, decision = await self._observe_and_decide(spec, current)
                    if decision.reason == "Adopted":
                        decision = self._adopt(decision, disk, spec)
                    if decision.action == Action.START_COPY:
                        decision = self._queued() or decision
                    if decision.action == Action.START_COPY:
                        decision, started = await self.starter.start(spec, disk, raw_spec,
                                                                     decision, current)
                        self.holds_job = started is not None
            else:
                disk, decision = await self._observe_and_decide(spec, current)
                decision = self._left_behind(await self._group_gate(self._chain_move(decision)))
                fields, converging = self._progress(decision, disk)
                extra = [*extra, *converging]
                if decision.phase == Phase.COPYING:
                    assist_fields, assist = await self._assist_convergence(spec, disk, extra)
                    fields.update(assist_fields)
                    extra = [*extra, *assist]
                group = self._group_key()
                if group is not None and self.groups is not None:
                    fields["group"] = self.groups.summary(group)
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
        intent = decision.action == Action.PREPARE  # the plan is stored before any file
        phase_changed = await self.recorder.record(decision, disk=disk, generation=generation,
                                                   started=started, extra=extra, intent=intent,
                                                   fields=fields)
        if started and decision.phase == Phase.COPYING:
            self._start_layers()
        group = self._group_key()
        if phase_changed and group is not None and self.groups is not None:
            self.groups.changed(group, by=self)
        terminal = decision.phase in TERMINAL_PHASES
        if refused and not terminal:
            self.recorder.refused(decision, phase_changed=phase_changed)
        if terminal:
            return Step.DONE
        # After a successful action, look again at once; after a refused one, back off.
        return Step.AGAIN if decision.action != Action.NONE and not refused else Step.WAIT

    def _adopt(self, decision: Decision, disk: DiskState, spec: BlockCopySpec) -> Decision:
        """A job to our dest runs, and our status does not say we started it: ours if the
        agent restarted before recording it, not if another object of this agent started
        it (two BlockCopies to one dest, created together, both pass the destination check
        before the first job exists)."""
        holder = self.job_holder(self)
        if holder is None:
            self.holds_job = True
            return decision
        return Decision(Phase.FAILED, reason="DiskBusy",
                        message=f"disk {disk.target} already has a block job, the copy to "
                        f"{spec.dest} of BlockCopy {holder}; one block copy per disk at a time")

    async def _observe_and_decide(self, spec: BlockCopySpec, current: Phase | None
                                  ) -> tuple[DiskState, Decision]:
        # Once started, follow the disk by target: a source path changes with the pivot.
        disk_ref = self.recorder.status.get("target") or spec.disk
        disk = await self.hv.observe(spec.domain, disk_ref)
        self._note_reachable()
        if disk.chain:
            self._chain, self._chain_formats = disk.chain, disk.chain_formats
        self.domain_uuid, self.target = disk.domain_uuid, disk.target
        decision = reconcile.decide(spec, current, disk, last_event=self.last_event,
                                    was_mirrored=bool(self.recorder.status.get("mirroredTime")))
        return disk, decision

    def _progress(self, decision: Decision, disk: DiskState
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """status.rate and status.eta while Copying, and the Converging condition: False
        (NotConverging, a Warning Event) while what remains does not shrink."""
        before = next((c for c in self.recorder.status.get("conditions") or []
                       if c.get("type") == CONVERGING), None)
        kept = [{k: before[k] for k in ("type", "status", "reason", "message")}] \
            if before else []
        if decision.phase != Phase.COPYING or disk.job is None:
            self.window.clear()
            metrics.forget_progress(self.recorder.key)
            if before is not None and decision.phase in (Phase.MIRRORED, Phase.PIVOTING,
                                                         Phase.PIVOTED):
                kept = [{"type": CONVERGING, "status": "True", "reason": "InSync",
                         "message": "the copy reached sync"}]
            return {"rate": None, "eta": None}, kept
        self.window.add(asyncio.get_running_loop().time(), disk.job.cur, disk.job.end)
        estimate = self.window.estimate()
        if estimate is None:
            return {"rate": None, "eta": None}, kept
        fields = {"rate": estimate.rate,
                  "eta": duration(estimate.eta) if estimate.eta is not None else None}
        metrics.set_progress(self.recorder.key, rate=estimate.rate, eta=estimate.eta,
                             not_converging=estimate.converging is False)
        if estimate.converging is None:
            return fields, kept
        if estimate.converging:
            return fields, [{"type": CONVERGING, "status": "True", "reason": "Converging",
                             "message": f"what remains shrinks: {_mib(estimate.rate)}/s copied, "
                             f"{_mib(estimate.growth)}/s dirtied by the guest"}]
        message = (f"the copy does not converge: the guest dirties {_mib(estimate.growth)}/s "
                   f"while {_mib(estimate.rate)}/s are copied, so it will never be Mirrored "
                   "as things are. Raise spec.bandwidth (or remove the limit), or start the "
                   "copy again with the synchronousWrites flag (guest writes then go to both "
                   "sides; a running copy cannot switch on QEMU 7.2), or slow the guest down")
        if before is None or before.get("status") != "False":
            self.recorder.event("Warning", "NotConverging", message)
        return fields, [{"type": CONVERGING, "status": "False", "reason": "NotConverging",
                         "message": message}]

    async def _assist_convergence(self, spec: BlockCopySpec, disk: DiskState,
                                  extra: list[dict[str, Any]]) -> tuple[dict[str, Any],
                                                                        list[dict[str, Any]]]:
        """spec.convergence auto on a copy that does not converge: switch the running mirror
        to write-blocking where QEMU can (8.2); say so where it cannot. Once per copy."""
        not_converging = any(c["type"] == CONVERGING and c["status"] == "False" for c in extra)
        before = next((c for c in self.recorder.status.get("conditions") or []
                       if c.get("type") == ASSIST), None)
        kept = [{k: before[k] for k in ("type", "status", "reason", "message")}] \
            if before else []
        if spec.convergence != Convergence.AUTO or not not_converging or \
                self.recorder.status.get("copyMode") == "write-blocking" or \
                (before is not None and before.get("reason") == "NeedsQEMU82"):
            return {}, kept
        caps = await self.hv.capabilities()
        target = disk.target or spec.disk
        if not caps.block_job_change:
            message = (f"spec.convergence auto cannot help here: {caps.describe()}; switching a "
                       "running copy to write-blocking needs QEMU 8.2 (block-job-change). The "
                       "copy goes on as it is: raise the bandwidth, or restart it with the "
                       "synchronousWrites flag")
            self.recorder.event("Warning", "NeedsQEMU82", message)
            return {}, [{"type": ASSIST, "status": "False", "reason": "NeedsQEMU82",
                         "message": message}]
        try:
            await self.hv.set_copy_mode(spec.domain, target, "write-blocking")
        except HypervisorUnavailable:
            raise
        except HypervisorError as exc:
            message = f"switching the copy to write-blocking failed: {exc}"
            self.recorder.event("Warning", "SwitchFailed", message)
            return {}, [{"type": ASSIST, "status": "False", "reason": "SwitchFailed",
                         "message": message}]
        message = ("the copy did not converge: its running mirror now blocks guest writes "
                   "until they reach both sides (write-blocking, QEMU's block-job-change "
                   "through libvirt's monitor passthrough, which taints the domain), so it "
                   "converges")
        self.recorder.event("Normal", "WriteBlocking", message)
        return {"copyMode": "write-blocking"}, [{"type": ASSIST, "status": "True",
                                                 "reason": "WriteBlocking", "message": message}]

    def _group_key(self) -> GroupKey | None:
        return key_of(self.body)

    async def _group_gate(self, decision: Decision) -> Decision:
        """A member of a disk group pivots and aborts with the others (blockcopy.groups)."""
        self._group_recheck = None
        group = self._group_key()
        if group is None or self.groups is None:
            return decision
        if decision.action == Action.PIVOT:
            blocked, self._group_recheck = await self.groups.pivot_blocked(group, by=self)
            if blocked is not None:
                return Decision(Phase.MIRRORED, reason="WaitingForGroup", message=blocked)
        if decision.action == Action.ABORT and decision.reason != "LayerCopyFailed":
            blocked = self.groups.abort_blocked(group)
            if blocked is not None:
                current = self.recorder.phase or Phase.COPYING
                return Decision(current, reason="WaitingForGroup", message=blocked)
        return decision

    def _queued(self) -> Decision | None:
        """Beyond --max-active-copies: wait in the Queued phase, first come, first served."""
        meta = self.body.get("metadata", {})
        place = self.slots.request(self.recorder.key,
                                   created=str(meta.get("creationTimestamp") or ""))
        if place == 0:
            return None
        return Decision(Phase.QUEUED, reason="Queued",
                        message=f"waiting for a free copy slot on this node: {_ordinal(place)} "
                        f"in the queue (at most {self.slots.limit} copies at once, "
                        "--max-active-copies)")

    def _left_behind(self, decision: Decision) -> Decision:
        """A job that ended without the pivot leaves its files: say which (never deleted)."""
        files = self.recorder.status.get("createdFiles") or []
        if decision.phase not in (Phase.FAILED, Phase.ABORTED) or not files or \
                "left in place" in decision.message:
            return decision
        return dataclasses.replace(decision, message=f"{decision.message}; left in place: "
                                   f"{', '.join(files)}")

    # -- a chain move: the lower images are copied aside; the pivot waits for them ------
    def _start_layers(self) -> None:
        raw_plan = self.recorder.status.get("plan") or {}
        if raw_plan.get("kind") != PlanKind.CHAIN or self.layers is not None:
            return
        chain = tuple(raw_plan["chain"])
        known = dict(zip(self._chain, self._chain_formats, strict=False))
        formats = (self.recorder.status.get("format") or "qcow2",
                   *(known.get(p) or "qcow2" for p in chain[1:]))
        plan = Plan(PlanKind.CHAIN, chain, formats, tuple(raw_plan["targets"]))
        self.layers = LayerCopies(plan, self.images,
                                  recorded=self.recorder.status.get("layers") or [],
                                  on_change=self._layers_changed)
        self.layers.start()

    def _layers_changed(self, layers: list[dict[str, Any]]) -> None:
        self.recorder.update(layers=layers)
        self.wake.set()  # a verified (or failed) layer may unblock the pivot (or end it)

    def _chain_move(self, decision: Decision) -> Decision:
        """Hold the pivot until every lower image is verified; end the job if one failed."""
        if (self.recorder.status.get("plan") or {}).get("kind") != PlanKind.CHAIN:
            return decision
        if self.layers is None and decision.phase in (Phase.COPYING, Phase.MIRRORED):
            self._start_layers()  # after a restart: copy again what was not verified
        layers = self.layers
        if layers is None:
            return decision
        failure = layers.failure
        if failure is not None:
            if decision.phase in (Phase.COPYING, Phase.MIRRORED) or \
                    decision.action == Action.PIVOT:
                return Decision(Phase.ABORTING, Action.ABORT, reason="LayerCopyFailed",
                                message=f"copying a lower image failed ({failure}); ending the "
                                "job, the VM stays on its source")
            if decision.phase == Phase.ABORTED:
                return Decision(Phase.FAILED, reason="LayerCopyFailed",
                                message=f"copying a lower image failed ({failure}); the VM stays "
                                "on its source; the files made are listed in "
                                "status.createdFiles")
            return decision
        if decision.action == Action.PIVOT and not layers.all_verified:
            return Decision(Phase.MIRRORED, reason="WaitingForLayers",
                            message=f"the mirror is ready; waiting for the lower images "
                            f"({layers.verified} of {len(layers.layers)} verified) before the "
                            "pivot")
        return decision

    async def _act(self, spec: BlockCopySpec, disk: DiskState, decision: Decision) -> None:
        target = disk.target or spec.disk
        match decision.action:
            case Action.PIVOT:
                self.recorder.pivot_issued = asyncio.get_running_loop().time()
                await self.hv.pivot(spec.domain, target)
            case Action.ABORT:
                group = self._group_key()
                if group is not None and self.groups is not None and \
                        decision.reason != "LayerCopyFailed":
                    await self.groups.abort(group, spec.domain, by=self)
                else:
                    await self.hv.cancel(spec.domain, target)
            case Action.SET_BANDWIDTH:
                await self.hv.set_bandwidth(spec.domain, target, spec.bandwidth)
