"""A BlockCopyPlan's decisions: which disks it selects from the nodes' inventories (once, when
it starts: the set is then fixed and kept in its status), and, on every round, which children
(BlockCopies) to create now and which groups to pivot.

- Selection: running domains' file and block disks whose active image lies below
  ``source.pathPrefix``, of the domains ``source.domains`` matches (globs), on the nodes
  ``source.nodeSelector`` picks, and that the plan's namespace may touch (the tenant policy's
  ``may_see``). The destination keeps the path below the source prefix.
- Limits: a child counts as active from its creation until it is Mirrored (or ends); never
  more than ``maxActive`` in the plan nor ``maxActivePerNode`` on a node are active, so a
  child is created only when both have room, counting what the round creates itself.
- Groups: all disks of one VM form a disk group (``spec.group``); its children are created
  with ``pivot: false`` and get ``pivot: true`` together once each is Mirrored (Automatic
  plans), so the agent pivots them together.

Pure: the caller lists the inventories and the children and acts on the result.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from blockcopy.core.policy import Policy
from blockcopy.model import inventory
from blockcopy.model.api import Phase
from blockcopy.model.inventory import DiskType, DomainState, InventoryDisk, NodeInventory
from blockcopy.model.plan import MAX_DISKS, PLAN_LABEL, PivotMode, PlanSpec, inside

# Before Mirrored: a child in these phases (or without a phase yet) may copy at any moment.
ACTIVE_PHASES = frozenset({None, Phase.PENDING, Phase.QUEUED, Phase.PREPARING, Phase.COPYING})
# A disk in these states gets no child (recorded in status.disks[].state).
WAITING = "Waiting"  # its node has no agent running (transient)
CONFLICT = "Conflict"  # another BlockCopy holds the disk (final)
VANISHED = "Vanished"  # its VM or disk is gone, or it moved out of the prefix (final)
GROUP_FAILED = "GroupFailed"  # another disk of its VM failed: the VM stays on its sources
FINAL_STATES = frozenset({CONFLICT, VANISHED, GROUP_FAILED})
# A child in these phases failed its VM's move: the other disks of the VM do not pivot.
BROKEN = frozenset({Phase.FAILED, Phase.ABORTED, Phase.ABORTING})


@dataclasses.dataclass(frozen=True)
class PlannedDisk:
    """One disk of the plan's fixed set; ``index`` its place in it (names its child)."""

    index: int
    node: str
    domain: str
    uuid: str
    target: str
    source: str
    dest: str
    bytes: int
    group: int  # the VM's number in the plan (all its disks: one disk group)

    def to_status(self) -> dict[str, Any]:
        return {"node": self.node, "domain": self.domain, "uuid": self.uuid,
                "disk": self.target, "source": self.source, "destination": self.dest,
                "bytes": self.bytes, "group": self.group}

    @classmethod
    def from_status(cls, index: int, raw: Mapping[str, Any]) -> PlannedDisk:
        return cls(index=index, node=str(raw["node"]), domain=str(raw["domain"]),
                   uuid=str(raw.get("uuid") or ""), target=str(raw["disk"]),
                   source=str(raw["source"]), dest=str(raw["destination"]),
                   bytes=int(raw.get("bytes") or 0), group=int(raw.get("group") or 0))


def parse_inventory(obj: Mapping[str, Any]) -> NodeInventory:
    """A DiskInventory object (cluster-scoped, named after its node)."""
    inv = inventory.parse_inventory(obj.get("status") or {})
    if not inv.node_name:
        inv = dataclasses.replace(inv, node_name=str((obj.get("metadata") or {}).get("name")
                                                     or ""))
    return inv


def find(inv: NodeInventory, disk: PlannedDisk) -> InventoryDisk | None:
    """The planned disk in a node's inventory now (its domain by UUID, else by name)."""
    domain = inv.find(disk.uuid or disk.domain)
    return domain.disk(disk.target) if domain is not None else None


def destination(source: str, spec: PlanSpec) -> str:
    """The source's path below the source prefix, below the destination prefix."""
    rest = posixpath.normpath(source)[len(spec.source_prefix):].lstrip("/")
    return posixpath.join(spec.dest_prefix, rest)


@dataclasses.dataclass(frozen=True)
class Selection:
    disks: tuple[PlannedDisk, ...]
    excluded: tuple[str, ...]  # why disks under the prefix were not selected (bounded)
    too_many: bool = False


def select(spec: PlanSpec, *, namespace: str, inventories: Iterable[NodeInventory],
           node_labels: Mapping[str, Mapping[str, str]], policy: Policy) -> Selection:
    disks: list[PlannedDisk] = []
    excluded: list[str] = []
    groups = 0
    for inv in sorted(inventories, key=lambda i: i.node_name):
        node = inv.node_name
        if spec.node_selector is not None and (
                node not in node_labels or not spec.node_selector.matches(node_labels[node])):
            continue
        for dom in sorted(inv.domains, key=lambda d: (d.name, d.uuid)):
            if spec.domains and not any(fnmatch.fnmatchcase(dom.name, p) for p in spec.domains):
                continue
            under = [d for d in dom.disks
                     if d.source and d.type in (DiskType.FILE, DiskType.BLOCK)
                     and inside(posixpath.normpath(d.source), spec.source_prefix)
                     and posixpath.normpath(d.source) != spec.source_prefix]
            if not under:
                continue
            if not policy.may_see(namespace=namespace, domain=dom.name, tenant=None):
                continue  # not even named: the namespace may not learn it exists
            if dom.state is not DomainState.RUNNING:
                excluded.append(f"{node}/{dom.name}: not running ({dom.state.value})")
                continue
            for d in sorted(under, key=lambda d: d.target):
                source = posixpath.normpath(str(d.source))
                disks.append(PlannedDisk(
                    index=len(disks), node=node, domain=dom.name, uuid=dom.uuid,
                    target=d.target, source=source, dest=destination(source, spec),
                    bytes=d.virtual_size or 0, group=groups))
            groups += 1
    return Selection(tuple(disks[:MAX_DISKS]), tuple(excluded[:50]),
                     too_many=len(disks) > MAX_DISKS)


def child_name(plan: str, index: int) -> str:
    """The child of the plan's disk ``index`` (plan names are at most 63 characters)."""
    return f"{plan}-{index:04d}"


def group_name(plan: str, group: int) -> str:
    """spec.group of a VM's children: at most 63 characters."""
    return f"{plan[:52]}-vm{group:04d}"


@dataclasses.dataclass(frozen=True)
class Child:
    """What a round needs of an existing child."""

    name: str
    index: int
    phase: Phase | None
    pivot: bool
    node: str
    abort: bool = False
    cur: int = 0  # bytes copied, as the child's status says
    end: int = 0
    message: str = ""


@dataclasses.dataclass(frozen=True)
class Round:
    create: tuple[PlannedDisk, ...]  # in this order, each only if still free of conflicts
    pivot: tuple[str, ...]  # children to set pivot: true
    abort: tuple[str, ...]  # children to set abort: true (another disk of their VM failed)
    states: dict[int, tuple[str, str]]  # disk index -> (state, message), new this round


def active(children: Iterable[Child]) -> list[Child]:
    return [c for c in children if c.phase in ACTIVE_PHASES]


def decide(spec: PlanSpec, disks: Sequence[PlannedDisk], children: Mapping[int, Child], *,
           states: Mapping[int, tuple[str, str]], live_nodes: set[str],
           inventories: Mapping[str, NodeInventory]) -> Round:
    """One round: new per-disk states, the children to create (within both limits) and the
    children to pivot."""
    new_states: dict[int, tuple[str, str]] = {}
    running = active(children.values())
    per_node: dict[str, int] = {}
    for child in running:
        per_node[child.node] = per_node.get(child.node, 0) + 1
    total = len(running)
    started_groups = {disks[c.index].group for c in children.values() if c.index < len(disks)}
    broken = {disks[c.index].group: c for c in children.values()
              if c.index < len(disks) and c.phase in BROKEN}
    # Disks of VMs already under way first: their group pivots sooner.
    order = sorted((d for d in disks if d.index not in children),
                   key=lambda d: (d.group not in started_groups, d.index))
    create: list[PlannedDisk] = []
    for disk in order:
        state = states.get(disk.index)
        if state is not None and state[0] in FINAL_STATES:
            continue
        if disk.group in broken:
            new_states[disk.index] = (GROUP_FAILED, f"not copied: {broken[disk.group].name} "
                                      f"(another disk of {disk.domain}) ended "
                                      f"{broken[disk.group].phase}, and all disks of a VM "
                                      "pivot together")
            continue
        if disk.node not in live_nodes:
            new_states[disk.index] = (WAITING, f"waiting for node {disk.node}: no agent runs "
                                      "there (its inventory is missing or stale)")
            continue
        inv = inventories.get(disk.node)
        now = find(inv, disk) if inv is not None else None
        if inv is not None and (now is None or now.source is None
                                or posixpath.normpath(now.source) != disk.source):
            where = "is gone" if now is None else f"is now on {now.source}"
            new_states[disk.index] = (VANISHED, f"disk {disk.target} of {disk.domain} on "
                                      f"{disk.node} {where}: not copied")
            continue
        if state is not None:
            new_states[disk.index] = ("", "")  # no longer waiting
        if total >= spec.max_active or per_node.get(disk.node, 0) >= spec.max_active_per_node:
            continue
        create.append(disk)
        total += 1
        per_node[disk.node] = per_node.get(disk.node, 0) + 1
    aborts = tuple(c.name for c in children.values()
                   if c.index < len(disks) and disks[c.index].group in broken
                   and c.phase not in BROKEN and c.phase not in (Phase.PIVOTED, Phase.PIVOTING)
                   and not c.abort)
    return Round(tuple(create), tuple(pivots(spec, disks, children, states, new_states)),
                 aborts, new_states)


def pivots(spec: PlanSpec, disks: Sequence[PlannedDisk], children: Mapping[int, Child],
           states: Mapping[int, tuple[str, str]],
           new_states: Mapping[int, tuple[str, str]]) -> list[str]:
    """Automatic plans: the children of every VM whose disks all have a child, each Mirrored
    (disks that will never get one, Vanished or Conflict, do not hold the others back); not
    a VM one of whose children failed (the others are aborted)."""
    if spec.pivot is not PivotMode.AUTOMATIC:
        return []
    members: dict[int, list[PlannedDisk]] = {}
    for disk in disks:
        members.setdefault(disk.group, []).append(disk)
    names: list[str] = []
    for group in members.values():
        waiting = [d for d in group if d.index not in children
                   and {**states, **new_states}.get(d.index, ("", ""))[0] not in FINAL_STATES]
        own = [children[d.index] for d in group if d.index in children]
        if waiting or not own:
            continue
        if any(c.phase in BROKEN for c in own):
            continue  # its other disks abort (decide): the VM stays on its sources
        going = [c for c in own if c.phase not in (Phase.PIVOTED, Phase.PIVOTING)]
        if going and all(c.phase is Phase.MIRRORED for c in going):
            names.extend(c.name for c in going if not c.pivot)
    return names


def to_cancel(children: Iterable[Child]) -> list[str]:
    """When the plan is deleted: every child that has not pivoted (its VM stays on the
    source); pivoted ones stay as they are."""
    return [c.name for c in children if c.phase not in (Phase.PIVOTED, Phase.PIVOTING)]


def holder(disk: PlannedDisk, copies: Iterable[Mapping[str, Any]], *, namespace: str,
           plan: str) -> str | None:
    """Which other BlockCopy (not ended) already copies ``disk``: "namespace/name", with its
    plan when it has one; None when nobody does."""
    for obj in copies:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        status = obj.get("status") or {}
        labels = meta.get("labels") or {}
        if meta.get("namespace") == namespace and labels.get(PLAN_LABEL) == plan:
            continue
        if status.get("phase") in (Phase.PIVOTED, Phase.ABORTED, Phase.FAILED):
            continue
        node = spec.get("nodeName") or status.get("nodeName")
        if node not in (None, disk.node):
            continue
        if spec.get("domain") not in (disk.domain, disk.uuid):
            continue
        if spec.get("disk") not in (disk.target, disk.source) \
                and status.get("source") != disk.source:
            continue
        held = f"{meta.get('namespace')}/{meta.get('name')}"
        other = labels.get(PLAN_LABEL)
        return f"{held} (plan {meta.get('namespace')}/{other})" if other else held
    return None
