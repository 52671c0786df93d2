"""The destination guarantees as pure rules: the same image (file identity or path), who
uses it (named only where the namespace may see that domain), and what holds a pivot."""

from __future__ import annotations

import pytest

from blockcopy.core import destinations
from blockcopy.core.destinations import DestCheck, guard, held
from blockcopy.core.domainxml import parse_disks
from blockcopy.core.reconcile import Action, Decision
from blockcopy.model.api import Phase
from blockcopy.model.observation import FileIdentity, ImageUser

FILE = FileIdentity("file", 2049, 100, generation=7)
PIVOT = Decision(Phase.PIVOTING, Action.PIVOT)
USER = ImageUser(path="/i/b.qcow2", domain="db-1", uuid="u", target="vdb", running=False,
                 definition="persistent")


def test_the_same_image_is_the_same_file_or_where_unknown_the_same_path():
    assert destinations.same_image("/a", FILE, "/b", FileIdentity("file", 2049, 100, 0, 7))
    assert not destinations.same_image("/a", FILE, "/a", FileIdentity("file", 2049, 101))
    # A deleted file's inode number reused at once: another generation, another file.
    assert not FILE.same(FileIdentity("file", 2049, 100, generation=8))
    assert FILE.same(FileIdentity("file", 2049, 100))  # generation unknown on one side
    assert FileIdentity("block", 5, 1, rdev=0x801).same(FileIdentity("block", 6, 9, rdev=0x801))
    assert destinations.same_image("/new/x", None, "/new/x", None)
    assert not destinations.same_image("/new/x", None, "/new/y", FILE)
    assert FileIdentity.from_status(FILE.status()) == FILE
    assert FileIdentity.from_status({"kind": "file"}) is None


def test_the_other_domain_is_named_only_where_the_namespace_may_see_it():
    refused = destinations.in_use("/i/b.qcow2", USER, visible=True)
    assert (refused.phase, refused.reason) == (Phase.FAILED, "DestInUse")
    assert "disk vdb of domain 'db-1' (not running)" in refused.message
    hidden = destinations.in_use("/i/b.qcow2", USER, visible=False)
    assert "db-1" not in hidden.message and "another domain" in hidden.message


def test_what_holds_a_pivot():
    assert held("/d", DestCheck(FILE, FILE)) is None
    assert held("/d", DestCheck(FILE, None))[0] == "DestVanished"
    assert held("/d", DestCheck(FILE, FileIdentity("file", 2049, 101)))[0] == "DestReplaced"
    assert held("/d", DestCheck(FILE, None, error="Permission denied"))[0] == "DestUnreadable"
    assert held("/d", DestCheck(FILE, FILE, user=USER))[0] == "DestInUse"
    assert held("/d", DestCheck(None, FILE)) is None  # nothing recorded: something is there


def test_the_guard_holds_only_a_pivot_and_keeps_its_condition_between_looks():
    decision, (cond,) = guard(PIVOT, "/d", DestCheck(FILE, None), previous=[])
    assert (decision.phase, decision.action, decision.reason) == (
        Phase.MIRRORED, Action.NONE, "DestVanished")
    assert (cond["type"], cond["status"]) == ("DestinationIntact", "False")
    assert destinations.was_held([cond], "DestVanished")
    mirrored = Decision(Phase.MIRRORED)
    assert guard(mirrored, "/d", DestCheck(FILE, None), previous=[])[0] == mirrored
    assert guard(mirrored, "/d", None, previous=[cond])[1] == [
        {k: cond[k] for k in ("type", "status", "reason", "message")}]
    assert guard(PIVOT, "/d", DestCheck(FILE, FILE), previous=[cond])[0] == PIVOT


def test_every_disk_of_a_domain_and_storage_volumes_are_read():
    xml = """<domain><devices>
      <disk type='file' device='disk'><source file='/i/a.qcow2'/><target dev='vda'/>
        <backingStore type='file'><format type='qcow2'/><source file='/i/base.qcow2'/>
        </backingStore></disk>
      <disk type='volume' device='disk'><source pool='fast' volume='v1'/><target dev='vdb'/></disk>
      <disk type='file' device='cdrom'><source file='/isos/x.iso'/><target dev='sda'/></disk>
    </devices></domain>"""
    disks = parse_disks(xml)
    assert [(d.target, d.source, d.chain, d.volume) for d in disks] == [
        ("vda", "/i/a.qcow2", ("/i/base.qcow2",), None),
        ("vdb", None, (), ("fast", "v1")),
        ("sda", "/isos/x.iso", (), None)]


def test_the_reopen_keeps_every_option_libvirt_set_but_zeros_and_discard():
    from blockcopy.core import zeroes

    nodes = {"libvirt-3-format": {"drv": "qcow2", "node-name": "libvirt-3-format"},
             "libvirt-3-storage": {"drv": "file", "file": "/i/c.qcow2"}}
    assert zeroes.reopen_options(index=3, nodes=nodes, cache="none", io=None, on=True) == {
        "driver": "qcow2", "node-name": "libvirt-3-format", "file": "libvirt-3-storage",
        "backing": None, "read-only": False, "discard": "unmap", "detect-zeroes": "unmap",
        "cache": {"direct": True, "no-flush": False}}
    back = zeroes.reopen_options(index=3, nodes=nodes, cache=None, io=None, on=False)
    assert back["discard"] == "ignore" and "detect-zeroes" not in back
    # A raw image opened as one storage node (libvirt 11 with QEMU 9.1): reopened whole.
    raw = {"libvirt-4-storage": {"drv": "host_device", "file": "/dev/loop3"}}
    assert zeroes.reopen_options(index=4, nodes=raw, cache=None, io="native", on=True) == {
        "driver": "host_device", "node-name": "libvirt-4-storage", "filename": "/dev/loop3",
        "aio": "native", "read-only": False, "discard": "unmap", "detect-zeroes": "unmap"}
    for bad in ({"libvirt-3-format": {"drv": "qcow2", "backing_file_depth": 1}},
                {"libvirt-3-format": {"drv": "qcow2", "encrypted": True}}, {}):
        with pytest.raises(zeroes.ZeroesError):
            zeroes.reopen_options(index=3, nodes=bad, cache=None, io=None, on=True)


def test_the_sources_encryption_goes_into_the_destinations_source():
    from blockcopy.core.domainxml import dest_disk_xml, parse_disk

    enc = "<encryption format='luks'><secret type='passphrase' uuid='u-1'/></encryption>"
    for placement in (f"<source file='/i/a.qcow2'>{enc}</source>",
                      f"<source file='/i/a.qcow2'/>{enc}"):
        xml = (f"<domain><devices><disk type='file' device='disk'>{placement}"
               "<backingStore type='file'><source file='/i/b.qcow2'>" + enc + "</source>"
               "<backingStore/></backingStore><target dev='vda'/></disk></devices></domain>")
        disk = parse_disk(xml, "vda")
        assert disk is not None and disk.encryption is not None and disk.chain_encrypted
        assert 'uuid="u-1"' in disk.encryption and disk.encryption.startswith("<encryption")
        dest = dest_disk_xml("/n/c.qcow2", "qcow2", block_device=False,
                             encryption=disk.encryption)
        assert dest.startswith("""<disk type='file'><source file="/n/c.qcow2"><encryption""")
    plain = parse_disk("<domain><devices><disk><source file='/i/a'/><target dev='vda'/>"
                       "</disk></devices></domain>", "vda")
    assert plain is not None and plain.encryption is None and not plain.chain_encrypted


LUKS = "<encryption format='luks'><secret type='passphrase' uuid='0b0c-5e'/></encryption>"


def test_encryption_is_kept_or_the_copy_is_refused():
    from blockcopy.core import starting
    from blockcopy.model.api import parse_spec
    from blockcopy.model.observation import DiskState

    disk = DiskState(domain_found=True, domain_running=True, disk_found=True, target="vda",
                     source="/i/a.qcow2", encryption=LUKS)

    def reason(planned=False, **spec):
        d = starting.encryption_refusal(parse_spec({"domain": "vm", "disk": "vda", **spec}),
                                        disk, planned=planned)
        return d.reason if d else None

    assert reason(dest="/i/b.qcow2") is None
    assert reason(dest="/i/b.qcow2", flags=["shallow"]) is None
    assert reason(dest="nbd://10.0.0.5:10809/x") == "EncryptionNotKept"
    assert reason(dest="/i/b.qcow2", backingChain="copy", planned=True) == "EncryptionNotKept"
    chained = DiskState(**{**disk.__dict__, "encryption": None, "chain_encrypted": True})
    assert starting.encryption_refusal(
        parse_spec({"domain": "vm", "disk": "vda", "dest": "/i/b.qcow2",
                    "flags": ["shallow", "reuseExternal"]}), chained, planned=False
    ).reason == "EncryptionNotKept"
    assert starting.encryption_refusal(parse_spec({"domain": "vm", "disk": "vda",
                                                   "dest": "/i/b"}),
                                       DiskState(domain_found=True), planned=True) is None


def test_an_encrypted_copy_needs_room_for_its_luks_header_and_a_raw_one_for_all_of_it():
    """A raw copy of an encrypted disk is a LUKS container QEMU writes whole (measured: a
    64 MiB disk holding 8 MiB of data gave a 66 MiB raw copy); a qcow2 one holds the data
    and a LUKS header of about 2 MiB."""
    from blockcopy.core.starting import LUKS_HEADER, required_bytes, space_basis
    from blockcopy.model.ports import DiskSize

    mib = 1 << 20
    size = DiskSize(capacity=64 * mib, allocation=8 * mib)
    plain = required_bytes(size, {})
    assert plain == 8 * mib + 64 * mib // 256 + mib
    assert LUKS_HEADER >= 2 * mib + 256 * 1024  # qemu-img measure: 2.3 MiB for a LUKS qcow2
    assert required_bytes(size, {}, encrypted=True, fmt="qcow2") == plain + LUKS_HEADER
    assert required_bytes(size, {}, encrypted=True, fmt="raw") == 64 * mib + LUKS_HEADER
    assert required_bytes(size, {}, encrypted=True, fmt=None) == 64 * mib + LUKS_HEADER
    assert required_bytes(size, {}, fmt="raw") == plain  # a plain raw copy stays sparse
    assert "written whole" in space_basis(encrypted=True, fmt="raw")
    assert "LUKS header" in space_basis(encrypted=True, fmt="qcow2")
    assert space_basis(encrypted=False, fmt="raw") == \
        "the data allocated in the images it copies"
