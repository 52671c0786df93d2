"""Claiming: which agent handles an object that no agent handles yet.

Each agent watches only the unclaimed objects (label selector ``!blockcopy.dev/node``) that
name its node or no node (field selectors ``spec.nodeName=NODE`` and ``spec.nodeName=``,
two watches), all evaluated by the API server: the objects naming other nodes never reach
it. It claims those naming its node, and those naming none whose domain its libvirt runs.
The claim is a label write conditioned on the object's resourceVersion, so of two agents
only one can win. Once claimed, the object leaves these watches and enters the claiming
agent's own one (kopf's, by label).

An object naming another node gets nothing from this agent (no status until that node's
agent runs). An API server that refuses the field selector (Kubernetes < 1.32, where the
CRD's selectableFields are dropped) gets one watch of every unclaimed object instead (one
per namespace) and a warning in the log: other nodes' objects then reach the agent, which
leaves them alone.
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
from blockcopy.model.kubeapi import FieldSelectorUnsupported, Kube, ObjectRef
from blockcopy.model.ports import Hypervisor, HypervisorError

log = logging.getLogger(__name__)


class Verdict(enum.StrEnum):
    CLAIMED = "claimed"
    LOST_RACE = "lost the race"
    PENDING = "pending"  # names no node, its domain runs nowhere: marked Pending (once)
    NOT_MINE = "not mine"  # another node's, or Pending already
    IGNORED = "ignored"  # deleting or finished


class Claimer:
    def __init__(self, *, kube: Kube, hv: Hypervisor, recorder: Recorder, node_name: str,
                 namespaces: tuple[str, ...] = (), claim_interval: float = 30.0):
        self.kube, self.hv, self.recorder = kube, hv, recorder
        self.node_name = node_name
        self.namespaces = namespaces  # empty: every namespace
        self.claim_interval = claim_interval
        self.fell_back = False  # the API server refused the field selector on spec.nodeName

    async def run(self) -> None:
        """Watch, per namespace, the objects naming this node and those naming none (and
        re-list every claim_interval: the periodic re-check of objects whose domain ran
        nowhere) until cancelled."""
        nodes = dict.fromkeys((self.node_name, ""))  # this node's objects, those of none
        watches = [asyncio.create_task(self._watch(ns, node),
                                       name=f"claimer:{ns or '*'}:{node or '-'}")
                   for ns in self.namespaces or (None,) for node in nodes]
        try:
            await asyncio.gather(*watches)
        finally:
            for task in watches:
                task.cancel()

    async def _watch(self, namespace: str | None, node: str) -> None:
        backoff = Backoff(API_WATCH)
        where = f"namespace {namespace}" if namespace else "every namespace"
        selector: str | None = node  # None: the server refused the field selector
        while True:
            what = "any spec.nodeName" if selector is None else \
                f"spec.nodeName={selector}" if selector else "no spec.nodeName"
            try:
                seen = 0
                async for body in self.kube.unclaimed(namespace, node_name=selector,
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
                log.info("claimer pass over %s (%s) done: %d unclaimed object(s) considered",
                         where, what, seen)
            except asyncio.CancelledError:
                raise
            except FieldSelectorUnsupported as exc:
                if selector:  # this node's watch: the other one now covers its objects
                    return
                if not self.fell_back:
                    log.warning("the API server refuses field selectors on BlockCopies (%s): "
                                "watching every unclaimed BlockCopy instead, other nodes' "
                                "too (Kubernetes >= 1.32 with the CRD's selectableFields "
                                "spares the agent those)", exc)
                self.fell_back, selector = True, None
            except Exception as exc:  # API outage: retry with back-off
                delay = backoff.failed()
                log.warning("watching unclaimed BlockCopies failed (retry in %g s): %s",
                            delay, exc)
                await asyncio.sleep(delay)

    async def consider(self, body: Mapping[str, Any]) -> Verdict:
        """Claim the object if it is ours; one naming no node whose domain runs nowhere is
        marked Pending once; one naming another node is left alone (it reaches this agent
        only where the API server refuses the field selector)."""
        meta = body["metadata"]
        namespace, name, version = meta["namespace"], meta["name"], meta["resourceVersion"]
        self.recorder.watch_event("unclaimed", body)
        if meta.get("deletionTimestamp") or phase_of(body.get("status")) in TERMINAL_PHASES:
            return Verdict.IGNORED
        spec = body.get("spec") or {}
        spec_node, domain = spec.get("nodeName"), spec.get("domain")
        if spec_node and spec_node != self.node_name:
            return Verdict.NOT_MINE
        if spec_node or (isinstance(domain, str) and bool(domain) and await self._runs(domain)):
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
            waiting = (f"no agent has claimed it: domain {domain!r} is not running on any node "
                       f"with an agent (re-checked every {self.claim_interval:g} s)")
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
