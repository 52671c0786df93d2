"""One libvirt connection: opened on first use and again after it drops, and what depends
on it: libvirt's event callbacks (registered per connection, fanned out to the agent's
listeners), the capabilities of the daemon it reaches, and whether a failed call was a
refusal or an outage.

"Cannot reach libvirtd" is decided by the connection's state, not by an error code: libvirtd
also reports its own OS errors while serving a request as VIR_ERR_SYSTEM_ERROR, and such a
refusal must end the copy with libvirt's message, not be retried forever as an outage. Apart
from the driver (``adapters.hypervisor``), which turns domains and block jobs into the
agent's data and verbs over this connection.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import libvirt
import libvirtaio

from blockcopy.model.observation import JobEvent
from blockcopy.model.ports import (
    Capabilities,
    DomainListener,
    HypervisorError,
    HypervisorUnavailable,
    JobListener,
)

log = logging.getLogger(__name__)

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


def _libvirt_error(_context: object, error: tuple[object, ...]) -> None:
    """libvirt's C library prints every failed call to stderr unless a handler is set: that
    broke the agent's JSON logs (a domain of another VM gone while the agent listed them).
    The error still reaches the caller as libvirtError; here it is only a debug line."""
    log.debug("libvirt: %s", error[2] if len(error) > 2 else error)


def use_asyncio_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Deliver libvirt events on ``loop``; must run before the first connection opens."""
    global _event_impl_loop
    with _event_impl_lock:
        if _event_impl_loop is None:
            libvirt.registerErrorHandler(_libvirt_error, None)
            libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
            _event_impl_loop = loop


def _version_tuple(number: int) -> tuple[int, int, int]:
    return number // 1000000, number // 1000 % 1000, number % 1000


class LibvirtConnection:
    """The connection (reopened when it drops) plus block-job and domain event fan-out."""

    def __init__(self, uri: str, *, open_connection: Callable[[str], libvirt.virConnect]):
        self.uri = uri
        self._open = open_connection  # libvirt.open; unit tests inject fault-injecting fakes
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()
        self._listeners: list[JobListener] = []
        self._domain_listeners: list[DomainListener] = []
        self._callback_ids: list[int] = []
        self._capabilities: Capabilities | None = None  # of the current connection

    def add_listener(self, listener: JobListener) -> None:
        self._listeners.append(listener)

    def add_domain_listener(self, listener: DomainListener) -> None:
        self._domain_listeners.append(listener)

    def _on_domain(self, dom: libvirt.virDomain | None) -> None:
        domain_uuid = dom.UUIDString() if dom is not None else ""
        for listener in list(self._domain_listeners):
            try:
                listener(domain_uuid)
            except Exception:
                log.exception("domain listener failed")

    def _on_lifecycle(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, _event: int,
                      _detail: int, _opaque: object) -> None:
        self._on_domain(dom)

    def _on_device(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, _alias: str,
                   _opaque: object) -> None:
        self._on_domain(dom)

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

    def get(self) -> libvirt.virConnect:
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
                self._callback_ids = [conn.domainEventRegisterAny(None, event_id, callback, None)
                                      for event_id, callback in (
                    (libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job),
                    (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
                    (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, self._on_device),
                    (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_device))]
                # Events may have been missed while there was no connection.
                _event_impl_loop.call_soon_threadsafe(self._on_domain, None)
            self._conn = conn
            self._capabilities = None  # learned again on the next ask
            return conn

    def _drop(self) -> None:
        """Forget a connection that went bad (libvirt frees it; no calls on it any more)."""
        self._conn = None
        self._callback_ids = []

    def _works(self) -> bool:
        """Is the current connection alive, and does a trivial call on it succeed?"""
        conn = self._conn
        if conn is None:
            return False
        try:
            return bool(conn.isAlive()) and conn.getLibVersion() > 0
        except libvirt.libvirtError:
            return False

    def error(self, exc: libvirt.libvirtError) -> HypervisorError:
        """A refusal (HypervisorError, libvirt's message) or an outage (HypervisorUnavailable),
        decided by whether the connection still works after the failed call."""
        code = exc.get_error_code()
        message = exc.get_error_message() or str(exc)
        if code in _CONNECTION_LOST or not self._works():
            with self._lock:
                self._drop()
            return HypervisorUnavailable(message, code)
        return HypervisorError(message, code)

    def call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except libvirt.libvirtError as exc:
            raise self.error(exc) from None

    async def in_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(self.call, fn)

    def _close_blocking(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    for callback_id in self._callback_ids:
                        self._conn.domainEventDeregisterAny(callback_id)
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._drop()

    async def close(self) -> None:
        # Closing removes libvirt's keepalive timer from the loop: kopf would otherwise wait
        # for it (about 5 s) before exiting.
        await asyncio.to_thread(self._close_blocking)

    def capabilities(self) -> Capabilities:
        with self._lock:
            known = self._capabilities
        if known is not None and self._conn is not None:
            return known
        conn = self.get()
        caps = Capabilities(libvirt=_version_tuple(conn.getLibVersion()),
                            qemu=_version_tuple(conn.getVersion()))
        with self._lock:
            self._capabilities = caps
        log.info("hypervisor: %s", caps.describe())
        return caps
