"""`kubectl blockcopy` output, watches, `version` and completion end to end: the plugin as
installed (console scripts of this package, run by the real kubectl from PATH) against the
real API server, a real VM and the agent as a real process.

- list -o wide|name|json|yaml show what the API holds;
- status --watch and list --watch print the phases as the agent moves the copy, started
  before the agent runs; wait (a watch, not a poll) returns once the copy is Mirrored;
- version prints the plugin's version and the agent's (status.agentVersion, per node);
- kubectl's own completion (`kubectl __complete blockcopy ...`, kubectl >= 1.26) runs
  kubectl_complete-blockcopy and completes subcommands, flags and the BlockCopy's name."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time

import yaml
from test_kubectl_plugin import Plugin, dest_dir, parse_table

import blockcopy
from blockcopy.kubectl.names import RESOURCE
from support import audit
from support.paths import KUBECTL
from support.waits import wait_for


def test_list_in_every_format_and_version_shows_the_agents_version(
        agent_factory, node, namespace, vms, blockcopies):
    plugin = Plugin(namespace)
    agent_factory()
    vm = vms("plugin-out")
    plugin("move", vm.name, "--to", str(dest_dir(vm)), "--disk", "vda", "--node", node)
    name = f"{vm.name}-vda"
    plugin("wait", name, "--for", "Mirrored", "--timeout", "300s")
    stored = blockcopies.get(name)

    (row,) = parse_table(plugin("list", "-o", "wide").stdout)
    assert row["NAME"] == name and row["PHASE"] == "Mirrored" and row["NODE"] == node
    assert row["SOURCE"] == stored["status"]["source"] == vm.chain[0]
    assert row["DEST"] == stored["spec"]["dest"] and row["PIVOT"] == "no"
    assert row["AGENT"] == blockcopy.__version__ and row["AGE"].endswith(("s", "m"))
    assert plugin("list", "-o", "name").stdout.split() == [f"{RESOURCE}/{name}"]
    assert plugin("status", name, "-o", "name").stdout.split() == [f"{RESOURCE}/{name}"]
    for fmt, load in (("json", json.loads), ("yaml", yaml.safe_load)):
        doc = load(plugin("list", "-o", fmt).stdout)
        (item,) = doc["items"]
        assert item["metadata"]["uid"] == stored["metadata"]["uid"]
        assert item["status"]["phase"] == "Mirrored"
        assert item["status"]["agentVersion"] == blockcopy.__version__

    shown = plugin("version").stdout
    assert shown.splitlines()[0] == f"Client Version: {blockcopy.__version__}"
    agents = parse_table(shown.split("Agent Versions:\n", 1)[1])
    assert {"NODE": node, "VERSION": blockcopy.__version__, "BLOCKCOPIES": "1",
            "INVENTORY": "-"} in agents
    doc = json.loads(plugin("version", "-o", "json").stdout)
    assert {"node": node, "version": blockcopy.__version__, "copies": 1,
            "inventory": False} in doc["agents"]


def cell(line: str, header: str, column: str) -> str:
    """The cell of ``column`` in a watch's row, cut at the header's column starts."""
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    at = header.index(column)
    end = next((s for s in starts if s > at), None)
    return line[at:end].strip()


class Follow:
    """A long-running ``kubectl blockcopy ARGS`` (a watch): its stdout lines as they come."""

    def __init__(self, plugin: Plugin, *args: str):
        self.proc = subprocess.Popen(
            [str(KUBECTL), "blockcopy", *args, "-n", plugin.namespace], env=plugin.env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def until(self, predicate, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, (self.seen, self.proc.stderr.read())
                continue
            self.seen.append(line)
            if predicate(line):
                return line
        raise AssertionError(f"not printed within {timeout}s; printed: {self.seen}")

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        return err


def test_watches_print_the_phases_and_wait_follows_a_watch(
        agent_factory, node, namespace, vms, blockcopies):
    plugin = Plugin(namespace)
    vm = vms("plugin-watch")
    plugin("move", vm.name, "--to", str(dest_dir(vm)), "--disk", "vda", "--node", node,
           "--group", "watched")
    name = f"{vm.name}-vda"
    # Before any agent runs: the object has no phase yet.
    assert not (blockcopies.get(name).get("status") or {}).get("phase")
    status = Follow(plugin, "status", name, "--watch")
    listed = Follow(plugin, "list", "--watch", "-o", "wide", "--group", "watched")
    names = Follow(plugin, "list", "-w", "-o", "json")
    since = audit.size()
    waiting = subprocess.Popen([str(KUBECTL), "blockcopy", "wait", name, "--for", "Mirrored",
                                "--timeout", "300s", "-n", namespace], env=plugin.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        header = status.until(lambda line: line.startswith("NAME"), 60)
        status.until(lambda line: line.startswith(name), 60)  # the row as it is now
        listed.until(lambda line: line.startswith("NAME") and "AGENT" in line, 60)
        names.until(lambda line: json.loads(line)["metadata"]["name"] == name, 60)
        # The positive signal first: wait judged what it listed and opened its watch (the
        # only one of this object's name, by field selector) ...
        wait_for(lambda: audit.watch_opened(namespace, "blockcopies", since=since,
                                            field_selector=f"metadata.name={name}"),
                 60, interval=0.2, what="the watch of kubectl blockcopy wait")
        assert waiting.poll() is None  # ... and still waits: nothing is Mirrored

        agent_factory()
        mirrored = status.until(lambda line: cell(line, header, "PHASE") == "Mirrored", 300)
        assert mirrored.index("Mirrored") == header.index("PHASE")  # under its header
        assert mirrored.split()[:3] == [name, vm.name, "vda"]
        assert "MESSAGE" in header
        row = listed.until(lambda line: " Mirrored " in line, 60)
        assert row.split()[:2] == [name, vm.name] and vm.chain[0] in row.split()  # SOURCE
        doc = json.loads(names.until(
            lambda line: (json.loads(line).get("status") or {}).get("phase") == "Mirrored", 60))
        assert doc["status"]["progress"] == "100%"
        # The rows in between were phases on the way (Copying, perhaps Pending first).
        phases = [cell(line, header, "PHASE") for line in status.seen[1:]]
        assert phases[0] == "" and phases[-1] == "Mirrored", status.seen
        assert set(phases) <= {"", "Pending", "Copying", "Mirrored"}, status.seen
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, err
        assert out.strip() == f"{RESOURCE}/{name} Mirrored"
    finally:
        for follow in (status, listed, names):
            follow.stop()
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    # A watch of a missing object fails like status does.
    missing = plugin("status", "no-such-copy", "--watch", expect=3)
    assert "not found" in missing.stderr


def test_kubectl_completes_subcommands_flags_and_names(node, namespace, vms, core):
    plugin = Plugin(namespace)
    vm = vms("plugin-complete")
    plugin("move", vm.name, "--to", str(dest_dir(vm)), "--disk", "vda", "--node", node)
    name = f"{vm.name}-vda"

    def complete(*words: str) -> tuple[list[str], str]:
        proc = subprocess.run([str(KUBECTL), "__complete", "blockcopy", *words],
                              env=plugin.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        return [line.split("\t")[0] for line in lines[:-1]], lines[-1]

    assert complete("st") == (["status"], ":4")
    flags, directive = complete("list", "--w")
    assert flags == ["--watch"] and directive == ":4"
    assert complete("list", "-o", "")[0] == ["table", "wide", "name", "json", "yaml"]
    # Names come from the API server, in the namespace given with -n.
    assert complete("status", "-n", namespace, "")[0] == [name]
    assert complete("pivot", "--namespace", namespace, vm.name[:6])[0] == [name]
    assert complete("wait", "-n", namespace, name, "")[0] == []  # already named
    assert complete("status", "-n", namespace, "--group", "")[0] == [vm.name]
    assert complete("move", vm.name, "--node", "")[0] == [
        n.metadata.name for n in core.list_node().items]
