"""Helm with an isolated home (no user repositories or plugins leak in), and picking objects
out of rendered manifests: the chart tests render offline and install into the local server."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import yaml

from support.paths import CHART, STATE

# The chart's ClusterRoles for people (userRoles.create) have fixed names: one release per
# cluster may own them. Test sessions that share the API server take turns (a file lock in
# the shared state dir), and a release that only needs the agent sets userRoles.create=false.
USER_ROLES = ("blockcopy-viewer", "blockcopy-editor", "blockcopy-admin")
NO_USER_ROLES = ("--set", "userRoles.create=false")


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

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(self.binary), *args], capture_output=True, text=True,
                              env=self.env)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def template(self, *args: str, release: str = "bc", namespace: str = "blockcopy-system",
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("template", release, str(CHART), "--namespace", namespace, *args,
                        check=check)

    def schema_refusal(self, *args: str) -> str:
        """helm template's error for values the chart's values.schema.json refuses (asserted
        to be that refusal, not another failure)."""
        proc = self.template(*args, check=False)
        assert proc.returncode != 0, proc.stdout[:500]
        assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
        return proc.stderr

    def render(self, *args: str, **kw: Any) -> list[dict[str, Any]]:
        """The rendered manifests as objects (empty documents dropped)."""
        out = self.template(*args, **kw).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    def manifest(self, release: str, namespace: str) -> list[dict[str, Any]]:
        """The objects of an installed release."""
        out = self.run("get", "manifest", release, "--namespace", namespace).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]


def is_controller(doc: dict[str, Any]) -> bool:
    """One of the plan controller's objects (controller.enabled)."""
    labels = (doc.get("metadata") or {}).get("labels") or {}
    return labels.get("app.kubernetes.io/component") == "controller"


def agent_part(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The release's objects without the plan controller's (its ServiceAccount, ClusterRole,
    binding and Deployment)."""
    return [d for d in docs if not is_controller(d)]


def controller_part(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if is_controller(d)]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@contextlib.contextmanager
def user_roles_turn(timeout: float = 900) -> Iterator[None]:
    """Hold the right to install a release that creates the fixed-name user ClusterRoles."""
    path = STATE / "locks" / "chart-user-roles.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{path} still held after {timeout} s") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def install_with_user_roles(helm: Helm, name: str, namespace: str, *args: str,
                            before: Callable[[], Any] = lambda: None,
                            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`helm install` of the chart, user ClusterRoles included (call it holding
    `user_roles_turn`). A session without the lock (an older checkout) may own them for a
    while: retried until they are free. ``before`` runs before each attempt (e.g. applying
    this checkout's CRD: another session may have applied its own, which conflicts with
    Helm's server-side apply of crds/); a CRD conflict is retried too."""
    deadline = time.monotonic() + timeout
    while True:
        before()
        proc = helm.run("install", name, str(CHART), "--namespace", namespace, *args,
                        check=False)
        if proc.returncode == 0:
            return proc
        taken = "cannot be imported into the current release" in proc.stderr and \
            any(role in proc.stderr for role in USER_ROLES)
        crd_conflict = "failed to install CRD" in proc.stderr and "conflict" in proc.stderr
        helm.run("uninstall", name, "--namespace", namespace, check=False)
        if not (taken or crd_conflict) or time.monotonic() > deadline:
            raise AssertionError(f"helm install {name} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        time.sleep(5)
