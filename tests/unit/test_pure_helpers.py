"""The small pure helpers: retry schedules, the domain XML parser, the destination checks
(on a real temporary directory), the per-phase gauge, and the decisions for refused actions."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import pytest

import blockcopy
from blockcopy.adapters import files, metrics
from blockcopy.agent.recorder import PhaseCounts
from blockcopy.core import reconcile, status
from blockcopy.core.backoff import LIBVIRT_UNREACHABLE, REFUSED_ACTION, Backoff, Schedule
from blockcopy.core.domainxml import dest_disk_xml, parse_disk
from blockcopy.core.reconcile import Action, Decision
from blockcopy.model.api import BlockCopySpec, Flag, Phase
from blockcopy.model.observation import DiskInfo, Mirror, MirrorReady

# ------------------------------------------------------------------ backoff


def test_schedules_repeat_their_last_delay():
    assert [LIBVIRT_UNREACHABLE.delay(n) for n in range(1, 8)] == [1, 2, 5, 10, 30, 30, 30]
    assert REFUSED_ACTION.describe() == "5, 5, 5, 10, then every 30 s"
    assert Schedule((7,)).describe() == "every 7 s"
    with pytest.raises(ValueError):
        Schedule(())


def test_backoff_counts_failures_in_a_row_and_resets_on_success():
    b = Backoff(Schedule((1, 2, 3)))
    assert not b.active
    assert [b.failed() for _ in range(4)] == [1, 2, 3, 3]
    assert b.active
    b.succeeded()
    assert not b.active and b.failed() == 1


# ------------------------------------------------------------------ domain XML

DOMAIN = """<domain type='qemu'><name>vm</name><devices>
  <disk type='file' device='disk'>
    <driver name='qemu' type='qcow2'/>
    <source file='/img/top.qcow2'/>
    <backingStore type='file'><format type='qcow2'/><source file='/img/base.qcow2'/>
      <backingStore/></backingStore>
    <mirror type='file' job='copy' ready='yes'><format type='qcow2'/>
      <source file='/img/copy.qcow2'/></mirror>
    <target dev='vda' bus='virtio'/>
  </disk>
  <disk type='block' device='disk'>
    <driver name='qemu' type='raw'/><source dev='/dev/loop7'/>
    <target dev='vdb' bus='virtio'/>
  </disk>
</devices></domain>"""


def test_parse_disk_reads_the_whole_backing_chain():
    xml = DOMAIN.replace("<backingStore/></backingStore>", """<backingStore type='file'>
        <source file='/img/deeper.qcow2'/><backingStore type='file'>
        <source file='/img/deepest.qcow2'/><backingStore/></backingStore></backingStore>
        </backingStore>""")
    vda = parse_disk(xml, "vda")
    assert vda.chain == ("/img/base.qcow2", "/img/deeper.qcow2", "/img/deepest.qcow2")
    assert vda.backing == "/img/base.qcow2"


def test_dest_in_the_source_chain_is_found_through_symlinks_and_links(tmp_path):
    top, base = tmp_path / "top.qcow2", tmp_path / "base.qcow2"
    top.write_bytes(b"t")
    base.write_bytes(b"b")
    (tmp_path / "alias.qcow2").symlink_to(base)
    os.link(top, tmp_path / "hard.qcow2")
    chain = [str(top), str(base)]
    assert files.chain_member(str(tmp_path / "alias.qcow2"), chain) == str(base)
    assert files.chain_member(str(tmp_path / "hard.qcow2"), chain) == str(top)
    assert files.chain_member(str(tmp_path / "x" / ".." / "top.qcow2"), chain) == str(top)
    assert files.chain_member(str(tmp_path / "new.qcow2"), chain) is None


def test_parse_disk_by_target_and_by_source_path():
    vda = parse_disk(DOMAIN, "vda")
    assert vda == DiskInfo(target="vda", source="/img/top.qcow2", source_format="qcow2",
                           backing="/img/base.qcow2",
                           mirror=Mirror(dest="/img/copy.qcow2", ready=MirrorReady.READY),
                           chain=("/img/base.qcow2",), chain_formats=("qcow2",))
    assert parse_disk(DOMAIN, "/img/top.qcow2") == vda
    assert parse_disk(DOMAIN, "/img/../img/top.qcow2") == vda  # normalized
    vdb = parse_disk(DOMAIN, "/dev/loop7")
    assert vdb == DiskInfo(target="vdb", source="/dev/loop7", source_format="raw")
    assert parse_disk(DOMAIN, "vdc") is None


def test_network_sources_read_as_the_uri_they_are_written_as():
    from blockcopy.model.api import NetworkDest, parse_network_dest

    tcp = """<domain><devices><disk type='network'><driver name='qemu' type='raw'/>
      <source protocol='nbd' name='exp'><host name='127.0.0.1' port='10900'/></source>
      <target dev='vda'/></disk></devices></domain>"""
    assert parse_disk(tcp, "vda").source == "nbd://127.0.0.1:10900/exp"
    unix = tcp.replace("<host name='127.0.0.1' port='10900'/>",
                       "<host transport='unix' socket='/run/x.sock'/>")
    assert parse_disk(unix, "vda").source == "nbd+unix:///exp?socket=/run/x.sock"
    for uri in ("nbd://127.0.0.1:10900/exp", "nbd+unix:///exp?socket=/run/x.sock"):
        dest = parse_network_dest(uri)
        assert isinstance(dest, NetworkDest) and dest.uri == uri
        disk = ET.fromstring(dest_disk_xml(uri, "raw", block_device=False, network=dest))
        assert disk.get("type") == "network"
        assert disk.find("source").get("name") == "exp"
        assert disk.find("driver").get("type") == "raw"


def test_dest_disk_xml_always_names_the_format_and_quotes_the_path():
    import xml.etree.ElementTree as ET

    disk = ET.fromstring(dest_disk_xml("/img/a'b\"c.qcow2", "qcow2", block_device=False))
    assert disk.get("type") == "file"
    assert disk.find("source").get("file") == "/img/a'b\"c.qcow2"
    assert disk.find("driver").get("type") == "qcow2"
    disk = ET.fromstring(dest_disk_xml("/dev/sdb", "raw", block_device=True))
    assert (disk.get("type"), disk.find("source").get("dev")) == ("block", "/dev/sdb")
    assert disk.find("driver").get("type") == "raw"


# ------------------------------------------------------------------ destination checks


def spec(dest: str, *flags: Flag) -> BlockCopySpec:
    return BlockCopySpec(domain="vm", disk="vda", dest=dest, flags=frozenset(flags))


def test_destination_refusals(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "exists.qcow2").write_bytes(b"QFI\xfb....")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    allowed = (str(root),)

    def reason(dest: str, *flags: Flag) -> str | None:
        refused = files.refusal(spec(dest, *flags), allowed)
        return None if refused is None else refused[0]

    assert reason(str(root / "new.qcow2")) is None
    assert reason(str(outside / "new.qcow2")) == "DestNotAllowed"
    assert reason(str(root / "escape" / "new.qcow2")) == "DestNotAllowed"  # via a symlink
    assert reason(str(root / ".." / "outside" / "x")) == "DestNotAllowed"
    assert reason(str(root / "exists.qcow2")) == "DestExists"
    assert reason(str(root / "exists.qcow2"), Flag.REUSE_EXTERNAL) is None
    assert reason(str(root / "new.qcow2"), Flag.REUSE_EXTERNAL) == "DestMissing"
    assert reason(str(root / "nodir" / "new.qcow2")) == "DestNotCreatable"
    os.mkfifo(root / "fifo")
    assert reason(str(root / "fifo"), Flag.REUSE_EXTERNAL) == "DestNotFileOrDevice"
    assert files.probe_format(str(root / "exists.qcow2")) == "qcow2"
    assert not os.path.exists(root / "new.qcow2")  # checks never create anything


def a_block_device() -> str:
    """A block device of this machine (its disk: every machine that runs the tests has one)."""
    for entry in sorted(os.listdir("/sys/dev/block")):
        with open(f"/sys/dev/block/{entry}/uevent") as f:
            name = dict(line.strip().split("=", 1) for line in f if "=" in line).get("DEVNAME")
        with open(f"/sys/dev/block/{entry}/size") as f:
            empty = int(f.read()) == 0  # a loop device without a file, say
        if name and not empty and files.is_block_device(f"/dev/{name}"):
            return f"/dev/{name}"
    raise AssertionError("no block device with a /dev node on this machine")


def test_block_device_size_without_opening_the_device(monkeypatch):
    """In a container, opening a host block device fails with EPERM (its device cgroup):
    the size comes from sysfs, and without sysfs the refusal says why."""
    device = a_block_device()
    real_open = open

    def refusing_open(path, *args, **kw):
        if str(path) == device or (str(path).startswith("/sys/") and blind_sysfs):
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_open(path, *args, **kw)
    blind_sysfs = False
    monkeypatch.setattr("builtins.open", refusing_open)
    size = files.device_size(device)
    rdev = os.stat(device).st_rdev
    with real_open(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/size") as f:
        assert size == int(f.read()) * 512 > 0
    assert files.space_refusal(device, required=1, capacity=size, reuse=True) is None
    assert files.space_refusal(device, required=1, capacity=size + 1,
                                     reuse=True)[0] == "DestNoSpace"
    blind_sysfs = True
    reason, message = files.space_refusal(device, required=1, capacity=1, reuse=True)
    assert reason == "DestUnreadable"
    assert "Operation not permitted" in message and "device cgroup" in message


# ------------------------------------------------------------------ metrics bookkeeping


def test_phase_counts_follow_the_objects():
    counts = PhaseCounts(metrics.PrometheusMetrics())

    def gauge(phase: str) -> float:
        return metrics.BLOCKCOPIES.labels(phase)._value.get()

    before = {p: gauge(p) for p in ("Copying", "Mirrored")}
    counts.set(("ns", "a"), "Copying")
    counts.set(("ns", "b"), "Copying")
    counts.set(("ns", "a"), "Mirrored")
    assert gauge("Copying") - before["Copying"] == 1
    assert gauge("Mirrored") - before["Mirrored"] == 1
    counts.forget(("ns", "a"))
    counts.forget(("ns", "b"))
    assert {p: gauge(p) for p in ("Copying", "Mirrored")} == before

    copied = metrics.COPIED_BYTES._value.get()
    counts.copied(("ns", "c"), 100)
    counts.copied(("ns", "c"), 150)
    counts.copied(("ns", "c"), 120)  # never counts backwards
    assert metrics.COPIED_BYTES._value.get() - copied == 150
    assert metrics.COPY_BYTES.labels("ns", "c")._value.get() == 150
    counts.forget(("ns", "c"))


def _series(name: str) -> set[tuple[str, ...]]:
    from prometheus_client import REGISTRY
    return {tuple(sorted(s.labels.items())) for family in REGISTRY.collect()
            for s in family.samples if s.name == name}


def test_per_copy_series_idle_keeps_the_counter_forget_drops_all():
    prom, key = metrics.PrometheusMetrics(), ("tenant-a", "web-vda")
    labels = (("blockcopy_name", "web-vda"), ("blockcopy_namespace", "tenant-a"))
    prom.progress(key, eta=12.5, not_converging=False)
    prom.copied(key, 4096)
    prom.copied(key, 1024)
    assert labels in _series("blockcopy_copy_bytes_total")
    assert metrics.COPY_BYTES.labels(*key)._value.get() == 5120
    assert metrics.COPY_ETA.labels(*key)._value.get() == 12.5
    prom.progress(key, eta=None, not_converging=True)
    assert labels not in _series("blockcopy_copy_eta_seconds")
    assert metrics.NOT_CONVERGING.labels(*key)._value.get() == 1
    prom.idle(key)  # Mirrored: no estimate, but the bytes stay a counter
    assert labels not in _series("blockcopy_not_converging")
    assert labels in _series("blockcopy_copy_bytes_total")
    prom.forget(key)  # deleted
    assert labels not in _series("blockcopy_copy_bytes_total")
    prom.forget(key)  # twice is fine


def test_build_info_and_libvirt_up():
    (info,) = _series("blockcopy_build_info")
    assert dict(info)["version"] == blockcopy.__version__
    prom = metrics.PrometheusMetrics()
    prom.libvirt_up(False)
    assert metrics.LIBVIRT_UP._value.get() == 0
    prom.libvirt_up(True)
    assert metrics.LIBVIRT_UP._value.get() == 1


# ------------------------------------------------------------------ decisions and messages


def test_refused_actions_keep_the_phase_and_warn():
    pivot = Decision(Phase.PIVOTING, Action.PIVOT)
    d = reconcile.refused(pivot, Phase.MIRRORED, "not ready")
    assert (d.phase, d.reason, d.warning) == (Phase.MIRRORED, "PivotRefused", True)
    assert status.phase_event("Pivoting", d)[0] == "Warning"
    d = reconcile.refused(Decision(Phase.COPYING, Action.SET_BANDWIDTH), Phase.COPYING, "x")
    assert (d.phase, d.reason) == (Phase.COPYING, "SetBandwidthFailed")


def test_started_message_explains_added_flags():
    s = BlockCopySpec(domain="vm", disk="vda", dest="/d.qcow2")
    assert reconcile.started_message(s, source="/s.qcow2", fmt="qcow2", flags=frozenset()) \
        == "copying /s.qcow2 to /d.qcow2 as qcow2"
    text = reconcile.started_message(s, source="/s", fmt="raw",
                                     flags=frozenset({Flag.TRANSIENT_JOB}))
    assert "transientJob added" in text


def test_spec_change_condition_lifecycle():
    assert status.spec_change_conditions(changed=[], invalid=[], previous=[]) == []
    (cond,) = status.spec_change_conditions(changed=["dest"], invalid=[], previous=[])
    assert (cond["status"], cond["reason"]) == ("True", "ImmutableField")
    (cond,) = status.spec_change_conditions(changed=[], invalid=["bandwidth"],
                                            previous=[cond])
    assert (cond["status"], cond["reason"]) == ("True", "InvalidValue")
    (cond,) = status.spec_change_conditions(changed=[], invalid=[], previous=[cond])
    assert (cond["status"], cond["reason"]) == ("False", "SpecMatches")


def test_status_messages_are_bounded():
    long = "x" * 40000
    built = status.build_status(Decision(Phase.FAILED, message=long), previous={}, disk=None,
                                node_name="n", generation=1,
                                now=__import__("datetime").datetime(2026, 1, 1))
    assert len(built["message"]) == status.MESSAGE_LIMIT
    assert all(len(c["message"]) <= status.MESSAGE_LIMIT for c in built["conditions"])
