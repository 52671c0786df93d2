"""`make bench`, part "foreign": what other nodes' objects cost an agent (issue X, item 3: no
agent pays for other nodes' objects). One agent of its own, in a namespace of its own; N
unclaimed BlockCopies (2,000; --smoke: 100) whose spec.nodeName names other nodes are created
there (8 at a time); the agent's CPU seconds and RSS growth (from /proc) are taken while they
are created and over the following window (30 s, one --claim-interval: one re-list of its
unclaimed watches). Targets: < 0.1 s of CPU and < 1 MiB, the two periods together. Also
counted: the objects that got a status (the agent wrote to another node's object).
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from typing import Any

from blockcopy.model.api import GROUP, KIND, PLURAL, VERSION

CPU_TARGET_S = 0.1
RSS_TARGET_MIB = 1.0


def run(bench: Any, agent_class: Any) -> None:
    """``bench``: hack/benchmark.py's Bench; ``agent_class``: its Agent."""
    a, api, kubectl = bench.args, bench.api, bench.kubectl
    namespace = f"bench-foreign-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", namespace)
    agent = agent_class(namespace, "bench-foreign", log_name="bench-agent-foreign")
    bench.agents.append(agent)
    try:
        time.sleep(5)  # started: its first passes are done
        cpu0, rss0 = agent.cpu_seconds(), agent.rss_mib()
        t0 = time.monotonic()

        def create(i: int) -> None:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                "metadata": {"name": f"foreign-{i}"},
                "spec": {"domain": f"bench-foreign-vm-{i}", "disk": "vda",
                         "nodeName": f"bench-other-{i % 10}",
                         "dest": f"/var/lib/libvirt/images/bench-foreign/{i}.qcow2"}})

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(a.foreign)))
        creating_s = time.monotonic() - t0
        time.sleep(1)  # the last watch events have arrived
        cpu1, rss1 = agent.cpu_seconds(), agent.rss_mib()
        time.sleep(a.foreign_window)
        cpu2, rss2 = agent.cpu_seconds(), agent.rss_mib()
        items = api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        touched = sum(bool(o.get("status")) or bool(o["metadata"].get("labels"))
                      for o in items)
        cpu, rss = cpu2 - cpu0, rss2 - rss0
        detail = {"objects": a.foreign, "create_seconds": round(creating_s, 1),
                  "window_s": a.foreign_window, "objects_written_by_agent": touched}
        bench.record("foreign_cpu", cpu, f"< {CPU_TARGET_S:g} s", "s", cpu < CPU_TARGET_S,
                     while_created=round(cpu1 - cpu0, 3), following=round(cpu2 - cpu1, 3),
                     **detail)
        bench.record("foreign_rss_growth", rss, f"< {RSS_TARGET_MIB:g} MiB", "MiB",
                     rss < RSS_TARGET_MIB, while_created=round(rss1 - rss0, 2),
                     following=round(rss2 - rss1, 2), rss_before=round(rss0, 1), **detail)
        print(f"foreign objects: {a.foreign} created in {creating_s:.1f} s; agent CPU "
              f"{cpu1 - cpu0:.3f} s while created + {cpu2 - cpu1:.3f} s over the next "
              f"{a.foreign_window} s; RSS {rss1 - rss0:+.2f} MiB + {rss2 - rss1:+.2f} MiB; "
              f"{touched} object(s) written by the agent")
    finally:
        agent.stop()
        bench.agents.remove(agent)
        # Unclaimed objects carry no finalizer: deleted at once.
        api.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        kubectl("delete", "namespace", namespace, "--wait=false")
