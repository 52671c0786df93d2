"""The libvirt driver against the real libvirtd: observation, copy, pivot, cancel,
bandwidth, error classification, and BLOCK_JOB_2 events delivered on an asyncio loop
through libvirtaio."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid

import libvirt
import pytest

from blockcopy.adapters.hypervisor import LibvirtHypervisor
from blockcopy.model.api import Flag
from blockcopy.model.observation import JobEvent, MirrorReady
from blockcopy.model.ports import CopyRequest, HypervisorError, HypervisorUnavailable
from support.images import qemu_img_compare
from support.libvirt_probes import libvirt_event_loop
from support.waits import wait_for

# libvirtd is part of the local environment (hack/cluster-up.sh, through `cluster`).
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cluster")]


@pytest.fixture(scope="session")
def libvirt_loop():
    """libvirtaio binds the process's libvirt event handling to one loop for good, so that
    loop must outlive every later libvirt call of this process: the test process's one
    (support.libvirt_probes), run in a thread of its own."""
    return libvirt_event_loop()


class Driver:
    """The async driver, called from synchronous tests (each call runs on the libvirt loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, uri: str = "qemu:///system"):
        self.loop, self.hv = loop, LibvirtHypervisor(uri)

    def __getattr__(self, name):
        method = getattr(self.hv, name)

        def call(*args, **kw):
            return asyncio.run_coroutine_threadsafe(method(*args, **kw), self.loop).result(120)
        return call


@pytest.fixture
def hv(libvirt_loop):
    driver = Driver(libvirt_loop)
    yield driver
    driver.close()


@pytest.fixture
def vm(vms):
    return vms(name="hv", layers=2, size="128M", data_per_layer="16M")


def copy(vm, dest, fmt="qcow2", flags=(), **kw) -> CopyRequest:
    return CopyRequest(domain=vm.name, target="vda", dest=dest, format=fmt,
                       flags=frozenset(flags), **kw)


def test_observe_a_running_domain_by_name_uuid_target_and_path(vm, hv):
    for domain_ref in (vm.name, vm.uuid):
        for disk_ref in ("vda", vm.chain[0]):
            disk = hv.observe(domain_ref, disk_ref)
            assert disk.domain_found and disk.domain_running and disk.disk_found
            assert (disk.target, disk.source, disk.source_format) == ("vda", vm.chain[0], "qcow2")
            assert disk.backing == vm.chain[1]
            assert disk.job is None and disk.mirror is None
            assert disk.domain_uuid == vm.uuid and not disk.domain_persistent
    assert hv.observe(vm.name, "vdz").disk_found is False
    assert hv.observe("bct-no-such-domain", "vda").domain_found is False
    assert hv.has_running_domain(vm.name) and not hv.has_running_domain("bct-no-such-domain")
    # A NUL (the API server accepts one in spec.domain) is no domain, not a ValueError.
    assert not hv.has_running_domain(vm.name + "\x00")
    assert hv.observe(f"{vm.name}\x00", "vda").domain_found is False


def test_copy_with_bandwidth_then_pivot(vm, hv):
    dest = os.path.join(vm.workdir, "copy.raw")
    hv.start_copy(copy(vm, dest, "raw", [Flag.TRANSIENT_JOB], bandwidth=1 << 20,
                       granularity=65536, buf_size=1 << 20))
    disk = hv.observe(vm.name, "vda")
    assert disk.mirror is not None and disk.mirror.dest == dest
    assert disk.mirror.ready == MirrorReady.COPYING
    assert disk.job is not None and disk.job.bandwidth == 1 << 20
    hv.set_bandwidth(vm.name, "vda", 0)
    assert hv.observe(vm.name, "vda").job.bandwidth == 0
    wait_for(lambda: hv.observe(vm.name, "vda").mirror.ready == MirrorReady.READY, 60,
             interval=0.1, what="the mirror to be ready")
    hv.pivot(vm.name, "vda")
    disk = hv.observe(vm.name, "vda")
    assert (disk.source, disk.source_format, disk.mirror, disk.job) == (dest, "raw", None, None)
    result = qemu_img_compare(vm.chain[0], dest)
    assert result.returncode == 0


def test_cancel_keeps_the_source_and_pivot_before_ready_is_refused(vm, hv):
    dest = os.path.join(vm.workdir, "copy.qcow2")
    hv.start_copy(copy(vm, dest, bandwidth=1 << 20))
    with pytest.raises(HypervisorError) as refused:
        hv.pivot(vm.name, "vda")  # not ready yet: libvirt refuses, the VM stays put
    # A refusal, not an outage: the connection works (issue R: classified by its state).
    assert not isinstance(refused.value, HypervisorUnavailable), refused.value
    hv.cancel(vm.name, "vda")
    disk = hv.observe(vm.name, "vda")
    assert (disk.source, disk.mirror, disk.job) == (vm.chain[0], None, None)


def test_persistent_domain_needs_transient_job(hv, vms):
    vm = vms(name="hv-persistent", persistent=True)
    assert hv.observe(vm.name, "vda").domain_persistent
    with pytest.raises(HypervisorError, match="transient") as refused:
        hv.start_copy(copy(vm, os.path.join(vm.workdir, "c.qcow2")))
    assert not isinstance(refused.value, HypervisorUnavailable)
    hv.start_copy(copy(vm, os.path.join(vm.workdir, "c.qcow2"), flags=[Flag.TRANSIENT_JOB]))
    assert hv.observe(vm.name, "vda").mirror is not None
    hv.cancel(vm.name, "vda")


def test_block_job_events_arrive_on_the_asyncio_loop(vm, libvirt_loop):
    async def scenario():
        hv = LibvirtHypervisor()
        events: asyncio.Queue = asyncio.Queue()
        hv.add_listener(lambda uuid, target, event: events.put_nowait((uuid, target, event)))
        await hv.version()  # opens the connection, registers the callback
        await hv.start_copy(copy(vm, os.path.join(vm.workdir, "copy.qcow2")))
        assert await asyncio.wait_for(events.get(), 60) == (vm.uuid, "vda", JobEvent.READY)
        # Ending a ready copy without pivot is reported as CANCELED by libvirt.
        await hv.cancel(vm.name, "vda")
        assert await asyncio.wait_for(events.get(), 30) == (vm.uuid, "vda", JobEvent.CANCELED)
        await hv.close()

    asyncio.run_coroutine_threadsafe(scenario(), libvirt_loop).result(120)


def test_unreachable_libvirt_is_reported_as_such(libvirt_loop, tmp_path):
    hv = Driver(libvirt_loop, f"qemu+unix:///system?socket={tmp_path}/nothing-here.sock")
    with pytest.raises(HypervisorUnavailable, match="cannot connect"):
        hv.observe("any", "vda")


@pytest.fixture
def read_only_dir():
    """A read-only tmpfs under the images root: libvirtd (in the host's mount namespace)
    sees it, and creating a file in it fails with EROFS inside libvirtd."""
    path = f"/var/lib/libvirt/images/bct-ro-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    os.mkdir(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64M,mode=0755", "tmpfs", path],
                   check=True)
    yield path
    subprocess.run(["umount", "-l", path], check=True)
    os.rmdir(path)


def test_an_os_error_inside_libvirtd_is_a_refusal_not_an_outage(vm, hv, read_only_dir):
    """libvirtd reports its own failure to create the copy target as VIR_ERR_SYSTEM_ERROR,
    the code it also uses for a broken connection: the driver must call it a refusal (with
    libvirt's message) because the connection still works."""
    dest = os.path.join(read_only_dir, "copy.qcow2")
    with pytest.raises(HypervisorError) as refused:
        hv.start_copy(copy(vm, dest))
    assert not isinstance(refused.value, HypervisorUnavailable), refused.value
    assert refused.value.code == libvirt.VIR_ERR_SYSTEM_ERROR, refused.value
    assert "Read-only file system" in str(refused.value)
    disk = hv.observe(vm.name, "vda")  # the same connection goes on working
    assert (disk.source, disk.mirror, disk.job) == (vm.chain[0], None, None)
    assert os.listdir(read_only_dir) == []


def _state(vm) -> int:
    with libvirt.open(vm.uri) as conn:
        return conn.lookupByName(vm.name).state()[0]


def test_pauses_are_marked_resumed_once_and_never_someone_elses(vm, hv):
    """The check at the switch's pause: marked in the live metadata, so that the node's next
    agent resumes a VM its predecessor left paused; a VM paused by anyone else is left alone
    (not marked, not resumed)."""
    assert hv.pause(vm.name, "node-a") is True
    assert _state(vm) == libvirt.VIR_DOMAIN_PAUSED
    assert 'node="node-a"' in subprocess.run(
        ["virsh", "-c", vm.uri, "metadata", vm.name, "https://blockcopy.dev/pause/v1"],
        capture_output=True, text=True, check=True).stdout
    assert hv.pause(vm.name, "node-a") is True  # ours already (a resume that failed before)
    hv.resume(vm.name, "node-b")  # another node's agent: not its pause
    assert _state(vm) == libvirt.VIR_DOMAIN_PAUSED
    assert hv.resume_left_paused("node-b") == []
    assert hv.resume_left_paused("node-a") == [vm.name]  # the next agent of node-a
    assert _state(vm) == libvirt.VIR_DOMAIN_RUNNING
    assert hv.resume_left_paused("node-a") == []  # the mark is gone
    # Paused by someone else: the agent checks it as it is and never resumes it.
    with libvirt.open(vm.uri) as conn:
        conn.lookupByName(vm.name).suspend()
    assert hv.pause(vm.name, "node-a") is False
    hv.resume(vm.name, "node-a")
    assert hv.resume_left_paused("node-a") == []
    assert _state(vm) == libvirt.VIR_DOMAIN_PAUSED
    # QMP stop on the paused VM flushes and leaves it paused; job_progress without a job.
    hv.flush_images(vm.name)
    assert _state(vm) == libvirt.VIR_DOMAIN_PAUSED
    assert hv.job_progress(vm.name, "vda") is None
