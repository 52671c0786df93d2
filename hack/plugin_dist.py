#!/usr/bin/env python3
"""`make dist`: the kubectl plugin as a distribution of its own, in dist/:

- kubectl_blockcopy-VERSION-py3-none-any.whl: the plugin's package and the modules it
  imports (its import closure, found by reading the sources: blockcopy/__init__.py,
  blockcopy.model.api), built from plugin/pyproject.toml. Refused when that closure
  imports anything but the standard library, kubernetes and yaml.
- kubectl-blockcopy-vVERSION.tar.gz: the krew archive: the wheel, the launcher
  ``kubectl-blockcopy`` (on first run it makes a private virtualenv and installs the wheel
  into it with pip) and ``kubectl_complete-blockcopy``.
- blockcopy.yaml: the krew manifest (plugin/blockcopy.yaml), its uri and sha256 those of the
  archive.

Reproducible: the archive's entries are sorted, owned by root, dated 0.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import os
import pathlib
import shutil
import string
import subprocess
import sys
import tarfile
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ROOT / "operator"
PLUGIN = ROOT / "plugin"
ALLOWED = {"kubernetes", "yaml"}  # besides the standard library and blockcopy itself
NAME = "kubectl-blockcopy"
COMPLETE = "kubectl_complete-blockcopy"


def module_file(module: str) -> pathlib.Path | None:
    """The source of ``module`` under operator/ (a package's __init__.py), or None."""
    base = SOURCES.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imports_of(path: pathlib.Path, module: str) -> set[str]:
    """Every module ``path`` imports (also inside functions), absolute; ``from a import b``
    gives a.b when that is a module, else a."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if module_file(sub) else base)
    return {m for m in found if m != "__future__"}


def closure(start: str = "blockcopy.kubectl") -> tuple[list[str], set[str]]:
    """(the blockcopy modules the plugin needs, sorted; the other top-level modules it
    imports). Every module of the ``start`` package, and what they import, transitively;
    a module's parent packages come with it."""
    todo = [f"{start}.{p.stem}" if p.stem != "__init__" else start
            for p in sorted(SOURCES.joinpath(*start.split(".")).glob("*.py"))]
    seen: set[str] = set()
    external: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        path = module_file(module)
        if path is None:
            raise SystemExit(f"plugin_dist: {module} has no source under {SOURCES}")
        for imported in imports_of(path, module):
            if imported.split(".")[0] == "blockcopy":
                todo.append(imported)
            else:
                external.add(imported.split(".")[0])
    return sorted(seen), external - set(sys.stdlib_module_names)


def check_closure() -> list[str]:
    modules, external = closure()
    if external - ALLOWED:
        raise SystemExit(f"plugin_dist: the plugin imports {sorted(external - ALLOWED)}: only "
                         f"the standard library and {sorted(ALLOWED)} may be")
    return modules


def version() -> str:
    scope: dict[str, object] = {}
    exec((SOURCES / "blockcopy" / "__init__.py").read_text(), scope)
    return str(scope["__version__"])


def build_wheel(out: pathlib.Path, work: pathlib.Path) -> pathlib.Path:
    """The plugin's wheel, from its modules staged next to plugin/pyproject.toml."""
    stage = work / "wheel-src"
    for module in check_closure():
        source = module_file(module)
        assert source is not None
        target = stage / "src" / source.relative_to(SOURCES)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    shutil.copy2(PLUGIN / "pyproject.toml", stage / "pyproject.toml")
    shutil.copy2(ROOT / "LICENSE", stage / "LICENSE")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(stage)], check=True,
                   env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"})
    (wheel,) = out.glob(f"kubectl_blockcopy-{version()}-*.whl")
    return wheel


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(data))


def build_archive(out: pathlib.Path, wheel: pathlib.Path) -> pathlib.Path:
    """The krew archive: launcher, completion script, wheel and LICENSE."""
    launcher = (PLUGIN / "launcher.py").read_text()
    launcher = launcher.replace('WHEEL = "kubectl_blockcopy.whl"', f'WHEEL = "{wheel.name}"')
    members = {NAME: (launcher.encode(), 0o755),
               COMPLETE: (f'#!/bin/sh\nexec {NAME} __complete "$@"\n'.encode(), 0o755),
               wheel.name: (wheel.read_bytes(), 0o644)}
    members["LICENSE"] = ((ROOT / "LICENSE").read_bytes(), 0o644)  # krew-index requires one
    path = out / f"{NAME}-v{version()}.tar.gz"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(members):
            _add(tar, name, *members[name])
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f,
                                                mtime=0) as gz:
        gz.write(raw.getvalue())
    return path


def render_manifest(template: str, *, archive: pathlib.Path, url_base: str, wheel: str,
                    plugin_version: str) -> str:
    """plugin/blockcopy.yaml with ${VERSION}, ${URI}, ${SHA256} and ${WHEEL} filled."""
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    return string.Template(template).substitute(
        VERSION=plugin_version, URI=f"{url_base.rstrip('/')}/{archive.name}", SHA256=sha256,
        WHEEL=wheel)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "dist")
    parser.add_argument("--url-base", help="where the release serves the archive "
                        "(default: file://OUT, for `kubectl krew install --manifest`)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("kubectl_blockcopy-*.whl"), *out.glob(f"{NAME}-v*.tar.gz")]:
        old.unlink()
    with tempfile.TemporaryDirectory() as work:
        wheel = build_wheel(out, pathlib.Path(work))
    archive = build_archive(out, wheel)
    manifest = render_manifest((PLUGIN / "blockcopy.yaml").read_text(), archive=archive,
                               url_base=args.url_base or out.as_uri(), wheel=wheel.name,
                               plugin_version=version())
    (out / "blockcopy.yaml").write_text(manifest)
    for path in (wheel, archive, out / "blockcopy.yaml"):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
