"""The copy verified at the switch (``spec.verify``), as pure rules: which blocks to compare,
what cannot be compared, when QEMU must flush before the images are read, and what a result
means for the phase, the ``Verified`` condition, ``status.verification`` and the Event.

The agent (``agent.verifier``) pauses the guest with the mirror in sync, reads the guest's
view of source and destination (read-only, shared) at the chosen blocks, compares, and
pivots only on a match. Pure: the sample comes from a seed the caller draws (BLAKE2b in
counter mode, so a seed always gives the same blocks), no clock.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

from blockcopy.core.reconcile import Decision
from blockcopy.model.api import BlockCopySpec, Phase, Verify
from blockcopy.model.observation import DiskState

BLOCK = 4096  # bytes per sampled block, aligned
SAMPLES = 1024
DATA_SHARE = 7 / 8  # of the sample drawn where the source holds data; the rest anywhere
SETTLE = 2.0  # s the paused mirror may take to reach cur == end
READ_LIMIT = 2.0  # s to read both views of a sample
FULL_PER_GIB = 10.0  # s per GiB a Full compare may take (the guest stays paused)
FULL_MIN = 60.0
READABLE_FORMATS = ("raw", "qcow2")

VERIFIED = "Verified"  # condition type
MATCH, MISMATCH, NOT_VERIFIED = "Match", "Mismatch", "NotVerified"  # status results
# A disk group switches all or none (``core.groupswitch``): a member held by another one.
GROUP_MISMATCH, GROUP_NOT_VERIFIABLE = "GroupMemberMismatch", "GroupMemberNotVerifiable"
# Held on the source with the job going on: Mirrored, a Warning, looked at again on the
# refusal back-off (a mismatch ends the job instead).
KEPT_MIRRORED = ("NotVerifiable", GROUP_NOT_VERIFIABLE, GROUP_MISMATCH)


@dataclasses.dataclass(frozen=True)
class Copy:
    """The copy to check: the disk as observed, and what the job was started with."""

    spec: BlockCopySpec
    disk: DiskState
    target: str
    dest_format: str | None


def _numbers(seed: bytes) -> Iterator[int]:
    """64-bit numbers from BLAKE2b(seed, counter): the same seed, the same numbers."""
    counter = 0
    while True:
        digest = hashlib.blake2b(counter.to_bytes(8, "big"), key=seed[:64]).digest()
        counter += 1
        for i in range(0, len(digest), 8):
            yield int.from_bytes(digest[i:i + 8], "big")


def _data_blocks(extents: Sequence[tuple[int, int]], blocks: int
                 ) -> list[tuple[int, int]]:
    """The aligned block ranges [first, end) that hold data, merged and sorted."""
    ranges: list[tuple[int, int]] = []
    for start, length in sorted(extents):
        if length <= 0:
            continue
        first, end = start // BLOCK, min(blocks, -(-(start + length) // BLOCK))
        if first >= end:
            continue
        if ranges and first <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
        else:
            ranges.append((first, end))
    return ranges


def sample(seed: bytes, size: int, data: Sequence[tuple[int, int]], *,
           count: int = SAMPLES) -> list[int]:
    """Guest offsets (BLOCK-aligned, sorted, distinct) of ``count`` blocks of a disk of
    ``size`` bytes: ``DATA_SHARE`` of them where the source holds data (``data``: its
    (offset, length) extents, qemu-img map), the rest anywhere. All blocks when there are
    fewer."""
    blocks = -(-size // BLOCK)
    if blocks <= count:
        return [i * BLOCK for i in range(blocks)]
    ranges = _data_blocks(data, blocks)
    starts, total = [], 0
    for first, end in ranges:
        starts.append(total)
        total += end - first
    chosen: set[int] = set()
    numbers = _numbers(seed)
    if total <= count * DATA_SHARE:
        chosen.update(b for first, end in ranges for b in range(first, end))
    else:
        while len(chosen) < int(count * DATA_SHARE):
            n = next(numbers) % total
            i = bisect.bisect_right(starts, n) - 1
            chosen.add(ranges[i][0] + n - starts[i])
    while len(chosen) < count:
        chosen.add(next(numbers) % blocks)
    return [b * BLOCK for b in sorted(chosen)]


def block_length(offset: int, size: int) -> int:
    """The bytes of the block at ``offset`` (the last one of an unaligned disk is short)."""
    return max(0, min(BLOCK, size - offset))


def compare(offsets: Sequence[int], source: Sequence[bytes], dest: Sequence[bytes]
            ) -> tuple[int, int | None]:
    """(how many blocks differ, the guest offset of the first)."""
    differ = [off for off, a, b in zip(offsets, source, dest, strict=True) if a != b]
    return len(differ), (differ[0] if differ else None)


def offset_in(text: str) -> int | None:
    """The guest offset in qemu-img compare's "Content mismatch at offset N!"."""
    words = text.replace("!", " ").split()
    for i, word in enumerate(words[:-1]):
        if word == "offset" and words[i + 1].isdigit():
            return int(words[i + 1])
    return None


def not_verifiable(disk: DiskState, *, dest: str, dest_format: str | None,
                   network: bool) -> str | None:
    """Why the guest views of source and destination cannot be read here, or None."""
    source = disk.source
    if network or "://" in dest:
        return "the destination is an NBD export (its guest view is not read here)"
    if not source or not source.startswith("/"):
        return "the source is not a local file or block device"
    if disk.encrypted:
        return "the disk is encrypted (its guest view needs the secret)"
    for what, fmt in (("source", disk.source_format), ("destination", dest_format),
                      *(("backing image", f) for f in disk.chain_formats)):
        if fmt not in READABLE_FORMATS:
            return f"the {what}'s format {fmt or 'unknown'} is not raw or qcow2"
    return None


def needs_flush(*, source_format: str | None, dest_format: str | None) -> bool:
    """Must QEMU flush before the images are read? A qcow2 image's metadata (which cluster
    holds a guest block) lives in QEMU's cache until a flush: the mirror's qcow2 destination
    is never flushed while it runs (read as is, a block it copied looks unwritten: a false
    mismatch), and a qcow2 source only when the guest flushes. Raw images hold no metadata:
    what QEMU wrote is what a read sees."""
    return "qcow2" in (source_format, dest_format)


def full_limit(size: int) -> float:
    """s a Full compare of a ``size``-byte disk may take: the guest is paused meanwhile."""
    return max(FULL_MIN, FULL_PER_GIB * size / (1 << 30))


@dataclasses.dataclass(frozen=True)
class Result:
    """What the check found. ``result``: MATCH, MISMATCH or NOT_VERIFIED (``reason`` says
    why: NotAsked, NotVerifiable). A group member held by another member keeps what its own
    check found, with the group's reason (``core.groupswitch``)."""

    method: Verify
    result: str
    reason: str = ""
    message: str = ""
    samples: int = 0
    mismatches: int = 0
    first_mismatch: int | None = None
    pause_ms: int | None = None

    @property
    def held(self) -> bool:
        """No pivot: the copy differs, or the check was asked for and could not be made (of
        this disk, or in a group, of another member)."""
        return self.result == MISMATCH or self.kept_mirrored

    @property
    def kept_mirrored(self) -> bool:
        """Held with the job going on (not a mismatch of this disk): Mirrored, retried."""
        return self.reason in KEPT_MIRRORED


def not_verified(spec: BlockCopySpec, why: str) -> Result:
    """A check that cannot be made: held when asked for explicitly, else the pivot goes on."""
    method = spec.verify or Verify.SAMPLE
    if spec.verify is None:
        return Result(method, NOT_VERIFIED, reason="NotVerified",
                      message=f"not verified: {why}; pivoted without a check (set spec.verify: "
                      "None to skip it, or Sample to hold the pivot until it can be made)")
    return Result(method, NOT_VERIFIED, reason="NotVerifiable",
                  message=f"spec.verify {method.value} cannot be done: {why}. The VM stays on "
                  "its source, Mirrored: fix it, set spec.verify: None, or set spec.abort")


def not_asked() -> Result:
    return Result(Verify.NONE, NOT_VERIFIED, reason="NotAsked",
                  message="spec.verify is None: pivoted without a check")


def matched(method: Verify, samples: int, pause_ms: int) -> Result:
    what = "every block" if method == Verify.FULL else f"{samples} sampled blocks"
    return Result(method, MATCH, reason="Match", samples=samples, pause_ms=pause_ms,
                  message=f"{what} of the guest's view matched on source and destination "
                  f"(guest paused {pause_ms} ms)")


def mismatched(method: Verify, samples: int, mismatches: int, first: int | None,
               pause_ms: int, detail: str = "") -> Result:
    where = f", the first at guest offset {first}" if first is not None else ""
    counted = f"{mismatches} of {samples} sampled blocks differ" if samples else \
        "source and destination differ"
    return Result(method, MISMATCH, reason="VerifyMismatch", samples=samples,
                  mismatches=mismatches, first_mismatch=first, pause_ms=pause_ms,
                  message=f"the copy is not what the guest sees: {counted}{where}"
                  f"{f' ({detail})' if detail else ''}. No pivot: the job was ended, the VM "
                  "stays on its source; the destination is left as it is")


def status_field(result: Result, time: str) -> dict[str, Any]:
    """``status.verification``."""
    field: dict[str, Any] = {"method": result.method.value, "result": result.result,
                             "time": time, "message": result.message[:4096]}
    if result.samples:
        field.update(samples=result.samples, blockSize=BLOCK,
                     mismatches=result.mismatches)
    if result.first_mismatch is not None:
        field["firstMismatch"] = result.first_mismatch
    if result.pause_ms is not None:
        field["pauseMs"] = result.pause_ms
    return field


def condition(result: Result) -> dict[str, str]:
    """True on a match that lets the pivot go on (a member held by its group: False)."""
    matched = result.result == MATCH and not result.held
    return {"type": VERIFIED, "status": "True" if matched else "False",
            "reason": result.reason, "message": result.message}


def event(result: Result) -> tuple[str, str, str] | None:
    """The Event of a check that lets the pivot go on (a held one is told by its phase or
    refusal Event: Failed VerifyMismatch, Mirrored NotVerifiable or a group's reason)."""
    if result.held or result.reason == "NotAsked":
        return None
    if result.result == MATCH:
        return "Normal", VERIFIED, result.message
    return "Normal", "NotVerified", result.message


def decision(result: Result, current: Decision) -> Decision:
    """The decision once the check is done: the pivot's, a failure on a mismatch (the job
    ended on the source), or Mirrored while a check asked for cannot be made (or, in a
    group, while another member's check holds the group)."""
    if result.result == MISMATCH:
        return Decision(Phase.FAILED, reason="VerifyMismatch", message=result.message)
    if result.kept_mirrored:
        return Decision(Phase.MIRRORED, reason=result.reason, message=result.message,
                        warning=True)
    return current


def kept(previous: Sequence[dict[str, Any]] | None) -> list[dict[str, str]]:
    """The Verified condition as the last check left it (steps that do not check keep it)."""
    old = next((c for c in previous or () if c.get("type") == VERIFIED), None)
    return [{k: str(old[k]) for k in ("type", "status", "reason", "message")}] if old else []
