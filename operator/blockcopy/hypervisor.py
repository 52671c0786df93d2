"""The libvirt driver: the only module that imports libvirt.

Turns libvirt's domains, live XML and block-job calls into the plain data of
``observation`` and a few verbs (start a copy, pivot, abort, set the speed). All calls are
blocking; the handlers run them in threads. Block-job events arrive on the asyncio loop
through libvirtaio and are handed to listeners.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from xml.sax.saxutils import quoteattr

import libvirt
import libvirtaio

from blockcopy.api import Flag
from blockcopy.destination import is_block_device
from blockcopy.observation import DiskState, JobEvent, JobProgress, Mirror, MirrorReady

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
# Errors that mean "cannot talk to libvirtd", as opposed to "libvirtd said no".
_CONNECTION_ERRORS = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_AUTH_FAILED,
}

JobListener = Callable[[str, str, JobEvent], None]  # (domain uuid, disk target, event)

_event_impl_lock = threading.Lock()
_event_impl_loop: asyncio.AbstractEventLoop | None = None


class HypervisorError(Exception):
    """libvirt refused or failed an operation; ``str()`` is libvirt's message."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class HypervisorUnavailable(HypervisorError):
    """libvirtd cannot be reached; worth retrying later."""


def _error(exc: libvirt.libvirtError) -> HypervisorError:
    code = exc.get_error_code()
    message = exc.get_error_message() or str(exc)
    cls = HypervisorUnavailable if code in _CONNECTION_ERRORS else HypervisorError
    return cls(message, code)


def use_asyncio_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Deliver libvirt events on ``loop``; must run before the first connection opens."""
    global _event_impl_loop
    with _event_impl_lock:
        if _event_impl_loop is None:
            libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
            _event_impl_loop = loop


def _looks_like_uuid(ref: str) -> bool:
    try:
        uuidlib.UUID(ref)
    except ValueError:
        return False
    return True


def dest_disk_xml(dest: str, fmt: str) -> str:
    """The ``<disk>`` element virDomainBlockCopy takes for a file or block device."""
    if is_block_device(dest):
        return (f"<disk type='block'><source dev={quoteattr(dest)}/>"
                f"<driver type={quoteattr(fmt)}/></disk>")
    return (f"<disk type='file'><source file={quoteattr(dest)}/>"
            f"<driver type={quoteattr(fmt)}/></disk>")


def _source_path(elem: ET.Element | None) -> str | None:
    if elem is None:
        return None
    return elem.get("file") or elem.get("dev") or elem.get("name")


def parse_disk(domain_xml: str, disk_ref: str) -> dict | None:
    """Find a disk by target (vda) or by source path in a domain's XML."""
    root = ET.fromstring(domain_xml)
    for disk in root.iterfind("./devices/disk"):
        target = disk.find("target")
        target_dev = target.get("dev") if target is not None else None
        source = _source_path(disk.find("source"))
        if disk_ref not in (target_dev, source) and not (
            source and os.path.isabs(disk_ref) and os.path.normpath(disk_ref) == source
        ):
            continue
        driver = disk.find("driver")
        backing = disk.find("backingStore")
        mirror_elem = disk.find("mirror")
        mirror = None
        if mirror_elem is not None:
            dest = _source_path(mirror_elem.find("source")) or mirror_elem.get("file")
            mirror = Mirror(
                dest=dest or "",
                ready=MirrorReady(mirror_elem.get("ready", "")),
                job=mirror_elem.get("job", "copy"),
            )
        return {
            "target": target_dev,
            "source": source,
            "source_format": driver.get("type") if driver is not None else None,
            "backing": _source_path(backing.find("source")) if backing is not None else None,
            "mirror": mirror,
        }
    return None


class Hypervisor:
    """One libvirt connection (reopened when it drops) plus block-job event fan-out."""

    def __init__(self, uri: str = "qemu:///system"):
        self.uri = uri
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()
        self._listeners: list[JobListener] = []
        self._callback_id: int | None = None

    # -- connection ----------------------------------------------------------------
    def add_listener(self, listener: JobListener) -> None:
        self._listeners.append(listener)

    def _on_block_job(self, conn, dom, disk, job_type, status, opaque) -> None:  # noqa: ARG002
        event = _EVENT_STATUS.get(status)
        if event is None:
            return
        domain_uuid = dom.UUIDString()
        for listener in list(self._listeners):
            try:
                listener(domain_uuid, disk, event)
            except Exception:  # a listener's bug must not break event delivery
                log.exception("block-job listener failed")

    def connection(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                self._conn = None
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise HypervisorUnavailable(
                    f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}",
                    exc.get_error_code()) from None
            if _event_impl_loop is not None:
                # Keepalive lets libvirt notice a dead daemon; events need the loop.
                conn.setKeepAlive(5, 3)
                self._callback_id = conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job, None)
            self._conn = conn
            return conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._callback_id is not None:
                        self._conn.domainEventDeregisterAny(self._callback_id)
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None
                self._callback_id = None

    def version(self) -> str:
        try:
            v = self.connection().getLibVersion()
        except libvirt.libvirtError as exc:
            raise _error(exc) from None
        return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

    def _lookup(self, domain_ref: str) -> libvirt.virDomain | None:
        conn = self.connection()
        try:
            if _looks_like_uuid(domain_ref):
                return conn.lookupByUUIDString(domain_ref)
            return conn.lookupByName(domain_ref)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise _error(exc) from None

    def _domain(self, domain_ref: str) -> libvirt.virDomain:
        dom = self._lookup(domain_ref)
        if dom is None:
            raise HypervisorError(f"domain {domain_ref!r} not found", libvirt.VIR_ERR_NO_DOMAIN)
        return dom

    # -- observation ---------------------------------------------------------------
    def has_running_domain(self, domain_ref: str) -> bool:
        dom = self._lookup(domain_ref)
        try:
            return dom is not None and bool(dom.isActive())
        except libvirt.libvirtError as exc:
            raise _error(exc) from None

    def observe(self, domain_ref: str, disk_ref: str) -> DiskState:
        dom = self._lookup(domain_ref)
        if dom is None:
            return DiskState(domain_found=False)
        try:
            running = bool(dom.isActive())
            common = dict(domain_found=True, domain_uuid=dom.UUIDString(), domain_name=dom.name(),
                          domain_running=running, domain_persistent=bool(dom.isPersistent()))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return DiskState(domain_found=False)
            raise _error(exc) from None
        try:
            disk = parse_disk(dom.XMLDesc(0), disk_ref)
            if disk is None:
                return DiskState(**common)
            job = None
            if running:
                info = dom.blockJobInfo(disk["target"],
                                        libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES)
                if info:
                    job = JobProgress(cur=int(info.get("cur", 0)), end=int(info.get("end", 0)),
                                      bandwidth=int(info.get("bandwidth", 0)))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return DiskState(domain_found=False)
            if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                # The domain stopped between the calls above.
                return DiskState(**{**common, "domain_running": False})
            raise _error(exc) from None
        return DiskState(**common, disk_found=True, job=job, **disk)

    # -- actions -------------------------------------------------------------------
    def start_copy(self, domain_ref: str, target: str, dest: str, *, fmt: str,
                   flags: Iterable[Flag], bandwidth: int = 0, granularity: int = 0,
                   buf_size: int = 0) -> None:
        dom = self._domain(domain_ref)
        params = {}
        if bandwidth:
            params[libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH] = bandwidth
        if granularity:
            params[libvirt.VIR_DOMAIN_BLOCK_COPY_GRANULARITY] = granularity
        if buf_size:
            params[libvirt.VIR_DOMAIN_BLOCK_COPY_BUF_SIZE] = buf_size
        bits = 0
        for flag in flags:
            bits |= _COPY_FLAGS[flag]
        try:
            dom.blockCopy(target, dest_disk_xml(dest, fmt), params or None, bits)
        except libvirt.libvirtError as exc:
            raise _error(exc) from None

    def pivot(self, domain_ref: str, target: str) -> None:
        self._abort(domain_ref, target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)

    def cancel(self, domain_ref: str, target: str) -> None:
        """End the job and keep the VM on its source (after READY: a point-in-time copy)."""
        self._abort(domain_ref, target, 0)

    def _abort(self, domain_ref: str, target: str, flags: int) -> None:
        dom = self._domain(domain_ref)
        try:
            dom.blockJobAbort(target, flags)
        except libvirt.libvirtError as exc:
            raise _error(exc) from None

    def set_bandwidth(self, domain_ref: str, target: str, bandwidth: int) -> None:
        dom = self._domain(domain_ref)
        try:
            dom.blockJobSetSpeed(target, bandwidth,
                                 libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES)
        except libvirt.libvirtError as exc:
            raise _error(exc) from None
