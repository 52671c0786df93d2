"""FAULT INJECTION launcher for the end-to-end tests -- never use it outside tests.

A real libvirt does not refuse a pivot once the mirror is ready, so the "pivot refused" path
of the agent cannot be provoked from outside. This launcher runs the real agent
(``blockcopy.runtime.cli.main()``, same command line as ``python -m blockcopy``) with the libvirt
client wrapped, through the agent's hypervisor interface (``blockcopy.model.ports.Hypervisor``):
the first N pivots (env ``FAULT_PIVOT_REFUSALS``, default 2) raise
``HypervisorError('fault injection: pivot refused')`` without calling libvirt; every other
call goes to the real client. Every pivot is logged to stderr with a timestamp, prefixed
``FAULT INJECTION``, so a test can see when the agent tried (and re-tried) the pivot.

Two more faults, at the pivot that would reach libvirt (after the refusals):

- ``FAULT_KILL_BEFORE_PIVOT=1``: the agent dies there (``os._exit(9)``, as abruptly as a
  SIGKILL: nothing is cleaned up or written), after its ``Pivoting`` status write and before
  libvirt is asked to pivot. A restarted agent must finish the pivot.
- ``FAULT_PIVOT_DELAY=S``: the pivot waits S seconds (the agent otherwise running normally)
  before it reaches libvirt, so a test can act between the ``Pivoting`` write and the pivot
  (cut the agent off the API server, for example).

Usage: ``python tests/e2e/faulty_agent.py [blockcopy-operator options...]``
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from blockcopy.adapters.hypervisor import LibvirtHypervisor
from blockcopy.model.ports import HypervisorError
from blockcopy.runtime import cli


class RefusingPivots:
    """FAULT INJECTION: the real libvirt client, except that the first pivots are refused
    (and the one after them may kill the agent or be delayed)."""

    def __init__(self, inner: LibvirtHypervisor, refusals: int, *, kill: bool = False,
                 delay: float = 0):
        self._inner, self._refusals, self._calls = inner, refusals, 0
        self._kill, self._delay = kill, delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def pivot(self, domain: str, target: str) -> None:
        self._calls += 1
        call, stamp = self._calls, f"{time.time():.3f}"
        if call <= self._refusals:
            print(f"FAULT INJECTION: pivot call {call} of {domain}/{target} at {stamp}: "
                  f"refused ({call}/{self._refusals})", file=sys.stderr, flush=True)
            raise HypervisorError("fault injection: pivot refused")
        if self._kill:
            print(f"FAULT INJECTION: pivot call {call} of {domain}/{target} at {stamp}: "
                  "the agent dies before libvirt is called", file=sys.stderr, flush=True)
            os._exit(9)
        if self._delay:
            print(f"FAULT INJECTION: pivot call {call} of {domain}/{target} at {stamp}: "
                  f"delayed {self._delay:g}s", file=sys.stderr, flush=True)
            await asyncio.sleep(self._delay)
            stamp = f"{time.time():.3f}"
        print(f"FAULT INJECTION: pivot call {call} of {domain}/{target} at {stamp}: "
              "passed to libvirt", file=sys.stderr, flush=True)
        await self._inner.pivot(domain, target)


if __name__ == "__main__":
    refusals = int(os.environ.get("FAULT_PIVOT_REFUSALS", "2"))
    kill = os.environ.get("FAULT_KILL_BEFORE_PIVOT") == "1"
    delay = float(os.environ.get("FAULT_PIVOT_DELAY", "0"))
    sys.exit(cli.main(make_hypervisor=lambda uri: RefusingPivots(
        LibvirtHypervisor(uri), refusals, kill=kill, delay=delay)))
