"""The agent's image client (qemu-img, and the in-process reader of guest views) as an
interface, with the plain data and errors that cross it. Re-exported by ``model.ports``.
Pure: no I/O."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from blockcopy.model.inventory import BackingImage


class ImageError(Exception):
    """qemu-img failed, or an image cannot be read as asked; ``str()`` says why."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int
    actual_size: int  # bytes allocated on the storage
    backing: str | None = None  # as recorded in the image (may be relative)
    encrypted: bool = False  # LUKS (qcow2 with encryption, or a raw LUKS container)


@dataclasses.dataclass(frozen=True)
class DataMap:
    """Where an image's guest view holds data (its backing chain included)."""

    size: int  # the guest-visible size
    data: tuple[tuple[int, int], ...]  # (offset, length) of the extents that hold data


class Images(Protocol):
    """What the agent asks of qemu-img, for the images it prepares itself (a destination
    rebased onto a deeper base, the lower images of a chain move). Never writes an image
    that QEMU may write: those are only read (the checks at the switch, read-only and
    shared, without locks)."""

    async def info(self, path: str) -> ImageInfo: ...

    async def create(self, path: str, *, format: str, size: int, backing: str | None = None,
                     backing_format: str | None = None) -> None:
        """A new image; ``backing`` as written into it (relative to its directory, or
        absolute)."""

    async def rebase(self, path: str, *, backing: str, backing_format: str) -> None:
        """Safe rebase: writes into ``path`` what differs between its old and new backing."""

    async def copy_layer(self, source: str, dest: str, *, format: str,
                         backing: str | None = None, backing_format: str | None = None) -> None:
        """Copy one layer's own data into the existing ``dest`` (qemu-img convert -n -B)."""

    async def identical(self, a: str, b: str, *, format: str) -> str | None:
        """None when both images' guest views are identical, else why not."""

    async def export_size(self, uri: str) -> int:
        """The size of a network export (an NBD URI)."""

    async def backing_chain(self, path: str) -> list[str]:
        """The backing images of ``path``, nearest first, as resolved paths (read shared:
        the image may be open by a running QEMU)."""

    async def backing_images(self, path: str) -> list[BackingImage]:
        """``backing_chain`` with each image's format."""

    async def data_map(self, path: str, *, format: str) -> DataMap:
        """Where the guest view of an image in use holds data (qemu-img map -U)."""

    async def read_blocks(self, path: str, *, format: str, offsets: Sequence[int],
                          length: int) -> list[bytes]:
        """The guest view of an image in use at ``offsets`` (``length`` bytes each, fewer
        at the end of the disk), read-only and without locks. ImageError when the image
        cannot be read so (compressed clusters, encryption, an unknown feature...)."""

    async def compare_in_use(self, a: str, b: str, *, format_a: str, format_b: str,
                             timeout: float) -> str | None:
        """qemu-img compare of two images in use (no locks): None when the guest views are
        identical, else where they first differ. ImageError when it fails or times out."""
