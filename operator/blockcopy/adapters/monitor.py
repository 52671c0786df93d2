"""QEMU's monitor, through libvirt's passthrough (``libvirt_qemu.qemuMonitorCommand``), for
what libvirt has no API for: switching a running mirror to write-blocking
(``block-job-change``, QEMU 8.2) and zero detection on a copy's destination
(``blockdev-reopen``, QEMU 6.1). libvirt marks a domain that got such a command tainted
(``custom-monitor``)."""

from __future__ import annotations

import json
from typing import Any

import libvirt
import libvirt_qemu

from blockcopy.core import zeroes
from blockcopy.core.domainxml import node_index
from blockcopy.model.ports import HypervisorError


def qmp(dom: libvirt.virDomain, command: str, **arguments: Any) -> Any:
    """One QMP command; QEMU's error as a HypervisorError (a refusal)."""
    message: dict[str, Any] = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(message), 0))
    if "error" in reply:
        raise HypervisorError(f"QEMU refused {command}: {reply['error'].get('desc')}")
    return reply.get("return")


def set_copy_mode(dom: libvirt.virDomain, target: str, mode: str) -> None:
    """Switch the running mirror of ``target`` to ``mode`` (write-blocking)."""
    jobs = qmp(dom, "query-block-jobs") or []
    ids = [j["device"] for j in jobs if j.get("type") == "mirror"
           and j.get("device", "").startswith(f"copy-{target}-")]
    if not ids:
        raise HypervisorError(f"no mirror job of {target} in QEMU")
    qmp(dom, "block-job-change", id=ids[0], type="mirror", **{"copy-mode": mode})


def _nodes(dom: libvirt.virDomain) -> dict[str, dict[str, Any]]:
    return {n["node-name"]: n for n in qmp(dom, "query-named-block-nodes", flat=True) or []}


def set_zero_detection(dom: libvirt.virDomain, target: str, *, on: bool, mirror: bool) -> None:
    """Reopen the mirror's destination node (``mirror``) or the disk's active node with
    zero detection on (detect-zeroes and discard unmap), or back to libvirt's defaults."""
    try:
        index, cache, io = node_index(dom.XMLDesc(0), target, mirror=mirror)
        options = zeroes.reopen_options(index=index, nodes=_nodes(dom), cache=cache, io=io,
                                        on=on)
    except (ValueError, zeroes.ZeroesError) as exc:
        raise HypervisorError(f"zero detection: {exc}") from None
    qmp(dom, "blockdev-reopen", options=[options])
    node = _nodes(dom).get(options["node-name"]) or {}
    if (node.get("detect_zeroes") == "unmap") != on:
        raise HypervisorError(f"zero detection: QEMU shows detect_zeroes "
                              f"{node.get('detect_zeroes')!r} on {options['node-name']}")


def flush_images(dom: libvirt.virDomain) -> None:
    """QMP ``stop`` on the paused VM: QEMU stops it (already stopped: nothing changes for the
    guest or libvirt) and flushes every block node, the qcow2 metadata caches included."""
    qmp(dom, "stop")
