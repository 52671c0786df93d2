"""``kubectl blockcopy version``: the plugin's version and every agent's, as the agents
publish it in the API server: each writes ``status.agentVersion`` (with ``status.nodeName``)
into the BlockCopies it handles. A node's DiskInventory (the node inventory) whose status
carries ``agentVersion`` and ``nodeName`` counts too, so that once the inventory writer puts
them there, agents without copies are seen as well; until then they are not."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import yaml

from blockcopy import __version__
from blockcopy.kubectl.cluster import Cluster
from blockcopy.kubectl.errors import OK, PluginError
from blockcopy.kubectl.text import table
from blockcopy.model.api import GROUP, PLURAL, VERSION

DESCRIPTION = ("Print the plugin's version and the version of every agent seen in the API "
               "server: each agent writes it (status.agentVersion) into the BlockCopies it "
               "handles; a DiskInventory whose status carries agentVersion counts too. Every "
               "namespace is read when allowed, else the current one.")
INVENTORY_PLURAL = "diskinventories"  # cluster-scoped, one per node (the node inventory)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--client", action="store_true",
                        help="only the plugin's version (no API server needed)")
    parser.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")


def agents(objects: Iterable[Mapping[str, Any]], inventories: Iterable[Mapping[str, Any]]
           ) -> list[dict[str, Any]]:
    """One entry per (node, version): the node, the agent's version and how many copies
    (BlockCopies whose status it wrote) and inventories show it, sorted by node."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for source, items in (("copies", objects), ("inventory", inventories)):
        for obj in items:
            status = obj.get("status") or {}
            node, version = status.get("nodeName"), status.get("agentVersion")
            if not node or not version:
                continue
            entry = seen.setdefault((str(node), str(version)), {
                "node": str(node), "version": str(version), "copies": 0, "inventory": False})
            if source == "copies":
                entry["copies"] += 1
            else:
                entry["inventory"] = True
    return [seen[k] for k in sorted(seen)]


def _read(cluster: Cluster, namespace: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                     str]:
    """(BlockCopies, DiskInventories, where the copies were read)."""
    try:
        objects, where = cluster.objects(None), "every namespace"
    except PluginError as exc:
        if exc.status != 403:
            raise
        objects, where = cluster.objects(namespace), f"namespace {namespace}"
    try:
        listed = cluster._call("listing DiskInventories", cluster.api.list_cluster_custom_object,
                               GROUP, VERSION, INVENTORY_PLURAL)
        inventories = list(listed.get("items") or [])
    except PluginError as exc:
        if exc.status not in (403, 404) and "does not know" not in str(exc):
            raise
        inventories = []  # no inventory on this server (or not readable): the copies tell
    return objects, inventories, where


def cmd_version(args: argparse.Namespace, cluster: Cluster, namespace: str, *,
                out: Callable[[str], None]) -> int:
    if args.client:
        out(f"Client Version: {__version__}")
        return OK
    objects, inventories, where = _read(cluster, namespace)
    found = agents(objects, inventories)
    if args.output != "table":
        doc = {"clientVersion": __version__, "agents": found}
        out(json.dumps(doc, indent=2) if args.output == "json"
            else yaml.safe_dump(doc, sort_keys=False).rstrip())
        return OK
    out(f"Client Version: {__version__}")
    if not found:
        out(f"Agent Versions: none seen (no BlockCopy in {where} and no DiskInventory carries "
            f"status.agentVersion; an agent writes it with the status of a copy it handles)")
        return OK
    out("Agent Versions:")
    out(table(["NODE", "VERSION", PLURAL.upper(), "INVENTORY"],
              [[a["node"], a["version"], a["copies"], "yes" if a["inventory"] else "-"]
               for a in found]))
    return OK
