"""The libvirt driver against the real libvirtd: observation, copy, pivot, cancel,
bandwidth, and BLOCK_JOB_2 events delivered on an asyncio loop through libvirtaio."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time

import pytest

import testvm
from blockcopy.api import Flag
from blockcopy.hypervisor import (
    Hypervisor,
    HypervisorError,
    HypervisorUnavailable,
    use_asyncio_loop,
)
from blockcopy.observation import JobEvent, MirrorReady

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def libvirtd():
    subprocess.run([os.path.join(os.path.dirname(__file__), "..", "..", "hack", "cluster-up.sh")],
                   check=True, stdout=subprocess.DEVNULL)


@pytest.fixture
def vm():
    made = testvm.create_vm("hv", layers=2, size="128M", data_per_layer="16M")
    yield made
    testvm.destroy_vm(made)


def wait(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_observe_a_running_domain_by_name_uuid_target_and_path(vm):
    hv = Hypervisor()
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


def test_copy_with_bandwidth_then_pivot(vm):
    hv = Hypervisor()
    dest = os.path.join(vm.workdir, "copy.raw")
    hv.start_copy(vm.name, "vda", dest, fmt="raw", flags=[Flag.TRANSIENT_JOB],
                  bandwidth=1 << 20, granularity=65536, buf_size=1 << 20)
    disk = hv.observe(vm.name, "vda")
    assert disk.mirror is not None and disk.mirror.dest == dest
    assert disk.mirror.ready == MirrorReady.COPYING
    assert disk.job is not None and disk.job.bandwidth == 1 << 20
    hv.set_bandwidth(vm.name, "vda", 0)
    assert hv.observe(vm.name, "vda").job.bandwidth == 0
    wait(lambda: hv.observe(vm.name, "vda").mirror.ready == MirrorReady.READY)
    hv.pivot(vm.name, "vda")
    disk = hv.observe(vm.name, "vda")
    assert (disk.source, disk.source_format, disk.mirror, disk.job) == (dest, "raw", None, None)
    result = subprocess.run(["qemu-img", "compare", "-U", vm.chain[0], dest], capture_output=True)
    assert result.returncode == 0


def test_cancel_keeps_the_source_and_pivot_before_ready_is_refused(vm):
    hv = Hypervisor()
    dest = os.path.join(vm.workdir, "copy.qcow2")
    hv.start_copy(vm.name, "vda", dest, fmt="qcow2", flags=[], bandwidth=1 << 20)
    with pytest.raises(HypervisorError):
        hv.pivot(vm.name, "vda")  # not ready yet: libvirt refuses, the VM stays put
    hv.cancel(vm.name, "vda")
    disk = hv.observe(vm.name, "vda")
    assert (disk.source, disk.mirror, disk.job) == (vm.chain[0], None, None)


def test_persistent_domain_needs_transient_job():
    vm = testvm.create_vm("hv-persistent", persistent=True)
    try:
        hv = Hypervisor()
        assert hv.observe(vm.name, "vda").domain_persistent
        with pytest.raises(HypervisorError, match="transient"):
            hv.start_copy(vm.name, "vda", os.path.join(vm.workdir, "c.qcow2"), fmt="qcow2",
                          flags=[])
        hv.start_copy(vm.name, "vda", os.path.join(vm.workdir, "c.qcow2"), fmt="qcow2",
                      flags=[Flag.TRANSIENT_JOB])
        assert hv.observe(vm.name, "vda").mirror is not None
        hv.cancel(vm.name, "vda")
    finally:
        testvm.destroy_vm(vm)


@pytest.fixture(scope="session")
def event_loop_thread():
    """libvirtaio binds the process's libvirt event handling to one loop for good, so that
    loop must outlive every later libvirt call of this process: run it in its own thread."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True, name="libvirt-events").start()
    asyncio.run_coroutine_threadsafe(_register(), loop).result(10)
    return loop


async def _register():
    use_asyncio_loop(asyncio.get_running_loop())


def test_block_job_events_arrive_on_the_asyncio_loop(vm, event_loop_thread):
    async def scenario():
        hv = Hypervisor()
        events: asyncio.Queue = asyncio.Queue()
        hv.add_listener(lambda uuid, target, event: events.put_nowait((uuid, target, event)))
        await asyncio.to_thread(hv.version)  # opens the connection, registers the callback
        dest = os.path.join(vm.workdir, "copy.qcow2")
        await asyncio.to_thread(hv.start_copy, vm.name, "vda", dest, fmt="qcow2", flags=[])
        assert await asyncio.wait_for(events.get(), 60) == (vm.uuid, "vda", JobEvent.READY)
        # Ending a ready copy without pivot is reported as CANCELED by libvirt.
        await asyncio.to_thread(hv.cancel, vm.name, "vda")
        assert await asyncio.wait_for(events.get(), 30) == (vm.uuid, "vda", JobEvent.CANCELED)
        hv.close()

    asyncio.run_coroutine_threadsafe(scenario(), event_loop_thread).result(120)


def test_unreachable_libvirt_is_reported_as_such(tmp_path):
    hv = Hypervisor(f"qemu+unix:///system?socket={tmp_path}/nothing-here.sock")
    with pytest.raises(HypervisorUnavailable, match="cannot connect"):
        hv.observe("any", "vda")
