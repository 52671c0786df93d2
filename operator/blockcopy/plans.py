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
Planning is pure; ``prepare`` and ``LayerCopy`` run qemu-img through ``ports.Images``.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping
from typing import Any

from blockcopy.api import BackingChain, BlockCopySpec
from blockcopy.observation import DiskState
from blockcopy.ports import Images


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
        directory = os.path.dirname(spec.dest)
        targets = (spec.dest, *(os.path.join(directory, os.path.basename(p))
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


async def prepare(plan: Plan, images: Images) -> None:
    """Create (or create again: a restarted agent redoes its own plan) the plan's files."""
    if plan.kind == PlanKind.BASE:
        assert plan.base is not None
        base_format = plan.formats[plan.chain.index(plan.base)]
        dest = plan.targets[0]
        # D backed by the top's backing file Lk, then rebased onto B: the safe rebase writes
        # into D every cluster where Lk ... L1 (read-only backing images) differ from B.
        await images.create(dest, format="qcow2", size=plan.capacity, backing=plan.chain[1],
                            backing_format=plan.formats[1])
        await images.rebase(dest, backing=plan.base, backing_format=base_format)
        return
    # A chain move: placeholders from the bottom up, each backed by the one below it under a
    # relative name (the chain stays valid wherever its directory is mounted).
    for i in range(len(plan.chain) - 1, -1, -1):
        below = plan.targets[i + 1] if i + 1 < len(plan.targets) else None
        size = plan.capacity if i == 0 else (await images.info(plan.chain[i])).virtual_size
        fmt = "qcow2" if i == 0 or below is not None else plan.formats[i]
        await images.create(plan.targets[i], format=fmt, size=size,
                            backing=os.path.basename(below) if below else None,
                            backing_format=plan.formats[i + 1] if below else None)


async def copy_layer(plan: Plan, index: int, images: Images) -> None:
    """Copy image ``index`` (>= 1) of a chain move into its placeholder."""
    below = plan.targets[index + 1] if index + 1 < len(plan.targets) else None
    await images.copy_layer(plan.chain[index], plan.targets[index], format=plan.formats[index],
                             backing=os.path.basename(below) if below else None,
                             backing_format=plan.formats[index + 1] if below else None)


async def verify_layer(plan: Plan, index: int, images: Images) -> str | None:
    """None when image ``index`` and its copy (each with the chain below it) read the same."""
    return await images.identical(plan.chain[index], plan.targets[index],
                                  format=plan.formats[index])
