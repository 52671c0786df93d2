"""The rules of starting a copy, as pure functions: the refusals that need one look at the
disk (the agent's policy, a destination in the source's own chain, a spec the node cannot
do), how many bytes the destination must hold, the flags and format libvirt is given, the
status fields a started job records, and the messages. ``agent.startchecks`` and
``agent.starter`` gather the facts (file system, libvirt, qemu-img) and call these."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from blockcopy.core import reconcile
from blockcopy.core.plans import Plan, PlanKind
from blockcopy.core.reconcile import Decision
from blockcopy.model.api import BlockCopySpec, Flag, Phase
from blockcopy.model.observation import DiskState, FileIdentity
from blockcopy.model.ports import Capabilities, DiskSize
from blockcopy.model.startedspec import started_fields


def failed(reason: str, message: str) -> Decision:
    return Decision(Phase.FAILED, reason=reason, message=message)


def forbidden(refusal: str) -> Decision:
    return failed("Forbidden", f"{refusal} (the agent's policy); nothing was started")


def own_chain(spec: BlockCopySpec, disk: DiskState, image: str | None) -> Decision | None:
    """``image``: the image of the disk's chain that ``spec.dest`` is (None: none)."""
    if image is None:
        return None
    what = "the disk's active image" if image == disk.source else \
        "an image of the disk's backing chain"
    return failed("DestInSourceChain", f"dest {spec.dest} is {image}, {what}: a copy into "
                  "its own chain would overwrite what it reads; nothing was started")


def unsupported(spec: BlockCopySpec, caps: Capabilities) -> Decision | None:
    """A spec that needs more than this node's libvirt and QEMU can do."""
    if Flag.SYNCHRONOUS_WRITES in spec.flags and not caps.synchronous_writes:
        return failed("NotSupportedHere", f"the synchronousWrites flag needs libvirt 8.0 or "
                      f"newer; this node has {caps.describe()}")
    return None


def encryption_refusal(spec: BlockCopySpec, disk: DiskState, *, planned: bool
                       ) -> Decision | None:
    """An encrypted disk (LUKS) is copied only where the copy stays encrypted with the same
    secret: a file or block device, a full or shallow copy (libvirt makes the destination
    LUKS from the source's <encryption>). Refused where that cannot be promised."""
    if not disk.encrypted:
        return None
    why = None
    if spec.network is not None:
        why = ("a network destination is not made encrypted here (the export would have to "
               "be a LUKS container already)")
    elif planned:
        why = ("spec.base below the backing file and backingChain: copy prepare images with "
               "qemu-img, which would not carry the disk's encryption")
    elif Flag.SHALLOW in spec.flags and Flag.REUSE_EXTERNAL in spec.flags and \
            disk.chain_encrypted:
        why = ("a pre-created shallow destination over an encrypted backing chain cannot be "
               "opened by libvirt without the chain spelled out")
    if why is None:
        return None
    return failed("EncryptionNotKept", f"disk {disk.target} is encrypted (LUKS) and must stay "
                  f"so: {why}; copy the whole disk to a file or block device instead; nothing "
                  "was started")


def not_encrypted(spec: BlockCopySpec) -> Decision:
    return failed("DestNotEncrypted", f"the disk is encrypted (LUKS) but the pre-created dest "
                  f"{spec.dest} is not: create it encrypted with the disk's secret (qemu-img "
                  "create -o encrypt.format=luks), or let the copy create it; nothing was started")


# Refusals that pass: the same request, made again, is accepted. QEMU (7.2 here) times its
# LUKS key derivation by the thread's user CPU time and gives up when one round measured
# 0 ms (a coarse clock on a loaded host): libvirt's new encrypted destination then fails
# at once ("failed to format image"; the file removed) about one time in three here.
PASSING_REFUSALS = ("Unable to get accurate CPU usage",)
START_ATTEMPTS = 8
START_RETRY_DELAY = 0.5  # seconds


def passing_refusal(message: str) -> bool:
    """libvirt's refusal to start a copy is one that passes (try again)."""
    return any(m in message for m in PASSING_REFUSALS)


def copied_images(spec: BlockCopySpec, disk: DiskState, plan: Plan | None) -> tuple[str, ...]:
    """The backing images whose data the copy writes into the destination."""
    if plan is not None and plan.kind == PlanKind.BASE:
        return disk.chain[: disk.chain.index(spec.base)] if spec.base else ()
    if plan is not None or (spec.base is None and Flag.SHALLOW not in spec.flags):
        return disk.chain  # a full copy, or every layer moved
    return ()  # shallow: the top image only


# A LUKS header: QEMU writes 2 MiB of key slots (in a qcow2, rounded up to its clusters).
LUKS_HEADER = 3 << 20


def required_bytes(size: DiskSize, allocations: Mapping[str, int], *, encrypted: bool = False,
                   fmt: str | None = None) -> int:
    """Bytes the destination will take: what the copied images hold (an upper bound:
    clusters overwritten in an upper image are counted twice), at most the disk's size, plus
    a little qcow2 metadata. ``allocations``: bytes each copied backing image occupies.
    An ``encrypted`` copy also holds its LUKS header; one that is not a qcow2 (``fmt``) is a
    raw LUKS container, which QEMU writes whole (a zero is ciphertext there, never a hole):
    the disk's capacity plus the header, whatever the source holds."""
    if encrypted and fmt != "qcow2":
        return size.capacity + LUKS_HEADER
    data = size.allocation + sum(allocations.values())
    header = LUKS_HEADER if encrypted else 0
    return min(data, size.capacity) + size.capacity // 256 + (1 << 20) + header


def space_basis(*, encrypted: bool, fmt: str | None) -> str:
    """What ``required_bytes`` counted, for the DestNoSpace message."""
    if encrypted and fmt != "qcow2":
        return ("a raw copy of an encrypted disk is a LUKS container written whole: the "
                "disk's capacity plus the LUKS header")
    if encrypted:
        return "the data allocated in the images it copies, plus the LUKS header"
    return "the data allocated in the images it copies"


def copy_flags_and_format(spec: BlockCopySpec, disk: DiskState, plan: Plan | None
                          ) -> tuple[frozenset[Flag], str | None]:
    """The flags libvirt is given, and the format when it is known without probing the
    destination (None: probe it, a reuseExternal destination without spec.format)."""
    flags = set(reconcile.copy_flags(spec, disk))
    fmt = spec.format
    if plan is not None:
        flags |= {Flag.SHALLOW, Flag.REUSE_EXTERNAL}  # onto the prepared top image
        fmt = "qcow2"
    elif spec.network is not None:
        flags.add(Flag.REUSE_EXTERNAL)  # an export exists; libvirt cannot create one
        fmt = "raw"
    if fmt is None and Flag.REUSE_EXTERNAL not in flags:
        fmt = disk.source_format or "raw"
    return frozenset(flags), fmt


def zero_detection_off(spec: BlockCopySpec, flags: frozenset[Flag], plan: Plan | None,
                       caps: Capabilities, *, encrypted: bool = False) -> str | None:
    """Why the destination is written without zero detection, or None: it is used."""
    if not spec.detect_zeroes:
        return "off (spec.detectZeroes: false)"
    if encrypted:
        return "off (an encrypted destination)"
    if not caps.blockdev_reopen:
        return f"off (needs QEMU 6.1; this node has {'.'.join(map(str, caps.qemu))})"
    if spec.network is not None:
        return "off (a network destination)"
    if plan is not None or Flag.SHALLOW in flags:
        return "off (a shallow copy: the destination has a backing file)"
    return None


def plan_message(plan: Plan) -> str:
    if plan.kind == PlanKind.BASE:
        return (f"the destination is prepared backed by {plan.base}, holding the data of "
                f"the {plan.chain.index(str(plan.base)) - 1} image(s) above it")
    return (f"moving the chain of {len(plan.chain)} images next to {plan.targets[0]}; "
            "the lower images are copied and verified while the top is mirrored")


def preparing(plan: Plan) -> tuple[Decision, dict[str, Any]]:
    """The Preparing decision and the fields it records (the plan, before any file)."""
    return (Decision(Phase.PREPARING, reconcile.Action.PREPARE, reason="Preparing",
                     message=plan_message(plan)),
            {"plan": plan.status(), "createdFiles": plan.created_files})


def started(spec: BlockCopySpec, disk: DiskState, *, raw_spec: Mapping[str, Any],
            decision: Decision, plan: Plan | None, fmt: str, flags: frozenset[Flag],
            target: str, block_device: bool, created_before: list[str], now: str,
            identity: FileIdentity | None = None) -> tuple[Decision, dict[str, Any]]:
    """The Copying decision once libvirt accepted the job, and the status fields recorded
    with it (what was started, with which flags, the files created for it)."""
    created = list(created_before)
    if plan is None and Flag.REUSE_EXTERNAL not in flags and not block_device:
        created.append(spec.dest)  # libvirt created it for us
    fields: dict[str, Any] = {
        "source": disk.source, "target": target, "format": fmt,
        "flags": sorted(f.value for f in flags), "startTime": now,
        "bandwidth": spec.bandwidth, "startedSpec": started_fields(raw_spec)}
    if created:
        fields["createdFiles"] = created
    if identity is not None:  # what the copy writes: the pivot checks it is still that file
        fields["destIdentity"] = identity.status()
    if plan is not None and plan.kind == PlanKind.CHAIN:
        fields["layers"] = [{"source": s, "dest": t, "state": "Pending"} for s, t, _ in plan.lower]
    message = reconcile.started_message(spec, source=disk.source, fmt=fmt, flags=flags)
    if plan is not None:
        message += f" ({plan_message(plan)})"
    return dataclasses.replace(decision, message=message), fields
