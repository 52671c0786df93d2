"""The act step of a follower while its job runs: the one action a decision asks for, and
what its result makes of the outcome the recorder writes (a refusal, the check at the
switch). Apart from the follower so that the follower keeps the order of the four steps
(observe, decide, act, record) and the start, and this the verbs on a running job: pivot
(through the verifier), abort (alone or with the disk's group), set the bandwidth (or turn
zero detection on again).
"""

from __future__ import annotations

import asyncio

from blockcopy.agent.groups import Groups, Member, key_of
from blockcopy.agent.recorder import ObjectRecorder
from blockcopy.agent.retries import Retries
from blockcopy.agent.starter import Starter
from blockcopy.agent.steps import Outcome
from blockcopy.agent.verifier import Copy, Verifier
from blockcopy.core import reconcile, status, verify, zeroes
from blockcopy.core.reconcile import Action, Decision
from blockcopy.model.api import BlockCopySpec, Phase
from blockcopy.model.observation import DiskState
from blockcopy.model.ports import Hypervisor, HypervisorError, HypervisorUnavailable


class JobActor:
    """Acts for one follower (``member``) on the job it holds."""

    def __init__(self, *, hv: Hypervisor, starter: Starter, verifier: Verifier,
                 groups: Groups, recorder: ObjectRecorder, retries: Retries, member: Member):
        self.hv, self.starter, self.verifier, self.groups = hv, starter, verifier, groups
        self.recorder, self.retries, self.member = recorder, retries, member

    async def act(self, spec: BlockCopySpec, current: Phase, outcome: Outcome, *,
                  generation: int | None) -> Outcome:
        decision, disk = outcome.decision, outcome.disk
        assert disk is not None
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
            checked = await self._act(spec, disk, decision)
        except HypervisorUnavailable:
            raise
        except HypervisorError as exc:
            self.retries.refused()
            outcome.decision, outcome.refused = reconcile.refused(decision, current, str(exc)), \
                True
            return outcome
        if checked is not None and self._record_check(outcome, checked):
            return outcome
        self.retries.acted()
        return outcome

    def _record_check(self, outcome: Outcome, result: verify.Result) -> bool:
        """The check at the switch: its condition, status field and Event; the decision a
        held pivot turns into (Failed on a mismatch, Mirrored while a check asked for
        cannot be made: True, retried on the refusal back-off)."""
        outcome.decision = verify.decision(result, outcome.decision)
        outcome.conditions = [*(c for c in outcome.conditions
                                if c.get("type") != verify.VERIFIED), verify.condition(result)]
        outcome.fields = {**(outcome.fields or {}), "verification": verify.status_field(
            result, status.timestamp(self.recorder.agent.clock()))}
        event = verify.event(result)
        if event is not None:
            self.recorder.event(*event)
        if result.reason == "NotVerifiable":
            self.retries.refused()
            outcome.refused = True
        return outcome.refused

    async def _act(self, spec: BlockCopySpec, disk: DiskState, decision: Decision
                   ) -> verify.Result | None:
        """Act on the decision; a pivot returns its check at the switch."""
        target = disk.target or spec.disk
        match decision.action:
            case Action.PIVOT:
                self.recorder.pivot_issued = asyncio.get_running_loop().time()
                checked = await self.verifier.pivot(Copy(
                    spec, disk, target, self.recorder.status.get("format")))
                if not checked.held:
                    await self.starter.zero_detection_back(spec.domain, target)
                return checked
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
