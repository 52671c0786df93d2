"""socat proxies, for outages that touch no one else: in front of the API server (`TcpProxy`)
the shared kube-apiserver keeps running for every other test and session, while an agent
given `kubeconfig_through(proxy)` loses it when the test kills the proxy (open connections
reset, new ones refused) and finds it again when the test restarts the proxy, on the same
port; in front of libvirtd (`UnixProxy`, the agent given ``qemu+unix:///system?socket=...``)
likewise, libvirtd untouched."""

from __future__ import annotations

import os
import pathlib
import random
import signal
import socket
import subprocess
from urllib.parse import urlsplit

import yaml

from support.paths import KUBECONFIG
from support.waits import wait_for


def _port_outside_ephemeral_range() -> int:
    """A free port that no outgoing connection can take while the proxy is down (the kernel
    picks those from ip_local_port_range)."""
    low, high = (int(x) for x in
                 pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    candidates = [p for p in range(20000, 32000) if not low <= p <= high]
    for port in random.sample(candidates, 50):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for the proxy")


def _accepts(address: tuple[str, int] | str) -> bool:
    """A TCP (host, port) or a Unix socket's path accepts a connection."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    try:
        with socket.socket(family) as s:
            s.settimeout(1)
            s.connect(address)
            return True
    except OSError:
        return False


class Socat:
    """socat from ``listen`` to ``connect`` (socat's addresses) that forks a child per
    connection; `kill()` cuts every connection at once, `start()` (again) listens anew."""

    def __init__(self, listen: str, connect: str, address: tuple[str, int] | str):
        self.command = ["socat", listen, connect]
        self.address = address  # where it listens
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Socat:
        proc = self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: _accepts(self.address) or proc.poll() is not None, 10,
                 what=f"the proxy on {self.address}")
        assert proc.poll() is None, f"socat on {self.address} exited: {proc.returncode}"
        return self

    def kill(self) -> None:
        """SIGKILL socat and its forked children (one per connection: the group it leads)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone, children included
        self.proc.wait(10)


class TcpProxy(Socat):
    """From 127.0.0.1:``port`` (a port of its own, the same on every start) to ``target``
    (host, port)."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.port = target, _port_outside_ephemeral_range()
        host, port = target
        super().__init__(f"TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr",
                         f"TCP:{host}:{port}", ("127.0.0.1", self.port))


class UnixProxy(Socat):
    """From the Unix socket ``sock`` to the one at ``target`` (libvirtd's by default)."""

    def __init__(self, sock: str, target: str = "/var/run/libvirt/libvirt-sock"):
        self.sock = sock
        super().__init__(f"UNIX-LISTEN:{sock},fork,unlink-early", f"UNIX-CONNECT:{target}",
                         sock)


def api_server(kubeconfig: pathlib.Path | str = KUBECONFIG) -> tuple[str, int]:
    """(host, port) of the API server of a kubeconfig's current context."""
    config = yaml.safe_load(pathlib.Path(kubeconfig).read_text())
    context = next(c["context"] for c in config["contexts"]
                   if c["name"] == config["current-context"])
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    url = urlsplit(cluster["server"])
    return url.hostname, url.port or 443


def kubeconfig_through(proxy: TcpProxy, path: pathlib.Path,
                       kubeconfig: pathlib.Path | str = KUBECONFIG) -> pathlib.Path:
    """A copy of ``kubeconfig`` whose server is the proxy (same host name, so the server's
    certificate still matches)."""
    config = yaml.safe_load(pathlib.Path(kubeconfig).read_text())
    for cluster in config["clusters"]:
        url = urlsplit(cluster["cluster"]["server"])
        cluster["cluster"]["server"] = f"{url.scheme}://{url.hostname}:{proxy.port}"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path
