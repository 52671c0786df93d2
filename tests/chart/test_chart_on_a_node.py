"""The add-on as users run it: `helm install` of the chart (crds/ included) into the local
one-node cluster (hack/cluster-node.sh: kube-scheduler, kubelet, containerd + runc), so the
agent runs as the DaemonSet's pod, from this checkout's image, with the chart's security
context (read-only root file system, every capability dropped), hostPath mounts and liveness
probe; and that pod copies and pivots real VMs of the host's libvirtd.

The chart's default values, except those of deploy/local-node/values.yaml (what docs/development.md
gives a newcomer), and a few more for a machine shared with other sessions:
- the node selector and toleration of the node's taint (blockcopy.dev/test-node), which keeps
  every other release on this shared API server (installed with the defaults) off the node;
- the API server's address: it listens on the node's loopback only (127.0.0.1:16443, no
  kube-proxy), so hostNetwork=true and apiServer.host/port;
- the image: this checkout's build under a tag of its own (support/node.py: IMAGE), imported
  into the node's runtime, instead of :dev;
- watchNamespaces: the release's namespace only. Other sessions on this machine run agents and
  VMs too, and a cluster-wide agent here would claim their objects that name no node;
- userRoles.create=false: those ClusterRoles have fixed names, one release per cluster, and
  other sessions install the chart on this API server too;
- the metrics or liveness port, only if the default is taken on this machine (host network).

Every BlockCopy names the node in spec.nodeName and lives in the release's namespace.
"""

from __future__ import annotations

import grp
import json
import os
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid

import pytest
import yaml

from blockcopy.kubectl.names import RESOURCE
from blockcopy.model.api import NODE_LABEL
from support.agents import free_port
from support.cluster import apply_crd
from support.helm import one
from support.images import assert_identical, image_digest
from support.inventories import wait_domain
from support.isolation import create_namespace, delete_inventory, release_namespace, unique
from support.libvirt_probes import (
    blockjob_text,
    daemon_libvirt_version,
    live_disk_source,
    live_mirror,
    virsh,
)
from support.node import (
    API_PORT,
    IMAGE,
    IMAGE_REPOSITORY,
    IMAGE_TAG,
    TAINT_KEY,
    bring_up,
    kubelet_probe_successes,
    tag_image,
    untag_image,
)
from support.objects import BlockCopies, copy_spec
from support.paths import CHART, ROOT
from support.plans import Plans
from support.vms import IMAGES
from support.waits import wait_for

pytestmark = pytest.mark.e2e

NEXT_TAG = f"{IMAGE_TAG}-next"
LOCAL_NODE_VALUES = ROOT / "deploy" / "local-node" / "values.yaml"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def cluster_node(cluster, api) -> str:
    """The one-node cluster with this checkout's image; the node's name."""
    started = time.monotonic()
    name = bring_up()
    print(f"image build + node up: {time.monotonic() - started:.1f} s")
    return name


@pytest.fixture(scope="module")
def release(cluster_node, kubectl, cluster_helm, api, tmp_path_factory):
    """The chart installed in a namespace of its own; its DaemonSet's pod Running and Ready."""
    namespace = create_namespace(kubectl, "node")
    name = unique("bcn").replace("-", "")
    # deploy/local-node/values.yaml (what docs/development.md tells a newcomer to use), with this
    # checkout's image and the release's namespace.
    values = yaml.safe_load(LOCAL_NODE_VALUES.read_text())
    assert values["nodeSelector"] == {TAINT_KEY: "true"}
    assert values["tolerations"] == [{"key": TAINT_KEY, "operator": "Exists",
                                      "effect": "NoSchedule"}]
    assert values["hostNetwork"] is True
    values["apiServer"] = {"host": "127.0.0.1", "port": API_PORT}
    values["image"] = {"repository": IMAGE_REPOSITORY, "tag": IMAGE_TAG}
    values["watchNamespaces"] = [namespace]
    # The blockcopy-viewer/-editor ClusterRoles have fixed names, one release per cluster:
    # other sessions' releases on this API server may hold them, or need them meanwhile.
    values["userRoles"] = {"create": False}
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in ("metrics", "liveness"):  # bound on the node itself: only if free there
        if not port_free(defaults[key]["port"]):
            values[key] = {"port": free_port("0.0.0.0")}
            print(f"port {defaults[key]['port']} is busy on this machine: {key}.port "
                  f"{values[key]['port']}")
    path = tmp_path_factory.mktemp("values") / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    # The CRD as the e2e suite applies it first (other checkouts apply theirs with kubectl
    # too): helm's server-side apply of crds/ then meets the same content, not a conflict.
    apply_crd(kubectl)
    started = time.monotonic()
    cluster_helm.run("install", name, str(CHART), "--namespace", namespace, "-f", str(path))
    wait_for(lambda: ready_pod(kubectl, namespace, name), 180, interval=1,
             what="the agent's pod to be Running and Ready")
    print(f"helm install -> pod Ready: {time.monotonic() - started:.1f} s")
    # The plan controller of deploy/local-node/values.yaml runs on the node too.
    wait_for(lambda: running_controller(kubectl, namespace, name), 120, interval=1,
             what="the plan controller's pod to be Running and Ready")
    info = {"namespace": namespace, "name": name, "node": cluster_node, "values": path,
            "ports": {k: (values.get(k) or defaults[k])["port"] for k in ("metrics", "liveness")},
            "docs": cluster_helm.manifest(name, namespace)}
    yield info
    for pod_name in [*pods_of(kubectl, namespace, name),
                     *(p["metadata"]["name"] for p in pods(kubectl, namespace, name,
                                                           controller=True))]:
        print(f"--- kubectl logs {pod_name} ---\n{logs(kubectl, namespace, pod_name)[-6000:]}")
    cluster_helm.run("uninstall", name, "--namespace", namespace, "--wait", check=False)
    untag_image(f"{IMAGE_REPOSITORY}:{NEXT_TAG}")
    release_namespace(api, kubectl, namespace)
    # The node inventory its agent published (cluster-scoped, named after the node; an agent
    # of another release on this node writes it again).
    delete_inventory(api, cluster_node)


def pods(kubectl, namespace: str, release: str, *, controller: bool = False) -> list[dict]:
    """The release's agent pods (or, ``controller``, its plan controller's)."""
    component = "app.kubernetes.io/component" + ("=" if controller else "!=") + "controller"
    out = kubectl("get", "pods", "--namespace", namespace, "-o", "json", "-l",
                  f"app.kubernetes.io/instance={release},{component}").stdout
    return json.loads(out)["items"]


def running_controller(kubectl, namespace: str, release: str) -> dict | None:
    found = pods(kubectl, namespace, release, controller=True)
    ready = [p for p in found if p["status"].get("phase") == "Running" and
             {c["type"]: c["status"] for c in p["status"].get("conditions", [])}
             .get("Ready") == "True"]
    return ready[0] if len(found) == 1 and ready else None


def pods_of(kubectl, namespace: str, release: str) -> list[str]:
    return [p["metadata"]["name"] for p in pods(kubectl, namespace, release)]


def ready_pod(kubectl, namespace: str, release: str, *, not_uid: str | None = None
              ) -> dict | None:
    """The release's one pod once it is Running and Ready (and, with ``not_uid``, once it is
    another pod than that one and the old one is gone)."""
    found = pods(kubectl, namespace, release)
    if len(found) != 1:
        return None
    (pod,) = found
    if pod["metadata"].get("deletionTimestamp") or pod["metadata"]["uid"] == not_uid:
        return None
    ready = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
    if pod["status"].get("phase") == "Running" and ready.get("Ready") == "True":
        return pod
    return None


def logs(kubectl, namespace: str, pod: str) -> str:
    return kubectl("logs", pod, "--namespace", namespace, check=False).stdout


def scrape(pod: dict, port: int) -> str:
    """GET /metrics from the pod's own address (the node's: host network)."""
    url = f"http://{pod['status']['podIP']}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


def sample(metrics: str, name: str) -> float:
    """The value of one sample line (``name`` includes its labels)."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} in the metrics")


def bcs(api, kubectl, release) -> BlockCopies:
    return BlockCopies(api, release["namespace"], kubectl)


def phases(core, blockcopies: BlockCopies, name: str) -> list[str]:
    """The phases the object went through, from its Events ("Copying: copying ...")."""
    return [e.message.split(":", 1)[0] for e in blockcopies.events(core, name)]


# ------------------------------------------------------------------ the pod


def test_the_pod_runs_with_the_charts_settings(release, kubectl, core):
    ns, rel, node = release["namespace"], release["name"], release["node"]
    pod = ready_pod(kubectl, ns, rel)
    assert pod is not None
    name = pod["metadata"]["name"]
    assert pod["spec"]["nodeName"] == node
    (container,) = pod["spec"]["containers"]
    assert container["image"] == IMAGE
    ds = one(release["docs"], "DaemonSet")
    assert container["securityContext"] == \
        ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]

    # kubectl logs (API server -> kubelet -> containerd): the agent's startup lines.
    text = logs(kubectl, ns, name)
    assert f"agent ready on node {node} (allowed destination roots: /var/lib/libvirt/images)" \
        in text, text
    # Through the socket: the image's libvirt client (Debian 12's) talks to the host's
    # libvirtd, whose version it reports (9.0.0 on the stock stack, 11.3.0 on backports).
    assert f"libvirt {daemon_libvirt_version()} at qemu:///system" in text, text

    # Inside the container: what the security context promises.
    proc = kubectl("exec", name, "--namespace", ns, "--", "sh", "-c",
                   "grep CapEff /proc/self/status; touch /probe 2>&1; id -u", check=False)
    # CAP_DAC_READ_SEARCH (bit 2) only: the check at the switch reads QEMU's 0600 images.
    assert "CapEff:\t0000000000000004" in proc.stdout, proc.stdout + proc.stderr
    assert "Read-only file system" in proc.stdout, proc.stdout
    assert proc.stdout.strip().endswith("0")  # uid 0 for libvirt's socket

    # The liveness probe: run by the kubelet and passing (its own counters), no restart.
    successes = wait_for(lambda: kubelet_probe_successes(ns, name), 90, interval=2,
                         what="the kubelet to run the liveness probe with success")
    print(f"liveness probe successes so far: {successes}")
    pod = ready_pod(kubectl, ns, rel)
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
    events = json.loads(kubectl("get", "events", "--namespace", ns, "-o", "json",
                                "--field-selector", f"involvedObject.name={name}").stdout)
    # (The readiness probe may fail once, while the agent starts; the liveness probe never.)
    assert not [e["message"] for e in events["items"]
                if e["reason"] == "Unhealthy" and e["message"].startswith("Liveness")]


def test_the_pod_copies_and_pivots_a_vm(release, kubectl, api, core, vms):
    ns, rel, node = release["namespace"], release["name"], release["node"]
    blockcopies = bcs(api, kubectl, release)
    vm = vms(name="pod", layers=2)
    dest = f"{vm.workdir}/copy.qcow2"
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest))
    started = time.monotonic()
    status = blockcopies.wait_phase(name, "Mirrored")
    print(f"Mirrored after {time.monotonic() - started:.1f} s")
    obj = blockcopies.get(name)
    assert obj["metadata"]["labels"][NODE_LABEL] == node and status["nodeName"] == node
    mirror = live_mirror(vm)
    assert mirror is not None and mirror["source"] == dest and mirror.get("ready") == "yes"

    pod = ready_pod(kubectl, ns, rel)
    metrics = scrape(pod, release["ports"]["metrics"])
    assert sample(metrics, 'blockcopy_objects{phase="Mirrored"}') >= 1
    assert sample(metrics, "blockcopy_copied_bytes_total") > 0

    blockcopies.patch_spec(name, {"pivot": True})
    blockcopies.wait_phase(name, "Pivoted")
    print(f"Pivoted after {time.monotonic() - started:.1f} s")
    # (Events carry seconds: Copying and Mirrored of a small disk share one.)
    seen = phases(core, blockcopies, name)
    # ... and the check at the switch, made in the pod (it reads QEMU's images: the chart's
    # CAP_DAC_READ_SEARCH), matched: its Event is the one that is not a phase.
    checks = [m for m in seen if "sampled blocks" in m]
    assert len(checks) == 1 and "matched on source and destination" in checks[0], seen
    assert sorted(set(seen) - set(checks)) == ["Copying", "Mirrored", "Pivoted", "Pivoting"], \
        seen
    # libvirt: the VM runs on the copy, and the copy holds the disk's data.
    xml = virsh("dumpxml", vm.name)
    assert f"<source file='{dest}'" in xml, xml
    assert live_disk_source(vm) == dest and live_mirror(vm) is None
    assert_identical(vm.chain[0], dest)
    assert image_digest(dest, "qcow2") == vm.initial_digest
    # ... and that pod did it.
    text = logs(kubectl, ns, pod["metadata"]["name"])
    assert f"{ns}/{name}: claimed for node {node}" in text
    assert f"{ns}/{name}: Pivoted: the VM now runs on {dest}" in text, text[-3000:]


def test_a_plan_moves_a_vm_into_directories_the_pod_may_not_write(release, kubectl, api, vms):
    """[X] through the chart: the controller's pod plans from the inventory the agent's pod
    published; the pod mounts the roots read-only, so libvirt makes the child's missing
    destination directories (owner, group and mode like the source's) and deletes the source
    image once no domain uses it (sourceRetention: Delete)."""
    ns, node = release["namespace"], release["node"]
    vm = vms(name="plan", layers=1)
    workdir = pathlib.Path(vm.workdir)
    os.chown(workdir, 0, grp.getgrnam("kvm").gr_gid)  # something libvirt has to set
    workdir.chmod(0o751)
    dst_prefix = IMAGES.parent / f"blockcopy-moved-{uuid.uuid4().hex[:8]}"
    dest = dst_prefix / workdir.name / pathlib.Path(vm.chain[0]).name
    plans = Plans(api, ns)
    try:
        wait_domain(api, node, vm.name, lambda d: d is not None, timeout=60)
        plan = plans.create(f"{vm.name}-plan", {
            "source": {"pathPrefix": str(IMAGES), "domains": [vm.name]},
            "destination": {"pathPrefix": str(dst_prefix)}, "pivot": "Automatic",
            "sourceRetention": "Delete"})
        status = plans.wait_phase(plan, "Completed", "Failed", timeout=240)
        assert status["phase"] == "Completed", status
        assert (status["total"], status["pivoted"]) == (1, 1), status
        assert live_disk_source(vm) == str(dest) and live_mirror(vm) is None
        assert image_digest(str(dest), "qcow2") == vm.initial_digest
        # (The agent reclaims after the pivot: the plan may be Completed first.)
        reclaimed = wait_for(lambda: plans.children(plan)[0]["status"].get("reclaimedSources"),
                             30, what="the child's reclaimedSources")
        assert reclaimed == {"deleted": [vm.chain[0]], "kept": []}
        assert not os.path.exists(vm.chain[0])
        for made, like in ((dest.parent, workdir), (dst_prefix, IMAGES)):
            assert (made.stat().st_uid, made.stat().st_gid, made.stat().st_mode) == \
                (like.stat().st_uid, like.stat().st_gid, like.stat().st_mode), made
        pod = ready_pod(kubectl, ns, release["name"])
        assert pod is not None
        text = logs(kubectl, ns, pod["metadata"]["name"])
        assert f"made {dest.parent} through libvirt" in text, text[-3000:]
        assert f"deleted {vm.chain[0]} through libvirt" in text, text[-3000:]
    finally:
        for made_plan in plans.made:
            plans.delete(made_plan)
        shutil.rmtree(dst_prefix, ignore_errors=True)


# ------------------------------------------------------------------ destinations


@pytest.fixture
def loop_device(tmp_path):
    """A 64 MiB loop device (its backing file in pytest's tmp dir); detached afterwards
    (lazily: a VM may still hold it)."""
    backing = tmp_path / "loop-backing.img"
    subprocess.run(["truncate", "-s", "64M", str(backing)], check=True)
    device = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                            capture_output=True, text=True).stdout.strip()
    yield device
    subprocess.run(["losetup", "-d", device], check=False)


def test_destination_checks_inside_the_pod(release, kubectl, api, vms, loop_device):
    """The checks run in the container's mount namespace, where only the allowed roots are
    mounted (read-only) from the host."""
    node = release["node"]
    blockcopies = bcs(api, kubectl, release)
    vm = vms(name="dest", size="64M")

    def refused(dest: str, reason: str, text: str, **fields) -> dict:
        name = blockcopies.create(copy_spec(vm, node=node, dest=dest, **fields))
        status = blockcopies.wait_phase(name, "Failed")
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == reason, status
        assert text in status["message"], status["message"]
        return status

    # Outside the mounted roots: refused, no file anywhere.
    outside = f"/var/tmp/bct-outside-{uuid.uuid4().hex[:6]}"
    os.makedirs(outside)
    try:
        refused(f"{outside}/x.qcow2", "DestNotAllowed", "is outside the allowed paths")
        # A symlink inside a root that leads out of it.
        os.symlink(outside, f"{vm.workdir}/escape")
        refused(f"{vm.workdir}/escape/y.qcow2", "DestNotAllowed",
                f"(resolves to {outside}/y.qcow2) is outside the allowed paths")
        assert os.listdir(outside) == []
    finally:
        os.rmdir(outside)
    # A host device path: /dev is not an allowed root (nor mounted in the pod).
    refused(loop_device, "DestNotAllowed", "is outside the allowed paths",
            format="raw", flags=["reuseExternal"])
    # A block device node under a root (mknod on the host: what a directory of device nodes
    # gives). The container may not open it (device cgroup): without spec.format the agent
    # cannot learn the format and says so; with it, the copy works (size from sysfs).
    rdev = os.stat(loop_device).st_rdev
    node_path = f"{vm.workdir}/copy.blk"
    subprocess.run(["mknod", node_path, "b", str(os.major(rdev)), str(os.minor(rdev))],
                   check=True)
    refused(node_path, "DestUnreadable", "set spec.format", flags=["reuseExternal"])
    name = blockcopies.create(copy_spec(vm, node=node, dest=node_path, format="raw",
                                        flags=["reuseExternal"], pivot=True))
    blockcopies.wait_phase(name, "Pivoted")
    xml = virsh("dumpxml", vm.name)
    assert "<disk type='block'" in xml and f"<source dev='{node_path}'" in xml, xml
    result = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw",
                             vm.chain[0], loop_device], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ upgrade, uninstall


def test_helm_upgrade_while_mirrored_adopts_the_job(release, kubectl, api, core, vms,
                                                    cluster_helm):
    ns, rel, node = release["namespace"], release["name"], release["node"]
    blockcopies = bcs(api, kubectl, release)
    vm = vms(name="upgrade")
    dest = f"{vm.workdir}/copy.qcow2"
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest))
    before = blockcopies.wait_phase(name, "Mirrored")
    old = ready_pod(kubectl, ns, rel)
    job = blockjob_text(vm)

    # A new image tag (the same build under another name: what a registry push gives).
    tag_image(IMAGE, f"{IMAGE_REPOSITORY}:{NEXT_TAG}")
    started = time.monotonic()
    cluster_helm.run("upgrade", rel, str(CHART), "--namespace", ns, "--reuse-values",
                     "--set", f"image.tag={NEXT_TAG}")
    new = wait_for(lambda: ready_pod(kubectl, ns, rel, not_uid=old["metadata"]["uid"]), 180,
                   interval=1, what="the new pod to replace the old one")
    print(f"helm upgrade -> new pod Ready: {time.monotonic() - started:.1f} s")
    assert new["spec"]["containers"][0]["image"] == f"{IMAGE_REPOSITORY}:{NEXT_TAG}"

    # The job ran on in libvirt while the agent was replaced, and the new pod owns the copy.
    assert blockcopies.status(name)["phase"] == "Mirrored"
    mirror = live_mirror(vm)
    assert mirror is not None and mirror["source"] == dest and mirror.get("ready") == "yes"
    assert blockjob_text(vm) == job
    def reports_mirrored():
        return sample(scrape(new, release["ports"]["metrics"]),
                      'blockcopy_objects{phase="Mirrored"}') >= 1
    wait_for(reports_mirrored, 30, interval=1, what="the new pod to count the Mirrored copy")

    blockcopies.patch_spec(name, {"pivot": True})
    after = blockcopies.wait_phase(name, "Pivoted")
    assert live_disk_source(vm) == dest and live_mirror(vm) is None
    assert_identical(vm.chain[0], dest)
    # No second job: the one started before the upgrade is the one that pivoted.
    assert after["startTime"] == before["startTime"]
    assert phases(core, blockcopies, name).count("Copying") == 1
    text = logs(kubectl, ns, new["metadata"]["name"])
    assert f"{ns}/{name}: Pivoted: the VM now runs on {dest}" in text, text[-3000:]
    assert f"{ns}/{name}: Copying" not in text and f"{ns}/{name}: claimed" not in text


def test_helm_uninstall_keeps_the_crd_and_the_objects(release, kubectl, api, cluster_helm):
    ns, rel, node = release["namespace"], release["name"], release["node"]
    blockcopies = bcs(api, kubectl, release)
    # One more object the agent never gets to (another node's): kept too.
    blockcopies.create(copy_spec("bct-none", node=unique("nobody"),
                                 dest="/var/lib/libvirt/images/none.qcow2"), name="untouched")
    before = {o["metadata"]["name"]: o.get("status", {}).get("phase") for o in
              json.loads(kubectl("get", "bc", "--namespace", ns, "-o", "json").stdout)["items"]}
    cluster_helm.run("uninstall", rel, "--namespace", ns, "--wait")
    wait_for(lambda: not pods(kubectl, ns, rel), 60, what="the agent's pod to be gone")
    assert kubectl("get", "daemonset", "--namespace", ns, "-o", "name").stdout.strip() == ""
    kubectl("get", "crd", RESOURCE)
    after = {o["metadata"]["name"]: o.get("status", {}).get("phase") for o in
             json.loads(kubectl("get", "bc", "--namespace", ns, "-o", "json").stdout)["items"]}
    assert after == before and "untouched" in after
    print(f"kept after helm uninstall: {after}")
    assert node
