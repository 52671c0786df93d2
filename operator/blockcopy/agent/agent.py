"""The node agent: the composition of claimer, followers and recorder for one node, plus the
routing between them (libvirt's events and spec changes to the right follower) and the
cancellation of a job whose object is deleted. kopf's handlers call into this object only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from blockcopy.agent.claimer import Claimer
from blockcopy.agent.follower import Follower
from blockcopy.agent.groups import Groups, key_of
from blockcopy.agent.groupswitch import GroupSwitch
from blockcopy.agent.inventory import InventoryPublisher
from blockcopy.agent.loop import StopSignal
from blockcopy.agent.recorder import Clock, Recorder, phase_of, utc_now
from blockcopy.agent.starter import StartSettings
from blockcopy.agent.steps import FollowSettings
from blockcopy.agent.verifier import Verifier
from blockcopy.core import reconcile
from blockcopy.core.pace import DEFAULT_BUDGET
from blockcopy.core.policy import Policy
from blockcopy.core.slots import CopySlots
from blockcopy.model.api import (
    DEFAULT_ALLOWED_PATHS,
    JOB_PHASES,
    NODE_LABEL,
    TERMINAL_PHASES,
    Phase,
    SpecError,
)
from blockcopy.model.kubeapi import Kube, ObjectRef
from blockcopy.model.metrics import NULL_METRICS, Metrics
from blockcopy.model.observation import JobEvent
from blockcopy.model.ports import Files, Hypervisor, HypervisorError, Images
from blockcopy.model.startedspec import parse_running_spec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    node_name: str
    libvirt_uri: str = "qemu:///system"
    allowed_paths: tuple[str, ...] = DEFAULT_ALLOWED_PATHS
    allowed_network_dests: tuple[str, ...] = ()  # HOST:PORT or socket directories
    status_interval: float = 1.0  # at most one progress write per object per interval
    progress_budget: float = DEFAULT_BUDGET  # progress refreshes per second, all objects
    poll_interval: float = 5.0  # fallback look when no libvirt event arrives
    claim_interval: float = 30.0  # re-check of unclaimed objects
    libvirt_check_interval: float = 15.0  # blockcopy_libvirt_up, even with no copy running
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    # Who may copy what (none: anyone, within the allowed roots).
    policy: Policy = dataclasses.field(default_factory=Policy)
    max_active_copies: int = 0  # copies running at once on this node; 0: no limit
    liveness_port: int = 0  # 0: no liveness endpoint
    metrics_port: int = 0  # 0: no metrics endpoint
    inventory_interval: float = 300.0  # the inventory's slow resync; 0: no inventory


class Agent:
    def __init__(self, config: AgentConfig, *, kube: Kube, hv: Hypervisor, images: Images,
                 files: Files, metrics: Metrics = NULL_METRICS, clock: Clock = utc_now):
        self.config, self.kube, self.hv, self.images, self.files = \
            config, kube, hv, images, files
        self.recorder = Recorder(kube=kube, node_name=config.node_name,
                                 status_interval=config.status_interval,
                                 progress_budget=config.progress_budget, clock=clock,
                                 metrics=metrics)
        self.claimer = Claimer(kube=kube, hv=hv, recorder=self.recorder,
                               node_name=config.node_name, namespaces=config.namespaces,
                               claim_interval=config.claim_interval)
        start = StartSettings(allowed_paths=config.allowed_paths,
                              allowed_network=config.allowed_network_dests,
                              policy=config.policy)
        self.settings = FollowSettings(start=start,
                                       poll_interval=config.poll_interval)
        self.followers: dict[tuple[str, str], Follower] = {}
        self.slots = CopySlots(config.max_active_copies, on_change=self._wake_queued)
        self.verifier = Verifier(hv, images, owner=config.node_name)
        self.groups = Groups(hv, lambda: list(self.followers.values()), kube=kube, clock=clock,
                             node=config.node_name)
        self.switch = GroupSwitch(self.verifier, self.groups)
        self._start_lock = asyncio.Lock()  # starts are serialized: one job per disk
        self._claimer_task: asyncio.Task[None] | None = None
        self._libvirt_task: asyncio.Task[None] | None = None
        self._left_paused_unknown = False  # the look at start failed: the libvirt check looks
        self.inventory: InventoryPublisher | None = None
        if config.inventory_interval > 0:
            self.inventory = InventoryPublisher(
                node_name=config.node_name, hv=hv, images=images, kube=kube,
                resync_interval=config.inventory_interval, clock=clock)
        self._inventory_task: asyncio.Task[None] | None = None
        hv.add_listener(self._on_job_event)

    # -- lifecycle ---------------------------------------------------------------------
    def start_claiming(self) -> None:
        self._claimer_task = asyncio.create_task(self.claimer.run(), name="claimer")
        self._libvirt_task = asyncio.create_task(self.check_libvirt(), name="libvirt-check")

    async def check_libvirt(self) -> None:
        """Whether libvirtd answers, every libvirt_check_interval, for blockcopy_libvirt_up:
        the follow loops report it too, but only while they have a copy to follow. Once it
        answers, a guest whose resume after the check at the switch failed is resumed, and
        so are those a previous agent left paused when libvirt did not answer at start."""
        while True:
            try:
                await self.hv.version()
                self.recorder.metrics.libvirt_up(True)
                if self._left_paused_unknown:
                    await self.resume_left_paused()
                for name in await self.verifier.resume_unresumed():
                    log.warning("resumed VM %s: its resume after the check at the switch "
                                "had failed (libvirt unreachable)", name)
            except HypervisorError as exc:
                log.debug("libvirt check failed: %s", exc)
                self.recorder.metrics.libvirt_up(False)
            except Exception:  # never end the check: the gauge would freeze
                log.exception("libvirt check failed")
                self.recorder.metrics.libvirt_up(False)
            await asyncio.sleep(self.config.libvirt_check_interval)

    async def resume_left_paused(self) -> list[str]:
        """Resume the VMs this node's previous agent paused for a check at the switch and
        did not resume (it died meanwhile); never one paused by anyone else. When libvirt
        does not answer, the libvirt check looks again once it does."""
        try:
            resumed = await self.hv.resume_left_paused(self.config.node_name)
        except HypervisorError as exc:
            log.error("cannot look for VMs a previous agent left paused (looked for again "
                      "once libvirt answers): %s", exc)
            self._left_paused_unknown = True
            return []
        self._left_paused_unknown = False
        for name in resumed:
            log.warning("resumed VM %s: a previous agent of this node paused it for the check "
                        "at the switch and did not resume it", name)
        return resumed

    def start_inventory(self) -> None:
        """Publish this node's DiskInventory (unless --inventory-interval 0)."""
        if self.inventory is not None:
            self._inventory_task = asyncio.create_task(self.inventory.run(), name="inventory")

    async def stop(self) -> None:
        for task in (self._claimer_task, self._libvirt_task, self._inventory_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.switch.stop()  # its guest resumed while libvirt is still ours
        await self.recorder.drain()
        await self.hv.close()

    # -- ownership and routing ---------------------------------------------------------
    @property
    def own_selector(self) -> str:
        """Server-side label selector of the objects this agent owns."""
        return f"{NODE_LABEL}={self.config.node_name}"

    def owns(self, body: Mapping[str, Any]) -> bool:
        labels = (body.get("metadata") or {}).get("labels") or {}
        return labels.get(NODE_LABEL) == self.config.node_name

    def count_watch_event(self, body: Mapping[str, Any]) -> None:
        self.recorder.watch_event("objects", body)

    def _on_job_event(self, domain_uuid: str, target: str, event: JobEvent) -> None:
        for follower in self.followers.values():
            follower.on_job_event(domain_uuid, target, event)

    def spec_changed(self, namespace: str, name: str, generation: int | None) -> None:
        follower = self.followers.get((namespace, name))
        if follower is not None:
            follower.on_spec_change(generation)
            self.groups.changed(key_of(follower.body), by=follower)

    async def acknowledge(self, body: Mapping[str, Any]) -> None:
        """A finished object (no follower) edited later: nothing will be done, and its status
        says so for the new generation (kstatus would otherwise call it InProgress forever)."""
        meta, raw = body["metadata"], body.get("status") or {}
        if (meta["namespace"], meta["name"]) in self.followers or \
                phase_of(raw) not in TERMINAL_PHASES:
            return
        generation = meta.get("generation")
        if raw.get("observedGeneration") == generation:
            return
        conditions = [{**c, "observedGeneration": generation}
                      for c in raw.get("conditions") or []]
        await self.kube.patch_status(meta["namespace"], meta["name"],
                                     {"observedGeneration": generation,
                                      "conditions": conditions})

    # -- following ---------------------------------------------------------------------
    async def follow(self, body: Mapping[str, Any], stop: StopSignal) -> None:
        """Drive one owned object until it is terminal, deleted, or the agent stops."""
        ref = ObjectRef.of(body)
        key = (ref.namespace, ref.name)
        if phase_of(body.get("status")) in (*JOB_PHASES, Phase.PREPARING):
            self.slots.hold(key)  # a job of ours runs (or is prepared): it holds a slot
        follower = Follower(body, hv=self.hv, images=self.images, files=self.files,
                            settings=self.settings,
                            slots=self.slots, groups=self.groups,
                            recorder=self.recorder.for_object(ref, body.get("status")),
                            start_lock=self._start_lock, job_holder=self._job_holder,
                            verifier=self.verifier, switch=self.switch)
        self.followers[key] = follower
        try:
            await follower.run(stop)
        finally:
            self.slots.release(key)  # finished, deleted, or no longer ours to follow
            self.switch.forget(follower)
            if self.followers.get(key) is follower:
                del self.followers[key]
            self.groups.changed(key_of(follower.body), by=follower)  # one member fewer

    def _wake_queued(self) -> None:
        for follower in self.followers.values():
            if follower.recorder.phase == Phase.QUEUED:
                follower.wake.set()

    def _job_holder(self, asking: Follower) -> str | None:
        """namespace/name of another followed object that holds the job on ``asking``'s
        disk, if any."""
        for (namespace, name), other in self.followers.items():
            if other is not asking and other.holds_job and \
                    other.disk_ref == asking.disk_ref:
                return f"{namespace}/{name}"
        return None

    async def cancel_for_deletion(self, body: Mapping[str, Any]) -> str:
        """Cancel our job (if still running) before the object goes; the VM stays on its
        source and the destination is left in place. Returns what was done."""
        raw = body.get("status") or {}
        meta = body["metadata"]
        self.recorder.forget((meta["namespace"], meta["name"]))  # its gauges go with it
        if phase_of(raw) == Phase.PIVOTED:
            return "nothing to cancel: the VM runs on the copy"
        if not raw.get("startTime") and phase_of(raw) in TERMINAL_PHASES:
            return "nothing to cancel: this BlockCopy never started a job"
        try:
            spec, _ = parse_running_spec(body.get("spec") or {}, raw.get("startedSpec"), 0)
        except SpecError:
            return "nothing to cancel: the spec was invalid before any job started"
        # A switch of its group under way goes first: it may have taken this disk in before
        # the deletion came, and a group switches all or none (agent.groupswitch).
        await self.switch.ended(key_of(body))
        # Share the follow loop's lock if it still runs.
        follower = self.followers.get((meta["namespace"], meta["name"]))
        lock = follower.lock if follower is not None else asyncio.Lock()
        async with lock:
            disk = await self.hv.observe(spec.domain, raw.get("target") or spec.disk)
            mirror = disk.mirror
            if mirror is None or not reconcile.same_path(mirror.dest, spec.dest):
                return "nothing to cancel: no job of this BlockCopy is running"
            await self.hv.cancel(spec.domain, disk.target or spec.disk)
        return f"cancelled the copy to {spec.dest}; the VM stays on {disk.source}"
