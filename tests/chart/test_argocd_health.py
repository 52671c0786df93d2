"""The Argo CD health check (deploy/argocd/blockcopy-health.lua) against BlockCopy objects in
every phase: its statuses and messages. Each case runs where Argo CD runs it, in gopher-lua with
the libraries Argo CD opens (tests/gitops, support/gitops.py), and, as a second check, in the
reference Lua interpreters (lupa's Lua 5.1, whose semantics gopher-lua follows, and the newest
Lua that lupa bundles). test_gitops_health.py checks the verdicts against the agent's statuses
and Flux's kstatus."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import yaml

from blockcopy.model.api import GROUP, KIND, VERSION
from support.paths import CRD, ROOT

SCRIPT = (ROOT / "deploy" / "argocd" / "blockcopy-health.lua").read_text()
GOPHER_LUA = "gopher-lua"
RUNTIMES = [GOPHER_LUA, "lupa.lua51", "lupa.lua54"]


def health(obj: dict[str, Any], runtime: str, gitops_health=None) -> dict[str, str]:
    if runtime == GOPHER_LUA:
        result = gitops_health.one(obj)["argocd"]
        assert not result.get("error"), result
        return result
    lupa = importlib.import_module(runtime)
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    # Close to Argo CD's sandbox (only base, table and package): the other libraries' globals
    # go (string methods on values stay in lupa: gopher-lua above is the exact check); the
    # object is the global `obj`.
    lua.execute("string = nil; os = nil; io = nil; math = nil; debug = nil; coroutine = nil; "
                "utf8 = nil")
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(SCRIPT)
    return {"status": result["status"], "message": result["message"]}


def blockcopy(phase: str | None = None, *, pivot: bool = False, abort: bool = False,
              message: str | None = None, generation: int = 1,
              observed: int | None = 1, **status: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
        "metadata": {"name": "vm-vda", "namespace": "vms", "generation": generation},
        "spec": {"domain": "vm", "disk": "vda", "dest": "/var/lib/libvirt/images/c.qcow2",
                 "pivot": pivot, "abort": abort},
    }
    if phase is not None:
        obj["status"] = {"phase": phase, **status}
        if message is not None:
            obj["status"]["message"] = message
        if observed is not None:
            obj["status"]["observedGeneration"] = observed
    return obj


CASES = [
    # (object, expected status, words the message must contain)
    (blockcopy(), "Progressing", ["claim"]),
    (blockcopy("Pending", message="no agent has claimed it: domain 'web-1' is not running"),
     "Progressing", ["Pending", "domain 'web-1' is not running"]),
    (blockcopy("Queued", message="1st in the queue"), "Progressing", ["Queued", "1st"]),
    (blockcopy("Preparing", message="rebasing"), "Progressing", ["Preparing", "rebasing"]),
    (blockcopy("Copying", message="copying vda", progress="42%"),
     "Progressing", ["Copying (42%)", "copying vda"]),
    (blockcopy("Mirrored", pivot=False, message="in sync"),
     "Healthy", ["waiting for you", "spec.pivot", "in sync"]),
    (blockcopy("Mirrored", pivot=True, message="in sync"),
     "Progressing", ["pivoting next", "in sync"]),
    (blockcopy("Mirrored", abort=True), "Progressing", ["aborting next"]),
    (blockcopy("Mirrored", pivot=True, abort=True), "Progressing", ["aborting next"]),
    (blockcopy("Pivoting", pivot=True, message="switching"), "Progressing", ["Pivoting",
                                                                               "switching"]),
    (blockcopy("Pivoted", pivot=True, message="VM runs on the copy"),
     "Healthy", ["Pivoted", "VM runs on the copy"]),
    (blockcopy("Aborting", abort=True), "Progressing", ["Aborting"]),
    (blockcopy("Aborted", abort=True, message="job ended"), "Healthy", ["Aborted", "job ended"]),
    (blockcopy("Failed", message="dest /etc/x is outside the allowed paths"),
     "Degraded", ["Failed", "outside the allowed paths"]),
    # A Git commit set pivot: true (generation 2); the agent has not seen it yet.
    (blockcopy("Mirrored", pivot=True, generation=2, observed=1), "Progressing",
     ["generation 2"]),
    # ... but a finished copy stays finished, whatever the spec says later.
    (blockcopy("Pivoted", generation=3, observed=2), "Healthy", ["Pivoted"]),
    (blockcopy("Failed", generation=3, observed=2, message="boom"), "Degraded", ["boom"]),
    # An old agent without observedGeneration, or a phase this script does not know.
    (blockcopy("Mirrored", observed=None), "Healthy", ["waiting for you"]),
    (blockcopy("Exploding"), "Unknown", ["Exploding"]),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("obj, expected, words", CASES,
                         ids=[f"{c[0].get('status', {}).get('phase', 'no-status')}-{i}"
                              for i, c in enumerate(CASES)])
def test_health(obj, expected, words, runtime, gitops_health):
    result = health(obj, runtime, gitops_health)
    assert result["status"] == expected, result
    for word in words:
        assert word in result["message"], result


def test_every_phase_of_the_crd_is_mapped(gitops_health):
    crd = yaml.safe_load(CRD.read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    phases = status["properties"]["phase"]["enum"]
    for phase in phases:
        for pivot in (False, True):
            result = health(blockcopy(phase, pivot=pivot), GOPHER_LUA, gitops_health)
            assert result["status"] in {"Healthy", "Progressing", "Degraded"}, (phase, result)


def test_readme_snippet_embeds_the_script_verbatim():
    # deploy/argocd/README.md shows the argocd-cm entry; it must be this very script.
    readme = (ROOT / "deploy" / "argocd" / "README.md").read_text()
    docs = [d for d in yaml.safe_load_all(readme.split("```yaml", 1)[1].split("```", 1)[0])]
    (cm,) = docs
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "argocd-cm"
    key = f"resource.customizations.health.{GROUP}_{KIND}"
    assert cm["data"][key].strip() == SCRIPT.strip()
