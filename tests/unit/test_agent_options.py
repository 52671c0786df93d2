"""`blockcopy-operator --help` and docs/agent.md's table of options say the same: every
option of the agent (and of its controller mode) has a row, with the environment variable
the option reads, and the table names no option the command line does not have."""

from __future__ import annotations

import re

import pytest

from blockcopy.runtime.cli import parse_args
from support.paths import ROOT

OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z-]+)")
ENV = re.compile(r"\benv\s+([A-Z][A-Z_]+[A-Z])")  # "(env NODE_NAME; ...)" in a help


def _help(capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """Each option of ``blockcopy-operator --help`` -> its help text."""
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    entries: dict[str, str] = {}
    option = None
    for line in capsys.readouterr().out.partition("options:")[2].splitlines():
        if m := re.match(r"\s{2}(?:-\w(?: \S+)?, )?(--[a-z][a-z-]+)", line):
            option = m.group(1)
            entries[option] = line[m.end():]
        elif option is not None:
            entries[option] += " " + line.strip()
    return entries


def _table() -> dict[str, str]:
    """docs/agent.md's options: each option of a row's first cell -> the row."""
    text = (ROOT / "docs" / "agent.md").read_text().partition("## Options")[2]
    text = text.partition("\n## ")[0]
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `--"):
            first = line.split(" | ")[0]
            for option in OPTION.findall(first):
                rows[option] = line
    return rows


def test_every_option_of_the_agent_is_documented_with_its_environment_variable(capsys):
    helps = _help(capsys)
    options = set(helps) - {"--help", "--version"}
    rows = _table()
    assert options == set(rows)
    for option in options:
        for env in ENV.findall(helps[option]):
            assert env in rows[option], (option, env)


def test_the_check_reads_the_help_and_the_table(capsys):
    helps = _help(capsys)
    assert ENV.findall(helps["--libvirt-uri"]) == ["LIBVIRT_URI"]
    assert ENV.findall(helps["--status-interval"]) == [] and "-v" not in helps
    rows = _table()
    assert "`LIBVIRT_URI`" in rows["--libvirt-uri"] and "--mode" in rows
