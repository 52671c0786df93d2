"""What the GitOps tools say of BlockCopy objects, from their own code: Flux's kstatus
(sigs.k8s.io/cli-utils status.Compute) and Argo CD's health check (our
deploy/argocd/blockcopy-health.lua run in gopher-lua, set up as Argo CD sets it up), through
the gitops-health command of tests/gitops (hack/build-gitops-health.sh builds it once per
content into the cache directory: the first build takes about a minute)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from support.paths import CACHE, HACK, ROOT

ARGOCD_SCRIPT = ROOT / "deploy" / "argocd" / "blockcopy-health.lua"


def build() -> pathlib.Path:
    """The gitops-health binary (built when missing); its path."""
    proc = subprocess.run([str(HACK / "build-gitops-health.sh")], capture_output=True,
                          text=True, env={**os.environ, "BLOCKCOPY_CACHE_DIR": str(CACHE)})
    if proc.returncode != 0:
        raise AssertionError(f"hack/build-gitops-health.sh failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    binary = pathlib.Path(proc.stdout.strip().splitlines()[-1])
    assert os.access(binary, os.X_OK), binary
    return binary


class GitOpsHealth:
    """``health(objects)``: per object, {"kstatus": {"status", "message"}, "argocd": {...}}
    ("error" in a verdict when the tool failed on the object)."""

    def __init__(self, binary: pathlib.Path, script: pathlib.Path = ARGOCD_SCRIPT):
        self.binary, self.script = binary, script

    def __call__(self, objects: Sequence[Mapping[str, Any]], *, script: pathlib.Path | None = None,
                 open_libs: bool = False) -> list[dict[str, dict[str, str]]]:
        args = [str(self.binary), "-lua", str(script or self.script)]
        if open_libs:
            args.append("-open-libs")
        proc = subprocess.run(args, input=json.dumps(list(objects)), capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise AssertionError(f"gitops-health failed ({proc.returncode}):\n{proc.stderr}")
        results = json.loads(proc.stdout)
        assert len(results) == len(objects)
        return results

    def one(self, obj: Mapping[str, Any], **kw: Any) -> dict[str, dict[str, str]]:
        (result,) = self([obj], **kw)
        return result


@pytest.fixture(scope="session")
def gitops_health() -> GitOpsHealth:
    """Flux's and Argo CD's verdicts on BlockCopy objects (the binary is built when missing)."""
    return GitOpsHealth(build())
