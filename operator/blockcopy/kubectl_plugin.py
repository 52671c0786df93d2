"""`kubectl blockcopy`: a kubectl plugin (like virtctl for KubeVirt) for BlockCopy objects.

Installed as the console script ``kubectl-blockcopy``; kubectl runs any ``kubectl-*`` on PATH
as ``kubectl *``. It is a client of the API only: it writes spec (never status), reads
status, and, for ``move`` without ``--disk``, reads the domain's live XML from libvirt
(read-only; libvirt is imported only then). Imports: stdlib, kubernetes, yaml and
blockcopy.api (pure names), nothing of the agent.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import posixpath
import re
import shlex
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import yaml

from blockcopy import __version__
from blockcopy.api import (
    GROUP,
    KIND,
    PLURAL,
    TERMINAL_PHASES,
    VERSION,
    Phase,
    SpecError,
    parse_bandwidth,
)

# Also written as a label, so that a group can be selected on any server (a label is never
# pruned; spec.group is dropped by an API server whose CRD predates it).
GROUP_LABEL = f"{GROUP}/group"
RESOURCE = f"{PLURAL}.{GROUP}"  # as kubectl prints it: blockcopies.blockcopy.dev/NAME

# Every phase of the API, Queued included (it may be newer than this package's api module).
PHASES: tuple[str, ...] = tuple(dict.fromkeys(
    [Phase.PENDING.value, "Queued", *(p.value for p in Phase)]))
TERMINAL = frozenset(p.value for p in TERMINAL_PHASES)

# Exit codes (also in --help).
OK, NOT_REACHED, USAGE, NOT_FOUND, FAILURE = 0, 1, 2, 3, 4
EXIT_CODES = f"""exit codes:
  {OK}  done (wait: every object reached the phase)
  {NOT_REACHED}  wait: a copy Failed, ended in a phase from which the awaited one cannot be
     reached, or the timeout expired
  {USAGE}  usage error (bad or missing arguments)
  {NOT_FOUND}  a named BlockCopy, group or domain (or one of its disks) does not exist
  {FAILURE}  the API server, the kubeconfig or libvirt refused or could not be reached
"""

EXAMPLES = """examples:
  kubectl blockcopy move web-1 --to /var/lib/libvirt/images/fast      # every disk, from libvirt
  kubectl blockcopy move web-1 --to /srv/new --disk vda --disk vdb --node hv-07 --bandwidth 100Mi
  kubectl blockcopy list -n vms            (or -A)
  kubectl blockcopy status web-1-vda
  kubectl blockcopy wait --group web-1 --for Mirrored --timeout 30m
  kubectl blockcopy pivot --group web-1    (or: pivot web-1-vda web-1-vdb)
  kubectl blockcopy wait --group web-1 --for Pivoted
  kubectl blockcopy abort web-1-vdb
"""


class PluginError(Exception):
    """An error shown to the user as is, with the exit code it ends the plugin with."""

    def __init__(self, message: str, code: int = FAILURE, *, status: int | None = None):
        super().__init__(message)
        self.code, self.status = code, status  # status: the API server's HTTP status


class LibvirtCannotTell(PluginError):
    """libvirt here cannot describe the domain (not installed, unreachable, no such domain
    on this host): the plugin may run off the VM's node."""

    HINT = " (run this on the VM's node, or name the disks with --disk)"


# ------------------------------------------------------------------ pure helpers


def human_rate(rate: Any) -> str:
    """Bytes per second in binary units: ``12.5 MiB/s``; empty when unknown."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or rate < 0:
        return ""
    value, unit = float(rate), "B/s"
    for unit in ("B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"):
        if value < 1024 or unit == "TiB/s":
            break
        value /= 1024
    return f"{int(value)} {unit}" if unit == "B/s" else f"{value:.1f} {unit}"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``5m``, ``1h30m``, ``1.5h`` as seconds (argparse type)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 5m or 1h30m")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def object_name(domain: str, target: str) -> str:
    """The BlockCopy of ``domain``'s disk ``target``: ``<domain>-<target>``, made a valid
    object name (lower case letters, digits and '-', at most 253 characters)."""
    name = re.sub(r"[^a-z0-9]+", "-", f"{domain}-{target}".lower()).strip("-")
    name = name[:253].rstrip("-")
    return name or "blockcopy"


def valid_label_value(value: str) -> bool:
    return len(value) <= 63 and bool(re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?",
                                                  value))


@dataclasses.dataclass(frozen=True)
class Disk:
    """One disk (device='disk') of a domain, from its live XML."""

    target: str
    source: str | None = None  # file or block device path; None: network, volume or empty
    format: str | None = None  # the driver's type (qcow2, raw)


def disks_from_xml(xml: str) -> list[Disk]:
    """The disks (device='disk', not cdroms or floppies) of a domain's XML, in order."""
    disks = []
    for elem in ET.fromstring(xml).findall("./devices/disk"):
        if elem.get("device", "disk") != "disk":
            continue
        target = elem.find("target")
        if target is None or not target.get("dev"):
            continue
        source = elem.find("source")
        path = None
        if source is not None and elem.get("type") in ("file", "block"):
            path = source.get("file") or source.get("dev")
        driver = elem.find("driver")
        disks.append(Disk(target.get("dev", ""), path,
                          driver.get("type") if driver is not None else None))
    return disks


def plan_dests(domain: str, disks: Sequence[Disk], to_dir: str) -> dict[str, str]:
    """Each disk's destination in ``to_dir``: the file name of its current source, or
    ``<domain>-<target>.qcow2`` (``.raw`` etc. for another known format) when the source is
    unknown or when two disks' sources share a file name. Raises PluginError when a
    destination would be the disk's own source."""
    names = [posixpath.basename(d.source) if d.source else None for d in disks]
    dests = {}
    for disk, name in zip(disks, names, strict=True):
        if not name or names.count(name) > 1:
            name = f"{domain}-{disk.target}.{disk.format or 'qcow2'}"
        dest = posixpath.join(to_dir, name)
        if disk.source and posixpath.normpath(disk.source) == dest:
            raise PluginError(f"{disk.target} already is {dest}: choose another directory",
                              USAGE)
        dests[disk.target] = dest
    return dests


def manifests(*, domain: str, disks: Sequence[Disk], to_dir: str, group: str,
              node: str | None, pivot: bool, bandwidth: str | None,
              namespace: str, prefix: str | None = None) -> list[dict]:
    """One BlockCopy per disk, all in ``group``, named <prefix>-<target> (default prefix:
    the domain)."""
    dests = plan_dests(domain, disks, to_dir)
    out = []
    for disk in disks:
        spec: dict[str, Any] = {"domain": domain}
        if node:
            spec["nodeName"] = node
        spec.update(disk=disk.target, dest=dests[disk.target], group=group)
        if bandwidth is not None:
            spec["bandwidth"] = bandwidth
        spec["pivot"] = pivot
        metadata: dict[str, Any] = {"name": object_name(prefix or domain, disk.target),
                                    "namespace": namespace}
        if valid_label_value(group):
            metadata["labels"] = {GROUP_LABEL: group}
        out.append({"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata,
                    "spec": spec})
    return out


def group_of(obj: Mapping) -> str:
    return ((obj.get("spec") or {}).get("group")
            or ((obj.get("metadata") or {}).get("labels") or {}).get(GROUP_LABEL) or "")


def phase_of(obj: Mapping) -> str:
    return (obj.get("status") or {}).get("phase") or ""


def condition_true(obj: Mapping, ctype: str) -> bool:
    return any(c.get("type") == ctype and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """kubectl's plain table: upper-case headers, columns three spaces apart."""
    rows = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [list(headers), *rows]]
    return "\n".join(lines)


def rows(objects: Sequence[Mapping], *, namespaces: bool, message: bool
         ) -> tuple[list[str], list[list[Any]]]:
    headers = ["NAME", "DOMAIN", "DISK", "PHASE", "PROGRESS", "RATE", "ETA", "NODE", "GROUP"]
    if namespaces:
        headers.insert(0, "NAMESPACE")
    if message:
        headers.append("MESSAGE")
    out = []
    for obj in objects:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        phase = status.get("phase") or ""
        row = [meta["name"], spec.get("domain"), spec.get("disk"), phase,
               status.get("progress"), human_rate(status.get("rate")) if phase == "Copying"
               else "", status.get("eta"), status.get("nodeName") or spec.get("nodeName"),
               group_of(obj)]
        if namespaces:
            row.insert(0, meta.get("namespace"))
        if message:
            row.append(" ".join(str(status.get("message") or "").split()))
        out.append(row)
    return headers, out


def canonical_phase(text: str) -> str:
    """A phase name in any case, as the API spells it (argparse type)."""
    for phase in PHASES:
        if phase.lower() == text.strip().lower():
            return phase
    raise argparse.ArgumentTypeError(f"unknown phase {text!r}; phases: {', '.join(PHASES)}")


def reached(obj: Mapping, want: str) -> bool:
    """Whether ``obj`` is in phase ``want``; Mirrored also counts once passed (the Mirrored
    condition stays True after a pivot or an abort of a ready mirror)."""
    return phase_of(obj) == want or (want == "Mirrored" and condition_true(obj, "Mirrored"))


def cannot_reach(obj: Mapping, want: str) -> str | None:
    """Why ``obj`` can never reach ``want`` (it ended in another terminal phase), or None."""
    phase = phase_of(obj)
    if phase in TERMINAL and phase != want and not reached(obj, want):
        message = " ".join(str((obj.get("status") or {}).get("message") or "").split())
        name = obj["metadata"]["name"]
        return f"{name} is {phase}" + (f": {message}" if message else "")
    return None


# ------------------------------------------------------------------ the Kubernetes API


class Cluster:
    """The BlockCopy API as the kubeconfig (``--kubeconfig``, ``KUBECONFIG``, ~/.kube/config,
    or in a pod its ServiceAccount) and ``--context`` give it, like kubectl."""

    def __init__(self, kubeconfig: str | None, context: str | None):
        import kubernetes

        self._kubernetes = kubernetes
        config = kubernetes.config
        default = os.path.expanduser(config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION)
        have_file = kubeconfig or any(os.path.exists(p) for p in default.split(os.pathsep))
        try:
            if have_file or not os.environ.get("KUBERNETES_SERVICE_HOST"):
                client = config.new_client_from_config(config_file=kubeconfig, context=context)
                contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
                chosen = next((c for c in contexts if c["name"] == (context or active["name"])),
                              active)
                self.default_namespace = (chosen.get("context") or {}).get("namespace") \
                    or "default"
            else:
                config.load_incluster_config()
                client = kubernetes.client.ApiClient()
                with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                    self.default_namespace = f.read().strip() or "default"
        except (config.ConfigException, OSError) as exc:
            raise PluginError(f"cannot load the kubeconfig: {exc}") from None
        self.api = kubernetes.client.CustomObjectsApi(client)
        self.host = client.configuration.host

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        ApiException = self._kubernetes.client.exceptions.ApiException
        try:
            return fn(*args, **kw)
        except ApiException as exc:
            raise self._error(what, exc) from None
        except Exception as exc:  # urllib3's MaxRetryError and friends, an OSError
            if isinstance(exc, OSError) or type(exc).__module__.startswith("urllib3"):
                raise PluginError(f"cannot reach the API server at {self.host}: "
                                  f"{exc}") from None
            raise

    @staticmethod
    def _error(what: str, exc: Any) -> PluginError:
        try:
            message = json.loads(exc.body)["message"]
        except (TypeError, ValueError, KeyError):
            message = exc.reason or str(exc)
        if exc.status == 404:
            if "the server could not find the requested resource" in message:
                return PluginError(f"{what}: the API server does not know BlockCopies "
                                   f"({RESOURCE}): is the CRD installed?")
            return PluginError(f"{what}: not found", NOT_FOUND, status=404)
        return PluginError(f"{what}: {message}", status=exc.status)

    def get(self, namespace: str, name: str) -> dict:
        return self._call(f"blockcopy {name!r} in namespace {namespace!r}",
                          self.api.get_namespaced_custom_object, GROUP, VERSION, namespace,
                          PLURAL, name)

    def list(self, namespace: str | None) -> list[dict]:
        if namespace is None:
            result = self._call("listing BlockCopies", self.api.list_cluster_custom_object,
                                GROUP, VERSION, PLURAL)
        else:
            result = self._call(f"listing BlockCopies in namespace {namespace!r}",
                                self.api.list_namespaced_custom_object, GROUP, VERSION,
                                namespace, PLURAL)
        return sorted(result["items"], key=lambda o: (o["metadata"].get("namespace", ""),
                                                      o["metadata"]["name"]))

    def create(self, body: dict, *, dry_run: bool) -> dict:
        meta = body["metadata"]
        kw = {"dry_run": "All"} if dry_run else {}
        return self._call(f"creating blockcopy {meta['name']!r} in namespace "
                          f"{meta['namespace']!r}", self.api.create_namespaced_custom_object,
                          GROUP, VERSION, meta["namespace"], PLURAL, body, **kw)

    def patch_spec(self, namespace: str, name: str, spec: dict) -> dict:
        return self._call(f"patching blockcopy {name!r} in namespace {namespace!r}",
                          self.api.patch_namespaced_custom_object, GROUP, VERSION, namespace,
                          PLURAL, name, {"spec": spec})


def select(cluster: Cluster, namespace: str, names: Sequence[str], group: str | None
           ) -> list[dict]:
    """The named objects, or the members of ``group`` in ``namespace``; at least one."""
    if group is not None:
        members = [o for o in cluster.list(namespace) if group_of(o) == group]
        if not members:
            raise PluginError(f"no BlockCopy of group {group!r} in namespace {namespace!r}",
                              NOT_FOUND)
        return members
    return [cluster.get(namespace, name) for name in dict.fromkeys(names)]


# ------------------------------------------------------------------ libvirt (move only)


def domain_disks(uri: str, domain: str) -> tuple[str, list[Disk]]:
    """(the domain's name, its disks) from the live XML of the running ``domain`` (name or
    UUID) at ``uri``, read-only."""
    try:
        import libvirt
    except ImportError:
        raise LibvirtCannotTell("libvirt-python is not installed") from None
    libvirt.registerErrorHandler(lambda *_: None, None)  # raised, not also printed
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as exc:
        raise LibvirtCannotTell(f"cannot connect to libvirt at {uri}: "
                                f"{exc.get_error_message()}") from None
    try:
        dom = next((d for d in conn.listAllDomains()
                    if domain in (d.name(), d.UUIDString())), None)
        if dom is None:
            raise LibvirtCannotTell(f"no domain {domain!r} at {uri}", NOT_FOUND)
        if not dom.isActive():
            raise PluginError(f"domain {dom.name()!r} is not running: a block copy needs a "
                              "running VM")
        return dom.name(), disks_from_xml(dom.XMLDesc(0))
    except libvirt.libvirtError as exc:
        raise PluginError(f"libvirt at {uri}: {exc.get_error_message()}") from None
    finally:
        conn.close()


# ------------------------------------------------------------------ subcommands


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
    domain = args.vm
    if wanted:
        # libvirt, when reachable here, tells the sources (destination names) and typos.
        try:
            domain_name, found = domain_disks(args.libvirt_uri, args.vm)
        except LibvirtCannotTell as exc:
            note(f"note: {exc}: destinations are named {args.vm}-<disk>.qcow2")
            disks = [Disk(t) for t in wanted]
        else:
            known = {d.target: d for d in found}
            missing = [t for t in wanted if t not in known]
            if missing:
                raise PluginError(f"domain {domain_name!r} has no disk {missing[0]!r} (its "
                                  f"disks: {', '.join(known) or 'none'})", NOT_FOUND)
            domain, disks = domain_name, [known[t] for t in wanted]
    else:
        try:
            domain, disks = domain_disks(args.libvirt_uri, args.vm)
        except LibvirtCannotTell as exc:
            raise PluginError(f"{exc}{exc.HINT}", exc.code) from None
        if not disks:
            raise PluginError(f"domain {domain!r} has no disks to copy", NOT_FOUND)
    group = args.group or domain
    bodies = manifests(domain=domain, disks=disks, to_dir=to_dir, group=group, node=args.node,
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
    every = args.all_namespaces
    objects = cluster.list(None if every else namespace)
    if args.group is not None:
        objects = [o for o in objects if group_of(o) == args.group]
    return show(args, objects, namespaces=every, message=False,
                empty="No BlockCopies found" + ("" if every else f" in {namespace} namespace")
                + (f" in group {args.group!r}" if args.group is not None else "") + ".")


def cmd_status(args: argparse.Namespace, cluster: Cluster, namespace: str) -> int:
    objects = select(cluster, namespace, args.names, args.group)
    return show(args, objects, namespaces=False, message=True, empty="")


def show(args: argparse.Namespace, objects: list[dict], *, namespaces: bool, message: bool,
         empty: str) -> int:
    if args.output == "json":
        out(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2))
    elif args.output == "yaml":
        out(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": objects},
                           sort_keys=False).rstrip())
    elif not objects:
        note(empty)
    else:
        out(table(*rows(objects, namespaces=namespaces, message=message)))
    return OK


def cmd_set(field: str, args: argparse.Namespace, cluster: Cluster, namespace: str) -> int:
    """pivot / abort: set spec.<field> true on each selected object that can still use it."""
    for obj in select(cluster, namespace, args.names, args.group):
        name, phase = obj["metadata"]["name"], phase_of(obj)
        if (obj.get("spec") or {}).get(field) is True:
            out(f"{RESOURCE}/{name} unchanged (spec.{field} is already true; phase {phase or '-'})")
        elif phase in TERMINAL:
            out(f"{RESOURCE}/{name} not patched: it is already {phase}, nothing to {field}")
        else:
            cluster.patch_spec(namespace, name, {field: True})
            out(f"{RESOURCE}/{name} patched (spec.{field}: true; phase {phase or '-'})")
    return OK


def cmd_wait(args: argparse.Namespace, cluster: Cluster, namespace: str) -> int:
    want, deadline = args.phase, time.monotonic() + args.timeout
    done: set[str] = set()
    while True:
        objects = select(cluster, namespace, args.names, args.group)
        for obj in objects:
            name = obj["metadata"]["name"]
            if name not in done and reached(obj, want):
                done.add(name)
                out(f"{RESOURCE}/{name} {phase_of(obj)}")
        doomed = [why for o in objects if (why := cannot_reach(o, want))]
        if doomed:
            for why in doomed:
                note(f"error: {why}")
            note(f"error: will never be {want}")
            return NOT_REACHED
        if all(reached(o, want) for o in objects):
            return OK
        if time.monotonic() >= deadline:
            waiting = ", ".join(f"{o['metadata']['name']} is {phase_of(o) or 'new'}"
                                + (f" ({p})" if (p := (o.get('status') or {}).get('progress'))
                                   else "")
                                for o in objects if not reached(o, want))
            note(f"error: timed out after {format_duration(args.timeout)} waiting for {want}: "
                 f"{waiting}")
            return NOT_REACHED
        time.sleep(min(args.interval, max(0.0, deadline - time.monotonic())))


# ------------------------------------------------------------------ the command line


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

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=textwrap.fill(description, 79),
                           epilog=EXIT_CODES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p, top=False)
        return p

    move = add("move", "create one BlockCopy per disk of a VM, all in one group",
               "Create one BlockCopy per disk of VM, all in one group (default: the VM's "
               "name), each copying the disk to DIR/<file name of its current source> (or "
               "DIR/<vm>-<disk>.qcow2 when two sources share a file name or the source is "
               "unknown). Without --disk the disks (device='disk') come from the running "
               "domain's live XML in libvirt (--libvirt-uri; run it on the VM's node). The "
               "server checks every object (dry run) before any is created.")
    move.add_argument("vm", metavar="VM", help="libvirt domain name (or UUID)")
    move.add_argument("--to", required=True, metavar="DIR",
                      help="absolute destination directory on the VM's node")
    move.add_argument("--disk", action="append", metavar="TARGET",
                      help="disk target to move (repeatable, or comma-separated); default: "
                           "every disk of the domain, from libvirt")
    move.add_argument("--pivot", action="store_true",
                      help="switch the VM to the copies once Mirrored (spec.pivot: true)")
    move.add_argument("--bandwidth", metavar="Q",
                      help="limit per copy in bytes per second, a quantity such as 100Mi")
    move.add_argument("--node", metavar="N", help="spec.nodeName: the node whose agent copies "
                      "(default: the agent whose libvirt runs the domain claims them)")
    move.add_argument("--group", metavar="G", help="spec.group (default: the VM's name)")
    move.add_argument("--prefix", metavar="P", help="name the BlockCopies P-<disk> (default: "
                      "the VM's name)")
    move.add_argument("--libvirt-uri", default=os.environ.get("LIBVIRT_URI", "qemu:///system"),
                      help="libvirt to read the disks from (default: $LIBVIRT_URI or "
                           "qemu:///system)")
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
        p.add_argument("-o", "--output", choices=["table", "yaml", "json"], default="table")

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
    wait.add_argument("--interval", type=parse_duration, default=1.0, help=argparse.SUPPRESS)
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace, Cluster, str], int]] = {
    "move": cmd_move, "list": cmd_list, "status": cmd_status, "wait": cmd_wait,
    "pivot": lambda a, c, n: cmd_set("pivot", a, c, n),
    "abort": lambda a, c, n: cmd_set("abort", a, c, n),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE
    if args.command in ("status", "pivot", "abort", "wait"):
        if bool(args.names) == (args.group is not None):
            note(f"error: kubectl blockcopy {args.command}: name the BlockCopies or give "
                 "--group, not both")
            return USAGE
    try:
        if args.command == "move" and args.dry_run and args.namespace:
            cluster, namespace = None, args.namespace
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
