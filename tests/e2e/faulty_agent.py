"""FAULT INJECTION launcher for the end-to-end tests -- never use it outside tests.

A real libvirt does not refuse a pivot once the mirror is ready, so the "pivot refused" path
of the agent cannot be provoked from outside. This launcher runs the real agent
(``blockcopy.cli.main()``, same command line as ``python -m blockcopy``) with the libvirt
client wrapped, through the agent's hypervisor interface (``blockcopy.ports.Hypervisor``):
the first N pivots (env ``FAULT_PIVOT_REFUSALS``, default 2) raise
``HypervisorError('fault injection: pivot refused')`` without calling libvirt; every other
call goes to the real client. Every pivot is logged to stderr with a timestamp, prefixed
``FAULT INJECTION``, so a test can see when the agent tried (and re-tried) the pivot.

Usage: ``python tests/e2e/faulty_agent.py [blockcopy-operator options...]``
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from blockcopy import cli
from blockcopy.hypervisor import LibvirtHypervisor
from blockcopy.ports import HypervisorError


class RefusingPivots:
    """FAULT INJECTION: the real libvirt client, except that the first pivots are refused."""

    def __init__(self, inner: LibvirtHypervisor, refusals: int):
        self._inner, self._refusals, self._calls = inner, refusals, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def pivot(self, domain: str, target: str) -> None:
        self._calls += 1
        call, stamp = self._calls, f"{time.time():.3f}"
        if call <= self._refusals:
            print(f"FAULT INJECTION: pivot call {call} of {domain}/{target} at {stamp}: "
                  f"refused ({call}/{self._refusals})", file=sys.stderr, flush=True)
            raise HypervisorError("fault injection: pivot refused")
        print(f"FAULT INJECTION: pivot call {call} of {domain}/{target} at {stamp}: "
              "passed to libvirt", file=sys.stderr, flush=True)
        await self._inner.pivot(domain, target)


if __name__ == "__main__":
    refusals = int(os.environ.get("FAULT_PIVOT_REFUSALS", "2"))
    sys.exit(cli.main(make_hypervisor=lambda uri: RefusingPivots(LibvirtHypervisor(uri),
                                                                 refusals)))
