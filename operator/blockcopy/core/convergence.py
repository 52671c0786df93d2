"""Does a copy converge, and what ``spec.convergence: auto`` does about one that does not.

The ``Converging`` condition comes from the progress estimate (``progress``): False
(NotConverging, a Warning Event) while what remains does not shrink, True while it does,
InSync once the copy reached sync. With ``convergence: auto`` and a copy that does not
converge, the agent switches the running mirror to write-blocking where QEMU can (8.2), once
per copy, and says so in the ``ConvergenceAssist`` condition. Pure: the follower samples the
progress and acts; this module says what it means.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from blockcopy.core.progress import Estimate, duration
from blockcopy.model.api import BlockCopySpec, Convergence, Phase
from blockcopy.model.ports import Capabilities

CONVERGING = "Converging"
ASSIST = "ConvergenceAssist"  # what spec.convergence auto did

Condition = dict[str, Any]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _kept(before: Mapping[str, Any] | None) -> list[Condition]:
    return [{k: before[k] for k in ("type", "status", "reason", "message")}] if before else []


def find(conditions: Sequence[Mapping[str, Any]] | None, ctype: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or () if c.get("type") == ctype), None)


@dataclasses.dataclass(frozen=True)
class Progress:
    """status.rate / status.eta, the Converging condition, and a Warning to post (if any)."""

    fields: dict[str, Any]
    conditions: list[Condition]
    warning: str | None = None  # the NotConverging Event's message, on the flip to False

    @property
    def not_converging(self) -> bool:
        return any(c["type"] == CONVERGING and c["status"] == "False" for c in self.conditions)


def progress(phase: Phase, *, has_job: bool, estimate: Estimate | None,
             previous: Sequence[Mapping[str, Any]] | None) -> Progress:
    """What a step records about progress, from the phase it decided and the estimate."""
    before = find(previous, CONVERGING)
    kept = _kept(before)
    if phase != Phase.COPYING or not has_job:
        if before is not None and phase in (Phase.MIRRORED, Phase.PIVOTING, Phase.PIVOTED):
            kept = [{"type": CONVERGING, "status": "True", "reason": "InSync",
                     "message": "the copy reached sync"}]
        return Progress({"rate": None, "eta": None}, kept)
    if estimate is None:
        return Progress({"rate": None, "eta": None}, kept)
    fields = {"rate": estimate.rate,
              "eta": duration(estimate.eta) if estimate.eta is not None else None}
    if estimate.converging is None:
        return Progress(fields, kept)
    if estimate.converging:
        return Progress(fields, [{
            "type": CONVERGING, "status": "True", "reason": "Converging",
            "message": f"what remains shrinks: {_mib(estimate.rate)}/s copied, "
                       f"{_mib(estimate.growth)}/s dirtied by the guest"}])
    message = (f"the copy does not converge: the guest dirties {_mib(estimate.growth)}/s "
               f"while {_mib(estimate.rate)}/s are copied, so it will never be Mirrored "
               "as things are. Raise spec.bandwidth (or remove the limit), or start the "
               "copy again with the synchronousWrites flag (guest writes then go to both "
               "sides; a running copy cannot switch on QEMU 7.2), or slow the guest down")
    flipped = before is None or before.get("status") != "False"
    return Progress(fields, [{"type": CONVERGING, "status": "False", "reason": "NotConverging",
                              "message": message}], warning=message if flipped else None)


@dataclasses.dataclass(frozen=True)
class Assist:
    """What the convergence assist did (or why not): status fields, the ConvergenceAssist
    condition, and an Event (type, reason, message) when something happened."""

    fields: dict[str, Any]
    conditions: list[Condition]
    event: tuple[str, str, str] | None = None


def kept_assist(previous: Sequence[Mapping[str, Any]] | None) -> Assist:
    """Nothing new: the condition as it was."""
    return Assist({}, _kept(find(previous, ASSIST)))


def assist_wanted(spec: BlockCopySpec, progress_now: Progress, *, copy_mode: str | None,
                  previous: Sequence[Mapping[str, Any]] | None) -> bool:
    """Should the agent switch this copy to write-blocking now? Once per copy, only with
    convergence auto, only while it does not converge, and not again where it cannot."""
    before = find(previous, ASSIST)
    return (spec.convergence == Convergence.AUTO and progress_now.not_converging
            and copy_mode != "write-blocking"
            and not (before is not None and before.get("reason") == "NeedsQEMU82"))


def assist_unsupported(caps: Capabilities) -> Assist:
    message = (f"spec.convergence auto cannot help here: {caps.describe()}; switching a "
               "running copy to write-blocking needs QEMU 8.2 (block-job-change). The copy "
               "goes on as it is: raise the bandwidth, or restart it with the "
               "synchronousWrites flag")
    return Assist({}, [{"type": ASSIST, "status": "False", "reason": "NeedsQEMU82",
                        "message": message}], ("Warning", "NeedsQEMU82", message))


def assist_failed(error: str) -> Assist:
    message = f"switching the copy to write-blocking failed: {error}"
    return Assist({}, [{"type": ASSIST, "status": "False", "reason": "SwitchFailed",
                        "message": message}], ("Warning", "SwitchFailed", message))


def assist_switched() -> Assist:
    message = ("the copy did not converge: its running mirror now blocks guest writes until "
               "they reach both sides (write-blocking, QEMU's block-job-change through "
               "libvirt's monitor passthrough, which taints the domain), so it converges")
    return Assist({"copyMode": "write-blocking"},
                  [{"type": ASSIST, "status": "True", "reason": "WriteBlocking",
                    "message": message}], ("Normal", "WriteBlocking", message))
