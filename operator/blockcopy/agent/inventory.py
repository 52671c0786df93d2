"""The node inventory publisher: what this node's hypervisor holds (domains, disks, sizes,
backing chains), kept in the cluster-scoped DiskInventory named after the node, so that
nobody has to log into a host to write a BlockCopy (``kubectl blockcopy move`` reads it).

It looks at libvirt at start, after domain lifecycle and device events and after a block
job completed (a pivot changes a disk's source), at most once per ``min_gap`` (events during
a look make one trailing look), and on a slow resync; it writes only when the content
changed (a resync refreshes ``updated``). Failures are retried with back-off and logged
once until the next success.
"""

from __future__ import annotations

import asyncio
import logging

from blockcopy.agent.recorder import Clock, utc_now
from blockcopy.core.backoff import Backoff, Schedule
from blockcopy.core.inventory import LookTimer, chain_unknown, with_chains
from blockcopy.core.status import timestamp
from blockcopy.model.inventory import BackingImage, bounded
from blockcopy.model.kubeapi import Kube
from blockcopy.model.observation import JobEvent
from blockcopy.model.ports import Hypervisor, ImageError, Images

log = logging.getLogger(__name__)

MIN_GAP = 2.0  # seconds between the starts of two looks
RETRY = Schedule((2, 5, 10, 30, 60))
CHAIN_READS = 4  # qemu-img processes at once for stopped domains' chains
SLOW_LOOK = 5.0  # seconds: a look that takes longer is logged


class InventoryPublisher:
    def __init__(self, *, node_name: str, hv: Hypervisor, images: Images, kube: Kube,
                 resync_interval: float = 300.0, min_gap: float = MIN_GAP,
                 clock: Clock = utc_now):
        self.node_name, self.hv, self.images, self.kube = node_name, hv, images, kube
        self.clock = clock
        self.timer = LookTimer(min_gap=min_gap, resync=resync_interval)
        self.backoff = Backoff(RETRY)
        self.looks = 0  # looks at libvirt (tests, the benchmark)
        self.writes = 0  # DiskInventory writes
        self._wake = asyncio.Event()
        self._published: dict[str, object] | None = None  # content last written
        # A resync is owed (the first look is one, and a failed one is owed again): every
        # disk's size read again, and the status written even if unchanged (`updated`).
        self._resync_owed = True
        # Stopped domains' chains read with qemu-img, by image path; forgotten at each resync
        # (an image rebased while its domain is stopped is seen then).
        self._chains: dict[str, tuple[BackingImage, ...]] = {}
        hv.add_listener(self._on_job_event)
        hv.add_domain_listener(self._on_domain_event)

    # -- events ------------------------------------------------------------------------
    def _on_domain_event(self, _uuid: str) -> None:
        self.poke()

    def _on_job_event(self, _uuid: str, _target: str, event: JobEvent) -> None:
        if event is JobEvent.COMPLETED:  # a pivot: the disk's source changed
            self.poke()

    def poke(self) -> None:
        """Something on the node changed: look again (soon, within the limits)."""
        self.timer.event()
        self._wake.set()

    # -- the loop ----------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = self.timer.next_look()
            self._wake.clear()
            wait = None if due is None else due - loop.time()
            if wait is None or wait > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass
                continue  # re-read the timer: an event may have come, or the time be due
            if self.timer.looking(loop.time()):
                self._resync_owed = True
                self._chains.clear()
            try:
                await self.publish()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # libvirt, qemu-img or the API server: try again later
                delay = self.backoff.failed()
                if self.backoff.failures == 1:
                    log.warning("cannot publish the inventory of node %s (retrying %s): %s",
                                self.node_name, RETRY.describe(), exc)
                else:
                    log.debug("inventory still not published: %s", exc)
                self.timer.event()
                await asyncio.sleep(delay)
                continue
            if self.backoff.active:
                log.info("the inventory of node %s is published again", self.node_name)
            self.backoff.succeeded()

    async def publish(self) -> bool:
        """One look at libvirt (on a resync: every disk's size read again, not only those of
        new or changed disks); the DiskInventory written if its content changed (or on a
        resync). True when written."""
        self.looks += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        domains = await self.hv.inventory(fresh_sizes=self._resync_owed)
        await self._read_chains({d.source for dom in domains for d in dom.disks
                                 if d.source and chain_unknown(dom, d)})
        took = loop.time() - started
        if took > SLOW_LOOK:  # what delays the inventory after an event
            log.info("the inventory look of node %s took %.1f s (%d domains)", self.node_name,
                     took, len(domains))
        domains = [with_chains(d, self._chains) for d in domains]
        inventory = bounded(self.node_name, timestamp(self.clock()), domains)
        content = inventory.content()
        if content == self._published and not self._resync_owed:
            return False
        await self.kube.publish_inventory(self.node_name, inventory.to_status())
        self._published, self._resync_owed = content, False
        self.writes += 1
        return True

    async def _read_chains(self, paths: set[str]) -> None:
        """qemu-img's backing chains of ``paths`` not read since the last resync, a few at
        once; an image that cannot be read is listed without a chain."""
        limit = asyncio.Semaphore(CHAIN_READS)

        async def read(path: str) -> None:
            async with limit:
                try:
                    self._chains[path] = tuple(await self.images.backing_images(path))
                except ImageError as exc:  # gone, unreadable: listed without its chain
                    log.debug("no backing chain for %s: %s", path, exc)
                    self._chains[path] = ()

        await asyncio.gather(*(read(p) for p in sorted(paths - self._chains.keys())))
