"""Prints a fingerprint of the blockcopy code this Python imports: a hash of every module of
the package, by path. hack/cluster-nodes.sh records it beside each long-lived agent and
controller it starts, and restarts one that runs other code (the checkout edited since, or
another checkout's tests pointed at this cluster) instead of reusing it;
tests/support/multinode.py asks the script when it differs. Nothing is imported: the
package is found, not run."""

from __future__ import annotations

import hashlib
import importlib.util
import pathlib
import sys


def fingerprint() -> str:
    spec = importlib.util.find_spec("blockcopy")
    if spec is None or spec.origin is None:
        sys.exit("blockcopy is not importable by this Python (make venv, or PYTHONPATH)")
    root = pathlib.Path(spec.origin).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


if __name__ == "__main__":
    print(fingerprint())
