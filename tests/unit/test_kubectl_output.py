"""The plugin's output formats (-o table|wide|name|json|yaml), what a watch prints per change,
and `version`'s view of the agents, without an API server. Against the real API server and
agent: tests/e2e/test_kubectl_output_on_server.py."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import yaml

from blockcopy.kubectl import main, output, version
from blockcopy.kubectl.names import RESOURCE

NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)


def obj(name: str, phase: str = "Copying", **status) -> dict:
    return {"apiVersion": "blockcopy.dev/v1alpha1", "kind": "BlockCopy",
            "metadata": {"name": name, "namespace": "vms", "resourceVersion": "1",
                         "creationTimestamp": "2026-12-04T11:00:00Z"},
            "spec": {"domain": "web-1", "disk": "vda", "dest": "/new/a.qcow2", "pivot": True,
                     "group": "web-1"},
            "status": {"phase": phase, "progress": "40%", "rate": 3 * 1024 * 1024,
                       "nodeName": "hv-1", "source": "/old/a.qcow2", "bandwidth": 0,
                       "agentVersion": "0.2.0", "message": "copying", **status}}


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (119, "119s"), (120, "2m"), (150, "2m30s"), (3600, "60m"), (3 * 3600, "3h"),
    (3 * 3600 + 60, "3h1m"), (20 * 3600, "20h"), (3 * 86400 + 4 * 3600, "3d4h"),
    (45 * 86400, "45d"), (800 * 86400, "2y70d"), (9 * 365 * 86400, "9y")])
def test_age_as_kubectl_prints_it(seconds, text):
    created = (NOW - dt.timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")
    assert output.age(created, NOW) == text
    assert output.age(None, NOW) == ""


def test_wide_adds_columns_before_the_message():
    headers, rows = output.table_rows([obj("a")], namespaces=False, message=True, wide=True,
                                      now=NOW)
    assert headers[-1] == "MESSAGE" and headers[-7:-1] == output.WIDE
    cells = dict(zip(headers, rows[0], strict=True))
    assert cells["SOURCE"] == "/old/a.qcow2" and cells["DEST"] == "/new/a.qcow2"
    assert cells["LIMIT"] == "unlimited" and cells["PIVOT"] == "yes"
    assert cells["AGENT"] == "0.2.0" and cells["AGE"] == "60m"
    assert cells["RATE"] == "3.0 MiB/s" and cells["MESSAGE"] == "copying"
    narrow, _ = output.table_rows([obj("a")], namespaces=False, message=False, wide=False)
    assert not set(output.WIDE) & set(narrow)


def test_formats():
    objects = [obj("a"), obj("b", "Mirrored")]
    assert output.render("name", objects, namespaces=False, message=False) == \
        f"{RESOURCE}/a\n{RESOURCE}/b"
    for fmt, load in (("json", json.loads), ("yaml", yaml.safe_load)):
        doc = load(output.render(fmt, objects, namespaces=False, message=False))
        assert doc["kind"] == "List" and [o["metadata"]["name"] for o in doc["items"]] == \
            ["a", "b"]
    table = output.render("table", objects, namespaces=True, message=False)
    assert table.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert output.render("table", [], namespaces=False, message=False) == ""
    assert output.render("name", [], namespaces=False, message=False) == ""


def test_a_watch_prints_rows_aligned_and_only_changes():
    changes = output.Changes("table", namespaces=False, message=False)
    first = changes.first([obj("a"), obj("bb-longer")]).splitlines()
    assert first[0].startswith("NAME ") and len(first) == 3
    # kopf's bookkeeping or a new resourceVersion: the row is the same, nothing printed.
    same = obj("a")
    same["metadata"]["resourceVersion"] = "2"
    assert changes.change("MODIFIED", same) is None
    line = changes.change("MODIFIED", obj("a", "Mirrored", progress="100%"))
    assert line is not None and line.split()[:4] == ["a", "web-1", "vda", "Mirrored"]
    assert line.index("Mirrored") == first[0].index("PHASE")  # under its header
    gone = changes.change("DELETED", obj("a", "Mirrored", progress="100%"))
    assert gone is not None and "(deleted)" in gone


def test_a_watch_of_nothing_prints_the_header_with_the_first_row():
    changes = output.Changes("wide", namespaces=False, message=True)
    assert changes.first([]) == ""
    header, row = changes.change("ADDED", obj("a")).splitlines()
    assert header.split()[0] == "NAME" and header.split()[-1] == "MESSAGE"
    assert row.index("Copying") == header.index("PHASE")


@pytest.mark.parametrize("fmt", ["name", "json", "yaml"])
def test_a_watch_in_other_formats_prints_one_document_per_change(fmt):
    changes = output.Changes(fmt, namespaces=False, message=False)
    assert len(changes.first([obj("a")]).splitlines()) >= 1
    bumped = obj("a")
    bumped["metadata"]["resourceVersion"] = "7"
    bumped["status"]["kopf"] = {"progress": {}}
    assert changes.change("MODIFIED", bumped) is None
    if fmt == "name":
        return  # a name does not change with the phase: printed once
    doc = changes.change("MODIFIED", obj("a", "Mirrored"))
    loaded = json.loads(doc) if fmt == "json" else yaml.safe_load(doc)
    assert loaded["status"]["phase"] == "Mirrored"


def test_agents_one_row_per_node_and_version():
    objects = [obj("a"), obj("b"), obj("c", nodeName="hv-2", agentVersion="0.1.0"),
               obj("d", agentVersion=None), {"metadata": {"name": "e"}}]
    inventories = [{"status": {"nodeName": "hv-3", "agentVersion": "0.2.0"}},
                   {"status": {"nodeName": "hv-1", "agentVersion": "0.2.0"}}]
    assert version.agents(objects, inventories) == [
        {"node": "hv-1", "version": "0.2.0", "copies": 2, "inventory": True},
        {"node": "hv-2", "version": "0.1.0", "copies": 1, "inventory": False},
        {"node": "hv-3", "version": "0.2.0", "copies": 0, "inventory": True}]


def test_version_client_needs_no_api_server(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    assert main.main(["version", "--client"]) == 0
    assert capsys.readouterr().out.strip() == f"Client Version: {main.__version__}"


@pytest.mark.parametrize("argv", [["list", "-o", "wide", "-w"], ["status", "a", "--watch",
                                                                  "-o", "name"]])
def test_output_and_watch_arguments(argv):
    args = main.build_parser().parse_args(argv)
    assert args.watch is True and args.output in output.FORMATS
