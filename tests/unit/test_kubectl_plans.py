"""`kubectl blockcopy plan` without an API server: flags -> the plan's spec (checked as the
controller checks it), the rows of `plan list` and `plan status`, `plan wait`'s verdicts,
`pivot plan/NAME`, the patches `plan pivot` and `plan start` send, and completion. Against the
real API server, simulated nodes, QEMU and the plan controller:
tests/e2e/test_kubectl_plan.py."""

from __future__ import annotations

import argparse
import datetime as dt

import pytest
import yaml

from blockcopy.core.plan_status import PlanPhase
from blockcopy.kubectl import completion, errors, main, plans, planspec, plantext
from blockcopy.model.api import GROUP, VERSION
from blockcopy.model.plan import PLAN_KIND, parse_plan

PARSER = main.build_parser()


def body(**kw):
    defaults = {"name": "pool-a", "namespace": "ops", "source": "/srv/a", "dest": "/srv/b"}
    return planspec.plan_body(**{**defaults, **kw})


# ------------------------------------------------------------------ flags -> spec


def test_the_least_a_plan_needs_and_its_defaults_left_to_the_server():
    assert body() == {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": PLAN_KIND,
        "metadata": {"name": "pool-a", "namespace": "ops"},
        "spec": {"source": {"pathPrefix": "/srv/a"}, "destination": {"pathPrefix": "/srv/b"},
                 "pivot": "Manual"}}


def test_every_flag_lands_in_its_field_and_the_controller_accepts_it():
    made = body(source="/srv/a/", dest="/srv//b/./c", domains=["web-*", "db-*"],
                nodes=["rack=r1", "gpu", "!old", "zone!=z9"], format="qcow2",
                backing_chain="copy", bandwidth="200Mi", convergence="auto", max_active=8,
                max_active_per_node=2, pivot="Automatic", preview=True,
                source_retention="Delete", verify="None", detect_zeroes=False)
    spec = made["spec"]
    assert spec == {
        "source": {"pathPrefix": "/srv/a", "domains": ["web-*", "db-*"],
                   "nodeSelector": {"matchLabels": {"rack": "r1"}, "matchExpressions": [
                       {"key": "gpu", "operator": "Exists"},
                       {"key": "old", "operator": "DoesNotExist"},
                       {"key": "zone", "operator": "NotIn", "values": ["z9"]}]}},
        "destination": {"pathPrefix": "/srv/b/c", "format": "qcow2", "backingChain": "copy",
                        "bandwidth": "200Mi", "convergence": "auto", "detectZeroes": False},
        "maxActive": 8, "maxActivePerNode": 2, "pivot": "Automatic", "verify": "None",
        "sourceRetention": "Delete", "dryRun": True}
    parsed = parse_plan(spec)
    assert (parsed.max_active, parsed.bandwidth, parsed.dry_run) == (8, 200 << 20, True)
    assert parsed.node_selector is not None
    assert parsed.node_selector.matches({"rack": "r1", "gpu": "1", "zone": "z1"})
    assert not parsed.node_selector.matches({"rack": "r1", "gpu": "1", "old": "y"})


@pytest.mark.parametrize("kw, message", [
    ({"source": "srv/a"}, "--from must be an absolute directory"),
    ({"dest": "/"}, "--to must be a directory below /"),
    ({"dest": "/srv/a/inner"}, "--to /srv/a/inner and --from /srv/a must not lie inside"),
    ({"source": "/srv/b/x"}, "must not lie inside each other"),
    ({"max_active": 0}, "--max-active must be an integer from 1 to 1000, not 0"),
    ({"max_active_per_node": 65}, "--max-active-per-node must be an integer from 1 to 64"),
    ({"bandwidth": "fast"}, "--bandwidth 'fast' is not a quantity"),
    ({"format": "raw", "backing_chain": "copy"}, "--backing-chain: copy writes qcow2"),
    ({"name": "Pool_A"}, "lower-case letters, digits"),
    ({"name": "p" * 53}, "at most 52 characters"),
    ({"nodes": ["rack=r1", "rack=r2"]}, "rack given twice"),
    ({"nodes": ["=x"]}, "not KEY=VALUE"),
    ({"verify": "Quick"}, "--verify 'Quick': one of None, Sample, Full"),
])
def test_what_the_controller_or_the_server_would_refuse_is_a_usage_error(kw, message):
    with pytest.raises(errors.PluginError) as refused:
        body(**kw)
    assert message in str(refused.value) and refused.value.code == errors.USAGE


def test_flags_in_any_case_and_comma_separated():
    assert planspec.pivot_mode("automatic") == "Automatic"
    assert planspec.retention("DELETE") == "Delete"
    assert [planspec.verify_mode(v) for v in ("none", "SAMPLE", "Full")] == \
        ["None", "Sample", "Full"]
    with pytest.raises(argparse.ArgumentTypeError, match="one of None, Sample, Full"):
        planspec.verify_mode("quick")
    with pytest.raises(argparse.ArgumentTypeError, match="one of Manual, Automatic"):
        planspec.pivot_mode("now")
    assert planspec.split_items(["a,b", "b", " c "]) == ["a", "b", "c"]


def test_verify_and_no_detect_zeroes_flags_only_when_given(capsys):
    argv = ["plan", "create", "p", "--from", "/a", "--to", "/b", "-n", "x", "--dry-run"]
    assert main.main([*argv, "--verify", "full", "--no-detect-zeroes"]) == errors.OK
    spec = yaml.safe_load(capsys.readouterr().out)["spec"]
    assert spec["verify"] == "Full" and spec["destination"]["detectZeroes"] is False
    # Not given: not written, so the children keep BlockCopy's defaults (an absent verify is
    # not an explicit Sample).
    assert main.main(argv) == errors.OK
    spec = yaml.safe_load(capsys.readouterr().out)["spec"]
    assert "verify" not in spec and "detectZeroes" not in spec["destination"]
    with pytest.raises(SystemExit) as exited:
        main.main([*argv, "--verify", "quick"])
    assert exited.value.code == errors.USAGE


def test_create_dry_run_prints_the_yaml_offline(capsys):
    assert main.main(["plan", "create", "pool-a", "--from", "/srv/a", "--to", "/srv/b",
                      "--domain", "web-*,db-*", "--max-active", "3", "--pivot", "automatic",
                      "-n", "ops", "--dry-run"]) == errors.OK
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["metadata"] == {"name": "pool-a", "namespace": "ops"}
    assert printed["spec"]["source"]["domains"] == ["web-*", "db-*"]
    assert (printed["spec"]["maxActive"], printed["spec"]["pivot"]) == (3, "Automatic")
    assert main.main(["plan", "create", "p", "--from", "/a", "--to", "/a/b", "-n", "x",
                      "--dry-run=client"]) == errors.USAGE
    assert "must not lie inside" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["plan"], ["plan", "create", "p", "--to", "/b"],
                                  ["plan", "wait", "p", "--for", "Done"],
                                  ["plan", "create", "p", "--from", "/a", "--to", "/b",
                                   "--dry-run=maybe"]])
def test_plan_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main.main(argv)
    assert exited.value.code == errors.USAGE


# ------------------------------------------------------------------ rows and verdicts


def plan(name="pool-a", phase=None, spec=None, **status):
    obj = {"metadata": {"name": name, "namespace": "ops", "generation": 1,
                        "creationTimestamp": "2026-12-04T10:00:00Z"},
           "spec": {"source": {"pathPrefix": "/srv/a"}, "destination": {"pathPrefix": "/b"},
                    "pivot": "Manual", "maxActive": 4, "maxActivePerNode": 1,
                    **(spec or {})}}
    if phase is not None:
        obj["status"] = {"phase": phase, **status}
    return obj


RUNNING = {"total": 3, "pivoted": 0, "mirrored": 1, "copying": 1, "queued": 1, "failed": 0,
           "waiting": 0, "active": 1, "bytesDone": 96 << 20, "bytesTotal": 192 << 20,
           "rate": 2 << 20, "eta": "48s", "progress": "0/3", "observedGeneration": 1}


def test_plan_list_rows():
    now = dt.datetime(2026, 12, 4, 10, 5, tzinfo=dt.UTC)
    headers, rows = plantext.plan_rows([plan(phase="Running", **RUNNING), plan("new")],
                                       namespaces=False, wide=False, now=now)
    assert headers == ["NAME", "PHASE", "PIVOTED", "MIRRORED", "COPYING", "QUEUED", "FAILED",
                       "BYTES", "RATE", "ETA"]
    assert rows == [["pool-a", "Running", "0/3", 1, 1, 1, 0, "96.0 MiB/192.0 MiB",
                     "2.0 MiB/s", "48s"],
                    ["new", "", "", "", "", "", "", "", "", ""]]
    headers, rows = plantext.plan_rows([plan(phase="Running", **RUNNING)], namespaces=True,
                                       wide=True, now=now)
    assert headers[0] == "NAMESPACE" and headers[-6:] == ["WAITING", "FROM", "TO", "PIVOT",
                                                          "ACTIVE", "AGE"]
    assert rows[0][0] == "ops" and rows[0][-6:] == [0, "/srv/a", "/b", "Manual", "1 of 4/1",
                                                    "5m"]


def test_plan_status_summary_and_disks():
    status = {**RUNNING, "message": "1 of 3 disks mirrored or pivoted", "disks": [
        {"node": "hv-1", "domain": "web", "disk": "vda", "source": "/srv/a/web.qcow2",
         "destination": "/b/web.qcow2", "bytes": 64 << 20, "child": "pool-a-0000",
         "phase": "Mirrored"},
        {"node": "hv-2", "domain": "db", "disk": "vda", "source": "/srv/a/db.qcow2",
         "destination": "/b/db.qcow2", "bytes": 64 << 20, "child": "pool-a-0001",
         "phase": "Copying"},
        {"node": "hv-2", "domain": "db", "disk": "vdb", "bytes": 64 << 20,
         "child": "pool-a-0002"},
        {"node": "hv-3", "domain": "x", "disk": "vda", "bytes": 1, "state": "Conflict",
         "message": "already copied by BlockCopy other"}]}
    children = [{"metadata": {"name": "pool-a-0001"},
                 "status": {"phase": "Copying", "progress": "40%", "rate": 1 << 20,
                            "eta": "30s"}},
                {"metadata": {"name": "pool-a-0000"}, "status": {"phase": "Mirrored",
                                                                  "progress": "100%"}}]
    text = plantext.status_text(plan(phase="Running", **status), children, wide=False)
    summary, _, disks = text.partition("\n\n")
    assert "Phase:     Running: 1 of 3 disks mirrored or pivoted" in summary
    assert "Disks:     3: 0 pivoted, 1 mirrored, 1 copying, 1 queued, 0 failed" in summary
    assert "Bytes:     96.0 MiB of 192.0 MiB (50%)" in summary
    assert "Rate:      2.0 MiB/s, ETA 48s" in summary
    headers, rows = plantext.disk_rows(plan(phase="Running", **status), children, wide=True)
    assert headers == ["CHILD", "NODE", "DOMAIN", "DISK", "PHASE", "PROGRESS", "RATE", "ETA",
                       "SOURCE", "DEST", "SIZE", "MESSAGE"]
    assert rows[0][:8] == ["pool-a-0000", "hv-1", "web", "vda", "Mirrored", "100%", "", ""]
    assert rows[1][4:8] == ["Copying", "40%", "1.0 MiB/s", "30s"]
    assert rows[2][4] == "(not created)"
    assert rows[3][0] == "-" and rows[3][4] == "Conflict"
    assert rows[3][-1] == "already copied by BlockCopy other"
    assert disks.splitlines()[0].split() == ["CHILD", "NODE", "DOMAIN", "DISK", "PHASE",
                                             "PROGRESS", "RATE", "ETA", "MESSAGE"]
    # No status yet: said so, no table.
    assert plantext.status_text(plan(), [], wide=False).endswith("(no disk is selected yet)")


def test_wait_verdicts():
    mirrored = {**RUNNING, "mirrored": 3, "copying": 0, "queued": 0}
    assert plantext.reached(plan(phase="AwaitingPivot", **mirrored), "Mirrored")
    assert plantext.reached(plan(phase="AwaitingPivot", **mirrored), "AwaitingPivot")
    assert plantext.reached(plan(phase="Completed", **{**mirrored, "mirrored": 0,
                                                      "pivoted": 3}), "Mirrored")
    assert not plantext.reached(plan(phase="Running", **RUNNING), "Mirrored")
    assert not plantext.reached(plan(phase="Pending", total=0), "Mirrored")
    assert plantext.cannot_reach(plan(phase="Running", **RUNNING), "Completed") is None
    assert plantext.cannot_reach(plan(phase="Failed", message="1 failed"), "Completed") == \
        "pool-a is Failed: 1 failed"
    assert plantext.cannot_reach(plan(phase="Completed"), "AwaitingPivot") == \
        "pool-a is Completed"
    failed = {**RUNNING, "failed": 1, "queued": 0}
    assert plantext.cannot_reach(plan(phase="Running", **failed), "Mirrored") == \
        "pool-a: 1 of its disks failed"
    assert plantext.wait_target("awaitingpivot") == "AwaitingPivot"
    assert plantext.wait_target("MIRRORED") == "Mirrored"


def test_the_plugins_phases_are_the_controllers():
    assert set(plantext.PLAN_PHASES) == {v for k, v in vars(PlanPhase).items()
                                         if k.isupper()}


# ------------------------------------------------------------------ pivot, start, refs


class Plans:
    """The few calls of Cluster the patching commands make, recorded."""

    def __init__(self, *objects):
        self.objects = {o["metadata"]["name"]: o for o in objects}
        self.patches: list[tuple[str, dict, str]] = []

    def get(self, namespace, name, plural):
        if name not in self.objects:
            raise errors.PluginError(f"blockcopyplan {name!r}: not found", errors.NOT_FOUND)
        return self.objects[name]

    def patch_spec(self, namespace, name, spec, plural):
        self.patches.append((name, spec, plural))


def test_plan_pivot_sets_automatic_where_it_can(capsys):
    cluster = Plans(plan("waiting", phase="AwaitingPivot", total=2, mirrored=2),
                    plan("auto", phase="Running", spec={"pivot": "Automatic"}),
                    plan("done", phase="Completed"),
                    plan("preview", phase="Planned", spec={"dryRun": True}))
    args = argparse.Namespace(names=["waiting", "auto", "done", "preview", "waiting"])
    assert plans.cmd_pivot(args, cluster, "ops", out=print) == errors.OK
    assert cluster.patches == [("waiting", {"pivot": "Automatic"}, "blockcopyplans")]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("blockcopyplans.blockcopy.dev/waiting patched (spec.pivot: Automatic; "
                      "phase AwaitingPivot, 2 of 2 disks mirrored)")
    assert "auto unchanged (spec.pivot is already Automatic" in out[1]
    assert "done not patched: it is already Completed" in out[2]
    assert "preview not patched: it is a dry run" in out[3] and len(out) == 4
    with pytest.raises(errors.PluginError) as missing:
        plans.cmd_pivot(argparse.Namespace(names=["nope"]), cluster, "ops", out=print)
    assert missing.value.code == errors.NOT_FOUND


def test_plan_start_clears_dry_run(capsys):
    cluster = Plans(plan("preview", phase="Planned", spec={"dryRun": True}),
                    plan("going", phase="Running"))
    assert plans.cmd_start(argparse.Namespace(names=["preview", "going"]), cluster, "ops",
                           out=print) == errors.OK
    assert cluster.patches == [("preview", {"dryRun": False}, "blockcopyplans")]
    assert "going unchanged (spec.dryRun is already false" in capsys.readouterr().out


@pytest.mark.parametrize("ref, name", [("plan/a", "a"), ("bcp/a", "a"), ("blockcopyplan/a", "a"),
                                       ("blockcopyplans.blockcopy.dev/a", "a"), ("a", None),
                                       ("blockcopies.blockcopy.dev/a", None)])
def test_plan_refs(ref, name):
    assert plans.plan_ref(ref) == name


def test_pivot_plan_slash_name_is_plan_pivot(monkeypatch, capsys):
    seen = []
    monkeypatch.setitem(main.COMMANDS, "plan", lambda a, c, n: seen.append(a) or 0)
    monkeypatch.setattr(main, "Cluster", lambda *a: type("C", (), {"default_namespace": "d"}))
    assert main.main(["pivot", "plan/pool-a", "bcp/pool-b", "-n", "ops"]) == errors.OK
    (args,) = seen
    assert (args.command, args.plan_command, args.names) == ("plan", "pivot",
                                                              ["pool-a", "pool-b"])
    assert main.main(["pivot", "plan/pool-a", "web-1-vda"]) == errors.USAGE
    assert "not both" in capsys.readouterr().err
    assert main.main(["abort", "plan/pool-a"]) == errors.USAGE
    assert "delete it: `kubectl delete bcp NAME`" in capsys.readouterr().err
    assert main.main(["status", "plan/pool-a"]) == errors.USAGE
    assert "kubectl blockcopy plan status NAME" in capsys.readouterr().err


# ------------------------------------------------------------------ completion


def values(*args):
    found, directive = completion.complete(args, PARSER)
    return [v for v, _ in found], directive


def test_completion_of_the_plan_subcommand():
    assert values("plan", "")[0] == ["create", "list", "status", "pivot", "start", "wait"]
    assert values("plan", "wait", "p", "--for", "") == (list(plantext.WAIT_FOR),
                                                         completion.NO_FILES)
    assert values("plan", "create", "p", "--pivot", "")[0] == ["Manual", "Automatic"]
    assert values("plan", "create", "p", "--verify", "")[0] == ["None", "Sample", "Full"]
    assert values("plan", "create", "p", "--from", "") == ([], completion.DIRS)
    assert values("plan", "create", "p", "--dry-run", "")[0] == ["none", "client", "server"]
    assert values("plan", "create", "p", "--dry-run", "--to", "") == ([], completion.DIRS)
    flags = values("plan", "create", "p", "--")[0]
    assert {"--from", "--to", "--max-active", "--node-selector", "--namespace", "--verify",
            "--no-detect-zeroes"} <= set(flags)
    words = completion.Words(["-n", "ops", "plan", "status", "a"], PARSER)
    assert (words.command, words.subcommand, words.positionals) == ("plan", "status", ["a"])


def test_completion_of_plan_names(monkeypatch):
    listed = {"blockcopyplans": [plan("pool-a", phase="Running")],
              "blockcopies": [{"metadata": {"name": "web-1-vda"}}]}
    monkeypatch.setattr(completion, "blockcopies",
                        lambda words, plural="blockcopies": listed[plural])
    assert values("plan", "status", "")[0] == ["pool-a"]
    assert values("plan", "pivot", "pool-a", "")[0] == []
    assert values("pivot", "")[0] == ["web-1-vda"]
    assert values("pivot", "p")[0] == ["web-1-vda", "plan/pool-a"]


# ------------------------------------------------------------------ the API server's errors


class Refusal:
    def __init__(self, status, message):
        import json

        self.status, self.reason, self.body = status, "", json.dumps({"message": message})


def test_api_errors_name_the_plans():
    from blockcopy.kubectl.cluster import Cluster

    error = Cluster._error("listing BlockCopyPlans", Refusal(
        404, "the server could not find the requested resource"), "blockcopyplans")
    assert str(error) == ("listing BlockCopyPlans: the API server does not know BlockCopyPlans "
                          "(blockcopyplans.blockcopy.dev): is the CRD installed?")
    assert error.code == errors.FAILURE
    error = Cluster._error("blockcopyplan 'x' in namespace 'ops'", Refusal(
        404, 'blockcopyplans.blockcopy.dev "x" not found'), "blockcopyplans")
    assert (str(error), error.code) == ("blockcopyplan 'x' in namespace 'ops': not found",
                                        errors.NOT_FOUND)
    error = Cluster._error("listing BlockCopyPlans", Refusal(
        403, 'blockcopyplans.blockcopy.dev is forbidden: User "u" cannot list'),
        "blockcopyplans")
    assert error.code == errors.FAILURE and str(error).endswith(
        "ask for a role that grants blockcopyplans.blockcopy.dev)")
    # BlockCopies' messages as before.
    error = Cluster._error("listing BlockCopies", Refusal(
        404, "the server could not find the requested resource"))
    assert "does not know BlockCopies (blockcopies.blockcopy.dev)" in str(error)
