"""Destinations other than a file next to the VM, and the fixtures that make them: an NBD
export (qemu-nbd serving a raw file, on TCP or a Unix socket) and a small file system (a
tmpfs under the allowed root) for copies that must not fit."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest

from support.agents import free_port
from support.vms import VM, parse_size


class NbdServer:
    """qemu-nbd serving a raw file of the disk's size, on 127.0.0.1:PORT or a Unix socket."""

    def __init__(self, workdir: str, size: int, *, unix: bool):
        self.dir = os.path.join(workdir, f"nbd-{uuid.uuid4().hex[:4]}")
        os.mkdir(self.dir)
        os.chmod(self.dir, 0o755)
        self.image = os.path.join(self.dir, "export.raw")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", self.image, str(size)],
                       check=True)
        self.pidfile = os.path.join(self.dir, "qemu-nbd.pid")
        where: list[str]
        if unix:
            self.socket = os.path.join(self.dir, "nbd.sock")
            where = ["-k", self.socket]
            self.uri = f"nbd+unix:///exp?socket={self.socket}"
            self.allowed = self.dir
        else:
            port = free_port()
            where = ["-b", "127.0.0.1", "-p", str(port)]
            self.uri = f"nbd://127.0.0.1:{port}/exp"
            self.allowed = f"127.0.0.1:{port}"
        # --persistent: QEMU reconnects (an abort, a retry) without the server exiting;
        # --shared=0: any number of clients (the agent's size check, then QEMU).
        subprocess.run(["qemu-nbd", "--fork", "--persistent", "--shared=0", "-f", "raw",
                        "-x", "exp", "--pid-file", self.pidfile, *where, self.image],
                       check=True, env={**os.environ, "PATH": os.environ["PATH"]})
        if unix:  # QEMU runs as libvirt-qemu: it must be allowed to connect
            os.chmod(self.socket, 0o777)

    def stop(self) -> None:
        try:
            with open(self.pidfile) as f:
                pid = int(f.read())
        except (OSError, ValueError):
            return
        subprocess.run(["kill", str(pid)], check=False)


@pytest.fixture
def nbd() -> Iterator[Callable[..., NbdServer]]:
    """``make(vm, *, unix)``: an NBD export of 64 MiB in ``vm``'s directory; stopped at
    teardown."""
    servers: list[NbdServer] = []

    def make(vm: VM, *, unix: bool) -> NbdServer:
        server = NbdServer(vm.workdir, parse_size("64M"), unix=unix)
        servers.append(server)
        return server
    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def small_fs() -> Iterator[Callable[[str], str]]:
    """``make(size)``: a small tmpfs under the allowed root, its path. Mount it BEFORE the
    test's VM starts: QEMU runs in a private mount namespace (libvirt's default) that would
    not see a later mount. Unmounted and removed at teardown."""
    mounts: list[str] = []

    def make(size: str) -> str:
        path = f"/var/lib/libvirt/images/bct-tmpfs-{uuid.uuid4().hex[:6]}"
        os.mkdir(path)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
                       check=True)
        mounts.append(path)
        return path
    yield make
    for path in mounts:
        if subprocess.run(["umount", path]).returncode != 0:
            subprocess.run(["umount", "-l", path], check=True)
        os.rmdir(path)
