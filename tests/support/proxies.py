"""A TCP proxy (socat) in front of the API server, for outages that touch no one else: the
shared kube-apiserver keeps running for every other test and session, while an agent given
`kubeconfig_through(proxy)` loses it when the test kills the proxy (open connections reset,
new ones refused) and finds it again when the test restarts the proxy, on the same port."""

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


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class TcpProxy:
    """socat from 127.0.0.1:``port`` to ``target`` (host, port); `kill()` cuts every
    connection at once, `start()` (again) listens on the same port."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = _port_outside_ephemeral_range()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> TcpProxy:
        host, port = self.target
        proc = self.proc = subprocess.Popen(
            ["socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr",
             f"TCP:{host}:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: _accepts(self.port) or proc.poll() is not None, 10,
                 what=f"the proxy on port {self.port}")
        assert proc.poll() is None, f"socat on port {self.port} exited: {proc.returncode}"
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
