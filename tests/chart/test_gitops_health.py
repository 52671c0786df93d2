"""The status the agent writes tells GitOps tools the truth, checked with the tools' own code
(support/gitops.py): Flux's kstatus (status.Compute of sigs.k8s.io/cli-utils, what Flux's
health checks and `wait: true` run) and Argo CD's health check (deploy/argocd/blockcopy-health.lua
in gopher-lua, with the libraries Argo CD opens), for every phase and every pending intent.

The contract, one verdict per case:

  done     the object is where its spec asks: Pivoted; Aborted; Mirrored while neither
           spec.pivot nor spec.abort is set (the copy is in sync and waits for a commit).
           Conditions Ready=True, Reconciling=False, Stalled=False; kstatus Current; Argo CD
           Healthy.
  pending  something asked for is not done yet: no agent took the object up (Pending),
           Queued, Preparing, Copying (converging or not), Pivoting, Aborting, and Mirrored
           with spec.pivot or spec.abort set (a group waiting for its members, a refused pivot
           to retry, an adopted job); also a spec the agent has not taken up yet
           (status.observedGeneration < metadata.generation). Ready=False, Reconciling=True
           (its message says what is awaited), Stalled=False; kstatus InProgress; Argo CD
           Progressing.
  failed   Failed. Ready=False, Reconciling=False, Stalled=True (its message says why);
           kstatus Failed; Argo CD Degraded.

abort wins over pivot (blockcopy.reconcile.decide looks at spec.abort first). Every status
the agent writes carries observedGeneration = the generation it acted on, at the top and in
each condition. The statuses are built by the agent's own code: blockcopy.status.build_status
for the follow loop's decisions, the claimer (on the fakes) for Pending.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from blockcopy.agent.claimer import Claimer
from blockcopy.agent.recorder import Recorder
from blockcopy.core import status as agent_status
from blockcopy.core.reconcile import Action, Decision, refused
from blockcopy.model.api import (
    FINALIZER,
    GROUP,
    KIND,
    NODE_LABEL,
    VERSION,
    Phase,
    parse_spec,
)
from blockcopy.model.observation import DiskState, JobProgress, Mirror, MirrorReady
from support.fakes import FakeHypervisor, FakeKube

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
NODE = "n1"
DEST = "/var/lib/libvirt/images/c.qcow2"
GIB = 1 << 30

DONE, PENDING, FAILED = "done", "pending", "failed"
EXPECTED = {  # verdict: (kstatus, Argo CD, (Ready, Reconciling, Stalled))
    DONE: ("Current", "Healthy", ("True", "False", "False")),
    PENDING: ("InProgress", "Progressing", ("False", "True", "False")),
    FAILED: ("Failed", "Degraded", ("False", "False", "True")),
}


def spec_of(*, pivot: bool = False, abort: bool = False, group: str | None = None,
            node_name: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"domain": "vm", "disk": "vda", "dest": DEST, "pivot": pivot,
                            "abort": abort}
    if group is not None:
        spec["group"] = group
    if node_name is not None:
        spec["nodeName"] = node_name
    return spec


def blockcopy(spec: Mapping[str, Any], status: Mapping[str, Any] | None,
              generation: int) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
        "metadata": {"name": "vm-vda", "namespace": "vms", "generation": generation,
                     "labels": {NODE_LABEL: NODE},
                     "finalizers": [FINALIZER]},
        "spec": dict(spec),
    }
    if status is not None:
        obj["status"] = dict(status)
    return obj


def disk(ready: MirrorReady | None, cur: int = 0, end: int = 0) -> DiskState:
    """What libvirt shows of the disk: a copy job to DEST (``ready`` None: no job)."""
    job = JobProgress(cur=cur, end=end, bandwidth=0) if ready is not None else None
    mirror = Mirror(DEST, ready) if ready is not None else None
    return DiskState(domain_found=True, domain_running=True, disk_found=True, target="vda",
                     source="/var/lib/libvirt/images/vm.qcow2", job=job, mirror=mirror)


@dataclasses.dataclass(frozen=True)
class Step:
    """One status write of the follow loop: the decision, for the spec of that moment."""

    decision: Decision
    spec: Mapping[str, Any]
    generation: int = 1
    disk: DiskState | None = None
    extra: Sequence[Mapping[str, Any]] = ()


def written(steps: Sequence[Step]) -> dict[str, Any]:
    """The status after these writes, each built as the agent's recorder builds it (with
    the spec as the agent acts on it: a pending pivot is not Ready)."""
    current: dict[str, Any] = {}
    for n, step in enumerate(steps):
        current = agent_status.build_status(
            step.decision, previous=current, disk=step.disk, node_name=NODE,
            generation=step.generation, now=T0 + dt.timedelta(seconds=10 * n),
            extra_conditions=step.extra, spec=parse_spec(dict(step.spec)))
    return current


def claimer_pending(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The status an agent's claimer writes on an object it sees and may not claim (the only
    writer of Pending): one naming no node whose domain runs nowhere (an object naming
    another node never reaches the agent)."""
    async def run() -> dict[str, Any]:
        kube = FakeKube()
        recorder = Recorder(kube=kube, node_name=NODE, status_interval=1)
        claimer = Claimer(kube=kube, hv=FakeHypervisor(), recorder=recorder, node_name=NODE,
                          claim_interval=30)
        unnamed = {k: v for k, v in spec.items() if k != "nodeName"}
        await claimer.consider(kube.add("vm-vda", unnamed))
        await recorder.drain()
        return kube.status_of("vm-vda")
    return asyncio.run(run())


# The follow loop's decisions, as blockcopy.core.reconcile, .follower and .starting make them.
STARTED = Decision(Phase.COPYING, Action.START_COPY, reason="Started",
                   message=f"copying /var/lib/libvirt/images/vm.qcow2 to {DEST} as qcow2")
COPYING = Decision(Phase.COPYING, message="copying")
MIRRORED = Decision(Phase.MIRRORED, message="source and destination are in sync; set "
                    "spec.pivot to switch")
PIVOT_WAITS_FOR_GROUP = Decision(
    Phase.MIRRORED, reason="WaitingForGroup",
    message="the mirror is ready; group g pivots when every member is Mirrored with pivot: "
            "true (vm-vdb is Copying)")
ABORT_WAITS_FOR_GROUP = "group g aborts together, for a copy consistent across its disks: " \
                        "waiting for abort: true on vm-vdb"
NOT_CONVERGING = {"type": "Converging", "status": "False", "reason": "NotConverging",
                  "message": "the copy does not converge: the guest dirties 80 MiB/s while "
                  "20 MiB/s are copied, so it will never be Mirrored as things are"}

COPYING_DISK = disk(MirrorReady.COPYING, 3 * GIB, 10 * GIB)
READY_DISK = disk(MirrorReady.READY, 10 * GIB, 10 * GIB)
KEEP, PIVOT, ABORT = spec_of(), spec_of(pivot=True), spec_of(abort=True)
GROUP_PIVOT = spec_of(pivot=True, group="g")
GROUP_ABORT = spec_of(abort=True, group="g")
COPIED = [Step(STARTED, KEEP, disk=COPYING_DISK), Step(MIRRORED, KEEP, disk=READY_DISK)]


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    spec: Mapping[str, Any]
    verdict: str
    steps: Sequence[Step] = ()  # the agent's writes (none: see ``claimer``)
    claimer: bool = False  # the claimer wrote the status (Pending)
    generation: int | None = None  # metadata.generation (default: the last write's)

    def object(self) -> dict[str, Any]:
        status = claimer_pending(self.spec) if self.claimer else written(self.steps)
        generation = self.generation or (self.steps[-1].generation if self.steps else 1)
        return blockcopy(self.spec, status, generation)

    @property
    def observed(self) -> bool:
        """The status reflects the latest spec (else the verdict is the generation's)."""
        return self.generation is None


CASES = [
    # ---- Pending: no agent took it up yet
    Case("Pending", spec_of(node_name="n2"), PENDING, claimer=True),
    Case("Pending-pivot", spec_of(node_name="n2", pivot=True), PENDING, claimer=True),
    # ---- Queued, Preparing
    Case("Queued", KEEP, PENDING, [Step(Decision(
        Phase.QUEUED, reason="Queued", message="waiting for a free copy slot on this node: "
        "2nd in the queue (at most 4 copies at once, --max-active-copies)"), KEEP)]),
    Case("Queued-pivot", PIVOT, PENDING, [Step(Decision(
        Phase.QUEUED, reason="Queued", message="waiting for a free copy slot on this node: "
        "1st in the queue (at most 4 copies at once, --max-active-copies)"), PIVOT)]),
    Case("Preparing", PIVOT, PENDING, [Step(Decision(
        Phase.PREPARING, Action.PREPARE, reason="Preparing",
        message="creating the destination's backing image first"), PIVOT)]),
    # ---- Copying
    Case("Copying", KEEP, PENDING, [Step(STARTED, KEEP, disk=COPYING_DISK),
                                    Step(COPYING, KEEP, disk=COPYING_DISK)]),
    Case("Copying-pivot", PIVOT, PENDING, [Step(STARTED, PIVOT, disk=COPYING_DISK),
                                           Step(COPYING, PIVOT, disk=COPYING_DISK)]),
    Case("Copying-not-converging", KEEP, PENDING, [
        Step(STARTED, KEEP, disk=COPYING_DISK),
        Step(COPYING, KEEP, disk=COPYING_DISK, extra=[NOT_CONVERGING])]),
    Case("Copying-abort-waiting-for-group", GROUP_ABORT, PENDING, [
        Step(STARTED, spec_of(group="g"), disk=COPYING_DISK),
        Step(Decision(Phase.COPYING, reason="WaitingForGroup", message=ABORT_WAITS_FOR_GROUP),
             GROUP_ABORT, generation=2, disk=COPYING_DISK)]),
    # ---- Mirrored: done only while nothing more is asked
    Case("Mirrored", KEEP, DONE, COPIED),
    Case("Mirrored-pivot-waiting-for-group", GROUP_PIVOT, PENDING, [
        Step(STARTED, spec_of(group="g"), disk=COPYING_DISK),
        Step(MIRRORED, spec_of(group="g"), disk=READY_DISK),
        Step(PIVOT_WAITS_FOR_GROUP, GROUP_PIVOT, generation=2, disk=READY_DISK)]),
    Case("Mirrored-pivot-refused", PIVOT, PENDING, [
        *COPIED,
        Step(refused(Decision(Phase.PIVOTING, Action.PIVOT), Phase.MIRRORED,
                     "internal error: unable to execute QEMU command 'block-job-complete'"),
             PIVOT, generation=2, disk=READY_DISK)]),
    Case("Mirrored-pivot-adopted", PIVOT, PENDING, [
        Step(Decision(Phase.MIRRORED, message="adopted the running block job",
                      reason="Adopted"), PIVOT, disk=READY_DISK)]),
    Case("Mirrored-abort-waiting-for-group", GROUP_ABORT, PENDING, [
        Step(STARTED, spec_of(group="g"), disk=COPYING_DISK),
        Step(MIRRORED, spec_of(group="g"), disk=READY_DISK),
        Step(Decision(Phase.MIRRORED, reason="WaitingForGroup", message=ABORT_WAITS_FOR_GROUP),
             GROUP_ABORT, generation=2, disk=READY_DISK)]),
    Case("Mirrored-pivot-and-abort-waiting-for-group",
         spec_of(pivot=True, abort=True, group="g"), PENDING, [
             Step(STARTED, spec_of(group="g"), disk=COPYING_DISK),
             Step(MIRRORED, spec_of(group="g"), disk=READY_DISK),
             Step(Decision(Phase.MIRRORED, reason="WaitingForGroup",
                           message=ABORT_WAITS_FOR_GROUP),
                  spec_of(pivot=True, abort=True, group="g"), generation=2, disk=READY_DISK)]),
    # ---- Pivoting, Pivoted
    Case("Pivoting", PIVOT, PENDING, [
        *COPIED, Step(Decision(Phase.PIVOTING, Action.PIVOT, message="mirror is ready; "
                               "switching the VM to the destination"), PIVOT, generation=2,
                      disk=READY_DISK)]),
    Case("Pivoted", PIVOT, DONE, [
        *COPIED, Step(Decision(Phase.PIVOTING, Action.PIVOT), PIVOT, 2, READY_DISK),
        Step(Decision(Phase.PIVOTED, reason="Pivoted", message=f"the VM now runs on {DEST}"),
             PIVOT, 2, disk(None))]),
    # ---- Aborting, Aborted
    Case("Aborting", ABORT, PENDING, [
        *COPIED, Step(Decision(Phase.ABORTING, Action.ABORT, message="ending the job on "
                               "user request"), ABORT, 2, READY_DISK)]),
    Case("Aborted", ABORT, DONE, [
        *COPIED, Step(Decision(Phase.ABORTING, Action.ABORT), ABORT, 2, READY_DISK),
        Step(Decision(Phase.ABORTED, reason="Aborted", message=f"job ended after the mirror "
                      f"was ready: {DEST} is a consistent point-in-time copy"), ABORT, 2,
             disk(None))]),
    Case("Aborted-before-start", ABORT, DONE, [Step(Decision(
        Phase.ABORTED, reason="AbortedBeforeStart",
        message="abort was set before the copy started; nothing was copied"), ABORT)]),
    Case("Aborted-pivot-and-abort", spec_of(pivot=True, abort=True), DONE, [
        *COPIED,
        Step(Decision(Phase.ABORTING, Action.ABORT), spec_of(pivot=True, abort=True), 2,
             READY_DISK),
        Step(Decision(Phase.ABORTED, reason="Aborted", message="job ended"),
             spec_of(pivot=True, abort=True), 2, disk(None))]),
    # ---- Failed
    Case("Failed", KEEP, FAILED, [Step(Decision(
        Phase.FAILED, reason="DomainNotRunning",
        message="domain 'vm' is not running; a block copy needs a running VM"), KEEP)]),
    Case("Failed-pivot", PIVOT, FAILED, [
        *COPIED, Step(Decision(Phase.PIVOTING, Action.PIVOT), PIVOT, 2, READY_DISK),
        Step(Decision(Phase.FAILED, reason="PivotFailed", message="the job ended without "
                      "switching to the destination; the VM stays on its source"), PIVOT, 2,
             disk(None))]),
    Case("Failed-abort", ABORT, FAILED, [
        Step(STARTED, KEEP, disk=COPYING_DISK),
        Step(Decision(Phase.FAILED, reason="JobFailed", message="libvirt reported the block "
                      "job failed; the VM stays on its source"), ABORT, 2, disk(None))]),
    # ---- a commit the agent has not taken up yet (status written for generation 1)
    Case("Queued-spec-not-yet-observed", PIVOT, PENDING, [Step(Decision(
        Phase.QUEUED, reason="Queued", message="1st in the queue"), KEEP)], generation=2),
    Case("Copying-spec-not-yet-observed", KEEP, PENDING,
         [Step(STARTED, KEEP, disk=COPYING_DISK)], generation=2),
    Case("Mirrored-pivot-not-yet-observed", PIVOT, PENDING, COPIED, generation=2),
    Case("Mirrored-abort-not-yet-observed", ABORT, PENDING, COPIED, generation=2),
    Case("Mirrored-other-change-not-yet-observed", KEEP, PENDING, COPIED, generation=2),
]


@pytest.fixture(scope="module")
def verdicts(gitops_health) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Case id: (object, {"kstatus": ..., "argocd": ...}), all cases in one run of the tools."""
    objects = [case.object() for case in CASES]
    return {case.id: (obj, result)
            for case, obj, result in zip(CASES, objects, gitops_health(objects), strict=True)}


def conditions_of(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_flux_and_argocd_see_where_the_copy_is(case, verdicts):
    obj, result = verdicts[case.id]
    status = obj["status"]
    kstatus, argocd, _ = EXPECTED[case.verdict]
    seen = (result["kstatus"]["status"], result["argocd"]["status"])
    assert seen == (kstatus, argocd), (case.verdict, result, status.get("conditions"))
    assert not result["kstatus"].get("error") and not result["argocd"].get("error"), result
    # The messages carry the agent's: what is awaited, or what went wrong.
    message = status.get("message") or ""
    if message:
        assert message in result["argocd"]["message"], result
    if not case.observed:
        assert result["kstatus"]["message"] == (
            f"{KIND} generation is {case.generation}, but latest observed generation is "
            f"{status['observedGeneration']}"), result
        assert f"generation {case.generation}" in result["argocd"]["message"], result
    elif case.verdict != DONE:
        assert message and message in result["kstatus"]["message"], result


@pytest.mark.parametrize("case", [c for c in CASES if c.observed],
                         ids=[c.id for c in CASES if c.observed])
def test_conditions_ready_reconciling_stalled(case, verdicts):
    obj, _ = verdicts[case.id]
    status, conditions = obj["status"], conditions_of(obj)
    _, _, (ready, reconciling, stalled) = EXPECTED[case.verdict]
    got = tuple(conditions.get(t, {}).get("status") for t in ("Ready", "Reconciling", "Stalled"))
    assert got == (ready, reconciling, stalled), (case.verdict, status)
    # observedGeneration: the generation acted on, at the top and in every condition.
    generation = obj["metadata"]["generation"]
    assert status["observedGeneration"] == generation, status
    for ctype in ("Ready", "Reconciling", "Stalled"):
        assert conditions[ctype]["observedGeneration"] == generation, conditions[ctype]
    # The True one says why, in the agent's words.
    true = {"Ready": ready, "Reconciling": reconciling, "Stalled": stalled}
    for ctype, value in true.items():
        if value == "True" and case.verdict != DONE:
            assert status["message"] in conditions[ctype]["message"], conditions[ctype]


def test_every_phase_is_covered():
    phases = {case.object()["status"]["phase"] for case in CASES}
    assert phases == {p.value for p in Phase}


def test_a_finished_copy_whose_later_spec_change_is_not_acknowledged(gitops_health):
    """kstatus looks at observedGeneration before any condition: a Pivoted (or Aborted,
    Failed) object edited later stays InProgress for Flux until the agent writes the new
    generation into its status; Argo CD's script calls a finished copy finished."""
    pivoted = written([Step(Decision(Phase.PIVOTED, reason="Pivoted", message="done"), PIVOT,
                            generation=2)])
    obj = blockcopy(PIVOT, pivoted, 3)
    result = gitops_health.one(obj)
    assert result["kstatus"]["status"] == "InProgress", result
    assert result["argocd"]["status"] == "Healthy", result


def test_no_status_yet_is_current_for_kstatus_and_progressing_for_argocd(gitops_health):
    """Before any agent writes a status, kstatus has nothing to go by and calls the object
    Current (no conditions, no observedGeneration); Argo CD's script waits for the agent.
    The claimer's Pending write is what turns Flux's view to InProgress."""
    result = gitops_health.one(blockcopy(KEEP, None, 1))
    assert (result["kstatus"]["status"], result["argocd"]["status"]) == (
        "Current", "Progressing"), result


def test_the_script_needs_no_library_argocd_does_not_open(gitops_health, tmp_path):
    """Argo CD opens only the package, base and table libraries for a health script from
    argocd-cm (os only through require("os"), with time and date): the sandbox of
    gitops-health is that one, and our script gives the same answers with every library
    open (resource.customizations.useOpenLibs)."""
    probe = tmp_path / "probe.lua"
    probe.write_text(
        'local names = {}\n'
        'for _, n in ipairs({"string", "os", "io", "math", "debug", "coroutine", "table",\n'
        '                    "package", "require", "pairs", "tostring"}) do\n'
        '  if _G[n] ~= nil then table.insert(names, n) end\n'
        'end\n'
        'local os_funcs = {}\n'
        'for k, _ in pairs(require("os")) do table.insert(os_funcs, k) end\n'
        'table.sort(os_funcs)\n'
        'return {status = "Healthy", message = table.concat(names, " ") .. "; os: " ..\n'
        '        table.concat(os_funcs, " ")}\n')
    obj = blockcopy(KEEP, None, 1)
    assert gitops_health.one(obj, script=probe)["argocd"]["message"] == \
        "table package require pairs tostring; os: date time"
    objects = [case.object() for case in CASES]
    assert gitops_health(objects) == gitops_health(objects, open_libs=True)
