"""The container image: hack/build-image.sh builds the Dockerfile with buildah on the local base
image (hack/make-base-image.sh) and runs `blockcopy-operator --help` inside the result.

Always runs. It stays fast because of caches that survive between runs on a machine: the
debootstrap tarball and the base image (made once, about 30 s), and buildah's layer cache
(dependencies are a layer of their own, so an unchanged pyproject.toml skips the libvirt-python
build; a source change redoes only the last builder step and the final COPY)."""

from __future__ import annotations

import re
import subprocess
import time

from support.paths import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_dockerfile_shape():
    lines = [line.strip() for line in DOCKERFILE.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms == ["FROM ${BASE_IMAGE} AS builder", "FROM ${BASE_IMAGE}"]
    assert lines[0] == "ARG BASE_IMAGE=debian:bookworm-slim"  # before any FROM: both use it
    assert lines[-1] == "COPY --from=builder /opt/blockcopy /opt/blockcopy"
    assert 'ENTRYPOINT ["blockcopy-operator"]' in lines
    final = DOCKERFILE.split("FROM ${BASE_IMAGE}\n", 1)[1]
    assert "--no-install-recommends" in final and "libvirt0" in final
    assert "qemu-utils" in final  # qemu-img: the agent reads images with it
    for build_only in ("gcc", "libvirt-dev", "python3-dev", "pkg-config"):
        assert not re.search(rf"\b{build_only}\b", final), build_only
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".local", ".git", ".pytest_cache", ".ruff_cache", ".hypothesis"} <= set(
        ignored)


def test_build_image_and_run_help():
    started = time.monotonic()
    proc = subprocess.run([str(ROOT / "hack" / "build-image.sh")], capture_output=True,
                          text=True, timeout=1800)
    took = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "usage: blockcopy-operator" in proc.stdout, out[-3000:]
    assert "--allowed-path" in proc.stdout and "--liveness-port" in proc.stdout
    assert re.search(r"runtime packages: .*libvirt0=\S+", proc.stdout), out[-3000:]
    assert re.search(r"runtime packages: .*qemu-utils=\S+", proc.stdout), out[-3000:]
    assert "qemu-img in the image: qemu-img version" in proc.stdout, out[-3000:]
    assert "image config: entrypoint=[blockcopy-operator] user=0:0" in proc.stdout
    size = re.search(r"image localhost/blockcopy-operator:dev size: (.+)", proc.stdout)
    assert size, out[-3000:]
    print(f"image size {size.group(1)}; build + smoke test took {took:.0f} s")
