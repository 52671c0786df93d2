"""``kubectl blockcopy plan``: BlockCopyPlans (move a pool: many disks, many nodes) from the
command line: create (with a preview), list, status (with the children), pivot, start and
wait. The plan controller does the work; the plugin writes the plan's spec and reads its
status and its children (BlockCopies labelled blockcopy.dev/plan=NAME)."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from collections.abc import Callable
from typing import Any

import yaml

from blockcopy.kubectl import planspec, plantext, watching
from blockcopy.kubectl.cluster import Cluster
from blockcopy.kubectl.errors import NOT_FOUND, NOT_REACHED, OK, PluginError
from blockcopy.kubectl.output import as_list, name_of
from blockcopy.kubectl.plantext import PLAN_RESOURCE, plan_phase
from blockcopy.kubectl.text import format_duration, table
from blockcopy.model.api import PLURAL
from blockcopy.model.plan import PLAN_LABEL, PLAN_PLURAL

Print = Callable[[str], None]
# How `kubectl blockcopy pivot plan/NAME` (and kubectl) name a plan.
PLAN_REFS = ("plan/", "plans/", "bcp/", "blockcopyplan/", "blockcopyplans/",
             f"blockcopyplan.{PLAN_RESOURCE.partition('.')[2]}/", f"{PLAN_RESOURCE}/")

def plan_ref(name: str) -> str | None:
    """NAME of ``plan/NAME`` (or bcp/NAME, blockcopyplans.blockcopy.dev/NAME), else None."""
    for prefix in PLAN_REFS:
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def cmd_plan(args: argparse.Namespace, cluster: Cluster | None, namespace: str, *,
             out: Print, note: Print) -> int:
    if args.plan_command == "create":
        return cmd_create(args, cluster, namespace, out=out)
    assert cluster is not None
    if args.plan_command in ("list", "wait"):
        chosen = cmd_list if args.plan_command == "list" else cmd_wait
        return chosen(args, cluster, namespace, out=out, note=note)
    commands = {"status": cmd_status, "pivot": cmd_pivot, "start": cmd_start}
    return commands[args.plan_command](args, cluster, namespace, out=out)


def cmd_create(args: argparse.Namespace, cluster: Cluster | None, namespace: str, *,
               out: Print) -> int:
    body = planspec.from_args(args, namespace)
    if args.dry_run == "client":
        out(yaml.safe_dump(body, sort_keys=False).rstrip())
        return OK
    assert cluster is not None
    if args.dry_run == "server":
        checked = cluster.create(body, dry_run=True, plural=PLAN_PLURAL)
        (checked.get("metadata") or {}).pop("managedFields", None)
        out(yaml.safe_dump(checked, sort_keys=False).rstrip())
        return OK
    try:
        cluster.create(body, dry_run=False, plural=PLAN_PLURAL)
    except PluginError as exc:
        if exc.status == 409:
            raise PluginError(f"{exc} (delete it first, or choose another name)") from None
        raise
    spec, name = body["spec"], body["metadata"]["name"]
    out(f"{PLAN_RESOURCE}/{name} created ({spec['source']['pathPrefix']} -> "
        f"{spec['destination']['pathPrefix']}, pivot {spec['pivot']}"
        + (", dry run" if spec.get("dryRun") else "") + ")")
    ns = f" -n {shlex.quote(namespace)}"
    then = (f"; start it with `kubectl blockcopy plan start {name}{ns}`" if spec.get("dryRun")
            else f"; once AwaitingPivot, `kubectl blockcopy plan pivot {name}{ns}`"
            if spec["pivot"] == "Manual" else "")
    out(f"follow with `kubectl blockcopy plan status {name}{ns}`{then}")
    return OK


def cmd_list(args: argparse.Namespace, cluster: Cluster, namespace: str, *, out: Print,
             note: Print) -> int:
    every = args.all_namespaces
    plans = cluster.objects(None if every else namespace, PLAN_PLURAL)
    if args.output == "json" or args.output == "yaml":
        out(render_docs(args.output, plans))
    elif args.output == "name":
        if plans:
            out("\n".join(f"{PLAN_RESOURCE}/{p['metadata']['name']}" for p in plans))
    elif plans:
        out(table(*plantext.plan_rows(plans, namespaces=every, wide=args.output == "wide")))
    else:
        note("No BlockCopyPlans found" + ("" if every else f" in {namespace} namespace") + ".")
    return OK


def render_docs(fmt: str, objects: list[dict[str, Any]]) -> str:
    if fmt == "json":
        return json.dumps(as_list(objects), indent=2)
    return yaml.safe_dump(as_list(objects), sort_keys=False).rstrip()


def children_of(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return cluster.objects(namespace, PLURAL, label_selector=f"{PLAN_LABEL}={name}")


def cmd_status(args: argparse.Namespace, cluster: Cluster, namespace: str, *, out: Print
               ) -> int:
    shown = []
    for name in dict.fromkeys(args.names):
        plan = cluster.get(namespace, name, PLAN_PLURAL)
        shown.append((plan, children_of(cluster, namespace, name)))
    if args.output in ("json", "yaml"):
        out(render_docs(args.output, [o for plan, kids in shown for o in (plan, *kids)]))
    elif args.output == "name":
        out("\n".join(line for plan, kids in shown for line in (
            f"{PLAN_RESOURCE}/{plan['metadata']['name']}", *map(name_of, kids))))
    else:
        out("\n\n".join(plantext.status_text(plan, kids, wide=args.output == "wide")
                        for plan, kids in shown))
    return OK


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _patch(cluster: Cluster, namespace: str, names: list[str], field: str, value: Any,
           why_not: Callable[[dict[str, Any]], str | None], out: Print) -> int:
    for name in dict.fromkeys(names):
        plan = cluster.get(namespace, name, PLAN_PLURAL)
        phase = plan_phase(plan) or "-"
        if (plan.get("spec") or {}).get(field, "Manual" if field == "pivot" else False) == \
                value:
            out(f"{PLAN_RESOURCE}/{name} unchanged (spec.{field} is already "
                f"{_shown(value)}; phase {phase})")
        elif (reason := why_not(plan)) is not None:
            out(f"{PLAN_RESOURCE}/{name} not patched: {reason}")
        else:
            cluster.patch_spec(namespace, name, {field: value}, PLAN_PLURAL)
            status = plan.get("status") or {}
            counts = (f", {status.get('mirrored', 0)} of {status['total']} disks mirrored"
                      if "total" in status else "")
            out(f"{PLAN_RESOURCE}/{name} patched (spec.{field}: {_shown(value)}; "
                f"phase {phase}{counts})")
    return OK


def cmd_pivot(args: argparse.Namespace, cluster: Cluster, namespace: str, *, out: Print
              ) -> int:
    """spec.pivot: Automatic: the controller sets pivot on each VM's children together."""
    def why_not(plan: dict[str, Any]) -> str | None:
        phase = plan_phase(plan)
        if phase in plantext.PLAN_TERMINAL:
            return f"it is already {phase}, nothing to pivot"
        if (plan.get("spec") or {}).get("dryRun"):
            return ("it is a dry run (--preview): start it with `kubectl blockcopy plan "
                    f"start {plan['metadata']['name']}`; it then pivots as its spec.pivot says")
        return None
    return _patch(cluster, namespace, args.names, "pivot", "Automatic", why_not, out)


def cmd_start(args: argparse.Namespace, cluster: Cluster, namespace: str, *, out: Print
              ) -> int:
    def why_not(_plan: dict[str, Any]) -> str | None:
        return None
    return _patch(cluster, namespace, args.names, "dryRun", False, why_not, out)


def cmd_wait(args: argparse.Namespace, cluster: Cluster, namespace: str, *, out: Print,
             note: Print) -> int:
    """One list, then one watch of the namespace's plans (of the plan, for one name)."""
    want, deadline = args.plan_phase, time.monotonic() + args.timeout
    names = list(dict.fromkeys(args.names))
    listed, version = watching.listing(cluster, namespace, PLAN_PLURAL)
    current = {o["metadata"]["name"]: o for o in listed if o["metadata"]["name"] in names}
    missing = [n for n in names if n not in current]
    if missing:
        raise PluginError(f"blockcopyplan {missing[0]!r} in namespace {namespace!r}: not "
                          "found", NOT_FOUND)
    done: set[str] = set()
    hinted: set[str] = set()

    def verdict() -> int | None:
        for name, plan in sorted(current.items()):
            if name not in done and plantext.reached(plan, want):
                done.add(name)
                out(f"{PLAN_RESOURCE}/{name} " + ("every disk Mirrored"
                                                  if want == plantext.MIRRORED else want))
            manual = (plan.get("spec") or {}).get("pivot", "Manual") == "Manual"
            if want == "Completed" and plan_phase(plan) == "AwaitingPivot" and manual and \
                    name not in hinted:
                hinted.add(name)
                note(f"note: {name} waits for its pivot: `kubectl blockcopy plan pivot {name}`")
        doomed = [why for p in current.values() if (why := plantext.cannot_reach(p, want))]
        if doomed:
            for why in doomed:
                note(f"error: {why}")
            note(f"error: will never be {want}")
            return NOT_REACHED
        if all(plantext.reached(p, want) for p in current.values()):
            return OK
        return None

    if (code := verdict()) is not None:
        return code
    single = f"metadata.name={names[0]}" if len(names) == 1 else None
    for kind, obj in watching.events(cluster, namespace, version, deadline=deadline,
                                     field_selector=single, plural=PLAN_PLURAL):
        name = obj["metadata"]["name"]
        if name not in names:
            continue
        if kind == "DELETED":
            note(f"error: {name} was deleted")
            return NOT_REACHED
        current[name] = obj
        if (code := verdict()) is not None:
            return code
    waiting = ", ".join(plantext.pending(p) for name, p in sorted(current.items())
                        if not plantext.reached(p, want))
    note(f"error: timed out after {format_duration(args.timeout)} waiting for {want}: "
         f"{waiting}")
    return NOT_REACHED

