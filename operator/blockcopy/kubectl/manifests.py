"""The BlockCopies of ``move``: one per disk, named after the domain and the disk, each to a
destination in the target directory, all in one group."""

from __future__ import annotations

import dataclasses
import posixpath
import re
from collections.abc import Sequence
from typing import Any

from blockcopy.kubectl.errors import USAGE, PluginError
from blockcopy.kubectl.names import GROUP_LABEL
from blockcopy.model.api import GROUP, KIND, VERSION


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
    """One disk (device='disk') of a domain, from the node inventory (or named by hand)."""

    target: str
    source: str | None = None  # file or block device path; None: network, volume or empty
    format: str | None = None  # the driver's type (qcow2, raw)


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
              namespace: str, prefix: str | None = None) -> list[dict[str, Any]]:
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
