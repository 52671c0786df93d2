"""The phase logic: from a spec, the current phase and what libvirt shows, decide the next
phase and the one action to take. Pure: no I/O, no clock; exhaustively unit-tested.

Safety rules encoded here:
- pivot only when the live mirror says ready='yes' (never on cur == end alone);
- a job that is not ours (another destination, another job type) is never touched;
- when the outcome is unclear, end on the source (Failed or Aborted), never pivot.
"""

from __future__ import annotations

import dataclasses
import enum
import posixpath

from blockcopy.model.api import JOB_PHASES, TERMINAL_PHASES, BlockCopySpec, Flag, Phase
from blockcopy.model.observation import DiskState, JobEvent, MirrorReady


class Action(enum.StrEnum):
    NONE = "none"
    START_COPY = "startCopy"
    PREPARE = "prepare"  # record a plan; its files are made before the copy starts
    PIVOT = "pivot"
    ABORT = "abort"  # end the job, stay on the source
    SET_BANDWIDTH = "setBandwidth"


@dataclasses.dataclass(frozen=True)
class Decision:
    phase: Phase
    action: Action = Action.NONE
    message: str = ""
    reason: str = ""  # CamelCase, for conditions and Events; "" = the phase name
    warning: bool = False  # something went wrong (a refused action): a Warning Event


def same_path(a: str | None, b: str | None) -> bool:
    """Same file or device path (normalized), or the same NBD URI."""
    if a is None or b is None:
        return False
    if "://" in a or "://" in b:
        return a == b
    return posixpath.normpath(a) == posixpath.normpath(b)


def decide(
    spec: BlockCopySpec,
    current: Phase | None,
    disk: DiskState,
    *,
    last_event: JobEvent | None = None,
    was_mirrored: bool = False,
) -> Decision:
    """Next phase and action for a BlockCopy owned by this node's agent."""
    if current in TERMINAL_PHASES:
        return Decision(current)
    started = current in JOB_PHASES
    name = spec.domain

    if not disk.domain_found:
        if started:
            return Decision(Phase.FAILED, message=f"domain {name!r} disappeared during the copy "
                            "(destroyed or undefined); the copy was lost", reason="DomainGone")
        return Decision(Phase.FAILED, message=f"domain {name!r} not found on this node",
                        reason="DomainNotFound")
    if not disk.domain_running:
        if started:
            return Decision(Phase.FAILED, message=f"domain {name!r} stopped during the copy; "
                            "the VM stays on its source", reason="DomainStopped")
        return Decision(Phase.FAILED, message=f"domain {name!r} is not running; a block copy "
                        "needs a running VM", reason="DomainNotRunning")
    if not disk.disk_found:
        return Decision(Phase.FAILED, message=f"disk {spec.disk!r} not found in domain {name!r}",
                        reason="DiskNotFound")

    mirror = disk.mirror
    ours = mirror is not None and same_path(mirror.dest, spec.dest)
    busy = (mirror is not None and not ours) or (mirror is None and disk.job is not None)

    if not started:
        if ours:
            assert mirror is not None
            # A job of ours already runs (the agent restarted before recording it): adopt it.
            phase = Phase.MIRRORED if mirror.ready == MirrorReady.READY else Phase.COPYING
            return Decision(phase, message="adopted the running block job", reason="Adopted")
        if busy:
            other = f" (copy to {mirror.dest})" if mirror is not None else ""
            return Decision(Phase.FAILED, reason="DiskBusy",
                            message=f"disk {disk.target} already has a block job{other}; "
                            "one block copy per disk at a time")
        if same_path(disk.source, spec.dest):
            return Decision(Phase.FAILED, reason="DestIsSource",
                            message=f"dest {spec.dest} is the disk's current source")
        if spec.base is not None and not any(same_path(spec.base, p) for p in disk.chain):
            chain = " -> ".join(p for p in (disk.source, *disk.chain) if p)
            return Decision(Phase.FAILED, reason="BaseNotInChain",
                            message=f"spec.base {spec.base} is not an image of the disk's "
                            f"backing chain ({chain}); nothing was created")
        if spec.abort:
            return Decision(Phase.ABORTED, reason="AbortedBeforeStart",
                            message="abort was set before the copy started; nothing was copied")
        return Decision(Phase.COPYING, Action.START_COPY, reason="Started",
                        message=f"copying {disk.source} to {spec.dest}")

    # A job of ours was started earlier.
    if ours:
        assert mirror is not None
        if mirror.ready == MirrorReady.ABORTING:
            return Decision(Phase.ABORTING, message="the job is ending; the VM stays on its source")
        if mirror.ready == MirrorReady.PIVOTING:
            return Decision(Phase.PIVOTING, message="switching the VM to the destination")
        if spec.abort or current == Phase.ABORTING:
            return Decision(Phase.ABORTING, Action.ABORT, message="ending the job on user request")
        if mirror.ready == MirrorReady.READY:
            if spec.pivot:
                return Decision(Phase.PIVOTING, Action.PIVOT,
                                message="mirror is ready; switching the VM to the destination")
            return Decision(Phase.MIRRORED, _bandwidth_action(spec, disk),
                            message="source and destination are in sync; set spec.pivot to switch")
        if current == Phase.PIVOTING:
            # Pivot asked for but the mirror is not ready (cannot happen with a ready='yes'
            # check first, but never pivot blind): go back to waiting.
            return Decision(Phase.COPYING, message="waiting for the mirror to be ready")
        return Decision(Phase.COPYING, _bandwidth_action(spec, disk), message="copying")

    # Our job is gone. Where did the disk end up?
    if same_path(disk.source, spec.dest):
        return Decision(Phase.PIVOTED, reason="Pivoted",
                        message=f"the VM now runs on {spec.dest}")
    if current == Phase.ABORTING or spec.abort:
        # (spec.abort without Aborting: the agent died between the abort and its record.)
        if was_mirrored:
            return Decision(Phase.ABORTED, reason="Aborted",
                            message=f"job ended after the mirror was ready: {spec.dest} is a "
                            "consistent point-in-time copy; the VM stays on its source")
        return Decision(Phase.ABORTED, reason="Aborted",
                        message=f"job cancelled before the mirror was ready: {spec.dest} is "
                        "incomplete; the VM stays on its source")
    if current == Phase.PIVOTING:
        return Decision(Phase.FAILED, reason="PivotFailed",
                        message="the job ended without switching to the destination; "
                        "the VM stays on its source")
    if last_event == JobEvent.FAILED:
        return Decision(Phase.FAILED, reason="JobFailed",
                        message="libvirt reported the block job failed (for example the "
                        "destination is full or unwritable); the VM stays on its source")
    if last_event == JobEvent.CANCELED:
        return Decision(Phase.FAILED, reason="JobCanceled",
                        message="the block job was cancelled outside the operator; "
                        "the VM stays on its source")
    return Decision(Phase.FAILED, reason="JobLost",
                    message="the block job ended unexpectedly; the VM stays on its source")


def copy_flags(spec: BlockCopySpec, disk: DiskState) -> frozenset[Flag]:
    """The flags to pass to libvirt for this spec and disk."""
    flags = set(spec.flags)
    if spec.base is not None:
        flags.add(Flag.SHALLOW)  # onto base (the top's backing file, or a prepared image)
    if disk.domain_persistent:
        flags.add(Flag.TRANSIENT_JOB)  # QEMU refuses a copy on a persistent domain without it
    return frozenset(flags)


def _bandwidth_action(spec: BlockCopySpec, disk: DiskState) -> Action:
    if disk.job is not None and disk.job.bandwidth != spec.bandwidth:
        return Action.SET_BANDWIDTH
    return Action.NONE


def started_message(spec: BlockCopySpec, *, source: str | None, fmt: str,
                    flags: frozenset[Flag]) -> str:
    """What the Copying phase says once libvirt accepted the job."""
    notes = []
    if Flag.TRANSIENT_JOB in flags and Flag.TRANSIENT_JOB not in spec.flags:
        notes.append("transientJob added: the domain is persistent, and the job is lost "
                     "if the VM stops")
    if spec.base is not None:
        notes.append("shallow: base is the top image's backing file")
    tail = f" ({'; '.join(notes)})" if notes else ""
    return f"copying {source} to {spec.dest} as {fmt}{tail}"


def refused(decision: Decision, current: Phase | None, message: str) -> Decision:
    """The decision to record when libvirt refused ``decision``'s action: the phase stays
    (a refused pivot keeps mirroring, the VM stays on its source) and it is retried later."""
    if decision.action == Action.PIVOT:
        return Decision(Phase.MIRRORED, reason="PivotRefused", warning=True,
                        message=f"libvirt refused the pivot, will retry: {message}")
    verb = decision.action.value
    return Decision(current or Phase.COPYING, reason=f"{verb[0].upper()}{verb[1:]}Failed",
                    warning=True, message=f"{verb} failed, will retry: {message}")

