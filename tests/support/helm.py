"""Helm with an isolated home (no user repositories or plugins leak in), and picking objects
out of rendered manifests: the chart tests render offline and install into the local server."""

from __future__ import annotations

import os
import pathlib
import subprocess
from typing import Any

import yaml

from support.paths import CHART


class Helm:
    """The helm binary with its own home; with a kubeconfig for the releases it installs."""

    def __init__(self, binary: pathlib.Path, home: pathlib.Path,
                 kubeconfig: pathlib.Path | None = None):
        self.binary = binary
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        if kubeconfig is not None:
            self.env["KUBECONFIG"] = str(kubeconfig)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.binary), *args], capture_output=True, text=True,
                              env=self.env)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def template(self, *args: str, release: str = "bc", namespace: str = "blockcopy-system",
                 check: bool = True) -> subprocess.CompletedProcess:
        return self.run("template", release, str(CHART), "--namespace", namespace, *args,
                        check=check)

    def render(self, *args: str, **kw: Any) -> list[dict]:
        """The rendered manifests as objects (empty documents dropped)."""
        out = self.template(*args, **kw).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    def manifest(self, release: str, namespace: str) -> list[dict]:
        """The objects of an installed release."""
        out = self.run("get", "manifest", release, "--namespace", namespace).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]
