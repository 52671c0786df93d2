"""`make bench`, part "verify": how long the check at the switch (spec.verify: Sample, 1,024
blocks) pauses the guest, on a qcow2 and on a raw destination (issue T, item 5: p95 <= 150
ms). One writing guest per format; each round copies its disk with the agent (pivot: true)
onto a new destination of that format, so the next round copies from there (qcow2 -> qcow2;
the raw series copies qcow2 -> raw once, then raw -> raw, the case without a flush). The
pause is what the agent logs: from the suspend to the resume's return, the pivot inside.
"""

from __future__ import annotations

import os
import re
from typing import Any

from support import vms as testvm

PAUSED = re.compile(r"(\S+): guest paused (\d+) ms for the check at the switch \((\w+): (\w+)")
TARGET_MS = 150.0


def pauses(log: str, domain: str) -> list[tuple[int, str, str]]:
    """(ms, method, result) of each check the agent logged for ``domain``."""
    return [(int(m[2]), m[3], m[4]) for m in PAUSED.finditer(log) if m[1] == domain]


def run(bench: Any, agent: Any) -> None:
    """``bench``: hack/benchmark.py's Bench; ``agent``: its Agent (the process's log)."""
    a = bench.args
    for fmt in ("qcow2", "raw"):
        vm = bench.vm(f"verify-{fmt}", size=a.size, data_per_layer=a.data, guest_writes=True)
        testvm.wait_guest_writing(vm)
        for i in range(a.rounds):
            name = f"verify-{fmt}-{i}"
            bench.create(name, {"domain": vm.name, "disk": "vda", "nodeName": agent.node,
                                "pivot": True, "format": fmt,
                                "dest": os.path.join(vm.workdir, f"verify-{i}.{fmt}")})
            bench.watch.wait(name, "Pivoted")
        seen = pauses(agent.process.log(), vm.name)
        ms = [float(p[0]) for p in seen]
        results = sorted({p[2] for p in seen})
        p95 = bench.pct(ms, 95)
        bench.record(f"verify_pause_{fmt}_p95", p95, f"<= {TARGET_MS:.0f} ms", "ms",
                     p95 <= TARGET_MS if results == ["Match"] else False,
                     p50=bench.pct(ms, 50), max=max(ms, default=float("nan")), n=len(ms),
                     results=results, samples=1024, disk=a.size)
        testvm.destroy_vm(vm)
