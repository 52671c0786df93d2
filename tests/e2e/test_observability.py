"""Metrics, liveness and JSON logs of a real agent process during a real copy."""

from __future__ import annotations

import json
import os

from prometheus_client.parser import text_string_to_metric_families

from support.agents import free_port, http_get
from support.objects import copy_spec
from support.proxies import UnixProxy
from support.waits import gone, wait_for


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = http_get(port, "/metrics")[1]
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_during_a_real_copy(agent_factory, node, vms, blockcopies):
    # The test's own namespace and an agent limited to it (the factory's default): the gauges
    # count only this test's objects.
    port, live = free_port(), free_port()
    agent = agent_factory(node, extra_args=[
        "--metrics-port", str(port), "--liveness-port", str(live), "--log-format", "json"])
    vm = vms(layers=2, size="256M", data_per_layer="64M")
    before = _scrape(port)
    assert _value(before, "blockcopy_objects", phase="Copying") == 0
    assert _value(before, "blockcopy_copied_bytes_total") == 0

    dest = os.path.join(vm.workdir, "copy.qcow2")
    name = blockcopies.create(copy_spec(vm, node=node, dest=dest, bandwidth="16Mi"))
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
    bad = blockcopies.create(copy_spec(vm, node=node,
                                       dest="/tmp/outside-the-allowed-roots.qcow2"))
    blockcopies.wait_phase(bad, "Failed")
    wait_for(lambda: _value(_scrape(port), "blockcopy_errors_total",
                            reason="DestNotAllowed") == 1, 10, what="the error counter")

    # Liveness answers; logs are JSON lines.
    assert http_get(live, "/healthz")[0] == 200
    lines = [line for line in agent.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert any("claimed" in r.get("message", "") or "Copying" in r.get("message", "")
               for r in records)


def test_a_deleted_copy_leaves_no_series_behind(agent_factory, node, vms, blockcopies):
    """Deleting a copy while it copies removes its per-copy series and its phase from the
    gauges (the agent forgets it), so /metrics does not grow with every copy ever made."""
    port = free_port()
    agent_factory(node, extra_args=["--metrics-port", str(port)])
    vm = vms(layers=2, size="256M", data_per_layer="64M")
    name = blockcopies.create(copy_spec(vm, node=node, dest=os.path.join(vm.workdir, "c.qcow2"),
                                        bandwidth="4Mi"))
    blockcopies.wait_phase(name, "Copying")

    def per_copy(samples) -> list[tuple[str, tuple]]:
        return [key for key in samples if ("blockcopy_name", name) in key[1]]

    during = wait_for(lambda: (s := _scrape(port)) and per_copy(s) and s, 60,
                      what="the copy's own series (bytes, time left)")
    assert _value(during, "blockcopy_objects", phase="Copying") == 1
    blockcopies.delete(name)
    wait_for(gone(blockcopies, name), 60, what="the object to go (its job cancelled)")
    after = wait_for(lambda: (s := _scrape(port)) and
                     _value(s, "blockcopy_objects", phase="Copying") == 0 and s, 30,
                     what="the Copying gauge to drop")
    assert per_copy(after) == [], per_copy(after)


def test_libvirt_up_follows_libvirtd_on_an_idle_node(agent_factory, node, tmp_path):
    """blockcopy_libvirt_up (the PrometheusRule's BlockCopyLibvirtUnreachable) with no copy
    at all: the agent's periodic check sees libvirtd go (its socket proxied, then cut) and
    come back."""
    proxy = UnixProxy(str(tmp_path / "libvirt-proxy.sock"))
    proxy.start()
    try:
        port = free_port()
        agent_factory(node, extra_args=[
            "--libvirt-uri", f"qemu+unix:///system?socket={proxy.sock}",
            "--metrics-port", str(port), "--libvirt-check-interval", "1"])

        def up() -> float:
            return _value(_scrape(port), "blockcopy_libvirt_up")
        wait_for(lambda: up() == 1, 20, what="libvirt_up 1")
        proxy.kill()
        wait_for(lambda: up() == 0, 30, what="libvirt_up 0 once libvirtd is cut off")
        proxy.start()
        wait_for(lambda: up() == 1, 60, what="libvirt_up 1 again")
    finally:
        proxy.kill()
