"""The plugin's own distribution as a user installs it (`make dist`: hack/plugin_dist.py):
its wheel pip-installed into a clean virtualenv (no kopf, no libvirt-python, nothing of the
agent), and the krew archive's launcher, each run by the real kubectl as `kubectl blockcopy`
against the real API server.

Needs the network: pip fetches the wheel's dependencies (the Kubernetes client, PyYAML) from
PyPI (or wherever pip is configured to look)."""

from __future__ import annotations

import functools
import http.server
import os
import pathlib
import subprocess
import sys
import threading
import venv
from collections.abc import Iterator

import pytest
import yaml

import blockcopy
from support.paths import HACK, KUBECTL

AGENT_ONLY = ["kopf", "libvirt", "prometheus_client",
              "blockcopy.agent", "blockcopy.adapters", "blockcopy.runtime", "blockcopy.core"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Iterator[dict[str, pathlib.Path]]:
    """`make dist` into a directory served over HTTP (the manifest's uri points there, as a
    release's would point to its download)."""
    out = tmp_path_factory.mktemp("dist")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    proc = subprocess.run([sys.executable, str(HACK / "plugin_dist.py"), "--out", str(out),
                           "--url-base", url], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("kubectl_blockcopy-*.whl")
    (archive,) = out.glob("kubectl-blockcopy-v*.tar.gz")
    yield {"wheel": wheel, "archive": archive, "manifest": out / "blockcopy.yaml"}
    server.shutdown()
    server.server_close()


def run(env: dict[str, str], *args: str | pathlib.Path, expect: int = 0,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == expect, f"{args}: exit {proc.returncode}\n{proc.stdout}\n" \
                                      f"{proc.stderr}"
    return proc


def clean_env(cluster: pathlib.Path, bin_dir: pathlib.Path) -> dict[str, str]:
    """PATH: the install's scripts and kubectl, nothing of this checkout's virtualenv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "KUBERNETES_SERVICE_HOST")}
    env["PATH"] = os.pathsep.join([str(bin_dir), str(KUBECTL.parent), "/usr/bin", "/bin"])
    env["KUBECONFIG"] = str(cluster)
    return env


def test_the_wheel_installs_alone_and_runs_as_a_kubectl_plugin(built, cluster, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    env = clean_env(cluster, env_dir / "bin")
    run(env, python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
        built["wheel"])

    installed = run(env, python, "-m", "pip", "list", "--format=freeze").stdout.lower()
    names = {line.split("==")[0] for line in installed.split()}
    assert {"kubectl-blockcopy", "kubernetes", "pyyaml"} <= names
    assert not names & {"kopf", "libvirt-python", "blockcopy-operator", "prometheus-client"}
    probe = ("import importlib.util as u, sys; "
             f"print([m for m in {AGENT_ONLY!r} if u.find_spec(m.split('.')[0]) and "
             "(u.find_spec(m) if '.' in m else True)])")
    assert run(env, python, "-c", probe).stdout.strip() == "[]"

    helped = run(env, env_dir / "bin" / "kubectl-blockcopy", "--help").stdout
    assert "kubectl blockcopy" in helped and "exit codes:" in helped
    # The real kubectl finds the plugin and its completion in the install's bin.
    shown = run(env, KUBECTL, "blockcopy", "version").stdout
    assert shown.startswith(f"Client Version: {blockcopy.__version__}\n")
    assert "Agent Versions:" in shown
    run(env, KUBECTL, "blockcopy", "list", "-A", "-o", "name")
    completed = run(env, KUBECTL, "__complete", "blockcopy", "ver").stdout
    assert completed.splitlines()[0].split("\t")[0] == "version"


@pytest.fixture(scope="module")
def krew() -> pathlib.Path:
    """kubectl-krew and validate-krew-manifest, built from sigs.k8s.io/krew (tests/krew)."""
    proc = subprocess.run([str(HACK / "build-krew.sh")], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr
    return pathlib.Path(proc.stdout.strip())


def test_krew_validates_the_manifest_installs_the_archive_and_the_plugin_runs(
        built, krew, cluster, tmp_path):
    # What the krew-index's CI runs on a manifest: its fields, its platforms, and a
    # `kubectl krew install` of the archive from its uri (sha256 checked, LICENSE required).
    env = {**os.environ, "PATH": os.pathsep.join([str(krew), str(KUBECTL.parent),
                                                  os.environ["PATH"]])}
    checked = run(env, krew / "validate-krew-manifest", "-manifest", built["manifest"])
    assert "all 1 spec.platforms installed fine" in checked.stderr, checked.stderr
    krew_root = tmp_path / "krew-root"
    env = clean_env(cluster, krew_root / "bin")
    env["PATH"] = os.pathsep.join([str(krew), env["PATH"]])  # kubectl-krew
    env.update(KREW_ROOT=str(krew_root), KUBECTL_BLOCKCOPY_HOME=str(tmp_path / "home"))
    run(env, KUBECTL, "krew", "install", f"--manifest={built['manifest']}")
    assert (krew_root / "bin" / "kubectl-blockcopy").is_symlink()

    # First run: the launcher installs the wheel into its own virtualenv, then runs it.
    first = run(env, KUBECTL, "blockcopy", "version", "--client")
    assert first.stdout.strip() == f"Client Version: {blockcopy.__version__}"
    assert "first run: installing" in first.stderr
    again = run(env, KUBECTL, "blockcopy", "list", "-A", "-o", "name")
    assert "first run" not in again.stderr
    installed = tmp_path / "home" / blockcopy.__version__
    assert (installed / ".installed").read_text().strip() == built["wheel"].name

    # Completion as the manifest's caveats say to set it up: the link, then kubectl's TAB.
    caveats = yaml.safe_load(built["manifest"].read_text())["spec"]["caveats"]
    lines = caveats.splitlines()
    at = next(i for i, line in enumerate(lines) if "ln -s" in line)
    run(env, "bash", "-c", "\n".join(lines[at:at + 2]))  # a command continued with \
    completed = run(env, KUBECTL, "__complete", "blockcopy", "li").stdout
    assert completed.splitlines() == ["list\tlist BlockCopies", ":4"]
