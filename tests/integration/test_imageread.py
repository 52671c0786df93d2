"""The in-process reader of guest views (blockcopy.adapters.imageread) against QEMU's own:
random qemu-io writes into 2-layer chains (qcow2 over qcow2 or raw, v2 and v3, clusters of
1 KiB, 64 KiB and 2 MiB, zero clusters, a relative backing name, a backing format probed
when not recorded) read exactly as `qemu-img convert -O raw` flattens them; and what it must
refuse (compressed clusters, encryption, extended L2, an external data file, the corrupt
bit, an unknown incompatible feature) refused."""

from __future__ import annotations

import asyncio
import random
import struct
import subprocess
from pathlib import Path

import pytest

from blockcopy.adapters import imageread
from blockcopy.adapters.qemuimg import QemuImg
from blockcopy.model.ports import ImageError
from support.images import Luks

pytestmark = pytest.mark.integration

SIZE = 8 << 20


def run(*args: str, cwd: Path | None = None) -> None:
    result = subprocess.run(args, capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, f"{args} exited {result.returncode}: {result.stderr}"


def qemu_io(path: Path, fmt: str, commands: list[str]) -> None:
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    run(*args, str(path))


def random_writes(rng: random.Random, count: int, *, zeros: bool) -> list[str]:
    commands = []
    for _ in range(count):
        offset = rng.randrange(0, SIZE - 300_000) // 512 * 512
        length = rng.randrange(1, 600) * 512
        if zeros and rng.random() < 0.3:
            commands.append(f"write -z {offset} {length}")
        else:
            commands.append(f"write -P {rng.randrange(1, 256)} {offset} {length}")
    return commands


def flattened(path: Path, fmt: str, tmp: Path) -> bytes:
    out = tmp / f"{path.name}.flat"
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out))
    return out.read_bytes()


def read_all(path: Path, fmt: str, block: int = 4096) -> bytes:
    with imageread.GuestImage(str(path), fmt) as image:
        assert image.size == SIZE
        return b"".join(image.read(off, block) for off in range(0, image.size, block))


@pytest.mark.parametrize("cluster", [1024, 65536, 2 << 20])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("base_format", ["qcow2", "raw"])
def test_a_random_two_layer_chain_reads_as_qemu_flattens_it(tmp_path, cluster, compat,
                                                            base_format):
    rng = random.Random(f"{cluster}-{compat}-{base_format}")
    base = tmp_path / f"base.{base_format}"
    options = ["-o", f"cluster_size={cluster},compat={compat}"]
    run("qemu-img", "create", "-q", "-f", base_format,
        *(options if base_format == "qcow2" else []), str(base), str(SIZE))
    qemu_io(base, base_format, random_writes(rng, 40, zeros=base_format == "qcow2"))
    (tmp_path / "top").mkdir()
    top = tmp_path / "top" / "top.qcow2"
    # A relative backing name, resolved from the overlay's directory.
    run("qemu-img", "create", "-q", "-f", "qcow2", *options, "-b", f"../{base.name}",
        "-F", base_format, str(top), cwd=tmp_path / "top")
    qemu_io(top, "qcow2", random_writes(rng, 40, zeros=True))
    expected = flattened(top, "qcow2", tmp_path)
    assert read_all(top, "qcow2") == expected
    # Unaligned reads across cluster boundaries too.
    with imageread.GuestImage(str(top), "qcow2") as image:
        for _ in range(200):
            offset, length = rng.randrange(SIZE), rng.randrange(1, 3 * cluster)
            assert image.read(offset, length) == expected[offset:offset + length]
    # The agent's call: blocks at offsets, the last one past the end read short.
    offsets = [0, 4096 * 7, SIZE - 4096]
    blocks = asyncio.run(QemuImg().read_blocks(str(top), format="qcow2", offsets=offsets,
                                               length=4096))
    assert blocks == [expected[o:o + 4096] for o in offsets]


def test_zero_clusters_over_data_read_as_zeros(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE))
    qemu_io(base, "qcow2", [f"write -P 7 0 {SIZE}"])
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top),
        cwd=tmp_path)
    qemu_io(top, "qcow2", ["write -z 65536 131072", "write -z -u 1048576 65536"])
    data = read_all(top, "qcow2")
    assert data == flattened(top, "qcow2", tmp_path)
    assert data[65536:196608] == bytes(131072) and data[:65536] == b"\x07" * 65536


def test_a_backing_format_not_recorded_is_probed(tmp_path):
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "raw", str(base), str(SIZE))
    qemu_io(base, "raw", ["write -P 3 0 1M"])
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", str(top),
        cwd=tmp_path)
    expected = flattened(top, "qcow2", tmp_path)
    header = bytearray(top.read_bytes()[:65536])
    at = header.find(struct.pack(">I", imageread.EXT_BACKING_FORMAT))
    assert at > 0
    header[at:at + 4] = struct.pack(">I", 0x12345678)  # an unknown, ignorable extension
    with open(top, "r+b") as f:
        f.write(header)
    assert read_all(top, "qcow2") == expected


def test_a_backing_image_smaller_than_its_overlay_reads_zeros_past_its_end(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M")
    qemu_io(base, "qcow2", ["write -P 9 0 1M"])
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top),
        str(SIZE), cwd=tmp_path)
    assert read_all(top, "qcow2") == flattened(top, "qcow2", tmp_path)


def set_incompatible(path: Path, bits: int) -> None:
    with open(path, "r+b") as f:
        f.seek(72)
        value = struct.unpack(">Q", f.read(8))[0] | bits
        f.seek(72)
        f.write(struct.pack(">Q", value))


def test_refusals(tmp_path):
    plain = tmp_path / "plain.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(plain), str(SIZE))
    qemu_io(plain, "qcow2", ["write -P 5 0 2M"])

    compressed = tmp_path / "compressed.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(plain), str(compressed))
    with pytest.raises(ImageError, match="compressed cluster"):
        read_all(compressed, "qcow2")

    encrypted = tmp_path / "luks.qcow2"
    Luks("secret").create(str(encrypted), "qcow2", 1 << 20)  # retries QEMU 7.2's 0 ms PBKDF
    with pytest.raises(ImageError, match="encrypted"):
        imageread.GuestImage(str(encrypted), "qcow2")

    extended = tmp_path / "extended.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(extended), "1M")
    with pytest.raises(ImageError, match="extended L2"):
        imageread.GuestImage(str(extended), "qcow2")

    external = tmp_path / "external.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        f"data_file={tmp_path / 'external.raw'}", str(external), "1M")
    with pytest.raises(ImageError, match="external data file"):
        imageread.GuestImage(str(external), "qcow2")

    corrupt = tmp_path / "corrupt.qcow2"
    run("cp", str(plain), str(corrupt))
    set_incompatible(corrupt, imageread.CORRUPT)
    with pytest.raises(ImageError, match="marked corrupt"):
        imageread.GuestImage(str(corrupt), "qcow2")

    unknown = tmp_path / "unknown.qcow2"
    run("cp", str(plain), str(unknown))
    set_incompatible(unknown, 1 << 10)
    with pytest.raises(ImageError, match="incompatible features 0x400"):
        imageread.GuestImage(str(unknown), "qcow2")

    with pytest.raises(ImageError, match="format 'vmdk'"):
        imageread.GuestImage(str(plain), "vmdk")
    with pytest.raises(ImageError, match="cannot open"):
        imageread.GuestImage(str(tmp_path / "missing.qcow2"), "qcow2")
    # The image that was fine reads fine.
    assert read_all(plain, "qcow2") == flattened(plain, "qcow2", tmp_path)


def test_data_map_and_compare_in_use(tmp_path):
    """qemu-img map -U and compare without locks, on images a writer holds locked."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.raw"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(a), str(SIZE))
    qemu_io(a, "qcow2", ["write -P 1 1M 64k", "write -z 2M 64k"])
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(a), str(b))
    images = QemuImg()
    mapped = asyncio.run(images.data_map(str(a), format="qcow2"))
    assert mapped.size == SIZE and mapped.data == ((1 << 20, 65536),)
    # A process holding both images open for writing (as QEMU does, with its locks).
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(a)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert asyncio.run(images.compare_in_use(str(a), str(b), format_a="qcow2",
                                                 format_b="raw", timeout=30)) is None
        qemu_io(b, "raw", ["write -P 2 3M 4k"])
        differ = asyncio.run(images.compare_in_use(str(a), str(b), format_a="qcow2",
                                                   format_b="raw", timeout=30))
        assert differ is not None and str(3 << 20) in differ
    finally:
        holder.communicate(b"quit\n", timeout=30)
