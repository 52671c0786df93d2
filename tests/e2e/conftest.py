"""End-to-end fixtures: the real local environment (etcd + kube-apiserver + libvirtd, brought
up by hack/cluster-up.sh if it is not up), the CRD, and the agent as a real process."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import pytest
import yaml

import testvm

ROOT = pathlib.Path(__file__).resolve().parents[2]
STATE = pathlib.Path(os.environ.get("BLOCKCOPY_STATE_DIR", ROOT / ".local"))
KUBECONFIG = STATE / "kubeconfig"
GROUP, VERSION, PLURAL = "blockcopy.dev", "v1alpha1", "blockcopies"


def wait_for(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.2,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


@pytest.fixture(scope="session")
def cluster() -> pathlib.Path:
    """The local environment; started here when missing, so the suite never skips."""
    subprocess.run([str(ROOT / "hack" / "cluster-up.sh")], check=True,
                   stdout=subprocess.DEVNULL)
    assert KUBECONFIG.exists()
    return KUBECONFIG


@pytest.fixture(scope="session")
def kubectl(cluster: pathlib.Path) -> Callable[..., subprocess.CompletedProcess]:
    cache = os.environ.get("BLOCKCOPY_CACHE_DIR", "/var/cache/blockcopy-operator")
    binary = os.path.join(cache, "bin", "kubectl")

    def run(*args: str, check: bool = True, input: str | None = None):
        return subprocess.run([binary, "--kubeconfig", str(cluster), *args], check=check,
                              capture_output=True, text=True, input=input)
    return run


@pytest.fixture(scope="session")
def api(cluster: pathlib.Path, kubectl) -> kubernetes.client.CustomObjectsApi:
    # --validate=false: the 1.20 API server does not know the CRD's CEL rules (it drops them;
    # tests/unit/test_crd.py evaluates them, and the agent enforces immutability itself).
    kubectl("apply", "--validate=false", "-f", str(ROOT / "crds" / "blockcopy.yaml"))
    kubectl("wait", "--for=condition=Established", "crd/blockcopies.blockcopy.dev",
            "--timeout=60s")
    client = kubernetes.config.new_client_from_config(config_file=str(cluster))
    return kubernetes.client.CustomObjectsApi(client)


@pytest.fixture(scope="session")
def core(cluster: pathlib.Path) -> kubernetes.client.CoreV1Api:
    client = kubernetes.config.new_client_from_config(config_file=str(cluster))
    return kubernetes.client.CoreV1Api(client)


@pytest.fixture(scope="session")
def namespace(core: kubernetes.client.CoreV1Api) -> str:
    # No kube-controller-manager runs, so namespaces are never garbage-collected:
    # one fresh namespace per session, wiped with etcd by `make cluster-down`.
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    return name


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


@pytest.fixture
def agent_factory(api, tmp_path: pathlib.Path) -> Iterator[Callable[..., AgentProcess]]:
    agents: list[AgentProcess] = []

    def make(node: str = "node-a", start: bool = True, **kw) -> AgentProcess:
        agent = AgentProcess(node, tmp_path / f"agent-{node}-{len(agents)}.log", **kw)
        agents.append(agent)
        if start:
            agent.start()
        return agent

    yield make
    for agent in agents:
        agent.stop()
        print(f"--- log of agent {agent.node} ---\n{agent.log()[-6000:]}")


@pytest.fixture
def agent(agent_factory) -> AgentProcess:
    return agent_factory("node-a")


@pytest.fixture
def vms() -> Iterator[Callable[..., testvm.VM]]:
    made: list[testvm.VM] = []

    def make(**kw) -> testvm.VM:
        vm = testvm.create_vm(**kw)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        testvm.destroy_vm(vm)


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

    def events(self, core: kubernetes.client.CoreV1Api, name: str) -> list:
        items = core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}").items
        return sorted(items, key=lambda e: (e.first_timestamp or e.event_time or 0,
                                            e.metadata.name))


@pytest.fixture
def blockcopies(api, namespace, kubectl) -> BlockCopies:
    return BlockCopies(api, namespace, kubectl)


def condition(status: dict, ctype: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), None)


def qemu_img_compare(a: str, b: str) -> subprocess.CompletedProcess:
    """Compare the guest-visible content of two images (`-U`: the VM may hold a lock)."""
    return subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True, text=True)


def qemu_img_info(path: str) -> dict:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], check=True,
                         capture_output=True, text=True).stdout
    return yaml.safe_load(out)
