"""One agent on the FAKES of ``support.fakes`` (hypervisor, API, qemu-img) with the real file
system under a test's tmp_path, on the event loop's clock (looptime makes it a fake one):
the harness of every orchestration test of the agent (follower, groups, layouts, slots);
``GroupNode``: the same with the members of one disk group on one VM.
The e2e tests run the same paths on real parts."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockcopy.adapters.files import LocalFiles
from blockcopy.agent.agent import Agent, AgentConfig
from blockcopy.model.api import NODE_LABEL
from support.fakes import FakeHypervisor, FakeImages, FakeKube, Stop

EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class FakeNode:
    """``config`` fields go to AgentConfig; allowed_paths defaults to ``root``. The agent's
    clock is EPOCH + the loop's time."""

    def __init__(self, root: Path, *, node: str = "n", **config: Any):
        self.root, self.node = root, node
        self.hv, self.kube, self.images = FakeHypervisor(), FakeKube(), FakeImages()
        self.files = LocalFiles()
        config.setdefault("allowed_paths", (str(root),))
        self.config = AgentConfig(node_name=node, **config)
        self.agent = self._agent()
        self.stop = Stop()
        self.tasks: list[asyncio.Task[None]] = []

    def _agent(self) -> Agent:
        return Agent(self.config, kube=self.kube, hv=self.hv, images=self.images,
                     files=self.files, clock=self.now)

    @staticmethod
    def now() -> dt.datetime:
        return EPOCH + dt.timedelta(seconds=asyncio.get_running_loop().time())

    async def restart(self) -> None:
        """The agent process dies (its follow loops stop) and a new one starts on the same
        hypervisor and API server."""
        self.stop.set()
        await asyncio.gather(*self.tasks)
        self.agent, self.stop, self.tasks = self._agent(), Stop(), []

    # -- objects ---------------------------------------------------------------------
    def add(self, name: str, spec: dict[str, Any], *, status: dict[str, Any] | None = None,
            created: str | None = None) -> dict[str, Any]:
        """A BlockCopy in the fake API server, claimed by this node."""
        return self.kube.add(name, spec, status=status, labels={NODE_LABEL: self.node},
                             created=created)

    def follow(self, body: dict[str, Any]) -> asyncio.Task[None]:
        task = asyncio.create_task(self.agent.follow(body, self.stop))
        self.tasks.append(task)
        return task

    def body(self, name: str) -> dict[str, Any]:
        return self.kube.objects[("ns", name)]

    def edit(self, body: dict[str, Any], **spec: Any) -> None:
        """A user's edit: the spec changes, the generation grows, kopf's handler pokes."""
        body["spec"].update(spec)
        meta = body["metadata"]
        meta["generation"] += 1
        self.agent.spec_changed(meta["namespace"], meta["name"], meta["generation"])

    def status(self, name: str) -> dict[str, Any]:
        return self.kube.status_of(name)

    def phase(self, name: str) -> str | None:
        return self.status(name).get("phase")

    # -- time ------------------------------------------------------------------------
    async def until(self, predicate: Callable[[], object], timeout: float = 120,
                    step: float = 0.01) -> float:
        """Wait (in loop time) until ``predicate()``; returns the loop time it became true."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise AssertionError(f"not true after {timeout} s of loop time")
            await asyncio.sleep(step)
        return loop.time()

    async def reach(self, name: str, phase: str, timeout: float = 300) -> dict[str, Any]:
        """Wait until ``name`` is in ``phase`` (or Failed), assert it is ``phase``."""
        status = self.kube.status_of
        await self.until(lambda: status(name).get("phase") in (phase, "Failed"), timeout)
        assert status(name).get("phase") == phase, status(name)
        return status(name)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)
        await self.agent.recorder.drain()


class GroupNode(FakeNode):
    """Members of group g on domain vm, one BlockCopy per disk named after it (the copy of
    ``vdX`` is ``vdX.copy.qcow2``); ``followed``: those the agent follows from the start (the
    others exist in the API only, like objects not yet claimed; default all); ``created``:
    their creationTimestamp (an hour old by default: the group's settle time is over);
    ``spec``: more fields of every member's spec."""

    def __init__(self, root: Path, *, disks: tuple[str, ...] = ("vda", "vdb", "vdc"),
                 followed: tuple[str, ...] | None = None,
                 created: str = "2025-12-31T23:00:00Z", **spec: Any):
        super().__init__(root)
        self.hv.add_domain("vm", disks={d: str(root / f"{d}.qcow2") for d in disks})
        self.bodies: dict[str, dict[str, Any]] = {}
        self.dests: dict[str, str] = {}
        for d in disks:
            self.dests[d] = str(root / f"{d}.copy.qcow2")
            self.bodies[d] = self.add(d, {"domain": "vm", "disk": d, "group": "g",
                                          "dest": self.dests[d], **spec}, created=created)
            if followed is None or d in followed:
                self.follow(d)

    def follow(self, body: str | dict[str, Any]) -> asyncio.Task[None]:
        """A member by its disk (or any body)."""
        return super().follow(self.bodies[body] if isinstance(body, str) else body)

    def edit(self, body: str | dict[str, Any], **spec: Any) -> None:
        super().edit(self.bodies[body] if isinstance(body, str) else body, **spec)

    async def mirrored(self) -> None:
        """Every member copies, then every mirror is ready: all Mirrored."""
        await self.until(lambda: all(self.phase(d) == "Copying" for d in self.bodies))
        for d in self.bodies:
            self.hv.make_ready("vm", d)
        await self.until(lambda: all(self.phase(d) == "Mirrored" for d in self.bodies))

    def pivot_all(self) -> None:
        for d in self.bodies:
            self.edit(d, pivot=True)
