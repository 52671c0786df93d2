"""kopf's handlers, all in one place: which events the agent reacts to. Each body is one call
into ``lifecycle`` or the ``Agent`` held in kopf's memo; nothing else lives here."""

from __future__ import annotations

from typing import Any

import kopf

from blockcopy.model.api import GROUP, PLURAL, VERSION
from blockcopy.model.ports import HypervisorError, HypervisorUnavailable
from blockcopy.runtime import lifecycle
from blockcopy.runtime.lifecycle import Logger


@kopf.on.startup()
async def start_agent(memo: kopf.Memo, settings: kopf.OperatorSettings, logger: Logger,
                      **_: Any) -> None:
    await lifecycle.start(memo, settings, logger)


@kopf.on.cleanup()
async def stop_agent(memo: kopf.Memo, **_: Any) -> None:
    await lifecycle.stop(memo)


def _owned(body: kopf.Body, memo: kopf.Memo, **_: Any) -> bool:
    return memo.agent is not None and memo.agent.owns(body)


def _count(body: kopf.Body, memo: kopf.Memo, **_: Any) -> bool:
    """Counts every watch event kopf receives (a metric), and never lets the handler below
    run: kopf has no per-event hook that does not log a line per event, but it evaluates a
    handler's filter for every event."""
    if memo.agent is not None:
        memo.agent.count_watch_event(body)
    return False


@kopf.on.event(GROUP, VERSION, PLURAL, when=_count)
async def count_events(**_: Any) -> None:  # never called: its filter is the point
    raise AssertionError("unreachable")


@kopf.on.field(GROUP, VERSION, PLURAL, field="spec", when=_owned)
async def spec_changed(memo: kopf.Memo, namespace: str | None, name: str, meta: kopf.Meta,
                       body: kopf.Body, **_: Any) -> None:
    """Wake the follow loop for pivot, abort, bandwidth... (status writes do not)."""
    memo.agent.spec_changed(namespace, name, meta.get("generation"))
    await memo.agent.acknowledge(body)


@kopf.daemon(GROUP, VERSION, PLURAL, when=_owned, cancellation_timeout=10)
async def follow(memo: kopf.Memo, body: kopf.Body, stopped: kopf.DaemonStopped,
                 **_: Any) -> None:
    await memo.agent.follow(body, stopped)


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_owned)
async def cancel_on_delete(memo: kopf.Memo, body: kopf.Body, logger: Logger,
                           **_: Any) -> None:
    try:
        logger.info(await memo.agent.cancel_for_deletion(body))
    except HypervisorUnavailable as exc:
        raise kopf.TemporaryError(f"libvirt unreachable, cannot cancel yet: {exc}",
                                  delay=10) from exc
    except HypervisorError as exc:
        raise kopf.TemporaryError(f"cancelling the block job failed: {exc}", delay=10) from exc
