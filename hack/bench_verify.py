"""`make bench`, part "verify": how long the check at the switch (spec.verify: Sample, 1,024
blocks) pauses the guest, on a qcow2 and on a raw destination (issue T, item 5: p95 <= 150
ms). One writing guest per format; each round copies its disk with the agent (pivot: true)
onto a new destination of that format, so the next round copies from there (qcow2 -> qcow2;
the raw series copies qcow2 -> raw once, then raw -> raw, the case without a flush). The
pause is what the agent logs: from the suspend to the resume's return, the pivot inside.

A disk group (spec.group) is checked and switched in one pause: a third series copies the
two disks of one writing guest as a group, every round, and reads that pause (all members
checked, then every pivot) from the agent's log line of the group.
"""

from __future__ import annotations

import os
import re
from typing import Any

from support import vms as testvm

PAUSED = re.compile(r"(\S+): guest paused (\d+) ms for the check at the switch \((\w+): (\w+)")
GROUP_PAUSED = re.compile(r"(\S+): guest paused (\d+) ms for the check at the switch "
                          r"\(group \S+, (\d+) members: ([^;]+);")
TARGET_MS = 150.0
GROUP_DISKS = ("vda", "vdb")


def pauses(log: str, domain: str) -> list[tuple[int, str, str]]:
    """(ms, method, result) of each check the agent logged for ``domain``."""
    return [(int(m[2]), m[3], m[4]) for m in PAUSED.finditer(log) if m[1] == domain]


def group_pauses(log: str, domain: str) -> list[tuple[int, int, list[str]]]:
    """(ms, members, each member's result) of each group switch the agent logged."""
    return [(int(m[2]), int(m[3]), [r.split()[-1] for r in m[4].split(", ")])
            for m in GROUP_PAUSED.finditer(log) if m[1] == domain]


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
        record(bench, f"verify_pause_{fmt}_p95", [float(p[0]) for p in seen],
               sorted({p[2] for p in seen}))
        testvm.destroy_vm(vm)
    run_group(bench, agent)


def run_group(bench: Any, agent: Any) -> None:
    """Both disks of one writing guest, a group of two, qcow2 -> qcow2 every round."""
    a = bench.args
    vm = bench.vm("verify-group", size=a.size, data_per_layer=a.data, guest_writes=True,
                  disks=len(GROUP_DISKS))
    testvm.wait_guest_writing(vm)
    for i in range(a.rounds):
        for disk in GROUP_DISKS:
            bench.create(f"verify-group-{i}-{disk}", {
                "domain": vm.name, "disk": disk, "nodeName": agent.node, "pivot": True,
                "group": f"switch-{i}", "format": "qcow2",
                "dest": os.path.join(vm.workdir, f"group-{i}-{disk}.qcow2")})
        for disk in GROUP_DISKS:
            bench.watch.wait(f"verify-group-{i}-{disk}", "Pivoted")
    seen = group_pauses(agent.process.log(), vm.name)
    whole = all(p[1] == len(GROUP_DISKS) for p in seen) and len(seen) == a.rounds
    record(bench, "verify_pause_group_p95", [float(p[0]) for p in seen],
           sorted({r for p in seen for r in p[2]}), whole=whole, members=len(GROUP_DISKS))
    testvm.destroy_vm(vm)


def record(bench: Any, key: str, ms: list[float], results: list[str], *, whole: bool = True,
           **detail: Any) -> None:
    """The p95 of the pauses against the target: met only when every check matched (and
    ``whole``: every switch was seen as asked)."""
    p95 = bench.pct(ms, 95)
    bench.record(key, p95, f"<= {TARGET_MS:.0f} ms", "ms",
                 p95 <= TARGET_MS if results == ["Match"] and whole else False,
                 p50=bench.pct(ms, 50), max=max(ms, default=float("nan")), n=len(ms),
                 **detail, results=results, samples=1024, disk=bench.args.size)
