#!/usr/bin/env python3
"""`make demo`: a live disk copy and pivot on the local environment, narrated.

Expects `make cluster` to have run (the Makefile does it) and the test-support package on the
path (`make demo` runs it with PYTHONPATH=tests). Creates a demo VM whose disk is a
two-layer qcow2 chain, starts the agent, applies examples/full-copy.yaml pointed at the VM,
shows status while the copy runs, pivots, and prints what happened. The VM is left running
on the copied disk (`make cluster-down` removes it).
"""

from __future__ import annotations

import os
import sys
import time

import kubernetes
import yaml

from blockcopy.model.api import GROUP, PLURAL, VERSION
from support.agents import Agent
from support.cluster import Kubectl, apply_crd, custom_objects
from support.images import image_digest, qemu_img_compare
from support.libvirt_probes import domstate, live_disk_source, live_mirror
from support.paths import EXAMPLES, STATE
from support.vms import VM, create_vm, destroy_vm_by_name, expected_digest

NS = "default"
NODE = "demo-node"
BANDWIDTH = "64Mi"  # slow enough to watch the progress column move
ADMIN = Kubectl()  # the admin kubeconfig
kubectl = ADMIN.output


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def main() -> int:
    t_start = time.monotonic()
    say("installing the BlockCopy CRD")
    print(apply_crd(ADMIN).stdout.strip())

    say("creating the demo VM (QEMU, 1 GiB disk = two-layer qcow2 chain with known data)")
    destroy_vm_by_name("bct-demo")
    vm = create_vm("bct-demo", layers=2, size="1G", data_per_layer="192M")
    expected = expected_digest(vm)
    print(f"domain {vm.name} ({vm.uuid}) running; vda = {vm.chain[0]}")
    print(f"backing chain: {' <- '.join(reversed(vm.chain))}")
    dest = os.path.join(vm.workdir, "vda.copy.qcow2")

    say(f"starting the agent (blockcopy-operator --node-name {NODE})")
    log_path = STATE / "log" / "demo-agent.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.unlink(missing_ok=True)
    agent = Agent(NODE, log_path, args=["--node-name", NODE])
    try:
        try:
            agent.start()
        except AssertionError:
            print(agent.log())
            raise SystemExit("the agent did not start") from None
        print(f"agent running (pid {agent.proc.pid}, log {log_path})")
        return run_copy(vm, dest, expected, t_start)
    finally:
        agent.stop()


def run_copy(vm: VM, dest: str, expected: str, t_start: float) -> int:
    api = custom_objects()
    manifest = yaml.safe_load((EXAMPLES / "full-copy.yaml").read_text())
    manifest["metadata"]["name"] = "demo-vda"
    manifest["spec"].update(domain=vm.name, dest=dest, bandwidth=BANDWIDTH)
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "demo-vda")
        time.sleep(1)
    except kubernetes.client.exceptions.ApiException:
        pass

    say(f"applying examples/full-copy.yaml (domain={vm.name}, bandwidth={BANDWIDTH})")
    print(kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(manifest)).strip())
    t_copy = time.monotonic()
    print(kubectl("get", "bc", "-n", NS).splitlines()[0])
    last = None
    while True:
        status = api.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL,
                                                  "demo-vda").get("status") or {}
        line = kubectl("get", "bc", "demo-vda", "-n", NS, "--no-headers").rstrip()
        if line != last:
            print(line, flush=True)
            last = line
        if status.get("phase") == "Mirrored":
            break
        if status.get("phase") == "Failed":
            raise SystemExit(f"copy failed: {status.get('message')}")
        time.sleep(0.5)
    t_mirrored = time.monotonic()

    say("mirrored: source and copy are in sync, the VM still runs on the source")
    print(f"live XML source: {live_disk_source(vm, 'vda')}")
    print(f"live mirror:     {live_mirror(vm, 'vda')}")

    say("pivot: kubectl patch bc demo-vda --type=merge -p '{\"spec\":{\"pivot\":true}}'")
    kubectl("patch", "bc", "demo-vda", "-n", NS, "--type=merge", "-p", '{"spec":{"pivot":true}}')
    print(kubectl("wait", "bc/demo-vda", "-n", NS, "--for=condition=Pivoted",
                  "--timeout=120s").strip())
    t_done = time.monotonic()
    status = api.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "demo-vda")["status"]
    print(kubectl("get", "bc", "demo-vda", "-n", NS).rstrip())

    say("what happened")
    source_after = live_disk_source(vm, "vda")
    state = domstate(vm)
    same = qemu_img_compare(vm.chain[0], dest)
    digest_ok = image_digest(dest) == expected
    print(f"disk before:   {vm.chain[0]} (backing chain of {len(vm.chain)} images)")
    print(f"disk after:    {source_after} (standalone, {os.path.getsize(dest) / 2**20:.0f} MiB "
          "on disk)")
    print(f"VM state:      {state}")
    print(f"bytes copied:  {status['end']:,} (cur={status['cur']:,}, libvirt's counters)")
    print(f"time taken:    {t_mirrored - t_copy:.1f} s to Mirrored at {BANDWIDTH}/s, "
          f"{t_done - t_mirrored:.1f} s from pivot request to Pivoted, "
          f"{t_done - t_start:.1f} s for the whole demo")
    print(f"content check: qemu-img compare: {same.stdout.strip() or same.stderr.strip()}; "
          f"sha256 of guest view {'matches' if digest_ok else 'DIFFERS'}")
    events = kubectl("get", "events", "-n", NS, "--field-selector",
                     "involvedObject.name=demo-vda", "--sort-by=.lastTimestamp",
                     "-o", "custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message")
    print(f"events:\n{events.rstrip()}")
    ok = source_after == dest and state == "running" and same.returncode == 0 and digest_ok
    print("\nDEMO OK: the VM runs on the copied disk" if ok else "\nDEMO FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
