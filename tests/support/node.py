"""The one-node cluster of hack/cluster-node.sh, for the tests that run the chart's DaemonSet
as a real pod: bringing the node up with this checkout's agent image, the node's name, taint
and address, its containerd (images), and its kubelet (probe counters).

The agent image is built from this checkout (hack/build-image.sh, layer-cached) under a tag of
its own, IMAGE, not the shared localhost/blockcopy-operator:dev, which other checkouts on this
machine rebuild from their own sources at any time."""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import urllib.request

from support.paths import HACK, STATE

IMAGE_REPOSITORY = "localhost/blockcopy-operator"
IMAGE_TAG = "node-e2e"
IMAGE = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
TAINT_KEY = "blockcopy.dev/test-node"
NODE_NAME = os.environ.get("BLOCKCOPY_NODE_NAME") or socket.gethostname()
SOCK = STATE / "node" / "containerd" / "containerd.sock"
KUBELET_PORT = int(os.environ.get("BLOCKCOPY_KUBELET_PORT", "10250"))
# What the chart needs on this node, besides its defaults: the image, the node selector and
# toleration of the node's taint, and the API server's address (it listens on the node's
# loopback only, so the agent uses the host's network and that address).
API_PORT = int(os.environ.get("BLOCKCOPY_API_PORT", "16443"))


def bring_up(image: str = IMAGE) -> str:
    """This checkout's agent image built as ``image``, then the node up with it imported
    (both idempotent and cached). Returns the node's name."""
    env = {**os.environ, "BLOCKCOPY_STATE_DIR": str(STATE)}
    subprocess.run([str(HACK / "build-image.sh")], check=True, env={**env, "IMAGE": image},
                   stdout=subprocess.DEVNULL)
    subprocess.run([str(HACK / "cluster-node.sh")], check=True,
                   env={**env, "BLOCKCOPY_NODE_IMAGES": image}, stdout=subprocess.DEVNULL)
    return NODE_NAME


def ctr(*args: str) -> str:
    """containerd's CLI against the node's containerd, in the Kubernetes namespace."""
    return subprocess.run(["ctr", "--address", str(SOCK), "--namespace", "k8s.io", *args],
                          check=True, capture_output=True, text=True).stdout


def tag_image(source: str, target: str) -> None:
    """A second name for an image the node has (what a registry push of a new tag gives)."""
    ctr("images", "tag", "--force", source, target)


def untag_image(name: str) -> None:
    subprocess.run(["ctr", "--address", str(SOCK), "--namespace", "k8s.io", "images", "rm",
                    name], check=False, capture_output=True)


def kubelet_probe_successes(namespace: str, pod: str, probe: str = "Liveness") -> int:
    """How many times the kubelet ran the pod's ``probe`` with success, from its own
    /metrics/probes (the API server refuses to proxy to a node on a loopback address)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the kubelet's self-signed serving certificate
    url = f"https://127.0.0.1:{KUBELET_PORT}/metrics/probes"
    with urllib.request.urlopen(url, context=context, timeout=10) as resp:
        text = resp.read().decode()
    total = 0
    for line in text.splitlines():
        if not line.startswith("prober_probe_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if (labels.get("namespace"), labels.get("pod"), labels.get("probe_type"),
                labels.get("result")) == (namespace, pod, probe, "successful"):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total
