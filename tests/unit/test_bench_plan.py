"""The pure parts of `make bench`'s part "plan" (hack/bench_plan.py): the virsh runs keep the
plan's limits (maxActive, maxActivePerNode) as concurrency, the destination rule is the
plan's, the audit log's records are counted once per request and only the operator's
requests to blockcopy.dev resources, the sizes (at least 40 disks on 4 nodes; smoke smaller),
and /proc read for RSS and CPU. The part itself runs in tests/e2e/test_benchmark_runs.py."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import sys
import threading
import time

import pytest

from support.paths import HACK

spec = importlib.util.spec_from_file_location("bench_plan", HACK / "bench_plan.py")
assert spec is not None and spec.loader is not None
bench_plan = importlib.util.module_from_spec(spec)
sys.modules["bench_plan"] = bench_plan
spec.loader.exec_module(bench_plan)
Copy = bench_plan.Copy


def jobs(layout: dict[str, int]) -> list:
    return [Copy(node, f"uri-{node}", f"vm-{node}", f"vd{i}", f"/src/{node}/{i}")
            for node, count in layout.items() for i in range(count)]


@pytest.mark.parametrize(("max_active", "per_node"), [(6, 2), (3, 1), (4, 4), (1, 1)])
def test_run_limited_keeps_both_limits_and_runs_everything(max_active, per_node):
    lock = threading.Lock()
    now: dict[str, int] = {}
    peak = {"total": 0, "node": 0}
    done = []

    def run(job):
        with lock:
            now[job.node] = now.get(job.node, 0) + 1
            peak["total"] = max(peak["total"], sum(now.values()))
            peak["node"] = max(peak["node"], now[job.node])
        time.sleep(0.01)
        with lock:
            now[job.node] -= 1
            done.append(job)

    work = jobs({"a": 5, "b": 5, "c": 3, "d": 1})
    took = bench_plan.run_limited(work, max_active=max_active, max_per_node=per_node, run=run)
    assert sorted(done, key=work.index) == work
    assert peak["total"] <= max_active and peak["node"] <= per_node
    # The limits are used, not only respected: as many at once as both allow.
    assert peak["total"] == min(max_active, 4 * per_node, 14)
    assert took > 0


def test_run_limited_raises_the_first_error_after_the_started_ones_end():
    ended = []

    def run(job):
        time.sleep(0.02)
        ended.append(job.target)
        if job.target == "vd0" and job.node == "a":
            raise RuntimeError("virsh failed")

    with pytest.raises(RuntimeError, match="virsh failed"):
        bench_plan.run_limited(jobs({"a": 3, "b": 3}), max_active=2, max_per_node=1, run=run)
    assert len(ended) >= 2  # b's first job was not left running


def test_dest_for_is_the_plans_rule():
    assert bench_plan.dest_for("/v/images/n1/vm/vda.qcow2", "/v/images", "/v/dst") == \
        "/v/dst/n1/vm/vda.qcow2"
    assert bench_plan.dest_for("/v/a/x", "/v/a/", "/w/") == "/w/x"
    with pytest.raises(AssertionError):
        bench_plan.dest_for("/v/ab/x", "/v/a", "/w")


def record(audit_id, user, verb, resource, *, at="2026-12-04T10:00:01.000000Z", group=None,
           sub=None, name="x"):
    ref = {"resource": resource, "name": name}
    if group:
        ref["apiGroup"] = group
    if sub:
        ref["subresource"] = sub
    return json.dumps({"auditID": audit_id, "stage": "ResponseComplete", "verb": verb,
                       "user": {"username": user}, "objectRef": ref,
                       "requestReceivedTimestamp": at})


def test_count_requests_counts_each_operator_request_to_blockcopy_dev_once():
    agent = bench_plan.AGENT_USER + "bcc-node-1"
    lines = [
        record("1", agent, "patch", "blockcopies", group="blockcopy.dev", sub="status"),
        record("2", bench_plan.CONTROLLER_USER, "create", "blockcopies", group="blockcopy.dev"),
        # a watch: ResponseStarted, then ResponseComplete, one request
        record("3", agent, "watch", "blockcopies", group="blockcopy.dev"),
        record("3", agent, "watch", "blockcopies", group="blockcopy.dev"),
        record("4", agent, "patch", "diskinventories", group="blockcopy.dev", sub="status"),
        record("5", agent, "create", "events"),  # an Event: apart
        record("6", "admin", "get", "blockcopyplans", group="blockcopy.dev"),  # the bench
        record("7", agent, "patch", "blockcopies", group="blockcopy.dev",
               at="2026-12-04T09:59:59Z"),  # before the window
        record("8", agent, "patch", "blockcopies", group="blockcopy.dev",
               at="2026-12-04T10:00:11Z"),  # after it
    ]
    since = dt.datetime(2026, 12, 4, 10, 0, 0, tzinfo=dt.UTC)
    got = bench_plan.count_requests(lines, since, since + dt.timedelta(seconds=10))
    assert got["total"] == 4
    assert got["by_who"] == {"bcc-node-1": 3, "controller": 1}
    assert got["by_request"] == {"patch blockcopies/status": 1, "create blockcopies": 1,
                                 "watch blockcopies": 1, "patch diskinventories/status": 1}
    assert got["events"] == 1


@pytest.mark.parametrize(("short", "smoke"), [(False, False), (True, False), (False, True)])
def test_sizes(short, smoke):
    size = bench_plan.sizes(argparse.Namespace(short=short, smoke=smoke))
    disks = 4 * size["vms"] * size["disks"]
    if smoke:
        assert 4 <= disks < 40  # reduced, not skipped
    else:
        assert disks >= 40
    assert 1 <= size["per_node"] <= size["max_active"]
    assert size["bandwidth"]


def test_proc_watch_reads_rss_and_cpu_of_a_process():
    with bench_plan.ProcWatch({"me": os.getpid()}, period=0.05) as watch:
        deadline = time.process_time() + 0.2
        while time.process_time() < deadline:  # some CPU
            pass
    got = watch.result["me"]
    assert got["rss_max_mib"] > 5
    assert got["cpu_s"] >= 0.15 and 0 < got["cpu_pct"] <= 100 * (os.cpu_count() or 1)
