"""The local Kubernetes side: bringing the environment up (hack/cluster-up.sh, idempotent, so
the suite never skips), kubectl with one calling convention, the API clients, and the CRD
applied as users apply it. Used by tests/conftest.py's fixtures and by hack/ scripts."""

from __future__ import annotations

import os
import pathlib
import subprocess

import kubernetes
import yaml

from blockcopy.kubectl.names import RESOURCE
from support.paths import CACHE, CRDS, HACK, HELM, KUBECONFIG, KUBECTL, STATE


def bring_up() -> pathlib.Path:
    """etcd, kube-apiserver (RBAC on), kube-controller-manager and libvirtd; started when
    missing. Returns the admin kubeconfig."""
    subprocess.run([str(HACK / "cluster-up.sh")], check=True, stdout=subprocess.DEVNULL)
    assert KUBECONFIG.exists(), KUBECONFIG
    return KUBECONFIG


def install_kube_tools() -> dict[str, pathlib.Path]:
    """helm and kubectl, installed by the repo's script when missing (idempotent)."""
    subprocess.run([str(HACK / "install-kube-tools.sh")], check=True,
                   env={**os.environ, "BLOCKCOPY_CACHE_DIR": str(CACHE),
                        "BLOCKCOPY_STATE_DIR": str(STATE)})
    tools = {"helm": HELM, "kubectl": KUBECTL}
    for path in tools.values():
        assert os.access(path, os.X_OK), path
    return tools


class Kubectl:
    """kubectl of the local server's release against a kubeconfig (the admin's by default).
    ``kubectl(*args, check=True, input=None, kubeconfig=None)``: check=True fails the test
    with kubectl's output on a non-zero exit."""

    def __init__(self, binary: pathlib.Path = KUBECTL, kubeconfig: pathlib.Path = KUBECONFIG):
        self.binary, self.kubeconfig = binary, kubeconfig

    def __call__(self, *args: str, check: bool = True, input: str | None = None,
                 kubeconfig: pathlib.Path | str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.binary), "--kubeconfig", str(kubeconfig or self.kubeconfig), *args],
            capture_output=True, text=True, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def output(self, *args: str, input: str | None = None,
               kubeconfig: pathlib.Path | str | None = None) -> str:
        """kubectl's standard output; a non-zero exit fails as with check=True."""
        stdout: str = self(*args, input=input, kubeconfig=kubeconfig).stdout
        return stdout


def api_client(kubeconfig: pathlib.Path | str = KUBECONFIG) -> kubernetes.client.ApiClient:
    # kubernetes.config is untyped (Any): the annotation states what it returns.
    client: kubernetes.client.ApiClient = kubernetes.config.new_client_from_config(
        config_file=str(kubeconfig))
    return client


def custom_objects(kubeconfig: pathlib.Path | str = KUBECONFIG
                   ) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client(kubeconfig))


def core_v1(kubeconfig: pathlib.Path | str = KUBECONFIG) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client(kubeconfig))


def apply_crd(kubectl: Kubectl) -> subprocess.CompletedProcess[str]:
    """Every CRD of crds/ (BlockCopy, DiskInventory), as users apply them (the API server
    compiles and enforces their CEL rules)."""
    proc = kubectl("apply", "-f", str(CRDS))
    names = [yaml.safe_load(p.read_text())["metadata"]["name"]
             for p in sorted(CRDS.glob("*.yaml"))]
    assert RESOURCE in names
    kubectl("wait", "--for=condition=Established", *(f"crd/{n}" for n in names),
            "--timeout=60s")
    return proc


def token_kubeconfig(kubectl: Kubectl, service_account: str, namespace: str,
                     path: pathlib.Path, admin: pathlib.Path = KUBECONFIG, *,
                     duration: str = "1h") -> pathlib.Path:
    """A kubeconfig that authenticates as ``namespace``/``service_account`` (a token from
    the TokenRequest API, valid for ``duration``), with the admin kubeconfig's server and CA:
    how a user or a pod with that identity talks to the API server."""
    token = kubectl("create", "token", service_account, "--namespace", namespace,
                    f"--duration={duration}").stdout.strip()
    server = yaml.safe_load(admin.read_text())["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": server["server"],
            "certificate-authority-data": server["certificate-authority-data"]}}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": service_account,
                      "context": {"cluster": "local", "user": service_account}}],
        "current-context": service_account,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path
