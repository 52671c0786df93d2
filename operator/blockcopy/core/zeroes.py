"""Zero detection on a copy's destination: zeros the guest wrote are not copied as data.

libvirt (9.0 and 11.3 alike) gives a block copy's target the source disk's
``discard``/``detect_zeroes`` and ignores them in the destination XML, so a guest that zeroed
its free space, or a converted image, fills the destination with written zeros (a 2 GiB disk
with 8 MiB of data and 256 MiB of written zeros: a 264 MiB copy). QEMU (6.1 and later) can
change an open node's options: the agent starts the copy throttled to 1 byte/s, reopens the
mirror's target node with ``detect-zeroes=unmap`` and ``discard=unmap`` (every other option
as libvirt set it, the storage child kept by reference), then lifts the throttle. What QEMU
copied before the reopen is at most one mirror buffer (``ZERO_BUFFER``). After the pivot the
node gets libvirt's options back (the guest's discards and zero writes behave as its XML
says). Pure: the options of QEMU's ``blockdev-reopen``, built from what libvirt shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

THROTTLE = 1  # bytes/s: the copy waits for the reopen (a start at full speed copies on)
ZERO_BUFFER = 4 << 20  # the mirror's buffer while detection is on: the most copied before it
QEMU_REOPEN = (6, 1, 0)  # blockdev-reopen takes a list of nodes

# libvirt's <driver cache=...> as QEMU's cache options: (direct, no-flush)
CACHE_MODES = {"none": (True, False), "writethrough": (False, False),
               "writeback": (False, False), "directsync": (True, False),
               "unsafe": (False, True)}


class ZeroesError(Exception):
    """The node cannot be reopened as asked (said why)."""


def reopen_options(*, index: int, nodes: Mapping[str, Mapping[str, Any]], cache: str | None,
                   io: str | None, on: bool) -> dict[str, Any]:
    """The ``blockdev-reopen`` options of the image libvirt numbered ``index`` (its
    ``<source index='N'>``), with zero detection ``on`` or back to libvirt's defaults.
    ``nodes``: QEMU's ``query-named-block-nodes`` by node name. A format node (qcow2, raw
    over a storage node) is reopened keeping its storage child by reference; a raw image
    that libvirt opened as a single storage node (libvirt 11 with QEMU 9.1) is reopened
    whole. A node with a backing file (a shallow copy) is not handled: its backing child
    would have to be named too."""
    fmt, storage = f"libvirt-{index}-format", f"libvirt-{index}-storage"
    options: dict[str, Any] = {"read-only": False, "discard": "unmap" if on else "ignore"}
    if on:
        options["detect-zeroes"] = "unmap"
    if cache is not None:
        if cache not in CACHE_MODES:
            raise ZeroesError(f"cache mode {cache!r} is unknown")
        direct, no_flush = CACHE_MODES[cache]
        options["cache"] = {"direct": direct, "no-flush": no_flush}
    if fmt in nodes:
        node = nodes[fmt]
        if node.get("backing_file_depth") or (node.get("image") or {}).get("backing-filename"):
            raise ZeroesError("the destination has a backing file (a shallow copy)")
        if node.get("encrypted"):
            raise ZeroesError("the destination is encrypted")
        options.update({"driver": node["drv"], "node-name": fmt, "file": storage})
        if node["drv"] == "qcow2":
            options["backing"] = None
        return options
    if storage in nodes:
        node = nodes[storage]
        options.update({"driver": node["drv"], "node-name": storage, "filename": node["file"]})
        if io is not None:
            options["aio"] = io
        return options
    raise ZeroesError(f"QEMU has no node for image {index} (libvirt-{index}-format/-storage)")
