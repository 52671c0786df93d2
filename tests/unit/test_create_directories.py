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
