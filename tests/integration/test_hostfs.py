"""adapters.hostfs against the real libvirtd, for an agent that may not write the host (the
chart's read-only roots): a directory made with the owner, group and mode asked for (an
existing one given them), a file deleted (also where the directory is another pool's target,
that pool left as it was), no pool left behind, and libvirt's refusals as OSErrors."""

from __future__ import annotations

import os
import shutil
import stat
import uuid

import libvirt
import pytest

from blockcopy.adapters.hostfs import LibvirtHostFiles
from support.vms import DEFAULT_URI, IMAGES

pytestmark = pytest.mark.integration


@pytest.fixture
def base():
    path = IMAGES / f"hostdirs-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pools() -> set[str]:
    with libvirt.open(DEFAULT_URI) as conn:
        return {p.name() for p in conn.listAllStoragePools()}


def test_made_with_the_owner_group_and_mode_asked_for(base):
    before = pools()
    made = LibvirtHostFiles(DEFAULT_URI)
    made.make_directory(str(base / "new"), 64055, 108, 0o750)
    st = os.stat(base / "new")
    assert stat.S_ISDIR(st.st_mode)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (64055, 108, 0o750)
    # one that exists (made by the agent's own mkdir before its chown was refused): set
    (base / "half").mkdir(mode=0o700)
    made.make_directory(str(base / "half"), 1234, 1235, 0o711)
    st = os.stat(base / "half")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 1235, 0o711)
    assert pools() == before  # the transient pools are gone


def test_libvirt_refusing_is_an_oserror_and_nothing_is_made(base):
    before = pools()
    with pytest.raises(OSError, match="libvirt could not make"):
        # a parent that is a file: libvirt cannot make a directory below it
        (base / "file").write_bytes(b"x")
        LibvirtHostFiles(DEFAULT_URI).make_directory(str(base / "file" / "sub"), 0, 0, 0o755)
    assert (base / "file").read_bytes() == b"x"
    assert pools() == before


def test_a_file_deleted_and_nothing_else(base):
    before = pools()
    (base / "old.qcow2").write_bytes(b"old")
    (base / "other.qcow2").write_bytes(b"other")
    LibvirtHostFiles(DEFAULT_URI).delete(str(base / "old.qcow2"))
    assert sorted(p.name for p in base.iterdir()) == ["other.qcow2"]
    assert (base / "other.qcow2").read_bytes() == b"other"
    assert pools() == before
    with pytest.raises(OSError, match="libvirt could not delete"):
        LibvirtHostFiles(DEFAULT_URI).delete(str(base / "old.qcow2"))  # gone already
    assert pools() == before


def test_in_a_directory_that_is_a_running_pools_target(base):
    (base / "old.qcow2").write_bytes(b"old")
    (base / "keep.qcow2").write_bytes(b"keep")
    xml = (f"<pool type='dir'><name>hostfs-{base.name}</name><target><path>{base}</path>"
           "</target></pool>")
    with libvirt.open(DEFAULT_URI) as conn:
        theirs = conn.storagePoolCreateXML(xml, 0)
        try:
            LibvirtHostFiles(DEFAULT_URI).delete(str(base / "old.qcow2"))
            assert sorted(p.name for p in base.iterdir()) == ["keep.qcow2"]
            assert theirs.isActive()  # their pool: still there, still running
        finally:
            theirs.destroy()
