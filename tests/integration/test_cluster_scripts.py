"""hack/cluster-up.sh and hack/cluster-down.sh on the real daemons.

Why: `make test` and CI start from whatever state the machine is in: a libvirtd that died
while virtlogd lives on, or the reverse, must be completed without touching what runs, and a
teardown must leave no process of its state dir behind (a stray controller manager of one
environment once outlived its apiserver and kept port 16258 busy).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from support.paths import HACK, STATE
from support.waits import wait_for


def _alive(pid: int) -> bool:
    """Running, that is: neither gone nor a zombie (this machine's pid 1 reaps the daemons
    it inherits only now and then; cluster-up must not take a zombie for a live daemon)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _daemon_pid(name: str) -> int | None:
    """The pid of the one system daemon NAME (libvirtd, virtlogd), from pgrep: root's (the
    session daemons of hack/cluster-nodes.sh's users have the same names)."""
    out = subprocess.run(["pgrep", "-x", "-u", "0", name], capture_output=True,
                         text=True).stdout.split()
    live = [int(pid) for pid in out if _alive(int(pid))]  # an unreaped zombie is gone
    assert len(live) <= 1, f"more than one {name}: {live}"
    return live[0] if live else None


def _control_plane_pids(state=STATE) -> dict[str, int]:
    run = state / "run"
    return {f.stem: int(f.read_text()) for f in run.glob("*.pid")}


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not _alive(pid), 30, what=f"pid {pid} to exit")


def _virsh_ok() -> bool:
    return subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                          capture_output=True, timeout=10).returncode == 0


def _cluster_up(env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(HACK / "cluster-up.sh")], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("down", ["libvirtd", "virtlogd"])
def test_cluster_up_starts_only_the_daemon_that_is_down(down, vms):
    subprocess.run([str(HACK / "cluster-up.sh")], check=True, capture_output=True)
    vm = vms()  # a running VM must survive both daemons' restarts
    before = {name: _daemon_pid(name) for name in ("libvirtd", "virtlogd")}
    control = _control_plane_pids()
    assert all(before.values()) and control, (before, control)

    _stop(before[down])
    proc = _cluster_up()
    assert proc.returncode == 0, proc.stderr
    assert f"starting {down}" in proc.stderr
    others = {"libvirtd", "virtlogd"} - {down}
    assert not any(f"starting {o}" in proc.stderr for o in others), proc.stderr

    after = {name: _daemon_pid(name) for name in ("libvirtd", "virtlogd")}
    assert after[down] and after[down] != before[down]
    for other in others:
        assert after[other] == before[other]
    assert _control_plane_pids() == control  # etcd, apiserver, controller manager untouched
    assert _virsh_ok()
    state = subprocess.run(["virsh", "-c", "qemu:///system", "domstate", vm.name],
                           capture_output=True, text=True)
    assert state.stdout.strip() == "running", state
    # a new domain starts (it needs both daemons: QEMU's log goes through virtlogd)
    assert vms(layers=1).name

    # and once everything is up, a second run changes nothing
    proc = _cluster_up()
    assert proc.returncode == 0 and "starting" not in proc.stderr, proc.stderr
    assert {name: _daemon_pid(name) for name in ("libvirtd", "virtlogd")} == after


def test_cluster_down_stops_every_process_cluster_up_started(tmp_path):
    """A second environment on its own ports and state dir (like `make test-k8s-oldest`):
    up, then down; nothing that names its state dir may be left running, and the shared
    libvirtd, which it did not start, stays."""
    state = tmp_path / "state"
    env = {"BLOCKCOPY_STATE_DIR": str(state), "BLOCKCOPY_API_PORT": "16455",
           "BLOCKCOPY_ETCD_PORT": "23795", "BLOCKCOPY_ETCD_PEER_PORT": "23805",
           "BLOCKCOPY_KCM_PORT": "16265", "BLOCKCOPY_KEEP_VMS": "1"}
    libvirtd = _daemon_pid("libvirtd")

    def ours() -> list[str]:
        ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        return [line for line in ps.splitlines() if str(state) in line and "pytest" not in line]

    try:
        proc = _cluster_up(env)
        assert proc.returncode == 0, proc.stderr
        started = _control_plane_pids(state)
        assert set(started) == {"etcd", "kube-apiserver", "kube-controller-manager"}, started
        assert all(_alive(pid) for pid in started.values())
        assert (state / "kubeconfig").exists()
    finally:
        down = subprocess.run([str(HACK / "cluster-down.sh")], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=120)
    assert down.returncode == 0, down.stderr
    time.sleep(0.5)  # let the kernel reap
    assert ours() == []
    assert not any(_alive(pid) for pid in started.values()), started
    assert _daemon_pid("libvirtd") == libvirtd and _virsh_ok()
