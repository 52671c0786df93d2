"""Preparing the destination when QEMU's mirror cannot do the job alone.

QEMU's mirror copies the whole disk, or only the top image (shallow); it has no base
parameter and does not move backing images. Two layouts need the agent to prepare files:

- A base below the top's backing file (chain T -> Lk ... L1 -> B, base B): the destination
  D is created backed by Lk, then rebased onto B with a safe ``qemu-img rebase`` (which
  writes into D exactly the clusters where Lk ... L1 differ from B); the mirror then copies
  T onto D shallowly, and the VM ends on D -> B.
- A chain move (``backingChain: copy``, the oVirt flow): placeholders for every image, next
  to dest under the images' own file names with relative backing names; the mirror copies T
  onto the top placeholder shallowly while each lower image is copied into its placeholder
  (``qemu-img convert -n -B``, bottom up) and verified (``qemu-img compare``); the pivot
  waits for both.

The plan is recorded in status before any file is created, so that a restarted agent
finishes the same plan; every file it creates is listed in status and never deleted.
Planning is pure; ``agent.layers`` makes the files through ``ports.Images``.
"""

from __future__ import annotations

import dataclasses
import enum
import posixpath
from collections.abc import Mapping
from typing import Any

from blockcopy.model.api import BackingChain, BlockCopySpec
from blockcopy.model.observation import DiskState


class PlanKind(enum.StrEnum):
    BASE = "base"
    CHAIN = "chain"


class LayerState(enum.StrEnum):
    PENDING = "Pending"
    COPYING = "Copying"
    COPIED = "Copied"
    VERIFIED = "Verified"
    FAILED = "Failed"


@dataclasses.dataclass(frozen=True)
class Plan:
    kind: PlanKind
    chain: tuple[str, ...]  # the source's images when planned, top first
    formats: tuple[str, ...]  # their formats
    targets: tuple[str, ...]  # base: (dest,); chain: one target per image of chain
    base: str | None = None
    capacity: int = 0  # the disk's guest-visible size

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "chain": list(self.chain),
                "targets": list(self.targets)}

    @property
    def created_files(self) -> list[str]:
        return list(self.targets)

    @property
    def lower(self) -> list[tuple[str, str, str]]:
        """Chain move: (source, target, format) of each image below the top, top-most first."""
        return list(zip(self.chain[1:], self.targets[1:], self.formats[1:], strict=True))


@dataclasses.dataclass(frozen=True)
class Refusal:
    reason: str
    message: str


def needed(spec: BlockCopySpec, disk: DiskState) -> bool:
    """Does this copy need a plan (anything QEMU's mirror cannot do by itself)?"""
    if spec.backing_chain == BackingChain.COPY:
        return bool(disk.chain)
    return spec.base is not None and spec.base in disk.chain[1:]


def make(spec: BlockCopySpec, disk: DiskState, capacity: int) -> Plan | Refusal:
    assert disk.source is not None
    chain = (disk.source, *disk.chain)
    formats = (disk.source_format or "qcow2", *(f or "qcow2" for f in disk.chain_formats))
    if spec.backing_chain == BackingChain.COPY:
        directory = posixpath.dirname(spec.dest)
        targets = (spec.dest, *(posixpath.join(directory, posixpath.basename(p))
                                for p in disk.chain))
        if len(set(targets)) != len(targets):
            return Refusal("DestConflict", "two images of the chain have the same file name, "
                           f"so they cannot both move next to {spec.dest}: {', '.join(chain)}")
        return Plan(PlanKind.CHAIN, chain, formats, targets, capacity=capacity)
    assert spec.base is not None
    return Plan(PlanKind.BASE, chain, formats, (spec.dest,), base=spec.base,
                capacity=capacity)


def from_status(raw: Mapping[str, Any] | None, *, disk: DiskState, spec: BlockCopySpec,
                capacity: int) -> Plan | None:
    """The plan recorded in status (what a restarted agent continues), if any."""
    if not raw:
        return None
    chain = tuple(raw.get("chain") or ())
    formats = dict(zip((disk.source, *disk.chain),
                       (disk.source_format, *disk.chain_formats), strict=False))
    return Plan(PlanKind(raw["kind"]), chain,
                tuple(formats.get(p) or "qcow2" for p in chain),
                tuple(raw.get("targets") or ()), base=spec.base, capacity=capacity)


def chain_changed(plan: Plan, disk: DiskState) -> str | None:
    """Why the disk's chain no longer is the planned one (checked right before the job)."""
    now = (disk.source, *disk.chain)
    if now != plan.chain:
        return (f"the disk's backing chain changed since the plan was made: it was "
                f"{' -> '.join(plan.chain)}, it is {' -> '.join(str(p) for p in now)}")
    return None
