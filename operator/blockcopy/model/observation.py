"""What the agent observed of a disk in libvirt: plain data, shared by the hypervisor
driver (which produces it) and the phase logic (which reads it)."""

from __future__ import annotations

import dataclasses
import enum


class MirrorReady(enum.StrEnum):
    """The ``ready`` attribute of the live ``<mirror>`` element."""

    COPYING = ""  # attribute absent: still copying
    READY = "yes"  # source and destination in sync: pivot or finish allowed
    ABORTING = "abort"  # finishing towards the source
    PIVOTING = "pivot"  # finishing towards the destination


class JobEvent(enum.StrEnum):
    """libvirt block-job event (VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2) statuses."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    READY = "ready"


@dataclasses.dataclass(frozen=True)
class Mirror:
    dest: str
    ready: MirrorReady
    job: str = "copy"


@dataclasses.dataclass(frozen=True)
class JobProgress:
    cur: int
    end: int
    bandwidth: int  # bytes/s, 0 = unlimited


@dataclasses.dataclass(frozen=True)
class DiskInfo:
    """One disk as the domain XML describes it."""

    target: str | None
    source: str | None  # path of the active image (file or block device)
    source_format: str | None = None
    backing: str | None = None  # the active image's backing file, if libvirt knows it
    mirror: Mirror | None = None  # a copy job's destination
    chain: tuple[str, ...] = ()  # the backing images below the active one, nearest first
    chain_formats: tuple[str, ...] = ()  # their formats (as libvirt detected them)
    volume: tuple[str, str] | None = None  # (pool, volume) of a <disk type='volume'>
    encryption: str | None = None  # the active image's <encryption> element, as XML
    chain_encrypted: bool = False  # a backing image is encrypted


@dataclasses.dataclass(frozen=True)
class DiskState:
    domain_found: bool
    domain_uuid: str | None = None
    domain_name: str | None = None
    domain_running: bool = False
    domain_persistent: bool = False
    domain_tenant: str | None = None  # from the domain's <metadata> (see blockcopy.core.policy)
    disk_found: bool = False
    target: str | None = None
    source: str | None = None  # path of the active image (file or block device)
    source_format: str | None = None
    backing: str | None = None  # the active image's backing file, if libvirt knows it
    job: JobProgress | None = None  # any block job on the disk
    mirror: Mirror | None = None  # a copy job's destination, from the live XML
    chain: tuple[str, ...] = ()  # the backing images below the active one, nearest first
    chain_formats: tuple[str, ...] = ()
    encryption: str | None = None  # the active image's <encryption> element, as XML
    chain_encrypted: bool = False  # a backing image is encrypted

    @property
    def encrypted(self) -> bool:
        return self.encryption is not None or self.chain_encrypted

    @classmethod
    def of_domain(cls, *, uuid: str, name: str, running: bool, persistent: bool,
                  disk: DiskInfo | None, job: JobProgress | None = None,
                  tenant: str | None = None) -> DiskState:
        """A domain that exists, with the disk's XML (None: no such disk) and its block job."""
        domain = cls(domain_found=True, domain_uuid=uuid, domain_name=name,
                     domain_running=running, domain_persistent=persistent,
                     domain_tenant=tenant)
        if disk is None:
            return domain
        return dataclasses.replace(
            domain, disk_found=True, target=disk.target, source=disk.source,
            source_format=disk.source_format, backing=disk.backing, mirror=disk.mirror, job=job,
            chain=disk.chain, chain_formats=disk.chain_formats, encryption=disk.encryption,
            chain_encrypted=disk.chain_encrypted)


@dataclasses.dataclass(frozen=True)
class GroupMember:
    """One member of a disk group as the follower sees it when it decides."""

    name: str
    phase: str | None  # a Phase value, or None (not started)
    pivot: bool = False  # spec.pivot
    abort: bool = False  # spec.abort
    followed: bool = True  # followed by this agent (else only listed from the API server)
    elsewhere: str | None = None  # listed: the other node whose agent claimed it


@dataclasses.dataclass(frozen=True)
class GroupView:
    """A disk group at one instant: its members (this agent's followers, plus, when the
    pivot is up, those the API server lists), the newest member's age, and why the listing
    failed if it did (then no pivot: a partial view must not pivot a group)."""

    name: str
    members: tuple[GroupMember, ...]
    newest_age: float | None = None  # s since the newest member was created (listed only)
    listing_error: str | None = None
    listed: bool = False  # the API server was asked (only when a pivot is due)
    # (object, how it names the VM): objects of the same group and namespace that name this
    # VM the other way (by UUID where the members use its name, or the reverse)
    aliases: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class LayersView:
    """A chain move's lower images as copied and verified so far (``total`` 0: no chain
    move, or nothing below the top)."""

    chain_move: bool = False  # the recorded plan is a chain move
    total: int = 0
    verified: int = 0
    failure: str | None = None  # "source -> dest: why", of the first layer that failed

    @property
    def all_verified(self) -> bool:
        return self.verified == self.total


NO_LAYERS = LayersView()


@dataclasses.dataclass(frozen=True)
class ImageUser:
    """An image a domain of the node uses: a disk's active image or one of its backing images
    (``backing``), in the live definition of a running domain or in a persistent one."""

    path: str  # as the domain names it (a storage volume: the volume's path)
    domain: str
    uuid: str
    target: str | None
    running: bool
    definition: str = "live"  # "live" or "persistent"
    backing: bool = False  # a backing image, not the active one
    tenant: str | None = None  # from the domain's <metadata> (see blockcopy.core.policy)
    chain_known: bool = True  # False: a stopped domain's image (libvirt shows no chain)


@dataclasses.dataclass(frozen=True)
class FileIdentity:
    """What a path is on the node: a file (device and inode), a block device (its device
    number) or something else. Recorded when a copy starts, compared before the pivot."""

    kind: str  # "file", "block" or "other"
    device: int  # st_dev
    inode: int  # st_ino
    rdev: int = 0  # st_rdev of a block device
    # The inode's generation (FS_IOC_GETVERSION) where the file system keeps one: a deleted
    # file's inode number is reused at once (ext4), the generation is not.
    generation: int | None = None

    def same(self, other: FileIdentity) -> bool:
        if self.kind == "block" and other.kind == "block":
            return self.rdev == other.rdev
        if None not in (self.generation, other.generation) and \
                self.generation != other.generation:
            return False
        return (self.kind, self.device, self.inode) == (other.kind, other.device, other.inode)

    def describe(self) -> str:
        if self.kind == "block":
            return f"block device {self.rdev >> 8}:{self.rdev & 0xff}"
        return f"{self.kind} {self.inode} on device {self.device >> 8}:{self.device & 0xff}"

    def status(self) -> dict[str, int | str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_status(cls, raw: object) -> FileIdentity | None:
        if not isinstance(raw, dict):
            return None
        try:
            generation = raw.get("generation")
            return cls(kind=str(raw["kind"]), device=int(raw["device"]),
                       inode=int(raw["inode"]), rdev=int(raw.get("rdev") or 0),
                       generation=int(generation) if generation is not None else None)
        except (KeyError, TypeError, ValueError):
            return None
