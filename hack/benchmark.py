#!/usr/bin/env python3
"""`make bench`: measures the agent against `virsh blockcopy` (the reference) on the real
local environment and prints numbers. Not a test: nothing here passes or fails.

- copy + pivot wall time of the same disk, agent vs virsh (unlimited bandwidth);
- status writes per object per second while Copying (the contract: at most 1 per second);
- latency from libvirt's mirror becoming ready to status.phase == Mirrored;
- the agent's resident memory, idle and while following N copies at once.

Needs the test-support package on the path (`make bench` runs it with PYTHONPATH=tests).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time

import kubernetes

from blockcopy.api import GROUP, KIND, PLURAL, VERSION
from support.agents import Agent
from support.cluster import Kubectl, apply_crd, bring_up, custom_objects
from support.libvirt_probes import live_mirror
from support.paths import STATE
from support.vms import VM, create_vm, destroy_vm

NS = "default"
NODE = "bench-node"


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def create(api, name: str, spec: dict) -> None:
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
        time.sleep(1)
    except kubernetes.client.exceptions.ApiException:
        pass
    api.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
        "metadata": {"name": name}, "spec": spec})


def wait_phase(api, name: str, phase: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = api.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL,
                                                  name).get("status") or {}
        if status.get("phase") == phase:
            return status
        if status.get("phase") == "Failed":
            raise SystemExit(f"{name} failed: {status.get('message')}")
        time.sleep(0.05)
    raise SystemExit(f"{name}: timed out waiting for {phase}")


def virsh_copy(vm: VM, dest: str) -> float:
    t = time.monotonic()
    subprocess.run(["virsh", "-c", vm.uri, "blockcopy", vm.name, "vda", dest, "--format",
                    "qcow2", "--transient-job", "--wait", "--pivot"], check=True,
                   capture_output=True)
    return time.monotonic() - t


def agent_copy(api, vm: VM, dest: str, name: str) -> tuple[float, float]:
    """Returns (create -> Pivoted seconds, mirror ready -> status Mirrored seconds)."""
    ready_at: list[float] = []

    def watch_ready() -> None:  # polls the live XML for ready='yes' every 10 ms
        while not ready_at:
            mirror = live_mirror(vm, "vda")
            if mirror and mirror.get("ready") == "yes":
                ready_at.append(time.monotonic())
            time.sleep(0.01)

    t = time.monotonic()
    create(api, name, {"domain": vm.name, "disk": "vda", "dest": dest, "nodeName": NODE})
    thread = threading.Thread(target=watch_ready, daemon=True)
    thread.start()
    wait_phase(api, name, "Mirrored")
    mirrored_at = time.monotonic()
    thread.join(5)
    api.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name, {"spec": {"pivot": True}})
    wait_phase(api, name, "Pivoted")
    done = time.monotonic() - t
    return done, (mirrored_at - ready_at[0]) if ready_at else float("nan")


def status_write_rate(api, vm: VM, dest: str, seconds: float) -> float:
    """Status writes per second of one object while it is Copying (bandwidth-limited)."""
    name = "bench-rate"
    create(api, name, {"domain": vm.name, "disk": "vda", "dest": dest, "nodeName": NODE,
                       "bandwidth": "4Mi"})
    wait_phase(api, name, "Copying")
    versions = set()
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
        versions.add(obj["metadata"]["resourceVersion"])
        time.sleep(0.05)
    api.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name, {"spec": {"abort": True}})
    wait_phase(api, name, "Aborted")
    return (len(versions) - 1) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="1G", help="disk size of the benchmark VMs")
    parser.add_argument("--data", default="256M", help="data written per layer (2 layers)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=5, help="copies followed at once")
    args = parser.parse_args()

    kubeconfig = bring_up()
    apply_crd(Kubectl(kubeconfig=kubeconfig))
    api = custom_objects(kubeconfig)

    log_path = STATE / "log" / "bench-agent.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.unlink(missing_ok=True)
    agent = Agent(NODE, log_path, args=["--node-name", NODE]).start()
    vms: list[VM] = []
    try:
        time.sleep(3)
        idle = rss_mib(agent.proc.pid)
        agent_times, virsh_times, ready_lags = [], [], []
        for i in range(args.rounds):
            vm = create_vm(f"bench-{i}", size=args.size, data_per_layer=args.data)
            vms.append(vm)
            virsh_times.append(virsh_copy(vm, os.path.join(vm.workdir, "virsh.qcow2")))
            took, lag = agent_copy(api, vm, os.path.join(vm.workdir, "agent.qcow2"), f"bench-{i}")
            agent_times.append(took)
            ready_lags.append(lag)

        rate_vm = create_vm("bench-rate", size="256M", data_per_layer="64M")
        vms.append(rate_vm)
        rate = status_write_rate(api, rate_vm, os.path.join(rate_vm.workdir, "r.qcow2"), 10)

        many = [create_vm(f"bench-many-{i}", size="256M", data_per_layer="32M")
                for i in range(args.parallel)]
        vms.extend(many)
        for i, vm in enumerate(many):
            create(api, f"bench-many-{i}", {"domain": vm.name, "disk": "vda", "nodeName": NODE,
                                            "dest": os.path.join(vm.workdir, "m.qcow2"),
                                            "bandwidth": "2Mi"})
        for i in range(args.parallel):
            wait_phase(api, f"bench-many-{i}", "Copying")
        time.sleep(5)
        busy = rss_mib(agent.proc.pid)
        for i in range(args.parallel):
            api.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, f"bench-many-{i}",
                                               {"spec": {"abort": True}})
        for i in range(args.parallel):
            wait_phase(api, f"bench-many-{i}", "Aborted")
    finally:
        agent.stop()
        for vm in vms:
            destroy_vm(vm)

    mean = statistics.mean
    print(f"\nbenchmark: {args.rounds} rounds, disk {args.size}, 2 layers of {args.data}")
    print(f"virsh blockcopy --wait --pivot : {mean(virsh_times):6.2f} s mean "
          f"({', '.join(f'{t:.2f}' for t in virsh_times)})")
    print(f"agent create -> Pivoted        : {mean(agent_times):6.2f} s mean "
          f"({', '.join(f'{t:.2f}' for t in agent_times)})")
    print(f"agent overhead vs virsh        : {mean(agent_times) - mean(virsh_times):+6.2f} s")
    print(f"ready -> status Mirrored       : {mean(ready_lags) * 1000:6.0f} ms mean "
          f"(max {max(ready_lags) * 1000:.0f} ms)")
    print(f"status writes while Copying    : {rate:6.2f} per object per second (limit 1)")
    print(f"agent RSS idle                 : {idle:6.1f} MiB")
    print(f"agent RSS following {args.parallel} copies  : {busy:6.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
