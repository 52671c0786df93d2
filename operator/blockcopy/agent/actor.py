"""The act step of a follower while its job runs: the one action a decision asks for, and
what its result makes of the outcome the recorder writes (a refusal, the check at the
switch). Apart from the follower so that the follower keeps the order of the four steps
(observe, decide, act, record) and the start, and this the verbs on a running job: pivot
(through the verifier, or for a disk group through the group's switch, all or none), abort
(alone or with the disk's group), set the bandwidth (or turn zero detection on again).

A group member's share of a switch another member started (its follower was elsewhere) is
taken first, whatever the decision: its disk was pivoted, its job ended, or it is held (a
switch under way is waited for: the step's look may have seen its disk pivoted already).
"""

from __future__ import annotations

import asyncio

from blockcopy.agent.groups import Groups, Member, key_of
from blockcopy.agent.groupswitch import GroupSwitch
from blockcopy.agent.recorder import ObjectRecorder
from blockcopy.agent.retries import Retries
from blockcopy.agent.starter import Starter
from blockcopy.agent.steps import Outcome
from blockcopy.agent.verifier import Verifier
from blockcopy.core import reconcile, status, verify, zeroes
from blockcopy.core.groupswitch import Switched
from blockcopy.core.reconcile import Action, Decision
from blockcopy.core.verify import Copy
from blockcopy.model.api import BlockCopySpec, Phase
from blockcopy.model.observation import DiskState
from blockcopy.model.ports import Hypervisor, HypervisorError, HypervisorUnavailable


class JobActor:
    """Acts for one follower (``member``) on the job it holds."""

    def __init__(self, *, hv: Hypervisor, starter: Starter, verifier: Verifier,
                 switch: GroupSwitch, groups: Groups, recorder: ObjectRecorder,
                 retries: Retries, member: Member):
        self.hv, self.starter, self.verifier, self.groups = hv, starter, verifier, groups
        self.switch, self.recorder, self.retries, self.member = switch, recorder, retries, \
            member

    async def act(self, spec: BlockCopySpec, current: Phase, outcome: Outcome, *,
                  generation: int | None) -> Outcome:
        decision, disk = outcome.decision, outcome.disk
        assert disk is not None
        # A step about to pivot joins a switch of its group under way (``GroupSwitch.pivot``:
        # its look came before its disk was touched); any other step waits for that switch
        # to end first, as its look may have seen its disk pivoted, or its job ended, there.
        share = self.switch.take(self.member) if decision.action == Action.PIVOT else \
            await self.switch.share_of(self.member)
        if share is not None and share.waiting is None:
            # Its group switched while this follower was elsewhere. (A switch that did not
            # happen tells nothing this step's own look does not.)
            return await self._switched(spec, disk, outcome, share)
        if decision.action == Action.NONE:
            self.retries.acted()
            return outcome
        if decision.action in (Action.PIVOT, Action.ABORT) and not self.retries.refusing:
            # Record the intent first: if the agent dies mid-way, the phase tells the
            # restarted agent to finish the same thing (the mirror is re-checked).
            # Not again on retries: a refused pivot stays Mirrored, without flapping.
            await self.recorder.record(decision, disk=disk, generation=generation,
                                       extra=outcome.conditions, intent=True, spec=spec)
        try:
            share = await self._act(spec, disk, decision)
        except HypervisorUnavailable:
            raise
        except HypervisorError as exc:
            self.retries.refused()
            outcome.decision, outcome.refused = reconcile.refused(decision, current, str(exc)), \
                True
            return outcome
        if share is not None:
            return await self._switched(spec, disk, outcome, share)
        self.retries.acted()
        return outcome

    async def _switched(self, spec: BlockCopySpec, disk: DiskState, outcome: Outcome,
                        share: Switched) -> Outcome:
        """A pivot's outcome (a single disk's, or this member's share of its group's
        switch): zero detection as the XML says again after a pivot, the check recorded, a
        pivot that did not happen retried on the refusal back-off."""
        if share.pivoted:
            await self.starter.zero_detection_back(spec.domain, disk.target or spec.disk)
        if share.waiting is not None:  # a member was not ready after all: no pivot, no check
            self.retries.refused()
            outcome.decision, outcome.refused = Decision(
                Phase.MIRRORED, reason="WaitingForGroup", message=share.waiting,
                warning=True), True
            return outcome
        if share.result is not None and self._record_check(outcome, share.result):
            return outcome
        if share.refused is not None:
            self.retries.refused()
            outcome.decision, outcome.refused = Decision(
                Phase.MIRRORED, reason="PivotRefused", message=share.refused,
                warning=True), True
            return outcome
        self.retries.acted()
        return outcome

    def _record_check(self, outcome: Outcome, result: verify.Result) -> bool:
        """The check at the switch: its condition, status field and Event; the decision a
        held pivot turns into (Failed on a mismatch, Mirrored while a check asked for
        cannot be made or, in a group, another member holds the group: True, retried on
        the refusal back-off, whose Warning Event tells it)."""
        outcome.decision = verify.decision(result, outcome.decision)
        outcome.conditions = [*(c for c in outcome.conditions
                                if c.get("type") != verify.VERIFIED), verify.condition(result)]
        outcome.fields = {**(outcome.fields or {}), "verification": verify.status_field(
            result, status.timestamp(self.recorder.agent.clock()))}
        event = verify.event(result)
        if event is not None:
            self.recorder.event(*event)
        if result.kept_mirrored:
            self.retries.refused()
            outcome.refused = True
        return outcome.refused

    async def _act(self, spec: BlockCopySpec, disk: DiskState, decision: Decision
                   ) -> Switched | None:
        """Act on the decision; a pivot returns what became of it (with its check)."""
        target = disk.target or spec.disk
        match decision.action:
            case Action.PIVOT:
                self.recorder.pivot_issued = asyncio.get_running_loop().time()
                group = key_of(self.member.body)
                if group is not None:  # the whole group, in one pause, all or none
                    return await self.switch.pivot(group, by=self.member)
                checked = await self.verifier.pivot(Copy(
                    spec, disk, target, self.recorder.status.get("format")))
                return Switched(checked, pivoted=not checked.held)
            case Action.ABORT:
                group = key_of(self.member.body)
                if group is not None and decision.reason != "LayerCopyFailed":
                    await self.groups.abort(group, spec.domain, by=self.member)
                else:
                    await self.hv.cancel(spec.domain, target)
            case Action.SET_BANDWIDTH:
                if self._throttled_for_zeroes(spec, disk):
                    # The agent stopped between the throttled start and the reopen: again.
                    self.recorder.update(zeroDetection=await self.starter.detect_zeroes(
                        spec.domain, target, spec.bandwidth))
                else:
                    await self.hv.set_bandwidth(spec.domain, target, spec.bandwidth)
        return None

    def _throttled_for_zeroes(self, spec: BlockCopySpec, disk: DiskState) -> bool:
        return spec.detect_zeroes and disk.job is not None and \
            disk.job.bandwidth == zeroes.THROTTLE != spec.bandwidth and \
            self.recorder.status.get("zeroDetection") != "unmap"
