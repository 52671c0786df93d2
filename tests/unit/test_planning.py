"""core.planning: which disks a plan selects, where they go, which children a round creates
(never above maxActive / maxActivePerNode), which groups pivot, conflicts."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from blockcopy.core import planning
from blockcopy.core.planning import Child, PlannedDisk, parse_inventory
from blockcopy.core.policy import Policy, Rule
from blockcopy.model.api import Phase
from blockcopy.model.inventory import NodeInventory
from blockcopy.model.plan import PLAN_LABEL, parse_plan
from support.plan_fakes import domain, inventory


def plan_spec(**kw):
    return parse_plan({"source": {"pathPrefix": "/src", **kw.pop("source", {})},
                       "destination": {"pathPrefix": "/dst"}, **kw})


def inventories(*objs) -> list[NodeInventory]:
    return [parse_inventory(o) for o in objs]


INVS = inventories(
    inventory("n1", [domain("web", {"vda": "/src/web/a.qcow2", "vdb": "/src/web/b.qcow2",
                                    "vdc": "/other/web-c.qcow2"}),
                     domain("db", {"vda": "/src/db.qcow2"}, state="Stopped")]),
    inventory("n2", [domain("web", {"vda": "/src/web/a.qcow2"}, uuid="u-2"),
                     domain("cache", {"vda": "/srcs/cache.qcow2", "vdb": "/src"})]),
)


def test_selection_by_prefix_keeps_the_path_below_it():
    chosen = planning.select(plan_spec(), namespace="ns", inventories=INVS, node_labels={},
                             policy=Policy())
    got = [(d.node, d.domain, d.target, d.source, d.dest, d.group) for d in chosen.disks]
    assert got == [
        ("n1", "web", "vda", "/src/web/a.qcow2", "/dst/web/a.qcow2", 0),
        ("n1", "web", "vdb", "/src/web/b.qcow2", "/dst/web/b.qcow2", 0),
        # the same domain name on another node: a disk (and a group) of its own
        ("n2", "web", "vda", "/src/web/a.qcow2", "/dst/web/a.qcow2", 1),
    ]
    assert [d.index for d in chosen.disks] == [0, 1, 2]
    # outside the prefix (vdc, /srcs, the prefix itself): left alone, not even mentioned;
    # a stopped domain's disk under it: reported
    assert chosen.excluded == ("n1/db: not running (Stopped)",)


def test_selection_by_domains_nodes_and_policy():
    chosen = planning.select(plan_spec(source={"domains": ["w*"]}), namespace="ns",
                             inventories=INVS, node_labels={}, policy=Policy())
    assert {d.domain for d in chosen.disks} == {"web"}
    chosen = planning.select(
        plan_spec(source={"nodeSelector": {"matchLabels": {"rack": "r2"}}}), namespace="ns",
        inventories=INVS, node_labels={"n1": {"rack": "r1"}, "n2": {"rack": "r2"}},
        policy=Policy())
    assert {d.node for d in chosen.disks} == {"n2"}
    # A node selector and a node without a Node object: not selected.
    chosen = planning.select(
        plan_spec(source={"nodeSelector": {"matchLabels": {"rack": "r2"}}}), namespace="ns",
        inventories=INVS, node_labels={}, policy=Policy())
    assert chosen.disks == ()
    # The tenant policy: a namespace sees only the domains its rules name.
    policy = Policy((Rule(("team-a",), ("db*", "cache"), None, ("/dst",)),))
    chosen = planning.select(plan_spec(), namespace="team-a", inventories=INVS,
                             node_labels={}, policy=policy)
    assert chosen.disks == () and chosen.excluded == ("n1/db: not running (Stopped)",)
    assert planning.select(plan_spec(), namespace="team-b", inventories=INVS, node_labels={},
                           policy=policy) == planning.Selection((), ())


def test_too_many_disks():
    many = inventories(inventory("n1", [domain(f"vm{i}", {"vda": f"/src/{i}.qcow2"})
                                        for i in range(2001)]))
    chosen = planning.select(plan_spec(), namespace="ns", inventories=many, node_labels={},
                             policy=Policy())
    assert chosen.too_many and len(chosen.disks) == 2000


def disks(per_node: dict[str, list[int]]) -> list[PlannedDisk]:
    """Disks on nodes; per node a list of VM sizes (disks per VM)."""
    out: list[PlannedDisk] = []
    group = 0
    for node, vms in per_node.items():
        for n in vms:
            for t in range(n):
                out.append(PlannedDisk(len(out), node, f"vm{group}", f"u{group}", f"vd{t}",
                                       f"/src/{group}/{t}", f"/dst/{group}/{t}", 100, group))
            group += 1
    return out


def live(d):
    return {x.node for x in d}


def test_limits_in_a_round():
    ds = disks({"n1": [2, 1], "n2": [1], "n3": [1]})
    spec = plan_spec(maxActive=2, maxActivePerNode=1)
    first = planning.decide(spec, ds, {}, states={}, live_nodes=live(ds), inventories={})
    assert [d.index for d in first.create] == [0, 3]  # one per node, two in all
    children = {d.index: Child(f"p-{d.index}", d.index, None, False, d.node)
                for d in first.create}
    assert planning.decide(spec, ds, children, states={}, live_nodes=live(ds),
                           inventories={}).create == ()
    # The first disk Mirrored: room on n1; its VM's other disk goes first.
    children[0] = Child("p-0", 0, Phase.MIRRORED, False, "n1")
    nxt = planning.decide(spec, ds, children, states={}, live_nodes=live(ds), inventories={})
    assert [d.index for d in nxt.create] == [1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(1, 3), min_size=0, max_size=4), min_size=1, max_size=4),
       st.integers(1, 5), st.integers(1, 3), st.randoms())
def test_limits_never_exceeded(layout, max_active, per_node, rnd):
    ds = disks({f"n{i}": vms for i, vms in enumerate(layout)})
    spec = plan_spec(maxActive=max_active, maxActivePerNode=per_node, pivot="Automatic")
    children: dict[int, Child] = {}
    # The agents move children forward only (None, Queued, Copying, Mirrored, an end).
    forward = {None: [Phase.QUEUED, Phase.COPYING, Phase.FAILED],
               Phase.QUEUED: [Phase.COPYING], Phase.COPYING: [Phase.MIRRORED, Phase.FAILED],
               Phase.MIRRORED: [Phase.PIVOTED, Phase.ABORTED]}
    for _ in range(200):
        for i, c in list(children.items()):
            if rnd.random() < 0.3 and c.phase in forward:
                children[i] = Child(c.name, i, rnd.choice(forward[c.phase]), c.pivot, c.node)
        decided = planning.decide(spec, ds, children, states={}, live_nodes=live(ds),
                                  inventories={})
        for d in decided.create:
            children[d.index] = Child(f"p-{d.index}", d.index, None, False, d.node)
        act = planning.active(children.values())
        assert len(act) <= max_active
        for node, group in itertools.groupby(sorted(c.node for c in act)):
            assert len(list(group)) <= per_node, node
        broken = {ds[c.index].group for c in children.values()
                  if c.phase in (Phase.FAILED, Phase.ABORTED)}
        if all(d.index in children or d.group in broken for d in ds):
            break
    # Every disk got its child in the end, but those of a VM one of whose disks failed.
    assert all(d.index in children or d.group in broken for d in ds)


def test_waiting_vanished_and_cleared():
    ds = disks({"n1": [1], "n2": [1]})
    spec = plan_spec()
    inv = {"n2": parse_inventory(inventory("n2", [domain("vm1", {"vd0": "/src/moved"},
                                                         uuid="u1")]))}
    decided = planning.decide(spec, ds, {}, states={}, live_nodes={"n2"}, inventories=inv)
    assert decided.create == ()
    assert decided.states[0][0] == planning.WAITING and "node n1" in decided.states[0][1]
    assert decided.states[1][0] == planning.VANISHED and "/src/moved" in decided.states[1][1]
    # Final states stay; a waiting disk whose node came back is cleared and created.
    again = planning.decide(spec, ds, {}, states={0: decided.states[0], 1: decided.states[1]},
                            live_nodes={"n1", "n2"}, inventories=inv)
    assert [d.index for d in again.create] == [0] and again.states == {0: ("", "")}


def test_groups_pivot_together_when_all_mirrored():
    ds = disks({"n1": [2, 1]})
    auto, manual = plan_spec(pivot="Automatic"), plan_spec()
    kids = {0: Child("p-0", 0, Phase.MIRRORED, False, "n1")}
    assert planning.pivots(auto, ds, kids, {}, {}) == []  # vd1 of vm0 has no child yet
    kids[1] = Child("p-1", 1, Phase.COPYING, False, "n1")
    assert planning.pivots(auto, ds, kids, {}, {}) == []
    kids[1] = Child("p-1", 1, Phase.MIRRORED, False, "n1")
    kids[2] = Child("p-2", 2, Phase.MIRRORED, True, "n1")
    assert planning.pivots(auto, ds, kids, {}, {}) == ["p-0", "p-1"]  # p-2 asked already
    assert planning.pivots(manual, ds, kids, {}, {}) == []
    # A member that will never get a child does not hold the group back.
    del kids[1]
    assert planning.pivots(auto, ds, kids, {1: (planning.CONFLICT, "x")}, {}) == ["p-0"]


def test_cancel_keeps_pivoted_children():
    kids = [Child("a", 0, Phase.PIVOTED, True, "n"), Child("b", 1, Phase.MIRRORED, False, "n"),
            Child("c", 2, None, False, "n"), Child("d", 3, Phase.FAILED, False, "n")]
    assert planning.to_cancel(kids) == ["b", "c", "d"]


def test_holder_names_the_other_object():
    disk = disks({"n1": [1]})[0]

    def bc(name, spec, status=None, labels=None, ns="ns"):
        return {"metadata": {"namespace": ns, "name": name, "labels": labels or {}},
                "spec": spec, "status": status or {}}

    same = {"domain": "vm0", "disk": "vd0", "nodeName": "n1"}
    assert planning.holder(disk, [bc("p-0000", same, labels={PLAN_LABEL: "p"})],
                           namespace="ns", plan="p") is None  # its own child
    assert planning.holder(disk, [bc("hand", same)], namespace="ns", plan="p") == "ns/hand"
    assert planning.holder(disk, [bc("q-0001", same, labels={PLAN_LABEL: "q"}, ns="o")],
                           namespace="ns", plan="p") == "o/q-0001 (plan o/q)"
    # by uuid and source path, claimed (status.nodeName) too
    other = {"domain": "u0", "disk": "/src/0/0"}
    assert planning.holder(disk, [bc("h2", other, {"nodeName": "n1"})], namespace="ns",
                           plan="p") == "ns/h2"
    # ended, or on another node: not a holder
    assert planning.holder(disk, [bc("old", same, {"phase": "Pivoted"}),
                                  bc("far", {**same, "nodeName": "n2"})],
                           namespace="ns", plan="p") is None


def test_names():
    assert planning.child_name("p", 7) == "p-0007"
    assert len(planning.group_name("x" * 52, 9999)) <= 63


def test_a_failed_disk_aborts_its_vms_other_disks_and_skips_the_rest():
    ds = disks({"n1": [3]})
    spec = plan_spec(pivot="Automatic", maxActive=5, maxActivePerNode=5)
    kids = {0: Child("p-0", 0, Phase.FAILED, False, "n1"),
            1: Child("p-1", 1, Phase.MIRRORED, False, "n1")}
    decided = planning.decide(spec, ds, kids, states={}, live_nodes={"n1"}, inventories={})
    assert decided.create == () and decided.pivot == ()
    assert decided.abort == ("p-1",)
    assert decided.states[2][0] == planning.GROUP_FAILED and "p-0" in decided.states[2][1]
    kids[1] = Child("p-1", 1, Phase.MIRRORED, False, "n1", abort=True)
    assert planning.decide(spec, ds, kids, states={}, live_nodes={"n1"},
                           inventories={}).abort == ()
