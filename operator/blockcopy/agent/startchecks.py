"""The checks before a copy starts, and before it is switched to: whether the destination
may be written at all (the file system, the agent's allowed paths and network, the tenant
policy), whether it is another disk's image or an image of the disk's own chain, whether there
is room for the copy, and whether the destination is still the file the copy went to. The
refusals return the Failed decision that says why not, or None; ``dest_identity`` and
``dest_check`` return what they saw. Apart from the starter, which does the start
(directories, plans, libvirt's call) and asks these before each step, so that what is refused
and what is done can be read apart; the follower asks the first look's and the pivot's
checks itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from blockcopy.agent.inuse import ImageUsers
from blockcopy.core import destinations, starting
from blockcopy.core.plans import Plan, PlanKind, Refusal
from blockcopy.core.policy import Policy
from blockcopy.core.reconcile import Decision
from blockcopy.core.starting import failed
from blockcopy.model.api import BlockCopySpec, Flag, Phase
from blockcopy.model.observation import DiskState, FileIdentity
from blockcopy.model.ports import DiskSize, Files, Hypervisor, ImageError, Images


class StartChecks:
    def __init__(self, *, hv: Hypervisor, images: Images, files: Files,
                 allowed_paths: tuple[str, ...], allowed_network: tuple[str, ...],
                 policy: Policy, namespace: str, status: Callable[[], Mapping[str, Any]]):
        """``status``: the object's status as last recorded."""
        self.images, self.files, self.policy, self.namespace = images, files, policy, namespace
        self.allowed_paths, self.allowed_network = allowed_paths, allowed_network
        self._status = status
        self.users = ImageUsers(hv=hv, images=images, files=files)

    # -- before libvirt is called at all ----------------------------------------------
    def refusal(self, spec: BlockCopySpec, current: Phase | None) -> Decision | None:
        """Checks that need no libvirt: the destination and the namespace's policy."""
        refused: Refusal | tuple[str, str] | None
        if spec.network is not None:
            refused = self.files.network_refusal(spec.network.endpoint,
                                                 self.allowed_network)
        else:
            refused = self.files.refusal(spec, self.allowed_paths)
            if refused is not None and refused[0] == "DestExists" and \
                    current == Phase.PREPARING and \
                    spec.dest in (self._status().get("createdFiles") or []):
                refused = None  # our own file, from a plan a restarted agent now finishes
        forbidden = self.policy.precheck(namespace=self.namespace, dest=spec.dest,
                                         resolved=self._resolved(spec))
        if forbidden is not None:
            return starting.forbidden(forbidden)
        return failed(*refused) if refused is not None else None

    def _resolved(self, spec: BlockCopySpec) -> str:
        return spec.dest if spec.network is not None else self.files.resolve(spec.dest)

    # -- once the disk is seen (libvirt asked) --------------------------------------
    def by_policy(self, spec: BlockCopySpec, disk: DiskState) -> Decision | None:
        forbidden = self.policy.check(
            namespace=self.namespace, domain=spec.domain, tenant=disk.domain_tenant,
            dest=spec.dest, resolved=self._resolved(spec))
        return starting.forbidden(forbidden) if forbidden is not None else None

    async def plain_reuse(self, spec: BlockCopySpec, disk: DiskState) -> Decision | None:
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

    async def in_use(self, spec: BlockCopySpec, disk: DiskState, paths: list[str]
                     ) -> Decision | None:
        """A destination (or a file the agent would make) that another disk uses."""
        if spec.network is not None or not paths:
            return None
        holders = await self.users.holders(paths, exclude=(disk.domain_uuid, disk.target))
        for path in paths:
            user = holders.get(path)
            if user is not None:
                visible = self.policy.may_see(namespace=self.namespace,
                                              domain=user.domain, tenant=user.tenant)
                what = "dest" if path == spec.dest else "the chain move's target"
                return destinations.in_use(path, user, visible=visible, what=what)
        return None

    def own_chain(self, spec: BlockCopySpec, disk: DiskState) -> Decision | None:
        if spec.network is not None:
            return None
        return starting.own_chain(spec, disk,
                                  self.files.chain_member(spec.dest, [disk.source, *disk.chain]))

    def targets(self, plan: Plan, disk: DiskState) -> Decision | None:
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

    async def space(self, spec: BlockCopySpec, disk: DiskState, size: DiskSize,
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
        user = await self.users.holder(spec.dest, exclude=(disk.domain_uuid, disk.target)) \
            if now is not None else None
        visible = user is None or self.policy.may_see(
            namespace=self.namespace, domain=user.domain, tenant=user.tenant)
        return destinations.DestCheck(before, now, user=user, visible=visible)
