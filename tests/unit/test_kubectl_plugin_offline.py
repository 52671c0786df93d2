"""The kubectl plugin's own logic, without an API server: destination naming, the manifests
`move` makes, the table, `wait`'s verdicts, arguments and their exit codes (`move` from the
node inventories: test_kubectl_inventory.py). Against the real API server, VMs and agent:
tests/e2e/test_kubectl_plugin.py."""

from __future__ import annotations

import argparse

import pytest
import yaml

from blockcopy.kubectl import errors, main, manifests, names
from blockcopy.kubectl import text as render
from blockcopy.kubectl.manifests import Disk
from blockcopy.model.api import GROUP, KIND, VERSION

# ------------------------------------------------------------------ disks and destinations


def test_dests_are_the_sources_file_names_unless_ambiguous():
    disks = [Disk("vda", "/a/top.qcow2"), Disk("vdb", "/b/data.qcow2"),
             Disk("vdc", "/c/top.qcow2"), Disk("vdd", None, "raw"), Disk("vde")]
    assert manifests.plan_dests("web-1", disks, "/new") == {
        "vda": "/new/web-1-vda.qcow2",  # top.qcow2 twice: ambiguous
        "vdb": "/new/data.qcow2",
        "vdc": "/new/web-1-vdc.qcow2",
        "vdd": "/new/web-1-vdd.raw",
        "vde": "/new/web-1-vde.qcow2",
    }


def test_a_dest_that_is_the_source_is_refused():
    with pytest.raises(errors.PluginError, match=r"vda already is /a/top\.qcow2") as exc:
        manifests.plan_dests("web-1", [Disk("vda", "/a/top.qcow2")], "/a")
    assert exc.value.code == errors.USAGE


def test_manifests_one_per_disk_in_one_group():
    bodies = manifests.manifests(domain="Web_1", disks=[Disk("vda", "/a/x.qcow2"), Disk("vdb")],
                              to_dir="/new", group="Web_1", node="hv-7", pivot=True,
                              bandwidth="100Mi", namespace="vms")
    assert [b["metadata"]["name"] for b in bodies] == ["web-1-vda", "web-1-vdb"]
    assert bodies[0] == {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
        "metadata": {"name": "web-1-vda", "namespace": "vms",
                     "labels": {names.GROUP_LABEL: "Web_1"}},
        "spec": {"domain": "Web_1", "nodeName": "hv-7", "disk": "vda", "dest": "/new/x.qcow2",
                 "group": "Web_1", "bandwidth": "100Mi", "pivot": True}}
    # A group that is no valid label value is in spec only.
    (body,) = manifests.manifests(domain="vm", disks=[Disk("vda")], to_dir="/n", group="a b",
                               node=None, pivot=False, bandwidth=None, namespace="vms")
    assert "labels" not in body["metadata"] and body["spec"]["group"] == "a b"
    assert "nodeName" not in body["spec"] and body["spec"]["pivot"] is False
    (body,) = manifests.manifests(domain="vm", disks=[Disk("vda")], to_dir="/n", group="g",
                               node=None, pivot=False, bandwidth=None, namespace="vms",
                               prefix="Back_Again")
    assert body["metadata"]["name"] == "back-again-vda" and body["spec"]["domain"] == "vm"


@pytest.mark.parametrize("domain, target, name", [
    ("web-1", "vda", "web-1-vda"), ("Web_1", "vdb", "web-1-vdb"),
    ("--x..y", "sda", "x-y-sda"), ("web.1", "vda", "web-1-vda"), ("a" * 300, "vda", "a" * 253),
])
def test_object_names_are_valid(domain, target, name):
    assert manifests.object_name(domain, target) == name


# ------------------------------------------------------------------ display


@pytest.mark.parametrize("rate, text", [
    (0, "0 B/s"), (512, "512 B/s"), (1536, "1.5 KiB/s"), (12 * 2**20 + 2**19, "12.5 MiB/s"),
    (3 * 2**30, "3.0 GiB/s"), (None, ""), ("fast", ""), (-1, ""),
])
def test_human_rate(rate, text):
    assert render.human_rate(rate) == text


def obj(name, phase=None, *, ns="vms", group="g", message=None, mirrored=False, **status):
    conditions = [{"type": "Mirrored", "status": "True" if mirrored else "False"}]
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"domain": "web-1", "disk": "vda", "group": group, "nodeName": "hv-7"},
            "status": {"phase": phase, "message": message, "conditions": conditions,
                       **status} if phase else {}}


def test_table_shows_rate_eta_group_and_message():
    objects = [obj("web-1-vda", "Copying", progress="42%", rate=12 * 2**20, eta="1m30s",
                   message="copying\n  /a to /b"),
               obj("web-1-vdb", "Queued", message="waiting for a free copy slot: 2nd in queue"),
               obj("new")]
    text = render.table(*render.rows(objects, namespaces=True, message=True))
    lines = text.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "DOMAIN", "DISK", "PHASE", "PROGRESS",
                                "RATE", "ETA", "NODE", "GROUP", "MESSAGE"]
    assert lines[1].split() == ["vms", "web-1-vda", "web-1", "vda", "Copying", "42%", "12.0",
                                "MiB/s", "1m30s", "hv-7", "g", "copying", "/a", "to", "/b"]
    assert "Queued" in lines[2] and lines[2].endswith("2nd in queue")
    # Columns line up: every PHASE cell starts where its header does.
    start = lines[0].index("PHASE")
    assert [line[start:].split()[0] for line in lines[1:3]] == ["Copying", "Queued"]
    headers, _ = render.rows(objects, namespaces=False, message=False)
    assert "NAMESPACE" not in headers and "MESSAGE" not in headers


def test_group_from_spec_or_label():
    assert render.group_of({"spec": {"group": "a"}, "metadata": {}}) == "a"
    assert render.group_of({"spec": {}, "metadata": {"labels": {names.GROUP_LABEL: "b"}}}) == "b"
    assert render.group_of({"spec": {}, "metadata": {}}) == ""


# ------------------------------------------------------------------ wait's verdicts


def test_reached_and_cannot_reach():
    assert render.reached(obj("a", "Pivoted"), "Pivoted")
    assert render.reached(obj("a", "Pivoted", mirrored=True), "Mirrored")  # passed
    assert not render.reached(obj("a", "Copying"), "Mirrored")
    assert render.cannot_reach(obj("a", "Copying"), "Pivoted") is None
    assert render.cannot_reach(obj("a", "Failed", message="DestNotAllowed: no"),
                               "Pivoted") == "a is Failed: DestNotAllowed: no"
    assert render.cannot_reach(obj("a", "Failed"), "Failed") is None
    assert render.cannot_reach(obj("a", "Aborted"), "Pivoted") == "a is Aborted"
    assert render.cannot_reach(obj("a", "Aborted", mirrored=True), "Mirrored") is None


@pytest.mark.parametrize("text, seconds", [
    ("90", 90), ("90s", 90), ("5m", 300), ("1h30m", 5400), ("1.5h", 5400), ("250ms", 0.25)])
def test_durations(text, seconds):
    assert render.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5 minutes", "m5", "1x"])
def test_bad_durations(text):
    with pytest.raises(argparse.ArgumentTypeError):
        render.parse_duration(text)


def test_phases_in_any_case():
    assert render.canonical_phase("pivoted") == "Pivoted"
    assert render.canonical_phase("QUEUED") == "Queued"
    with pytest.raises(argparse.ArgumentTypeError, match="phases: Pending, Queued"):
        render.canonical_phase("done")


# ------------------------------------------------------------------ the command line


def test_move_named_disks_without_an_inventory(capsys, monkeypatch, tmp_path):
    assert main.main(["move", "far-1", "--to", "/new", "--disk", "vda",
                        "-n", "vms", "--dry-run"]) == errors.OK
    captured = capsys.readouterr()
    assert "destinations are named far-1-<disk>.qcow2" in captured.err
    (body,) = yaml.safe_load_all(captured.out)
    assert body["spec"]["dest"] == "/new/far-1-vda.qcow2"
    # Without --disk, the node inventory must tell: the API server is asked, even for a dry
    # run (tests/unit/test_kubectl_inventory.py); here there is none to ask.
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    assert main.main(["move", "far-1", "--to", "/new", "-n", "vms",
                        "--dry-run"]) == errors.FAILURE
    assert "cannot load the kubeconfig" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["move", "vm", "--to", "relative", "--disk", "vda"], "--to must be an absolute"),
    (["move", "vm", "--to", "/x", "--disk", "/images/a.qcow2"], "disk targets such as vda"),
    (["move", "vm", "--to", "/x", "--disk", "vda", "--bandwidth", "fast"], "--bandwidth"),
    (["pivot"], "name the BlockCopies or give --group"),
    (["abort", "a", "--group", "g"], "not both"),
    (["wait", "--for", "Mirrored"], "name the BlockCopies or give --group"),
])
def test_usage_errors(argv, message, capsys, tmp_path):
    if argv[0] == "move":
        argv = [*argv, "-n", "vms", "--dry-run"]
    assert main.main(argv) == errors.USAGE
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["wait", "a", "--for", "Done"], ["move", "vm"],
                                  ["wait", "a", "--for", "Pivoted", "--timeout", "soon"]])
def test_argparse_errors_exit_2(argv, capsys):
    try:
        code = main.main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == errors.USAGE


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main.main(["--help"])
    text = capsys.readouterr().out
    assert "exit codes:" in text and "kubectl blockcopy move" in text
    for code in (errors.OK, errors.NOT_REACHED, errors.USAGE, errors.NOT_FOUND,
                 errors.FAILURE):
        assert f"\n  {code}  " in text


def test_kubeconfig_errors(tmp_path, capsys):
    assert main.main(["list", "--kubeconfig", str(tmp_path / "none")]) == errors.FAILURE
    assert "cannot load the kubeconfig" in capsys.readouterr().err
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u",
                                                "namespace": "team-a"}}]}))
    assert main.main(["list", "--kubeconfig", str(kubeconfig)]) == errors.FAILURE
    err = capsys.readouterr().err
    assert "cannot reach the API server at https://127.0.0.1:1" in err
    assert "namespaces/team-a/" in err  # the context's namespace is the default


def test_abort_gives_up_a_requested_pivot(capsys):
    """The CRD refuses pivot and abort both true: `abort` on an object with pivot: true sets
    pivot back to false in the same patch."""
    import argparse

    from blockcopy.kubectl.commands import cmd_set

    class Objects:
        def __init__(self) -> None:
            self.patches: list[tuple[str, dict]] = []
            self.specs = {"armed": {"pivot": True}, "plain": {}}

        def get(self, namespace: str, name: str) -> dict:
            return {"metadata": {"name": name}, "spec": self.specs[name],
                    "status": {"phase": "Copying"}}

        def patch_spec(self, namespace: str, name: str, patch: dict) -> None:
            self.patches.append((name, patch))

    cluster = Objects()
    args = argparse.Namespace(names=["armed", "plain"], group=None)
    assert cmd_set("abort", args, cluster, "ns") == 0  # type: ignore[arg-type]
    assert cluster.patches == [("armed", {"abort": True, "pivot": False}),
                               ("plain", {"abort": True})]
    assert "spec.abort: true, spec.pivot: false" in capsys.readouterr().out
