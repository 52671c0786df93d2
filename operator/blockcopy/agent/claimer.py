"""Claiming: which agent handles an object that no agent handles yet.

Each agent watches only the unclaimed objects (label selector ``!blockcopy.dev/node``,
evaluated by the API server) and claims those whose ``spec.nodeName`` is its node, or,
without one, whose domain its libvirt runs. The claim is a label write conditioned on the
object's resourceVersion, so of two agents only one can win. Once claimed, the object
leaves this watch and enters the claiming agent's own one (kopf's, by label).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Mapping
from typing import Any

from blockcopy.agent.recorder import Recorder, phase_of
from blockcopy.core import status
from blockcopy.core.backoff import API_WATCH, Backoff
from blockcopy.model.api import FINALIZER, TERMINAL_PHASES, Phase
from blockcopy.model.ports import Hypervisor, HypervisorError, Kube, ObjectRef

log = logging.getLogger(__name__)


class Verdict(enum.StrEnum):
    CLAIMED = "claimed"
    LOST_RACE = "lost the race"
    PENDING = "pending"  # not ours; marked Pending (once)
    NOT_MINE = "not mine"
    IGNORED = "ignored"  # deleting or finished


class Claimer:
    def __init__(self, *, kube: Kube, hv: Hypervisor, recorder: Recorder, node_name: str,
                 namespaces: tuple[str, ...] = (), claim_interval: float = 30.0):
        self.kube, self.hv, self.recorder = kube, hv, recorder
        self.node_name = node_name
        self.namespaces = namespaces  # empty: every namespace
        self.claim_interval = claim_interval

    async def run(self) -> None:
        """Watch (and re-list every claim_interval: the periodic re-check of objects whose
        domain ran nowhere) until cancelled."""
        watches = [asyncio.create_task(self._watch(ns), name=f"claimer:{ns or '*'}")
                   for ns in self.namespaces or (None,)]
        try:
            await asyncio.gather(*watches)
        finally:
            for task in watches:
                task.cancel()

    async def _watch(self, namespace: str | None) -> None:
        backoff = Backoff(API_WATCH)
        where = f"namespace {namespace}" if namespace else "every namespace"
        while True:
            try:
                seen = 0
                async for body in self.kube.unclaimed(namespace,
                                                      timeout=int(self.claim_interval)):
                    backoff.succeeded()
                    seen += 1
                    try:
                        await self.consider(body)
                    except Exception:
                        log.exception("claiming %s failed",
                                      body.get("metadata", {}).get("name"))
                # One line per pass: whoever waits for the claimer to have looked (a test,
                # an operator reading logs) has a positive sign that it did.
                log.info("claimer pass over %s done: %d unclaimed object(s) considered",
                         where, seen)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # API outage: retry with back-off
                delay = backoff.failed()
                log.warning("watching unclaimed BlockCopies failed (retry in %g s): %s",
                            delay, exc)
                await asyncio.sleep(delay)

    async def consider(self, body: Mapping[str, Any]) -> Verdict:
        """Claim the object if it is ours; otherwise mark it Pending once."""
        meta = body["metadata"]
        namespace, name, version = meta["namespace"], meta["name"], meta["resourceVersion"]
        self.recorder.watch_event("unclaimed", body)
        if meta.get("deletionTimestamp") or phase_of(body.get("status")) in TERMINAL_PHASES:
            return Verdict.IGNORED
        spec = body.get("spec") or {}
        spec_node, domain = spec.get("nodeName"), spec.get("domain")
        if spec_node:
            mine = spec_node == self.node_name
            waiting = f"waiting for the agent on node {spec_node} to claim it"
        else:
            mine = isinstance(domain, str) and bool(domain) and await self._runs(domain)
            waiting = (f"no agent has claimed it: domain {domain!r} is not running on any node "
                       f"with an agent (re-checked every {self.claim_interval:g} s)")
        if mine:
            # The finalizer comes with the claim: kopf would otherwise add it in a write of
            # its own and wait for that to come back before starting to follow the object.
            finalizers = list(meta.get("finalizers") or [])
            if FINALIZER not in finalizers:
                finalizers.append(FINALIZER)
            if await self.kube.claim(namespace, name, node=self.node_name,
                                     resource_version=version, finalizers=finalizers):
                log.info("%s/%s: claimed for node %s", namespace, name, self.node_name)
                return Verdict.CLAIMED
            log.info("%s/%s: another agent claimed it first", namespace, name)
            return Verdict.LOST_RACE
        if not (body.get("status") or {}).get("phase"):
            generation = meta.get("generation")
            pending = {"phase": Phase.PENDING.value, "message": waiting, "progress": "0%",
                       "observedGeneration": generation,
                       "conditions": status.conditions(
                           Phase.PENDING, reason=Phase.PENDING.value, message=waiting,
                           was_mirrored=False, generation=generation,
                           now=self.recorder.clock(), previous=None)}
            if await self.kube.patch_status(namespace, name, pending, resource_version=version):
                self.recorder.post_event(ObjectRef.of(body), type="Normal",
                                         reason=Phase.PENDING.value,
                                         message=f"Pending: {waiting}")
            return Verdict.PENDING
        return Verdict.NOT_MINE

    async def _runs(self, domain: str) -> bool:
        try:
            return await self.hv.has_running_domain(domain)
        except HypervisorError as exc:
            log.warning("cannot check domain %r: %s", domain, exc)
            return False
