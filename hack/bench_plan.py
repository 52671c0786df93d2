"""`make bench`, part "plan" (issue X, item 6): a BlockCopyPlan of 40 disks (4 nodes x 2 VMs x
5 disks of 64 MiB, all of it data) over the simulated hypervisor nodes of `make
cluster-nodes` (brought up here when missing), against the same copies made with `virsh
blockcopy --wait --pivot` on each node's session URI:

- virsh, all nodes in parallel: at most maxActive copies at once and maxActivePerNode per
  node (the plan's limits as concurrency), each with the plan's per-copy bandwidth;
- the plan (pivot: Automatic), create -> status.phase Completed;
- virsh, one node at a time (the same limits within the node).

Each run copies every disk from where the previous run left it (the same data, one qcow2
image, the same size) into a directory of its own, after a `sync`. Also measured during the
plan: the operator's requests to blockcopy.dev resources per disk (the API server's audit
log: the agents' and the controller's client certificates; Events counted apart), and the
controller's and each agent's RSS and CPU (from /proc of the pids hack/cluster-nodes.sh
records). --smoke: 4 nodes x 1 VM x 2 disks of 16 MiB; --short: disks of 32 MiB.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
import os
import pathlib
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

ALLOWED_ROOT = pathlib.Path("/var/lib/libvirt/images")  # the node agents' allowed root
GROUP = "blockcopy.dev"
AGENT_USER = "blockcopy:sim-node-agents:"  # hack/lib/nodes.sh: the agents' certificates' CN
CONTROLLER_USER = "blockcopy:sim-plan-controller:controller"
TARGET_RATIO = 1.10  # the plan within 10 % of the parallel virsh run


@dataclasses.dataclass(frozen=True)
class Copy:
    """One disk to copy: where it runs and its active image now."""

    node: str
    uri: str
    domain: str
    target: str
    source: str


def dest_for(source: str, src_prefix: str, dst_prefix: str) -> str:
    """The plan's destination rule: the source's path below src_prefix, under dst_prefix."""
    assert source.startswith(src_prefix.rstrip("/") + "/"), (source, src_prefix)
    return dst_prefix.rstrip("/") + source[len(src_prefix.rstrip("/")):]


def run_limited(jobs: Sequence[Copy], *, max_active: int, max_per_node: int,
                run: Callable[[Copy], object]) -> float:
    """``run(job)`` for every job in threads, never more than ``max_active`` at once nor
    ``max_per_node`` on one node (in the jobs' order, as the plan's controller starts them);
    returns the wall seconds. The first error is raised once all started jobs ended."""
    lock = threading.Condition()
    pending = list(jobs)
    running: collections.Counter[str] = collections.Counter()
    errors: list[BaseException] = []
    threads: list[threading.Thread] = []

    def one(job: Copy) -> None:
        try:
            run(job)
        except BaseException as exc:  # raised in the caller's thread below
            errors.append(exc)
        finally:
            with lock:
                running[job.node] -= 1
                lock.notify_all()

    started = time.monotonic()
    with lock:
        while pending and not errors:
            for job in list(pending):
                if sum(running.values()) >= max_active:
                    break
                if running[job.node] >= max_per_node:
                    continue
                pending.remove(job)
                running[job.node] += 1
                thread = threading.Thread(target=one, args=(job,), daemon=True)
                threads.append(thread)
                thread.start()
            if pending:
                lock.wait()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.monotonic() - started


def count_requests(lines: Iterable[str], since: dt.datetime, until: dt.datetime
                   ) -> dict[str, Any]:
    """The operator's requests in the audit log's ``lines`` received in [since, until]: those
    of the nodes' agents and of the plan controller (by their certificates' names), each
    request once (a watch has two records), to blockcopy.dev resources; their Events apart."""
    seen: set[str] = set()
    by_who: collections.Counter[str] = collections.Counter()
    by_request: collections.Counter[str] = collections.Counter()
    events: collections.Counter[str] = collections.Counter()
    for line in lines:
        if AGENT_USER not in line and CONTROLLER_USER not in line:
            continue
        record = json.loads(line)
        user = (record.get("user") or {}).get("username", "")
        who = ("controller" if user == CONTROLLER_USER
               else user.removeprefix(AGENT_USER) if user.startswith(AGENT_USER) else None)
        if who is None or record.get("auditID") in seen:
            continue
        at = dt.datetime.fromisoformat(record["requestReceivedTimestamp"].replace("Z", "+00:00"))
        if not since <= at <= until:
            continue
        seen.add(record.get("auditID", ""))
        ref = record.get("objectRef") or {}
        if ref.get("apiGroup") == GROUP:
            sub = f"/{ref['subresource']}" if ref.get("subresource") else ""
            by_who[who] += 1
            by_request[f"{record['verb']} {ref.get('resource')}{sub}"] += 1
        elif ref.get("resource") == "events":
            events[who] += 1
    return {"total": sum(by_who.values()), "by_who": dict(by_who),
            "by_request": dict(by_request), "events": sum(events.values())}


class ProcWatch:
    """RSS (sampled every ``period`` s, the most seen) and CPU (utime + stime over the whole
    window) of some processes, by name, from /proc."""

    def __init__(self, pids: Mapping[str, int], period: float = 0.5):
        self.pids, self.period = dict(pids), period
        self.rss_max = {name: 0.0 for name in self.pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="proc-watch")
        self._cpu0: dict[str, float] = {}
        self._t0 = 0.0
        self.result: dict[str, dict[str, float]] = {}

    @staticmethod
    def rss_mib(pid: int) -> float:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    @staticmethod
    def cpu_seconds(pid: int) -> float:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            self.rss_max[name] = max(self.rss_max[name], self.rss_mib(pid))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> ProcWatch:
        self._cpu0 = {name: self.cpu_seconds(pid) for name, pid in self.pids.items()}
        self._t0 = time.monotonic()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
        took = time.monotonic() - self._t0
        for name, pid in self.pids.items():
            cpu = self.cpu_seconds(pid) - self._cpu0[name]
            self.result[name] = {"rss_max_mib": round(self.rss_max[name], 1),
                                 "cpu_s": round(cpu, 2),
                                 "cpu_pct": round(cpu / took * 100, 1) if took else 0.0}


# ------------------------------------------------------------------ on the real nodes


def sizes(args: Any) -> dict[str, Any]:
    """VMs per node, disks per VM, disk size, data, the plan's limits and bandwidth. Every
    disk is data from its first byte to its last: a hole (a region never written) costs
    `virsh blockcopy` its share of the bandwidth limit (libvirt opens the destination without
    discard=unmap, so QEMU writes the hole's zeros and counts them), while the agent's zero
    detection makes it free; with holes the comparison would be of zero detection, which
    part "zeros" measures, not of the plan."""
    if args.smoke:
        return {"vms": 1, "disks": 2, "size": "16M", "data": "16M", "max_active": 4,
                "per_node": 1, "bandwidth": "16Mi"}
    disk = "32M" if args.short else "64M"
    return {"vms": 2, "disks": 5, "size": disk, "data": disk, "max_active": 6, "per_node": 2,
            "bandwidth": "16Mi"}


def owned_dirs(copies: Iterable[Copy], dests: Mapping[Copy, str], uids: Mapping[str, int]
               ) -> None:
    """The destinations' directories (their VM's and its node's), owned by the node's user
    (its session QEMU creates the files there), like the nodes' imagesDir."""
    import pwd
    for copy in copies:
        uid = uids[copy.node]
        gid = pwd.getpwuid(uid).pw_gid
        vm_dir = pathlib.Path(dests[copy]).parent
        for path, mode in ((vm_dir.parent, 0o750), (vm_dir, 0o755)):
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, uid, gid)
            path.chmod(mode)


def virsh_copy(copy: Copy, dest: str, bandwidth: int) -> None:
    proc = subprocess.run(
        ["virsh", "-c", copy.uri, "blockcopy", copy.domain, copy.target, dest, "--format",
         "qcow2", "--transient-job", "--wait", "--pivot",
         *(["--bandwidth", str(bandwidth), "--bytes"] if bandwidth else [])],
        capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"virsh blockcopy {copy.domain} {copy.target} on {copy.node}: "
                         f"{proc.stderr.strip()}")


def run(bench: Any) -> None:
    """``bench``: hack/benchmark.py's Bench (its args, record(), the API client)."""
    from blockcopy.model.api import VERSION, parse_bandwidth
    from blockcopy.model.inventory import INVENTORY_PLURAL
    from blockcopy.model.plan import PLAN_PLURAL
    from support import audit, multinode
    from support.plans import Plans, inventory_status
    from support.vms import destroy_vm

    size = sizes(bench.args)
    nodes = multinode.bring_up(4)[:4]
    namespace = nodes[0].namespaces[0] if nodes[0].namespaces else "default"
    api = bench.api
    controller = multinode.controller_pid()
    pids = {"controller": controller, **{n.name: n.agent_pid() for n in nodes}}
    missing = [name for name, pid in pids.items() if pid is None]
    if missing:
        raise SystemExit(f"not running after make cluster-nodes: {', '.join(missing)}")
    tag = uuid.uuid4().hex[:5]
    base = f"bct-bpl{tag}"
    root = ALLOWED_ROOT / f"{base}-runs"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    bandwidth = parse_bandwidth(size["bandwidth"])
    plans = Plans(api, namespace)
    vms: list[Any] = []
    started = time.monotonic()
    try:
        def make(node: Any) -> list[Any]:
            return [node.create_vm(f"{base}-{node.name.rsplit('-', 1)[1]}{v}", layers=1,
                                   disks=size["disks"], size=size["size"],
                                   data_per_layer=size["data"]) for v in range(size["vms"])]
        with ThreadPoolExecutor(len(nodes)) as pool:
            for made in pool.map(make, nodes):
                vms.extend(made)
                bench.made.extend(vm.name for vm in made)
        by_node = {n.name: n for n in nodes}
        uri_node = {n.libvirt_uri: n.name for n in nodes}
        copies = [Copy(uri_node[vm.uri], vm.uri, vm.name, target, chain[0])
                  for vm in vms for target, chain in vm.disk_chains.items()]
        uids = {n.name: n.uid for n in nodes}
        src_prefix = str(nodes[0].images_dir.parent)
        limits = {"max_active": size["max_active"], "max_per_node": size["per_node"]}

        def virsh_run(label: str, order: Sequence[Sequence[Copy]], prefix: str
                      ) -> tuple[float, dict[Copy, str]]:
            dests = {c: dest_for(c.source, prefix, str(root / label)) for c in copies}
            owned_dirs(copies, dests, uids)
            subprocess.run(["sync"], check=True)
            took = sum(run_limited(part, **limits, run=lambda c: virsh_copy(
                c, dests[c], bandwidth)) for part in order)
            return took, dests

        # 1. virsh, every node at once.
        with ProcWatch(pids) as virsh_watch:
            parallel_s, dests = virsh_run("virsh-parallel", [copies], src_prefix)
        copies = [dataclasses.replace(c, source=dests[c]) for c in copies]

        # 2. the plan, once every node's inventory shows the disks where they are now.
        plan_src = str(root / "virsh-parallel")
        plan_dst = root / "plan"
        plan_dst.mkdir(mode=0o755)
        plan_dst.chmod(0o755)
        inventory_by_bench = wait_inventories(api, nodes, copies, INVENTORY_PLURAL, VERSION,
                                              by_node, inventory_status)
        subprocess.run(["sync"], check=True)
        offset = audit.size()
        name = f"bench-plan-{tag}"
        with ProcWatch(pids) as watch:
            since = dt.datetime.now(dt.UTC)
            t0 = time.monotonic()
            plans.create(name, {
                "source": {"pathPrefix": plan_src, "domains": [f"{base}-*"]},
                "destination": {"pathPrefix": str(plan_dst), "format": "qcow2",
                                "bandwidth": size["bandwidth"]},
                "maxActive": size["max_active"], "maxActivePerNode": size["per_node"],
                "pivot": "Automatic"})
            status = wait_plan(api, namespace, name, PLAN_PLURAL, VERSION, timeout=900)
            plan_s = time.monotonic() - t0
        if status.get("phase") != "Completed":
            raise SystemExit(f"plan {name} ended {status.get('phase')}: "
                             f"{status.get('message')}")
        if (status.get("total"), status.get("pivoted")) != (len(copies), len(copies)):
            raise SystemExit(f"plan {name}: {status.get('pivoted')} of {status.get('total')} "
                             f"pivoted, {len(copies)} disks expected")
        time.sleep(3)  # the last status writes of the children and of the plan
        until = dt.datetime.now(dt.UTC)
        requests = count_requests(audit.lines(audit.AUDIT_LOG, offset), since, until)
        children = plans.children(name)
        assert len(children) == len(copies), len(children)
        copies = [dataclasses.replace(c, source=dest_for(c.source, plan_src, str(plan_dst)))
                  for c in copies]
        plans.delete(name, wait=180)

        # 3. virsh, one node at a time.
        serial_s, _ = virsh_run("virsh-serial", [[c for c in copies if c.node == n.name]
                                                 for n in nodes], str(plan_dst))
    finally:
        for name in list(plans.made):
            try:
                plans.delete(name, wait=180)
            except Exception as exc:  # the VMs and files go anyway
                print(f"(plan {name} not deleted: {exc})")
        for vm in vms:
            destroy_vm(vm)
        shutil.rmtree(root, ignore_errors=True)
    took = time.monotonic() - started
    n = len(copies)
    detail = {"disks": n, "nodes": len(nodes), "vms_per_node": size["vms"],
              "disks_per_vm": size["disks"], "disk": size["size"],
              "data_per_disk": size["data"], "maxActive": size["max_active"],
              "maxActivePerNode": size["per_node"], "bandwidth_per_copy": size["bandwidth"],
              "order": "virsh parallel, plan, virsh one node at a time",
              "part_s": round(took, 1), "files": str(root)}
    ratio = plan_s / parallel_s
    bench.record("plan_wall", plan_s, "reported", "s", None, **detail)
    bench.record("plan_virsh_parallel", parallel_s, "reported", "s", None)
    bench.record("plan_virsh_serial", serial_s, "reported", "s", None)
    bench.record("plan_vs_virsh_parallel", ratio, f"<= {TARGET_RATIO:.2f}x virsh (parallel)",
                 "x", ratio <= TARGET_RATIO, plan_s=round(plan_s, 2),
                 virsh_parallel_s=round(parallel_s, 2), virsh_serial_s=round(serial_s, 2))
    bench.record("plan_api_requests_per_disk", requests["total"] / n, "reported", "requests",
                 None, total=requests["total"], by_who=requests["by_who"],
                 by_request=requests["by_request"],
                 events_per_disk=round(requests["events"] / n, 2),
                 inventory_published_by_bench=inventory_by_bench)
    agents = {k: v for k, v in watch.result.items() if k != "controller"}
    bench.record("plan_controller_rss_max", watch.result["controller"]["rss_max_mib"],
                 "reported", "MiB", None)
    bench.record("plan_controller_cpu", watch.result["controller"]["cpu_pct"],
                 "reported", "% of one core", None, cpu_s=watch.result["controller"]["cpu_s"])
    bench.record("plan_agent_rss_max", max(v["rss_max_mib"] for v in agents.values()),
                 "reported", "MiB", None, per_agent={k: v["rss_max_mib"]
                                                     for k, v in agents.items()})
    bench.record("plan_agent_cpu_max", max(v["cpu_pct"] for v in agents.values()),
                 "reported", "% of one core", None,
                 per_agent={k: v["cpu_pct"] for k, v in agents.items()},
                 during_virsh_parallel={k: v["cpu_pct"] for k, v in virsh_watch.result.items()})


def wait_plan(api: Any, namespace: str, name: str, plural: str, version: str, *,
              timeout: float) -> dict[str, Any]:
    """The plan's status once its phase is Completed or Failed (a watch on it alone)."""
    import kubernetes
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stream = kubernetes.watch.Watch().stream(
            api.list_namespaced_custom_object, GROUP, version, namespace, plural,
            field_selector=f"metadata.name={name}",
            timeout_seconds=max(1, int(deadline - time.monotonic())))
        for event in stream:
            status = (event["object"].get("status") or {})
            if status.get("phase") in ("Completed", "Failed"):
                return dict(status)
    raise SystemExit(f"plan {name}: not Completed after {timeout:.0f} s")


def wait_inventories(api: Any, nodes: Sequence[Any], copies: Sequence[Copy], plural: str,
                     version: str, by_node: Mapping[str, Any],
                     inventory_status: Callable[[Any], dict[str, Any]],
                     timeout: float = 60) -> list[str]:
    """Until each node's DiskInventory shows every disk's current source (its agent
    publishes it after a pivot); after ``timeout`` the bench publishes it from the node's
    libvirt in the same shape. Returns the nodes whose inventory the bench wrote."""
    from kubernetes.client.exceptions import ApiException
    wanted: dict[str, set[str]] = collections.defaultdict(set)
    for c in copies:
        wanted[c.node].add(c.source)

    def shown(node: str) -> bool:
        try:
            obj = api.get_cluster_custom_object(GROUP, version, plural, node)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        sources = {d.get("source") for dom in (obj.get("status") or {}).get("domains") or []
                   for d in dom.get("disks") or []}
        return wanted[node] <= sources

    deadline = time.monotonic() + timeout
    pending = [n.name for n in nodes if not shown(n.name)]
    while pending and time.monotonic() < deadline:
        time.sleep(1)
        pending = [n for n in pending if not shown(n)]
    for node in pending:
        api.patch_cluster_custom_object_status(GROUP, version, plural, node,
                                               {"status": inventory_status(by_node[node])})
    return pending
