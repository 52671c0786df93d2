"""Claiming on the FAKES: who takes an object, Pending once, the lost race, the watch's
back-off after API errors (fake clock), the server-side selection of this node's objects and
those naming no node (field selectors on spec.nodeName), and the fallback where the API
server refuses field selectors."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

from blockcopy.agent.claimer import Claimer, Verdict
from blockcopy.agent.recorder import Recorder
from blockcopy.model.api import FINALIZER, NODE_LABEL
from support.fakes import FakeHypervisor, FakeKube

pytestmark = [pytest.mark.asyncio, pytest.mark.looptime]


class Env:
    def __init__(self) -> None:
        self.hv, self.kube = FakeHypervisor(), FakeKube()
        self.hv.add_domain("here")
        self.recorder = Recorder(kube=self.kube, node_name="n1", status_interval=1)
        self.claimer = Claimer(kube=self.kube, hv=self.hv, recorder=self.recorder,
                               node_name="n1", claim_interval=30)

    async def consider(self, name: str, **spec: str) -> Verdict:
        """The claimer's verdict on a new object ``name`` (SPEC and ``spec``)."""
        return await self.claimer.consider(self.kube.add(name, {**SPEC, **spec}))


@pytest.fixture
def env() -> Env:
    return Env()


SPEC = {"disk": "vda", "dest": "/var/lib/libvirt/images/c.qcow2"}


async def test_claims_by_node_name_or_by_running_domain(env):
    assert await env.consider("a", domain="elsewhere", nodeName="n1") == Verdict.CLAIMED
    assert await env.consider("b", domain="here") == Verdict.CLAIMED
    for name in ("a", "b"):
        assert env.kube.objects[("ns", name)]["metadata"]["labels"] == {NODE_LABEL: "n1"}


async def test_domain_running_nowhere_is_marked_pending_once_with_an_event(env):
    kube, claimer = env.kube, env.claimer
    assert await env.consider("b", domain="not-running-anywhere") == Verdict.PENDING
    await env.recorder.drain()
    assert kube.status_of("b")["phase"] == "Pending"
    assert "is not running on any node with an agent" in kube.status_of("b")["message"]
    assert [e.reason for e in kube.events] == ["Pending"]
    again = kube.objects[("ns", "b")]
    assert await claimer.consider(again) == Verdict.NOT_MINE  # Pending already: no 2nd write
    assert len(kube.status_writes) == 1


async def test_another_nodes_object_is_left_alone(env):
    """It reaches the agent only where the API server refuses the field selector; the agent
    writes nothing to it (no status until that node's agent runs), even when the domain
    runs here."""
    assert await env.consider("a", domain="here", nodeName="n2") == Verdict.NOT_MINE
    await env.recorder.drain()
    assert env.kube.objects[("ns", "a")]["metadata"]["labels"] == {}
    assert env.kube.status_writes == [] and env.kube.events == []


async def test_of_two_agents_racing_from_one_version_only_one_claims(env):
    kube, claimer = env.kube, env.claimer
    body = kube.add("a", {**SPEC, "domain": "here"})
    other = Claimer(kube=kube, hv=env.hv, recorder=env.recorder, node_name="n2")
    seen = dict(body, metadata=dict(body["metadata"]))  # both read the same version
    verdicts = await asyncio.gather(claimer.consider(seen), other.consider(seen))
    assert sorted(verdicts) == sorted([Verdict.CLAIMED, Verdict.LOST_RACE])


async def test_deleting_and_finished_objects_are_ignored(env):
    kube, claimer = env.kube, env.claimer
    body = kube.add("a", {**SPEC, "domain": "here"}, status={"phase": "Failed"})
    assert await claimer.consider(body) == Verdict.IGNORED
    body = kube.add("b", {**SPEC, "domain": "here"})
    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert await claimer.consider(body) == Verdict.IGNORED


async def test_the_watch_retries_api_errors_with_back_off(env, monkeypatch):
    kube, claimer = env.kube, env.claimer
    attempts: list[float] = []

    async def failing(namespace, *, node_name, timeout):
        if node_name == "":  # one of the two watches (each backs off on its own)
            attempts.append(asyncio.get_running_loop().time())
        raise ConnectionError("fault injection: API server down")
        yield  # an async generator

    monkeypatch.setattr(kube, "unclaimed", failing)  # FAULT INJECTION: the API is down
    task = asyncio.create_task(claimer.run())
    await asyncio.sleep(100)
    task.cancel()
    gaps = [round(b - a) for a, b in itertools.pairwise(attempts)]
    assert gaps[:7] == [1, 2, 4, 8, 16, 30, 30]


async def test_the_claim_adds_the_finalizer_and_keeps_the_users(env):
    kube, claimer = env.kube, env.claimer
    body = kube.add("a", {**SPEC, "domain": "here"})
    body["metadata"]["finalizers"] = ["example.com/keep-me"]
    assert await claimer.consider(body) == Verdict.CLAIMED
    assert kube.objects[("ns", "a")]["metadata"]["finalizers"] == [
        "example.com/keep-me", FINALIZER]


async def test_libvirt_up_is_checked_with_no_copy_to_follow():
    """blockcopy_libvirt_up follows libvirtd every libvirt_check_interval, even on an idle
    node (the follow loops report it too, but only while they follow a copy)."""
    from blockcopy.agent.agent import Agent, AgentConfig
    from blockcopy.model.metrics import NullMetrics
    from support.fakes import FakeImages

    class UpMetrics(NullMetrics):
        def __init__(self) -> None:
            self.up: list[bool] = []

        def libvirt_up(self, up: bool) -> None:
            self.up.append(up)

    hv, seen = FakeHypervisor(), UpMetrics()
    agent = Agent(AgentConfig(node_name="n1", libvirt_check_interval=10), kube=FakeKube(),
                  hv=hv, images=FakeImages(), files=None, metrics=seen)  # type: ignore[arg-type]
    agent.start_claiming()
    await asyncio.sleep(1)
    assert seen.up == [True]
    hv.unreachable = True
    await asyncio.sleep(10)
    assert seen.up == [True, False]
    hv.unreachable = False
    await asyncio.sleep(10)
    assert seen.up == [True, False, True]
    await agent.stop()


def _seen(claimer: Claimer) -> list[str]:
    """Spy: the names of the objects the claimer is given, in order."""
    seen: list[str] = []
    consider = claimer.consider

    async def spy(body):
        seen.append(body["metadata"]["name"])
        return await consider(body)

    claimer.consider = spy  # type: ignore[method-assign]
    return seen


def _add_mix(kube: FakeKube) -> None:
    kube.add("mine", {**SPEC, "domain": "elsewhere", "nodeName": "n1"})
    kube.add("by-domain", {**SPEC, "domain": "here"})
    kube.add("empty-node", {**SPEC, "domain": "here", "nodeName": ""})
    kube.add("theirs", {**SPEC, "domain": "here", "nodeName": "n2"})
    kube.add("theirs-pending", {**SPEC, "domain": "x", "nodeName": "n3"})


async def test_only_this_nodes_objects_and_those_naming_none_reach_the_agent(env, caplog):
    kube, claimer = env.kube, env.claimer
    _add_mix(kube)
    seen = _seen(claimer)
    task = asyncio.create_task(claimer.run())
    await asyncio.sleep(1)
    # Two watches, both filtered by the API server: spec.nodeName=n1 and spec.nodeName=
    # (which an absent field matches too).
    assert sorted(kube.unclaimed_calls) == [(None, ""), (None, "n1")]
    assert sorted(seen) == ["by-domain", "empty-node", "mine"]
    for name in ("mine", "by-domain", "empty-node"):
        assert kube.objects[("ns", name)]["metadata"]["labels"] == {NODE_LABEL: "n1"}
    await asyncio.sleep(30)  # the re-list after claim_interval: nothing left to consider
    assert len(kube.unclaimed_calls) == 4 and len(seen) == 3
    task.cancel()
    for name in ("theirs", "theirs-pending"):
        assert kube.objects[("ns", name)]["metadata"]["labels"] == {}
        assert kube.status_of(name) == {}
    assert not claimer.fell_back
    assert "refuses field selectors" not in caplog.text


async def test_without_field_selectors_it_watches_every_unclaimed_object(env, caplog):
    """Kubernetes < 1.32 (or a CRD without selectableFields): the API server refuses the
    field selector with 400; the agent says so once and falls back to one watch of every
    unclaimed object per namespace, claiming the same objects and leaving the others'
    alone."""
    kube = env.kube
    kube.field_selectors = False  # FAULT INJECTION: an API server without the feature
    claimer = Claimer(kube=kube, hv=env.hv, recorder=env.recorder, node_name="n1",
                      namespaces=("ns", "other"), claim_interval=30)
    _add_mix(kube)
    seen = _seen(claimer)
    caplog.set_level(logging.INFO)
    task = asyncio.create_task(claimer.run())
    await asyncio.sleep(1)
    assert claimer.fell_back
    # Per namespace: both field-selected watches refused, then one without it.
    for ns in ("ns", "other"):
        calls = [node for space, node in kube.unclaimed_calls if space == ns]
        assert sorted(calls, key=str) == sorted(["n1", "", None], key=str), calls
    assert sorted(seen) == ["by-domain", "empty-node", "mine", "theirs", "theirs-pending"]
    for name in ("mine", "by-domain", "empty-node"):
        assert kube.objects[("ns", name)]["metadata"]["labels"] == {NODE_LABEL: "n1"}
    for name in ("theirs", "theirs-pending"):
        assert kube.objects[("ns", name)]["metadata"]["labels"] == {}
        assert kube.status_of(name) == {}
    warnings = [r for r in caplog.records if "refuses field selectors" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "field label not supported" in warnings[0].getMessage()
    await asyncio.sleep(30)  # the next pass stays on the fallback watch: no new refusal
    assert [node for _, node in kube.unclaimed_calls[6:]] == [None, None]
    passes = [r.getMessage() for r in caplog.records if "claimer pass over" in r.getMessage()]
    assert passes and all("(any spec.nodeName)" in line for line in passes)
    task.cancel()
