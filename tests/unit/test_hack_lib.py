"""hack/lib/kubeconfig.sh's write_kubeconfig, the one kubeconfig writer of the cluster scripts
(cluster-up.sh: the admin's and kube-controller-manager's; cluster-node.sh: the kubelet's and
kube-scheduler's), run by bash as they run it."""

from __future__ import annotations

import base64
import os
import pathlib
import subprocess

import pytest
import yaml

from support.paths import HACK

SERVER = "https://127.0.0.1:16443"


def write_kubeconfig(*args: str | pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", f'set -euo pipefail; source "{HACK}/lib/kubeconfig.sh"; '
                       'write_kubeconfig "$@"', "write_kubeconfig", *map(str, args)],
        capture_output=True, text=True)


def written(path: pathlib.Path, *args: str | pathlib.Path) -> dict:
    """The kubeconfig ``write_kubeconfig PATH SERVER ...args`` wrote, parsed."""
    proc = write_kubeconfig(path, SERVER, *args)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(path.read_text())


@pytest.fixture
def ca(tmp_path) -> pathlib.Path:
    path = tmp_path / "ca.crt"
    path.write_text("-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n")
    return path


def test_a_token_user_with_the_ca_embedded(tmp_path, ca):
    path = tmp_path / "kubeconfig"
    config = written(path, ca, "admin", "--token", "admin-token", "--context", "blockcopy-local")
    (cluster,) = config["clusters"]
    assert cluster["name"] == "blockcopy-local"
    assert cluster["cluster"]["server"] == SERVER
    assert base64.b64decode(cluster["cluster"]["certificate-authority-data"]) == ca.read_bytes()
    assert config["users"] == [{"name": "admin", "user": {"token": "admin-token"}}]
    assert config["contexts"] == [{"name": "blockcopy-local", "context": {
        "cluster": "blockcopy-local", "user": "admin"}}]
    assert config["current-context"] == "blockcopy-local"
    assert path.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "kubeconfig.tmp").exists()


def test_a_client_certificate_user_named_after_its_context(tmp_path, ca):
    config = written(tmp_path / "kubelet.kubeconfig", ca, "kubelet-n1",
                     "--cert", "/pki/kubelet-n1.crt", "--key", "/pki/kubelet-n1.key")
    assert config["users"] == [{"name": "kubelet-n1", "user": {
        "client-certificate": "/pki/kubelet-n1.crt", "client-key": "/pki/kubelet-n1.key"}}]
    assert config["current-context"] == "kubelet-n1"
    assert config["contexts"][0]["context"] == {"cluster": "blockcopy-local",
                                                "user": "kubelet-n1"}


def test_a_rerun_leaves_the_file_and_its_mtime_alone_and_a_change_replaces_it(tmp_path, ca):
    path = tmp_path / "kubeconfig"
    written(path, ca, "kcm", "--token", "kcm-token")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    written(path, ca, "kcm", "--token", "kcm-token")
    assert path.stat().st_mtime_ns == 1_000_000_000
    assert written(path, ca, "kcm", "--token", "new")["users"][0]["user"] == {"token": "new"}
    assert path.stat().st_mtime_ns != 1_000_000_000


@pytest.mark.parametrize("credentials", [
    [], ["--token", "t", "--cert", "c", "--key", "k"], ["--cert", "c"], ["--token"],
    ["--token", "t", "--user", "u"]], ids=["none", "both", "no-key", "no-value", "unknown"])
def test_a_wrong_call_writes_nothing(tmp_path, ca, credentials):
    path = tmp_path / "kubeconfig"
    proc = write_kubeconfig(path, SERVER, ca, "u", *credentials)
    assert proc.returncode == 2 and "write_kubeconfig" in proc.stderr
    assert not path.exists() and not (tmp_path / "kubeconfig.tmp").exists()
