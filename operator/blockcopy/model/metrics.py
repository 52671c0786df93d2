"""What the agent reports to its metrics, as an interface (Prometheus in
``adapters.metrics``), and a null object for tests and tools. Apart from ``model.ports``
because every collaborator of the agent reports, and none needs the hypervisor's or the API's
interfaces for it. Pure: no I/O, no framework imports.
"""

from __future__ import annotations

from typing import Protocol

from blockcopy.model.ports import Capabilities

Key = tuple[str, str]  # (namespace, name) of a BlockCopy


class Metrics(Protocol):
    """What the agent reports to its metrics (Prometheus in ``adapters.metrics``)."""

    def objects(self, phase: str, count: int) -> None:
        """How many of this agent's objects are in ``phase``."""

    def copied(self, key: Key, nbytes: int) -> None:
        """``nbytes`` more were copied by the job of ``key`` (a per-copy counter, kept until
        ``forget``)."""

    def duration(self, what: str, seconds: float) -> None:
        """A copy's time to Mirrored ("copy"), time Mirrored ("mirror"), pivot latency
        ("pivot")."""

    def error(self, reason: str) -> None:
        """A failure or a refused action, by reason."""

    def progress(self, key: Key, *, eta: float | None, not_converging: bool) -> None:
        """A Copying copy's estimate (None: no estimate)."""

    def idle(self, key: Key) -> None:
        """The copy is not Copying (or has no estimate): drop its estimate series (its byte
        counter stays)."""

    def forget(self, key: Key) -> None:
        """The object is gone: drop every per-copy series, its byte counter too."""

    def watch_event(self, stream: str, owner: str) -> None:
        """A watch event received (stream "objects" or "unclaimed"; owner this-node,
        other-node or unclaimed)."""

    def hypervisor(self, caps: Capabilities) -> None:
        """The connected libvirt and QEMU."""

    def libvirt_up(self, up: bool) -> None:
        """Whether the last call reached libvirtd."""


class NullMetrics:
    """Reports nothing (tests that do not look at metrics, tools)."""

    def objects(self, phase: str, count: int) -> None: ...
    def copied(self, key: Key, nbytes: int) -> None: ...
    def duration(self, what: str, seconds: float) -> None: ...
    def error(self, reason: str) -> None: ...
    def progress(self, key: Key, *, eta: float | None, not_converging: bool) -> None: ...
    def idle(self, key: Key) -> None: ...
    def forget(self, key: Key) -> None: ...
    def watch_event(self, stream: str, owner: str) -> None: ...
    def hypervisor(self, caps: Capabilities) -> None: ...
    def libvirt_up(self, up: bool) -> None: ...


NULL_METRICS = NullMetrics()
