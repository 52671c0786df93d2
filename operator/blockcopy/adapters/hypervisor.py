"""The libvirt driver: the agent's verbs on domains and block jobs, over the connection of
``adapters.connection`` (with ``domains`` and ``monitor`` as its helpers).

Implements ``ports.Hypervisor``: turns libvirt's domains, live XML and block-job calls into
the plain data of ``observation`` and a few verbs (start a copy, pivot, cancel, set the
speed). libvirt's calls block, so each verb runs in a worker thread; block-job events arrive
on the asyncio loop through libvirtaio and are handed to listeners by the connection, which
also decides whether a failed call was a refusal or an outage.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from collections.abc import Callable

import libvirt

from blockcopy.adapters import domains, monitor
from blockcopy.adapters.connection import LibvirtConnection, T, use_asyncio_loop
from blockcopy.core.domainxml import dest_disk_xml, parse_disk, tenant_of
from blockcopy.model.api import Flag
from blockcopy.model.inventory import InventoryDomain
from blockcopy.model.observation import DiskState, ImageUser, JobProgress
from blockcopy.model.ports import (
    Capabilities,
    CopyRequest,
    DiskSize,
    DomainListener,
    HypervisorError,
    JobListener,
)

__all__ = ["LibvirtHypervisor", "use_asyncio_loop"]  # the runtime sets up libvirt here

log = logging.getLogger(__name__)

_COPY_FLAGS = {
    Flag.SHALLOW: libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW,
    Flag.REUSE_EXTERNAL: libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT,
    Flag.TRANSIENT_JOB: libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB,
    Flag.SYNCHRONOUS_WRITES: libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES,
}


def _looks_like_uuid(ref: str) -> bool:
    try:
        uuidlib.UUID(ref)
    except ValueError:
        return False
    return True


class LibvirtHypervisor:
    """The agent's hypervisor (``ports.Hypervisor``) over one libvirt connection."""

    def __init__(self, uri: str = "qemu:///system", *,
                 open_connection: Callable[[str], libvirt.virConnect] = libvirt.open):
        self.uri = uri
        self.connection = LibvirtConnection(uri, open_connection=open_connection)
        self._sizes: domains.Sizes = {}  # the inventory's disk sizes of its last look

    # -- the connection's side ---------------------------------------------------------
    def add_listener(self, listener: JobListener) -> None:
        self.connection.add_listener(listener)

    def add_domain_listener(self, listener: DomainListener) -> None:
        self.connection.add_domain_listener(listener)

    def _connection(self) -> libvirt.virConnect:
        return self.connection.get()

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        return await self.connection.in_thread(fn)

    async def close(self) -> None:
        await self.connection.close()

    async def capabilities(self) -> Capabilities:
        return await self._in_thread(self.connection.capabilities)

    async def set_zero_detection(self, domain: str, target: str, *, on: bool,
                                 mirror: bool) -> None:
        await self._in_thread(lambda: monitor.set_zero_detection(
            self._domain(domain), target, on=on, mirror=mirror))

    async def set_copy_mode(self, domain: str, target: str, mode: str) -> None:
        await self._in_thread(lambda: monitor.set_copy_mode(self._domain(domain), target, mode))

    async def version(self) -> str:
        v = await self._in_thread(lambda: self._connection().getLibVersion())
        return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

    # -- lookups and observation ------------------------------------------------------
    def _lookup(self, domain_ref: str) -> libvirt.virDomain | None:
        if "\x00" in domain_ref:
            # No libvirt name or UUID holds one, and the binding raises ValueError on it (the
            # claimer looks up spec.domain before any parsing): no such domain.
            return None
        conn = self._connection()
        try:
            if _looks_like_uuid(domain_ref):
                return conn.lookupByUUIDString(domain_ref)
            return conn.lookupByName(domain_ref)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _domain(self, domain_ref: str) -> libvirt.virDomain:
        dom = self._lookup(domain_ref)
        if dom is None:
            raise HypervisorError(f"domain {domain_ref!r} not found", libvirt.VIR_ERR_NO_DOMAIN)
        return dom

    async def has_running_domain(self, domain: str) -> bool:
        def check() -> bool:
            dom = self._lookup(domain)
            return dom is not None and bool(dom.isActive())
        return await self._in_thread(check)

    def _observe(self, domain_ref: str, disk_ref: str) -> DiskState:
        dom = self._lookup(domain_ref)
        if dom is None:
            return DiskState(domain_found=False)
        try:
            running = bool(dom.isActive())
            uuid, name, persistent = dom.UUIDString(), dom.name(), bool(dom.isPersistent())
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return DiskState(domain_found=False)  # gone between the calls
            raise
        try:
            xml = dom.XMLDesc(0)
            disk, tenant = parse_disk(xml, disk_ref), tenant_of(xml)
            job = None
            if running and disk is not None and disk.target:
                info = dom.blockJobInfo(disk.target,
                                        libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES)
                if info:
                    job = JobProgress(cur=int(info.get("cur", 0)), end=int(info.get("end", 0)),
                                      bandwidth=int(info.get("bandwidth", 0)))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return DiskState(domain_found=False)  # gone between the calls
            if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                # The domain stopped between the calls above.
                return DiskState.of_domain(uuid=uuid, name=name, running=False,
                                           persistent=persistent, disk=None)
            raise
        return DiskState.of_domain(uuid=uuid, name=name, running=running,
                                   persistent=persistent, disk=disk, job=job, tenant=tenant)

    async def observe(self, domain: str, disk: str) -> DiskState:
        return await self._in_thread(lambda: self._observe(domain, disk))

    # -- actions --------------------------------------------------------------------
    def _start_copy(self, request: CopyRequest) -> None:
        dom = self._domain(request.domain)
        params = {}
        if request.bandwidth:
            params[libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH] = request.bandwidth
        if request.granularity:
            params[libvirt.VIR_DOMAIN_BLOCK_COPY_GRANULARITY] = request.granularity
        if request.buf_size:
            params[libvirt.VIR_DOMAIN_BLOCK_COPY_BUF_SIZE] = request.buf_size
        bits = 0
        for flag in request.flags:
            bits |= _COPY_FLAGS[flag]
        xml = dest_disk_xml(request.dest, request.format, block_device=request.block_device,
                            network=request.network, encryption=request.encryption)
        dom.blockCopy(request.target, xml, params or None, bits)

    async def start_copy(self, request: CopyRequest) -> None:
        await self._in_thread(lambda: self._start_copy(request))

    async def pivot(self, domain: str, target: str) -> None:
        await self._in_thread(lambda: self._domain(domain).blockJobAbort(
            target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT))

    async def cancel(self, domain: str, target: str) -> None:
        await self._in_thread(lambda: self._domain(domain).blockJobAbort(target, 0))

    async def disk_size(self, domain: str, target: str) -> DiskSize:
        capacity, allocation, _physical = await self._in_thread(
            lambda: self._domain(domain).blockInfo(target))
        return DiskSize(capacity=int(capacity), allocation=int(allocation))

    async def quiesce(self, domain: str) -> str:
        return await self._in_thread(lambda: domains.quiesce(self._domain(domain)))

    async def unquiesce(self, domain: str, how: str) -> None:
        await self._in_thread(lambda: domains.unquiesce(self._domain(domain), how))

    async def pause(self, domain: str, owner: str) -> bool:
        return await self._in_thread(lambda: domains.pause(self._domain(domain), owner))

    async def resume(self, domain: str, owner: str) -> None:
        await self._in_thread(lambda: domains.resume(self._domain(domain), owner))

    async def resume_left_paused(self, owner: str) -> list[str]:
        return await self._in_thread(
            lambda: domains.resume_left_paused(self._connection(), owner))

    async def job_progress(self, domain: str, target: str) -> JobProgress | None:
        def look() -> JobProgress | None:
            info = self._domain(domain).blockJobInfo(
                target, libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES)
            return JobProgress(cur=int(info.get("cur", 0)), end=int(info.get("end", 0)),
                               bandwidth=int(info.get("bandwidth", 0))) if info else None
        return await self._in_thread(look)

    async def flush_images(self, domain: str) -> None:
        await self._in_thread(lambda: monitor.flush_images(self._domain(domain)))

    async def inventory(self, *, fresh_sizes: bool = False) -> list[InventoryDomain]:
        def look() -> list[InventoryDomain]:
            known = {} if fresh_sizes else self._sizes
            found, self._sizes = domains.inventory(self._connection(), known)
            return found
        return await self._in_thread(look)

    async def image_users(self) -> list[ImageUser]:
        return await self._in_thread(lambda: domains.image_users(self._connection()))

    async def set_bandwidth(self, domain: str, target: str, bandwidth: int) -> None:
        await self._in_thread(lambda: self._domain(domain).blockJobSetSpeed(
            target, bandwidth, libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES))
