"""Starting and stopping the agent inside kopf: kopf's settings, the real clients, the
liveness endpoint, and the order that makes "agent ready" true when it is logged (the
liveness port bound, the claimer started, kopf about to watch this node's objects).

State lives in kopf's ``Memo`` (``memo.config``, ``memo.agent``...), not in module globals:
kopf passes the memo to every handler, and tests build their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import kopf

from blockcopy.adapters import hypervisor
from blockcopy.adapters.files import LocalFiles
from blockcopy.adapters.hostfs import LibvirtHostFiles
from blockcopy.adapters.kube import KubeClient, load_config
from blockcopy.adapters.metrics import PrometheusMetrics
from blockcopy.adapters.probes import LivenessServer
from blockcopy.adapters.qemuimg import QemuImg
from blockcopy.agent.agent import Agent, AgentConfig
from blockcopy.model.api import FINALIZER, GROUP, PLURAL
from blockcopy.model.ports import Hypervisor, HypervisorError

HypervisorFactory = Callable[[str], Hypervisor]  # libvirt URI -> client
Logger = logging.Logger | logging.LoggerAdapter[Any]  # what kopf passes to handlers


def memo_for(config: AgentConfig, *,
             make_hypervisor: HypervisorFactory = hypervisor.LibvirtHypervisor) -> kopf.Memo:
    """The memo kopf hands to every handler. ``make_hypervisor`` is the seam where tests put
    a fault-injecting wrapper around the real libvirt client."""
    return kopf.Memo(config=config, make_hypervisor=make_hypervisor, agent=None, liveness=None)


def configure_kopf(settings: kopf.OperatorSettings, *, selector: str) -> None:
    # One agent per node: no peering between them (they must all run at once).
    settings.peering.standalone = True
    # Keep kopf's bookkeeping in status, not in annotations: GitOps tools own the object.
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(
        field="status.kopf.lastHandledConfiguration")
    settings.persistence.finalizer = FINALIZER
    # The agent posts its own Events; kopf would post one per handler log line.
    settings.posting.level = logging.WARNING
    # Server-side filtering: kopf receives only this node's objects (the claimer receives
    # only unclaimed ones): no agent ever downloads the objects of other nodes.
    settings.watching.label_selectors[GROUP, PLURAL] = selector


async def start(memo: kopf.Memo, settings: kopf.OperatorSettings, logger: Logger) -> None:
    config: AgentConfig = memo.config
    load_config()
    hypervisor.use_asyncio_loop(asyncio.get_running_loop())
    hv = memo.make_hypervisor(config.libvirt_uri)
    prometheus = PrometheusMetrics()
    try:
        caps = await hv.capabilities()
        logger.info("libvirt %s at %s (%s)", await hv.version(), config.libvirt_uri,
                    caps.describe())
        prometheus.hypervisor(caps)
        prometheus.libvirt_up(True)
    except HypervisorError as exc:  # keep running: the follow loops retry with back-off
        logger.warning("libvirt not reachable yet at %s: %s", config.libvirt_uri, exc)
        prometheus.libvirt_up(False)
    # What the agent may not write itself (the chart's read-only roots), libvirt does.
    host_files = LibvirtHostFiles(config.libvirt_uri)
    agent = memo.agent = Agent(config, kube=KubeClient(), hv=hv, images=QemuImg(),
                               files=LocalFiles(make_directory=host_files.make_directory,
                                                delete=host_files.delete),
                               metrics=prometheus)
    configure_kopf(settings, selector=agent.own_selector)
    await agent.resume_left_paused()
    agent.start_claiming()
    agent.start_inventory()
    if config.liveness_port:
        # Bound before "agent ready" is logged: whoever reads that line may probe at once.
        memo.liveness = LivenessServer(host="0.0.0.0", port=config.liveness_port)
        await memo.liveness.start()
    logger.info("agent ready on node %s (allowed destination roots: %s)", config.node_name,
                ", ".join(config.allowed_paths))


async def stop(memo: kopf.Memo) -> None:
    if memo.liveness is not None:
        await memo.liveness.stop()
    if memo.agent is not None:
        await memo.agent.stop()
