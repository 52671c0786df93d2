"""The hack/ scripts run under `set -o pipefail`. There a reader that stops early (`head`,
`grep -q`) makes the writer die of SIGPIPE whenever it writes after the reader left, and the
whole pipeline then fails (exit 141) although it found what it looked for: `make image`
failed that way in a CI run, depending on how buildah flushed its lines. Readers in these
scripts read to the end of their input (`sed -n 1p`, `grep ... >/dev/null`)."""

from __future__ import annotations

import re

import pytest

from support.paths import HACK

SCRIPTS = sorted(p for p in HACK.rglob("*.sh") if "pipefail" in p.read_text())
EARLY_EXIT_READER = re.compile(r"\|\s*(head\b|grep\s+(-\w*q|--quiet))")


def test_the_scripts_are_found():
    assert {p.name for p in SCRIPTS} >= {"build-image.sh", "cluster-up.sh", "hypervisor-stack.sh",
                                        "processes.sh", "cluster-nodes.sh",
                                        "cluster-nodes-down.sh", "nodes.sh", "kubeconfig.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_pipeline_ends_in_a_reader_that_exits_early(script):
    offending = [f"{script.name}:{n}: {line.strip()}"
                 for n, line in enumerate(script.read_text().splitlines(), 1)
                 if not line.lstrip().startswith("#") and EARLY_EXIT_READER.search(line)]
    assert not offending, "\n".join(offending)
