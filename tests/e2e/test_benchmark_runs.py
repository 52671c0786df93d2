"""`make bench` must run through (issue P): its smoke version, every step once on small
disks against the real local environment. The numbers are not judged here (a loaded CI
machine says little about speed); that every figure is measured and written is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support.paths import HACK, ROOT, STATE, TESTS

FIGURES = {
    "agent_rss_idle", "ready_to_mirrored_p95", "pivot_to_pivoted_p95", "create_to_copying_p95",
    "copy_1g_overhead", "copy_big_ratio", "scale_rss_max", "scale_cpu",
    "scale_status_writes_max", "api_requests_per_copy", "foreign_watch_events", "idle_cpu",
    "idle_wakeups_per_minute", "zeros_qcow2_allocation", "zeros_raw_allocation",
    "zeros_qcow2_time_vs_virsh", "zeros_raw_time_vs_virsh", "verify_pause_qcow2_p95",
    "verify_pause_raw_p95", "foreign_cpu", "foreign_rss_growth",
}
STAGES = {"create -> claimed", "claimed -> Copying", "create -> Copying", "READY -> Mirrored",
          "pivot patch -> Pivoting", "Pivoting -> Pivoted", "pivot patch -> Pivoted"}


def test_the_benchmark_runs_through_and_writes_every_figure(tmp_path, cluster):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(HACK / "benchmark.py"), "--smoke", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(TESTS), "BLOCKCOPY_STATE_DIR": str(STATE)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(out.read_text())
    figures = {k for k, v in results.items() if isinstance(v, dict) and "measured" in v}
    assert figures == FIGURES, figures ^ FIGURES
    for key in FIGURES:
        assert isinstance(results[key]["measured"], (int, float)), results[key]
        assert key in proc.stdout  # printed next to its target
    assert set(results["stages_ms"]) == STAGES
    assert all(v["n"] >= 1 and v["max"] >= v["p50"] >= 0 for v in results["stages_ms"].values())
    assert results["run"]["smoke"] is True
    # It cleaned up after itself: no VM and no BlockCopy of its own left behind.
    domains = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert not [d for d in domains if d.startswith("bct-bench-")], domains
