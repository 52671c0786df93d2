#!/usr/bin/env python3
"""kubectl-blockcopy as krew installs it: this launcher, the plugin's wheel next to it.

The plugin is Python and its Kubernetes client has compiled dependencies, so one archive
cannot carry them for every platform. On its first run the launcher makes a private
virtualenv (${XDG_CACHE_HOME:-~/.cache}/kubectl-blockcopy/VERSION, or
$KUBECTL_BLOCKCOPY_HOME/VERSION) and installs the wheel into it with pip (from PyPI, or
wherever pip is configured to look: PIP_INDEX_URL, PIP_FIND_LINKS); afterwards it runs the
plugin from there. Needs python3 >= 3.11 with the venv module."""

import os
import pathlib
import subprocess
import sys
import venv

WHEEL = "kubectl_blockcopy.whl"  # replaced by the wheel's file name when the archive is built


def home() -> pathlib.Path:
    base = os.environ.get("KUBECTL_BLOCKCOPY_HOME")
    if base:
        return pathlib.Path(base)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache) / "kubectl-blockcopy"


def main() -> int:
    if sys.version_info < (3, 11):
        print("error: kubectl-blockcopy needs python3 >= 3.11", file=sys.stderr)
        return 4
    here = pathlib.Path(os.path.realpath(__file__)).parent
    wheel = here / WHEEL
    env_dir = home() / WHEEL.split("-")[1]
    scripts = env_dir / ("Scripts" if os.name == "nt" else "bin")
    plugin = scripts / "kubectl-blockcopy"
    if not (env_dir / ".installed").exists():
        print(f"kubectl-blockcopy: first run: installing {WHEEL} into {env_dir}",
              file=sys.stderr)
        venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
        done = subprocess.run([str(scripts / "python"), "-m", "pip", "install", "-q",
                               "--disable-pip-version-check", str(wheel)],
                              stdout=sys.stderr)
        if done.returncode != 0:
            print("error: kubectl-blockcopy: pip could not install the plugin (see above)",
                  file=sys.stderr)
            return 4
        (env_dir / ".installed").write_text(WHEEL + "\n")
    os.execv(str(plugin), [str(plugin), *sys.argv[1:]])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
