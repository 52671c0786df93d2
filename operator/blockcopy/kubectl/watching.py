"""Watches of BlockCopies: ``list --watch`` and ``status --watch`` print each change, and
``wait`` follows one watch stream instead of polling. A list gives the objects and the
resourceVersion the watch starts from; a stream the server ends (its timeout) is resumed
from the last version seen, and one whose version expired (410 Gone) by a fresh list."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from blockcopy.kubectl.cluster import KINDS, Cluster, select
from blockcopy.kubectl.errors import NOT_FOUND, NOT_REACHED, OK, PluginError
from blockcopy.kubectl.names import RESOURCE
from blockcopy.kubectl.output import Changes
from blockcopy.kubectl.text import cannot_reach, format_duration, group_of, phase_of, reached
from blockcopy.model.api import GROUP, PLURAL, VERSION

Object = dict[str, Any]
# A stream is re-opened at least this often (seconds): a server or proxy that drops an idle
# connection silently cannot stall the plugin for longer.
STREAM_SECONDS = 300


def listing(cluster: Cluster, namespace: str | None, plural: str = PLURAL
            ) -> tuple[list[Object], str]:
    """The BlockCopies (or ``plural``) of ``namespace`` (None: every namespace) and the
    list's version."""
    kinds = KINDS[plural][1]
    if namespace is None:
        result = cluster._call(f"listing {kinds}", cluster.api.list_cluster_custom_object,
                               GROUP, VERSION, plural, plural=plural)
    else:
        result = cluster._call(f"listing {kinds} in namespace {namespace!r}",
                               cluster.api.list_namespaced_custom_object, GROUP, VERSION,
                               namespace, plural, plural=plural)
    items = sorted(result["items"], key=lambda o: (o["metadata"].get("namespace", ""),
                                                   o["metadata"]["name"]))
    return items, str(result["metadata"]["resourceVersion"])


def events(cluster: Cluster, namespace: str | None, version: str, *,
           deadline: float | None = None, field_selector: str | None = None,
           plural: str = PLURAL) -> Iterator[tuple[str, Object]]:
    """(ADDED | MODIFIED | DELETED, object) from ``version`` on, until ``deadline``
    (time.monotonic(); None: until interrupted). After a 410 Gone the current objects come
    again as MODIFIED (the consumer keeps the last of each)."""
    import kubernetes

    kinds = KINDS[plural][1]
    if namespace is None:
        source: tuple[Any, ...] = (cluster.api.list_cluster_custom_object, GROUP, VERSION,
                                   plural)
    else:
        source = (cluster.api.list_namespaced_custom_object, GROUP, VERSION, namespace, plural)
    extra = {"field_selector": field_selector} if field_selector else {}
    while deadline is None or time.monotonic() < deadline:
        left = STREAM_SECONDS if deadline is None else deadline - time.monotonic()
        seconds = max(1, min(STREAM_SECONDS, math.ceil(left)))
        watch = kubernetes.watch.Watch()
        gone = False
        try:
            for event in watch.stream(*source, resource_version=version,
                                      timeout_seconds=seconds, allow_watch_bookmarks=True,
                                      _request_timeout=seconds + 30, **extra):
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    if (obj or {}).get("code") == 410:
                        gone = True
                        break
                    raise PluginError(f"watching {kinds}: {(obj or {}).get('message')}")
                version = obj["metadata"].get("resourceVersion") or version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    yield kind, obj
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status != 410:
                raise cluster._error(f"watching {kinds}", exc, plural) from None
            gone = True
        except Exception as exc:  # urllib3's errors: the server went away
            if type(exc).__module__.startswith("urllib3") or isinstance(exc, OSError):
                raise PluginError(f"cannot reach the API server at {cluster.host}: "
                                  f"{exc}") from None
            raise
        finally:
            watch.stop()
        if gone:
            items, version = listing(cluster, namespace, plural)
            for obj in items:
                yield "MODIFIED", obj


def watch_and_print(cluster: Cluster, namespace: str | None, objects: list[Object],
                    version: str, wanted: Callable[[Object], bool], *, fmt: str,
                    namespaces: bool, message: bool, out: Callable[[str], None]) -> int:
    """Print ``objects``, then every change of an object ``wanted`` takes, until
    interrupted (Ctrl-C; exit code 130 as kubectl's)."""
    changes = Changes(fmt, namespaces=namespaces, message=message)
    first = changes.first(objects)
    if first:
        out(first)
    for kind, obj in events(cluster, namespace, version):
        if wanted(obj):
            line = changes.change(kind, obj)
            if line is not None:
                out(line)
    return OK  # pragma: no cover - the loop ends with Ctrl-C


def cmd_list_watch(args: argparse.Namespace, cluster: Cluster, namespace: str,
                   out: Callable[[str], None]) -> int:
    every = args.all_namespaces
    objects, version = listing(cluster, None if every else namespace)

    def wanted(obj: Object) -> bool:
        return bool(args.group is None or group_of(obj) == args.group)
    return watch_and_print(cluster, None if every else namespace,
                           [o for o in objects if wanted(o)], version, wanted,
                           fmt=args.output, namespaces=every, message=False, out=out)


def cmd_status_watch(args: argparse.Namespace, cluster: Cluster, namespace: str,
                     out: Callable[[str], None]) -> int:
    select(cluster, namespace, args.names, args.group)  # NotFound for a wrong name or group
    objects, version = listing(cluster, namespace)
    names = set(args.names)

    def wanted(obj: Object) -> bool:
        if args.group is not None:
            return bool(group_of(obj) == args.group)
        return bool(obj["metadata"]["name"] in names)
    return watch_and_print(cluster, namespace, [o for o in objects if wanted(o)], version,
                           wanted, fmt=args.output, namespaces=False, message=True, out=out)


def cmd_wait(args: argparse.Namespace, cluster: Cluster, namespace: str, *,
             out: Callable[[str], None], note: Callable[[str], None]) -> int:
    """Until every selected object reached the phase (0), or one can no longer reach it or
    the timeout expired (1): one list, then one watch stream of the namespace (of the one
    object when a single name is given)."""
    want, deadline = args.phase, time.monotonic() + args.timeout
    select(cluster, namespace, args.names, args.group)  # NotFound for a wrong name or group
    listed, version = listing(cluster, namespace)

    def wanted(obj: Object) -> bool:
        if args.group is not None:
            return bool(group_of(obj) == args.group)
        return bool(obj["metadata"]["name"] in args.names)
    current = {o["metadata"]["name"]: o for o in listed if wanted(o)}
    missing = [n for n in args.names if n not in current]
    if missing:
        raise PluginError(f"blockcopy {missing[0]!r} in namespace {namespace!r}: not found",
                          NOT_FOUND)
    done: set[str] = set()

    def verdict() -> int | None:
        for name, obj in sorted(current.items()):
            if name not in done and reached(obj, want):
                done.add(name)
                out(f"{RESOURCE}/{name} {phase_of(obj)}")
        doomed = [why for o in current.values() if (why := cannot_reach(o, want))]
        if doomed:
            for why in doomed:
                note(f"error: {why}")
            note(f"error: will never be {want}")
            return NOT_REACHED
        if current and all(reached(o, want) for o in current.values()):
            return OK
        return None

    if (code := verdict()) is not None:
        return code
    single = f"metadata.name={args.names[0]}" if len(args.names) == 1 else None
    for kind, obj in events(cluster, namespace, version, deadline=deadline,
                            field_selector=single):
        name = obj["metadata"]["name"]
        if not wanted(obj):
            current.pop(name, None)  # left the group
            continue
        if kind == "DELETED":
            current.pop(name, None)
            if args.group is None:
                note(f"error: {name} was deleted")
                return NOT_REACHED
        else:
            current[name] = obj
        if (code := verdict()) is not None:
            return code
    waiting = ", ".join(f"{name} is {phase_of(o) or 'new'}"
                        + (f" ({p})" if (p := (o.get('status') or {}).get('progress')) else "")
                        for name, o in sorted(current.items()) if not reached(o, want))
    note(f"error: timed out after {format_duration(args.timeout)} waiting for {want}: "
         f"{waiting or 'no BlockCopy of the group is left'}")
    return NOT_REACHED
