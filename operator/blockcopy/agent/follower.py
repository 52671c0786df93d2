"""One BlockCopy's follower. Each step does four things, in this order: observe (the disk
in libvirt, and what else the decision needs, through the observer), decide (pure:
``core.gates`` over the observation), act (at most one action, through a collaborator: the
launcher before the job, the job actor while it runs, the convergence assist), record
(status, Events, metrics, through the recorder, always). ``loop`` runs the steps and sleeps
between them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from blockcopy.agent.actor import JobActor
from blockcopy.agent.convergence import ConvergenceAssist
from blockcopy.agent.groups import Groups, key_of
from blockcopy.agent.groupswitch import GroupSwitch
from blockcopy.agent.launcher import JobLauncher
from blockcopy.agent.loop import FollowLoop, Step, StopSignal
from blockcopy.agent.observer import DiskObserver
from blockcopy.agent.reclaim import reclaim, summary
from blockcopy.agent.recorder import ObjectRecorder
from blockcopy.agent.retries import Retries
from blockcopy.agent.startchecks import StartChecks
from blockcopy.agent.starter import Starter
from blockcopy.agent.steps import FollowSettings, Outcome
from blockcopy.agent.verifier import Verifier
from blockcopy.core import convergence, destinations, gates, status, verify
from blockcopy.core.reconcile import Action, Decision
from blockcopy.core.slots import CopySlots
from blockcopy.core.specs import read_spec
from blockcopy.core.verify import Copy
from blockcopy.model.api import TERMINAL_PHASES, BlockCopySpec, Phase
from blockcopy.model.observation import JobEvent
from blockcopy.model.ports import Files, Hypervisor, Images

log = logging.getLogger(__name__)


class Follower:
    """Drives one BlockCopy until it reaches a terminal phase or the agent stops.

    ``body`` is kopf's live view of the object (updated in place as watch events arrive).
    """

    def __init__(self, body: Mapping[str, Any], *, hv: Hypervisor, images: Images,
                 files: Files, recorder: ObjectRecorder, settings: FollowSettings,
                 start_lock: asyncio.Lock, slots: CopySlots, groups: Groups,
                 job_holder: Callable[[Follower], str | None], verifier: Verifier,
                 switch: GroupSwitch):
        self.body, self.hv, self.images, self.recorder = body, hv, images, recorder
        self.settings, self.groups = settings, groups
        start = settings.start
        self.checks = StartChecks(hv=hv, images=images, files=files,
                                  allowed_paths=start.allowed_paths,
                                  allowed_network=start.allowed_network, policy=start.policy,
                                  namespace=recorder.ref.namespace, status=lambda: recorder.status)
        self.starter = Starter(hv=hv, images=images, files=files, checks=self.checks,
                               settings=start, status=lambda: recorder.status,
                               now=lambda: status.timestamp(recorder.agent.clock()))
        self.assist = ConvergenceAssist(hv)
        self.retries = Retries(recorder)
        self.actor = JobActor(hv=hv, starter=self.starter, verifier=verifier, switch=switch,
                              groups=groups, recorder=recorder, retries=self.retries,
                              member=self)
        self.lock = asyncio.Lock()  # shared with the deletion handler
        self.observer = DiskObserver(hv=hv, images=images, checks=self.checks, groups=groups,
                                     recorder=recorder, retries=self.retries,
                                     group_key=lambda: key_of(self.body),
                                     on_layers=self.poke)
        self.launcher = JobLauncher(checks=self.checks, starter=self.starter, slots=slots,
                                    key=recorder.key, lock=self.lock, start_lock=start_lock,
                                    observe=self.observer.disk, holder=lambda: job_holder(self),
                                    holds=self._holds)
        self.holds_job = False  # this object started (or adopted) the disk's job
        self.wake = asyncio.Event()
        self.last_event: JobEvent | None = None
        self.generation: int | None = body.get("metadata", {}).get("generation")
        self.spec_changed = False
        self._group_recheck: float | None = None  # s until a waiting group may pivot
        self._looked = False  # the first step was recorded (logged once, for whoever waits)

    # -- what the group and the agent see of this follower -------------------------------
    @property
    def name(self) -> str:
        return self.recorder.ref.name

    @property
    def phase(self) -> Phase | None:
        return self.recorder.phase

    @property
    def target(self) -> str | None:
        return self.observer.target

    @property
    def vm(self) -> tuple[str, str]:
        return self.observer.domain_name or "", self.observer.domain_uuid or ""

    def poke(self) -> None:
        self.wake.set()

    def note_event(self, type: str, reason: str, message: str) -> None:
        self.recorder.event(type, reason, message)

    async def switch_copy(self) -> Copy | str:
        if self.body.get("metadata", {}).get("deletionTimestamp"):
            return f"{self.name} is being deleted"  # its deletion handler ends its job
        reading = read_spec(self.body.get("spec"), self.recorder.status, self.phase)
        if reading.spec is None or not reading.started_job:
            return f"{self.name}: {reading.error or 'no job of it runs'}"
        ready = await self.observer.ready_to_switch(reading.spec, self.phase, self.name)
        if not isinstance(ready, str):
            self.recorder.pivot_issued = asyncio.get_running_loop().time()
        return ready

    # -- wake-ups (called on the event loop) ------------------------------------------
    @property
    def disk_ref(self) -> tuple[str | None, str | None]:
        """Domain uuid and target of the disk, once looked at (where its job's events come
        from)."""
        return self.observer.domain_uuid, self.observer.target

    def on_job_event(self, domain_uuid: str, target: str, event: JobEvent) -> None:
        if (domain_uuid, target) == self.disk_ref:
            self.last_event = event
            self.wake.set()

    def on_spec_change(self, generation: int | None) -> None:
        if generation != self.generation:
            self.generation = generation
            self.spec_changed = True
            self.wake.set()

    # -- the loop's questions ---------------------------------------------------------
    async def run(self, stop: StopSignal) -> None:
        await FollowLoop(self).run(stop)

    def wait_time(self) -> float:
        """How long to sleep after a step that found nothing to do (a wake-up cuts it)."""
        if self.retries.refusing:
            if not self.spec_changed:
                self.wake.clear()  # only a spec change may cut a refusal's back-off short
            return self.retries.refusal_delay
        if self.recorder.phase == Phase.COPYING:
            return self.recorder.agent.pace.interval()  # cur/end stay fresh, within budget
        if self._group_recheck is not None:  # the group may pivot then without a wake-up
            return min(self._group_recheck, self.settings.poll_interval)
        return self.settings.poll_interval  # events do the work; this is a fallback

    async def close(self) -> None:
        await self.observer.layers.stop()  # a restarted agent copies again what was not verified
        await self.recorder.close()

    # -- one step: observe, decide, act, record -----------------------------------------
    async def step(self) -> Step:
        current = self.recorder.phase
        if current in TERMINAL_PHASES:
            if current == Phase.PIVOTED:
                await self._reclaim()
            return Step.DONE
        self.generation = self.body.get("metadata", {}).get("generation")
        reading = read_spec(self.body.get("spec"), self.recorder.status, current)
        if reading.spec is None:
            outcome = Outcome(Decision(Phase.FAILED, message=str(reading.error),
                                       reason="InvalidSpec"), None, [])
        elif reading.started_job and current is not None:
            self.holds_job = True
            async with self.lock:
                outcome = await self._follow_job(reading.spec, current, reading.conditions)
        else:
            outcome = await self._start_job(reading.spec, reading.raw, current,
                                            reading.conditions)
        outcome.spec = reading.spec
        return await self._record(outcome)

    # -- before the job -------------------------------------------------------------------
    async def _start_job(self, spec: BlockCopySpec, raw: Mapping[str, Any],
                         current: Phase | None, conditions: list[dict[str, Any]]) -> Outcome:
        created = str(self.body.get("metadata", {}).get("creationTimestamp") or "")
        return await self.launcher.launch(spec, raw, current, conditions, created=created)

    def _holds(self, held: bool) -> None:
        self.holds_job = held

    # -- while the job runs ---------------------------------------------------------------
    async def _follow_job(self, spec: BlockCopySpec, current: Phase,
                          conditions: list[dict[str, Any]]) -> Outcome:
        seen = await self.observer.job(spec, current, first=not self._looked)
        decision, self._group_recheck = gates.decide_running(
            spec, current, seen.disk, was_mirrored=bool(self.recorder.status.get("mirroredTime")),
            last_event=self.last_event, layers_view=seen.layers, group_view=seen.group,
            asking=self.name, created_files=list(self.recorder.status.get("createdFiles") or []))
        asked = decision.action
        decision, intact = destinations.guard(decision, spec.dest, seen.dest,
                                              previous=self.recorder.status.get("conditions"))
        if asked == Action.PIVOT and decision.action != Action.PIVOT:
            self.recorder.agent.metrics.error(decision.reason)  # every held attempt counts
        if intact and intact[0]["status"] == "False" and not destinations.was_held(
                self.recorder.status.get("conditions"), intact[0]["reason"]):
            self.recorder.event("Warning", intact[0]["reason"], intact[0]["message"])
        previous = self.recorder.status.get("conditions")
        conditions = [*conditions, *intact, *verify.kept(previous)]
        progress = convergence.progress(decision.phase, has_job=seen.disk.job is not None,
                                        estimate=seen.estimate, previous=previous)
        fields = dict(progress.fields)
        if progress.warning is not None:
            self.recorder.event("Warning", "NotConverging", progress.warning)
        assist = convergence.kept_assist(previous)
        if decision.phase == Phase.COPYING and convergence.assist_wanted(
                spec, progress, copy_mode=self.recorder.status.get("copyMode"),
                previous=previous):
            assist = await self.assist.assist(spec.domain, seen.disk.target or spec.disk)
            if assist.event is not None:
                self.recorder.event(*assist.event)
        fields.update(assist.fields)
        summary = self.groups.summary(key_of(self.body))
        if summary is not None:
            fields["group"] = summary
        outcome = Outcome(decision, seen.disk, [*conditions, *progress.conditions,
                                                *assist.conditions], fields=fields,
                          estimate=seen.estimate)
        if decision.phase in (Phase.COPYING, Phase.MIRRORED):
            self.observer.layers.start()  # after a restart: copy again what was not verified
        return await self.actor.act(spec, current, outcome, generation=self.generation)

    # -- after the job ------------------------------------------------------------------
    async def _reclaim(self) -> None:
        """spec.deleteSourcesUnder, once Pivoted (agent.reclaim)."""
        reading = read_spec(self.body.get("spec"), self.recorder.status, Phase.PIVOTED)
        if reading.spec is None:
            return
        done = await reclaim(reading.spec, self.recorder.status, images=self.images,
                             files=self.checks.files, in_use=self.checks.users)
        if done is not None:
            self.recorder.update(reclaimedSources=done)
            self.recorder.event("Normal", "SourcesReclaimed", summary(done))

    # -- recording ------------------------------------------------------------------------
    async def _record(self, outcome: Outcome) -> Step:
        decision = outcome.decision
        if not self._looked:
            self._looked = True
            log.info("%s/%s: first look done: %s (%s)", *self.recorder.key,
                     decision.phase.value, decision.reason or decision.message)
        phase_changed = await self.recorder.record(
            decision, disk=outcome.disk, generation=self.generation, started=outcome.started,
            extra=outcome.conditions, intent=outcome.intent, fields=outcome.fields,
            spec=outcome.spec)
        self.recorder.progress(decision.phase, outcome.estimate, outcome.conditions)
        if outcome.started and decision.phase == Phase.COPYING:
            self.observer.take_up_layers()
            self.observer.layers.start()
        if phase_changed:
            self.groups.changed(key_of(self.body), by=self)
        terminal = decision.phase in TERMINAL_PHASES
        if outcome.refused and not terminal:
            self.recorder.refused(decision, phase_changed=phase_changed)
        if terminal:
            if decision.phase == Phase.PIVOTED:
                await self._reclaim()
            return Step.DONE
        # After a successful action, look again at once; after a refused one, back off.
        return Step.AGAIN if decision.action != Action.NONE and not outcome.refused \
            else Step.WAIT
