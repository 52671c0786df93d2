"""`blockcopy-operator --mode controller`: the plan controller inside kopf. One daemon per
BlockCopyPlan runs its rounds (``controller.plans``); a change of one of its children (a
BlockCopy labelled blockcopy.dev/plan) or of its spec wakes it at once. Deleting a plan
cancels its children that have not pivoted. State lives in kopf's Memo. Importing this
module registers its handlers: the agent's runtime never imports it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf

from blockcopy.adapters.kube import load_config
from blockcopy.adapters.plan_kube import PlanKubeClient
from blockcopy.controller.plans import ControllerConfig, PlanController
from blockcopy.model.api import GROUP, PLURAL, VERSION
from blockcopy.model.plan import PLAN_FINALIZER, PLAN_LABEL, PLAN_PLURAL

Logger = logging.Logger | logging.LoggerAdapter[Any]
ROUND_TIMEOUT = 120.0  # s: a round that takes longer is abandoned, the next one starts afresh


def memo_for(config: ControllerConfig) -> kopf.Memo:
    return kopf.Memo(config=config, controller=None, wakers={}, generations={}, children={})


def _waker(memo: kopf.Memo, namespace: str, name: str) -> asyncio.Event:
    wakers: dict[tuple[str, str], asyncio.Event] = memo.wakers
    return wakers.setdefault((namespace, name), asyncio.Event())


@kopf.on.startup()
async def start(memo: kopf.Memo, settings: kopf.OperatorSettings, logger: Logger,
                **_: Any) -> None:
    load_config()
    settings.peering.standalone = True  # one replica (the chart's Deployment: Recreate)
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(
        field="status.kopf.lastHandledConfiguration")
    settings.persistence.finalizer = PLAN_FINALIZER
    settings.posting.level = logging.WARNING
    # Server-side filtering: only the plans' children, never the other BlockCopies.
    settings.watching.label_selectors[GROUP, PLURAL] = PLAN_LABEL
    memo.controller = PlanController(PlanKubeClient(), memo.config, clock=time.monotonic,
                                     now=lambda: dt.datetime.now(dt.UTC))
    logger.info("plan controller ready (agents count as gone after %g s without an "
                "inventory update)", memo.config.agent_timeout)


def child_signature(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of a child a plan's round acts on at once: its phase, its pivot and abort, its
    deletion. Progress (cur/end, rate) is not in it: the running plan's 2-second rounds take
    it in, and a round per progress write (every second per copying child) only loaded the
    API server and slowed the hand-offs it is there for."""
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    status = body.get("status") or {}
    return (status.get("phase"), spec.get("pivot") is True, spec.get("abort") is True,
            bool(meta.get("deletionTimestamp")))


def _child_event(body: kopf.Body, memo: kopf.Memo, type: str | None = None,
                 **_: Any) -> bool:
    """Wakes the child's plan when the child changed in a way its round acts on (or came or
    went); never lets a handler run (no log line per event)."""
    meta = body.get("metadata", {})
    labels = meta.get("labels") or {}
    plan, namespace = labels.get(PLAN_LABEL), meta.get("namespace")
    if not (plan and namespace):
        return False
    seen: dict[str, tuple[Any, ...]] = memo.children
    key = str(meta.get("uid") or f"{namespace}/{meta.get('name')}")
    if type == "DELETED":
        seen.pop(key, None)
        _waker(memo, namespace, plan).set()
        return False
    signature = child_signature(body)
    if seen.get(key) != signature:
        seen[key] = signature
        _waker(memo, namespace, plan).set()
    return False


@kopf.on.event(GROUP, VERSION, PLURAL, when=_child_event)
async def child_changed(**_: Any) -> None:  # never called: its filter is the point
    raise AssertionError("unreachable")


def _plan_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> bool:
    """A new generation of a plan (its spec changed) wakes its daemon; status writes do not."""
    meta = body.get("metadata", {})
    key = (meta.get("namespace"), meta.get("name"))
    if memo.generations.get(key) != meta.get("generation"):
        memo.generations[key] = meta.get("generation")
        _waker(memo, *key).set()
    return False


@kopf.on.event(GROUP, VERSION, PLAN_PLURAL, when=_plan_event)
async def plan_changed(**_: Any) -> None:  # never called: its filter is the point
    raise AssertionError("unreachable")


@kopf.daemon(GROUP, VERSION, PLAN_PLURAL, cancellation_timeout=10)
async def drive(memo: kopf.Memo, body: kopf.Body, stopped: kopf.DaemonStopped,
                logger: Logger, **_: Any) -> None:
    wake = _waker(memo, body["metadata"]["namespace"], body["metadata"]["name"])
    loop = asyncio.get_running_loop()
    while not stopped:
        wake.clear()
        try:
            delay = await asyncio.wait_for(memo.controller.round(body), ROUND_TIMEOUT)
        except Exception as exc:  # the API failed (or hung): the next round tries again
            logger.warning("plan round failed (next in 10 s): %s", exc)
            delay = 10.0
        deadline = loop.time() + delay
        while not stopped and not wake.is_set() and loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), min(0.5, deadline - loop.time()))


@kopf.on.delete(GROUP, VERSION, PLAN_PLURAL)
async def cancel(memo: kopf.Memo, body: kopf.Body, logger: Logger, **_: Any) -> None:
    cancelled = await memo.controller.cancel(body)
    memo.wakers.pop((body["metadata"]["namespace"], body["metadata"]["name"]), None)
    logger.info("plan deleted: %d children that had not pivoted cancelled%s", len(cancelled),
                f" ({', '.join(cancelled[:20])})" if cancelled else "")


def run(config: ControllerConfig, *, namespaces: tuple[str, ...]) -> None:
    asyncio.run(kopf.operator(memo=memo_for(config), standalone=True,
                              clusterwide=not namespaces, namespaces=namespaces))
