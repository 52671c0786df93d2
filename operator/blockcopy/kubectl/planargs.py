"""The command line of ``kubectl blockcopy plan``: its verbs, their options and their help
(``kubectl.plans`` runs them). Apart from the verbs because argparse's declarations are long
and read on their own, as the user's reference."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from blockcopy.kubectl import planspec, plantext
from blockcopy.kubectl.output import FORMATS
from blockcopy.kubectl.text import parse_duration

DESCRIPTION = (
    "BlockCopyPlans (short name bcp) move every disk whose image lies under a directory, on "
    "many nodes, within limits: the plan controller selects the disks from the node "
    "inventories and creates one BlockCopy per disk (see docs/plans.md).")
EXAMPLES = """examples:
  kubectl blockcopy plan create empty-a --from /srv/array-a --to /srv/array-b --dry-run
  kubectl blockcopy plan create empty-a --from /srv/array-a --to /srv/array-b \\
      --domain 'web-*' --node-selector rack=r1 --max-active 8 --bandwidth 200Mi
  kubectl blockcopy plan list                  (-A, -o wide|name|json|yaml)
  kubectl blockcopy plan status empty-a        (its counts, bytes, ETA and disks)
  kubectl blockcopy plan wait empty-a --for AwaitingPivot --timeout 2h
  kubectl blockcopy plan pivot empty-a         (or: kubectl blockcopy pivot plan/empty-a)
  kubectl blockcopy plan wait empty-a --for Completed
"""



def add_arguments(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """The ``plan`` subcommand and its own subcommands (``add(sub, name, help,
    description)`` makes a parser with the connection options)."""
    plan = add(sub, "plan", "create, follow and pivot BlockCopyPlans (move a pool)",
               DESCRIPTION, epilog=EXAMPLES)
    verbs = plan.add_subparsers(dest="plan_command", metavar="PLAN_COMMAND", required=True)

    create = add(verbs, "create", "create a BlockCopyPlan from flags (--dry-run: print it)",
                 "Create a BlockCopyPlan: every disk whose active image lies below --from "
                 "(on the nodes --node-selector picks, of the domains --domain names) is "
                 "copied to the same path below --to. It stops at Mirrored (pivot Manual) "
                 "until `kubectl blockcopy plan pivot NAME`, unless --pivot Automatic.")
    create.add_argument("name", metavar="NAME", help="the plan's name (at most 52 characters)")
    create.add_argument("--from", dest="source", required=True, metavar="DIR",
                        help="spec.source.pathPrefix: the disks below this directory")
    create.add_argument("--to", dest="dest", required=True, metavar="DIR",
                        help="spec.destination.pathPrefix: where their copies go")
    create.add_argument("--domain", action="append", metavar="GLOB",
                        help="only domains matching this glob (repeatable, or comma-separated)")
    create.add_argument("--node-selector", action="append", metavar="LABEL",
                        help="only nodes with this label: KEY=VALUE, KEY!=VALUE, KEY or !KEY "
                             "(repeatable, or comma-separated)")
    create.add_argument("--max-active", type=int, metavar="N",
                        help="copies active at once (server default 4)")
    create.add_argument("--max-active-per-node", type=int, metavar="N",
                        help="copies active at once on one node (server default 1)")
    create.add_argument("--pivot", type=planspec.pivot_mode, default="Manual",
                        metavar="MODE", help="Manual (default: stop at Mirrored until `plan "
                        "pivot`) or Automatic (each VM's disks pivot once all are Mirrored)")
    create.add_argument("--bandwidth", metavar="Q", help="limit per copy, bytes per second "
                        "(a quantity such as 100Mi)")
    create.add_argument("--format", metavar="FMT", help="destination format (default: each "
                        "source's)")
    create.add_argument("--backing-chain", choices=["copy"],
                        help="copy: move each disk with its whole backing chain")
    create.add_argument("--convergence", choices=["auto"],
                        help="auto: copies that do not converge block writes")
    create.add_argument("--verify", type=planspec.verify_mode, metavar="MODE",
                        help="the check at each switch: Sample, Full (every block: a longer "
                        "pause) or None (no check). Default: BlockCopy's (Sample; a copy "
                        "that cannot be checked still pivots, which a given Sample or Full "
                        "would hold at Mirrored)")
    create.add_argument("--no-detect-zeroes", action="store_true",
                        help="spec.destination.detectZeroes: false, every byte is written "
                        "(for destinations where zero detection costs too much)")
    create.add_argument("--source-retention", type=planspec.retention, metavar="MODE",
                        help="Keep (default) or Delete: the old images once pivoted")
    create.add_argument("--preview", action="store_true", help="spec.dryRun: the controller "
                        "lists what would be copied (plan status) and copies nothing, until "
                        "`kubectl blockcopy plan start NAME`")
    create.add_argument("--dry-run", nargs="?", const="client", default="none",
                        choices=["none", "client", "server"], help="print the plan as YAML "
                        "instead of creating it (server: as the API server would store it, "
                        "checked and defaulted by it)")

    listing = add(verbs, "list", "list BlockCopyPlans",
                  "List BlockCopyPlans: phase, disks pivoted, mirrored, copying, queued and "
                  "failed, bytes, copy rate and ETA of each.")
    listing.add_argument("-A", "--all-namespaces", action="store_true",
                         help="list the plans of every namespace")
    status = add(verbs, "status", "show BlockCopyPlans with their disks",
                 "Show each plan's phase, counts, bytes, rate and ETA, then its disks: the "
                 "child BlockCopy of each, its node, domain and disk, its phase, progress, "
                 "rate, ETA and message (-o json|yaml: the plan and its children).")
    status.add_argument("names", nargs="+", metavar="NAME", help="the plans")
    for p in (listing, status):
        p.add_argument("-o", "--output", choices=FORMATS, default="table",
                       help="table (default), wide (more columns), name, json or yaml")
    for verb, what, more in (
            ("pivot", "switch a plan's VMs to their copies (spec.pivot: Automatic)",
             "Each VM's disks pivot together once all of them are Mirrored. A plan already "
             "Automatic, Completed or Failed is left as it is (said so, not an error)."),
            ("start", "start a plan created with --preview (spec.dryRun: false)",
             "The controller then fixes the disk set and copies it.")):
        p = add(verbs, verb, what, f"Set {what.partition('(')[2].rstrip(')')}: "
                f"{what.partition(' (')[0]}. {more}")
        p.add_argument("names", nargs="+", metavar="NAME", help=f"the plans to {verb}")
    wait = add(verbs, "wait", "wait until BlockCopyPlans reach a phase",
               "Wait until every named plan is in PHASE (or, for Mirrored, until every disk "
               "of it is Mirrored or pivoted). Exits 1 as soon as one ends (Completed or "
               "Failed) otherwise, when waiting for Mirrored a disk failed, or at the "
               "timeout.")
    wait.add_argument("names", nargs="+", metavar="NAME", help="the plans to wait for")
    wait.add_argument("--for", dest="plan_phase", required=True, type=plantext.wait_target,
                      metavar="PHASE", help=f"one of {', '.join(plantext.WAIT_FOR)}")
    wait.add_argument("--timeout", type=parse_duration, default=parse_duration("30m"),
                      help="give up after this long (90s, 5m, 1h30m; default 30m)")
