"""`blockcopy-operator`: the node agent's command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys

from blockcopy import __version__


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="blockcopy-operator",
        description="Node agent for BlockCopy objects (blockcopy.dev/v1alpha1): drives libvirt "
        "block-copy jobs for the domains running on this node and reports their status.")
    parser.add_argument("--node-name", default=os.environ.get("NODE_NAME"),
                        help="name of this node (env NODE_NAME; default: the host name)")
    parser.add_argument("--libvirt-uri", default=os.environ.get("LIBVIRT_URI", "qemu:///system"),
                        help="libvirt connection URI (env LIBVIRT_URI; default qemu:///system)")
    parser.add_argument("--allowed-path", action="append", default=None, metavar="DIR",
                        help="root under which destinations may be written (repeatable; env "
                        "BLOCKCOPY_ALLOWED_PATHS, colon-separated; "
                        "default /var/lib/libvirt/images)")
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
    parser.add_argument("--claim-interval", type=float, default=30.0,
                        help="re-check unclaimed objects every this many seconds (default 30)")
    parser.add_argument("--namespace", action="append", default=None,
                        help="watch only this namespace (repeatable; default: all namespaces)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def allowed_paths(from_args: list[str] | None) -> tuple[str, ...]:
    from blockcopy.destination import DEFAULT_ALLOWED_PATHS

    if from_args:
        return tuple(from_args)
    from_env = [p for p in os.environ.get("BLOCKCOPY_ALLOWED_PATHS", "").split(":") if p]
    return tuple(from_env) or DEFAULT_ALLOWED_PATHS


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported here so that --help works without a cluster or libvirt configuration.
    import kopf

    from blockcopy import handlers
    from blockcopy.agent import AgentConfig

    handlers.CONFIG = AgentConfig(
        node_name=args.node_name or socket.gethostname(),
        libvirt_uri=args.libvirt_uri,
        allowed_paths=allowed_paths(args.allowed_path),
        status_interval=args.status_interval,
        claim_interval=args.claim_interval,
        namespaces=tuple(args.namespace or ()),
    )
    # Served by the agent (blockcopy.probes), not by kopf: kopf would bind it only after the
    # startup handler that announces "agent ready".
    handlers.LIVENESS_PORT = args.liveness_port
    # One handler on the root logger, for kopf's lines and ours.
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.JSON
                   if args.log_format == "json" else kopf.LogFormat.FULL)
    if args.metrics_port:
        from blockcopy import metrics

        metrics.serve(args.metrics_port)
    asyncio.run(kopf.operator(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
