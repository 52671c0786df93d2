"""FAULT INJECTION launcher for the end-to-end tests -- never use it outside tests.

A real libvirt does not refuse a pivot once the mirror is ready, so the "pivot refused" path
of the agent cannot be provoked from outside. This launcher runs the real agent
(``blockcopy.cli.main()``, same command line as ``python -m blockcopy``) with exactly one
thing replaced: ``blockcopy.hypervisor.Hypervisor.pivot`` is wrapped so that its first N calls
(env ``FAULT_PIVOT_REFUSALS``, default 2) raise
``HypervisorError('fault injection: pivot refused')`` without calling libvirt; later calls go
to the real method. Every call is logged to stderr with a timestamp, prefixed
``FAULT INJECTION``, so a test can see when the agent tried (and re-tried) the pivot.

Usage: ``python tests/e2e/faulty_agent.py [blockcopy-operator options...]``
"""

from __future__ import annotations

import os
import sys
import threading
import time

from blockcopy import cli, hypervisor

REFUSALS = int(os.environ.get("FAULT_PIVOT_REFUSALS", "2"))

_real_pivot = hypervisor.Hypervisor.pivot
_calls = 0
_calls_lock = threading.Lock()


def _fault_injected_pivot(self: hypervisor.Hypervisor, domain_ref: str, target: str) -> None:
    """FAULT INJECTION: refuse the first REFUSALS pivots, then pivot for real."""
    global _calls
    with _calls_lock:
        _calls += 1
        call = _calls
    stamp = f"{time.time():.3f}"
    if call <= REFUSALS:
        print(f"FAULT INJECTION: pivot call {call} of {domain_ref}/{target} at {stamp}: "
              f"refused ({call}/{REFUSALS})", file=sys.stderr, flush=True)
        raise hypervisor.HypervisorError("fault injection: pivot refused")
    print(f"FAULT INJECTION: pivot call {call} of {domain_ref}/{target} at {stamp}: "
          "passed to libvirt", file=sys.stderr, flush=True)
    _real_pivot(self, domain_ref, target)


hypervisor.Hypervisor.pivot = _fault_injected_pivot  # FAULT INJECTION

if __name__ == "__main__":
    sys.exit(cli.main())
