"""kopf handlers: only wiring. Everything they call lives in agent / kube / hypervisor."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from blockcopy import hypervisor
from blockcopy.agent import Agent, AgentConfig
from blockcopy.api import GROUP, PLURAL, VERSION
from blockcopy.hypervisor import HypervisorError, HypervisorUnavailable
from blockcopy.kube import Kube, load_config
from blockcopy.probes import LivenessServer

log = logging.getLogger(__name__)

# Set by the command line before kopf starts; the Agent is built on kopf's loop at startup.
CONFIG: AgentConfig | None = None
AGENT: Agent | None = None
CLAIMER: asyncio.Task | None = None
LIVENESS_PORT = 0  # 0: no liveness endpoint
LIVENESS: LivenessServer | None = None
_POSTING: set[asyncio.Task] = set()  # asyncio keeps only weak references to tasks


def _post_event(body: Any, etype: str, reason: str, message: str) -> None:
    try:
        kopf.event(body, type=etype, reason=reason, message=message[:1024])
    except LookupError:  # outside kopf's handler context (the claimer task): post it directly
        assert AGENT is not None
        task = asyncio.get_running_loop().create_task(
            AGENT.kube.post_event(body, etype, reason, message, component="blockcopy-operator"))
        _POSTING.add(task)
        task.add_done_callback(_POSTING.discard)


class _QuietWatchEvents(logging.Filter):
    """Drop kopf's per-event success lines of the watch handler (one per status write)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "'on_change' succeeded" not in record.getMessage()


logging.getLogger("kopf.objects").addFilter(_QuietWatchEvents())


@kopf.on.startup()
async def start_agent(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    global AGENT
    assert CONFIG is not None, "blockcopy.cli sets CONFIG before kopf runs"
    # One agent per node: no peering between them (they must all run at once).
    settings.peering.standalone = True
    # Keep kopf's bookkeeping in status, not in annotations: GitOps tools own the object.
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(
        field="status.kopf.lastHandledConfiguration")
    settings.persistence.finalizer = f"{GROUP}/cancel-job"
    load_config()
    hypervisor.use_asyncio_loop(asyncio.get_running_loop())
    hv = hypervisor.Hypervisor(CONFIG.libvirt_uri)
    try:
        logger.info("libvirt %s at %s", await asyncio.to_thread(hv.version), CONFIG.libvirt_uri)
    except HypervisorError as exc:  # keep running: the follow loops retry with backoff
        logger.warning("libvirt not reachable yet at %s: %s", CONFIG.libvirt_uri, exc)
    AGENT = Agent(CONFIG, Kube(), hv, _post_event)
    # Server-side filtering: kopf receives only this node's objects; the claimer receives
    # only unclaimed ones. No agent ever downloads the objects of other nodes.
    settings.watching.label_selectors[GROUP, PLURAL] = AGENT.own_selector
    global CLAIMER, LIVENESS
    CLAIMER = asyncio.create_task(AGENT.run_claimer(), name="claimer")
    if LIVENESS_PORT:
        # Bound before "agent ready" is logged: whoever reads that line may probe at once.
        LIVENESS = LivenessServer(host="0.0.0.0", port=LIVENESS_PORT)
        await LIVENESS.start()
    logger.info("agent ready on node %s (allowed destination roots: %s)", CONFIG.node_name,
                ", ".join(CONFIG.allowed_paths))


@kopf.on.cleanup()
async def stop_agent(**_: Any) -> None:
    if CLAIMER is not None:
        CLAIMER.cancel()
    if LIVENESS is not None:
        await LIVENESS.stop()
    if AGENT is not None:
        # Closing the connection removes libvirt's keepalive timer from the loop; kopf would
        # otherwise wait for it (about 5 s) before exiting.
        await asyncio.to_thread(AGENT.hv.close)


def _owned(body: kopf.Body, **_: Any) -> bool:
    return AGENT is not None and AGENT.owns(body)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_change(body: kopf.Body, type: str, namespace: str, name: str, **_: Any) -> None:
    assert AGENT is not None
    if type != "DELETED":  # wake the follow loop if the spec (pivot, abort...) changed
        meta = body.get("metadata", {})
        AGENT.poke(namespace, name, meta.get("generation"), bool(meta.get("deletionTimestamp")))


@kopf.daemon(GROUP, VERSION, PLURAL, when=_owned, cancellation_timeout=10)
async def follow(body: kopf.Body, stopped: kopf.DaemonStopped, **_: Any) -> None:
    assert AGENT is not None
    await AGENT.follow(body, stopped)


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_owned)
async def cancel_on_delete(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    assert AGENT is not None
    try:
        outcome = await AGENT.cancel_for_deletion(body)
        AGENT.phase_counts.forget((body["metadata"]["namespace"], body["metadata"]["name"]))
    except HypervisorUnavailable as exc:
        raise kopf.TemporaryError(f"libvirt unreachable, cannot cancel yet: {exc}",
                                  delay=10) from exc
    except HypervisorError as exc:
        raise kopf.TemporaryError(f"cancelling the block job failed: {exc}", delay=10) from exc
    logger.info(outcome)
