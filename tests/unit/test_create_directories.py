"""spec.createDirectories: the agent makes the missing directories of dest like the source's
(adapters.files.make_directories on a temporary tree), and the spec's rules."""

from __future__ import annotations

import os
import pathlib
import stat

import celpy
import pytest
import yaml

from blockcopy.adapters.files import make_directories
from blockcopy.model.api import SpecError, parse_spec

CRD = yaml.safe_load((pathlib.Path(__file__).parents[2] / "crds" / "blockcopy.yaml").read_text())
SPEC_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_missing_directories_made_like_the_sources(tmp_path):
    src = tmp_path / "pool-a" / "node" / "vm"
    src.mkdir(parents=True)
    (tmp_path / "pool-a" / "node").chmod(0o750)
    src.chmod(0o711)
    (tmp_path / "pool-b").mkdir()
    dest = tmp_path / "pool-b" / "node" / "vm" / "disk.qcow2"
    made, why = make_directories(str(dest), str(src / "disk.qcow2"), [str(tmp_path)])
    assert why is None
    assert made == [str(tmp_path / "pool-b" / "node"), str(tmp_path / "pool-b" / "node" / "vm")]
    assert stat.S_IMODE(os.stat(dest.parent).st_mode) == 0o711
    assert stat.S_IMODE(os.stat(dest.parent.parent).st_mode) == 0o750
    assert os.stat(dest.parent).st_uid == os.stat(src).st_uid
    # Nothing missing: nothing made.
    assert make_directories(str(dest), str(src / "disk.qcow2"), [str(tmp_path)]) == ([], None)


def test_nothing_made_outside_the_allowed_roots_or_without_a_matching_source(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "elsewhere").mkdir()
    made, why = make_directories(str(tmp_path / "elsewhere" / "a" / "d.qcow2"),
                                 str(tmp_path / "root" / "a" / "s.qcow2"),
                                 [str(tmp_path / "root")])
    assert made == [] and why is not None and why[0] == "DestNotAllowed"
    assert not (tmp_path / "elsewhere" / "a").exists()
    made, why = make_directories(str(tmp_path / "root" / "a" / "b" / "c" / "d.qcow2"),
                                 "/s.qcow2", [str(tmp_path / "root")])
    assert made == [] and why is not None and why[0] == "DestNotCreatable"


def test_spec_field_and_its_rule():
    base = {"domain": "vm", "disk": "vda", "dest": "/var/lib/libvirt/images/x/c.qcow2"}
    assert parse_spec({**base, "createDirectories": True}).create_directories
    assert not parse_spec(base).create_directories
    with pytest.raises(SpecError, match="path destination"):
        parse_spec({**base, "dest": "nbd://h:1/e", "createDirectories": True})
    env = celpy.Environment()
    (rule,) = [r for r in SPEC_SCHEMA["x-kubernetes-validations"]
               if "createDirectories" in r["rule"]]
    program = env.program(env.compile(rule["rule"]))
    for spec, ok in ((base, True), ({**base, "createDirectories": True}, True),
                     ({**base, "dest": "nbd://h:1/e", "createDirectories": True}, False),
                     ({**base, "dest": "nbd://h:1/e", "createDirectories": False}, True)):
        assert bool(program.evaluate({"self": celpy.json_to_cel(spec)})) == ok, spec


def test_where_the_agent_may_not_write_the_fallback_makes_them(tmp_path, monkeypatch):
    """The chart's read-only roots (EROFS on mkdir): each missing directory, top first, is
    made by the fallback (adapters.hostdirs: libvirt) with the source's owner, group and mode.
    FAULT INJECTION: os.mkdir refused like on a read-only mount (root ignores modes here)."""
    src = tmp_path / "pool-a" / "vm"
    src.mkdir(parents=True)
    src.chmod(0o751)
    (tmp_path / "pool-a").chmod(0o750)
    (tmp_path / "pool-b").mkdir()
    real_mkdir = os.mkdir
    calls: list[tuple[str, int, int, int]] = []

    def read_only(path, mode=0o777):
        raise OSError(30, "Read-only file system", path)

    def fallback(path, uid, gid, mode):
        calls.append((path, uid, gid, mode))
        real_mkdir(path, mode)

    monkeypatch.setattr(os, "mkdir", read_only)
    dest = tmp_path / "pool-b" / "a" / "vm" / "disk.qcow2"
    made, why = make_directories(str(dest), str(src / "disk.qcow2"), [str(tmp_path)],
                                 fallback=fallback)
    assert why is None
    st = os.stat(src)
    assert calls == [(str(tmp_path / "pool-b" / "a"), st.st_uid, st.st_gid, 0o750),
                     (str(tmp_path / "pool-b" / "a" / "vm"), st.st_uid, st.st_gid, 0o751)]
    assert made == [c[0] for c in calls]


def test_without_a_fallback_or_when_it_fails_the_refusal_says_why(tmp_path, monkeypatch):
    """FAULT INJECTION as above."""
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()

    def read_only(path, mode=0o777):
        raise OSError(30, "Read-only file system", path)

    def failing(path, uid, gid, mode):
        raise OSError(f"libvirt could not make {path}: denied")

    monkeypatch.setattr(os, "mkdir", read_only)
    dest, source = str(tmp_path / "dst" / "x" / "d.qcow2"), str(tmp_path / "src" / "s.qcow2")
    made, why = make_directories(dest, source, [str(tmp_path)])
    assert made == [] and why is not None and why[0] == "DestNotCreatable"
    assert "Read-only file system" in why[1]
    made, why = make_directories(dest, source, [str(tmp_path)], fallback=failing)
    assert made == [] and why is not None and "libvirt could not make" in why[1]


def test_a_file_the_agent_may_not_unlink_is_deleted_by_the_fallback(tmp_path, monkeypatch):
    """LocalFiles.delete: on EROFS the fallback (adapters.hostfs: libvirt) deletes it; other
    errors are not passed on to it. FAULT INJECTION: os.unlink refused."""
    from blockcopy.adapters.files import LocalFiles
    victim = tmp_path / "old.qcow2"
    victim.write_bytes(b"x")
    asked: list[str] = []
    real_unlink = os.unlink

    def fallback(path):
        asked.append(path)
        real_unlink(path)

    def read_only(path, *a, **kw):
        raise OSError(30, "Read-only file system", path)

    monkeypatch.setattr(os, "unlink", read_only)
    LocalFiles(delete=fallback).delete(str(victim))
    assert asked == [str(victim)] and not victim.exists()
    with pytest.raises(OSError, match="Read-only"):
        LocalFiles().delete(str(tmp_path / "other"))
    monkeypatch.setattr(os, "unlink", real_unlink)
    with pytest.raises(FileNotFoundError):  # not a refusal: not the fallback's
        LocalFiles(delete=fallback).delete(str(tmp_path / "missing"))
    assert asked == [str(victim)]
