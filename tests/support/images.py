"""Disk images as qemu-img and a hash see them: guest-visible content compared or digested
(a copy is right when its guest view is the source's), and image metadata (format, backing
file). `-U` everywhere: a running VM may hold a lock on the image."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from typing import Any


def _run(*cmd: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def qemu_img_compare(a: str, b: str) -> subprocess.CompletedProcess[str]:
    """Compare the guest-visible content of two images (0: identical, 1: different)."""
    return subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True, text=True)


def assert_identical(a: str, b: str) -> None:
    result = qemu_img_compare(a, b)
    assert result.returncode == 0, result.stdout + result.stderr


def qemu_img_info(path: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(_run("qemu-img", "info", "-U", "--output=json", path))
    return info


def backing_chain(path: str) -> list[dict[str, Any]]:
    """`qemu-img info` of the image and of each of its backing files, top first."""
    chain: list[dict[str, Any]] = json.loads(
        _run("qemu-img", "info", "-U", "--backing-chain", "--output=json", path))
    return chain


def image_digest(path: str, fmt: str | None = None) -> str:
    """sha256 of the full guest-visible content of an image (its backing chain merged).

    Converts to a sparse raw temp file and hashes it: exact, and fast enough for
    1 GiB (zeros stay holes).
    """
    with tempfile.TemporaryDirectory(
        prefix="bct-digest-", dir=os.environ.get("TMPDIR", "/var/tmp")
    ) as tmp:
        raw = os.path.join(tmp, "disk.raw")
        _run("qemu-img", "convert", "-U", *(["-f", fmt] if fmt else []), "-O", "raw", path, raw)
        return file_sha256(raw)


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes as they are (not its guest view)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
