"""The plan controller: one round per wake-up of a BlockCopyPlan's daemon. Decide (pure:
``core.planning``), act (create children, set pivot, record conflicts), record (the status,
``core.plan_status``, and Events). The Kubernetes API only through ``model.kubeapi.PlanKube``.

The plan's disk set is selected once, in its first round that is not a dry run, and kept in
its status (and in memory); each later round compares the children with it. A disk whose
node has no running agent (its DiskInventory missing, or not updated for ``agent_timeout``
seconds) waits; a disk another BlockCopy holds is reported with that object's name and never
copied; a disk that vanished from its node's inventory is reported and not retried.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import Any

from blockcopy.core import plan_status, planning
from blockcopy.core.planning import Child, PlannedDisk
from blockcopy.core.policy import Policy
from blockcopy.core.progress import ProgressWindow
from blockcopy.model.api import FINALIZER, GROUP, KIND, NODE_LABEL, VERSION, Phase
from blockcopy.model.inventory import NodeInventory
from blockcopy.model.kubeapi import ObjectRef, PlanKube
from blockcopy.model.plan import (
    PLAN_KIND,
    PLAN_LABEL,
    PlanError,
    PlanSpec,
    Retention,
    parse_plan,
)

log = logging.getLogger(__name__)

RUNNING_INTERVAL = 2.0  # s between rounds while copies run (the rate's samples)
INVENTORY_TTL = 10.0  # s: the nodes' inventories are listed at most this often (all plans)
IDLE_INTERVAL = 30.0  # s between rounds of a finished, planned or waiting plan


@dataclasses.dataclass
class PlanState:
    """What the controller keeps about one plan between rounds (kopf's memo holds it)."""

    disks: tuple[PlannedDisk, ...] | None = None
    excluded: tuple[str, ...] = ()
    states: dict[int, tuple[str, str]] = dataclasses.field(default_factory=dict)
    window: ProgressWindow = dataclasses.field(default_factory=ProgressWindow)
    phase: str | None = None
    refused_generation: int | None = None
    written: dict[str, Any] | None = None  # the status last written


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    policy: Policy = dataclasses.field(default_factory=Policy)
    agent_timeout: float = 900.0  # s: an inventory older than this means no agent runs


def _parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def child_of(obj: Mapping[str, Any], plan: str) -> Child | None:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    status = obj.get("status") or {}
    name = str(meta.get("name") or "")
    suffix = name.removeprefix(f"{plan}-")
    if suffix == name or not suffix.isdigit():
        return None
    try:
        phase = Phase(status["phase"]) if status.get("phase") else None
    except ValueError:
        phase = None
    return Child(name=name, index=int(suffix), phase=phase, pivot=spec.get("pivot") is True,
                 node=str(spec.get("nodeName") or ""), abort=spec.get("abort") is True,
                 cur=int(status.get("cur") or 0), end=int(status.get("end") or 0),
                 message=str(status.get("message") or ""))


def child_body(plan: Mapping[str, Any], spec: PlanSpec, disk: PlannedDisk) -> dict[str, Any]:
    """An ordinary BlockCopy, already carrying its node (label, finalizer: no claim needed),
    owned by the plan; its VM's disks form one group that pivots together."""
    meta = plan["metadata"]
    child_spec: dict[str, Any] = {
        "domain": disk.domain, "nodeName": disk.node, "disk": disk.target, "dest": disk.dest,
        "group": planning.group_name(meta["name"], disk.group), "pivot": False,
        "createDirectories": True,
    }
    if spec.format:
        child_spec["format"] = spec.format
    if spec.backing_chain:
        child_spec["backingChain"] = spec.backing_chain.value
    if spec.bandwidth:
        child_spec["bandwidth"] = spec.bandwidth
    if spec.convergence:
        child_spec["convergence"] = spec.convergence.value
    # Only when the plan sets them: an absent verify is not an explicit Sample (a copy whose
    # check cannot be made pivots), so the child must not get one in its place.
    if spec.detect_zeroes is not None:
        child_spec["detectZeroes"] = spec.detect_zeroes
    if spec.verify is not None:
        child_spec["verify"] = spec.verify.value
    if spec.retention is Retention.DELETE:
        child_spec["deleteSourcesUnder"] = spec.source_prefix
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
        "metadata": {
            "name": planning.child_name(meta["name"], disk.index),
            "namespace": meta["namespace"],
            "labels": {PLAN_LABEL: meta["name"], NODE_LABEL: disk.node},
            "finalizers": [FINALIZER],
            "ownerReferences": [{"apiVersion": f"{GROUP}/{VERSION}", "kind": PLAN_KIND,
                                 "name": meta["name"], "uid": meta.get("uid"),
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": child_spec,
    }


class PlanController:
    def __init__(self, kube: PlanKube, config: ControllerConfig, *,
                 clock: Callable[[], float], now: Callable[[], dt.datetime]):
        self.kube, self.config = kube, config
        self.clock, self.now = clock, now
        self.plans: dict[str, PlanState] = {}  # by the plan's uid
        self._inventories: dict[str, NodeInventory] = {}
        self._inventories_at: float | None = None

    async def inventories(self, *, fresh: bool = False) -> dict[str, NodeInventory]:
        """Every node's inventory, listed at most every INVENTORY_TTL seconds for all plans
        together (each may be a megabyte: a round of every plan must not fetch them all);
        ``fresh``: listed now (a plan selecting its disks sees what the nodes hold now)."""
        now = self.clock()
        if fresh or self._inventories_at is None or \
                now - self._inventories_at >= INVENTORY_TTL:
            listed = map(planning.parse_inventory, await self.kube.inventories())
            self._inventories = {i.node_name: i for i in listed if i.node_name}
            self._inventories_at = now
        return self._inventories

    def _state(self, body: Mapping[str, Any]) -> PlanState:
        meta = body["metadata"]
        return self.plans.setdefault(str(meta.get("uid") or meta["name"]), PlanState())

    def forget(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        self.plans.pop(str(meta.get("uid") or meta["name"]), None)

    async def round(self, body: Mapping[str, Any]) -> float:
        """One round; returns the seconds until the next one (unless woken earlier)."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        generation, previous = meta.get("generation"), dict(body.get("status") or {})
        state = self._state(body)
        try:
            spec = parse_plan(body.get("spec"))
        except PlanError as exc:
            await self._refuse(body, state, str(exc))
            return IDLE_INTERVAL
        selecting = state.disks is None and not (previous.get("startTime")
                                                 and previous.get("disks"))
        inventories = await self.inventories(fresh=selecting)
        if state.disks is None and previous.get("startTime") and previous.get("disks"):
            state.disks = tuple(PlannedDisk.from_status(i, d)
                                for i, d in enumerate(previous["disks"]))
            state.excluded = tuple(previous.get("excluded") or ())
            state.states = {i: (d["state"], d.get("message") or "")
                            for i, d in enumerate(previous["disks"]) if d.get("state")}
        disks, selected = state.disks, state.disks is not None
        excluded: tuple[str, ...] = state.excluded
        if disks is None:
            if not inventories:
                disks, excluded = (), ()
            else:
                labels = await self.kube.node_labels() if spec.node_selector else {}
                chosen = planning.select(spec, namespace=namespace,
                                         inventories=inventories.values(), node_labels=labels,
                                         policy=self.config.policy)
                if chosen.too_many:
                    await self._refuse(body, state, "the plan selects more than "
                                       f"{len(chosen.disks)} disks: split it (narrower "
                                       "prefix, domains or nodeSelector)")
                    return IDLE_INTERVAL
                disks, excluded, selected = chosen.disks, chosen.excluded, True
                if not spec.dry_run:
                    state.disks, state.excluded = disks, excluded
            previous.pop("startTime", None)
        children: dict[int, Child] = {}
        if not spec.dry_run:
            for obj in await self.kube.children(namespace, name):
                child = child_of(obj, name)
                if child is not None and child.index < len(disks):
                    children[child.index] = child
            if selected:
                await self._act(body, spec, disks, children, inventories, state)
        status = plan_status.build(
            spec, plan=name, disks=disks, children=children, states=state.states,
            selected=selected, excluded=excluded, generation=generation, previous=previous,
            now=self.now(), window=state.window, clock=self.clock())
        if spec.dry_run or not selected:
            status.pop("startTime", None)
        # The same status again (an idle plan) is not written again.
        if status != state.written:
            await self.kube.patch_plan_status(namespace, name, status)
            state.written = status
        await self._phase_event(body, state, status)
        busy = status["phase"] in (plan_status.PlanPhase.RUNNING,)
        return RUNNING_INTERVAL if busy else IDLE_INTERVAL

    def live_nodes(self, inventories: Mapping[str, NodeInventory]) -> set[str]:
        now = self.now()
        live = set()
        for node, inv in inventories.items():
            updated = _parse_time(inv.updated)
            if updated is not None and (now - updated).total_seconds() <= self.config.agent_timeout:
                live.add(node)
        return live

    async def _act(self, body: Mapping[str, Any], spec: PlanSpec,
                   disks: tuple[PlannedDisk, ...], children: dict[int, Child],
                   inventories: Mapping[str, NodeInventory], state: PlanState) -> None:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        decided = planning.decide(spec, disks, children, states=state.states,
                                  live_nodes=self.live_nodes(inventories),
                                  inventories=inventories)
        for index, (kind, message) in decided.states.items():
            if not kind:
                state.states.pop(index, None)
                continue
            if state.states.get(index, ("", ""))[0] != kind and kind != planning.WAITING:
                await self._event(body, "Warning", kind, message)
            state.states[index] = (kind, message)
        for disk in decided.create:
            held = await self._holder(disk, namespace, name)
            if held is not None:
                message = (f"disk {disk.target} of {disk.domain} on {disk.node} is already "
                           f"copied by BlockCopy {held}: not copied by this plan")
                state.states[disk.index] = (planning.CONFLICT, message)
                await self._event(body, "Warning", "Conflict", message)
                continue
            created = await self.kube.create_copy(namespace, child_body(body, spec, disk))
            children[disk.index] = Child(name=planning.child_name(name, disk.index),
                                         index=disk.index, phase=None, pivot=False,
                                         node=disk.node)
            if created:
                log.info("%s/%s: created %s for %s/%s on %s", namespace, name,
                         children[disk.index].name, disk.domain, disk.target, disk.node)
        for child_name in decided.abort:
            # Giving up its pivot: an Automatic plan may have asked for it already (the group
            # held by the failed disk, say its copy differs), and the API server refuses
            # pivot and abort both true.
            if await self.kube.patch_copy(namespace, child_name,
                                          {"spec": {"abort": True, "pivot": False}}):
                log.info("%s/%s: abort asked of %s (another disk of its VM failed)",
                         namespace, name, child_name)
        for child_name in decided.pivot:
            if await self.kube.patch_copy(namespace, child_name, {"spec": {"pivot": True}}):
                log.info("%s/%s: pivot asked of %s", namespace, name, child_name)

    async def _holder(self, disk: PlannedDisk, namespace: str, plan: str) -> str | None:
        copies = await self.kube.copies_of_domain(disk.domain)
        if disk.uuid and disk.uuid != disk.domain:
            copies += await self.kube.copies_of_domain(disk.uuid)
        return planning.holder(disk, copies, namespace=namespace, plan=plan)

    async def cancel(self, body: Mapping[str, Any]) -> list[str]:
        """The plan is being deleted: delete its children that have not pivoted (their
        agents cancel the jobs, the VMs stay on their sources). Returns their names."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        children = [c for c in map(lambda o: child_of(o, name),
                                   await self.kube.children(namespace, name)) if c]
        names = planning.to_cancel(children)
        for child in names:
            await self.kube.delete_copy(namespace, child)
        self.forget(body)
        return names

    async def _refuse(self, body: Mapping[str, Any], state: PlanState, message: str) -> None:
        meta = body["metadata"]
        generation = meta.get("generation")
        status = plan_status.invalid(message, generation=generation, now=self.now(),
                                     previous=body.get("status") or {})
        await self.kube.patch_plan_status(meta["namespace"], meta["name"], status)
        if state.refused_generation != generation:
            state.refused_generation = generation
            await self._event(body, "Warning", "InvalidPlan", message)

    async def _phase_event(self, body: Mapping[str, Any], state: PlanState,
                           status: Mapping[str, Any]) -> None:
        phase = status["phase"]
        if phase != state.phase:
            if state.phase is not None or phase != plan_status.PlanPhase.PENDING:
                kind = "Warning" if phase == plan_status.PlanPhase.FAILED else "Normal"
                await self._event(body, kind, phase, status.get("message") or phase)
            state.phase = phase

    async def _event(self, body: Mapping[str, Any], type: str, reason: str,
                     message: str) -> None:
        await self.kube.post_event(ObjectRef.of({**body, "kind": PLAN_KIND,
                                                 "apiVersion": f"{GROUP}/{VERSION}"}),
                                   type=type, reason=reason, message=message)
