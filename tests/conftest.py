"""Shared fixtures of the integration, e2e and chart tests, built on the test-support package
(tests/support): the local environment (hack/cluster-up.sh, idempotent, so nothing is ever
skipped), kubectl and helm, the API clients, throwaway VMs, and the isolation scheme of
support/isolation.py: a unique node name and a namespace of its own per test, watched by the
agents the factory starts."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator, Sequence

import kubernetes
import pytest

from support import isolation
from support.agents import BLOCKCOPY, Agent
from support.cluster import (
    Kubectl,
    apply_crd,
    bring_up,
    core_v1,
    custom_objects,
    install_kube_tools,
)
from support.helm import Helm
from support.objects import BlockCopies
from support.paths import KUBECONFIG
from support.vms import VM, BackgroundDestroyer, create_vm, define_on, destroy_vm

# Fixtures kept next to the helpers they wrap.
# gitops_health: Flux's and Argo CD's verdicts; nbd and small_fs: destinations elsewhere
pytest_plugins = ["support.gitops", "support.storage"]

# ------------------------------------------------------------------ the local environment


@pytest.fixture(scope="session")
def kube_tools() -> dict[str, pathlib.Path]:
    """helm and kubectl (hack/install-kube-tools.sh when missing): no cluster needed."""
    return install_kube_tools()


@pytest.fixture(scope="session")
def cluster() -> pathlib.Path:
    """etcd, kube-apiserver, kube-controller-manager and libvirtd; started when missing.
    The admin kubeconfig."""
    return bring_up()


@pytest.fixture(scope="session")
def kubectl(cluster: pathlib.Path) -> Kubectl:
    return Kubectl(kubeconfig=cluster)


@pytest.fixture(scope="session")
def helm(kube_tools, tmp_path_factory) -> Helm:
    """helm for offline work (lint, template, package)."""
    return Helm(kube_tools["helm"], tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def cluster_helm(cluster, kube_tools, tmp_path_factory) -> Helm:
    """helm against the local API server."""
    return Helm(kube_tools["helm"], tmp_path_factory.mktemp("helm-home-cluster"), cluster)


@pytest.fixture(scope="session")
def api(cluster, kubectl) -> kubernetes.client.CustomObjectsApi:
    """The admin's client for custom objects, the CRD applied."""
    apply_crd(kubectl)
    return custom_objects(cluster)


@pytest.fixture(scope="session")
def core(cluster) -> kubernetes.client.CoreV1Api:
    return core_v1(cluster)


# ------------------------------------------------------------------ isolation


@pytest.fixture
def node() -> str:
    """This test's node name (no other test or session uses it)."""
    return isolation.unique_node()


@pytest.fixture
def namespace(api, kubectl) -> Iterator[str]:
    """This test's namespace; released at teardown (finalizers removed, deleted)."""
    name = isolation.create_namespace(kubectl)
    yield name
    isolation.release_namespace(api, kubectl, name)


@pytest.fixture
def blockcopies(api, namespace, kubectl) -> BlockCopies:
    return BlockCopies(api, namespace, kubectl)


# ------------------------------------------------------------------ agents and VMs


@pytest.fixture
def agent_factory(api, namespace, node, tmp_path) -> Iterator[Callable[..., Agent]]:
    """``make(node=<the test's node>, *, start=True, extra_args=(), namespace=<the test's>,
    clusterwide=False, status_interval=0.5, entry=BLOCKCOPY, env=None, kubeconfig=admin)``:
    an agent process watching only the test's namespace (or ``namespace``), unless
    ``clusterwide``. Stopped at teardown (before the namespace is released), its log printed,
    the DiskInventory it published (named after its node, cluster-scoped) deleted."""
    test_namespace, test_node = namespace, node
    agents: list[Agent] = []

    def make(node: str | None = None, *, start: bool = True, extra_args: Sequence[str] = (),
             namespace: str | None = None, clusterwide: bool = False,
             status_interval: float | None = 0.5, entry: Sequence[str] = BLOCKCOPY,
             env: dict[str, str] | None = None,
             kubeconfig: pathlib.Path | str = KUBECONFIG) -> Agent:
        node = node or test_node
        args: list[str] = []
        if status_interval is not None:
            args += ["--status-interval", str(status_interval)]
        if not clusterwide:
            args += ["--namespace", namespace or test_namespace]
        agent = Agent(node, tmp_path / f"agent-{node}-{len(agents)}.log",
                      args=[*args, *extra_args], env=env, kubeconfig=kubeconfig, entry=entry)
        agents.append(agent)
        if start:
            agent.start()
        return agent

    yield make
    for agent in agents:
        agent.stop()
        print(f"--- log of agent {agent.node} ---\n{agent.log()[-8000:]}")
    for name in {agent.node for agent in agents}:
        isolation.delete_inventory(api, name)


@pytest.fixture
def agent(agent_factory) -> Agent:
    """The test's agent: its node, its namespace."""
    return agent_factory()


@pytest.fixture(scope="session")
def destroyer() -> Iterator[BackgroundDestroyer]:
    """Destroys the ``vms`` fixture's VMs in the background (support.vms)."""
    background = BackgroundDestroyer()
    yield background
    background.close()


@pytest.fixture(autouse=True)
def earlier_vms_gone(request: pytest.FixtureRequest, destroyer: BackgroundDestroyer) -> None:
    """Before a test that does not make VMs with ``vms`` (which drains on its own, after the
    fixtures before it, such as the agent, started): the earlier tests' VMs are gone."""
    if "vms" not in request.fixturenames:
        destroyer.drain()


@pytest.fixture
def vms(destroyer: BackgroundDestroyer) -> Iterator[Callable[..., VM]]:
    """``make(name=None, **create_vm options)``: VMs destroyed after the test, in the
    background (the next test's setup overlaps it; see BackgroundDestroyer)."""
    destroyer.drain()
    made: list[VM] = []

    def make(name: str | None = None, **kw) -> VM:
        vm = create_vm(name, **kw)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        destroyer.destroy(vm)


@pytest.fixture
def users() -> Iterator[Callable[..., VM]]:
    """``make(image, secret_uuid="")``: a domain defined (shut off) on an existing image
    (support.vms.define_on), a second user of it; undefined at teardown, the image kept."""
    made: list[VM] = []

    def make(image: str, secret_uuid: str = "") -> VM:
        vm = define_on(image, secret_uuid=secret_uuid)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        destroy_vm(vm)
