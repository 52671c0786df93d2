"""The plugin's distribution (hack/plugin_dist.py, `make dist`) without building a wheel: its
import closure (the plugin and the pure names it needs, nothing of the agent), the krew
archive's contents and the krew manifest's fields (those `kubectl krew` and the krew-index
validation require). The wheel built and installed into a clean virtualenv, and the archive's
launcher run: tests/e2e/test_plugin_dist_installed.py."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
import tarfile
import tomllib

import pytest
import yaml

import blockcopy
from support.paths import HACK, ROOT

spec = importlib.util.spec_from_file_location("plugin_dist", HACK / "plugin_dist.py")
assert spec is not None and spec.loader is not None
dist = importlib.util.module_from_spec(spec)
sys.modules["plugin_dist"] = dist
spec.loader.exec_module(dist)

PLUGIN = ROOT / "plugin"


def test_the_closure_is_the_plugin_and_pure_names_only():
    modules, external = dist.closure()
    assert external <= {"kubernetes", "yaml"}, external
    assert {"blockcopy", "blockcopy.kubectl", "blockcopy.kubectl.main",
            "blockcopy.kubectl.completion", "blockcopy.model", "blockcopy.model.api"} <= \
        set(modules)
    outside = [m for m in modules if not m.startswith(("blockcopy.kubectl", "blockcopy.model"))
               and m != "blockcopy"]
    assert outside == [], outside
    # Every module the closure names exists, and everything the plugin is made of is in it.
    kubectl_dir = ROOT / "operator" / "blockcopy" / "kubectl"
    assert {f"blockcopy.kubectl.{p.stem}" for p in kubectl_dir.glob("*.py")
            if p.stem != "__init__"} <= set(modules)


def test_the_closure_refuses_a_framework(tmp_path, monkeypatch):
    fake = tmp_path / "blockcopy" / "kubectl"
    fake.mkdir(parents=True)
    (tmp_path / "blockcopy" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "main.py").write_text("def f():\n    import kopf\n")
    monkeypatch.setattr(dist, "SOURCES", tmp_path)
    with pytest.raises(SystemExit, match="kopf"):
        dist.check_closure()


def test_the_wheels_project_its_scripts_and_dependencies():
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    main = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "kubectl-blockcopy"
    assert [re.split(r"[<>=!~ ]", d)[0].lower() for d in project["dependencies"]] == \
        ["kubernetes", "pyyaml"]
    assert project["scripts"] == {k: v for k, v in main["scripts"].items()
                                  if k != "blockcopy-operator"}
    assert project["requires-python"] == main["requires-python"]
    assert dist.version() == blockcopy.__version__


@pytest.fixture
def built(tmp_path):
    wheel = tmp_path / f"kubectl_blockcopy-{blockcopy.__version__}-py3-none-any.whl"
    wheel.write_bytes(b"PK not a real wheel")
    archive = dist.build_archive(tmp_path, wheel)
    manifest = dist.render_manifest((PLUGIN / "blockcopy.yaml").read_text(), archive=archive,
                                    url_base="https://example.org/releases/v1/",
                                    wheel=wheel.name, plugin_version=blockcopy.__version__)
    return archive, wheel, yaml.safe_load(manifest)


def test_the_archive_holds_the_launcher_the_completion_script_and_the_wheel(built, tmp_path):
    archive, wheel, _ = built
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        launcher = tar.extractfile("kubectl-blockcopy").read().decode()
        complete = tar.extractfile("kubectl_complete-blockcopy").read().decode()
    assert {"kubectl-blockcopy", "kubectl_complete-blockcopy", wheel.name} <= set(members)
    assert all(m.mtime == 0 and m.uid == 0 for m in members.values())
    assert members["kubectl-blockcopy"].mode & 0o111 and \
        members["kubectl_complete-blockcopy"].mode & 0o111
    assert f'WHEEL = "{wheel.name}"' in launcher and launcher.startswith("#!/usr/bin/env python3")
    assert complete == '#!/bin/sh\nexec kubectl-blockcopy __complete "$@"\n'
    # Reproducible: the same inputs, the same bytes (and so the same sha256 in the manifest).
    again = tmp_path / "again"
    again.mkdir()
    assert dist.build_archive(again, wheel).read_bytes() == archive.read_bytes()


def test_the_krew_manifest_has_what_krew_requires(built):
    archive, _wheel, manifest = built
    assert manifest["apiVersion"] == "krew.googlecontainertools.github.com/v1alpha2"
    assert manifest["kind"] == "Plugin"
    name = manifest["metadata"]["name"]
    assert name == "blockcopy" == (PLUGIN / "blockcopy.yaml").stem  # krew: file is NAME.yaml
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", name)
    spec = manifest["spec"]
    assert spec["version"] == f"v{blockcopy.__version__}"
    assert re.fullmatch(r"v\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", spec["version"])
    assert 0 < len(spec["shortDescription"]) <= 50 and spec["description"].strip()
    assert "$" not in yaml.safe_dump(manifest).replace("$(", "").replace("${KREW", "") \
        .replace("$HOME", "")  # every placeholder filled
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    for platform in spec["platforms"]:
        assert platform["uri"] == f"https://example.org/releases/v1/{archive.name}"
        assert platform["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
        assert platform["bin"] in names
        selector = platform["selector"]
        oses = {v for e in selector["matchExpressions"] if e["key"] == "os"
                for v in e["values"]}
        assert oses == {"linux", "darwin"}
        for entry in platform["files"]:
            assert entry["from"] and entry["to"]
            assert entry["from"] == "*" or entry["from"] in names
