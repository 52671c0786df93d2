"""`kubectl blockcopy`: a kubectl plugin (like virtctl for KubeVirt) for BlockCopy objects.

Installed as the console script ``kubectl-blockcopy``; kubectl runs any ``kubectl-*`` on PATH
as ``kubectl *``. It is a client of the API only: it writes spec (never status) and reads
status and the agents' node inventory. Imports: stdlib, kubernetes, yaml and
``blockcopy.model`` (pure names), nothing of the agent and no libvirt.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from blockcopy import __version__
from blockcopy.kubectl import planargs, plans, version
from blockcopy.kubectl.cluster import Cluster
from blockcopy.kubectl.commands import (
    cmd_list,
    cmd_move,
    cmd_set,
    cmd_status,
    cmd_wait,
    note,
    out,
)
from blockcopy.kubectl.errors import EXIT_CODES, USAGE, PluginError
from blockcopy.kubectl.names import PHASES
from blockcopy.kubectl.output import FORMATS
from blockcopy.kubectl.text import canonical_phase, parse_duration

EXAMPLES = """examples:
  kubectl blockcopy move web-1 --to /var/lib/libvirt/images/fast      # every disk, found in
                                                                     # the node inventories
  kubectl blockcopy move web-1 --to /srv/new --disk vda --disk vdb --node hv-07 --bandwidth 100Mi
  kubectl blockcopy list -n vms            (or -A)
  kubectl blockcopy status web-1-vda
  kubectl blockcopy wait --group web-1 --for Mirrored --timeout 30m
  kubectl blockcopy pivot --group web-1    (or: pivot web-1-vda web-1-vdb)
  kubectl blockcopy wait --group web-1 --for Pivoted
  kubectl blockcopy abort web-1-vdb
  kubectl blockcopy status --group web-1 --watch           (-o wide|name|json|yaml)
  kubectl blockcopy version                                (the plugin's and each agent's)
  kubectl blockcopy plan create pool-a --from /srv/a --to /srv/b --dry-run   (a pool: plan -h)
  kubectl blockcopy pivot plan/pool-a                      (= plan pivot pool-a)
"""



def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """kubectl's connection options, accepted before and after the subcommand."""
    default = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("connection (like kubectl)")
    group.add_argument("--kubeconfig", default=default,
                       help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
    group.add_argument("--context", default=default, help="kubeconfig context to use")
    group.add_argument("-n", "--namespace", default=default,
                       help="namespace (default: the context's namespace, else default)")


def _select_args(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"BlockCopies to {verb}")
    parser.add_argument("--group", help=f"{verb} every BlockCopy of this group instead")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl blockcopy",
        description="Live VM disk moves with BlockCopy objects (blockcopy.dev/v1alpha1).",
        epilog=EXAMPLES + "\n" + EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add_to(subs: Any, name: str, help: str, description: str, *, epilog: str = ""
               ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = subs.add_parser(
            name, help=help, description=textwrap.fill(description, 79),
            epilog=(epilog + "\n" if epilog else "") + EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p, top=False)
        return p

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return add_to(sub, name, help, description)

    move = add("move", "create one BlockCopy per disk of a VM, all in one group",
               "Create one BlockCopy per disk of VM, all in one group (default: the VM's "
               "name), each copying the disk to DIR/<file name of its current source> (or "
               "DIR/<vm>-<disk>.qcow2 when two sources share a file name or the source is "
               "unknown). The VM (by name or UUID), its node and its disks (device='disk') "
               "come from the node inventories the agents publish (DiskInventory, readable "
               "with the blockcopy-admin ClusterRole), from any machine: no libvirt needed. "
               "With --disk, the disks are named by hand (and checked against the inventory "
               "when it can be read). The server checks every object (dry run) before any "
               "is created.")
    move.add_argument("vm", metavar="VM", help="libvirt domain name (or UUID)")
    move.add_argument("--to", required=True, metavar="DIR",
                      help="absolute destination directory on the VM's node")
    move.add_argument("--disk", action="append", metavar="TARGET",
                      help="disk target to move (repeatable, or comma-separated); default: "
                           "every disk of the domain, from the node inventory")
    move.add_argument("--pivot", action="store_true",
                      help="switch the VM to the copies once Mirrored (spec.pivot: true)")
    move.add_argument("--bandwidth", metavar="Q",
                      help="limit per copy in bytes per second, a quantity such as 100Mi")
    move.add_argument("--node", metavar="N", help="spec.nodeName: the node whose agent copies "
                      "(default: the node whose inventory has the domain; with --disk and no "
                      "inventory, the agent whose libvirt runs the domain claims them)")
    move.add_argument("--group", metavar="G", help="spec.group (default: the VM's name)")
    move.add_argument("--prefix", metavar="P", help="name the BlockCopies P-<disk> (default: "
                      "the VM's name)")
    move.add_argument("--dry-run", action="store_true",
                      help="print the BlockCopies as YAML instead of creating them")

    for name, help, every in (("list", "list BlockCopies", True),
                              ("status", "show BlockCopies with their messages", False)):
        p = add(name, help, f"{help.capitalize()}: phase, progress, copy rate, ETA, node, group"
                + (", message." if not every else "."))
        if every:
            p.add_argument("-A", "--all-namespaces", action="store_true",
                           help="list the BlockCopies of every namespace")
            p.add_argument("--group", help="only this group's BlockCopies")
        else:
            _select_args(p, "show")
        p.add_argument("-o", "--output", choices=FORMATS, default="table",
                       help="table (default), wide (more columns), name, json or yaml")
        p.add_argument("-w", "--watch", action="store_true",
                       help="after printing them, print every change (until Ctrl-C)")

    for verb, field, what in (
            ("pivot", "pivot", "switch the VMs to the copies (each pivots once Mirrored)"),
            ("abort", "abort", "end the copies, the VMs staying on their sources")):
        p = add(verb, what, f"Set spec.{field}: true: {what}. Objects already Pivoted, "
                "Aborted or Failed are left as they are (said so, not an error).")
        _select_args(p, verb)
        p.set_defaults(field=field)

    wait = add("wait", "wait until BlockCopies reach a phase",
               "Wait until every selected BlockCopy is in PHASE (Mirrored also counts once "
               "passed: the Mirrored condition stays True after a pivot or an abort). Exits 1 "
               "as soon as one is Failed (unless waiting for Failed) or ends in another "
               "phase from which PHASE cannot be reached, or at the timeout.")
    _select_args(wait, "wait for")
    wait.add_argument("--for", dest="phase", required=True, type=canonical_phase,
                      metavar="PHASE", help=f"one of {', '.join(PHASES)}")
    wait.add_argument("--timeout", type=parse_duration, default=parse_duration("30m"),
                      help="give up after this long (90s, 5m, 1h30m; default 30m)")
    version.add_arguments(add("version", "print the plugin's version and every agent's",
                              version.DESCRIPTION))
    planargs.add_arguments(sub, add_to)
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace, Cluster, str], int]] = {
    "move": cmd_move, "list": cmd_list, "status": cmd_status, "wait": cmd_wait,
    "pivot": lambda a, c, n: cmd_set("pivot", a, c, n),
    "abort": lambda a, c, n: cmd_set("abort", a, c, n),
    "version": lambda a, c, n: version.cmd_version(a, c, n, out=out),
    "plan": lambda a, c, n: plans.cmd_plan(a, c, n, out=out, note=note),
}


def plan_refs(args: argparse.Namespace) -> argparse.Namespace | str | None:
    """``pivot plan/NAME``: the same as ``plan pivot NAME`` (the arguments of that), or an
    error message when plans are named where they cannot be (None: no plan named)."""
    refs = [plans.plan_ref(n) for n in args.names]
    if all(r is None for r in refs):
        return None
    if args.command == "abort":
        return ("to stop a plan, delete it: `kubectl delete bcp NAME` (its copies that have "
                "not pivoted are cancelled, their VMs stay on their sources)")
    if args.command != "pivot":
        return f"for plans: kubectl blockcopy plan {args.command} NAME"
    if None in refs or args.group is not None or "" in refs:
        return "name BlockCopies or plans (plan/NAME), not both"
    return argparse.Namespace(**{**vars(args), "command": "plan", "plan_command": "pivot",
                                 "names": refs})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["__complete"]:  # as Cobra programs do: kubectl_complete-blockcopy
        from blockcopy.kubectl import completion
        return completion.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE
    if args.command in ("status", "pivot", "abort", "wait") and args.names:
        routed = plan_refs(args)
        if isinstance(routed, str):
            note(f"error: kubectl blockcopy {args.command}: {routed}")
            return USAGE
        args = routed or args
    if args.command in ("status", "pivot", "abort", "wait"):
        if bool(args.names) == (args.group is not None):
            note(f"error: kubectl blockcopy {args.command}: name the BlockCopies or give "
                 "--group, not both")
            return USAGE
    try:
        if args.command == "move" and args.dry_run and args.namespace and args.disk:
            cluster, namespace = None, args.namespace
        elif args.command == "plan" and args.plan_command == "create" and \
                args.dry_run == "client" and args.namespace:
            cluster, namespace = None, args.namespace
        elif args.command == "version" and args.client:
            cluster, namespace = None, ""
        else:
            cluster = Cluster(args.kubeconfig, args.context)
            namespace = args.namespace or cluster.default_namespace
        return COMMANDS[args.command](args, cluster, namespace)  # type: ignore[arg-type]
    except PluginError as exc:
        note(f"error: {exc}")
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
