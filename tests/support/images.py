"""Disk images as qemu-img and a hash see them: guest-visible content compared or digested
(a copy is right when its guest view is the source's), and image metadata (format, backing
file). `-U` everywhere: a running VM may hold a lock on the image.

An encrypted (LUKS) image is opened with its passphrase: ``Luks(passphrase)`` gives the
arguments (``--object secret`` and ``--image-opts``) every qemu-img/qemu-io call needs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any


def _run(*cmd: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


@dataclass(frozen=True)
class Luks:
    """The passphrase of LUKS images (qcow2 with encrypt.format=luks, or raw LUKS
    containers), as QEMU's tools take it: one secret object, images named by options."""

    passphrase: str
    secret_id: str = "sec0"

    def secret(self) -> list[str]:
        return ["--object", f"secret,id={self.secret_id},data={self.passphrase}"]

    def image(self, path: str, fmt: str) -> str:
        """``--image-opts`` of ``path``: qcow2 (LUKS inside) or luks (a raw container)."""
        if fmt == "qcow2":
            return f"driver=qcow2,file.filename={path},encrypt.key-secret={self.secret_id}"
        if fmt in ("luks", "raw"):
            return f"driver=luks,file.filename={path},key-secret={self.secret_id}"
        raise ValueError(f"no LUKS image of format {fmt}")

    def create(self, path: str, fmt: str, size: int) -> None:
        """A new LUKS image (qcow2 with LUKS inside, or a raw LUKS container), its key
        derived in 10 ms of CPU instead of 2 s: every open with the passphrase costs that.
        QEMU 7.2 times the derivation by the thread's user CPU time and fails at once when a
        round measured 0 ms ("Unable to get accurate CPU usage", often on a loaded host):
        made again then."""
        options = f"encrypt.format=luks,encrypt.key-secret={self.secret_id}," \
            "encrypt.iter-time=10" if fmt == "qcow2" else \
            f"key-secret={self.secret_id},iter-time=10"
        cmd = ("qemu-img", "create", "-q", *self.secret(),
               "-f", "qcow2" if fmt == "qcow2" else "luks", "-o", options, path, str(size))
        for attempt in range(8):
            try:
                _run(*cmd)
                return
            except RuntimeError as exc:
                if "Unable to get accurate CPU usage" not in str(exc) or attempt == 7:
                    raise
                time.sleep(0.2)

    def qemu_io(self, path: str, fmt: str, *commands: str) -> None:
        _run("qemu-io", *self.secret(), "--image-opts", self.image(path, fmt),
             *[arg for c in commands for arg in ("-c", c)])


def qemu_img_compare(a: str, b: str, *, luks: Luks | None = None, a_format: str = "qcow2",
                     b_format: str = "qcow2") -> subprocess.CompletedProcess[str]:
    """Compare the guest-visible content of two images (0: identical, 1: different); with
    ``luks``, both are LUKS images of that passphrase, of the formats given."""
    if luks is None:
        return subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True,
                              text=True)
    return subprocess.run(["qemu-img", "compare", "-U", *luks.secret(), "--image-opts",
                           luks.image(a, a_format), luks.image(b, b_format)],
                          capture_output=True, text=True)


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


def image_digest(path: str, fmt: str | None = None, *, luks: Luks | None = None) -> str:
    """sha256 of the full guest-visible content of an image (its backing chain merged);
    with ``luks``, a LUKS image of format ``fmt`` (qcow2, or raw/luks) opened with it.

    Converts to a sparse raw temp file and hashes it: exact, and fast enough for
    1 GiB (zeros stay holes).
    """
    with tempfile.TemporaryDirectory(
        prefix="bct-digest-", dir=os.environ.get("TMPDIR", "/var/tmp")
    ) as tmp:
        raw = os.path.join(tmp, "disk.raw")
        if luks is not None:
            _run("qemu-img", "convert", "-U", *luks.secret(), "--image-opts",
                 luks.image(path, fmt or "qcow2"), "-O", "raw", raw)
        else:
            _run("qemu-img", "convert", "-U", *(["-f", fmt] if fmt else []), "-O", "raw",
                 path, raw)
        return file_sha256(raw)


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes as they are (not its guest view)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
