"""Starting a copy: the facts gathered and the calls made between "the disk is idle, go" and
libvirt's blockCopy (the rules themselves are ``core.starting``'s).

The checks that must pass before anything is created (the destination on the file system,
the agent's policy, the destination not in the source's own chain, room for the copy), the
plan of a layout QEMU's mirror cannot do alone (``core.plans``: recorded first as the
Preparing phase, then prepared, then re-checked), and the request itself. Called by the
follower's act step, with the start lock held (one start per disk at a time).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from blockcopy.agent import layers
from blockcopy.agent.inuse import ImageUsers
from blockcopy.core import destinations, plans, starting, zeroes
from blockcopy.core.plans import Plan, PlanKind, Refusal
from blockcopy.core.policy import Policy
from blockcopy.core.reconcile import Decision
from blockcopy.core.starting import failed
from blockcopy.model.api import BlockCopySpec, Flag, Phase
from blockcopy.model.observation import DiskState, FileIdentity
from blockcopy.model.ports import (
    CONTAINER_DEVICE_HINT,
    Capabilities,
    CopyRequest,
    DiskSize,
    Files,
    Hypervisor,
    HypervisorError,
    HypervisorUnavailable,
    ImageError,
    Images,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StartSettings:
    allowed_paths: tuple[str, ...]
    allowed_network: tuple[str, ...] = ()
    policy: Policy = dataclasses.field(default_factory=Policy)


@dataclasses.dataclass(frozen=True)
class Started:
    """What a start (or its first half, the plan) gives the follower to record."""

    decision: Decision
    fields: dict[str, Any] | None = None  # None: nothing was started or planned


class Starter:
    def __init__(self, *, hv: Hypervisor, images: Images, files: Files,
                 settings: StartSettings, namespace: str, status: Callable[[], Mapping[str, Any]],
                 now: Callable[[], str]):
        """``status``: the object's status as last recorded; ``now``: a timestamp."""
        self.hv, self.images, self.files, self.settings = hv, images, files, settings
        self.namespace, self._status, self._now = namespace, status, now
        self.in_use = ImageUsers(hv=hv, images=images, files=files)

    # -- before libvirt is called at all ----------------------------------------------
    def refusal(self, spec: BlockCopySpec, current: Phase | None) -> Decision | None:
        """Checks that need no libvirt: the destination and the namespace's policy."""
        refused: Refusal | tuple[str, str] | None
        if spec.network is not None:
            refused = self.files.network_refusal(spec.network.endpoint,
                                                 self.settings.allowed_network)
        else:
            refused = self.files.refusal(spec, self.settings.allowed_paths)
            if refused is not None and refused[0] == "DestExists" and \
                    current == Phase.PREPARING and \
                    spec.dest in (self._status().get("createdFiles") or []):
                refused = None  # our own file, from a plan a restarted agent now finishes
        forbidden = self.settings.policy.precheck(namespace=self.namespace, dest=spec.dest,
                                                  resolved=self._resolved(spec))
        if forbidden is not None:
            return starting.forbidden(forbidden)
        return failed(*refused) if refused is not None else None

    def _resolved(self, spec: BlockCopySpec) -> str:
        return spec.dest if spec.network is not None else self.files.resolve(spec.dest)

    # -- once the disk is seen idle -----------------------------------------------------
    async def start(self, spec: BlockCopySpec, disk: DiskState, raw_spec: Mapping[str, Any],
                    decision: Decision, current: Phase | None) -> Started:
        """Copying (or Preparing, or Failed with the reason) and the fields it records.
        ``decision`` is the phase logic's START_COPY."""
        refused = self._refuse_by_policy(spec, disk) or self._refuse_own_chain(spec, disk)
        if refused is not None:
            return Started(refused)
        if spec.create_directories and disk.source and spec.network is None:
            dirs, why = await asyncio.to_thread(self.files.make_directories, spec.dest,
                                                disk.source, self.settings.allowed_paths)
            if dirs:
                log.info("%s: made %s (like the source's directories)", spec.dest,
                         ", ".join(dirs))
            if why is not None:
                return Started(failed(*why))
        caps = await self.hv.capabilities()
        refused = starting.unsupported(spec, caps) or \
            starting.encryption_refusal(spec, disk, planned=plans.needed(spec, disk)) or \
            await self._refuse_in_use(spec, disk, [spec.dest]) or \
            await self._refuse_plain_reuse(spec, disk)
        if refused is not None:
            return Started(refused)
        assert disk.target is not None
        size = await self.hv.disk_size(spec.domain, disk.target)
        plan: Plan | None = None
        if plans.needed(spec, disk):
            if current == Phase.PREPARING:
                plan = plans.from_status(self._status().get("plan"), disk=disk, spec=spec,
                                         capacity=size.capacity)
            if plan is None:  # not planned yet: check, then record the plan (no file yet)
                made = plans.make(spec, disk, size.capacity)
                if isinstance(made, Refusal):
                    return Started(failed(made.reason, made.message))
                refused = self._refuse_targets(made, disk) or \
                    await self._refuse_in_use(spec, disk, list(made.targets[1:])) or \
                    await self._space(spec, disk, size, made)
                if refused is not None:
                    return Started(refused)
                return Started(*starting.preparing(made))
            changed = plans.chain_changed(plan, disk)
            if changed is not None:
                return Started(failed("ChainChanged", f"{changed}; nothing was started (the "
                                      "prepared files stay, see status.createdFiles)"))
        else:
            refused = await self._space(spec, disk, size, None)
            if refused is not None:
                return Started(refused)
        return await self._start_copy(spec, disk, raw_spec, decision, plan, caps)

    async def prepare(self, spec: BlockCopySpec, disk: DiskState) -> Decision | None:
        """The Preparing phase: create the plan's files (again, if a restarted agent left
        them half done). None when done, else the Failed decision."""
        assert disk.target is not None
        size = await self.hv.disk_size(spec.domain, disk.target)
        plan = plans.from_status(self._status().get("plan"), disk=disk, spec=spec,
                                 capacity=size.capacity)
        if plan is None:
            return None
        changed = plans.chain_changed(plan, disk)
        if changed is not None:
            return failed("ChainChanged", f"{changed}; nothing was started")
        try:
            await layers.prepare(plan, self.images)
        except ImageError as exc:
            return failed("PreparationFailed", f"preparing the destination failed: {exc}; "
                          "the VM stays on its source, the files made so far are listed in "
                          "status.createdFiles")
        return None

    # -- the checks -------------------------------------------------------------------
    def _refuse_by_policy(self, spec: BlockCopySpec, disk: DiskState) -> Decision | None:
        forbidden = self.settings.policy.check(
            namespace=self.namespace, domain=spec.domain, tenant=disk.domain_tenant,
            dest=spec.dest, resolved=self._resolved(spec))
        return starting.forbidden(forbidden) if forbidden is not None else None

    async def _refuse_plain_reuse(self, spec: BlockCopySpec, disk: DiskState
                                  ) -> Decision | None:
        """A pre-created destination of an encrypted disk must be encrypted too (QEMU would
        refuse a plain one anyway, with a less clear message)."""
        if not disk.encrypted or Flag.REUSE_EXTERNAL not in spec.flags or \
                spec.network is not None:
            return None
        try:
            info = await self.images.info(spec.dest)
        except ImageError:
            return None  # cannot read it (a device from a pod): QEMU opens only LUKS ones
        return None if info.encrypted else starting.not_encrypted(spec)

    async def _refuse_in_use(self, spec: BlockCopySpec, disk: DiskState, paths: list[str]
                             ) -> Decision | None:
        """A destination (or a file the agent would make) that another disk uses."""
        if spec.network is not None or not paths:
            return None
        holders = await self.in_use.holders(paths, exclude=(disk.domain_uuid, disk.target))
        for path in paths:
            user = holders.get(path)
            if user is not None:
                visible = self.settings.policy.may_see(namespace=self.namespace,
                                                       domain=user.domain, tenant=user.tenant)
                what = "dest" if path == spec.dest else "the chain move's target"
                return destinations.in_use(path, user, visible=visible, what=what)
        return None

    def _refuse_own_chain(self, spec: BlockCopySpec, disk: DiskState) -> Decision | None:
        if spec.network is not None:
            return None
        return starting.own_chain(spec, disk,
                                  self.files.chain_member(spec.dest, [disk.source, *disk.chain]))

    def _refuse_targets(self, plan: Plan, disk: DiskState) -> Decision | None:
        """A chain move's lower targets: new files, not images of the chain itself."""
        if plan.kind != PlanKind.CHAIN:
            return None
        for source, target in zip(plan.chain[1:], plan.targets[1:], strict=True):
            if self.files.chain_member(target, [disk.source, *disk.chain]) is not None:
                return failed("DestInSourceChain", f"{source} would be copied onto {target}, "
                              "an image of the disk's own chain: choose another directory")
            if self.files.exists(target):
                return failed("DestExists", f"{target} (where {source} would go) already "
                              "exists; it is never overwritten")
        return None

    async def _space(self, spec: BlockCopySpec, disk: DiskState, size: DiskSize,
                     plan: Plan | None) -> Decision | None:
        if spec.network is not None:
            try:
                export = await self.images.export_size(spec.network.uri)
            except ImageError as exc:
                return failed("DestUnreachable", f"cannot open the NBD export {spec.dest}: "
                              f"{exc}")
            refused = self.files.space_refusal(spec.dest, required=0, capacity=size.capacity,
                                               reuse=True, network_size=export)
            return failed(*refused) if refused is not None else None
        copied = starting.copied_images(spec, disk, plan)
        allocations = await asyncio.to_thread(
            lambda: {p: self.files.allocated(p) for p in copied})
        fmt = await self._format(spec, disk, plan) if disk.encrypted else None
        required = starting.required_bytes(size, allocations, encrypted=disk.encrypted,
                                           fmt=fmt)
        refused = await asyncio.to_thread(
            lambda: self.files.space_refusal(
                spec.dest, required=required, capacity=size.capacity,
                reuse=Flag.REUSE_EXTERNAL in spec.flags,
                basis=starting.space_basis(encrypted=disk.encrypted, fmt=fmt)))
        return failed(*refused) if refused is not None else None

    async def _format(self, spec: BlockCopySpec, disk: DiskState, plan: Plan | None
                      ) -> str | None:
        """The destination's format as the copy will have it (a pre-created one's read
        from its header; None when it cannot be read)."""
        fmt = starting.copy_flags_and_format(spec, disk, plan)[1]
        if fmt is not None:
            return fmt
        try:
            return await asyncio.to_thread(self.files.probe_format, spec.dest)
        except OSError:
            return None

    # -- the call ---------------------------------------------------------------------
    async def _start_copy(self, spec: BlockCopySpec, disk: DiskState,
                          raw_spec: Mapping[str, Any], decision: Decision, plan: Plan | None,
                          caps: Capabilities) -> Started:
        flags, fmt = starting.copy_flags_and_format(spec, disk, plan)
        if fmt is None:  # a pre-created destination without spec.format: read its header
            try:
                fmt = await asyncio.to_thread(self.files.probe_format, spec.dest)
            except OSError as exc:
                hint = CONTAINER_DEVICE_HINT if self.files.is_block_device(spec.dest) else \
                    "check its permissions"
                return Started(failed("DestUnreadable", f"cannot read dest {spec.dest} to "
                                      f"learn its format: {exc.strerror}; set spec.format "
                                      f"({hint}), nothing was started"))
        block_device = spec.network is None and self.files.is_block_device(spec.dest)
        target = disk.target or spec.disk
        zero_off = starting.zero_detection_off(spec, flags, plan, caps,
                                               encrypted=disk.encrypted)
        request = CopyRequest(domain=spec.domain, target=target, dest=spec.dest, format=fmt,
                              flags=flags, block_device=block_device, network=spec.network,
                              bandwidth=spec.bandwidth, granularity=spec.granularity,
                              buf_size=spec.buf_size, encryption=disk.encryption)
        if zero_off is None:  # throttled until the destination detects zeros
            request = dataclasses.replace(request, bandwidth=zeroes.THROTTLE,
                                          buf_size=spec.buf_size or zeroes.ZERO_BUFFER)
        for attempt in range(1, starting.START_ATTEMPTS + 1):
            try:
                await self.hv.start_copy(request)
                break
            except HypervisorUnavailable:
                raise
            except HypervisorError as exc:
                if attempt < starting.START_ATTEMPTS and starting.passing_refusal(str(exc)):
                    log.info("%s/%s: libvirt refused the copy (%s), attempt %d of %d; again",
                             spec.domain, target, exc, attempt, starting.START_ATTEMPTS)
                    await asyncio.sleep(starting.START_RETRY_DELAY)
                    continue
                return Started(failed("CopyRefused",
                                      f"libvirt refused to start the copy: {exc}"))
        zero_detection = zero_off or await self.detect_zeroes(spec.domain, target,
                                                              spec.bandwidth)
        decision, fields = starting.started(
            spec, disk, raw_spec=raw_spec, decision=decision, plan=plan, fmt=fmt, flags=flags,
            target=target, block_device=block_device,
            created_before=list(self._status().get("createdFiles") or []), now=self._now(),
            identity=await self.dest_identity(spec))
        return Started(decision, {**fields, "zeroDetection": zero_detection})

    async def detect_zeroes(self, domain: str, target: str, bandwidth: int) -> str:
        """The throttled copy's destination reopened with zero detection, then the speed the
        spec asks (whatever happened: a copy without detection is still a right copy).
        Returns status.zeroDetection."""
        try:
            await self.hv.set_zero_detection(domain, target, on=True, mirror=True)
            outcome = "unmap"
        except HypervisorUnavailable:
            raise
        except HypervisorError as exc:
            outcome = f"off ({exc})"
        await self.hv.set_bandwidth(domain, target, bandwidth)
        return outcome

    async def zero_detection_back(self, domain: str, target: str) -> None:
        """The pivoted disk behaves as its XML says again (guest discards and zero writes as
        libvirt configured them); best effort: the data is right either way."""
        if self._status().get("zeroDetection") != "unmap":
            return
        try:
            await self.hv.set_zero_detection(domain, target, on=False, mirror=False)
        except HypervisorError as exc:
            log.warning("%s: zero detection stays on the pivoted disk %s: %s", domain, target,
                        exc)

    async def dest_identity(self, spec: BlockCopySpec) -> FileIdentity | None:
        """What the destination is now (None for a network destination or when it cannot be
        looked at: then the pivot checks only that something is there)."""
        if spec.network is not None:
            return None
        try:
            return await asyncio.to_thread(self.files.identity, spec.dest)
        except OSError:
            return None

    async def dest_check(self, spec: BlockCopySpec, disk: DiskState,
                         recorded: Mapping[str, Any] | None) -> destinations.DestCheck | None:
        """The destination before a pivot: still the file the copy went to, and no other
        disk's image (None for a network destination)."""
        if spec.network is not None:
            return None
        before = FileIdentity.from_status(recorded)
        try:
            now = await asyncio.to_thread(self.files.identity, spec.dest)
        except OSError as exc:
            return destinations.DestCheck(before, None, error=exc.strerror or str(exc))
        user = await self.in_use.holder(spec.dest, exclude=(disk.domain_uuid, disk.target)) \
            if now is not None else None
        visible = user is None or self.settings.policy.may_see(
            namespace=self.namespace, domain=user.domain, tenant=user.tenant)
        return destinations.DestCheck(before, now, user=user, visible=visible)
