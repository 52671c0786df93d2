"""The pure parts of the multi-node fixture (hack/cluster-nodes.sh, support.multinode,
support.vms on a session URI): which user's QEMU a libvirt URI reaches, where a node's VMs
keep their files, and the nodes.json entry the script writes (parsed back by the helper)."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

from support import multinode, vms
from support.paths import HACK

SOCKET = "qemu+unix:///session?socket=/run/user/{uid}/libvirt/libvirt-sock"


@pytest.mark.parametrize(("uri", "uid"), [
    (SOCKET.format(uid=999), 999),
    ("qemu:///session?socket=/run/user/1000/libvirt/libvirt-sock", 1000),
    ("qemu+unix:///session/?socket=/run/user/42/libvirt/libvirt-sock&no_verify=1", 42),
    ("qemu:///system", None),
    ("qemu+unix:///system?socket=/run/libvirt/libvirt-sock", None),
    ("qemu:///session", None),  # the caller's own session: nobody to hand files to
    ("qemu+unix:///session?socket=/tmp/sock", None),
    ("test:///default", None),
])
def test_session_uid(uri, uid):
    assert vms.session_uid(uri) == uid


def test_images_root(tmp_path, monkeypatch):
    nodes = tmp_path / "nodes.json"
    monkeypatch.setattr(vms, "NODES_JSON", nodes)
    assert vms.images_root("qemu:///system") == vms.IMAGES
    assert vms.images_root("qemu:///system", tmp_path) == tmp_path
    with pytest.raises(ValueError, match="no node of"):
        vms.images_root(SOCKET.format(uid=7))
    nodes.write_text(json.dumps([
        {"name": "n-node-1", "libvirtUri": SOCKET.format(uid=7), "imagesDir": "/i/n-node-1"},
        {"name": "n-node-2", "libvirtUri": SOCKET.format(uid=8), "imagesDir": "/i/n-node-2"}]))
    assert vms.images_root(SOCKET.format(uid=8)) == pathlib.Path("/i/n-node-2")
    assert vms.images_root(SOCKET.format(uid=8), "/else") == pathlib.Path("/else")


def _node_entry(name: str, namespaces: str) -> str:
    """hack/lib/nodes.sh's nodes.json entry for ``name`` (whose user does not exist)."""
    script = f"""
set -euo pipefail
log() {{ :; }}; die() {{ echo "$*" >&2; exit 1; }}
STATE=/s NODES_STATE=/s/nodes RUN=/s/run LOGS=/s/log
PREFIX=zzunit IMAGES_ROOT=/var/lib/libvirt/images/zz NAMESPACES='{namespaces}' VENV=/v
source {HACK}/lib/nodes.sh
node_vars {name}
printf '[\\n%s\\n]\\n' "$(node_json)"
"""
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.parametrize(("index", "rack"), [(1, "r1"), (2, "r1"), (3, "r2"), (10, "r5")])
def test_node_entry(index, rack):
    name = f"zzunit-node-{index}"
    entry = json.loads(_node_entry(name, "ns-a ns-b"))[0]
    assert entry["name"] == name
    assert entry["imagesDir"] == f"/var/lib/libvirt/images/zz/{name}"
    assert entry["labels"] == {
        multinode.NODE_LABEL: name, multinode.RACK_LABEL: rack,
        multinode.GROUP_LABEL: "zzunit-nodes",
        "kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
    node = multinode.Node.from_json(entry)
    assert node.namespaces == ("ns-a", "ns-b")
    assert node.agent_log == pathlib.Path(f"/s/log/{name}.agent.log")
    assert node.agent_pid_file == pathlib.Path(f"/s/run/{name}.agent.pid")
    assert node.uid == -1  # no such user here
    assert node.agent_pid() is None


def test_node_entry_all_namespaces():
    entry = json.loads(_node_entry("zzunit-node-1", "*"))[0]
    assert multinode.Node.from_json(entry).namespaces == ()


def test_load_reads_the_list(tmp_path):
    path = tmp_path / "nodes.json"
    assert multinode.load(path) == []
    path.write_text(json.dumps([{"name": "a", "libvirtUri": SOCKET.format(uid=5),
                                 "imagesDir": "/x/a"}]))
    (node,) = multinode.load(path)
    assert (node.name, node.images_dir, node.namespaces) == ("a", pathlib.Path("/x/a"), ())
