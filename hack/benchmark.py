#!/usr/bin/env python3
"""`make bench`: the agent measured against `virsh blockcopy` on the real local environment
(kube-apiserver + etcd + libvirtd + QEMU), every figure printed next to its target and
written to a JSON file. Not a test: nothing here passes or fails, but it must run through.

Stages are timed in this process: libvirt's READY events arrive through a libvirt event
loop of its own, the phases through a watch on the BlockCopies; the agent runs as a real
process with a ServiceAccount of its own, so the API server's audit log tells its requests
apart (the local cluster logs BlockCopy and Event requests).

  --short     a quick version (fewer rounds, 10 parallel copies, 20 s windows, 1 GiB disks)
  --smoke     every step once on small disks, in about two minutes: proves the bench runs
              (tests/e2e/test_benchmark_runs.py); its numbers mean little
  --only P    one part (repeatable): latencies, copy, zeros, scale, isolation, verify, foreign,
              plan (hack/bench_plan.py: a BlockCopyPlan of 40 disks on the 4 simulated nodes of
              `make cluster-nodes`, brought up when missing, against `virsh blockcopy`), idle
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable

import kubernetes
import libvirt

import bench_foreign
import bench_plan
import bench_verify
from blockcopy.model.api import GROUP, KIND, NODE_LABEL, PLURAL, VERSION
from support import vms as testvm
from support.agents import Agent as AgentProcess
from support.agents import free_port, http_get
from support.audit import AUDIT_LOG
from support.cluster import Kubectl, apply_crd, bring_up, custom_objects, token_kubeconfig
from support.paths import STATE

ADMIN = Kubectl()  # the admin kubeconfig
kubectl = ADMIN.output


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


# ------------------------------------------------------------------ observers


class LibvirtEvents:
    """BLOCK_JOB_2 events of every domain, timestamped on arrival in this process."""

    def __init__(self) -> None:
        libvirt.virEventRegisterDefaultImpl()
        self.conn = libvirt.open("qemu:///system")
        self.ready: dict[str, float] = {}  # domain name -> first READY
        self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
                                         self._on_event, None)
        threading.Thread(target=self._run, daemon=True, name="libvirt-events").start()

    def _run(self) -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    def _on_event(self, conn, dom, disk, job_type, status, opaque) -> None:  # noqa: ARG002
        if status == libvirt.VIR_DOMAIN_BLOCK_JOB_READY:
            self.ready.setdefault(dom.name(), time.monotonic())


class PhaseWatch:
    """First time each (object, phase) and each claim label was seen, from a watch."""

    def __init__(self, api: kubernetes.client.CustomObjectsApi, namespace: str):
        self.api, self.namespace = api, namespace
        self.seen: dict[tuple[str, str], float] = {}
        self.lock = threading.Condition()
        threading.Thread(target=self._run, daemon=True, name="phase-watch").start()

    def _run(self) -> None:
        while True:
            try:
                stream = kubernetes.watch.Watch().stream(
                    self.api.list_namespaced_custom_object, GROUP, VERSION, self.namespace,
                    PLURAL, timeout_seconds=300)
                for event in stream:
                    obj, now = event["object"], time.monotonic()
                    name = obj["metadata"]["name"]
                    keys = [(name, (obj.get("status") or {}).get("phase") or "")]
                    if (obj["metadata"].get("labels") or {}).get(NODE_LABEL):
                        keys.append((name, "claimed"))
                    with self.lock:
                        for key in keys:
                            self.seen.setdefault(key, now)
                        self.lock.notify_all()
            except Exception as exc:  # a watch that timed out or broke: watch again
                print(f"(phase watch restarted: {exc})", file=sys.stderr)

    def wait(self, name: str, phase: str, timeout: float = 900) -> float:
        deadline = time.monotonic() + timeout
        with self.lock:
            while (name, phase) not in self.seen:
                failed = self.seen.get((name, "Failed"))
                if failed is not None:
                    raise SystemExit(f"{name} failed; see the agent log")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"{name}: no {phase} after {timeout} s")
                self.lock.wait(min(left, 1))
            return self.seen[(name, phase)]


class Agent:
    """The agent as a process (support.agents), as a ServiceAccount (so its requests are its
    own in the audit log), with metrics; CPU, memory and wake-ups read from /proc."""

    def __init__(self, namespace: str, node: str, *, log_name: str, extra: list[str] = ()):
        self.node = node
        sa = f"bench-{node}"
        kubectl("create", "serviceaccount", sa, "-n", namespace)
        kubectl("create", "clusterrolebinding", f"{sa}-{namespace}", "--clusterrole",
                "cluster-admin", f"--serviceaccount={namespace}:{sa}")
        self.user = f"system:serviceaccount:{namespace}:{sa}"
        kubeconfig = token_kubeconfig(ADMIN, sa, namespace, STATE / f"bench-{node}.kubeconfig",
                                      duration="2h")
        self.metrics_port = free_port()
        log_path = STATE / "log" / f"{log_name}.log"
        log_path.unlink(missing_ok=True)  # this run's log only
        self.process = AgentProcess(
            node, log_path, kubeconfig=kubeconfig,
            args=["--node-name", node, "--namespace", namespace,
                  "--metrics-port", str(self.metrics_port), *extra])
        try:
            self.process.start()
        except AssertionError:
            raise SystemExit(f"agent {node} did not start:\n{self.process.log()}") from None
        self.pid = self.process.proc.pid

    def rss_mib(self) -> float:
        for line in pathlib.Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        fields = pathlib.Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wakeups(self) -> int:
        """Voluntary context switches of all threads: each is a thread that slept (on a timer,
        a socket, a lock) and woke up. Preemptions by other processes are not counted."""
        total = 0
        for task in pathlib.Path(f"/proc/{self.pid}/task").iterdir():
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    total += int(line.split()[1])
        return total

    def metric(self, name: str, **labels: str) -> float:
        text = http_get(self.metrics_port, "/metrics")[1]
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.process.stop()
        # The node inventory it published (cluster-scoped, named after its node).
        kubectl("delete", "diskinventory", self.node, "--ignore-not-found")


def _verb(record: dict) -> str:
    ref = record["objectRef"]
    sub = f"/{ref['subresource']}" if ref.get("subresource") else ""
    return f"{record['verb']} {ref.get('resource')}{sub}"


def audit_requests(user: str, since: dt.datetime) -> list[dict]:
    """The audit log's records of ``user`` since ``since`` (the log rotates at 200 MB)."""
    records = []
    for path in sorted(AUDIT_LOG.parent.glob("audit*.log")):
        with open(path) as f:
            for line in f:
                if user not in line:
                    continue
                record = json.loads(line)
                if record.get("user", {}).get("username") != user:
                    continue
                at = dt.datetime.fromisoformat(record["requestReceivedTimestamp"].replace(
                    "Z", "+00:00"))
                if at >= since:
                    records.append(record)
    return records


# ------------------------------------------------------------------ the benchmark


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        bring_up()
        apply_crd(ADMIN)
        self.namespace = f"bench-{uuid.uuid4().hex[:6]}"
        kubectl("create", "namespace", self.namespace)
        self.api = custom_objects()
        self.events = LibvirtEvents()
        self.watch = PhaseWatch(self.api, self.namespace)
        self.vms: list[testvm.VM] = []
        self.made: list[str] = []  # every domain this run made (the test checks they are gone)
        self.agents: list[Agent] = []
        self.results: dict[str, dict] = {}
        self.parts_s: dict[str, float] = {}  # each part's wall time

    def record(self, key: str, measured: float, target: str, unit: str, ok: bool | None,
               **detail) -> None:
        self.results[key] = {"measured": round(measured, 4), "unit": unit, "target": target,
                             "met": ok, **detail}

    pct = staticmethod(pct)
    kubectl = staticmethod(kubectl)

    def vm(self, purpose: str, **kw) -> testvm.VM:
        vm = testvm.create_vm(f"bench-{purpose}", **kw)
        self.vms.append(vm)
        self.made.append(vm.name)
        return vm

    def create(self, name: str, spec: dict) -> float:
        t = time.monotonic()
        self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": name}, "spec": spec})
        return t

    def patch(self, name: str, spec: dict) -> float:
        t = time.monotonic()
        self.api.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                {"spec": spec})
        return t

    @staticmethod
    def virsh_copy(vm: testvm.VM, dest: str) -> float:
        t = time.monotonic()
        subprocess.run(["virsh", "-c", vm.uri, "blockcopy", vm.name, "vda", dest, "--format",
                        "qcow2", "--transient-job", "--wait", "--pivot"], check=True,
                       capture_output=True)
        return time.monotonic() - t

    # -- 2, 3, 4: latency of each stage -----------------------------------------------
    def latencies(self, agent: Agent) -> None:
        a = self.args
        stages = collections.defaultdict(list)
        for i in range(a.rounds):
            vm = self.vm(f"lat{i}", size=a.size, data_per_layer=a.data)
            name = f"lat-{i}"
            t0 = self.create(name, {"domain": vm.name, "disk": "vda", "nodeName": agent.node,
                                    "dest": os.path.join(vm.workdir, "agent.qcow2")})
            claimed = self.watch.wait(name, "claimed")
            copying = self.watch.wait(name, "Copying")
            mirrored = self.watch.wait(name, "Mirrored")
            ready = self.events.ready[vm.name]
            t_pivot = self.patch(name, {"pivot": True})
            pivoting = self.watch.wait(name, "Pivoting")
            pivoted = self.watch.wait(name, "Pivoted")
            stages["create -> claimed"].append(claimed - t0)
            stages["claimed -> Copying"].append(copying - claimed)
            stages["create -> Copying"].append(copying - t0)
            stages["READY -> Mirrored"].append(mirrored - ready)
            stages["pivot patch -> Pivoting"].append(pivoting - t_pivot)
            stages["Pivoting -> Pivoted"].append(pivoted - pivoting)
            stages["pivot patch -> Pivoted"].append(pivoted - t_pivot)
        self.results["stages_ms"] = {
            stage: {"p50": round(pct(v, 50) * 1000, 1), "p95": round(pct(v, 95) * 1000, 1),
                    "max": round(max(v) * 1000, 1), "n": len(v)}
            for stage, v in stages.items()}
        for key, stage, target in (("ready_to_mirrored_p95", "READY -> Mirrored", 0.1),
                                   ("pivot_to_pivoted_p95", "pivot patch -> Pivoted", 0.3),
                                   ("create_to_copying_p95", "create -> Copying", 0.5)):
            value = pct(stages[stage], 95)
            self.record(key, value * 1000, f"<= {target * 1000:.0f} ms", "ms", value <= target)

    # -- 5: the whole copy, agent vs virsh --------------------------------------------
    def versus_virsh(self, agent: Agent, *, label: str, size: str, data: str,
                     target_ratio: float | None, target_extra: float | None) -> None:
        agent_times, virsh_times = [], []
        for i in range(self.args.rounds if target_extra is not None else 1):
            ref = self.vm(f"{label}-virsh{i}", size=size, data_per_layer=data)
            virsh_times.append(self.virsh_copy(ref, os.path.join(ref.workdir, "virsh.qcow2")))
            vm = self.vm(f"{label}-agent{i}", size=size, data_per_layer=data)
            name = f"{label.replace('_', '-')}-{i}"
            t0 = self.create(name, {"domain": vm.name, "disk": "vda", "nodeName": agent.node,
                                    "pivot": True,
                                    "dest": os.path.join(vm.workdir, "agent.qcow2")})
            agent_times.append(self.watch.wait(name, "Pivoted") - t0)
            testvm.destroy_vm(ref)
            testvm.destroy_vm(vm)
        mean_agent, mean_virsh = statistics.mean(agent_times), statistics.mean(virsh_times)
        detail = {"agent_s": [round(t, 3) for t in agent_times],
                  "virsh_s": [round(t, 3) for t in virsh_times], "disk": size,
                  "data": f"2 layers x {data}"}
        if target_ratio is not None:
            ratio = mean_agent / mean_virsh
            self.record(f"{label}_ratio", ratio, f"<= {target_ratio:.2f}x virsh", "x",
                        ratio <= target_ratio, **detail)
        if target_extra is not None:
            extra = mean_agent - mean_virsh
            self.record(f"{label}_overhead", extra, f"<= virsh + {target_extra:g} s", "s",
                        extra <= target_extra, **detail)

    # -- [T] 4: zeros the guest wrote, ours vs virsh ----------------------------------
    def zeros(self, agent: Agent) -> None:
        """A disk of 8 MiB data followed by 256 MiB of zero bytes the guest wrote (allocated
        in the source: they are data to QEMU): the destination's allocation and the time,
        copied by the agent (zero detection on) and by `virsh blockcopy`, to qcow2 and raw."""
        a = self.args
        data, zeros = (8 << 20, 256 << 20) if not a.smoke else (8 << 20, 32 << 20)
        for fmt in ("qcow2", "raw"):
            measured = {}
            for who in ("virsh", "agent"):
                vm = self.vm(f"zero-{fmt}-{who}", layers=1, size="2G" if not a.smoke else "256M",
                             data_per_layer=data, zeros=zeros)
                source_mib = os.stat(vm.chain[0]).st_blocks * 512 / 2**20
                dest = os.path.join(vm.workdir, f"{who}.{fmt}")
                if who == "virsh":
                    t = time.monotonic()
                    subprocess.run(["virsh", "-c", vm.uri, "blockcopy", vm.name, "vda", dest,
                                    "--format", fmt, "--transient-job", "--wait", "--pivot"],
                                   check=True, capture_output=True)
                    took = time.monotonic() - t
                else:
                    name = f"zero-{fmt}"
                    t0 = self.create(name, {"domain": vm.name, "disk": "vda", "pivot": True,
                                            "nodeName": agent.node, "format": fmt,
                                            "dest": dest})
                    took = self.watch.wait(name, "Pivoted") - t0
                measured[who] = (os.stat(dest).st_blocks * 512 / 2**20, took)
                testvm.destroy_vm(vm)
            bound = 1.05 * data / 2**20 + 16
            (ours, ours_s), (theirs, theirs_s) = measured["agent"], measured["virsh"]
            self.record(f"zeros_{fmt}_allocation", ours, f"<= {bound:.1f} MiB", "MiB",
                        ours <= bound, virsh_mib=round(theirs, 1), agent_s=round(ours_s, 2),
                        virsh_s=round(theirs_s, 2), data_mib=data >> 20, zeros_mib=zeros >> 20,
                        source_mib=round(source_mib, 1))
            self.record(f"zeros_{fmt}_time_vs_virsh", ours_s - theirs_s, "reported", "s", None)

    # -- 6: many copies on one node ---------------------------------------------------
    def scale(self, agent: Agent) -> None:
        a = self.args
        n, window = a.parallel, a.window
        vms = [self.vm(f"many{i}", size="128M", data_per_layer="48M") for i in range(n)]
        since = dt.datetime.now(dt.UTC)
        names = []
        for i, vm in enumerate(vms):
            name = f"many-{i}"
            names.append(name)
            self.create(name, {"domain": vm.name, "disk": "vda", "nodeName": agent.node,
                               "bandwidth": a.scale_bandwidth,
                               "dest": os.path.join(vm.workdir, "m.qcow2")})
        for name in names:
            self.watch.wait(name, "Copying")
        rss, cpu0, t0 = [agent.rss_mib()], agent.cpu_seconds(), time.monotonic()
        window_start = dt.datetime.now(dt.UTC)
        while time.monotonic() - t0 < window:
            time.sleep(1)
            rss.append(agent.rss_mib())
        cpu = (agent.cpu_seconds() - cpu0) / (time.monotonic() - t0) * 100
        window_end = dt.datetime.now(dt.UTC)
        still_copying = sum(
            (self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, nm)
             .get("status") or {}).get("phase") == "Copying" for nm in names)
        for name in names:
            self.patch(name, {"abort": True})
        for name in names:
            self.watch.wait(name, "Aborted")
        time.sleep(2)
        records = audit_requests(agent.user, since)
        writes = collections.Counter(
            r["objectRef"].get("name") for r in records
            if r["verb"] == "patch" and r["objectRef"].get("subresource") == "status"
            and r["objectRef"].get("resource") == PLURAL  # not the node's DiskInventory
            and window_start <= dt.datetime.fromisoformat(
                r["requestReceivedTimestamp"].replace("Z", "+00:00")) <= window_end)
        # Requests naming one copy (its claim, status writes...) from the audit log, plus the
        # Events posted about it (an Event's create names no object in the audit record).
        per_copy = collections.Counter(r["objectRef"].get("name") for r in records
                                       if r["objectRef"].get("name") in names
                                       and r["objectRef"].get("resource") == PLURAL)
        core = kubernetes.client.CoreV1Api(self.api.api_client)
        events = {nm: sum(e.count or 1 for e in core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={nm}").items) for nm in names}
        collection = collections.Counter(_verb(r) for r in records
                                         if not r["objectRef"].get("name"))
        window_s = (window_end - window_start).total_seconds()
        rate = max(writes.values(), default=0) / window_s
        self.record("scale_rss_max", max(rss), "<= 150 MiB", "MiB", max(rss) <= 150,
                    copies=n, still_copying_at_end=still_copying)
        self.record("scale_cpu", cpu, "<= 10 % of one core", "%", cpu <= 10, copies=n,
                    window_s=round(window_s, 1))
        self.record("scale_status_writes_max", rate, "<= 1 per second per object",
                    "writes/s", rate <= 1.0, mean=round(statistics.mean(
                        writes.values()) / window_s, 3) if writes else 0)
        requests = [per_copy[nm] + events[nm] for nm in names]
        named = collections.Counter(_verb(r) for r in records if r["objectRef"].get("name"))
        self.record("api_requests_per_copy", statistics.mean(requests), "reported", "requests",
                    None, max=max(requests), min=min(requests),
                    per_copy_by_verb={k: round(v / n, 2) for k, v in named.items()},
                    events_per_copy=round(statistics.mean(events.values()), 2),
                    agent_wide_list_and_watch=dict(collection))
        for vm in vms:
            testvm.destroy_vm(vm)
            self.vms.remove(vm)

    def isolation(self, first: Agent) -> None:
        """Two agents on two node names: watch events each receives for the other's objects."""
        second = Agent(self.namespace, "bench-b", log_name="bench-agent-b")
        self.agents.append(second)
        vms = [self.vm(f"iso{i}", size="64M", data_per_layer="4M") for i in range(4)]
        for i, vm in enumerate(vms):
            agent = (first, second)[i % 2]
            self.create(f"iso-{i}", {"domain": vm.name, "disk": "vda", "pivot": True,
                                     "nodeName": agent.node,
                                     "dest": os.path.join(vm.workdir, "i.qcow2")})
        for i in range(len(vms)):
            self.watch.wait(f"iso-{i}", "Pivoted")
        time.sleep(2)
        foreign = [agent.metric("blockcopy_watch_events_total", owner="other-node")
                   for agent in (first, second)]
        own = [agent.metric("blockcopy_watch_events_total", owner="this-node")
               for agent in (first, second)]
        self.record("foreign_watch_events", max(foreign), "0", "events", max(foreign) == 0,
                    per_agent=foreign, own_events_per_agent=own)
        second.stop()

    # -- 7: idle ----------------------------------------------------------------------
    def idle(self) -> None:
        idle_ns = f"bench-idle-{uuid.uuid4().hex[:6]}"
        kubectl("create", "namespace", idle_ns)
        agent = Agent(idle_ns, "bench-idle", log_name="bench-agent-idle")
        self.agents.append(agent)
        time.sleep(5)
        cpu0, wake0, t0 = agent.cpu_seconds(), agent.wakeups(), time.monotonic()
        time.sleep(self.args.window)
        took = time.monotonic() - t0
        cpu = (agent.cpu_seconds() - cpu0) / took * 100
        per_minute = (agent.wakeups() - wake0) / took * 60
        self.record("idle_cpu", cpu, "no measurable CPU", "%", cpu < 0.5, rss_mib=round(
            agent.rss_mib(), 1))
        self.record("idle_wakeups_per_minute", per_minute, "reported", "wake-ups/min", None)
        agent.stop()
        kubectl("delete", "namespace", idle_ns, "--wait=false")

    def run(self) -> None:
        a = self.args
        agent = Agent(self.namespace, "bench-a", log_name="bench-agent")
        self.agents.append(agent)
        self.results["machine"] = {"cores": os.cpu_count(), "python": sys.version.split()[0],
                                   "kubernetes": json.loads(kubectl("version", "-o", "json"))
                                   ["serverVersion"]["gitVersion"],
                                   "libvirt": subprocess.run(
                                       ["virsh", "-c", "qemu:///system", "version"],
                                       capture_output=True, text=True).stdout.split("\n")[2:4]}
        self.record("agent_rss_idle", agent.rss_mib(), "reported", "MiB", None)
        wanted = set(a.only or PARTS)
        steps: dict[str, Callable[[], object]] = {
            "latencies": lambda: self.latencies(agent),
            "copy": lambda: (
                self.versus_virsh(agent, label="copy_1g", size=a.size, data=a.data,
                                  target_ratio=None, target_extra=0.5),
                self.versus_virsh(agent, label="copy_big", size=a.big_size, data=a.big_data,
                                  target_ratio=1.10, target_extra=None)),
            "zeros": lambda: self.zeros(agent),
            "scale": lambda: self.scale(agent),
            "isolation": lambda: self.isolation(agent),
            "verify": lambda: bench_verify.run(self, agent),
            "foreign": lambda: bench_foreign.run(self, Agent),
            "plan": lambda: bench_plan.run(self),
            "idle": self.idle,
        }
        for part in PARTS:  # in this order; each part's wall time is recorded too
            if part in wanted:
                started = time.monotonic()
                steps[part]()
                self.parts_s[part] = round(time.monotonic() - started, 1)

    def close(self) -> None:
        # The objects go first, while the agents still run to release their finalizers; an
        # object whose agent is gone already is released by hand (its VM goes next anyway),
        # so the namespace never hangs in Terminating.
        kubectl("delete", PLURAL, "--all", "-n", self.namespace, "--wait=false")
        deadline = time.monotonic() + 60
        while kubectl("get", PLURAL, "-n", self.namespace, "-o", "name").strip():
            if time.monotonic() > deadline:
                for name in kubectl("get", PLURAL, "-n", self.namespace,
                                    "-o", "name").split():
                    kubectl("patch", name, "-n", self.namespace, "--type=merge",
                            "-p", '{"metadata":{"finalizers":null}}')
                break
            time.sleep(1)
        for agent in self.agents:
            agent.stop()
        for vm in self.vms:
            testvm.destroy_vm(vm)
        kubectl("delete", "namespace", self.namespace, "--wait=false")


PARTS = ("latencies", "copy", "zeros", "scale", "isolation", "verify", "foreign", "plan",
         "idle")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="a quick version")
    parser.add_argument("--smoke", action="store_true",
                        help="every step once, on small disks (its numbers mean little)")
    parser.add_argument("--json", default=str(STATE / "bench.json"), help="where to write")
    parser.add_argument("--only", action="append", choices=PARTS,
                        help="run only this part (repeatable; default: all)")
    args = parser.parse_args()
    short = args.short
    args.rounds = 3 if short else 10
    args.size, args.data = "1G", "256M"  # 512 MiB of data in 2 layers
    args.big_size, args.big_data = ("2G", "512M") if short else ("5G", "2G")  # 4 GiB of data
    args.parallel = 10 if short else 50
    args.window = 20 if short else 60
    args.foreign, args.foreign_window = 2000, 30  # other nodes' objects, the window after
    args.scale_bandwidth = "1Mi"  # about 96 MiB at 1 MiB/s: a minute and a half of copying
    if args.smoke:
        args.rounds, args.parallel, args.window = 2, 3, 5
        args.size, args.data, args.big_size, args.big_data = "128M", "16M", "256M", "32M"
        args.foreign, args.foreign_window = 100, 5

    bench = Bench(args)
    started = time.monotonic()
    try:
        bench.run()
    finally:
        bench.close()
    took = time.monotonic() - started
    results = bench.results
    results["run"] = {"short": short, "smoke": args.smoke, "seconds": round(took, 1),
                      "domains": bench.made, "parts_s": bench.parts_s,
                      "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    kind = "smoke" if args.smoke else "short" if short else "full"
    print(f"\nbenchmark ({kind}, {took:.0f} s): "
          f"{results['machine']}")
    print(f"{'figure':34} {'measured':>14}  target")
    for key, r in results.items():
        if not isinstance(r, dict) or "measured" not in r:
            continue
        verdict = {True: "met", False: "MISSED", None: ""}[r["met"]]
        extra = f"  (p50 {r['p50']:.1f}, max {r['max']:.1f}, n={r['n']})" if "p50" in r else ""
        print(f"{key:34} {r['measured']:>10.3f} {r['unit']:<9} {r['target']}  {verdict}{extra}")
    print("stage latencies (ms):")
    for stage, v in results.get("stages_ms", {}).items():
        print(f"  {stage:30} p50 {v['p50']:>8.1f}  p95 {v['p95']:>8.1f}  max {v['max']:>8.1f}"
              f"  (n={v['n']})")
    print("wall time per part (s): " + ", ".join(f"{k} {v:g}" for k, v in bench.parts_s.items()))
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
