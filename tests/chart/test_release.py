"""`make release` without an image (hack/release.sh VERSION --no-image): what a user downloads
is what it says it is. The packaged chart carries the release's version, appVersion and
default image; install.yaml holds the Namespace, the CRD, the RBAC and the DaemonSet of that
chart's defaults and validates against the Kubernetes schemas; the SBOM lists the runtime lock;
release.json and SHA256SUMS match the files. A version that is not pyproject.toml's (or a
pre-release of it) is refused. No cluster, no registry, no image build."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tarfile
import tomllib
import uuid

import kubernetes_validate
import pytest
import yaml

from blockcopy.model.api import GROUP, PLURAL
from support.helm import by_kind, one
from support.paths import CRD, HACK, ROOT

PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
REGISTRY = "registry.example.com/blockcopy"
NAMESPACE = "blockcopy-system"


def release_sh(version: str, dist, *args: str, check: bool = True
               ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(HACK / "release.sh"), version, *args], capture_output=True,
                          text=True, env={**os.environ, "DIST": str(dist),
                                          "RELEASE_REGISTRY": REGISTRY})
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def release(kube_tools, tmp_path_factory):
    # "t" first: six hex digits are all decimal once in 17 draws, and SemVer refuses a numeric
    # identifier with a leading zero (CI drew test.028212 once).
    version = f"{PROJECT_VERSION}-test.t{uuid.uuid4().hex[:6]}"
    dist = tmp_path_factory.mktemp("dist")
    proc = release_sh(version, dist, "--no-image")
    print(proc.stderr)
    return {"version": version, "dir": dist / version}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_release_holds_its_files_and_their_checksums(release):
    out, version = release["dir"], release["version"]
    chart = f"blockcopy-operator-{version}.tgz"
    assert sorted(os.listdir(out)) == sorted(
        ["SHA256SUMS", chart, "install.yaml", "release.json", "sbom.cdx.json"])
    # sha256sum's format, every other file listed, each sum right (what `sha256sum -c` checks).
    sums = {}
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = re.fullmatch(r"([0-9a-f]{64})  (\S+)", line).groups()
        sums[name] = digest
    assert sorted(sums) == sorted(set(os.listdir(out)) - {"SHA256SUMS"})
    for name, digest in sums.items():
        assert sha256(out / name) == digest, name
    check = subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=out,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_release_json_describes_the_release(release):
    out, version = release["dir"], release["version"]
    info = json.loads((out / "release.json").read_text())
    assert info["version"] == version and info["projectVersion"] == PROJECT_VERSION
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    assert info["revision"] == head
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", info["created"]), info["created"]
    assert info["chart"] == {"name": "blockcopy-operator", "version": version,
                             "appVersion": version,
                             "archive": f"blockcopy-operator-{version}.tgz",
                             "oci": None, "pushedDigest": None}
    # --no-image: no image, nothing pushed; the name it would have.
    assert info["image"]["repository"] == f"{REGISTRY}/blockcopy-operator"
    assert info["image"]["tag"] == version
    assert info["image"]["archive"] is None and info["image"]["pushedDigest"] is None
    for name, digest in info["files"].items():
        assert sha256(out / name) == digest, name
    assert set(info["files"]) == {info["chart"]["archive"], "install.yaml", "sbom.cdx.json"}


def test_the_chart_is_the_releases(release, helm):
    out, version = release["dir"], release["version"]
    with tarfile.open(out / f"blockcopy-operator-{version}.tgz") as tar:
        chart = yaml.safe_load(tar.extractfile("blockcopy-operator/Chart.yaml").read())
        values = yaml.safe_load(tar.extractfile("blockcopy-operator/values.yaml").read())
        crd = tar.extractfile("blockcopy-operator/crds/blockcopy.yaml").read()
    assert chart["version"] == version and chart["appVersion"] == version
    assert values["image"]["repository"] == f"{REGISTRY}/blockcopy-operator"
    assert values["image"]["tag"] == ""  # the appVersion: image and chart go together
    assert crd == CRD.read_bytes()
    lint = helm.run("lint", str(out / f"blockcopy-operator-{version}.tgz"))
    assert "0 chart(s) failed" in lint.stdout


def test_install_yaml_is_the_charts_defaults_with_namespace_and_crd(release):
    out, version = release["dir"], release["version"]
    docs = [d for d in yaml.safe_load_all((out / "install.yaml").read_text()) if d]
    kinds = [d["kind"] for d in docs]
    # kubectl apply -f goes in file order: the Namespace and the CRD first.
    assert kinds[:2] == ["Namespace", "CustomResourceDefinition"], kinds
    assert docs[0]["metadata"]["name"] == NAMESPACE
    assert docs[1] == yaml.safe_load(CRD.read_text())
    assert docs[1]["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"} <= set(kinds)
    for doc in docs[2:]:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]
        assert "helm.sh/hook" not in doc["metadata"].get("annotations", {})
    ds = one(docs, "DaemonSet")
    (agent,) = ds["spec"]["template"]["spec"]["containers"]
    assert agent["image"] == f"{REGISTRY}/blockcopy-operator:{version}"
    binding = next(d for d in by_kind(docs, "ClusterRoleBinding")
                   if d["roleRef"]["name"] == "blockcopy-operator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "blockcopy-operator",
                                    "namespace": NAMESPACE}]
    # Every object as the newest Kubernetes the validator knows defines it.
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_sbom_lists_the_runtime_lock(release):
    sbom = json.loads((release["dir"] / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    assert sbom["metadata"]["component"]["name"] == "blockcopy-operator"
    lock = dict(re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)",
                           (ROOT / "requirements" / "runtime.txt").read_text(), re.M))
    listed = {c["name"]: c["version"] for c in sbom["components"]}
    assert listed == lock
    for component in sbom["components"]:
        assert component["purl"] == f"pkg:pypi/{component['name']}@{component['version']}"
        hashes = [h for ref in component["externalReferences"] for h in ref.get("hashes", [])]
        assert hashes and all(h["alg"] == "SHA-256" for h in hashes), component["name"]


@pytest.mark.parametrize("version", ["9.9.9", f"{PROJECT_VERSION}.1", f"{PROJECT_VERSION}-",
                                     f"{PROJECT_VERSION}rc1", f"v{PROJECT_VERSION}"])
def test_a_version_other_than_pyprojects_is_refused(version, tmp_path):
    proc = release_sh(version, tmp_path, "--no-image", check=False)
    assert proc.returncode != 0
    assert f"VERSION {version} is neither pyproject.toml's version {PROJECT_VERSION}" \
        in proc.stderr, proc.stderr
    assert not (tmp_path / version).exists()


@pytest.mark.parametrize("suffix", ["rc.01", "test.028212", "1.00", "01"])
def test_a_numeric_identifier_with_a_leading_zero_is_refused(suffix, tmp_path):
    """SemVer's rule, checked before anything is built (Helm would refuse the chart later)."""
    version = f"{PROJECT_VERSION}-{suffix}"
    proc = release_sh(version, tmp_path, "--no-image", check=False)
    assert proc.returncode != 0
    assert f"VERSION {version} is not SemVer" in proc.stderr, proc.stderr
    assert not (tmp_path / version).exists()
