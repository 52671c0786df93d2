"""Claiming on the FAKES: who takes an object, Pending once, the lost race, and the watch's
back-off after API errors (fake clock)."""

from __future__ import annotations

import asyncio
import itertools

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


async def test_not_ours_is_marked_pending_once_with_an_event(env):
    kube, claimer = env.kube, env.claimer
    assert await env.consider("a", domain="here", nodeName="n2") == Verdict.PENDING
    assert await env.consider("b", domain="not-running-anywhere") == Verdict.PENDING
    await env.recorder.drain()
    assert kube.status_of("a")["phase"] == "Pending"
    assert "waiting for the agent on node n2" in kube.status_of("a")["message"]
    assert "is not running on any node with an agent" in kube.status_of("b")["message"]
    assert [e.reason for e in kube.events] == ["Pending", "Pending"]
    again = kube.objects[("ns", "b")]
    assert await claimer.consider(again) == Verdict.NOT_MINE  # Pending already: no 2nd write
    assert len(kube.status_writes) == 2


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

    async def failing(namespace, *, timeout):
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
    from blockcopy.model.ports import NullMetrics
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
