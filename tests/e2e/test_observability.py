"""Metrics, liveness and JSON logs of a real agent process during a real copy."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
import uuid

from e2elib import BlockCopies, wait_for
from prometheus_client.parser import text_string_to_metric_families


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_during_a_real_copy(agent_factory, vms, api, core, kubectl):
    # Its own namespace and an agent limited to it: the gauges count only this test's objects.
    namespace = f"e2e-metrics-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace}})
    blockcopies = BlockCopies(api, namespace, kubectl)
    port, live = _free_port(), _free_port()
    agent = agent_factory("node-metrics", extra_args=[
        "--metrics-port", str(port), "--liveness-port", str(live), "--log-format", "json",
        "--namespace", namespace])
    vm = vms(layers=2, size="256M", data_per_layer="64M")
    before = _scrape(port)
    assert _value(before, "blockcopy_objects", phase="Copying") == 0
    assert _value(before, "blockcopy_copied_bytes_total") == 0

    name = blockcopies.create({"domain": vm.name, "disk": "vda", "nodeName": "node-metrics",
                               "dest": os.path.join(vm.workdir, "copy.qcow2"),
                               "bandwidth": "16Mi"})
    blockcopies.wait_phase(name, "Copying")
    during = wait_for(lambda: (s := _scrape(port)) and
                      _value(s, "blockcopy_copied_bytes_total") > 0 and s,
                      30, what="copied bytes to grow")
    assert _value(during, "blockcopy_objects", phase="Copying") == 1

    blockcopies.wait_phase(name, "Mirrored", timeout=120)
    blockcopies.patch_spec(name, {"pivot": True})
    status = blockcopies.wait_phase(name, "Pivoted")
    after = wait_for(lambda: (s := _scrape(port)) and
                     _value(s, "blockcopy_objects", phase="Pivoted") == 1 and s,
                     10, what="the Pivoted gauge")
    assert _value(after, "blockcopy_objects", phase="Copying") == 0
    assert _value(after, "blockcopy_copied_bytes_total") >= status["end"] > \
        _value(during, "blockcopy_copied_bytes_total")
    assert _value(after, "blockcopy_copy_duration_seconds_count") == 1
    assert _value(after, "blockcopy_mirror_duration_seconds_count") == 1
    assert _value(after, "blockcopy_pivot_latency_seconds_count") == 1
    assert 0 < _value(after, "blockcopy_pivot_latency_seconds_sum") < 30

    # A failure is counted by reason.
    bad = blockcopies.create({"domain": vm.name, "disk": "vda", "nodeName": "node-metrics",
                              "dest": "/tmp/outside-the-allowed-roots.qcow2"})
    blockcopies.wait_phase(bad, "Failed")
    wait_for(lambda: _value(_scrape(port), "blockcopy_errors_total",
                            reason="DestNotAllowed") == 1, 10, what="the error counter")

    # Liveness answers; logs are JSON lines.
    assert urllib.request.urlopen(f"http://127.0.0.1:{live}/healthz", timeout=5).status == 200
    lines = [line for line in agent.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert any("claimed" in r.get("message", "") or "Copying" in r.get("message", "")
               for r in records)
