"""Starting a copy: everything between "the disk is idle, go" and libvirt's blockCopy.

The checks that must pass before anything is created (the agent's policy, the destination
not in the source's own chain, room for the copy), the plan of a layout QEMU's mirror cannot
do alone (``plans``: recorded first as the Preparing phase, then prepared, then re-checked),
and the request itself: flags, format, the destination's kind (file, block device, NBD).
Called by the follower with the start lock held (one start per disk at a time).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

from blockcopy import destination, plans, reconcile, status
from blockcopy.api import BlockCopySpec, Flag, Phase, started_fields
from blockcopy.observation import DiskState
from blockcopy.plans import Plan, PlanKind, Refusal
from blockcopy.policy import Policy
from blockcopy.ports import (
    CopyRequest,
    DiskSize,
    Hypervisor,
    HypervisorError,
    HypervisorUnavailable,
    ImageError,
    Images,
)
from blockcopy.reconcile import Action, Decision
from blockcopy.recorder import ObjectRecorder


@dataclasses.dataclass(frozen=True)
class StartSettings:
    allowed_paths: tuple[str, ...]
    allowed_network: tuple[str, ...] = ()
    policy: Policy = dataclasses.field(default_factory=Policy)


def _failed(reason: str, message: str) -> Decision:
    return Decision(Phase.FAILED, reason=reason, message=message)


class Starter:
    def __init__(self, *, hv: Hypervisor, images: Images, recorder: ObjectRecorder,
                 settings: StartSettings):
        self.hv, self.images, self.recorder, self.settings = hv, images, recorder, settings

    # -- before libvirt is called at all ----------------------------------------------
    def refusal(self, spec: BlockCopySpec) -> Decision | None:
        """Checks that need no libvirt: the destination and the namespace's policy."""
        if spec.network is not None:
            refused = destination.network_refusal(spec.network.endpoint,
                                                  self.settings.allowed_network)
        else:
            refused = destination.refusal(spec, self.settings.allowed_paths)
            if refused is not None and refused[0] == "DestExists" and \
                    self.recorder.phase == Phase.PREPARING and \
                    spec.dest in (self.recorder.status.get("createdFiles") or []):
                refused = None  # our own file, from a plan a restarted agent now finishes
        forbidden = self.settings.policy.precheck(namespace=self.recorder.ref.namespace,
                                                  dest=spec.dest)
        if forbidden is not None:
            refused = ("Forbidden", f"{forbidden} (the agent's policy); nothing was started")
        return _failed(*refused) if refused is not None else None

    # -- once the disk is seen idle -----------------------------------------------------
    async def start(self, spec: BlockCopySpec, disk: DiskState, raw_spec: dict[str, Any],
                    decision: Decision, current: Phase | None
                    ) -> tuple[Decision, dict[str, Any] | None]:
        """The decision to record (Copying, Preparing, or Failed with the reason) and the
        status fields it brings. ``decision`` is reconcile's START_COPY."""
        refused = self._refuse_by_policy(spec, disk) or self._refuse_own_chain(spec, disk) or \
            await self._refuse_unsupported(spec)
        if refused is not None:
            return refused, None
        assert disk.target is not None
        size = await self.hv.disk_size(spec.domain, disk.target)
        plan: Plan | None = None
        if plans.needed(spec, disk):
            if current == Phase.PREPARING:
                plan = plans.from_status(self.recorder.status.get("plan"), disk=disk,
                                         spec=spec, capacity=size.capacity)
            if plan is None:  # not planned yet: check, then record the plan (no file yet)
                made = plans.make(spec, disk, size.capacity)
                if isinstance(made, Refusal):
                    return _failed(made.reason, made.message), None
                refused = self._refuse_targets(made, disk) or \
                    await self._space(spec, disk, size, made)
                if refused is not None:
                    return refused, None
                return (Decision(Phase.PREPARING, Action.PREPARE, reason="Preparing",
                                 message=self._plan_message(made)),
                        {"plan": made.status(), "createdFiles": made.created_files})
            changed = plans.chain_changed(plan, disk)
            if changed is not None:
                return _failed("ChainChanged", f"{changed}; nothing was started (the "
                               "prepared files stay, see status.createdFiles)"), None
        else:
            refused = await self._space(spec, disk, size, None)
            if refused is not None:
                return refused, None
        return await self._start_copy(spec, disk, raw_spec, decision, plan)

    async def prepare(self, spec: BlockCopySpec, disk: DiskState) -> Decision | None:
        """The Preparing phase: create the plan's files (again, if a restarted agent left
        them half done). None when done, else the Failed decision."""
        assert disk.target is not None
        size = await self.hv.disk_size(spec.domain, disk.target)
        plan = plans.from_status(self.recorder.status.get("plan"), disk=disk, spec=spec,
                                 capacity=size.capacity)
        if plan is None:
            return None
        changed = plans.chain_changed(plan, disk)
        if changed is not None:
            return _failed("ChainChanged", f"{changed}; nothing was started")
        try:
            await plans.prepare(plan, self.images)
        except ImageError as exc:
            return _failed("PreparationFailed", f"preparing the destination failed: {exc}; "
                           "the VM stays on its source, the files made so far are listed in "
                           "status.createdFiles")
        return None

    # -- the checks -------------------------------------------------------------------
    def _refuse_by_policy(self, spec: BlockCopySpec, disk: DiskState) -> Decision | None:
        forbidden = self.settings.policy.check(
            namespace=self.recorder.ref.namespace, domain=spec.domain,
            tenant=disk.domain_tenant, dest=spec.dest)
        if forbidden is None:
            return None
        return _failed("Forbidden", f"{forbidden} (the agent's policy); nothing was started")

    async def _refuse_unsupported(self, spec: BlockCopySpec) -> Decision | None:
        """A spec that needs more than this node's libvirt and QEMU can do."""
        caps = await self.hv.capabilities()
        if Flag.SYNCHRONOUS_WRITES in spec.flags and not caps.synchronous_writes:
            return _failed("NotSupportedHere", f"the synchronousWrites flag needs libvirt 8.0 "
                           f"or newer; this node has {caps.describe()}")
        return None

    @staticmethod
    def _refuse_own_chain(spec: BlockCopySpec, disk: DiskState) -> Decision | None:
        if spec.network is not None:
            return None
        image = destination.chain_member(spec.dest, [disk.source, *disk.chain])
        if image is None:
            return None
        what = "the disk's active image" if image == disk.source else \
            "an image of the disk's backing chain"
        return _failed("DestInSourceChain", f"dest {spec.dest} is {image}, {what}: a copy "
                       "into its own chain would overwrite what it reads; nothing was started")

    @staticmethod
    def _refuse_targets(plan: Plan, disk: DiskState) -> Decision | None:
        """A chain move's lower targets: new files, not images of the chain itself."""
        if plan.kind != PlanKind.CHAIN:
            return None
        for source, target in zip(plan.chain[1:], plan.targets[1:], strict=True):
            if destination.chain_member(target, [disk.source, *disk.chain]) is not None:
                return _failed("DestInSourceChain", f"{source} would be copied onto {target}, "
                               "an image of the disk's own chain: choose another directory")
            if os.path.lexists(target):
                return _failed("DestExists", f"{target} (where {source} would go) already "
                               "exists; it is never overwritten")
        return None

    async def _space(self, spec: BlockCopySpec, disk: DiskState, size: DiskSize,
                     plan: Plan | None) -> Decision | None:
        if spec.network is not None:
            try:
                export = await self.images.export_size(spec.network.uri)
            except ImageError as exc:
                return _failed("DestUnreachable", f"cannot open the NBD export {spec.dest}: "
                               f"{exc}")
            refused = destination.space_refusal(spec.dest, required=0,
                                                capacity=size.capacity, reuse=True,
                                                network_size=export)
            return _failed(*refused) if refused is not None else None
        required = await asyncio.to_thread(self._required, spec, disk, size, plan)
        refused = await asyncio.to_thread(
            destination.space_refusal, spec.dest, required=required, capacity=size.capacity,
            reuse=Flag.REUSE_EXTERNAL in spec.flags)
        return _failed(*refused) if refused is not None else None

    @staticmethod
    def _required(spec: BlockCopySpec, disk: DiskState, size: DiskSize,
                  plan: Plan | None) -> int:
        """Bytes the destination will take: what the copied images hold (an upper bound:
        clusters overwritten in an upper image are counted twice), at most the disk's size,
        plus a little qcow2 metadata."""
        if plan is not None and plan.kind == PlanKind.BASE:
            copied = disk.chain[: disk.chain.index(spec.base)] if spec.base else ()
        elif plan is not None or (spec.base is None and Flag.SHALLOW not in spec.flags):
            copied = disk.chain  # a full copy, or every layer moved
        else:
            copied = ()  # shallow: the top image only
        data = size.allocation + sum(destination.allocated(p) for p in copied)
        return min(data, size.capacity) + size.capacity // 256 + (1 << 20)

    # -- the call ---------------------------------------------------------------------
    async def _start_copy(self, spec: BlockCopySpec, disk: DiskState, raw_spec: dict[str, Any],
                          decision: Decision, plan: Plan | None
                          ) -> tuple[Decision, dict[str, Any] | None]:
        flags = set(reconcile.copy_flags(spec, disk))
        fmt = spec.format
        if plan is not None:
            flags |= {Flag.SHALLOW, Flag.REUSE_EXTERNAL}  # onto the prepared top image
            fmt = "qcow2"
        elif spec.network is not None:
            flags.add(Flag.REUSE_EXTERNAL)  # an export exists; libvirt cannot create one
            fmt = "raw"
        if fmt is None and Flag.REUSE_EXTERNAL in flags:
            try:
                fmt = await asyncio.to_thread(destination.probe_format, spec.dest)
            except OSError as exc:
                hint = destination.CONTAINER_DEVICE_HINT \
                    if destination.is_block_device(spec.dest) else "check its permissions"
                return _failed("DestUnreadable", f"cannot read dest {spec.dest} to learn its "
                               f"format: {exc.strerror}; set spec.format ({hint}), nothing "
                               "was started"), None
        fmt = fmt or disk.source_format or "raw"
        block_device = spec.network is None and destination.is_block_device(spec.dest)
        target = disk.target or spec.disk
        request = CopyRequest(domain=spec.domain, target=target, dest=spec.dest, format=fmt,
                              flags=frozenset(flags), block_device=block_device,
                              network=spec.network, bandwidth=spec.bandwidth,
                              granularity=spec.granularity, buf_size=spec.buf_size)
        try:
            await self.hv.start_copy(request)
        except HypervisorUnavailable:
            raise
        except HypervisorError as exc:
            return _failed("CopyRefused", f"libvirt refused to start the copy: {exc}"), None
        created = list(self.recorder.status.get("createdFiles") or [])
        if plan is None and Flag.REUSE_EXTERNAL not in flags and not block_device:
            created.append(spec.dest)  # libvirt created it for us
        started = {"source": disk.source, "target": target, "format": fmt,
                   "flags": sorted(f.value for f in flags),
                   "startTime": status.timestamp(self.recorder.agent.clock()),
                   "bandwidth": spec.bandwidth, "startedSpec": started_fields(raw_spec)}
        if created:
            started["createdFiles"] = created
        if plan is not None and plan.kind == PlanKind.CHAIN:
            started["layers"] = [{"source": s, "dest": t, "state": "Pending"}
                                 for s, t, _ in plan.lower]
        message = reconcile.started_message(spec, source=disk.source, fmt=fmt,
                                            flags=frozenset(flags))
        if plan is not None:
            message += f" ({self._plan_message(plan)})"
        return dataclasses.replace(decision, message=message), started

    @staticmethod
    def _plan_message(plan: Plan) -> str:
        if plan.kind == PlanKind.BASE:
            return (f"the destination is prepared backed by {plan.base}, holding the data of "
                    f"the {plan.chain.index(str(plan.base)) - 1} image(s) above it")
        return (f"moving the chain of {len(plan.chain)} images next to {plan.targets[0]}; "
                "the lower images are copied and verified while the top is mirrored")
