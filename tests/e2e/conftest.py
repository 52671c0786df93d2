"""End-to-end fixtures: the real local environment (etcd + kube-apiserver + libvirtd, brought
up by hack/cluster-up.sh if it is not up), the CRD, and the agent as a real process.
Helpers and classes live in e2elib.py."""

from __future__ import annotations

import pathlib
import subprocess
import uuid
from collections.abc import Callable, Iterator

import kubernetes
import pytest
from e2elib import GROUP, KUBECONFIG, PLURAL, ROOT, STATE, VERSION, AgentProcess, BlockCopies

import testvm


@pytest.fixture(scope="session")
def cluster() -> pathlib.Path:
    """The local environment; started here when missing, so the suite never skips."""
    subprocess.run([str(ROOT / "hack" / "cluster-up.sh")], check=True,
                   stdout=subprocess.DEVNULL)
    assert KUBECONFIG.exists()
    return KUBECONFIG


@pytest.fixture(scope="session")
def kubectl(cluster: pathlib.Path) -> Callable[..., subprocess.CompletedProcess]:
    binary = str(STATE / "bin" / "kubectl")  # the server's release (hack/install-kube-tools.sh)

    def run(*args: str, check: bool = True, input: str | None = None):
        return subprocess.run([binary, "--kubeconfig", str(cluster), *args], check=check,
                              capture_output=True, text=True, input=input)
    return run


@pytest.fixture(scope="session")
def api(cluster: pathlib.Path, kubectl) -> kubernetes.client.CustomObjectsApi:
    # As users apply it (the API server compiles and enforces its CEL rules).
    kubectl("apply", "-f", str(ROOT / "crds" / "blockcopy.yaml"))
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


@pytest.fixture
def blockcopies(api, namespace, kubectl) -> BlockCopies:
    return BlockCopies(api, namespace, kubectl)


@pytest.fixture
def release_new_objects(api, namespace):
    """Leave no object of the test behind (finalizers of stopped agents included), so that
    no agent of a later test ever acts on it."""
    def names() -> set[str]:
        items = api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        return {o["metadata"]["name"] for o in items}
    before = names()
    yield
    for name in names() - before:
        for call, args in (
            (api.patch_namespaced_custom_object, ({"metadata": {"finalizers": None}},)),
            (api.delete_namespaced_custom_object, ()),
        ):
            try:
                call(GROUP, VERSION, namespace, PLURAL, name, *args)
            except kubernetes.client.exceptions.ApiException as exc:
                if exc.status != 404:
                    raise
