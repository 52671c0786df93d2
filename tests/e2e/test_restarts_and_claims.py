"""Issue B end to end, restarts and claims: an agent killed and restarted adopts its job (no
second job, progress continues, pivot and abort still work), a restart after the end changes
nothing, exactly one of two racing agents claims an object, an object whose domain runs
nowhere stays Pending and is re-checked, each agent receives only its own node's objects plus
the unclaimed ones naming its node or none (an unclaimed object naming another node never
reaches it, and gets no status from it), and deletion has a documented way out when the node
is gone for good.

Real kube-apiserver + etcd, real libvirtd + QEMU, the agents as processes. Several agents
for different node names share the one libvirtd: that is how "several nodes" are simulated.
Node names are unique per test and each test has its own namespace, which its agents watch
(tests/support/isolation.py), so that agents of other test sessions on this machine (which
share the API server and libvirtd) never receive these objects; the test that an agent
receives only its own node's objects runs a cluster-wide agent.

Which libvirt situation each test provokes, and how:
- test_sigkill_restart_while_copying / _while_mirrored / test_abort_after_restart: the agent
  is SIGKILLed while libvirt runs a (bandwidth-limited, or ready) copy job; the job keeps
  running in libvirtd without its manager, and the restarted agent must adopt it.
- test_restart_after_end_does_nothing: a restart when libvirt has no job (after the pivot or
  the abort): nothing may be called or written.
- test_two_agents_race_to_claim*: two agents whose libvirt both "run" the domain (the same
  libvirtd) receive the same unclaimed object at the same moment.
- test_pending_until_domain_runs: the domain does not exist in libvirt at first, then is
  created (virDomainCreateXML) under the awaited name.
- test_agent_receives_only_its_own_objects: none (API-server side filtering).
- test_namespaced_agent_claims_only_in_its_namespace: none (claimer scoping).
- test_delete_when_claiming_node_is_gone: the agent is SIGKILLed for good mid-copy; the
  orphaned libvirt job is ended by hand (virsh blockjob --abort), the documented manual step.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import yaml

from blockcopy.model.api import FINALIZER, GROUP, KIND, NODE_LABEL, PLURAL, VERSION
from support.assertions import assert_on_source
from support.images import image_digest
from support.isolation import unique, unique_node
from support.libvirt_probes import (
    block_job_info,
    blockjob_text,
    live_disk_source,
    live_mirror,
    live_xml,
    virsh,
)
from support.objects import condition, copy_spec
from support.vms import IMAGES, expected_digest
from support.waits import claimed, events_of, gone, wait_for

SLOW = {"size": "256M", "data_per_layer": "64M"}  # ~128M to copy: minutes at 1Mi/s


# ---------------------------------------------------------------- helpers


def _reasons(blockcopies, core, name: str) -> list[str]:
    return sorted(e.reason for e in blockcopies.events(core, name))


def _wait_copying(blockcopies, name: str, timeout: float = 60) -> dict:
    return blockcopies.wait_copying(name, counter="cur", above=0, timeout=timeout)


def _claim_lines(agent, namespace: str, name: str) -> list[str]:
    return re.findall(rf"{re.escape(namespace)}/{re.escape(name)}: claimed for node \S+",
                      agent.log())


# ---------------------------------------------------------------- 10. SIGKILL and restart


def test_sigkill_restart_while_copying(agent_factory, node, vms, blockcopies, core):
    first = agent_factory(node)
    vm = vms(**SLOW)
    before = expected_digest(vm)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, bandwidth="1Mi"))
    started = _wait_copying(blockcopies, name)

    cur_before_kill = block_job_info(vm)["cur"]
    first.stop(signal.SIGKILL)
    time.sleep(2)  # the job goes on in libvirtd without any agent
    orphaned = block_job_info(vm)
    assert orphaned["cur"] >= cur_before_kill
    status_cur_at_restart = blockcopies.status(name)["cur"]

    second = agent_factory(node)
    # Progress continues in status, from the same job: cur never goes back.
    status = wait_for(lambda: (s := blockcopies.status(name))["cur"] > status_cur_at_restart
                      and s, 30, what="status cur to grow after the restart")
    assert status["phase"] == "Copying", status
    info = block_job_info(vm)
    assert info["cur"] >= orphaned["cur"], (info, orphaned)  # never restarted from 0
    assert info["bandwidth"] == 1 << 20
    assert live_mirror(vm, "vda")["source"] == dest
    jobs = blockjob_text(vm)
    # virsh 9 prints "[ 12 %]", virsh 11 "[12.50 %]"
    assert len(re.findall(r"Block Copy: \[ *[\d.]+ %\]", jobs)) == 1, jobs
    assert status["startTime"] == started["startTime"]
    assert "copying " not in second.log()  # the restarted agent started nothing
    assert _reasons(blockcopies, core, name).count("Started") == 1

    blockcopies.patch_spec(name, {"bandwidth": None, "pivot": True})
    status = blockcopies.wait_phase(name, "Pivoted", timeout=120)
    assert live_disk_source(vm, "vda") == dest
    assert image_digest(dest, "qcow2") == before
    assert status["startTime"] == started["startTime"]
    assert _reasons(blockcopies, core, name).count("Started") == 1


def test_sigkill_restart_while_mirrored(agent_factory, node, vms, blockcopies, core):
    first = agent_factory(node)
    vm = vms()
    before = expected_digest(vm)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest))
    mirrored = blockcopies.wait_phase(name, "Mirrored")
    first.stop(signal.SIGKILL)
    mirror = live_mirror(vm, "vda")
    assert mirror["source"] == dest and mirror["ready"] == "yes"

    second = agent_factory(node)
    # The restarted agent looks at the ready job, and has nothing to write.
    wait_for(lambda: f"{name}: first look done: Mirrored" in second.log(), 30,
             what="the restarted agent's first look")
    status = blockcopies.status(name)
    assert status["phase"] == "Mirrored", status
    assert status["mirroredTime"] == mirrored["mirroredTime"]
    assert live_mirror(vm, "vda") == mirror  # the same job, untouched

    blockcopies.patch_spec(name, {"pivot": True})
    blockcopies.wait_phase(name, "Pivoted")
    assert live_disk_source(vm, "vda") == dest
    assert live_mirror(vm, "vda") is None
    assert image_digest(dest, "qcow2") == before
    assert _reasons(blockcopies, core, name).count("Started") == 1


def test_abort_after_restart(agent_factory, node, vms, blockcopies, core):
    first = agent_factory(node)
    vm = vms(**SLOW)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, bandwidth="1Mi"))
    _wait_copying(blockcopies, name)
    first.stop(signal.SIGKILL)
    agent_factory(node)

    blockcopies.patch_spec(name, {"abort": True})
    status = blockcopies.wait_phase(name, "Aborted", timeout=60)
    assert condition(status, "Aborted")["status"] == "True"
    assert "incomplete" in status["message"], status["message"]
    assert condition(status, "Mirrored")["status"] == "False"
    assert_on_source(vm)
    assert os.path.exists(dest)  # user data: never deleted
    assert _reasons(blockcopies, core, name).count("Started") == 1


# ---------------------------------------------------------------- 11. restart after the end


@pytest.mark.parametrize("end", ["Pivoted", "Aborted"])
def test_restart_after_end_does_nothing(end, agent_factory, node, vms, blockcopies, core):
    first = agent_factory(node)
    vm = vms()
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest))
    blockcopies.wait_phase(name, "Mirrored")
    blockcopies.patch_spec(name, {"pivot": True} if end == "Pivoted" else {"abort": True})
    blockcopies.wait_phase(name, end)
    time.sleep(2)  # let the last writes and Events land
    obj = blockcopies.get(name)
    events = {e.metadata.name: (e.reason, e.count) for e in blockcopies.events(core, name)}
    xml = live_xml(vm)
    dest_stat = os.stat(dest)
    first.stop(signal.SIGKILL)

    second = agent_factory(node)
    wait_for(lambda: "Daemon 'follow' succeeded" in second.log(), 20,
             what="the restarted agent to look at the object")
    time.sleep(5)
    after = blockcopies.get(name)
    assert after["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"], (
        obj, after)
    assert after["status"] == obj["status"]
    assert after["metadata"].get("labels") == obj["metadata"].get("labels")
    assert after["metadata"].get("finalizers") == obj["metadata"].get("finalizers")
    assert {e.metadata.name: (e.reason, e.count)
            for e in blockcopies.events(core, name)} == events
    assert live_xml(vm) == xml
    assert blockjob_text(vm) == "No current block job for vda"
    assert os.stat(dest).st_mtime_ns == dest_stat.st_mtime_ns or end == "Pivoted"
    assert second.proc.poll() is None


# ---------------------------------------------------------------- 12. claim race
#
# Unclaimed objects are, by design, offered to every agent whose libvirt runs the domain.
# On this shared machine that includes the agents of other test sessions running at the same
# time (same API server, same libvirtd): one of them may win a race against this test's two
# agents. Such a win still has to obey the contract (one claim, one job), but it does not
# exercise this test's agents, so the race is run again (a bounded number of times).


def _passes(agent) -> list[str]:
    """The "pass done" lines (one per --claim-interval) of the claimer's watch of objects
    naming no node (its other watch, of this node's objects, logs its own)."""
    return [line for line in agent.log().splitlines()
            if "claimer pass over" in line and "(spec.nodeName=" not in line]


def _race(agents, vms_list, blockcopies, core, namespace) -> dict[str, str]:
    """Create one unclaimed object per VM in a single request and check that each is claimed
    exactly once: {name: winning node}. Objects won by this test's agents must be copied
    once and pivot."""
    names = [unique("bc-race") for _ in vms_list]
    manifest = {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": n},
         "spec": copy_spec(vm, node=None, dest=os.path.join(vm.workdir, "copy.qcow2"),
                           pivot=True)}
        for n, vm in zip(names, vms_list, strict=True)]}
    blockcopies.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))
    by_node = {a.node: a for a in agents}
    winners = {}
    for name, vm in zip(names, vms_list, strict=True):
        label = wait_for(claimed(blockcopies, name), 30)
        winners[name] = label
        if label not in by_node:
            # Another session's agent won: the claim is a conditional write, so the label
            # in the API is the one claim there is; none of ours may say otherwise.
            assert not any(_claim_lines(a, namespace, name) for a in agents)
            continue
        status = blockcopies.wait_phase(name, "Pivoted", "Failed", timeout=120)
        assert status["phase"] == "Pivoted", status
        assert blockcopies.get(name)["metadata"]["labels"][NODE_LABEL] == label
        assert status["nodeName"] == label, status
        claims = {a.node: _claim_lines(a, namespace, name) for a in agents}
        assert claims[label] == [f"{namespace}/{name}: claimed for node {label}"], claims
        for loser in agents:
            if loser.node != label:  # lost the conditional patch (or saw it claimed): never
                # acted on it; the only line naming it may be the lost race.
                mentions = [line.split("] ", 1)[-1].split(": ", 1)[-1].strip()
                            for line in loser.log().splitlines() if name in line]
                assert set(mentions) <= {"another agent claimed it first"}, mentions
        assert _reasons(blockcopies, core, name).count("Started") == 1, \
            _reasons(blockcopies, core, name)
        assert live_disk_source(vm, "vda") == os.path.join(vm.workdir, "copy.qcow2")
    return winners


def test_two_agents_race_to_claim(agent_factory, vms, blockcopies, core, namespace):
    agents = [agent_factory(unique_node("node-a")), agent_factory(unique_node("node-b"))]
    ours = {a.node for a in agents}
    rounds = []
    for _ in range(4):
        vm = vms()
        rounds.append(_race(agents, [vm], blockcopies, core, namespace))
        if set(rounds[-1].values()) <= ours:
            break
    assert set(rounds[-1].values()) <= ours, f"other sessions' agents won every race: {rounds}"
    dest = os.path.join(vm.workdir, "copy.qcow2")
    assert image_digest(dest, "qcow2") == expected_digest(vm)


def test_two_agents_race_to_claim_many(agent_factory, vms, blockcopies, core, namespace):
    agents = [agent_factory(unique_node("node-a")), agent_factory(unique_node("node-b"))]
    ours = {a.node for a in agents}
    winners = _race(agents, [vms() for _ in range(4)], blockcopies, core, namespace)
    print(f"claims: {winners}")
    assert set(winners.values()) & ours, f"other sessions' agents won every race: {winners}"


# ---------------------------------------------------------------- 13. Pending, re-checked


def test_pending_until_domain_runs(agent_factory, node, vms, blockcopies, core, namespace):
    interval = 3
    agent = agent_factory(node, extra_args=["--claim-interval", str(interval)])
    stolen = []
    for _ in range(3):  # another session's agent may re-list first: then try again
        vm_name = unique("bct-late")
        dest = str(IMAGES / vm_name / "copy.qcow2")
        name = blockcopies.create(copy_spec(vm_name, node=None, dest=dest, pivot=True))
        status = blockcopies.wait_phase(name, "Pending", timeout=30)
        assert f"domain '{vm_name}' is not running on any node with an agent" in \
            status["message"], status
        assert condition(status, "Failed") is None or \
            condition(status, "Failed")["status"] == "False"
        passes = len(_passes(agent))
        wait_for(lambda: len(_passes(agent)) >= passes + 2, 6 * interval,  # noqa: B023
                 what="two more passes of the claimer")
        obj = blockcopies.get(name)  # re-checked twice meanwhile: still nobody runs it
        assert obj["status"]["phase"] == "Pending"
        assert NODE_LABEL not in (obj["metadata"].get("labels") or {})
        assert not os.path.exists(IMAGES / vm_name)

        vm = vms(name=vm_name)
        assert vm.name == vm_name
        created = time.monotonic()
        label = wait_for(claimed(blockcopies, name), 4 * interval + 5,
                         what="the object to be claimed once its domain runs")
        claimed_after = time.monotonic() - created
        if label == node:
            break
        stolen.append(label)
    assert label == node, f"claimed by other sessions' agents: {stolen}"
    # The label is in the API before the claimer, back from its patch, logs the claim.
    wait_for(lambda: _claim_lines(agent, namespace, name), 10, what="the agent's claim log line")
    status = blockcopies.wait_phase(name, "Pivoted", timeout=90)
    assert status["nodeName"] == node
    assert live_disk_source(vm, "vda") == dest
    print(f"claimed {claimed_after:.1f} s after the domain started")


def test_pending_phase_has_an_event(agent_factory, node, blockcopies, core):
    """The claimer's Pending (an object naming no node, its domain running nowhere) is a
    phase change like any other: it gets a Normal Event, and posting it does not fail."""
    agent = agent_factory(node, extra_args=["--claim-interval", "3"])
    vm_name = unique("bct-nowhere")
    name = blockcopies.create(copy_spec(vm_name, node=None,
                                        dest=f"/var/lib/libvirt/images/{vm_name}.qcow2"))
    status = blockcopies.wait_phase(name, "Pending", timeout=30)
    assert status["message"].startswith(
        f"no agent has claimed it: domain '{vm_name}' is not running on any node"), status
    # The Event is posted after the Pending write, by the same pass: once it is there, the
    # claimer is done with the object, and a failure would have been logged already.
    events = wait_for(events_of(blockcopies, core, name, "Pending"), 10)
    assert events[0].type == "Normal" and status["message"] in events[0].message
    assert f"claiming {name} failed" not in agent.log(), agent.log()


# ---------------------------------------------------------------- 14. server-side filtering


def test_agent_receives_only_its_own_objects(agent_factory, node, vms, blockcopies, core):
    other = unique_node("node-b")
    # Cluster-wide, as in production: no namespace filter hides the other node's object.
    agent = agent_factory(node, clusterwide=True,
                          extra_args=["--verbose", "--claim-interval", "3"])
    vm = vms()
    # Claimed by another node (no agent of that node runs here).
    theirs = blockcopies.create(
        copy_spec(vm, node=other, dest=os.path.join(vm.workdir, "theirs.qcow2")),
        name=unique("bc-theirs"), labels={NODE_LABEL: other})
    # Naming another node, not claimed (its agent is not running), on a domain this node's
    # libvirt runs: the field selector on spec.nodeName keeps it from this agent.
    unclaimed = blockcopies.create(
        copy_spec(vm, node=other, dest=os.path.join(vm.workdir, "unclaimed.qcow2")),
        name=unique("bc-theirs-unclaimed"))
    mine = blockcopies.create(
        copy_spec(vm, node=node, dest=os.path.join(vm.workdir, "mine.qcow2"), pivot=True),
        name=unique("bc-mine"))
    blockcopies.wait_phase(mine, "Pivoted")
    # The other node's object changes while this agent runs: still nothing comes to it. A
    # change of its own object after that one does come (the watch delivers in order): once
    # it is in the log, the other one would be too, had the API server sent it.
    # kopf's "Handler ... succeeded" line does not name the object; only this agent's own
    # object passes the handler's filter, so one more such line is its change arriving.
    def handled() -> int:
        return sum("Handler 'spec_changed" in line and "succeeded" in line
                   for line in agent.log().splitlines())

    before = handled()
    blockcopies.patch_spec(theirs, {"bandwidth": "5Mi"})
    blockcopies.patch_spec(mine, {"bandwidth": "5Mi"})
    wait_for(lambda: handled() > before, 30,
             what="the agent to receive its own object's change")

    # The unclaimed object's change too, and two more passes of the claimer's re-list.
    passes = len(_passes(agent))
    blockcopies.patch_spec(unclaimed, {"bandwidth": "5Mi"})
    wait_for(lambda: len(_passes(agent)) >= passes + 2, 20,
             what="two more passes of the claimer")

    log = agent.log()
    assert mine in log  # verbose: it does log the objects it receives
    for name in (theirs, unclaimed):
        assert name not in log, [line for line in log.splitlines() if name in line]
    # The unclaimed watches ask the API server for unlabelled objects naming this node or
    # none (spec.nodeName=, which an absent field matches), never for all of them.
    requests = [line for line in log.splitlines()
                if f"{PLURAL}?" in line and "labelSelector=%21" in line]
    assert requests, "no request of the claimer's watches in the verbose log"
    selectors = {m for line in requests
                 for m in re.findall(r"fieldSelector=spec.nodeName%3D([^&\s]*)", line)}
    assert selectors == {node, ""}, requests[:4]
    assert all("fieldSelector=" in line for line in requests), requests[:4]
    assert "refuses field selectors" not in log
    for name in (theirs, unclaimed):
        obj = blockcopies.get(name)
        assert not obj.get("status"), obj.get("status")  # nobody wrote anything to it
        assert FINALIZER not in (obj["metadata"].get("finalizers") or [])
        assert not blockcopies.events(core, name)
    assert NODE_LABEL not in (blockcopies.get(unclaimed)["metadata"].get("labels") or {})
    for dest in ("theirs.qcow2", "unclaimed.qcow2"):
        assert not os.path.exists(os.path.join(vm.workdir, dest))


def test_namespaced_agent_claims_only_in_its_namespace(agent_factory, node, vms, blockcopies,
                                                       namespace):
    """An agent given --namespace must not claim objects of other namespaces: it would never
    follow them (its kopf watch is limited to its namespace), so they would stay claimed by
    a node that ignores them, for ever."""
    elsewhere = unique("e2e-elsewhere")  # never created: nothing to watch
    agent = agent_factory(node, namespace=elsewhere, extra_args=["--claim-interval", "3"])
    vm = vms()
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=None, dest=dest, pivot=True))
    passes = len(_passes(agent))
    wait_for(lambda: len(_passes(agent)) >= passes + 2, 20,
             what="two passes of the claimer over its namespace after the creation")
    obj = blockcopies.get(name)
    labels = obj["metadata"].get("labels") or {}
    assert labels.get(NODE_LABEL) != node, (
        f"agent limited to namespace {elsewhere} claimed {namespace}/{name}; "
        f"status: {obj.get('status')}; log: {_claim_lines(agent, namespace, name)}")


# ---------------------------------------------------------------- 15. node gone for good


def test_delete_when_claiming_node_is_gone(agent_factory, node, vms, blockcopies, core,
                                           kubectl, namespace):
    agent = agent_factory(node)
    vm = vms(**SLOW)
    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, bandwidth="1Mi"))
    _wait_copying(blockcopies, name)
    assert FINALIZER in blockcopies.get(name)["metadata"]["finalizers"]
    agent.stop(signal.SIGKILL)  # the node is gone for good

    blockcopies.delete(name)
    time.sleep(5)
    obj = blockcopies.get(name)  # still there: nobody can cancel the job
    assert obj["metadata"].get("deletionTimestamp"), obj["metadata"]
    assert FINALIZER in obj["metadata"]["finalizers"]
    assert obj["status"]["phase"] == "Copying"
    assert live_mirror(vm, "vda")["source"] == dest

    # The documented release (README).
    kubectl("patch", "-n", namespace, "bc", name, "--type=merge",
            "-p", '{"metadata":{"finalizers":null}}')
    wait_for(gone(blockcopies, name), 15)

    # The job was orphaned (nobody cancelled it): the documented manual step ends it.
    assert block_job_info(vm), "the orphaned job should still run"
    virsh("blockjob", vm.name, "vda", "--abort")
    wait_for(lambda: live_mirror(vm, "vda") is None, 30, what="the job to end")
    assert_on_source(vm)
    assert os.path.exists(dest)
