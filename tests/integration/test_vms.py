"""Integration tests of the VM factory (tests/support/vms.py, also `python -m support.vms`)
against the real libvirt (qemu:///system), no mocks.

Needs libvirtd running (hack/cluster-up.sh starts it) and root.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest

from support.images import backing_chain, image_digest, qemu_img_compare
from support.libvirt_probes import live_disk_source, live_mirror
from support.paths import TESTS
from support.vms import (
    DEFAULT_URI,
    IMAGES,
    VM,
    build_chain,
    create_vm,
    destroy_vm,
    destroy_vm_by_name,
    expected_digest,
    parse_size,
    wait_guest_writing,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def conn():
    try:
        c = libvirt.open(DEFAULT_URI)
    except libvirt.libvirtError as e:
        pytest.fail(f"libvirt not reachable at {DEFAULT_URI} (start virtlogd/libvirtd): {e}")
    yield c
    c.close()


@pytest.fixture
def vms(vms):
    """The shared factory (VMs always destroyed at teardown), named bct-itest-* here."""
    return functools.partial(vms, name="itest")


def domain_names(conn) -> set[str]:
    return {d.name() for d in conn.listAllDomains()}


def test_two_layer_vm(conn, vms):
    vm = vms(layers=2)
    assert vm.name.startswith("bct-itest-") and len(vm.name) == len("bct-itest-") + 6
    assert vm.workdir == str(IMAGES / vm.name)
    dom = conn.lookupByName(vm.name)
    assert dom.UUIDString() == vm.uuid
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert not dom.isPersistent()
    assert vm.disk_target == "vda"

    assert len(vm.chain) == 2 and all(p.startswith(vm.workdir + "/") for p in vm.chain)
    assert live_disk_source(vm, "vda") == vm.chain[0]
    assert live_mirror(vm, "vda") is None

    info = backing_chain(vm.chain[0])
    assert [i["filename"] for i in info] == vm.chain
    assert all(i["format"] == "qcow2" for i in info)
    assert info[0]["backing-filename"] == vm.chain[1]  # absolute by default
    assert info[0]["backing-filename-format"] == "qcow2"
    assert "backing-filename" not in info[1]

    merged, base = image_digest(vm.chain[0]), image_digest(vm.chain[-1])
    assert merged == expected_digest(vm) == vm.checksum_guest_view()
    assert merged != base


def test_each_layer_changes_the_view(conn, vms):
    vm = vms(layers=3, size="32M", data_per_layer="2M")
    digests = [image_digest(p, "qcow2") for p in vm.chain]
    assert len(set(digests)) == 3
    # libvirt detected the whole chain on its own
    xml = conn.lookupByName(vm.name).XMLDesc(0)
    assert all(f"<source file='{p}'" in xml for p in vm.chain)


def test_persistent_vm(conn, vms):
    vm = vms(persistent=True)
    dom = conn.lookupByName(vm.name)
    assert vm.persistent and dom.isPersistent() and dom.isActive()
    destroy_vm(vm)
    assert vm.name not in domain_names(conn)  # undefined, not just stopped


def test_tenant_metadata(conn, vms):
    """The agent reads a domain's tenant from its live XML (blockcopy.domainxml.tenant_of),
    for the tenant policy; other metadata may sit next to it."""
    from blockcopy.core.domainxml import tenant_of

    other = '<x:note xmlns:x="https://example.com/x" text="kept"/>'
    vm = vms(tenant="team-b", metadata=other)
    xml = conn.lookupByName(vm.name).XMLDesc(0)
    assert tenant_of(xml) == "team-b"
    assert "https://example.com/x" in xml
    assert tenant_of(conn.lookupByName(vms().name).XMLDesc(0)) is None


def test_relative_backing(conn, vms):
    vm = vms(relative_backing=True)
    info = backing_chain(vm.chain[0])
    assert info[0]["backing-filename"] == os.path.basename(vm.chain[1])
    assert info[0]["full-backing-filename"] == vm.chain[1]
    assert conn.lookupByName(vm.name).isActive()
    assert live_disk_source(vm) == vm.chain[0]
    # the data is deterministic: same content as an absolute-backing chain
    assert expected_digest(vm) == expected_digest(vms())


def test_destroy_is_complete_and_idempotent(conn):
    vm = create_vm("itest")
    assert Path(vm.workdir).is_dir()
    destroy_vm(vm)
    assert vm.name not in domain_names(conn)
    assert not Path(vm.workdir).exists()
    destroy_vm(vm)
    destroy_vm_by_name("bct-never-existed")
    with pytest.raises(ValueError):
        destroy_vm_by_name("not-a-test-domain")


def test_failed_create_leaves_nothing(conn):
    before = domain_names(conn)
    with pytest.raises(ValueError):
        create_vm("bct-itest-toobig", layers=5, size="8M", data_per_layer="4M")
    assert not (IMAGES / "bct-itest-toobig").exists()
    assert domain_names(conn) == before


def test_guest_writes(conn, vms, tmp_path):
    vm = vms(guest_writes=True)
    assert conn.lookupByName(vm.name).isActive()
    waited = wait_guest_writing(vm, timeout=120)
    print(f"guest writing after {waited:.1f}s")
    log = Path(vm.console_log).read_text()
    assert "bct-guest: ready" in log
    deadline = time.monotonic() + 30
    while image_digest(vm.chain[0]) == expected_digest(vm):
        assert time.monotonic() < deadline, "guest writes never reached chain[0]"
        time.sleep(1)
    # writes land in the active layer only: the base equals a freshly built one
    fresh = build_chain(tmp_path, 2, parse_size("64M"), parse_size("4M"))
    assert image_digest(vm.chain[-1]) == image_digest(fresh[-1])


@pytest.mark.parametrize("persistent", [False, True], ids=["transient", "persistent"])
def test_virsh_blockcopy_pivot(conn, vms, persistent):
    vm = vms(persistent=persistent)
    base_before = image_digest(vm.chain[-1])
    dest = os.path.join(vm.workdir, "copy.qcow2")
    res = subprocess.run(
        [
            "virsh",
            "-c",
            vm.uri,
            "blockcopy",
            vm.name,
            "vda",
            dest,
            "--format",
            "qcow2",
            "--wait",
            "--verbose",
            "--pivot",
            "--transient-job",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert live_disk_source(vm, "vda") == dest
    assert live_mirror(vm, "vda") is None
    assert conn.lookupByName(vm.name).isActive()
    # a full copy: dest has no backing file and the same guest view as the source chain
    assert "backing-filename" not in backing_chain(dest)[0]
    cmp = qemu_img_compare(vm.chain[0], dest)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert image_digest(dest) == expected_digest(vm)
    assert image_digest(vm.chain[-1]) == base_before


def test_cli(conn):
    py = [sys.executable, "-m", "support.vms"]
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    out = subprocess.run(
        [
            *py,
            "create",
            "--name",
            "itest-cli",
            "--layers",
            "3",
            "--size",
            "32M",
            "--data-per-layer",
            "1M",
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    vm = VM(**json.loads(out))
    try:
        assert vm.name.startswith("bct-itest-cli-") and len(vm.chain) == 3
        assert conn.lookupByName(vm.name).isActive()
        digest = subprocess.run(
            [*py, "digest", vm.chain[0]], check=True, capture_output=True, text=True, env=env
        ).stdout.strip()
        assert digest == vm.initial_digest
    finally:
        subprocess.run([*py, "destroy", vm.name], check=True, env=env)
    assert vm.name not in domain_names(conn)
    assert not Path(vm.workdir).exists()


def test_live_mirror_during_copy(conn, vms):
    vm = vms()
    dest = os.path.join(vm.workdir, "slow-copy.qcow2")
    dom = conn.lookupByName(vm.name)
    destxml = f"<disk type='file'><source file='{dest}'/><driver type='qcow2'/></disk>"
    params = {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: 512 * 1024}  # slow enough to look at it
    dom.blockCopy("vda", destxml, params, libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)
    try:
        mirror = live_mirror(vm, "vda")
        assert mirror is not None
        assert mirror["job"] == "copy" and mirror["type"] == "file"
        assert mirror["source"] == dest and mirror["format"] == "qcow2"
        assert live_disk_source(vm) == vm.chain[0]
    finally:
        dom.blockJobAbort("vda", 0)
    assert live_mirror(vm, "vda") is None


def test_existing_name_is_refused(conn, vms):
    vm = vms()
    with pytest.raises(FileExistsError):
        create_vm(vm.name)
    assert conn.lookupByName(vm.name).isActive()
    assert Path(vm.chain[0]).exists()
