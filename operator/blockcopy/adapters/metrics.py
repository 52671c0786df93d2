"""Prometheus metrics of the agent (``model.metrics.Metrics``, in prometheus-client's default
registry, served on ``--metrics-port``).

As Prometheus expects them: bytes are a counter (dashboards and alerts compute the rate with
``rate()``), and the per-copy labels are ``blockcopy_namespace`` and ``blockcopy_name``, not
``namespace`` and ``name``, which a scrape's target labels (a ServiceMonitor's ``namespace``,
``pod``, ``node``...) would overwrite or rename to ``exported_*``."""

from __future__ import annotations

import platform
from importlib import metadata

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from blockcopy import __version__
from blockcopy.model.api import Phase
from blockcopy.model.metrics import Key
from blockcopy.model.ports import Capabilities

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
# The labels of per-copy series: the BlockCopy's namespace and name.
PER_COPY_LABELS = ["blockcopy_namespace", "blockcopy_name"]
COPY_BYTES = Counter("blockcopy_copy_bytes", "Bytes copied by each copy's block job (the "
                     "growth of libvirt's cur; rate() of it is the copy rate), until the object "
                     "is deleted", PER_COPY_LABELS)
COPY_ETA = Gauge("blockcopy_copy_eta_seconds", "Estimated seconds until each copy is Mirrored "
                 "(absent when it does not converge), while Copying", PER_COPY_LABELS)
NOT_CONVERGING = Gauge("blockcopy_not_converging", "1 while a copy does not converge (the guest "
                       "writes faster than it copies), else 0; while Copying", PER_COPY_LABELS)
HYPERVISOR = Gauge("blockcopy_hypervisor_info", "The connected libvirt and QEMU (value 1), and "
                   "what they can do", ["libvirt", "qemu", "synchronous_writes",
                                        "block_job_change"])
LIBVIRT_UP = Gauge("blockcopy_libvirt_up", "1 when the agent's last call to libvirtd (its "
                   "periodic check or a copy's) reached it, else 0")
BUILD_INFO = Gauge("blockcopy_build_info", "The agent's build (value 1)",
                   ["version", "python_version", "libvirt_python"])
WATCH_EVENTS = Counter("blockcopy_watch_events", "Watch events received, by stream (objects: "
                       "this node's, filtered by the API server; unclaimed) and by whose object "
                       "it was (this-node, other-node, unclaimed): other-node stays 0",
                       ["stream", "owner"])
_DURATIONS = {"copy": COPY_SECONDS, "mirror": MIRROR_SECONDS, "pivot": PIVOT_SECONDS}
_ESTIMATES = (COPY_ETA, NOT_CONVERGING)
_PER_COPY = (*_ESTIMATES, COPY_BYTES)

for _phase in Phase:
    BLOCKCOPIES.labels(_phase.value)


def _distribution_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


BUILD_INFO.labels(__version__, platform.python_version(),
                  _distribution_version("libvirt-python")).set(1)


def _remove(metric: Gauge | Counter, key: Key) -> None:
    try:
        metric.remove(*key)
    except KeyError:
        pass


class PrometheusMetrics:
    def objects(self, phase: str, count: int) -> None:
        BLOCKCOPIES.labels(phase).set(count)

    def copied(self, key: Key, nbytes: int) -> None:
        COPIED_BYTES.inc(nbytes)
        COPY_BYTES.labels(*key).inc(nbytes)

    def duration(self, what: str, seconds: float) -> None:
        _DURATIONS[what].observe(seconds)

    def error(self, reason: str) -> None:
        ERRORS.labels(reason).inc()

    def progress(self, key: Key, *, eta: float | None, not_converging: bool) -> None:
        COPY_BYTES.labels(*key)  # 0 until it grows: a copy that never moves has a series too
        if eta is None:
            _remove(COPY_ETA, key)
        else:
            COPY_ETA.labels(*key).set(eta)
        NOT_CONVERGING.labels(*key).set(1 if not_converging else 0)

    def idle(self, key: Key) -> None:
        for gauge in _ESTIMATES:
            _remove(gauge, key)

    def forget(self, key: Key) -> None:
        for metric in _PER_COPY:
            _remove(metric, key)

    def watch_event(self, stream: str, owner: str) -> None:
        WATCH_EVENTS.labels(stream, owner).inc()

    def hypervisor(self, caps: Capabilities) -> None:
        HYPERVISOR.labels(".".join(map(str, caps.libvirt)), ".".join(map(str, caps.qemu)),
                          str(caps.synchronous_writes).lower(),
                          str(caps.block_job_change).lower()).set(1)

    def libvirt_up(self, up: bool) -> None:
        LIBVIRT_UP.set(1 if up else 0)


def serve(port: int) -> None:
    start_http_server(port)
