"""Helpers of the end-to-end tests: the agent as a process, BlockCopy objects, image checks.
(A module of its own, imported by this unique name: `from conftest import` would be
ambiguous with tests/chart/conftest.py in the same pytest run.)"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import uuid

import kubernetes
import yaml

from waiting import wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]
STATE = pathlib.Path(os.environ.get("BLOCKCOPY_STATE_DIR", ROOT / ".local"))
KUBECONFIG = STATE / "kubeconfig"
GROUP, VERSION, PLURAL = "blockcopy.dev", "v1alpha1", "blockcopies"
NODE_LABEL = "blockcopy.dev/node"
__all__ = ["GROUP", "KUBECONFIG", "NODE_LABEL", "PLURAL", "VERSION", "AgentProcess",
           "BlockCopies", "condition", "qemu_img_compare", "qemu_img_info", "wait_for"]


class AgentProcess:
    """`blockcopy-operator` as a real process, logging to a file."""

    def __init__(self, node: str, log_path: pathlib.Path, extra_args: list[str] | None = None):
        self.node = node
        self.log_path = log_path
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        env = {**os.environ, "KUBECONFIG": str(KUBECONFIG), "NODE_NAME": self.node}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blockcopy", "--status-interval", "0.5", *self.extra_args],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: "agent ready" in self.log() or self.proc.poll() is not None,
                 timeout, what=f"agent {self.node} to start")
        assert self.proc.poll() is None, f"agent exited early:\n{self.log()}"

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


class BlockCopies:
    """Create / read / patch / delete BlockCopy objects in the test namespace."""

    def __init__(self, api: kubernetes.client.CustomObjectsApi, namespace: str, kubectl):
        self.api, self.namespace, self.kubectl = api, namespace, kubectl

    def create(self, spec: dict, name: str | None = None, labels: dict | None = None) -> str:
        name = name or f"bc-{uuid.uuid4().hex[:6]}"
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "BlockCopy",
                "metadata": {"name": name, "labels": labels or {}}, "spec": spec}
        self.apply_manifest(body)
        return name

    def apply_manifest(self, body: dict) -> None:
        self.kubectl("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(body))

    def get(self, name: str) -> dict:
        return self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def status(self, name: str) -> dict:
        return self.get(name).get("status") or {}

    def patch_spec(self, name: str, spec: dict) -> None:
        self.api.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                {"spec": spec})

    def delete(self, name: str) -> None:
        self.api.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def wait_phase(self, name: str, *phases: str, timeout: float = 90) -> dict:
        def check():
            status = self.status(name)
            return status if status.get("phase") in phases else None
        try:
            return wait_for(check, timeout, what=f"{name} in phase {phases}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstatus: {self.status(name)}") from None

    def wait_copying(self, name: str, *, counter: str = "end", above: int = 1,
                     timeout: float = 60) -> dict:
        """Copying, with libvirt's counter (end > 1: the job started; cur > 0: bytes copied)
        already in status."""
        def check():
            status = self.status(name)
            if status.get("phase") == "Copying" and status.get(counter, 0) > above:
                return status
            assert status.get("phase") in (None, "Pending", "Copying"), status
            return None
        return wait_for(check, timeout, what=f"{name} Copying with counters")

    def events(self, core: kubernetes.client.CoreV1Api, name: str) -> list:
        items = core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}").items
        return sorted(items, key=lambda e: (e.first_timestamp or e.event_time or 0,
                                            e.metadata.name))


def condition(status: dict, ctype: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), None)


def qemu_img_compare(a: str, b: str) -> subprocess.CompletedProcess:
    """Compare the guest-visible content of two images (`-U`: the VM may hold a lock)."""
    return subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True, text=True)


def qemu_img_info(path: str) -> dict:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], check=True,
                         capture_output=True, text=True).stdout
    return yaml.safe_load(out)
