"""The observe step of a follower: the disk in libvirt, and, while the job runs, what else the
decision needs (the layer copies of a chain move, the disk's group, the destination before a
pivot, the progress window). Apart from the follower because it keeps state between steps
that only observing needs: where libvirt's events for the disk come from (domain and target,
known after the first look), the chain last seen, the progress samples, the layer copies
taken up from status.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from blockcopy.agent import layers
from blockcopy.agent.groups import Groups
from blockcopy.agent.layers import NO_LAYER_COPIES, LayerCopies, NoLayerCopies
from blockcopy.agent.recorder import ObjectRecorder
from blockcopy.agent.retries import Retries
from blockcopy.agent.startchecks import StartChecks
from blockcopy.agent.steps import Observation
from blockcopy.core import destinations, gates, reconcile
from blockcopy.core.progress import ProgressWindow
from blockcopy.core.reconcile import Action, Decision
from blockcopy.core.verify import Copy
from blockcopy.model.api import BlockCopySpec, Phase
from blockcopy.model.observation import DiskState
from blockcopy.model.ports import Hypervisor, Images


class DiskObserver:
    """Looks at one follower's disk; ``group_key`` names the disk's group (``groups.key_of``),
    ``on_layers`` is told when a layer copy changes (it may unblock or end the pivot)."""

    def __init__(self, *, hv: Hypervisor, images: Images, checks: StartChecks, groups: Groups,
                 recorder: ObjectRecorder, retries: Retries, group_key: Callable[[], Any],
                 on_layers: Callable[[], None]):
        self.hv, self.images, self.checks, self.groups = hv, images, checks, groups
        self.recorder, self.retries = recorder, retries
        self.group_key, self.on_layers = group_key, on_layers
        self.layers: LayerCopies | NoLayerCopies = NO_LAYER_COPIES
        self.window = ProgressWindow()  # rate, time left, convergence
        self.domain_uuid: str | None = None  # where libvirt's events for us come from
        self.domain_name: str | None = None  # (with the uuid: the VM's names, for its group)
        self.target: str | None = None
        self._chain: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # last seen, formats

    async def disk(self, spec: BlockCopySpec) -> DiskState:
        # Once started, follow the disk by target: a source path changes with the pivot.
        disk = await self.hv.observe(spec.domain, self.recorder.status.get("target") or spec.disk)
        self.retries.reached()
        if disk.chain:
            self._chain = (disk.chain, disk.chain_formats)
        self.domain_uuid, self.target = disk.domain_uuid, disk.target
        self.domain_name = disk.domain_name
        return disk

    async def job(self, spec: BlockCopySpec, current: Phase, *, first: bool) -> Observation:
        """``first``: no step was recorded yet (the destination is looked at then too)."""
        disk = await self.disk(spec)
        if isinstance(self.layers, NoLayerCopies):
            self.take_up_layers()
        pivot_due = gates.pivot_due(spec, current, disk)
        group = await self.groups.view(self.group_key(), listing=pivot_due,
                                       vm=(disk.domain_name or "", disk.domain_uuid or ""))
        dest = await self.checks.dest_check(spec, disk, self.recorder.status.get(
            "destIdentity")) if pivot_due or first else None
        estimate = None
        if current == Phase.COPYING and disk.job is not None:
            self.window.add(asyncio.get_running_loop().time(), disk.job.cur, disk.job.end)
            estimate = self.window.estimate()
        else:
            self.window.clear()
        return Observation(disk, self.layers.view, group, estimate, dest)

    async def ready_to_switch(self, spec: BlockCopySpec, current: Phase | None,
                              name: str) -> Copy | str:
        """For the group's switch: the copy as it is now, or why ``name`` may not pivot
        after all (what its own step would hold the pivot for: the phase logic, a chain
        move's layers, the destination). Another member's step may ask before this
        follower's first look (a restarted agent follows the members one by one): a chain
        move's layer copies are taken up from status here too, or its pivot would not wait
        for them."""
        disk = await self.disk(spec)
        if isinstance(self.layers, NoLayerCopies):
            self.take_up_layers()
        decision = gates.layers(reconcile.decide(spec, current or Phase.MIRRORED, disk),
                                self.layers.view)
        if decision.action == Action.PIVOT:
            check = await self.checks.dest_check(spec, disk, self.recorder.status.get(
                "destIdentity"))
            problem = destinations.held(spec.dest, check) if check is not None else None
            if problem is None:
                return Copy(spec, disk, disk.target or spec.disk,
                            self.recorder.status.get("format"))
            decision = Decision(Phase.MIRRORED, reason=problem[0], message=problem[1])
        return f"{name} is {decision.phase.value} ({decision.message or decision.reason})"

    def take_up_layers(self) -> None:
        """A chain move recorded in status: its layer copies (started by the act step)."""
        st = self.recorder.status
        plan = layers.chain_plan(st.get("plan"), format=st.get("format"),
                                 chain=self._chain[0], chain_formats=self._chain[1])
        if plan is not None:
            self.layers = LayerCopies(plan, self.images, recorded=st.get("layers") or [],
                                      on_change=self._layers_changed)

    def _layers_changed(self, layer_states: list[dict[str, Any]]) -> None:
        self.recorder.update(layers=layer_states)
        self.on_layers()
