"""The agent as a real process, the one way every test (and hack/demo.py, hack/benchmark.py)
starts it: its environment, arguments and log file, `start()` returning once the agent logged
"agent ready" (logged only after its liveness port is bound), `stop(sig)`, `log()`. The
fault-injecting launcher (tests/e2e/faulty_agent.py) is just another entry script."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Mapping, Sequence

from support.paths import KUBECONFIG, TESTS
from support.waits import wait_for

# What follows the Python interpreter on the command line.
BLOCKCOPY = ("-m", "blockcopy")  # the agent as shipped (`python -m blockcopy`)
# FAULT INJECTION: the real agent with its first pivots refused (env FAULT_PIVOT_REFUSALS),
# then, on request, killed (FAULT_KILL_BEFORE_PIVOT=1) or delayed (FAULT_PIVOT_DELAY=S) there.
FAULTY = (str(TESTS / "e2e" / "faulty_agent.py"),)


class Agent:
    """`blockcopy-operator` (or another entry script) as a process of its own session,
    logging to a file, with ``NODE_NAME=node`` and ``KUBECONFIG=kubeconfig``."""

    def __init__(self, node: str, log_path: pathlib.Path, *, args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None,
                 kubeconfig: pathlib.Path | str = KUBECONFIG,
                 entry: Sequence[str] = BLOCKCOPY):
        self.node, self.log_path = node, pathlib.Path(log_path)
        self.env = {**os.environ, **(env or {}), "KUBECONFIG": str(kubeconfig),
                    "NODE_NAME": node}
        # No in-cluster service environment may take precedence over the kubeconfig.
        self.env.pop("KUBERNETES_SERVICE_HOST", None)
        self.command = [sys.executable, *entry, *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Agent:
        with open(self.log_path, "ab") as log:
            proc = self.proc = subprocess.Popen(self.command, env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: "agent ready" in self.log() or proc.poll() is not None,
                 timeout, what=f"agent {self.node} to start")
        assert proc.poll() is None, f"agent exited early:\n{self.log()}"
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (other agents on this machine use ports too);
    nothing listens on it once this returns."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of an agent's HTTP endpoint (/healthz, /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return resp.status, resp.read().decode()
