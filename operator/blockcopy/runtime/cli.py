"""`blockcopy-operator`: the node agent's command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from typing import TYPE_CHECKING

import yaml

from blockcopy import __version__
from blockcopy.agent.agent import AgentConfig
from blockcopy.core.pace import DEFAULT_BUDGET
from blockcopy.core.policy import Policy, PolicyError
from blockcopy.core.policy import parse as parse_policy
from blockcopy.model.api import DEFAULT_ALLOWED_PATHS

if TYPE_CHECKING:
    from blockcopy.runtime.lifecycle import HypervisorFactory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="blockcopy-operator",
        description="Node agent for BlockCopy objects (blockcopy.dev/v1alpha1): drives libvirt "
        "block-copy jobs for the domains running on this node and reports their status.")
    parser.add_argument("--mode", choices=["agent", "controller"],
                        default=os.environ.get("BLOCKCOPY_MODE", "agent"),
                        help="agent: the node agent (default); controller: the cluster-wide "
                        "BlockCopyPlan controller (one replica; env BLOCKCOPY_MODE)")
    parser.add_argument("--agent-timeout", type=float,
                        default=float(os.environ.get("BLOCKCOPY_AGENT_TIMEOUT", "900")),
                        metavar="S",
                        help="controller: a node whose DiskInventory was not updated for S "
                        "seconds has no agent; its disks wait (default 900: three of the "
                        "agents' 300 s inventory resyncs)")
    parser.add_argument("--node-name", default=os.environ.get("NODE_NAME"),
                        help="name of this node (env NODE_NAME; default: the host name)")
    parser.add_argument("--libvirt-uri", default=os.environ.get("LIBVIRT_URI", "qemu:///system"),
                        help="libvirt connection URI (env LIBVIRT_URI; default qemu:///system)")
    parser.add_argument("--allowed-path", action="append", default=None, metavar="DIR",
                        help="root under which destinations may be written (repeatable; env "
                        "BLOCKCOPY_ALLOWED_PATHS, colon-separated; "
                        "default /var/lib/libvirt/images)")
    parser.add_argument("--allowed-network-dest", action="append", default=None,
                        metavar="ENTRY",
                        help="allow network destinations (NBD) at ENTRY: HOST:PORT, or a "
                        "directory holding Unix sockets (repeatable; env "
                        "BLOCKCOPY_ALLOWED_NETWORK_DESTS, comma-separated; default: none, a "
                        "network destination sends VM data off the host)")
    parser.add_argument("--max-active-copies", type=int,
                        default=int(os.environ.get("BLOCKCOPY_MAX_ACTIVE_COPIES", "0")),
                        metavar="N",
                        help="at most N copies run at once on this node; the others wait in "
                        "phase Queued, first come first served (env "
                        "BLOCKCOPY_MAX_ACTIVE_COPIES; default 0: no limit)")
    parser.add_argument("--policy", default=os.environ.get("BLOCKCOPY_POLICY") or None,
                        metavar="FILE",
                        help="tenant policy: which namespaces may copy which domains to which "
                        "roots (env BLOCKCOPY_POLICY; default: none, anyone within the "
                        "allowed roots); see blockcopy.core.policy")
    parser.add_argument("--metrics-port", type=int,
                        default=int(os.environ.get("BLOCKCOPY_METRICS_PORT", "0")),
                        help="serve Prometheus metrics on http://0.0.0.0:PORT/metrics "
                        "(env BLOCKCOPY_METRICS_PORT; 0 = off, the default)")
    parser.add_argument("--liveness-port", type=int,
                        default=int(os.environ.get("BLOCKCOPY_LIVENESS_PORT", "0")),
                        help="serve a liveness probe on http://0.0.0.0:PORT/healthz "
                        "(env BLOCKCOPY_LIVENESS_PORT; 0 = off, the default)")
    parser.add_argument("--log-format", choices=["text", "json"],
                        default=os.environ.get("BLOCKCOPY_LOG_FORMAT", "text"),
                        help="log line format (env BLOCKCOPY_LOG_FORMAT)")
    parser.add_argument("--status-interval", type=float, default=1.0,
                        help="at most one status write per object per this many seconds")
    parser.add_argument("--progress-budget", type=float,
                        default=float(os.environ.get("BLOCKCOPY_PROGRESS_BUDGET",
                                                     str(DEFAULT_BUDGET))),
                        metavar="N",
                        help="progress refreshes (a look at libvirt and a status write) per "
                        "second for all copies together: with more copies than N, each "
                        "refreshes every copies/N seconds; phase changes are written at once "
                        f"whatever it says (env BLOCKCOPY_PROGRESS_BUDGET; default "
                        f"{DEFAULT_BUDGET:g}; 0: no budget)")
    parser.add_argument("--claim-interval", type=float, default=30.0,
                        help="re-check unclaimed objects every this many seconds (default 30)")
    parser.add_argument("--libvirt-check-interval", type=float, default=15.0,
                        help="check that libvirtd answers every this many seconds, for the "
                        "blockcopy_libvirt_up metric (default 15)")
    parser.add_argument("--inventory-interval", type=float,
                        default=float(os.environ.get("BLOCKCOPY_INVENTORY_INTERVAL", "300")),
                        metavar="SECONDS",
                        help="publish this node's domains and disks in the DiskInventory named "
                        "after the node: at start, on libvirt's domain events, and at least "
                        "every SECONDS (env BLOCKCOPY_INVENTORY_INTERVAL; default 300; 0: no "
                        "inventory)")
    parser.add_argument("--namespace", action="append", default=None,
                        help="watch only this namespace (repeatable; default: all namespaces)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def allowed_paths(from_args: list[str] | None) -> tuple[str, ...]:
    if from_args:
        return tuple(from_args)
    from_env = [p for p in os.environ.get("BLOCKCOPY_ALLOWED_PATHS", "").split(":") if p]
    return tuple(from_env) or DEFAULT_ALLOWED_PATHS


def load_policy(path: str | None) -> Policy:
    """The tenant policy in ``path`` (None or empty: no policy), its roots resolved."""
    if not path:
        return Policy()
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise PolicyError(f"cannot read the policy {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"the policy {path} is not YAML: {exc}") from None
    return parse_policy(raw).resolving(os.path.realpath)


def config_from(args: argparse.Namespace) -> AgentConfig:
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        raise SystemExit(f"blockcopy-operator: {exc}") from None
    return AgentConfig(
        policy=policy,
        node_name=args.node_name or socket.gethostname(),
        libvirt_uri=args.libvirt_uri,
        allowed_paths=allowed_paths(args.allowed_path),
        allowed_network_dests=tuple(args.allowed_network_dest or [
            e.strip() for e in os.environ.get("BLOCKCOPY_ALLOWED_NETWORK_DESTS", "").split(",")
            if e.strip()]),
        status_interval=args.status_interval,
        progress_budget=args.progress_budget,
        claim_interval=args.claim_interval,
        libvirt_check_interval=args.libvirt_check_interval,
        inventory_interval=max(0.0, args.inventory_interval),
        namespaces=tuple(args.namespace or ()),
        liveness_port=args.liveness_port,
        max_active_copies=args.max_active_copies,
        metrics_port=args.metrics_port,
    )


def main(argv: list[str] | None = None, *,
         make_hypervisor: HypervisorFactory | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT. ``make_hypervisor``: tests only (fault injection
    through the hypervisor interface); the default is the libvirt client."""
    args = parse_args(argv)
    if args.mode == "controller":
        return run_controller(args)
    # Imported here so that --help works without a cluster or libvirt configuration.
    import kopf

    from blockcopy.runtime import handlers, lifecycle

    assert handlers.follow  # importing the module registers kopf's handlers

    config = config_from(args)
    # One handler on the root logger, for kopf's lines and ours.
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.JSON
                   if args.log_format == "json" else kopf.LogFormat.FULL)
    if config.metrics_port:
        from blockcopy.adapters import metrics

        metrics.serve(config.metrics_port)
    memo = lifecycle.memo_for(config) if make_hypervisor is None else \
        lifecycle.memo_for(config, make_hypervisor=make_hypervisor)
    asyncio.run(kopf.operator(
        memo=memo,
        standalone=True,
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
    ))
    return 0


def run_controller(args: argparse.Namespace) -> int:
    """The plan controller until SIGTERM/SIGINT (its handlers only: none of the agent's)."""
    import kopf

    from blockcopy.controller.plans import ControllerConfig
    from blockcopy.runtime import controller

    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        raise SystemExit(f"blockcopy-operator: {exc}") from None
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.JSON
                   if args.log_format == "json" else kopf.LogFormat.FULL)
    controller.run(ControllerConfig(policy=policy, agent_timeout=args.agent_timeout),
                   namespaces=tuple(args.namespace or ()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
