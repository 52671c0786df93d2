"""``move`` without ``--disk``: the VM's node and disks from the node inventories the agents
publish (DiskInventory, cluster-scoped, one per node), so that the plugin works from any
machine, without libvirt. Pure: the inventories come in as plain objects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from blockcopy.kubectl.errors import NOT_FOUND, USAGE, InventoryCannotTell, PluginError
from blockcopy.kubectl.manifests import Disk
from blockcopy.model.inventory import (
    DiskType,
    DomainState,
    InventoryDomain,
    NodeInventory,
    parse_inventory,
)


def parsed(objects: Sequence[Mapping[str, Any]]) -> list[NodeInventory]:
    """DiskInventory objects as the API server returns them, by node name (the object's
    name is the node's)."""
    out = []
    for obj in objects:
        inv = parse_inventory(obj.get("status") or {})
        if not inv.node_name:
            inv = NodeInventory(node_name=obj["metadata"]["name"], updated=inv.updated,
                                domains=inv.domains, domain_count=inv.domain_count,
                                truncated=inv.truncated)
        out.append(inv)
    return sorted(out, key=lambda i: i.node_name)


def find_domain(inventories: Sequence[NodeInventory], domain: str, node: str | None
                ) -> tuple[NodeInventory, InventoryDomain]:
    """(the node's inventory, the domain) for ``domain`` (a name or a UUID), on ``node`` or
    on any node. A name found on two nodes is ambiguous (PluginError, USAGE: give --node);
    not found: InventoryCannotTell (saying which inventories were looked at)."""
    if node is not None:
        inventories = [i for i in inventories if i.node_name == node]
    hits = [(inv, dom) for inv in inventories if (dom := inv.find(domain)) is not None]
    if len(hits) > 1:
        nodes = ", ".join(inv.node_name for inv, _ in hits)
        raise PluginError(f"domain {domain!r} is on several nodes ({nodes}): say which with "
                          "--node", USAGE)
    if hits:
        return hits[0]
    where = f"node {node!r}" if node is not None else \
        f"{len(inventories)} node{'' if len(inventories) == 1 else 's'}"
    truncated = [i.node_name for i in inventories if i.truncated]
    more = (f"; the inventory of {', '.join(truncated)} is truncated (too many domains): "
            "name the disks with --disk and the node with --node") if truncated else ""
    raise InventoryCannotTell(f"no domain {domain!r} in the node inventory of {where}{more}",
                              NOT_FOUND)


def disks_to_move(inv: NodeInventory, dom: InventoryDomain) -> list[Disk]:
    """The domain's disks as ``move`` names their destinations (a network source has no
    file name to keep). A domain that is not running cannot be copied live: refused."""
    if dom.state not in (DomainState.RUNNING, DomainState.PAUSED):
        raise PluginError(f"domain {dom.name!r} on node {inv.node_name!r} is "
                          f"{str(dom.state).lower()} (as of {inv.updated or 'unknown'}): a "
                          "block copy needs it running", NOT_FOUND)
    return [Disk(d.target, d.source if d.type is not DiskType.NETWORK else None, d.format)
            for d in dom.disks]
