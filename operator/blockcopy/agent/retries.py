"""The follow loop's retries: when to try again, and what users are told meanwhile.

Three things fail in a row on their own schedule (``core.backoff``), and a success resets
each: libvirtd cannot be reached (an outage: a Warning Event once, the message says since
when, an Event when it is back); libvirt fails a look (say a transient domain went away
mid-query: look again soon, the next look sees what became of it); libvirt refuses an
action (a pivot before it is ready: only a spec change may cut that wait short). KubeVirt's
virt-handler keeps the same rule in one retry manager instead of at every call site.
"""

from __future__ import annotations

import logging

from blockcopy.agent.recorder import ObjectRecorder
from blockcopy.core import status
from blockcopy.core.backoff import LIBVIRT_UNREACHABLE, REFUSED_ACTION, Backoff

log = logging.getLogger(__name__)


class Retries:
    def __init__(self, recorder: ObjectRecorder):
        self.recorder = recorder
        self._unreachable = Backoff(LIBVIRT_UNREACHABLE)
        self._look_failures = Backoff(LIBVIRT_UNREACHABLE)
        self._refusals = Backoff(REFUSED_ACTION)
        self.unreachable_since: str | None = None
        self.refusal_delay = 0.0  # s until a refused action is tried again

    # -- libvirtd unreachable -----------------------------------------------------------
    def unreachable(self, message: str) -> float:
        """libvirtd could not be reached: the wait before the next try."""
        delay = self._unreachable.failed()
        self.recorder.agent.metrics.libvirt_up(False)
        if self.unreachable_since is None:
            self.unreachable_since = status.timestamp(self.recorder.agent.clock())
            self.recorder.event("Warning", "LibvirtUnreachable", message)
            log.warning("libvirt unreachable: %s", message)
        self.recorder.note(f"libvirt unreachable since {self.unreachable_since}, retrying in "
                           f"{delay:g}s: {message}")
        return delay

    def reached(self) -> None:
        """A call reached libvirtd."""
        self._unreachable.succeeded()
        self.recorder.agent.metrics.libvirt_up(True)
        if self.unreachable_since is not None:
            log.info("%s/%s: libvirt reachable again (unreachable since %s)",
                     *self.recorder.key, self.unreachable_since)
            self.recorder.event("Normal", "LibvirtReachable", f"libvirt reachable again after "
                                f"an outage since {self.unreachable_since}")
            self.unreachable_since = None

    # -- a failed look ------------------------------------------------------------------
    def look_failed(self, message: str) -> float:
        delay = self._look_failures.failed()
        log.warning("%s/%s: libvirt failed to report the disk, looking again in %gs: %s",
                    *self.recorder.key, delay, message)
        self.recorder.note(f"libvirt failed to report the disk, looking again in {delay:g}s: "
                           f"{message}")
        return delay

    def looked(self) -> None:
        self._look_failures.succeeded()

    # -- a refused action ---------------------------------------------------------------
    @property
    def refusing(self) -> bool:
        """The last action was refused (until one succeeds)."""
        return self._refusals.active

    def refused(self) -> None:
        self.refusal_delay = self._refusals.failed()

    def acted(self) -> None:
        self._refusals.succeeded()
