"""The files a user or packager reads before the code: the licence the package declares is the
one shipped, in full, and the changelog has a section for the version being built."""

from __future__ import annotations

import collections
import pathlib
import tomllib

from support.paths import ROOT


def test_license_is_the_full_text_of_the_declared_licence() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert declared == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    # The full text, not a notice pointing elsewhere: all nine sections and the appendix.
    for section in ("1. Definitions.", "4. Redistribution.", "9. Accepting Warranty or "
                    "Additional Liability.", "END OF TERMS AND CONDITIONS", "APPENDIX"):
        assert section in text, section


def test_changelog_names_the_package_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert changelog.startswith("# Changelog")
    assert f"## [{version}]" in changelog or "## [Unreleased]" in changelog


def test_no_two_test_files_share_a_name() -> None:
    """`make test` collects every tier in one pytest run (rootdir imports, no packages): two
    test modules of one basename stop the whole run at collection, which running one tier at
    a time (make unit, make e2e) never shows."""
    tests = pathlib.Path(__file__).resolve().parents[1]
    names = collections.Counter(p.name for p in tests.rglob("test_*.py"))
    assert [n for n, count in names.items() if count > 1] == []
