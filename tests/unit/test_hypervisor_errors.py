"""The libvirt driver's error classification and observation (blockcopy.adapters.hypervisor
over blockcopy.adapters.connection),
without QEMU. What libvirt's own ``test://`` driver implements is asked of it, on a node of
our own (a running domain with a qcow2-over-raw disk and a tenant, a shut-off one); an
unreachable libvirtd is a real unreachable socket. What no real part produces on demand (a
system error raised by libvirtd while the connection works, a connection that dies in the
middle of a call, a domain that goes away or stops between two calls inside one observation)
comes from FaultyConnection, a fault-injection fake. Block-job events are fed to the
connection's callback as libvirt calls it.

The mapping under test (connection.py's docstring): "cannot reach libvirtd" is decided by
the connection's state, not by the error code; everything else is a refusal with libvirt's
message; a domain that is not there is not an error of observe()."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest
import pytest_asyncio

from blockcopy.adapters.hypervisor import LibvirtHypervisor
from blockcopy.model.observation import DiskState, JobEvent
from blockcopy.model.ports import CopyRequest, DiskSize, HypervisorError, HypervisorUnavailable

# libvirt also prints every error on stderr by default; they still raise.
libvirt.registerErrorHandler(lambda *_: None, None)

RUNNING, RUNNING_UUID = "bct-types-running", "6f0c7ad4-6b3e-4d6e-9c1a-2f1d2c7a0001"
OFF, OFF_UUID = "bct-types-off", "6f0c7ad4-6b3e-4d6e-9c1a-2f1d2c7a0002"
UNREACHABLE = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
NOT_SUPPORTED = "this function is not supported by the connection driver: {}"

NODE_XML = f"""<node>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>{RUNNING}</name>
    <uuid>{RUNNING_UUID}</uuid>
    <memory unit='MiB'>64</memory>
    <os><type arch='x86_64'>hvm</type></os>
    <metadata>
      <blockcopy:policy xmlns:blockcopy="https://blockcopy.dev/policy/v1" tenant="team-a"/>
    </metadata>
    <devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/>
        <source file='/images/running.qcow2'/>
        <backingStore type='file'>
          <format type='raw'/>
          <source file='/images/base.raw'/>
          <backingStore/>
        </backingStore>
        <target dev='vda' bus='virtio'/>
      </disk>
    </devices>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>{OFF}</name>
    <uuid>{OFF_UUID}</uuid>
    <memory unit='MiB'>64</memory>
    <os><type arch='x86_64'>hvm</type></os>
    <devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='raw'/>
        <source file='/images/off.raw'/>
        <target dev='vda' bus='virtio'/>
      </disk>
    </devices>
    <test:runstate>5</test:runstate>
  </domain>
</node>
"""


class Opener:
    """``open_connection`` for the driver: counts the attempts, keeps the connections it
    opened, and opens ``target`` instead of the URI asked for while it is set (an
    unreachable libvirtd, then back)."""

    def __init__(self, make: Callable[[str], Any] = libvirt.open):
        self.make = make
        self.target: str | None = None
        self.attempts = 0
        self.opened: list[Any] = []

    def __call__(self, uri: str) -> Any:
        self.attempts += 1
        conn = self.make(self.target or uri)
        self.opened.append(conn)
        return conn


@pytest.fixture
def node_uri(tmp_path: Path) -> str:
    path = tmp_path / "node.xml"
    path.write_text(NODE_XML)
    return f"test://{path}"


@pytest.fixture
def opener() -> Opener:
    """``opener.opened[0]``: the driver's own connection (the test:// driver keeps one node
    per connection: changes to the node must go through that one)."""
    return Opener()


@pytest_asyncio.fixture
async def hv(node_uri: str, opener: Opener) -> AsyncIterator[LibvirtHypervisor]:
    """The driver on the test node."""
    driver = LibvirtHypervisor(node_uri, open_connection=opener)
    yield driver
    await driver.close()


def copy_request(domain: str = RUNNING) -> CopyRequest:
    return CopyRequest(domain=domain, target="vda", dest="/images/copy.qcow2", format="qcow2",
                       flags=frozenset())


def refusal(raised: pytest.ExceptionInfo[HypervisorError]) -> HypervisorError:
    """A refusal, not an outage: libvirt's error, to be reported, never retried forever."""
    assert type(raised.value) is HypervisorError, repr(raised.value)
    return raised.value


# ------------------------------------------------------------------ libvirt's test driver


@pytest.mark.asyncio
async def test_a_domain_that_does_not_exist_is_not_found_not_an_error(
        hv: LibvirtHypervisor, opener: Opener) -> None:
    for ref in ("no-such-domain", "6f0c7ad4-6b3e-4d6e-9c1a-2f1d2c7a0fff", "nul\x00in-name"):
        assert await hv.observe(ref, "vda") == DiskState(domain_found=False)
        assert await hv.has_running_domain(ref) is False
    # A verb on it is refused, with the code of a missing domain.
    with pytest.raises(HypervisorError, match="'no-such-domain' not found") as raised:
        await hv.pivot("no-such-domain", "vda")
    assert refusal(raised).code == libvirt.VIR_ERR_NO_DOMAIN
    assert len(opener.opened) == 1  # one connection throughout


@pytest.mark.asyncio
async def test_observe_a_shut_off_domain_by_name_and_by_uuid(hv: LibvirtHypervisor) -> None:
    for ref in (OFF, OFF_UUID):
        state = await hv.observe(ref, "vda")
        assert (state.domain_found, state.domain_uuid, state.domain_name, state.domain_running,
                state.domain_persistent) == (True, OFF_UUID, OFF, False, True)
        assert (state.disk_found, state.target, state.source, state.source_format, state.job) \
            == (True, "vda", "/images/off.raw", "raw", None)
    assert await hv.has_running_domain(OFF) is False


@pytest.mark.asyncio
async def test_observe_a_running_domain_refused_by_the_driver_keeps_libvirts_message(
        hv: LibvirtHypervisor, opener: Opener) -> None:
    """The test driver has no block-job info: a refusal (libvirt's message and code), and the
    connection goes on working."""
    assert await hv.has_running_domain(RUNNING) is True
    with pytest.raises(HypervisorError) as raised:
        await hv.observe(RUNNING, "vda")
    assert str(refusal(raised)) == NOT_SUPPORTED.format("virDomainGetBlockJobInfo")
    assert raised.value.code == libvirt.VIR_ERR_NO_SUPPORT
    # A disk it does not have: no block-job call, the domain as the XML shows it.
    state = await hv.observe(RUNNING, "vdz")
    assert (state.domain_running, state.domain_tenant, state.disk_found) == (True, "team-a", False)
    assert len(opener.opened) == 1


@pytest.mark.parametrize(("verb", "call", "function"), [
    ("start_copy", lambda hv: hv.start_copy(copy_request()), "virDomainBlockCopy"),
    ("pivot", lambda hv: hv.pivot(RUNNING, "vda"), "virDomainBlockJobAbort"),
    ("cancel", lambda hv: hv.cancel(RUNNING, "vda"), "virDomainBlockJobAbort"),
    ("set_bandwidth", lambda hv: hv.set_bandwidth(RUNNING, "vda", 1 << 20),
     "virDomainBlockJobSetSpeed"),
    ("set_copy_mode", lambda hv: hv.set_copy_mode(RUNNING, "vda", "write-blocking"),
     "virDomainQemuMonitorCommand"),
])
@pytest.mark.asyncio
async def test_a_verb_the_driver_does_not_implement_is_refused_with_libvirts_message(
        hv: LibvirtHypervisor, opener: Opener, verb: str,
        call: Callable[[LibvirtHypervisor], Awaitable[None]], function: str) -> None:
    with pytest.raises(HypervisorError) as raised:
        await call(hv)
    assert str(refusal(raised)) == NOT_SUPPORTED.format(function)
    assert raised.value.code == libvirt.VIR_ERR_NO_SUPPORT
    assert await hv.has_running_domain(RUNNING) is True  # the same connection still works
    assert len(opener.opened) == 1


@pytest.mark.asyncio
async def test_a_domain_gone_or_stopped_between_two_calls(hv: LibvirtHypervisor,
                                                          opener: Opener) -> None:
    assert (await hv.observe(OFF, "vda")).domain_found
    assert (await hv.observe(RUNNING, "vdz")).domain_running
    conn = opener.opened[0]
    conn.lookupByName(OFF).undefine()  # gone
    conn.lookupByName(RUNNING).destroy()  # stopped (persistent: still defined)
    assert await hv.observe(OFF, "vda") == DiskState(domain_found=False)
    assert await hv.observe(OFF_UUID, "vda") == DiskState(domain_found=False)
    state = await hv.observe(RUNNING, "vda")  # shut off: no block-job call any more
    assert (state.domain_found, state.domain_running, state.source, state.chain) == \
        (True, False, "/images/running.qcow2", ("/images/base.raw",))
    assert await hv.has_running_domain(RUNNING) is False


@pytest.mark.asyncio
async def test_quiesce_without_a_guest_agent_suspends_and_refuses_a_shut_off_domain(
        hv: LibvirtHypervisor, opener: Opener) -> None:
    """No guest agent in the test driver: suspended, then resumed. A domain that does not run
    cannot be suspended: refused with libvirt's message."""
    assert await hv.quiesce(RUNNING) == "suspended"
    dom = opener.opened[0].lookupByName(RUNNING)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    await hv.unquiesce(RUNNING, "suspended")
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    with pytest.raises(HypervisorError, match=f"domain '{OFF}' not running") as raised:
        await hv.quiesce(OFF)
    refusal(raised)


@pytest.mark.asyncio
async def test_versions_and_disk_size_as_the_driver_reports_them(hv: LibvirtHypervisor,
                                                                 node_uri: str) -> None:
    with libvirt.open(node_uri) as conn:
        lib, hypervisor = conn.getLibVersion(), conn.getVersion()
        capacity, allocation, _ = conn.lookupByName(OFF).blockInfo("vda")
    assert await hv.version() == f"{lib // 1000000}.{lib // 1000 % 1000}.{lib % 1000}"
    caps = await hv.capabilities()
    assert (caps.libvirt[0] * 1000000 + caps.libvirt[1] * 1000 + caps.libvirt[2],
            caps.qemu[0] * 1000000 + caps.qemu[1] * 1000 + caps.qemu[2]) == (lib, hypervisor)
    assert await hv.disk_size(OFF, "vda") == DiskSize(capacity=capacity, allocation=allocation)


EVENTS_ON = """
import asyncio, sys
from blockcopy.adapters import hypervisor

async def main() -> None:
    hypervisor.use_asyncio_loop(asyncio.get_running_loop())
    hv = hypervisor.LibvirtHypervisor(sys.argv[1])
    print(await hv.version())
    await hv.close()

asyncio.run(main())
"""


def test_a_driver_without_keepalive_connects_with_events_on(node_uri: str) -> None:
    """As in the agent, libvirt events on an asyncio loop (process-wide and once only, hence
    a process of its own): a driver without a daemon (test://) has no keepalive to set, and
    that is no outage (CI once saw every verb here fail once another test had turned events
    on in the same process)."""
    proc = subprocess.run([sys.executable, "-c", EVENTS_ON, node_uri],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    lib = libvirt.getVersion()
    assert proc.stdout.strip() == f"{lib // 1000000}.{lib // 1000 % 1000}.{lib % 1000}"


# ------------------------------------------------------------------ libvirtd unreachable

EVERY_VERB: list[Callable[[LibvirtHypervisor], Awaitable[object]]] = [
    lambda hv: hv.version(),
    lambda hv: hv.capabilities(),
    lambda hv: hv.has_running_domain(RUNNING),
    lambda hv: hv.observe(RUNNING, "vda"),
    lambda hv: hv.start_copy(copy_request()),
    lambda hv: hv.pivot(RUNNING, "vda"),
    lambda hv: hv.cancel(RUNNING, "vda"),
    lambda hv: hv.set_bandwidth(RUNNING, "vda", 1),
    lambda hv: hv.disk_size(RUNNING, "vda"),
    lambda hv: hv.set_copy_mode(RUNNING, "vda", "write-blocking"),
    lambda hv: hv.quiesce(RUNNING),
    lambda hv: hv.unquiesce(RUNNING, "suspended"),
]


@pytest.mark.asyncio
async def test_unreachable_libvirtd_is_unavailable_on_every_verb_and_retried_each_call(
        node_uri: str) -> None:
    """No socket: every verb raises HypervisorUnavailable (libvirt's code is
    VIR_ERR_SYSTEM_ERROR, the code of a refusal too: the failed open decides), each call
    tries to connect again, and once libvirtd answers the next call works."""
    opener = Opener()
    opener.target = UNREACHABLE
    hv = LibvirtHypervisor(node_uri, open_connection=opener)
    for n, verb in enumerate(EVERY_VERB, start=1):
        with pytest.raises(HypervisorUnavailable, match=f"cannot connect to libvirt at "
                           f"{node_uri}: Failed to connect socket") as raised:
            await verb(hv)
        assert raised.value.code == libvirt.VIR_ERR_SYSTEM_ERROR
        assert opener.attempts == n  # tried again, nothing cached
    assert opener.opened == []
    opener.target = None  # libvirtd is back
    assert await hv.has_running_domain(RUNNING) is True
    assert await hv.has_running_domain(OFF) is False
    assert (opener.attempts, len(opener.opened)) == (len(EVERY_VERB) + 1, 1)  # kept
    await hv.close()


@pytest.mark.asyncio
async def test_unreachable_uri_without_an_injected_opener() -> None:
    hv = LibvirtHypervisor(UNREACHABLE)  # libvirt.open itself
    with pytest.raises(HypervisorUnavailable, match="No such file or directory"):
        await hv.observe(RUNNING, "vda")
    with pytest.raises(HypervisorUnavailable):
        await hv.version()


# ------------------------------------------------------------------ faults no real part makes


def libvirt_error(code: int, message: str, domain: int = libvirt.VIR_FROM_NONE
                  ) -> libvirt.libvirtError:
    """A libvirtError as the binding raises it (code, domain, message...)."""
    exc = libvirt.libvirtError(message)
    exc.err = (code, domain, message, libvirt.VIR_ERR_ERROR, None, None, None, -1, 0)
    return exc


@dataclasses.dataclass
class FaultyDomain:
    """FAULT-INJECTION FAKE of a libvirt.virDomain (see FaultyConnection)."""

    conn: FaultyConnection
    name_: str
    uuid: str
    xml: str
    active: bool = True
    # method name -> what it does instead of answering (raise, kill the connection...)
    faults: dict[str, Callable[[], None]] = dataclasses.field(default_factory=dict)

    def _call(self, method: str) -> None:
        self.conn._call(method)
        fault = self.faults.pop(method, None)
        if fault is not None:
            fault()

    def UUIDString(self) -> str:
        self._call("UUIDString")
        return self.uuid

    def name(self) -> str:
        self._call("name")
        return self.name_

    def isActive(self) -> int:
        self._call("isActive")
        return int(self.active)

    def isPersistent(self) -> int:
        self._call("isPersistent")
        return 1

    def XMLDesc(self, flags: int = 0) -> str:
        self._call("XMLDesc")
        return self.xml

    def blockJobInfo(self, disk: str, flags: int = 0) -> dict[str, int]:
        self._call("blockJobInfo")
        return {"type": 2, "cur": 5, "end": 10, "bandwidth": 0}

    def blockCopy(self, disk: str, xml: str, params: object = None, flags: int = 0) -> int:
        self._call("blockCopy")
        return 0

    def blockJobAbort(self, disk: str, flags: int = 0) -> int:
        self._call("blockJobAbort")
        return 0


class FaultyConnection:
    """FAULT-INJECTION FAKE of a libvirt.virConnect: only for what libvirt's test driver and
    a real libvirtd cannot be made to do on demand (a system error while the connection
    works, a connection that dies inside a call, a domain that goes away or stops between
    two calls of one observation). Models only what the driver calls; a dead connection
    answers isAlive() 0 and fails every call, as libvirt's remote driver does."""

    def __init__(self) -> None:
        self.alive = True
        self.closed = False
        self.domains: dict[str, FaultyDomain] = {}

    def add(self, name: str, uuid: str, *, disk_source: str = "/images/a.qcow2",
            active: bool = True) -> FaultyDomain:
        xml = (f"<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><devices>"
               f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
               f"<source file='{disk_source}'/><target dev='vda' bus='virtio'/></disk>"
               f"</devices></domain>")
        dom = self.domains[name] = FaultyDomain(self, name, uuid, xml, active)
        return dom

    def die(self) -> None:
        self.alive = False

    def _call(self, method: str) -> None:
        if not self.alive:
            raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR,
                                "internal error: client socket is closed", libvirt.VIR_FROM_RPC)

    def isAlive(self) -> int:
        if self.closed:
            raise libvirt_error(libvirt.VIR_ERR_INVALID_CONN, "invalid connection pointer")
        return int(self.alive)

    def getLibVersion(self) -> int:
        self._call("getLibVersion")
        return 9000000

    def getVersion(self) -> int:
        self._call("getVersion")
        return 7002000

    def lookupByName(self, name: str) -> FaultyDomain:
        self._call("lookupByName")
        if name not in self.domains:
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, f"Domain not found: '{name}'")
        return self.domains[name]

    def lookupByUUIDString(self, uuid: str) -> FaultyDomain:
        self._call("lookupByUUIDString")
        for dom in self.domains.values():
            if dom.uuid == uuid:
                return dom
        raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, f"Domain not found: '{uuid}'")

    def setKeepAlive(self, interval: int, count: int) -> int:
        return 0

    def domainEventRegisterAny(self, dom: object, event_id: int, cb: object,
                               opaque: object) -> int:
        return 1

    def domainEventDeregisterAny(self, callback_id: int) -> int:
        return 0

    def close(self) -> int:
        self.closed = True
        return 0


@pytest.fixture
def faulty() -> tuple[LibvirtHypervisor, Opener]:
    """The driver on FaultyConnections: a new one (with domain "vm") at every open."""
    def make(_uri: str) -> FaultyConnection:
        conn = FaultyConnection()
        conn.add("vm", "6f0c7ad4-6b3e-4d6e-9c1a-2f1d2c7a0003")
        return conn
    opener = Opener(make)
    return LibvirtHypervisor("qemu:///system", open_connection=opener), opener


def fail(exc: libvirt.libvirtError, *, kill: FaultyConnection | None = None
         ) -> Callable[[], None]:
    def fault() -> None:
        if kill is not None:
            kill.die()
        raise exc
    return fault


@pytest.mark.asyncio
async def test_a_system_error_with_a_working_connection_is_a_refusal(
        faulty: tuple[LibvirtHypervisor, Opener]) -> None:
    """libvirtd's own OS error while serving the call (VIR_ERR_SYSTEM_ERROR, as for a broken
    socket): the connection still works, so a refusal with libvirt's message, same
    connection."""
    hv, opener = faulty
    assert await hv.has_running_domain("vm")
    conn = opener.opened[0]
    message = ("cannot open file '/ro/copy.qcow2': Read-only file system")
    conn.domains["vm"].faults["blockCopy"] = fail(
        libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, message, libvirt.VIR_FROM_STORAGE))
    with pytest.raises(HypervisorError) as raised:
        await hv.start_copy(copy_request("vm"))
    assert (str(refusal(raised)), raised.value.code) == (message, libvirt.VIR_ERR_SYSTEM_ERROR)
    assert await hv.has_running_domain("vm") and len(opener.opened) == 1


@pytest.mark.parametrize("code", [libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR,
                                  libvirt.VIR_ERR_OPERATION_FAILED])
@pytest.mark.asyncio
async def test_a_connection_that_dies_inside_a_call_is_unavailable_and_reopened(
        faulty: tuple[LibvirtHypervisor, Opener], code: int) -> None:
    """Whatever code the failed call carried: the connection no longer works afterwards, so
    an outage; the next call opens a new connection."""
    hv, opener = faulty
    assert await hv.has_running_domain("vm")
    conn = opener.opened[0]
    conn.domains["vm"].faults["blockJobAbort"] = fail(
        libvirt_error(code, "End of file while reading data: Input/output error",
                      libvirt.VIR_FROM_RPC), kill=conn)
    with pytest.raises(HypervisorUnavailable, match="End of file") as raised:
        await hv.pivot("vm", "vda")
    assert raised.value.code == code
    assert await hv.has_running_domain("vm") and len(opener.opened) == 2


@pytest.mark.parametrize("code", [libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN])
@pytest.mark.asyncio
async def test_a_connection_error_code_is_unavailable_even_if_the_connection_looks_alive(
        faulty: tuple[LibvirtHypervisor, Opener], code: int) -> None:
    hv, opener = faulty
    assert await hv.has_running_domain("vm")
    opener.opened[0].domains["vm"].faults["blockJobAbort"] = fail(
        libvirt_error(code, "no connection driver available"))
    with pytest.raises(HypervisorUnavailable):
        await hv.cancel("vm", "vda")
    assert await hv.has_running_domain("vm") and len(opener.opened) == 2


@pytest.mark.asyncio
async def test_a_connection_found_dead_before_a_call_is_replaced(
        faulty: tuple[LibvirtHypervisor, Opener]) -> None:
    hv, opener = faulty
    assert await hv.has_running_domain("vm")
    opener.opened[0].die()  # between two calls (keepalive noticed a dead libvirtd)
    assert await hv.has_running_domain("vm") and len(opener.opened) == 2


@pytest.mark.parametrize("method", ["isActive", "UUIDString", "name", "isPersistent",
                                    "XMLDesc", "blockJobInfo"])
@pytest.mark.asyncio
async def test_a_domain_gone_between_the_calls_of_one_observation_is_not_found(
        faulty: tuple[LibvirtHypervisor, Opener], method: str) -> None:
    hv, opener = faulty
    assert (await hv.observe("vm", "vda")).job is not None
    opener.opened[0].domains["vm"].faults[method] = fail(
        libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, "Domain not found: no domain with matching "
                      "uuid '6f0c7ad4-6b3e-4d6e-9c1a-2f1d2c7a0003' (vm)"))
    assert await hv.observe("vm", "vda") == DiskState(domain_found=False)
    assert len(opener.opened) == 1


@pytest.mark.parametrize("method", ["XMLDesc", "blockJobInfo"])
@pytest.mark.asyncio
async def test_a_domain_stopped_between_the_calls_of_one_observation_is_not_running(
        faulty: tuple[LibvirtHypervisor, Opener], method: str) -> None:
    """isActive() said running, then the domain stopped: libvirt refuses the next call with
    VIR_ERR_OPERATION_INVALID ("domain is not running"): observed as stopped, not an error."""
    hv, opener = faulty
    assert await hv.has_running_domain("vm")
    opener.opened[0].domains["vm"].faults[method] = fail(libvirt_error(
        libvirt.VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: domain is not "
        "running", libvirt.VIR_FROM_QEMU))
    state = await hv.observe("vm", "vda")
    assert (state.domain_found, state.domain_name, state.domain_running, state.disk_found,
            state.job) == (True, "vm", False, False, None)


@pytest.mark.asyncio
async def test_another_error_inside_an_observation_is_a_refusal(
        faulty: tuple[LibvirtHypervisor, Opener]) -> None:
    hv, opener = faulty
    assert await hv.has_running_domain("vm")
    opener.opened[0].domains["vm"].faults["blockJobInfo"] = fail(libvirt_error(
        libvirt.VIR_ERR_INTERNAL_ERROR, "internal error: unable to execute QEMU command"))
    with pytest.raises(HypervisorError, match="unable to execute QEMU command") as raised:
        await hv.observe("vm", "vda")
    assert refusal(raised).code == libvirt.VIR_ERR_INTERNAL_ERROR


@pytest.mark.asyncio
async def test_a_lookup_refused_for_another_reason_is_not_taken_for_a_missing_domain(
        faulty: tuple[LibvirtHypervisor, Opener]) -> None:
    hv, opener = faulty
    assert await hv.has_running_domain("vm")
    conn = opener.opened[0]
    original = conn.lookupByName

    def lookup(name: str) -> FaultyDomain:
        raise libvirt_error(libvirt.VIR_ERR_ACCESS_DENIED, "access denied: polkit")
    conn.lookupByName = lookup
    with pytest.raises(HypervisorError, match="access denied") as raised:
        await hv.observe("vm", "vda")
    refusal(raised)
    conn.lookupByName = original
    assert (await hv.observe("vm", "vda")).domain_found


# ------------------------------------------------------------------ block-job events

STATUSES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: JobEvent.COMPLETED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: JobEvent.FAILED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: JobEvent.CANCELED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: JobEvent.READY,
}


@pytest.mark.asyncio
async def test_block_job_events_become_job_events_for_every_listener(
        caplog: pytest.LogCaptureFixture) -> None:
    """libvirt's BLOCK_JOB_2 callback (conn, dom, disk, type, status, opaque), as
    domainEventRegisterAny calls it: known statuses reach every listener as JobEvent,
    unknown ones nobody; a listener that raises is logged and the others still hear."""
    hv = LibvirtHypervisor("qemu:///system", open_connection=lambda uri: FaultyConnection())
    dom = FaultyConnection().add("vm", "6f0c7ad4-6b3e-4d6e-9c1a-2f1d2c7a0003")
    first: list[tuple[str, str, JobEvent]] = []
    last: list[tuple[str, str, JobEvent]] = []

    def broken(uuid: str, disk: str, event: JobEvent) -> None:
        raise RuntimeError("listener bug")
    hv.add_listener(lambda *args: first.append(args))
    hv.add_listener(broken)
    hv.add_listener(lambda *args: last.append(args))
    with caplog.at_level(logging.ERROR, logger="blockcopy.adapters.connection"):
        copy = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY
        for status in STATUSES:
            hv.connection._on_block_job(None, dom, "vda", copy, status, None)
        hv.connection._on_block_job(None, dom, "vda", copy, 99, None)
    expected = [(dom.uuid, "vda", event) for event in STATUSES.values()]
    assert first == expected and last == expected
    assert [r.getMessage() for r in caplog.records] == ["block-job listener failed"] * 4


@pytest.mark.asyncio
async def test_libvirt_errors_do_not_go_to_stderr_once_the_agent_set_up_libvirt() -> None:
    """libvirt's C library prints each failed call to stderr unless a handler is set: a
    domain of another VM gone mid-listing broke the agent's JSON log lines. In a process of
    its own (the handler is process-wide): errors still raise, stderr stays empty."""
    import subprocess
    import sys

    script = """if True:
        import asyncio
        from blockcopy.adapters import hypervisor
        async def main():
            hypervisor.use_asyncio_loop(asyncio.get_running_loop())
            hv = hypervisor.LibvirtHypervisor("test:///default")
            try:
                await hv.pivot("no-such-domain", "vda")
            except hypervisor.HypervisorError as exc:
                print("raised:", exc)
            await hv.close()
        asyncio.run(main())
    """
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "raised:" in proc.stdout, proc.stdout
    assert proc.stderr == "", proc.stderr
