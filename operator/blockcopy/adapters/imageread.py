"""The guest's view of an image in use, read in-process: raw by ``pread``, qcow2 (v2 and v3)
through its L1/L2 tables, zero clusters and backing chain. For the check at the switch
(``agent.verifier``): a thousand 4-KiB reads of two images within a paused guest's few
milliseconds, where a qemu-img process per read would take seconds.

Read-only, no locks (QEMU holds them: the images are open by the running VM). What this
reader does not understand it refuses (``ImageError``) rather than guess: compressed
clusters, encryption, extended L2 entries, an external data file, an image marked corrupt,
an incompatible feature it does not know. Reading the cached metadata of a qcow2 image
that QEMU has open is right only after QEMU flushed it (``core.verify.needs_flush``).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from blockcopy.model.images import ImageError

QCOW2_MAGIC = b"QFI\xfb"
MAX_CHAIN = 64
# qcow2 header extensions
EXT_END, EXT_BACKING_FORMAT, EXT_DATA_FILE = 0, 0xE2792ACA, 0x44415441
# incompatible feature bits
DIRTY, CORRUPT, DATA_FILE, COMPRESSION_TYPE, EXTENDED_L2 = (1 << n for n in range(5))
KNOWN_INCOMPATIBLE = DIRTY | CORRUPT | DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2
OFFSET_MASK = 0x00FFFFFFFFFFFE00
COMPRESSED = 1 << 62
ZERO = 1


def probe_format(path: str) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"


class GuestImage:
    """One image (and, for qcow2, its backing chain) open for reading its guest view."""

    def __init__(self, path: str, fmt: str, *, depth: int = 0):
        if depth > MAX_CHAIN:
            raise ImageError(f"{path}: a backing chain deeper than {MAX_CHAIN} images")
        if fmt not in ("raw", "qcow2"):
            raise ImageError(f"{path}: format {fmt!r} cannot be read here (raw or qcow2)")
        self.path, self.format = path, fmt
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"cannot open {path}: {exc.strerror}") from None
        self.backing: GuestImage | None = None
        try:
            if fmt == "raw":
                self.size = os.lseek(self.fd, 0, os.SEEK_END)
            else:
                self._open_qcow2(depth)
        except BaseException:
            self.close()
            raise

    # -- qcow2 metadata ---------------------------------------------------------------
    def _pread(self, length: int, offset: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise ImageError(f"cannot read {self.path}: {exc.strerror}") from None
        return data + bytes(length - len(data))  # past the end of a file: zeros

    def _open_qcow2(self, depth: int) -> None:
        header = self._pread(112, 0)
        (magic, version, backing_offset, backing_size, cluster_bits, size, crypt,
         l1_size, l1_offset) = struct.unpack(">4sIQIIQIIQ", header[:48])
        if magic != QCOW2_MAGIC:
            raise ImageError(f"{self.path}: not a qcow2 image")
        if version not in (2, 3):
            raise ImageError(f"{self.path}: qcow2 version {version} is not known here")
        if crypt:
            raise ImageError(f"{self.path}: an encrypted qcow2 image is not read here")
        if not 9 <= cluster_bits <= 21:
            raise ImageError(f"{self.path}: cluster bits {cluster_bits} out of range")
        header_length, incompatible = 72, 0
        if version == 3:
            incompatible = struct.unpack(">Q", header[72:80])[0]
            header_length = struct.unpack(">I", header[100:104])[0]
            for bit, what in ((CORRUPT, "marked corrupt"), (DATA_FILE, "an external data file"),
                              (EXTENDED_L2, "extended L2 entries (subclusters)")):
                if incompatible & bit:
                    raise ImageError(f"{self.path}: {what}: not read here")
            if incompatible & ~KNOWN_INCOMPATIBLE:
                raise ImageError(f"{self.path}: incompatible features {incompatible:#x} are "
                                 "not known here")
        self.size, self.cluster_bits = size, cluster_bits
        self.cluster = 1 << cluster_bits
        self.l2_bits = cluster_bits - 3
        self.l1 = struct.unpack(f">{l1_size}Q", self._pread(l1_size * 8, l1_offset))
        self.l2_cache: dict[int, tuple[int, ...]] = {}
        backing_format = self._extensions(header_length)
        if backing_offset and backing_size:
            name = self._pread(backing_size, backing_offset).decode(errors="surrogateescape")
            if "://" in name or name.startswith("json:"):
                raise ImageError(f"{self.path}: backing {name!r} is not a local file")
            path = os.path.join(os.path.dirname(self.path), name)
            try:
                fmt = backing_format or probe_format(path)
            except OSError as exc:
                raise ImageError(f"cannot open backing {path}: {exc.strerror}") from None
            self.backing = GuestImage(path, fmt, depth=depth + 1)

    def _extensions(self, offset: int) -> str | None:
        backing_format = None
        end = min(self.cluster, 1 << 16)
        while offset + 8 <= end:
            kind, length = struct.unpack(">II", self._pread(8, offset))
            if kind == EXT_END:
                break
            if kind == EXT_BACKING_FORMAT:
                backing_format = self._pread(length, offset + 8).decode(errors="replace")
            elif kind == EXT_DATA_FILE:
                raise ImageError(f"{self.path}: an external data file: not read here")
            offset += 8 + (length + 7) // 8 * 8
        return backing_format

    def _l2(self, offset: int) -> tuple[int, ...]:
        table = self.l2_cache.get(offset)
        if table is None:
            entries = self.cluster // 8
            table = struct.unpack(f">{entries}Q", self._pread(self.cluster, offset))
            self.l2_cache[offset] = table
        return table

    # -- reading ----------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the guest view at ``offset`` (zeros past its end)."""
        length = max(0, min(length, self.size - offset)) if offset < self.size else 0
        if self.format == "raw":
            return self._pread(length, offset)
        parts, end = [], offset + length
        while offset < end:
            piece = min(end, (offset | (self.cluster - 1)) + 1) - offset
            parts.append(self._cluster_piece(offset, piece))
            offset += piece
        return b"".join(parts)

    def _cluster_piece(self, offset: int, length: int) -> bytes:
        l1_index = offset >> (self.cluster_bits + self.l2_bits)
        l2_offset = self.l1[l1_index] & OFFSET_MASK if l1_index < len(self.l1) else 0
        entry = 0
        if l2_offset:
            entry = self._l2(l2_offset)[(offset >> self.cluster_bits) &
                                        ((1 << self.l2_bits) - 1)]
        if entry & COMPRESSED:
            raise ImageError(f"{self.path}: a compressed cluster at guest offset {offset}: "
                             "not read here")
        host = entry & OFFSET_MASK
        if entry & ZERO:
            return bytes(length)
        if host:
            return self._pread(length, host + (offset & (self.cluster - 1)))
        if self.backing is not None:
            data = self.backing.read(offset, length)  # short past the backing's end
            return data + bytes(length - len(data))
        return bytes(length)

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()
        os.close(self.fd)

    def __enter__(self) -> GuestImage:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def read_blocks(path: str, fmt: str, offsets: Sequence[int], length: int) -> list[bytes]:
    """The guest view of ``path`` at each of ``offsets`` (blocking: run it in a thread)."""
    with GuestImage(path, fmt) as image:
        return [_padded(image, off, length) for off in offsets]


def _padded(image: GuestImage, offset: int, length: int) -> bytes:
    """A read, as long as the guest-visible part of the block (a backing image smaller than
    its overlay reads zeros past its end)."""
    want = max(0, min(length, image.size - offset))
    data = image.read(offset, want)
    return data + bytes(want - len(data))
