"""Several hypervisor nodes on one machine (hack/cluster-nodes.sh, `make cluster-nodes`), as
the tests use them: the nodes of .local/nodes.json, bringing them up (idempotent, so a test
never skips), a VM on one node, its agent's log, and stopping / starting / restarting one
node's agent.

Each node is a libvirt session daemon of its own user: its own domains (the same name may
run on two nodes), its QEMU running as that user, its VMs' files under its imagesDir. Its
agent is a long-lived process of the script (not of the test), watching the namespaces the
script was given (``Node.namespaces``; default ``blockcopy-nodes``; empty: all).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from support.paths import HACK, NODES_JSON, STATE
from support.vms import VM, cleanup_all, create_vm
from support.waits import wait_for

SCRIPT = HACK / "cluster-nodes.sh"
DOWN_SCRIPT = HACK / "cluster-nodes-down.sh"
# The labels every node carries (hack/lib/nodes.sh): one per node, a rack per two nodes, and
# one for the whole group.
NODE_LABEL = "blockcopy.dev/sim-node"
RACK_LABEL = "topology.blockcopy.dev/rack"
GROUP_LABEL = "blockcopy.dev/test-node-group"
TAINT_KEY = "blockcopy.dev/simulated"


@dataclass(frozen=True)
class Node:
    """One entry of nodes.json."""

    name: str
    libvirt_uri: str
    images_dir: pathlib.Path
    user: str = ""
    uid: int = -1
    labels: dict[str, str] = field(default_factory=dict)
    namespaces: tuple[str, ...] = ()  # what its agent watches; empty: every namespace
    agent_log: pathlib.Path = pathlib.Path("/dev/null")
    agent_pid_file: pathlib.Path = pathlib.Path("/dev/null")
    libvirtd_log: pathlib.Path = pathlib.Path("/dev/null")

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> Node:
        return cls(name=entry["name"], libvirt_uri=entry["libvirtUri"],
                   images_dir=pathlib.Path(entry["imagesDir"]),
                   user=entry.get("user", ""), uid=int(entry.get("uid", -1)),
                   labels=dict(entry.get("labels") or {}),
                   namespaces=tuple(entry.get("namespaces") or ()),
                   agent_log=pathlib.Path(entry.get("agentLog", "/dev/null")),
                   agent_pid_file=pathlib.Path(entry.get("agentPidFile", "/dev/null")),
                   libvirtd_log=pathlib.Path(entry.get("libvirtdLog", "/dev/null")))

    # ------------------------------------------------------------ VMs

    def create_vm(self, name: str | None = None, **kw: Any) -> VM:
        """A test VM on this node (support.vms.create_vm options); its files under the
        node's imagesDir, owned by the node's user. A full name (``bct-...``) may be used on
        several nodes at once."""
        return create_vm(name, uri=self.libvirt_uri, images_dir=self.images_dir, **kw)

    def cleanup_vms(self) -> list[str]:
        """Every bct- domain of this node and its files (other nodes untouched)."""
        return cleanup_all(self.libvirt_uri, self.images_dir)

    # ------------------------------------------------------------ agent

    def agent_pid(self) -> int | None:
        """The agent's pid, if it runs (the script's pid file, checked against /proc)."""
        try:
            pid = int(self.agent_pid_file.read_text().strip())
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid if f"--node-name\0{self.name}\0".encode() in cmdline else None

    def agent_log_text(self, since: int = 0) -> str:
        """The agent's log (appended to across restarts) from byte ``since`` on."""
        try:
            with open(self.agent_log, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def agent_log_size(self) -> int:
        """Where the log ends now: pass it to ``agent_log_text`` for what comes after."""
        try:
            return self.agent_log.stat().st_size
        except FileNotFoundError:
            return 0

    def stop_agent(self, sig: int = signal.SIGTERM) -> None:
        """Stop the agent (SIGKILL: no cleanup at all, as a crash) and wait until it is gone."""
        _script("stop-agent", self.name, signal.Signals(sig).name.removeprefix("SIG"))
        assert self.agent_pid() is None

    def start_agent(self) -> int:
        """Start the agent again (no-op if it runs); returns once it logged "agent ready"."""
        _script("start-agent", self.name)
        pid = self.agent_pid()
        assert pid is not None, self.agent_log_text()[-4000:]
        return pid

    def restart_agent(self, sig: int = signal.SIGTERM) -> int:
        self.stop_agent(sig)
        return self.start_agent()


CONTROLLER_PID_FILE = STATE / "run" / "nodes-controller.pid"
CONTROLLER_LOG = STATE / "log" / "nodes-controller.log"


def controller_pid() -> int | None:
    """The plan controller's pid, if it runs (hack/cluster-nodes.sh starts it)."""
    try:
        pid = int(CONTROLLER_PID_FILE.read_text().strip())
        cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid if b"--mode\0controller" in cmdline else None


def stop_controller(sig: int = signal.SIGTERM) -> None:
    _script("stop-controller", signal.Signals(sig).name.removeprefix("SIG"))
    assert controller_pid() is None


def start_controller() -> int:
    """Start the plan controller again (no-op if it runs), once it logged that it is ready."""
    _script("start-controller")
    pid = controller_pid()
    assert pid is not None
    return pid


def _script(*args: str, env: dict[str, str] | None = None, timeout: float = 600
            ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "BLOCKCOPY_STATE_DIR": str(STATE), **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"{SCRIPT.name} {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@functools.cache
def _code() -> str:
    """The fingerprint of the blockcopy code this test process imports
    (hack/code_fingerprint.py): the script's long-lived agents and controller must run it."""
    return subprocess.run([sys.executable, str(HACK / "code_fingerprint.py")], check=True,
                          capture_output=True, text=True).stdout.strip()


def runs_other_code(pid_file: pathlib.Path) -> bool:
    """The process of ``pid_file`` was started from other code than this test's (the script
    records the fingerprint beside the pid file, and restarts such a process on bring-up):
    a test must not judge old code."""
    try:
        return pid_file.with_suffix(".code").read_text().strip() != _code()
    except FileNotFoundError:
        return True


def load(path: pathlib.Path = NODES_JSON) -> list[Node]:
    """The nodes of nodes.json (none if it does not exist)."""
    if not path.exists():
        return []
    return [Node.from_json(entry) for entry in json.loads(path.read_text())]


def bring_up(count: int = 2) -> list[Node]:
    """At least ``count`` nodes, their agents (and the plan controller) running this test's
    code: hack/cluster-nodes.sh (idempotent: a few seconds when they are up), never
    shrinking a larger set someone brought up."""
    nodes = load()
    if len(nodes) < count or any(n.agent_pid() is None for n in nodes) \
            or controller_pid() is None or runs_other_code(CONTROLLER_PID_FILE) \
            or any(runs_other_code(n.agent_pid_file) for n in nodes):
        _script(env={"NODES": str(max(count, len(nodes)))})
        nodes = load()
    assert len(nodes) >= count, nodes
    return nodes


def with_controller(count: int) -> list[Node]:
    """The first ``count`` nodes (``bring_up``), the plan controller running beside them."""
    nodes = bring_up(count)
    assert controller_pid() is not None
    return nodes[:count]


def by_name(nodes: list[Node], name: str) -> Node:
    return next(n for n in nodes if n.name == name)


def wait_agent_log(node: Node, text: str, since: int = 0, timeout: float = 60) -> str:
    """Wait until the node's agent logged ``text`` after byte ``since``; returns the log."""
    def logged() -> str | None:
        log = node.agent_log_text(since)
        return log if text in log else None
    found: str = wait_for(logged, timeout, what=f"{text!r} in the log of {node.name}'s agent")
    return found
