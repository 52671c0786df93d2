"""A release, installed the way users install it, on the local one-node cluster
(hack/cluster-node.sh): `hack/release.sh VERSION --push` pushes the image and the chart to the
local OCI registry (hack/registry.sh: the CNCF distribution registry), and the node's
containerd pulls the image from there (plain HTTP, certs.d/hosts.toml): no import.

- `helm install oci://REGISTRY/charts/blockcopy-operator --version VERSION`: the chart's
  default image is the release's; the pod runs the digest the registry holds;
- `kubectl apply -f install.yaml`: the same, from the rendered manifest.

Each brings up a Ready pod that copies and pivots a real VM. Before each, the image is absent
from the node's containerd, so the kubelet pulls it.

What this shared machine needs besides the release's defaults, as a user of a special cluster
would set it: the node's taint and label (blockcopy.dev/test-node), hostNetwork and the API
server's address (127.0.0.1, no kube-proxy), the agent limited to the test's namespace (other
sessions' agents and VMs run here), and free ports on the node. For install.yaml these are
patched into its objects (what a kustomize overlay does), its namespace and cluster-wide names
made unique, and the people's ClusterRoles (blockcopy-viewer/-editor, fixed names other
sessions' releases own) left out."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import tarfile
import time
import tomllib
import uuid

import pytest
import yaml

from support.agents import free_port
from support.cluster import apply_crd
from support.images import assert_identical
from support.isolation import create_namespace, release_namespace, unique
from support.libvirt_probes import live_disk_source, live_mirror
from support.node import API_PORT, NODE_NAME, SOCK, TAINT_KEY, ctr
from support.objects import BlockCopies, copy_spec
from support.paths import HACK, ROOT, STATE
from support.waits import wait_for

pytestmark = pytest.mark.e2e

PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
LOCAL_NODE_VALUES = ROOT / "deploy" / "local-node" / "values.yaml"
CHART_DEFAULTS = ROOT / "charts" / "blockcopy-operator" / "values.yaml"
USER_ROLES = {"blockcopy-viewer", "blockcopy-editor"}


def env() -> dict[str, str]:
    return {**os.environ, "BLOCKCOPY_STATE_DIR": str(STATE)}


@pytest.fixture(scope="module")
def registry(cluster, api) -> str:
    """The local registry's address; the node up and pulling from it."""
    address = subprocess.run([str(HACK / "registry.sh"), "start"], check=True, env=env(),
                             capture_output=True, text=True).stdout.strip()
    hosts = STATE / "node" / "containerd" / "certs.d" / address / "hosts.toml"
    config = STATE / "node" / "containerd.toml"
    up = subprocess.run(["ctr", "--address", str(SOCK), "version"], capture_output=True)
    # Only when needed: the node's containerd may be shared with other sessions' tests.
    if up.returncode != 0 or not hosts.exists() or "config_path" not in config.read_text():
        subprocess.run([str(HACK / "cluster-node.sh")], check=True,
                       env={**env(), "BLOCKCOPY_NODE_IMAGES": ""}, stdout=subprocess.DEVNULL)
    assert f'server = "http://{address}"' in hosts.read_text()
    return address


def in_containerd(ref: str) -> bool:
    return ref in ctr("images", "ls", "-q").split()


def remove_from_containerd(*refs: str) -> None:
    for ref in refs:
        subprocess.run(["ctr", "--address", str(SOCK), "--namespace", "k8s.io", "images", "rm",
                        ref], capture_output=True, check=False)


@pytest.fixture(scope="module")
def released(registry, tmp_path_factory):
    """hack/release.sh VERSION --push, VERSION a pre-release of this checkout's version no
    other run uses (so the node cannot have its image)."""
    version = f"{PROJECT_VERSION}-e2e.t{uuid.uuid4().hex[:6]}"  # never all digits (SemVer)
    dist = tmp_path_factory.mktemp("dist")
    started = time.monotonic()
    proc = subprocess.run([str(HACK / "release.sh"), version, "--push"], capture_output=True,
                          text=True, env={**env(), "DIST": str(dist),
                                          "RELEASE_REGISTRY": registry})
    print(proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"release with image, pushed: {time.monotonic() - started:.1f} s")
    info = json.loads((dist / version / "release.json").read_text())
    image = f"{registry}/blockcopy-operator:{version}"
    pinned = f"{registry}/blockcopy-operator@{info['image']['pushedDigest']}"
    with tarfile.open(dist / version / info["image"]["archive"]) as tar:
        manifest = json.load(tar.extractfile(
            f"blobs/sha256/{info['image']['archiveDigest'].split(':')[1]}"))
    # containerd also records a pulled image under its ID (the config's digest).
    refs = (image, pinned, manifest["config"]["digest"])
    yield {"version": version, "dir": dist / version, "info": info, "image": image,
           "pinned": pinned, "registry": registry, "refs": refs}
    remove_from_containerd(*refs)
    for name in (image, f"{image}-builder"):
        subprocess.run(["buildah", "--storage-driver", "vfs", "rmi", name], capture_output=True,
                       check=False)


def test_the_release_is_in_the_registry(released):
    info, registry = released["info"], released["registry"]
    assert info["image"]["pushedDigest"].startswith("sha256:")
    assert info["image"]["archiveDigest"].startswith("sha256:")
    assert info["image"]["base"].split("@")[1].startswith("sha256:")
    assert info["chart"]["oci"] == f"oci://{registry}/charts/blockcopy-operator"
    # What the registry serves under the tag is what was pushed.
    for repo, tag, digest in (("blockcopy-operator", released["version"],
                               info["image"]["pushedDigest"]),
                              ("charts/blockcopy-operator", released["version"],
                               info["chart"]["pushedDigest"])):
        head = subprocess.run(
            ["curl", "-fsSI", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
             f"http://{registry}/v2/{repo}/manifests/{tag}"],
            check=True, capture_output=True, text=True).stdout
        assert f"docker-content-digest: {digest}" in head.lower(), head
    # The OCI archive, as a user gets it: one image, the release's labels in its config.
    with tarfile.open(released["dir"] / info["image"]["archive"]) as tar:
        def blob(digest: str) -> dict:
            return json.load(tar.extractfile(f"blobs/sha256/{digest.split(':')[1]}"))
        index = json.load(tar.extractfile("index.json"))
        assert [m["digest"] for m in index["manifests"]] == [info["image"]["archiveDigest"]]
        manifest = blob(info["image"]["archiveDigest"])
        labels = blob(manifest["config"]["digest"])["config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == released["version"]
    assert labels["org.opencontainers.image.revision"] == info["revision"]
    assert labels["org.opencontainers.image.created"] == info["created"]
    assert labels["org.opencontainers.image.source"] == info["source"]
    assert labels["org.opencontainers.image.base.name"] == info["image"]["base"]


def ready_pod(kubectl, namespace: str, selector: str) -> dict | None:
    found = json.loads(kubectl("get", "pods", "-n", namespace, "-l", selector, "-o",
                               "json").stdout)["items"]
    if len(found) != 1 or found[0]["metadata"].get("deletionTimestamp"):
        return None
    pod = found[0]
    ready = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
    return pod if pod["status"].get("phase") == "Running" and ready.get("Ready") == "True" \
        else None


def node_ports() -> dict[str, int]:
    """The chart's metrics and liveness ports, or free ones where those are taken (the pod
    uses the node's network, other sessions' pods may hold the defaults)."""
    defaults = yaml.safe_load(CHART_DEFAULTS.read_text())
    ports = {}
    for key in ("metrics", "liveness"):
        port = defaults[key]["port"]
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                port = free_port("0.0.0.0")
        ports[key] = port
    return ports


def copies_and_pivots(api, kubectl, vms, namespace: str, pod: dict) -> None:
    blockcopies = BlockCopies(api, namespace, kubectl)
    vm = vms(name="rel")
    dest = f"{vm.workdir}/copy.qcow2"
    name = blockcopies.create(copy_spec(vm, node=NODE_NAME, dest=dest, pivot=True))
    blockcopies.wait_phase(name, "Pivoted")
    assert live_disk_source(vm) == dest and live_mirror(vm) is None
    assert_identical(vm.chain[0], dest)
    logs = kubectl("logs", pod["metadata"]["name"], "-n", namespace).stdout
    assert f"{namespace}/{name}: Pivoted: the VM now runs on {dest}" in logs, logs[-3000:]


def assert_pulled(pod: dict, released) -> None:
    (status,) = pod["status"]["containerStatuses"]
    assert status["image"] == released["image"]
    # The kubelet reports the repository digest it pulled: the registry's.
    assert status["imageID"] == released["pinned"], status
    assert in_containerd(released["image"])


def test_helm_install_from_the_oci_registry(released, kubectl, cluster_helm, api, vms):
    assert not any(in_containerd(ref) for ref in released["refs"]), \
        "the node has the image before the pull"
    namespace = create_namespace(kubectl, "rel")
    name = unique("bcr").replace("-", "")
    values = yaml.safe_load(LOCAL_NODE_VALUES.read_text())
    del values["image"]  # the chart's default: the release's image
    ports = node_ports()
    values.update({"apiServer": {"host": "127.0.0.1", "port": API_PORT},
                   "watchNamespaces": [namespace], "userRoles": {"create": False},
                   "metrics": {"port": ports["metrics"]},
                   "liveness": {"port": ports["liveness"]}})
    path = released["dir"].parent / f"values-{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    try:
        started = time.monotonic()
        for attempt in range(3):
            # The CRD is shared with other sessions' tests, which apply theirs with kubectl:
            # applied first, Helm's server-side apply of crds/ meets the same content.
            apply_crd(kubectl)
            proc = cluster_helm.run("install", name,
                                    f"oci://{released['registry']}/charts/blockcopy-operator",
                                    "--version", released["version"], "--plain-http",
                                    "--namespace", namespace, "-f", str(path), check=False)
            if proc.returncode == 0:
                break
            assert "failed to install CRD" in proc.stderr and attempt < 2, proc.stderr
            cluster_helm.run("uninstall", name, "--namespace", namespace, check=False)
        pod = wait_for(lambda: ready_pod(kubectl, namespace,
                                         f"app.kubernetes.io/instance={name},"
                                         "app.kubernetes.io/component!=controller"),
                       180, interval=1, what="the release's pod to be Running and Ready")
        # The plan controller (deploy/local-node/values.yaml puts it on the node too).
        wait_for(lambda: ready_pod(kubectl, namespace, f"app.kubernetes.io/instance={name},"
                                   "app.kubernetes.io/component=controller"),
                 120, interval=1, what="the release's controller to be Running and Ready")
        print(f"helm install oci:// -> pod Ready (image pulled): "
              f"{time.monotonic() - started:.1f} s")
        assert_pulled(pod, released)
        copies_and_pivots(api, kubectl, vms, namespace, pod)
    finally:
        cluster_helm.run("uninstall", name, "--namespace", namespace, "--wait", check=False)
        release_namespace(api, kubectl, namespace)


def _on_the_node(doc: dict, namespace: str) -> list[dict]:
    """A workload of install.yaml placed on the local node, with the node's network and the
    API server's address there, watching ``namespace`` only; its containers."""
    pod = doc["spec"]["template"]["spec"]
    pod["nodeSelector"] = {TAINT_KEY: "true"}
    pod["tolerations"] = [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]
    pod["hostNetwork"] = True
    pod["dnsPolicy"] = "ClusterFirstWithHostNet"
    for container in pod["containers"]:
        container["args"].append(f"--namespace={namespace}")
        container["env"] = [*container.get("env", []),
                            {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                            {"name": "KUBERNETES_SERVICE_PORT", "value": str(API_PORT)}]
    return list(pod["containers"])


def adapted(docs: list[dict], namespace: str, suffix: str) -> list[dict]:
    """install.yaml's objects for this shared test cluster (see the module's docstring)."""
    ports = node_ports()
    out = []
    for doc in copy.deepcopy(docs):
        kind, meta = doc["kind"], doc["metadata"]
        if kind == "ClusterRole" and meta["name"] in USER_ROLES:
            continue
        if kind == "Namespace":
            meta["name"] = namespace
        elif kind in ("ClusterRole", "ClusterRoleBinding"):
            meta["name"] += suffix
            if kind == "ClusterRoleBinding":
                doc["roleRef"]["name"] += suffix
                for subject in doc["subjects"]:
                    subject["namespace"] = namespace
            else:
                doc["rules"].append({"apiGroups": [""], "resources": ["namespaces"],
                                     "verbs": ["list", "watch"]})
        elif kind != "CustomResourceDefinition":
            meta["namespace"] = namespace
        if kind in ("Deployment", "DaemonSet"):  # the controller, the agents
            (container,) = _on_the_node(doc, namespace)
        if kind == "DaemonSet":  # the agents' ports, free ones where the defaults are taken
            for env_var in container["env"]:
                for key in ("metrics", "liveness"):
                    if env_var["name"] == f"BLOCKCOPY_{key.upper()}_PORT":
                        env_var["value"] = str(ports[key])
            for port in container["ports"]:
                port["containerPort"] = ports["liveness" if port["name"] == "healthz"
                                              else "metrics"]
        out.append(doc)
    return out


def test_kubectl_apply_install_yaml(released, kubectl, api, vms, tmp_path):
    remove_from_containerd(*released["refs"])  # pulled again, from the registry
    assert not any(in_containerd(ref) for ref in released["refs"])
    docs = [d for d in yaml.safe_load_all((released["dir"] / "install.yaml").read_text()) if d]
    namespace = unique("rel")
    objects = adapted(docs, namespace, f"-{namespace}")
    path = tmp_path / "install.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    removable = tmp_path / "remove.yaml"
    removable.write_text(yaml.safe_dump_all(
        [d for d in objects if d["kind"] not in ("CustomResourceDefinition", "Namespace")]))
    try:
        started = time.monotonic()
        kubectl("apply", "-f", str(path))
        pod = wait_for(lambda: ready_pod(kubectl, namespace,
                                         "app.kubernetes.io/name=blockcopy-operator"),
                       180, interval=1, what="install.yaml's pod to be Running and Ready")
        print(f"kubectl apply -f install.yaml -> pod Ready (image pulled): "
              f"{time.monotonic() - started:.1f} s")
        wait_for(lambda: ready_pod(kubectl, namespace,
                                   "app.kubernetes.io/component=controller"),
                 120, interval=1, what="install.yaml's plan controller to be Running and Ready")
        assert_pulled(pod, released)
        copies_and_pivots(api, kubectl, vms, namespace, pod)
    finally:
        kubectl("delete", "-f", str(removable), "--wait=true", "--ignore-not-found",
                check=False)
        release_namespace(api, kubectl, namespace)
