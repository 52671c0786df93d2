"""The agent's node-side clients, as interfaces: the hypervisor (libvirt) and the node's file
system; qemu-img's (``Images``) is in ``model.images`` and re-exported here, the Kubernetes
API's in ``model.kubeapi``, the metrics' in ``model.metrics``. The agent knows only these; the real
clients live in ``blockcopy.adapters``, fakes for orchestration tests in
``tests/support/fakes.py`` (checked against these Protocols by mypy). Also the plain data and
errors that cross these seams. Pure: no I/O, no framework imports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

from blockcopy.model.api import BlockCopySpec, Flag, NetworkDest

# The image Protocol and its data live in model.images; re-exported here.
from blockcopy.model.images import DataMap as DataMap
from blockcopy.model.images import ImageError as ImageError
from blockcopy.model.images import ImageInfo as ImageInfo
from blockcopy.model.images import Images as Images
from blockcopy.model.inventory import InventoryDomain
from blockcopy.model.observation import (
    DiskState,
    FileIdentity,
    ImageUser,
    JobEvent,
    JobProgress,
)

# ------------------------------------------------------------------ hypervisor


class HypervisorError(Exception):
    """libvirt refused or failed an operation; ``str()`` is libvirt's message."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class HypervisorUnavailable(HypervisorError):
    """libvirtd cannot be reached (the connection is down); worth retrying later."""


@dataclasses.dataclass(frozen=True)
class CopyRequest:
    """One virDomainBlockCopy call."""

    domain: str
    target: str
    dest: str
    format: str
    flags: frozenset[Flag]
    block_device: bool = False  # the destination is a block device (<disk type='block'>)
    network: NetworkDest | None = None  # the destination is an NBD export
    bandwidth: int = 0  # bytes/s, 0 = unlimited
    granularity: int = 0
    buf_size: int = 0
    encryption: str | None = None  # the source's <encryption>: the copy stays encrypted


JobListener = Callable[[str, str, JobEvent], None]  # (domain uuid, disk target, event)
# A domain was defined, started, stopped, undefined... or a device was added or removed (its
# UUID); "" after a new connection to libvirtd (events may have been missed meanwhile).
DomainListener = Callable[[str], None]


class Hypervisor(Protocol):
    """What the agent asks of libvirt. Every call may raise HypervisorUnavailable (cannot
    reach libvirtd) or HypervisorError (libvirt refused, with its message)."""

    def add_listener(self, listener: JobListener) -> None:
        """Call ``listener`` on the event loop for every block-job event."""

    def add_domain_listener(self, listener: DomainListener) -> None:
        """Call ``listener`` on the event loop for every domain lifecycle event and every
        device added or removed (what changes the node's inventory)."""

    async def version(self) -> str: ...

    async def has_running_domain(self, domain: str) -> bool: ...

    async def observe(self, domain: str, disk: str) -> DiskState:
        """The domain and the disk (by target or source path) as libvirt shows them now."""

    async def start_copy(self, request: CopyRequest) -> None: ...

    async def pivot(self, domain: str, target: str) -> None:
        """Switch the VM to the mirror (refused by libvirt before it is ready)."""

    async def cancel(self, domain: str, target: str) -> None:
        """End the job, the VM stays on its source."""

    async def set_bandwidth(self, domain: str, target: str, bandwidth: int) -> None: ...

    async def image_users(self) -> list[ImageUser]:
        """Every image the node's domains use (running or not, live and persistent
        definitions, storage volumes resolved to their paths). A stopped domain's backing
        chain is not in its definition (``chain_known`` False): ask ``Images.backing_chain``."""

    async def inventory(self, *, fresh_sizes: bool = False) -> list[InventoryDomain]:
        """Every domain of the node with its disks (device='disk' only), their sources,
        formats, sizes (left out where libvirt cannot tell, e.g. a stopped domain's NBD disk)
        and backing chains. Sizes are read for the disks that are new since the last call
        (or whose source or domain state changed), for all with ``fresh_sizes``. A stopped
        domain's backing chain is not in its definition (libvirt finds it at start): empty,
        for the caller to ask ``Images.backing_images``."""

    async def disk_size(self, domain: str, target: str) -> DiskSize:
        """The disk's guest-visible size and what its active image occupies."""

    async def capabilities(self) -> Capabilities:
        """Versions and features of the connected libvirt and QEMU."""

    async def set_zero_detection(self, domain: str, target: str, *, on: bool,
                                 mirror: bool) -> None:
        """Reopen the running mirror's destination node (``mirror``) or, after the pivot,
        the disk's active node with zero detection (detect-zeroes and discard unmap) on, or
        back to libvirt's defaults; QEMU >= 6.1, through the monitor passthrough."""

    async def set_copy_mode(self, domain: str, target: str, mode: str) -> None:
        """Switch a running mirror's copy mode (``write-blocking``); QEMU >= 8.2 only, through
        libvirt's QEMU monitor passthrough (libvirt has no API for it)."""

    async def pause(self, domain: str, owner: str) -> bool:
        """Suspend the VM, marked in its live metadata as paused by ``owner`` (this node's
        agent: a VM it left paused is resumed by its next start). False when the VM was
        already paused by someone else (then it is left to them: not marked, never
        resumed)."""

    async def resume(self, domain: str, owner: str) -> None:
        """Resume a VM ``owner`` paused (and drop the mark); nothing for any other."""

    async def resume_left_paused(self, owner: str) -> list[str]:
        """Resume every VM ``owner`` paused and did not resume (its agent died): their
        names."""

    async def job_progress(self, domain: str, target: str) -> JobProgress | None:
        """The disk's block job's cur/end now (None: no job), without the XML."""

    async def flush_images(self, domain: str) -> None:
        """Have QEMU write every image's cached metadata out (a paused VM stays paused)."""

    async def quiesce(self, domain: str) -> str:
        """Hold the guest's disks still: freeze its file systems through its guest agent
        ("frozen"), or, without an agent that answers, suspend the VM ("suspended")."""

    async def unquiesce(self, domain: str, how: str) -> None:
        """Undo quiesce: thaw (``how`` "frozen") or resume ("suspended")."""

    async def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What the connected libvirt and QEMU can do, learned once per connection."""

    libvirt: tuple[int, int, int]
    qemu: tuple[int, int, int]

    @property
    def synchronous_writes(self) -> bool:
        """VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES (libvirt 8.0)."""
        return self.libvirt >= (8, 0, 0)

    @property
    def blockdev_reopen(self) -> bool:
        """QMP blockdev-reopen of a list of nodes (QEMU 6.1): zero detection on a copy."""
        return self.qemu >= (6, 1, 0)

    @property
    def block_job_change(self) -> bool:
        """QMP block-job-change: a running mirror switched to write-blocking (QEMU 8.2)."""
        return self.qemu >= (8, 2, 0)

    def describe(self) -> str:
        return (f"libvirt {'.'.join(map(str, self.libvirt))}, QEMU "
                f"{'.'.join(map(str, self.qemu))}: synchronousWrites "
                f"{'yes' if self.synchronous_writes else 'no'}, switching a running copy to "
                f"write-blocking {'yes' if self.block_job_change else 'no'}")


@dataclasses.dataclass(frozen=True)
class DiskSize:
    capacity: int  # the guest-visible size in bytes
    allocation: int  # bytes the active image occupies on its storage


# ------------------------------------------------------------------ the node's file system

Refusal = tuple[str, str]  # (reason, message) of a destination that must not be used
# What a container's device cgroup does to an agent that opens a host block device (even
# read-only, even as root): the open fails with EPERM. QEMU, on the host, is not affected.
CONTAINER_DEVICE_HINT = ("an agent in a container may not open host block devices: its "
                         "device cgroup refuses it")


class Files(Protocol):
    """What the agent asks of the node's file system about destinations, before libvirt is
    called: it must not let a BlockCopy write arbitrary files, clobber one, or start a copy
    that cannot fit. Blocking calls: the agent runs them in a worker thread where it waits."""

    def resolve(self, path: str) -> str:
        """``path`` after symlinks and ``..``, as the kernel would open it."""

    def refusal(self, spec: BlockCopySpec, allowed_roots: Sequence[str]) -> Refusal | None:
        """Why ``spec.dest`` must not be used (outside the roots, exists, missing...)."""

    def network_refusal(self, endpoint: str, allowed: Sequence[str]) -> Refusal | None:
        """Why a network destination (HOST:PORT or a socket path) is not allowed."""

    def chain_member(self, dest: str, images: Sequence[str | None]) -> str | None:
        """The image of ``images`` that ``dest`` is (after symlinks, hard links), or None."""

    def space_refusal(self, dest: str, *, required: int, capacity: int, reuse: bool,
                      network_size: int | None = None,
                      basis: str = "the data allocated in the images it copies"
                      ) -> Refusal | None:
        """Why ``dest`` cannot hold the copy (``required`` bytes, counted as ``basis``
        says)."""

    def allocated(self, path: str) -> int:
        """Bytes a file occupies on its storage."""

    def exists(self, path: str) -> bool:
        """Whether anything (a dangling symlink too) is at ``path``."""

    def is_block_device(self, path: str) -> bool: ...

    def probe_format(self, path: str) -> str:
        """qcow2 or raw, from the file's header; raises OSError when it cannot be read."""

    def identity(self, path: str) -> FileIdentity | None:
        """What ``path`` is now (after symlinks), None when nothing is there; raises OSError
        when it cannot be looked at."""

    def delete(self, path: str) -> None:
        """Remove the file ``path`` (source retention: an image no domain uses)."""

    def make_directories(self, dest: str, source: str,
                         allowed_roots: Sequence[str]) -> tuple[list[str], Refusal | None]:
        """spec.createDirectories: the missing directories of ``dest``, each made with the
        owner, group and mode of the directory of ``source`` at the same depth, when the
        nearest existing one lies under an allowed root. Returns those made (top first) and
        why not (the ones made before a failure stay)."""
