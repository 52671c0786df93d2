"""The plugin's subcommands: move, list, status, pivot, abort, wait."""

from __future__ import annotations

import argparse
import posixpath
import shlex
import sys
from typing import Any

import yaml

from blockcopy.kubectl import output, watching
from blockcopy.kubectl.cluster import Cluster, select
from blockcopy.kubectl.errors import (
    NOT_FOUND,
    OK,
    USAGE,
    InventoryCannotTell,
    PluginError,
)
from blockcopy.kubectl.inventory import disks_to_move, find_domain, parsed
from blockcopy.kubectl.manifests import Disk, manifests
from blockcopy.kubectl.names import GROUP_LABEL, RESOURCE, TERMINAL
from blockcopy.kubectl.text import group_of, phase_of
from blockcopy.model.api import SpecError, parse_bandwidth


def domain_disks(cluster: Cluster | None, domain: str, node: str | None
                 ) -> tuple[str, str, list[Disk]]:
    """(the domain's name, its node, its disks), as the agents publish them in the API server
    (the node inventories); InventoryCannotTell when no inventory describes the domain."""
    if cluster is None:
        raise InventoryCannotTell("the node inventories were not read (--dry-run with -n and "
                                  "--disk works offline)")
    inv, dom = find_domain(parsed(cluster.inventories(node)), domain, node)
    return dom.name, inv.node_name, disks_to_move(inv, dom)


def out(text: str = "") -> None:
    print(text, flush=True)


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_move(args: argparse.Namespace, cluster: Cluster, namespace: str) -> int:
    to_dir = posixpath.normpath(args.to)
    if not posixpath.isabs(args.to):
        raise PluginError(f"--to must be an absolute directory, not {args.to!r}", USAGE)
    if args.bandwidth is not None:
        try:
            parse_bandwidth(args.bandwidth)
        except SpecError as exc:
            raise PluginError(f"--bandwidth: {exc}", USAGE) from None
    wanted = list(dict.fromkeys(t for item in args.disk or [] for t in item.split(",") if t))
    bad = [t for t in wanted if "/" in t]
    if bad:
        raise PluginError(f"--disk takes disk targets such as vda, not paths: {bad[0]}", USAGE)
    domain, node = args.vm, args.node
    if wanted:
        # The node inventory, when readable, tells the node, the sources (destination names)
        # and typos.
        try:
            domain_name, node_name, found = domain_disks(cluster, args.vm, args.node)
        except InventoryCannotTell as exc:
            note(f"note: {exc}: destinations are named {args.vm}-<disk>.qcow2")
            disks = [Disk(t) for t in wanted]
        else:
            known = {d.target: d for d in found}
            missing = [t for t in wanted if t not in known]
            if missing:
                raise PluginError(f"domain {domain_name!r} has no disk {missing[0]!r} (its "
                                  f"disks: {', '.join(known) or 'none'})", NOT_FOUND)
            domain, node, disks = domain_name, node_name, [known[t] for t in wanted]
    else:
        try:
            domain, node, disks = domain_disks(cluster, args.vm, args.node)
        except InventoryCannotTell as exc:
            raise PluginError(f"{exc}{exc.HINT}", exc.code) from None
        if not disks:
            raise PluginError(f"domain {domain!r} on node {node!r} has no disks to copy",
                              NOT_FOUND)
    group = args.group or domain
    bodies = manifests(domain=domain, disks=disks, to_dir=to_dir, group=group, node=node,
                       pivot=args.pivot, bandwidth=args.bandwidth, namespace=namespace,
                       prefix=args.prefix)
    if args.dry_run:
        out(yaml.safe_dump_all(bodies, sort_keys=False).rstrip())
        return OK
    for body in bodies:  # all or none: the server checks every object before one is made
        try:
            cluster.create(body, dry_run=True)
        except PluginError as exc:
            if exc.status == 409:
                raise PluginError(f"{exc} (delete it first, or name the new ones with "
                                  "--prefix); nothing was created") from None
            raise PluginError(f"{exc}; nothing was created", exc.code) from None
    pruned = False
    for body in bodies:
        made = cluster.create(body, dry_run=False)
        pruned |= (made.get("spec") or {}).get("group") != group
        spec = body["spec"]
        out(f"{RESOURCE}/{body['metadata']['name']} created ({spec['domain']} "
            f"{spec['disk']} -> {spec['dest']})")
    if pruned:
        note("warning: the API server dropped spec.group (its BlockCopy CRD predates copy "
             "groups): the copies pivot one by one; the label "
             f"{GROUP_LABEL}={group} still groups them for this plugin")
    which = f"-n {shlex.quote(namespace)} --group {shlex.quote(group)}"
    out(f"group {group!r}: follow with `kubectl blockcopy list {which}`" +
        ("" if args.pivot else
         f"; switch once Mirrored with `kubectl blockcopy pivot {which}`"))
    return OK


def cmd_list(args: argparse.Namespace, cluster: Cluster, namespace: str) -> int:
    if args.watch:
        return watching.cmd_list_watch(args, cluster, namespace, out)
    every = args.all_namespaces
    objects = cluster.objects(None if every else namespace)
    if args.group is not None:
        objects = [o for o in objects if group_of(o) == args.group]
    return show(args, objects, namespaces=every, message=False,
                empty="No BlockCopies found" + ("" if every else f" in {namespace} namespace")
                + (f" in group {args.group!r}" if args.group is not None else "") + ".")


def cmd_status(args: argparse.Namespace, cluster: Cluster, namespace: str) -> int:
    if args.watch:
        return watching.cmd_status_watch(args, cluster, namespace, out)
    objects = select(cluster, namespace, args.names, args.group)
    return show(args, objects, namespaces=False, message=True, empty="")


def show(args: argparse.Namespace, objects: list[dict[str, Any]], *, namespaces: bool,
         message: bool, empty: str) -> int:
    text = output.render(args.output, objects, namespaces=namespaces, message=message)
    if text:
        out(text)
    elif args.output in ("table", "wide") and empty:
        note(empty)
    return OK


def cmd_set(field: str, args: argparse.Namespace, cluster: Cluster, namespace: str) -> int:
    """pivot / abort: set spec.<field> true on each selected object that can still use it."""
    for obj in select(cluster, namespace, args.names, args.group):
        name, phase = obj["metadata"]["name"], phase_of(obj)
        if (obj.get("spec") or {}).get(field) is True:
            out(f"{RESOURCE}/{name} unchanged (spec.{field} is already true; phase {phase or '-'})")
        elif phase in TERMINAL:
            out(f"{RESOURCE}/{name} not patched: it is already {phase}, nothing to {field}")
        elif field == "abort" and (obj.get("spec") or {}).get("pivot") is True:
            # The CRD refuses pivot and abort both true: aborting gives up the pivot.
            cluster.patch_spec(namespace, name, {"abort": True, "pivot": False})
            out(f"{RESOURCE}/{name} patched (spec.abort: true, spec.pivot: false; "
                f"phase {phase or '-'})")
        else:
            cluster.patch_spec(namespace, name, {field: True})
            out(f"{RESOURCE}/{name} patched (spec.{field}: true; phase {phase or '-'})")
    return OK


def cmd_wait(args: argparse.Namespace, cluster: Cluster, namespace: str) -> int:
    """Through a watch (blockcopy.kubectl.watching), not by polling."""
    return watching.cmd_wait(args, cluster, namespace, out=out, note=note)
