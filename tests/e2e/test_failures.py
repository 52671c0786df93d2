"""Issue B end to end, failures: every failure ends in Failed (or stays on the source) with the
reason in the message, the Failed condition and a Warning Event, the source intact and the VM
running where it ran. Real kube-apiserver + etcd, real libvirtd + QEMU, the agent as a process.

Each test runs its own agent under its unique node name, watching only its own namespace, and
routes its objects to it with spec.nodeName (tests/support/isolation.py), so that agents of
other test sessions on this machine (which share the API server and libvirtd) never act on
them.

Which libvirt failure each test provokes, and how:
- test_dest_fills_up_job_failed: QEMU's mirror hits ENOSPC writing the destination (a 16M
  tmpfs for 96M of data) -> BLOCK_JOB_2 FAILED.
- test_transient_vm_destroyed_mid_job: `virsh destroy` of a transient domain mid-copy -> the
  domain is gone (lookup: VIR_ERR_NO_DOMAIN).
- test_persistent_vm_stopped_mid_job: `virsh destroy` of a persistent domain mid-copy -> the
  domain is shut off, the transient job is lost.
- test_domain_not_found / test_disk_not_found / test_domain_not_running: lookups of a missing
  domain, a missing disk target, a defined but shut-off domain (no job is ever started).
- test_dest_exists_without_reuse_external / test_dest_not_creatable /
  test_dest_outside_allowed_roots* / test_allowed_path_option: refused by the agent before
  libvirt is called (no blockCopy call at all).
- test_invalid_spec_*: refused by the API server (the CRD's rules), the agent unaffected.
- test_second_copy_on_busy_disk: the disk already has a block job (libvirt would refuse a
  second one with "block copy still active"; the agent refuses first).
- test_pivot_refused_then_retried / test_pivot_refused_retry_backs_off:
  virDomainBlockJobAbort(PIVOT) failing, by fault injection (tests/e2e/faulty_agent.py, started
  by the same launcher as the agent: support.agents.FAULTY), since a real libvirt accepts a
  pivot once the mirror is ready.
- test_libvirt_unreachable_then_back / test_libvirt_unreachable_retry_backs_off: the agent's
  libvirt connection goes through a socat proxy that is killed (connection reset, then
  connection refused) and, in the first test, restarted.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid

from support.agents import FAULTY, Agent
from support.assertions import assert_on_source, assert_untouched
from support.images import file_sha256, image_digest
from support.libvirt_probes import (
    block_job_info,
    domstate,
    inactive_xml,
    live_disk_source,
    live_mirror,
    no_block_job,
    virsh,
)
from support.objects import condition, copy_spec
from support.proxies import UnixProxy
from support.vms import expected_digest
from support.waits import events_of, status_where, wait_for

SLOW = {"size": "256M", "data_per_layer": "64M"}  # ~128M to copy: minutes at 1Mi/s


# ---------------------------------------------------------------- helpers


def _warnings(blockcopies, core, name: str, reason: str) -> list:
    return events_of(blockcopies, core, name, reason, type="Warning")()


def _assert_failed(blockcopies, core, name: str, reason: str, *, timeout: float = 90,
                   message: str | None = None) -> dict:
    """Failed, with the reason in the condition and a Warning Event, and a message."""
    status = blockcopies.wait_phase(name, "Failed", "Pivoted", "Aborted", timeout=timeout)
    assert status["phase"] == "Failed", status
    failed = condition(status, "Failed")
    assert failed is not None and failed["status"] == "True", status
    assert failed["reason"] == reason, status
    assert status["message"] and failed["message"] == status["message"], status
    if message is not None:
        assert re.search(message, status["message"]), status["message"]
    assert status.get("completionTime"), status
    events = wait_for(events_of(blockcopies, core, name, reason, type="Warning"), 15)
    assert len(events) == 1, [(e.reason, e.message) for e in events]
    assert status["message"] in events[0].message, (events[0].message, status["message"])
    return status


def _wait_copying(blockcopies, name: str, timeout: float = 60) -> dict:
    return blockcopies.wait_copying(name, counter="end", above=1, timeout=timeout)


# ---------------------------------------------------------------- 1. job FAILED


def test_dest_fills_up_job_failed(agent_factory, node, vms, blockcopies, core):
    """The destination passes the space check (a copy that cannot fit never starts:
    tests/e2e/test_layouts.py) and fills up anyway, because the guest keeps writing new data
    during the copy: QEMU's mirror hits ENOSPC, the job fails, the VM stays on its source and
    status says which file was left behind."""
    agent_factory(node)
    # A 24M tmpfs under the allowed root. Mounted before the VM starts: QEMU runs in a
    # private mount namespace (libvirt's default) that would not see a mount made later on
    # this machine (no shared propagation in the container).
    small = f"/var/lib/libvirt/images/bct-tmpfs-{uuid.uuid4().hex[:6]}"
    os.mkdir(small)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24M,mode=0755", "tmpfs", small],
                   check=True)
    try:
        # 4M of data when the copy starts; the guest then writes 1 MiB every ~0.2 s over the
        # whole 256M disk: the mirror's destination grows past 24M within seconds.
        vm = vms(layers=1, size="256M", data_per_layer="4M", guest_writes=True,
                 guest_load_mib=1)
        dest = os.path.join(small, "copy.qcow2")
        name = blockcopies.create(copy_spec(vm, node=node, dest=dest, pivot=False))
        status = _assert_failed(blockcopies, core, name, "JobFailed", timeout=180,
                                message="failed")
        # The copy did start (libvirt created the file) and then failed on a full disk.
        assert status.get("startTime"), status
        assert os.path.exists(dest)
        assert status["createdFiles"] == [dest]
        assert f"left in place: {dest}" in status["message"]
        assert shutil.disk_usage(small).free < 2 << 20
        assert live_disk_source(vm, "vda") == vm.chain[0]
        assert live_mirror(vm, "vda") is None and no_block_job(vm)
        assert domstate(vm) == "running"
    finally:
        if subprocess.run(["umount", small]).returncode != 0:
            subprocess.run(["umount", "-l", small], check=True)
        os.rmdir(small)


# ---------------------------------------------------------------- 2. VM gone / stopped


def test_transient_vm_destroyed_mid_job(agent_factory, node, vms, blockcopies, core):
    agent_factory(node)
    vm = vms(**SLOW)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, bandwidth="1Mi", pivot=True))
    _wait_copying(blockcopies, name)
    assert live_mirror(vm, "vda")["source"] == dest
    virsh("destroy", vm.name)

    _assert_failed(blockcopies, core, name, "DomainGone", message="disappeared")
    # A transient domain is gone for good; its images are exactly as they were.
    assert vm.name not in virsh("list", "--all", "--name").split()
    assert image_digest(vm.chain[0], "qcow2") == expected_digest(vm)


def test_persistent_vm_stopped_mid_job(agent_factory, node, vms, blockcopies, core):
    agent_factory(node)
    vm = vms(persistent=True, **SLOW)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, bandwidth="1Mi", pivot=True))
    status = _wait_copying(blockcopies, name)
    assert "transientJob" in status["flags"]
    virsh("destroy", vm.name)  # a persistent domain stays defined, shut off

    _assert_failed(blockcopies, core, name, "DomainStopped", message="stopped")
    assert domstate(vm) == "shut off"
    inactive = inactive_xml(vm)
    assert f"<source file='{vm.chain[0]}'" in inactive, inactive
    assert dest not in inactive and "<mirror" not in inactive, inactive
    assert image_digest(vm.chain[0], "qcow2") == expected_digest(vm)


# ---------------------------------------------------------------- 3. not found / not running


def test_domain_not_found(agent_factory, node, vms, blockcopies, core):
    agent_factory(node)
    missing = f"bct-missing-{uuid.uuid4().hex[:6]}"
    dest = f"/var/lib/libvirt/images/{missing}.qcow2"
    name = blockcopies.create(copy_spec(missing, node=node, dest=dest))
    _assert_failed(blockcopies, core, name, "DomainNotFound", message=missing)
    assert not os.path.lexists(dest)


def test_disk_not_found(agent_factory, node, vms, blockcopies, core):
    agent_factory(node)
    vm = vms()
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, disk="vdz"))
    _assert_failed(blockcopies, core, name, "DiskNotFound", message="vdz")
    assert not os.path.lexists(dest)
    assert_on_source(vm)


def test_domain_not_running(agent_factory, node, vms, blockcopies, core):
    agent_factory(node)
    vm = vms(persistent=True)
    virsh("destroy", vm.name)
    assert domstate(vm) == "shut off"
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest))
    _assert_failed(blockcopies, core, name, "DomainNotRunning", message="not running")
    assert not os.path.lexists(dest)
    assert domstate(vm) == "shut off"  # the agent never starts a VM
    assert f"<source file='{vm.chain[0]}'" in inactive_xml(vm)


# ---------------------------------------------------------------- 4. dest exists / not creatable


def test_dest_exists_without_reuse_external(agent_factory, node, vms, blockcopies, core):
    agent_factory(node)
    vm = vms()
    dest = os.path.join(vm.workdir, "precious.img")
    with open(dest, "wb") as f:
        f.write(os.urandom(1 << 20))
    before = file_sha256(dest)
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, pivot=True))
    _assert_failed(blockcopies, core, name, "DestExists", message="reuseExternal")
    assert file_sha256(dest) == before
    assert_on_source(vm)


def test_dest_not_creatable(agent_factory, node, vms, blockcopies, core):
    agent_factory(node)
    vm = vms()
    missing_dir = os.path.join(vm.workdir, "no-such-dir")
    dest = os.path.join(missing_dir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, pivot=True))
    _assert_failed(blockcopies, core, name, "DestNotCreatable", message="does not exist")
    assert not os.path.lexists(missing_dir)
    assert_on_source(vm)


def test_read_only_destination_is_a_refusal_with_libvirts_message(agent_factory, node, vms,
                                                                  blockcopies, core):
    """libvirtd cannot create the copy target (EROFS inside libvirtd, reported as
    VIR_ERR_SYSTEM_ERROR, the code of a broken connection too): the copy ends Failed
    (CopyRefused) with libvirt's message at once, never retried as an outage."""
    agent_factory(node)
    vm = vms()
    ro = f"/var/lib/libvirt/images/bct-ro-{uuid.uuid4().hex[:6]}"
    os.mkdir(ro)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64M,mode=0755", "tmpfs", ro],
                   check=True)
    try:
        dest = os.path.join(ro, "copy.qcow2")
        name = blockcopies.create(copy_spec(vm, node=node, dest=dest, pivot=True))
        status = _assert_failed(blockcopies, core, name, "CopyRefused",
                                message="Read-only file system")
        assert not _warnings(blockcopies, core, name, "LibvirtUnreachable")
        assert os.listdir(ro) == []
        assert_on_source(vm)
        assert "createdFiles" not in status or status["createdFiles"] == [], status
    finally:
        subprocess.run(["umount", "-l", ro], check=True)
        os.rmdir(ro)


# ---------------------------------------------------------------- 5. allowed roots


def test_dest_outside_allowed_roots(agent_factory, node, vms, blockcopies, core):
    agent_factory(node)
    vm = vms()
    token = uuid.uuid4().hex[:8]
    plain = f"/tmp/bct-outside-{token}.qcow2"
    dotted = f"/var/lib/libvirt/images/../../../tmp/bct-dotted-{token}.qcow2"
    names = {
        blockcopies.create(copy_spec(vm, node=node, dest=plain, pivot=True)): plain,
        blockcopies.create(copy_spec(vm, node=node, dest=dotted, pivot=True)): dotted,
    }
    for name, dest in names.items():
        status = _assert_failed(blockcopies, core, name, "DestNotAllowed",
                                message="outside the allowed paths")
        assert "/var/lib/libvirt/images" in status["message"]
        assert not status.get("startTime"), status  # no job was ever started
        assert not os.path.lexists(os.path.realpath(dest))
    assert "/tmp/bct-dotted-" in blockcopies.status(
        next(n for n, d in names.items() if d == dotted))["message"]
    assert_untouched(vm)


def test_dest_outside_allowed_roots_through_symlink(agent_factory, node, vms, blockcopies, core):
    agent_factory(node)
    vm = vms()
    outside = tempfile.mkdtemp(prefix="bct-outside-", dir="/tmp")
    try:
        os.chmod(outside, 0o777)  # even a directory qemu could write to is refused
        link = os.path.join(vm.workdir, "escape")
        os.symlink(outside, link)
        dest = os.path.join(link, "copy.qcow2")
        name = blockcopies.create(copy_spec(vm, node=node, dest=dest, pivot=True))
        status = _assert_failed(blockcopies, core, name, "DestNotAllowed",
                                message=re.escape(f"resolves to {outside}/copy.qcow2"))
        assert not status.get("startTime"), status
        assert os.listdir(outside) == []
        assert_untouched(vm)
    finally:
        shutil.rmtree(outside)


def test_allowed_path_option(agent_factory, node, vms, blockcopies, core):
    allowed = tempfile.mkdtemp(prefix="bct-allowed-", dir="/var/tmp")
    try:
        os.chmod(allowed, 0o755)  # qemu (libvirt-qemu) must reach the file
        agent_factory(node, extra_args=["--allowed-path", allowed])
        vm = vms()
        # Under the agent's own root (outside the default one): accepted, copied.
        dest = os.path.join(allowed, "copy.qcow2")
        ok = blockcopies.create(copy_spec(vm, node=node, dest=dest))
        blockcopies.wait_phase(ok, "Mirrored", timeout=90)
        assert live_mirror(vm, "vda")["source"] == dest
        # Under the default root, which this agent was not given: refused, nothing created.
        default_dest = os.path.join(vm.workdir, "copy.qcow2")
        refused = blockcopies.create(copy_spec(vm, node=node, dest=default_dest))
        status = _assert_failed(blockcopies, core, refused, "DestNotAllowed",
                                message=re.escape(allowed))
        assert "/var/lib/libvirt/images" not in status["message"].split("allowed paths")[1]
        assert not os.path.lexists(default_dest)
        # The accepted copy is unaffected: still mirroring, then ended on request.
        assert blockcopies.status(ok)["phase"] == "Mirrored"
        blockcopies.patch_spec(ok, {"abort": True})
        blockcopies.wait_phase(ok, "Aborted")
        assert live_disk_source(vm, "vda") == vm.chain[0]
        assert live_mirror(vm, "vda") is None
    finally:
        shutil.rmtree(allowed)


# ---------------------------------------------------------------- 6. invalid spec


def test_invalid_spec_then_next_object_handled(agent_factory, node, vms, blockcopies, core):
    """An invalid spec is refused by the API server at apply time (the CRD's rules: every
    such spec in tests/e2e/test_invalid_specs_on_server.py). One admitted anyway (created
    before the CRD had the rules, or, on a shared test cluster, under another checkout's CRD)
    ends Failed/InvalidSpec in the agent, nothing touched (every such spec on the fakes:
    tests/unit/test_follower.py). Either way the next object is handled."""
    agent = agent_factory(node)
    vm = vms()
    dest = os.path.join(vm.workdir, "copy.qcow2")
    bad = copy_spec(vm, node=node, dest=dest, bandwidth="fast", pivot=True)
    try:
        blockcopies.create(bad, name="bad")
    except AssertionError as refused:
        assert "spec.bandwidth must be a quantity of bytes" in str(refused)
        assert not blockcopies.exists("bad")
    else:
        _assert_failed(blockcopies, core, "bad", "InvalidSpec",
                       message=r"invalid spec: bandwidth 'fast' is not a quantity such as 100Mi")
    assert not os.path.lexists(dest)
    assert_untouched(vm)
    assert agent.proc.poll() is None, agent.log()
    assert "Traceback" not in agent.log(), agent.log()

    good = blockcopies.create(copy_spec(vm, node=node, dest=dest, bandwidth="100Mi", pivot=True))
    status = blockcopies.wait_phase(good, "Pivoted", timeout=90)
    assert status["bandwidth"] == 100 << 20
    assert live_disk_source(vm, "vda") == dest
    assert agent.proc.poll() is None


# ---------------------------------------------------------------- 7. busy disk


def test_second_copy_on_busy_disk(agent_factory, node, vms, blockcopies, core):
    agent_factory(node)
    vm = vms(**SLOW)
    before = expected_digest(vm)
    first_dest = os.path.join(vm.workdir, "first.qcow2")
    first = blockcopies.create(copy_spec(vm, node=node, dest=first_dest, bandwidth="1Mi"))
    _wait_copying(blockcopies, first)

    second_dest = os.path.join(vm.workdir, "second.qcow2")
    second = blockcopies.create(copy_spec(vm, node=node, dest=second_dest, disk=vm.chain[0],
                                          pivot=True))
    _assert_failed(blockcopies, core, second, "DiskBusy",
                   message=re.escape(f"already has a block job (copy to {first_dest})"))
    assert not os.path.lexists(second_dest)
    # The first copy was not disturbed: same job, still copying, then pivots fine.
    assert live_mirror(vm, "vda")["source"] == first_dest
    assert blockcopies.status(first)["phase"] == "Copying"
    blockcopies.patch_spec(first, {"bandwidth": None, "pivot": True})
    blockcopies.wait_phase(first, "Pivoted", timeout=120)
    assert live_disk_source(vm, "vda") == first_dest
    assert image_digest(first_dest, "qcow2") == before


# ---------------------------------------------------------------- 8. pivot refused


def _faulty_agent(agent_factory, node: str, refusals: int) -> Agent:
    """The agent started through tests/e2e/faulty_agent.py (FAULT INJECTION: the first
    `refusals` pivots raise HypervisorError instead of reaching libvirt)."""
    return agent_factory(node, entry=FAULTY, env={"FAULT_PIVOT_REFUSALS": str(refusals)})


def _pivot_calls(agent: Agent) -> list[tuple[float, str]]:
    return [(float(m[1]), m[2]) for m in re.finditer(
        r"FAULT INJECTION: pivot call \d+ of \S+ at ([\d.]+): (refused|passed)", agent.log())]


def test_pivot_refused_then_retried(agent_factory, node, vms, blockcopies, core):
    refusals = 2
    agent = _faulty_agent(agent_factory, node, refusals)
    vm = vms()
    before = expected_digest(vm)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest))
    blockcopies.wait_phase(name, "Mirrored")
    blockcopies.patch_spec(name, {"pivot": True})

    # First refusal: back in Mirrored with the reason, a Warning Event, VM on source.
    refused = wait_for(events_of(blockcopies, core, name, "PivotRefused", type="Warning"), 30)
    assert "fault injection: pivot refused" in refused[0].message
    seen: list[dict] = []

    def refused_status():
        status = blockcopies.status(name)
        seen.append(status)
        return status if status.get("phase") == "Mirrored" and "refused the pivot" in \
            status.get("message", "") else None
    status = wait_for(refused_status, 20, what="Mirrored with the pivot refused")
    assert "fault injection: pivot refused" in status["message"]
    assert condition(status, "Mirrored")["reason"] == "PivotRefused", status
    assert condition(status, "Pivoted")["status"] == "False"
    assert condition(status, "Failed")["status"] == "False"
    if len(_pivot_calls(agent)) <= refusals:  # not yet pivoted for real
        assert live_disk_source(vm, "vda") == vm.chain[0]
        assert live_mirror(vm, "vda")["ready"] == "yes"

    # After the injected refusals the pivot goes through.
    status = blockcopies.wait_phase(name, "Pivoted", timeout=90)
    assert live_disk_source(vm, "vda") == dest
    assert live_mirror(vm, "vda") is None
    assert image_digest(dest, "qcow2") == before
    assert condition(status, "Pivoted")["status"] == "True"
    calls = _pivot_calls(agent)
    assert [c[1] for c in calls] == ["refused"] * refusals + ["passed"], calls
    warnings = _warnings(blockcopies, core, name, "PivotRefused")
    assert sum(e.count or 1 for e in warnings) == refusals, \
        [(e.reason, e.count, e.message) for e in warnings]
    assert not [e for e in blockcopies.events(core, name) if e.reason == "PivotFailed"]


def test_pivot_refused_retry_backs_off(agent_factory, node, vms, blockcopies, core):
    """A refused pivot is retried after the poll interval (5 s), not in a tight loop: a
    pivot that libvirt keeps refusing must not become a storm of calls, writes and Events."""
    refusals = 2
    agent = _faulty_agent(agent_factory, node, refusals)
    vm = vms()
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, pivot=True))
    blockcopies.wait_phase(name, "Pivoted", timeout=90)
    calls = _pivot_calls(agent)
    assert [c[1] for c in calls] == ["refused"] * refusals + ["passed"], calls
    gaps = [round(b[0] - a[0], 2) for a, b in itertools.pairwise(calls)]
    events = blockcopies.events(core, name)
    assert all(gap >= 4 for gap in gaps), (
        f"pivot retried {gaps} s after each refusal (expected the 5 s poll interval); "
        f"Events: {sorted((e.type, e.reason) for e in events)}")


# ---------------------------------------------------------------- 9. libvirt unreachable


def test_libvirt_unreachable_then_back(agent_factory, node, vms, blockcopies, core, tmp_path):
    proxy = UnixProxy(str(tmp_path / "libvirt-proxy.sock"))
    proxy.start()
    try:
        uri = f"qemu+unix:///system?socket={proxy.sock}"
        agent = agent_factory(node, extra_args=["--libvirt-uri", uri])
        assert uri in agent.log()
        vm = vms(**SLOW)
        before = expected_digest(vm)
        dest = os.path.join(vm.workdir, "copy.qcow2")
        name = blockcopies.create(copy_spec(vm, node=node, dest=dest, bandwidth="1Mi"))
        _wait_copying(blockcopies, name)

        proxy.kill()
        status = wait_for(status_where(
            blockcopies, name, lambda s: "libvirt unreachable since" in s.get("message", ""),
            "the status to say libvirt is unreachable"), 30)
        assert re.search(r"retrying in \d+s", status["message"]), status["message"]
        assert status["phase"] == "Copying", status  # not failed: the job is still there
        wait_for(events_of(blockcopies, core, name, "LibvirtUnreachable", type="Warning"), 15)
        # libvirtd itself still runs the job, and it progresses.
        first = block_job_info(vm)
        assert first and live_mirror(vm, "vda")["source"] == dest
        wait_for(lambda: block_job_info(vm)["cur"] > first["cur"], 20,
                 what="the job to progress while the agent is cut off")
        cut_off_cur = blockcopies.status(name).get("cur", 0)

        proxy.start()
        status = wait_for(status_where(
            blockcopies, name, lambda s: "unreachable" not in s.get("message", "")
            and s.get("cur", 0) > cut_off_cur,
            "the agent to reconnect and report progress again"), 60)
        assert status["phase"] == "Copying", status
        assert live_mirror(vm, "vda")["source"] == dest  # the same job, adopted
        assert agent.proc.poll() is None

        # Events still arrive over the new connection: finish fast and pivot.
        blockcopies.patch_spec(name, {"bandwidth": None, "pivot": True})
        status = blockcopies.wait_phase(name, "Pivoted", timeout=120)
        assert live_disk_source(vm, "vda") == dest
        assert image_digest(dest, "qcow2") == before
        assert len(_warnings(blockcopies, core, name, "LibvirtUnreachable")) == 1
        assert not [e for e in blockcopies.events(core, name) if e.reason == "Failed"]
    finally:
        proxy.kill()


def test_libvirt_unreachable_retry_backs_off(agent_factory, node, vms, blockcopies, core,
                                             tmp_path):
    """While libvirt is unreachable, the follow loop retries after 1, 2, 5, 10, 30 s (the
    status message says when); each wait is a real wait, not cut short."""
    proxy = UnixProxy(str(tmp_path / "libvirt-proxy.sock"))
    proxy.start()
    try:
        agent_factory(node, extra_args=[
            "--libvirt-uri", f"qemu+unix:///system?socket={proxy.sock}"])
        vm = vms()
        dest = os.path.join(vm.workdir, "copy.qcow2")
        name = blockcopies.create(copy_spec(vm, node=node, dest=dest))
        blockcopies.wait_phase(name, "Mirrored")
        proxy.kill()
        # Record when each "retrying in Ns" message first appears in status.
        seen: dict[int, float] = {}
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline and 10 not in seen:
            m = re.search(r"retrying in (\d+)s", blockcopies.status(name).get("message", ""))
            if m and int(m[1]) not in seen:
                seen[int(m[1])] = time.monotonic()
            time.sleep(0.1)
        assert list(seen)[:4] == [1, 2, 5, 10], seen
        gaps = {f"{a}s->{b}s": round(seen[b] - seen[a], 2) for a, b in ((1, 2), (2, 5), (5, 10))}
        # Each message is written when the previous wait is over (writes are at most 0.5 s
        # late: --status-interval 0.5), so the gaps are at least the waits minus 0.6 s.
        assert gaps["1s->2s"] >= 0.4 and gaps["2s->5s"] >= 1.4 and gaps["5s->10s"] >= 4.4, gaps
        assert live_mirror(vm, "vda")["ready"] == "yes"  # libvirt kept the job
    finally:
        proxy.kill()
