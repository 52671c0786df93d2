"""The writing guest's blocks, and the proof that no acknowledged write was lost.

The writing guest (support.vms, ``create_vm(guest_writes=True)``) writes 4 KiB blocks, one at
a time, each at the offset its sequence number selects (`WritePlan`), each with ``dd
conv=fsync`` (the write, then a FLUSH), and only once dd returned logs it on its serial
console: ``bct-guest: write <n> off=<bytes> seq=<n> md5=<32 hex> rc=<dd's exit code>``. A
logged line with ``rc=0`` is an *acknowledged* write: the disk said it is stable, so whatever
image the VM ends on must hold it (or a later write to the same block).

Every block identifies itself, so an image can be checked without the guest:

    bytes 0..127     "BCTW off=<offset, 12 digits> seq=<seq, 10 digits> md5=<32 hex>",
                     spaces, "\\n"
    bytes 128..4095  "off=<offset, 12 digits> seq=<seq, 10 digits>\\n", 124 times

``md5`` is the MD5 of ``"BCTW off=<offset> seq=<seq>\\n"`` followed by bytes 128..4095: a torn
block (a new header on an old body, or the reverse), a block written at the wrong place or a
stale copy of one all fail the check.

`verify` reads the guest's view of an image (its whole backing chain, `qemu-img convert -U`)
and checks every 4 KiB block of the disk: a slot of the plan holds the newest acknowledged
write to it, or a newer one (written, not yet logged), or, if it was never acknowledged,
possibly its initial content; every block header found is valid; every block outside the
slots holds exactly what the chain held when the VM was created. Any other state is a lost
(or corrupted) write and raises `LostWrites` with the blocks concerned. `point_in_time` checks
an image that the guest no longer writes to (the destination of an aborted copy): it must be
the guest's disk as it was after some write k, every write up to k included, none after.

Read the image of a VM that is `paused` (QEMU drains and flushes every image when a VM
stops), or one the VM no longer uses.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import libvirt

if TYPE_CHECKING:
    from support.vms import VM

BLOCK = 4096
HEADER = 128
LINES = (BLOCK - HEADER) // 32
WRITE_MARK = "bct-guest: write"
_ACK = re.compile(rf"^{re.escape(WRITE_MARK)} (\d+) off=(\d+) seq=(\d+) md5=([0-9a-f]{{32}}) "
                  r"rc=(\d+)$")
_HEADER = re.compile(rb"^BCTW off=(\d{12}) seq=(\d{10}) md5=([0-9a-f]{32}) *\n$")
MiB = 1 << 20


# ---------------------------------------------------------------- where the guest writes


@dataclass(frozen=True)
class WritePlan:
    """Write ``seq`` goes to slot ``seq * mult % slots``, at block ``start + slot * stride``
    (4 KiB blocks): every slot is rewritten every ``slots`` writes. The guest pauses
    ``pause_us`` between writes. With ``load_mib``, after each write the guest also writes
    that many MiB of random data, rotating over the scratch area (``scratch_mib`` MiB from
    MiB ``scratch_start_mib``, off the slots and the layers' data, not verified): a guest
    that dirties its disk faster than a throttled copy copies, whose writes still verify."""

    start: int
    stride: int
    slots: int
    mult: int
    pause_us: int = 50000
    load_mib: int = 0
    scratch_start_mib: int = 0
    scratch_mib: int = 0

    def offset(self, seq: int) -> int:
        return (self.start + (seq * self.mult % self.slots) * self.stride) * BLOCK

    def slot_offsets(self) -> list[int]:
        return [(self.start + s * self.stride) * BLOCK for s in range(self.slots)]

    def in_scratch(self, off: int) -> bool:
        return self.scratch_start_mib * MiB <= off < (self.scratch_start_mib
                                                      + self.scratch_mib) * MiB

    def latest(self, seq: int) -> dict[int, int]:
        """{slot offset: the last write up to ``seq`` (included) to it}; slots not written
        by then are absent."""
        return {self.offset(n): n for n in range(max(0, seq - self.slots + 1), seq + 1)}

    def cmdline(self) -> str:
        """The guest kernel's command line arguments that make the guest follow this plan."""
        load = (f" bct.load={self.load_mib},{self.scratch_start_mib},{self.scratch_mib}"
                if self.load_mib else "")
        return (f"bct.writes={self.start},{self.stride},{self.slots},{self.mult} "
                f"bct.pause={self.pause_us}{load}")


def plan_writes(data_end: int, size: int, *, slots: int = 128, pause_us: int = 50000,
                load_mib: int = 0) -> WritePlan:
    """Slots spread evenly over [data_end rounded up to 1 MiB, size): the writes stay off the
    chain's data, and reach the whole rest of the disk (copied and not yet copied areas alike
    while a mirror runs). With ``load_mib``, the second half of that range (whole MiBs) is
    the scratch area instead, and the slots share the first half."""
    first_mib = -(-data_end // MiB)
    start = first_mib * MiB // BLOCK
    end = size // BLOCK
    scratch_start_mib = scratch_mib = 0
    if load_mib:
        scratch_mib = (size // MiB - first_mib) // 2
        if scratch_mib < load_mib:
            raise ValueError(f"no room for a {load_mib} MiB load after the layers' data")
        scratch_start_mib = size // MiB - scratch_mib
        end = scratch_start_mib * MiB // BLOCK
    free = end - start
    if free < 1:
        raise ValueError(f"no room for guest writes: the layers' data fills the {size}-byte disk")
    slots = min(slots, free)
    mult = next(m for m in range(37, 37 + slots + 1) if math.gcd(m, slots) == 1)
    return WritePlan(start=start, stride=free // slots, slots=slots, mult=mult % slots or 1,
                     pause_us=pause_us, load_mib=load_mib,
                     scratch_start_mib=scratch_start_mib, scratch_mib=scratch_mib)


# ---------------------------------------------------------------- blocks


def _body(off: int, seq: int) -> bytes:
    return f"off={off:012d} seq={seq:010d}\n".encode() * LINES


def checksum(off: int, seq: int, body: bytes | None = None) -> str:
    """The MD5 a block of write ``seq`` at ``off`` carries (of ``body`` as found, if given)."""
    prefix = f"BCTW off={off:012d} seq={seq:010d}\n".encode()
    return hashlib.md5(prefix + (_body(off, seq) if body is None else body)).hexdigest()


def block_bytes(off: int, seq: int) -> bytes:
    """The exact 4 KiB the guest writes for write ``seq`` at ``off``."""
    head = f"BCTW off={off:012d} seq={seq:010d} md5={checksum(off, seq)}".ljust(HEADER - 1)
    return head.encode() + b"\n" + _body(off, seq)


def parse_block(data: bytes, off: int) -> tuple[int | None, str | None]:
    """(seq, None) for a valid block written at ``off``; (None, why) for anything else."""
    m = _HEADER.match(bytes(data[:HEADER]))
    if m is None:
        return None, "no valid block header"
    hoff, seq, md5 = int(m[1]), int(m[2]), m[3].decode()
    if checksum(hoff, seq, bytes(data[HEADER:])) != md5:
        return None, f"checksum mismatch (header says off={hoff} seq={seq}: a torn or " \
                     "corrupted block)"
    if hoff != off:
        return None, f"a block of offset {hoff} (seq {seq}) found at offset {off}"
    if bytes(data) != block_bytes(off, seq):  # the body is the guest's, not just consistent
        return None, f"seq {seq}: valid checksum but not the guest's block"
    return seq, None


# ---------------------------------------------------------------- the acknowledged writes


@dataclass(frozen=True)
class Ack:
    seq: int
    off: int
    md5: str


def acknowledged(console: str, plan: WritePlan) -> list[Ack]:
    """The acknowledged writes (rc=0) of a console log, oldest first. Complete lines only
    (QEMU may be writing the last one); a logged write is checked against the plan and the
    block format, so a log that does not describe what the guest does fails here."""
    acks: list[Ack] = []
    for line in console.split("\n")[:-1]:
        m = _ACK.match(line.strip())
        if m is None or m[5] != "0":
            continue
        n, off, seq, md5 = int(m[1]), int(m[2]), int(m[3]), m[4]
        assert n == seq and off == plan.offset(seq) and md5 == checksum(off, seq), \
            f"the guest logged a write it was not meant to make: {line!r} (plan {plan})"
        assert not acks or seq > acks[-1].seq, f"write {seq} logged after {acks[-1].seq}"
        acks.append(Ack(seq, off, md5))
    return acks


def acknowledged_writes(vm: VM) -> list[Ack]:
    with open(vm.console_log, errors="replace") as f:
        return acknowledged(f.read(), _plan(vm))


def last_acknowledged(vm: VM) -> int:
    """The sequence number of the newest acknowledged write, -1 before the first."""
    acks = acknowledged_writes(vm)
    return acks[-1].seq if acks else -1


def _plan(vm: VM) -> WritePlan:
    assert vm.write_plan is not None, f"{vm.name} was not created with guest_writes=True"
    return vm.write_plan


# ---------------------------------------------------------------- reading an image


@contextmanager
def paused(vm: VM) -> Iterator[None]:
    """The VM suspended (QEMU completes the guest's in-flight requests and flushes every
    image before it reports paused), resumed afterwards."""
    with libvirt.open(vm.uri) as conn:
        dom = conn.lookupByName(vm.name)
        dom.suspend()
        try:
            yield
        finally:
            dom.resume()


@contextmanager
def guest_view(image: str, fmt: str | None = None) -> Iterator[mmap.mmap]:
    """The guest-visible bytes of ``image`` (its backing chain merged), mapped read-only."""
    with tempfile.TemporaryDirectory(prefix="bct-writes-",
                                     dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        raw = os.path.join(tmp, "disk.raw")
        cmd = ["qemu-img", "convert", "-U", *(["-f", fmt] if fmt else []), "-O", "raw",
               image, raw]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")
        with open(raw, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            yield view


def _initial(layout: Sequence[tuple[int, int, int]], start: int, length: int) -> bytearray:
    """What the chain held in [start, start+length) when the VM was created: the layers'
    (pattern, offset, length) writes, base first, zeros elsewhere."""
    chunk = bytearray(length)
    for pattern, off, size in layout:
        lo, hi = max(off, start), min(off + size, start + length)
        if lo < hi:
            chunk[lo - start:hi - start] = bytes([pattern]) * (hi - lo)
    return chunk


@dataclass
class _Scan:
    size: int
    states: dict[int, int | None] = field(default_factory=dict)  # slot offset -> seq or None
    problems: list[str] = field(default_factory=list)


def _scan(view: mmap.mmap, vm: VM) -> _Scan:
    """Every block of the disk: the slots' states, and what is wrong anywhere."""
    plan, layout = _plan(vm), vm.initial_layout()
    scan = _Scan(size=len(view))
    assert len(view) == vm.size, f"the image's guest view has {len(view)} bytes, not {vm.size}"
    slots = set(plan.slot_offsets())
    for start in range(0, len(view), MiB):
        if plan.in_scratch(start):
            continue  # the load's random data (scratch areas are whole MiBs)
        length = min(MiB, len(view) - start)
        expected = _initial(layout, start, length)
        actual = view[start:start + length]
        for off in range(start, start + length, BLOCK):
            if off not in slots:
                continue
            data = actual[off - start:off - start + BLOCK]
            if data == expected[off - start:off - start + BLOCK]:
                scan.states[off] = None  # never written (as far as this image knows)
            else:
                seq, why = parse_block(data, off)
                scan.states[off] = seq
                if why is not None:
                    scan.problems.append(f"block at {off}: {why}")
            expected[off - start:off - start + BLOCK] = data  # checked above
        if actual != expected:
            bad = next(o for o in range(0, length, BLOCK)
                       if actual[o:o + BLOCK] != expected[o:o + BLOCK])
            scan.problems.append(f"block at {start + bad} (not a write slot) differs from the "
                                 "chain's initial data")
    return scan


# ---------------------------------------------------------------- the checks


class LostWrites(AssertionError):
    pass


@dataclass(frozen=True)
class Verified:
    image: str
    writes: int  # acknowledged writes: each in the image, or overwritten by a newer write there
    newest: int  # the newest acknowledged write's seq (-1: none)
    slots: int  # write slots, of which...
    written: int  # ... hold a write
    newer: int  # ... hold a write newer than the newest acknowledged to it (not yet logged)
    blocks: int  # 4 KiB blocks checked: the whole disk

    def __str__(self) -> str:
        return (f"{self.writes} acknowledged writes verified in {self.image} (newest seq "
                f"{self.newest}; {self.written}/{self.slots} slots written, {self.newer} with "
                f"a newer unlogged write; {self.blocks} blocks checked)")


def _fail(what: str, problems: list[str]) -> None:
    if problems:
        shown = "\n  ".join(problems[:25])
        more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
        raise LostWrites(f"{what}: {len(problems)} problems\n  {shown}{more}")


def verify(vm: VM, image: str, *, fmt: str | None = None,
           acks: Sequence[Ack] | None = None) -> Verified:
    """Prove that ``image`` (the guest's view through its chain) holds every write the guest
    acknowledged (``acks``, by default all of its console log, read now: pause the VM
    first, or use an image it no longer writes to). Raises `LostWrites` otherwise."""
    plan = _plan(vm)
    if acks is None:
        acks = acknowledged_writes(vm)
    newest: dict[int, int] = {}
    for ack in acks:
        newest[ack.off] = ack.seq
    with guest_view(image, fmt) as view:
        scan = _scan(view, vm)
    problems = list(scan.problems)
    newer = 0
    for off, seq in sorted(scan.states.items()):
        want = newest.get(off)
        if want is None:
            continue
        if seq is None:
            problems.append(f"LOST: block at {off} holds no write, but write {want} to it was "
                            "acknowledged")
        elif seq < want:
            problems.append(f"LOST: block at {off} holds write {seq}, but write {want} to it "
                            "was acknowledged")
        elif seq > want:
            newer += 1
    result = Verified(image=image, writes=len(acks), newest=acks[-1].seq if acks else -1,
                      slots=plan.slots,
                      written=sum(1 for s in scan.states.values() if s is not None),
                      newer=newer, blocks=scan.size // BLOCK)
    _fail(f"{image} after {result.writes} acknowledged writes (newest {result.newest})",
          problems)
    return result


@dataclass(frozen=True)
class PointInTime:
    image: str
    seq: int  # the image is the guest's disk right after write ``seq`` (-1: before any)
    blocks: int

    def __str__(self) -> str:
        return (f"{self.image} is the guest's disk right after write {self.seq} "
                f"({self.blocks} blocks checked)")


def _write(seq: int | None) -> str:
    return "no write" if seq is None else f"write {seq}"


def point_in_time(vm: VM, image: str, *, fmt: str | None = None) -> PointInTime:
    """Prove that ``image`` is the guest's disk as it was right after one write k: every
    write up to k is there (unless a later one up to k overwrote it), none after k, and
    every other block is as the VM was created. Raises `LostWrites` otherwise."""
    plan = _plan(vm)
    with guest_view(image, fmt) as view:
        scan = _scan(view, vm)
    problems = list(scan.problems)
    seqs = [s for s in scan.states.values() if s is not None]
    k = max(seqs, default=-1)
    expected = plan.latest(k) if k >= 0 else {}
    for off, seq in sorted(scan.states.items()):
        want = expected.get(off)
        if seq != want:
            problems.append(f"block at {off} holds {_write(seq)}, but the disk right after "
                            f"write {k} has {_write(want)} there")
    _fail(f"{image} is no point-in-time copy of the guest's disk", problems)
    return PointInTime(image=image, seq=k, blocks=scan.size // BLOCK)
