"""Prometheus metrics of the agent (prometheus-client's default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from blockcopy.api import Phase

_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600)

BLOCKCOPIES = Gauge("blockcopy_objects", "BlockCopies owned by this agent, by phase", ["phase"])
COPIED_BYTES = Counter("blockcopy_copied_bytes", "Bytes copied by block jobs of this agent "
                       "(sum of libvirt's cur increments)")
COPY_SECONDS = Histogram("blockcopy_copy_duration_seconds",
                         "Time from the start of a job to Mirrored", buckets=_DURATION_BUCKETS)
MIRROR_SECONDS = Histogram("blockcopy_mirror_duration_seconds",
                           "Time spent Mirrored before the pivot or abort ended the job",
                           buckets=_DURATION_BUCKETS)
PIVOT_SECONDS = Histogram("blockcopy_pivot_latency_seconds",
                          "Time from issuing the pivot to the VM running on the destination",
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
ERRORS = Counter("blockcopy_errors", "Failures and refused actions, by reason", ["reason"])
COPY_RATE = Gauge("blockcopy_copy_rate_bytes_per_second", "Bytes copied per second by each "
                  "copy (over the last 10 s), while Copying", ["namespace", "name"])
COPY_ETA = Gauge("blockcopy_copy_eta_seconds", "Estimated seconds until each copy is Mirrored "
                 "(absent when it does not converge)", ["namespace", "name"])
NOT_CONVERGING = Gauge("blockcopy_not_converging", "1 while a copy does not converge (the guest "
                       "writes faster than it copies), else 0", ["namespace", "name"])
HYPERVISOR = Gauge("blockcopy_hypervisor_info", "The connected libvirt and QEMU (value 1), and "
                   "what they can do", ["libvirt", "qemu", "synchronous_writes",
                                        "block_job_change"])
WATCH_EVENTS = Counter("blockcopy_watch_events", "Watch events received, by stream (objects: "
                       "this node's, filtered by the API server; unclaimed) and by whose object "
                       "it was (this-node, other-node, unclaimed): other-node stays 0",
                       ["stream", "owner"])

for _phase in Phase:
    BLOCKCOPIES.labels(_phase.value)


class PhaseCounts:
    """Keeps the per-phase gauge equal to the phases of the objects this agent owns."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str], str] = {}
        self._cur: dict[tuple[str, str], int] = {}

    def set(self, key: tuple[str, str], phase: str | None) -> None:
        old = self._phases.pop(key, None)
        if old is not None:
            BLOCKCOPIES.labels(old).dec()
        if phase is not None:
            self._phases[key] = phase
            BLOCKCOPIES.labels(phase).inc()

    def count(self, phase: str) -> int:
        """How many of the objects are in ``phase`` now."""
        return sum(1 for p in self._phases.values() if p == phase)

    def forget(self, key: tuple[str, str]) -> None:
        self.set(key, None)
        self._cur.pop(key, None)

    def copied(self, key: tuple[str, str], cur: int | None) -> None:
        """Count the growth of libvirt's cur for one job (a restart adopts the last value)."""
        if cur is None:
            return
        last = self._cur.get(key)
        if last is not None and cur > last:
            COPIED_BYTES.inc(cur - last)
        elif last is None and cur > 0:
            COPIED_BYTES.inc(cur)
        self._cur[key] = max(cur, last or 0)


def set_progress(key: tuple[str, str], *, rate: int | None, eta: float | None,
                 not_converging: bool) -> None:
    """The per-copy gauges; None removes a series (nothing to report)."""
    for gauge, value in ((COPY_RATE, rate), (COPY_ETA, eta)):
        if value is None:
            try:
                gauge.remove(*key)
            except KeyError:
                pass
        else:
            gauge.labels(*key).set(value)
    NOT_CONVERGING.labels(*key).set(1 if not_converging else 0)


def forget_progress(key: tuple[str, str]) -> None:
    for gauge in (COPY_RATE, COPY_ETA, NOT_CONVERGING):
        try:
            gauge.remove(*key)
        except KeyError:
            pass


def count_watch_event(stream: str, label: str | None, node: str) -> None:
    owner = "unclaimed" if not label else "this-node" if label == node else "other-node"
    WATCH_EVENTS.labels(stream, owner).inc()


def serve(port: int) -> None:
    start_http_server(port)
