"""What libvirt says about a test domain, straight from libvirtd: `virsh` as a user runs it,
the domain state, the live XML and its disk source and <mirror>, the block job's counters
through the libvirt API and as `virsh blockjob --info` prints them. Tests assert on these,
never on what the agent reports about itself."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import libvirt

from blockcopy.adapters.hypervisor import use_asyncio_loop

T = TypeVar("T")

if TYPE_CHECKING:
    from support.vms import VM

DEFAULT_URI = "qemu:///system"
NO_JOB = "No current block job for {disk}"


def _virsh(args: tuple[str, ...], uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True)


def virsh(*args: str, check: bool = True, uri: str = DEFAULT_URI) -> str:
    """virsh's stdout, stripped; check=True fails the test with virsh's error."""
    res = _virsh(args, uri)
    if check and res.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout.strip()


def daemon_libvirt_version(uri: str = DEFAULT_URI) -> str:
    """The libvirtd's version ("9.0.0" on the stock stack, "11.3.0" on backports): what an
    agent connected to it reports, whichever libvirt client library the agent has."""
    conn = libvirt.open(uri)
    try:
        v = conn.getLibVersion()
    finally:
        conn.close()
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


def qemu_version(uri: str = DEFAULT_URI) -> tuple[int, int, int]:
    """The QEMU the daemon runs ((7, 2, 0) on the stock stack, (10, 0, 2) on backports)."""
    conn = libvirt.open(uri)
    try:
        v = conn.getVersion()
    finally:
        conn.close()
    return v // 1_000_000, v // 1000 % 1000, v % 1000


def domstate(vm: VM) -> str:
    return virsh("domstate", vm.name, uri=vm.uri)


def inactive_xml(vm: VM) -> str:
    """The persistent definition (what the domain boots with next time)."""
    return virsh("dumpxml", "--inactive", vm.name, uri=vm.uri)


def live_xml(vm: VM) -> str:
    with libvirt.open(vm.uri) as conn:
        xml: str = conn.lookupByName(vm.name).XMLDesc(0)
    return xml


def live_disk(vm: VM, target: str = "vda") -> ET.Element:
    """The live <disk> element of ``target``."""
    for disk in ET.fromstring(live_xml(vm)).findall("./devices/disk"):
        t = disk.find("target")
        if t is not None and t.get("dev") == target:
            return disk
    raise KeyError(f"{vm.name} has no disk {target}")


def _source_path(elem: ET.Element | None) -> str | None:
    if elem is None:
        return None
    return elem.get("file") or elem.get("dev") or elem.get("name")


def live_disk_source(vm: VM, target: str = "vda") -> str | None:
    return _source_path(live_disk(vm, target).find("source"))


def live_mirror(vm: VM, target: str = "vda") -> dict[str, str | None] | None:
    """Attributes of the live <mirror> (type, job, ready...) plus 'source' and 'format', or None."""
    mirror = live_disk(vm, target).find("mirror")
    if mirror is None:
        return None
    info: dict[str, str | None] = dict(mirror.attrib)
    info["source"] = _source_path(mirror.find("source")) or mirror.get("file")
    fmt = mirror.find("format")
    info["format"] = fmt.get("type") if fmt is not None else mirror.get("format")
    return info


def block_job_info(vm: VM, disk: str = "vda") -> dict[str, int]:
    """libvirt's own view of the block job (cur, end, bandwidth in bytes; {} without a job)."""
    with libvirt.open(vm.uri) as conn:
        info: dict[str, int] = conn.lookupByName(vm.name).blockJobInfo(
            disk, libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES)
    return info


def blockjob_text(vm: VM, disk: str = "vda", *, in_bytes: bool = False,
                  check: bool = True) -> str:
    """`virsh blockjob --info [--bytes]` as a user sees it (virsh prints the progress on
    stderr, the rest on stdout), stripped; "No current block job for vda" without a job."""
    res = _virsh(("blockjob", vm.name, disk, "--info", *(["--bytes"] if in_bytes else [])),
                 vm.uri)
    if check and res.returncode != 0:
        raise AssertionError(f"virsh blockjob {vm.name} {disk}: {res.stderr.strip()}")
    return (res.stdout + res.stderr).strip()


def no_block_job(vm: VM, disk: str = "vda") -> bool:
    return blockjob_text(vm, disk) == NO_JOB.format(disk=disk)


_event_loop_lock = threading.Lock()
_event_loop: asyncio.AbstractEventLoop | None = None


def libvirt_event_loop() -> asyncio.AbstractEventLoop:
    """The test process's libvirt event loop: an asyncio loop in a thread of its own, with
    libvirtaio registered on it the way the agent registers it
    (adapters.hypervisor.use_asyncio_loop). libvirt keeps the first event implementation a
    process registers, so every helper and test that needs libvirt events uses this one (a
    second implementation left the agent's asyncio callbacks running on a foreign thread,
    their waiters woken only by chance)."""
    global _event_loop
    with _event_loop_lock:
        if _event_loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="libvirt-events",
                             daemon=True).start()

            async def register() -> None:
                use_asyncio_loop(asyncio.get_running_loop())
            asyncio.run_coroutine_threadsafe(register(), loop).result(10)
            _event_loop = loop
        return _event_loop


def on_event_loop(call: Callable[[], T]) -> T:
    """``call()`` run on the libvirt event loop's thread (libvirtaio's handles and timers
    are the loop's: connections that deliver events are opened and closed there)."""
    async def run() -> T:
        return call()
    return asyncio.run_coroutine_threadsafe(run(), libvirt_event_loop()).result(60)


class BlockJobEvents:
    """libvirt's BLOCK_JOB_2 events of one domain as this process receives them:
    [(wall time, monotonic time, status)]."""

    def __init__(self, vm: VM):
        self.events: list[tuple[float, float, int]] = []

        def subscribe() -> tuple[libvirt.virConnect, int]:
            conn = libvirt.open(vm.uri)
            dom = conn.lookupByName(vm.name)
            return conn, conn.domainEventRegisterAny(
                dom, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_event, None)
        self.conn, self.callback_id = on_event_loop(subscribe)

    def _on_event(self, conn: libvirt.virConnect, dom: libvirt.virDomain, disk: str,
                  job_type: int, status: int, opaque: object) -> None:
        self.events.append((time.time(), time.monotonic(), status))

    def statuses(self) -> list[int]:
        return [s for _w, _m, s in self.events]

    def first(self, status: int) -> float:
        """Wall time of the first event with ``status``."""
        return next(w for w, _m, s in self.events if s == status)

    def first_monotonic(self, status: int) -> float | None:
        return next((m for _w, m, s in self.events if s == status), None)

    def close(self) -> None:
        def unsubscribe() -> None:
            self.conn.domainEventDeregisterAny(self.callback_id)
            self.conn.close()
        on_event_loop(unsubscribe)


def live_source_node(vm: VM, target: str = "vda") -> str:
    """The QEMU block node the disk's device reads from (its top node), as QEMU names it.
    Asked of QEMU, not derived from libvirt's naming: libvirt 9 puts a format node
    (libvirt-N-format) over every image, libvirt 11 none over a raw one (an NBD export is
    then just libvirt-N-storage)."""
    alias_elem = live_disk(vm, target).find("alias")
    assert alias_elem is not None, f"{vm.name}'s disk {target} has no <alias>"
    alias = alias_elem.get("name")  # virtio-disk0
    out = virsh("qemu-monitor-command", vm.name, '{"execute":"query-block"}', uri=vm.uri)
    for dev in json.loads(out)["return"]:
        if f"/{alias}/" in (dev.get("qdev") or "") and dev.get("inserted"):
            node: str = dev["inserted"]["node-name"]
            return node
    raise AssertionError(f"no block device {alias} ({target}) in query-block: {out}")


def live_read_matches(vm: VM, offset: int, length: int, pattern: int,
                      target: str = "vda") -> bool:
    """Does QEMU itself (the VM's live view, with its own caches) read ``pattern`` in every
    byte of [offset, offset+length)? Through the monitor's qemu-io, whose verdict QEMU
    writes to the domain's log (libvirt marks the domain tainted: custom-monitor)."""
    log = f"/var/log/libvirt/qemu/{vm.name}.log"
    with open(log, "rb") as f:
        start = f.seek(0, 2)
    command = f'qemu-io {live_source_node(vm, target)} "read -P {pattern:#x} {offset} {length}"'
    answer = virsh("qemu-monitor-command", vm.name, "--hmp", command, uri=vm.uri)
    if answer:  # qemu-io's verdict goes to the log; the monitor answers only errors
        raise AssertionError(f"{command}: {answer}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        if "Pattern verification failed" in text:
            return False
        if f"bytes at offset {offset}" in text:
            return True
        time.sleep(0.1)
    raise AssertionError(f"no answer from qemu-io in {log}: {text!r}")
