"""qemu-img, for the images the agent prepares itself (``ports.Images``): a destination
rebased onto a deeper base, the placeholders and lower images of a chain move, the size of
an NBD export. Each call is one qemu-img process; none that writes uses -U (force-share),
which would hide a concurrent writer: these images are either the agent's own or backing
images that QEMU opens read-only and shares for reading. The checks at the switch read the
images in use without locks (-U, file.locking=off, ``adapters.imageread``) and write nothing."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Sequence

from blockcopy.adapters import imageread
from blockcopy.model.inventory import BackingImage
from blockcopy.model.ports import DataMap, ImageError, ImageInfo

log = logging.getLogger(__name__)

# An NBD server that accepts the connection and never answers keeps qemu-img waiting for
# good (it has no handshake timeout); the agent starts copies one at a time, so it would
# wait with it. The size of an export is asked for once, before the copy: a few seconds.
NBD_PROBE_TIMEOUT = 20.0


async def _start(*args: str, cwd: str | None = None) -> asyncio.subprocess.Process:
    """qemu-img with ``args``; a node (or image) without it is an ImageError, which the
    callers turn into a refusal or an unverified check, never a crashed follower."""
    try:
        return await asyncio.create_subprocess_exec(
            "qemu-img", *args, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise ImageError("qemu-img is not installed where the agent runs (Debian: "
                         "qemu-utils)") from None


async def _run(*args: str, cwd: str | None = None, timeout: float | None = None) -> str:
    proc = await _start(*args, cwd=cwd)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ImageError(f"qemu-img {args[0]} got no answer within {timeout:g} s") from None
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip() or out.decode(errors="replace").strip()
        raise ImageError(f"qemu-img {args[0]} failed: {message}")
    return out.decode(errors="replace")


class QemuImg:
    async def info(self, path: str) -> ImageInfo:
        # Probed (no -f): a raw LUKS container shows as format luks only so.
        data = json.loads(await _run("info", "--output=json", path))
        return ImageInfo(format=data["format"], virtual_size=int(data["virtual-size"]),
                         actual_size=int(data.get("actual-size") or 0),
                         backing=data.get("backing-filename"),
                         encrypted=bool(data.get("encrypted")) or data["format"] == "luks")

    async def create(self, path: str, *, format: str, size: int, backing: str | None = None,
                     backing_format: str | None = None) -> None:
        args = ["create", "-q", "-f", format]
        if backing is not None:
            args += ["-b", backing, "-F", backing_format or "qcow2"]
        # Relative backing names are resolved from the new image's directory.
        await _run(*args, path, str(size), cwd=os.path.dirname(path))

    async def rebase(self, path: str, *, backing: str, backing_format: str) -> None:
        await _run("rebase", "-q", "-f", "qcow2", "-b", backing, "-F", backing_format, path,
                   cwd=os.path.dirname(path))

    async def copy_layer(self, source: str, dest: str, *, format: str,
                         backing: str | None = None, backing_format: str | None = None) -> None:
        args = ["convert", "-n", "-f", format, "-O", format]
        if backing is not None:
            args += ["-B", backing, "-F", backing_format or "qcow2"]
        await _run(*args, source, dest, cwd=os.path.dirname(dest))

    async def identical(self, a: str, b: str, *, format: str) -> str | None:
        proc = await _start("compare", "-f", format, "-F", format, a, b)
        out, err = await proc.communicate()
        if proc.returncode == 0:
            return None
        text = (out + err).decode(errors="replace").strip()
        if proc.returncode == 1:
            return text or "the images differ"
        raise ImageError(f"qemu-img compare failed: {text}")

    async def backing_chain(self, path: str) -> list[str]:
        return [image.path for image in await self.backing_images(path)]

    async def backing_images(self, path: str) -> list[BackingImage]:
        # -U: the image may be open by a running QEMU; only its header chain is read.
        data = json.loads(await _run("info", "-U", "--backing-chain", "--output=json", path))
        return [BackingImage(os.path.realpath(layer["filename"]), layer.get("format"))
                for layer in data[1:]]

    async def export_size(self, uri: str) -> int:
        data = json.loads(await _run("info", "--output=json", "-f", "raw", uri,
                                     timeout=NBD_PROBE_TIMEOUT))
        return int(data["virtual-size"])

    async def data_map(self, path: str, *, format: str) -> DataMap:
        entries = json.loads(await _run("map", "-U", "--output=json", "-f", format, path,
                                        timeout=60.0))
        size = max((int(e["start"]) + int(e["length"]) for e in entries), default=0)
        return DataMap(size=size, data=tuple(
            (int(e["start"]), int(e["length"])) for e in entries
            if e.get("data") and not e.get("zero")))

    async def read_blocks(self, path: str, *, format: str, offsets: Sequence[int],
                          length: int) -> list[bytes]:
        return await asyncio.to_thread(imageread.read_blocks, path, format, offsets, length)

    async def compare_in_use(self, a: str, b: str, *, format_a: str, format_b: str,
                             timeout: float) -> str | None:
        # The mirror keeps its target locked (and QEMU its source): read both without locks.
        opts = [f"driver={fmt},file.driver={_protocol(path)},file.filename={_opt(path)},"
                "file.locking=off" for path, fmt in ((a, format_a), (b, format_b))]
        proc = await _start("compare", "--image-opts", *opts)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ImageError(f"qemu-img compare took more than {timeout:g} s") from None
        text = (out + err).decode(errors="replace").strip()
        if proc.returncode == 0:
            return None
        if proc.returncode == 1:
            return text or "the images differ"
        raise ImageError(f"qemu-img compare failed: {text}")


def _protocol(path: str) -> str:
    return "host_device" if path.startswith("/dev/") else "file"


def _opt(path: str) -> str:
    """A path as a value of --image-opts (a comma is written twice)."""
    return path.replace(",", ",,")

