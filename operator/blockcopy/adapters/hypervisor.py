"""The libvirt driver: the only module that imports libvirt.

Implements ``ports.Hypervisor``: turns libvirt's domains, live XML and block-job calls into
the plain data of ``observation`` and a few verbs (start a copy, pivot, cancel, set the
speed). libvirt's calls block, so each verb runs in a worker thread; block-job events arrive
on the asyncio loop through libvirtaio and are handed to listeners.

"Cannot reach libvirtd" is decided by the connection's state, not by an error code: libvirtd
also reports its own OS errors while serving a request as VIR_ERR_SYSTEM_ERROR, and such a
refusal must end the copy with libvirt's message, not be retried forever as an outage.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid as uuidlib
from collections.abc import Callable
from typing import TypeVar

import libvirt
import libvirtaio

from blockcopy.adapters import domains, monitor
from blockcopy.core.domainxml import dest_disk_xml, parse_disk, tenant_of
from blockcopy.model.api import Flag
from blockcopy.model.observation import DiskState, ImageUser, JobEvent, JobProgress
from blockcopy.model.ports import (
    Capabilities,
    CopyRequest,
    DiskSize,
    HypervisorError,
    HypervisorUnavailable,
    JobListener,
)

log = logging.getLogger(__name__)

_COPY_FLAGS = {
    Flag.SHALLOW: libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW,
    Flag.REUSE_EXTERNAL: libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT,
    Flag.TRANSIENT_JOB: libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB,
    Flag.SYNCHRONOUS_WRITES: libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES,
}
_EVENT_STATUS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: JobEvent.COMPLETED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: JobEvent.FAILED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: JobEvent.CANCELED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: JobEvent.READY,
}
# Codes that can only mean the connection itself is unusable (never a refusal).
_CONNECTION_LOST = {libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN}

_event_impl_lock = threading.Lock()
_event_impl_loop: asyncio.AbstractEventLoop | None = None

T = TypeVar("T")


def use_asyncio_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Deliver libvirt events on ``loop``; must run before the first connection opens."""
    global _event_impl_loop
    with _event_impl_lock:
        if _event_impl_loop is None:
            libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
            _event_impl_loop = loop


def _version_tuple(number: int) -> tuple[int, int, int]:
    return number // 1000000, number // 1000 % 1000, number % 1000


def _looks_like_uuid(ref: str) -> bool:
    try:
        uuidlib.UUID(ref)
    except ValueError:
        return False
    return True


class LibvirtHypervisor:
    """One libvirt connection (reopened when it drops) plus block-job event fan-out."""

    def __init__(self, uri: str = "qemu:///system", *,
                 open_connection: Callable[[str], libvirt.virConnect] = libvirt.open):
        self.uri = uri
        self._open = open_connection  # libvirt.open; unit tests inject fault-injecting fakes
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()
        self._listeners: list[JobListener] = []
        self._callback_id: int | None = None
        self._capabilities: Capabilities | None = None  # of the current connection

    # -- connection and error classification ----------------------------------------
    def add_listener(self, listener: JobListener) -> None:
        self._listeners.append(listener)

    def _on_block_job(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, disk: str,
                      _job_type: int, status: int, _opaque: object) -> None:
        event = _EVENT_STATUS.get(status)
        if event is None:
            return
        domain_uuid = dom.UUIDString()
        for listener in list(self._listeners):
            try:
                listener(domain_uuid, disk, event)
            except Exception:  # a listener's bug must not break event delivery
                log.exception("block-job listener failed")

    def _connection(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                self._drop()
            try:
                conn = self._open(self.uri)
            except libvirt.libvirtError as exc:
                raise HypervisorUnavailable(
                    f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}",
                    exc.get_error_code()) from None
            if _event_impl_loop is not None:
                # Keepalive lets libvirt notice a dead daemon; events need the loop. A driver
                # without a daemon (test://, an embedded one) has no keepalive to set.
                try:
                    conn.setKeepAlive(5, 3)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                        raise
                self._callback_id = conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job, None)
            self._conn = conn
            self._capabilities = None  # learned again on the next ask
            return conn

    def _drop(self) -> None:
        """Forget a connection that went bad (libvirt frees it; no calls on it any more)."""
        self._conn = None
        self._callback_id = None

    def _connection_works(self) -> bool:
        """Is the current connection alive, and does a trivial call on it succeed?"""
        conn = self._conn
        if conn is None:
            return False
        try:
            return bool(conn.isAlive()) and conn.getLibVersion() > 0
        except libvirt.libvirtError:
            return False

    def _error(self, exc: libvirt.libvirtError) -> HypervisorError:
        """A refusal (HypervisorError, libvirt's message) or an outage (HypervisorUnavailable),
        decided by whether the connection still works after the failed call."""
        code = exc.get_error_code()
        message = exc.get_error_message() or str(exc)
        if code in _CONNECTION_LOST or not self._connection_works():
            with self._lock:
                self._drop()
            return HypervisorUnavailable(message, code)
        return HypervisorError(message, code)

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except libvirt.libvirtError as exc:
            raise self._error(exc) from None

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(self._call, fn)

    def _close_blocking(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._callback_id is not None:
                        self._conn.domainEventDeregisterAny(self._callback_id)
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._drop()

    async def close(self) -> None:
        # Closing removes libvirt's keepalive timer from the loop: kopf would otherwise wait
        # for it (about 5 s) before exiting.
        await asyncio.to_thread(self._close_blocking)

    def _learn_capabilities(self) -> Capabilities:
        with self._lock:
            known = self._capabilities
        if known is not None and self._conn is not None:
            return known
        conn = self._connection()
        caps = Capabilities(libvirt=_version_tuple(conn.getLibVersion()),
                            qemu=_version_tuple(conn.getVersion()))
        with self._lock:
            self._capabilities = caps
        log.info("hypervisor: %s", caps.describe())
        return caps

    async def capabilities(self) -> Capabilities:
        return await self._in_thread(self._learn_capabilities)

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

    def _quiesce(self, domain: str) -> str:
        dom = self._domain(domain)
        try:
            dom.agentSetResponseTimeout(5, 0)  # an agent that does not answer: 5 s at most
            dom.fsFreeze()
            return "frozen"
        except libvirt.libvirtError as exc:  # no guest agent, or it does not answer
            log.info("cannot freeze the file systems of %s (%s); suspending it", domain,
                     exc.get_error_message())
        dom.suspend()
        return "suspended"

    async def quiesce(self, domain: str) -> str:
        return await self._in_thread(lambda: self._quiesce(domain))

    async def unquiesce(self, domain: str, how: str) -> None:
        def undo() -> None:
            dom = self._domain(domain)
            if how == "frozen":
                dom.fsThaw()
            elif how == "suspended" and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
        await self._in_thread(undo)

    async def image_users(self) -> list[ImageUser]:
        return await self._in_thread(lambda: domains.image_users(self._connection()))

    async def set_bandwidth(self, domain: str, target: str, bandwidth: int) -> None:
        await self._in_thread(lambda: self._domain(domain).blockJobSetSpeed(
            target, bandwidth, libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES))
