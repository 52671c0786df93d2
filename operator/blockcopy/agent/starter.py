"""Starting a copy: the calls made between "the disk is idle, go" and libvirt's blockCopy (the
rules themselves are ``core.starting``'s, the checks ``agent.startchecks``').

The checks (``agent.startchecks``) asked before each step, the directories the spec asks
for, the plan of a layout QEMU's mirror cannot do alone (``core.plans``: recorded first as
the Preparing phase, then prepared, then re-checked), the request itself and zero detection
on its destination. ``start`` is called by the follower with the start lock held (one start
per disk at a time); ``prepare`` before it, outside that lock (a rebase takes a while); the
zero-detection verbs by the job actor, after a restart and after the pivot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from blockcopy.agent import layers
from blockcopy.agent.startchecks import StartChecks
from blockcopy.core import plans, starting, zeroes
from blockcopy.core.plans import Plan, Refusal
from blockcopy.core.policy import Policy
from blockcopy.core.reconcile import Decision
from blockcopy.core.starting import failed
from blockcopy.model.api import BlockCopySpec, Phase
from blockcopy.model.observation import DiskState
from blockcopy.model.ports import (
    CONTAINER_DEVICE_HINT,
    Capabilities,
    CopyRequest,
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
    def __init__(self, *, hv: Hypervisor, images: Images, files: Files, checks: StartChecks,
                 settings: StartSettings, status: Callable[[], Mapping[str, Any]],
                 now: Callable[[], str]):
        """``checks``: asked before anything is made; ``status``: the object's status as last
        recorded; ``now``: a timestamp."""
        self.hv, self.images, self.files, self.settings = hv, images, files, settings
        self.checks, self._status, self._now = checks, status, now

    # -- once the disk is seen idle -----------------------------------------------------
    async def start(self, spec: BlockCopySpec, disk: DiskState, raw_spec: Mapping[str, Any],
                    decision: Decision, current: Phase | None) -> Started:
        """Copying (or Preparing, or Failed with the reason) and the fields it records.
        ``decision`` is the phase logic's START_COPY."""
        refused = self.checks.by_policy(spec, disk) or self.checks.own_chain(spec, disk)
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
            await self.checks.in_use(spec, disk, [spec.dest]) or \
            await self.checks.plain_reuse(spec, disk)
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
                refused = self.checks.targets(made, disk) or \
                    await self.checks.in_use(spec, disk, list(made.targets[1:])) or \
                    await self.checks.space(spec, disk, size, made)
                if refused is not None:
                    return Started(refused)
                return Started(*starting.preparing(made))
            changed = plans.chain_changed(plan, disk)
            if changed is not None:
                return Started(failed("ChainChanged", f"{changed}; nothing was started (the "
                                      "prepared files stay, see status.createdFiles)"))
        else:
            refused = await self.checks.space(spec, disk, size, None)
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
            identity=await self.checks.dest_identity(spec))
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

