"""The package's shape, checked: the pure packages (``model``, ``core``) import only the
standard library's pure modules and each other (no ``os``, no ``asyncio``, no clock, no I/O:
import-linter cannot forbid standard-library modules, so this test does), and no module
grows past the size where it stops having one reason to change."""

from __future__ import annotations

import ast
from pathlib import Path

import blockcopy

PACKAGE = Path(blockcopy.__file__).parent
PURE = ("model", "core")
# What pure code may import: data structures, text, arithmetic, pure path and XML parsing.
PURE_STDLIB = {"__future__", "bisect", "collections", "collections.abc", "dataclasses", "datetime",
               "enum", "fnmatch", "hashlib", "math", "posixpath", "typing", "urllib.parse",
               "xml.etree.ElementTree", "xml.sax.saxutils"}
MAX_LINES = 400


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_pure_packages_import_nothing_impure():
    checked = 0
    for package in PURE:
        for path in sorted((PACKAGE / package).glob("*.py")):
            impure = {name for name in imports_of(path)
                      if name not in PURE_STDLIB
                      and not name.startswith(("blockcopy.model", "blockcopy.core"))}
            assert impure == set(), f"{path.relative_to(PACKAGE)} imports {sorted(impure)}"
            checked += 1
    assert checked >= 15  # every module of both packages was looked at


def test_the_pure_packages_read_no_clock():
    for package in PURE:
        for path in sorted((PACKAGE / package).glob("*.py")):
            text = path.read_text()
            for clock in (".now(", "time.time(", "monotonic(", ".today("):
                assert clock not in text, f"{path.relative_to(PACKAGE)} reads a clock: {clock}"


def test_no_module_is_too_big():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert len(sizes) > 30
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}
