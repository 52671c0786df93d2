"""The pivot, verified (``spec.verify``, rules in ``core.verify``): where the source holds
data is mapped first (the guest runs meanwhile); then the guest is paused, the paused mirror
is given up to 2 s to reach cur == end, QEMU flushes where a qcow2 image's metadata would be
read, the guest's view of both images is read at the sampled blocks (within 2 s) and
compared; on a match the pivot happens while the guest is still paused, and the guest is
resumed whatever happened (with retries). A mismatch ends the job on the source. Full
compares every block with qemu-img (a longer pause: up to 10 s per GiB, 60 s at least).

One pause per VM at a time (the disks of a group pivot one after the other). A VM that was
already paused by someone else is checked as it is and never resumed by the agent; a VM the
agent paused carries a mark in its live metadata, so that the node's next agent resumes it
if this one dies meanwhile (``Agent.resume_left_paused``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable

from blockcopy.core import verify
from blockcopy.core.verify import Result
from blockcopy.model.api import BlockCopySpec, Verify
from blockcopy.model.observation import DiskState
from blockcopy.model.ports import (
    Hypervisor,
    HypervisorError,
    HypervisorUnavailable,
    ImageError,
    Images,
)

log = logging.getLogger(__name__)

SETTLE_POLL = 0.01  # s between looks at the paused mirror's cur/end
RESUME_TRIES = 5


class NotChecked(Exception):
    """The check could not be made (said why)."""


@dataclasses.dataclass(frozen=True)
class Copy:
    """The copy to check: the disk as observed, and what the job was started with."""

    spec: BlockCopySpec
    disk: DiskState
    target: str
    dest_format: str | None


class Verifier:
    """Agent-wide: one pause per VM at a time."""

    def __init__(self, hv: Hypervisor, images: Images, *, owner: str,
                 seed: Callable[[], bytes] = lambda: os.urandom(32)):
        self.hv, self.images, self.owner, self.seed = hv, images, owner, seed
        self._pauses: dict[str, asyncio.Lock] = {}

    async def pivot(self, copy: Copy) -> Result:
        """Check the copy and pivot on a match (or where the check is not asked for, or
        cannot be made and was not asked for explicitly); end the job on a mismatch; leave it
        Mirrored when a check asked for cannot be made. HypervisorError from the pivot
        itself is raised (a refusal) after the guest is resumed."""
        spec, disk = copy.spec, copy.disk
        if spec.verify == Verify.NONE:
            await self.hv.pivot(spec.domain, copy.target)
            return verify.not_asked()
        why = verify.not_verifiable(disk, dest=spec.dest, dest_format=copy.dest_format,
                                    network=spec.network is not None)
        data = None
        if why is None and spec.verify != Verify.FULL:
            try:
                data = await self.images.data_map(disk.source or "", format=str(
                    disk.source_format))
            except ImageError as exc:
                why = f"cannot map the source's data ({exc})"
        if why is not None:
            result = verify.not_verified(spec, why)
            if not result.held:
                await self.hv.pivot(spec.domain, copy.target)
            return result
        # The blocks are drawn before the pause (the data map is the source's, mapped above).
        offsets = verify.sample(self.seed(), data.size, data.data) if data else []
        lock = self._pauses.setdefault(spec.domain, asyncio.Lock())
        async with lock:
            return await self._paused(copy, offsets)

    async def _paused(self, copy: Copy, offsets: list[int]) -> Result:
        spec = copy.spec
        loop = asyncio.get_running_loop()
        ours = await self.hv.pause(spec.domain, self.owner)
        paused_at = loop.time()
        steps: dict[str, float] = {}  # step -> loop time it ended, for the log

        def step(name: str) -> None:
            steps[name] = loop.time()
        try:
            try:
                result = await self._check(copy, offsets, step,
                                           lambda: _ms(loop.time() - paused_at))
            except NotChecked as exc:
                result = verify.not_verified(spec, str(exc))
            if result.result == verify.MISMATCH:
                await self.hv.cancel(spec.domain, copy.target)
                step("cancel")
            elif not result.held:
                await self.hv.pivot(spec.domain, copy.target)
                step("pivot")
        finally:
            if ours:
                await self._resume(spec.domain)
            step("resume")
        pause_ms = _ms(loop.time() - paused_at)
        last, took = paused_at, []
        for name, at in steps.items():
            took.append(f"{name} {_ms(at - last)}")
            last = at
        log.info("%s: guest paused %d ms for the check at the switch (%s: %s; %s ms)",
                 spec.domain, pause_ms, result.method.value, result.result, ", ".join(took))
        return dataclasses.replace(result, pause_ms=pause_ms)

    async def _check(self, copy: Copy, offsets: list[int], step: Callable[[str], None],
                     elapsed: Callable[[], int]) -> Result:
        spec, disk = copy.spec, copy.disk
        source, dest = disk.source or "", spec.dest
        source_format, dest_format = str(disk.source_format), str(copy.dest_format)
        await self._settle(spec.domain, copy.target)
        step("settle")
        if verify.needs_flush(source_format=source_format, dest_format=dest_format):
            try:
                await self.hv.flush_images(spec.domain)
            except HypervisorUnavailable:
                raise
            except HypervisorError as exc:
                raise NotChecked(f"QEMU could not flush the images ({exc})") from None
            step("flush")
        method = spec.verify or Verify.SAMPLE
        if method == Verify.FULL:
            size = (await self.hv.disk_size(spec.domain, copy.target)).capacity
            try:
                differ = await self.images.compare_in_use(
                    source, dest, format_a=source_format, format_b=dest_format,
                    timeout=verify.full_limit(size))
            except ImageError as exc:
                raise NotChecked(str(exc)) from None
            if differ is None:
                return verify.matched(method, 0, elapsed())
            return verify.mismatched(method, 0, 1, verify.offset_in(differ), elapsed(),
                                     detail=differ)
        try:
            views = await asyncio.wait_for(asyncio.gather(
                self.images.read_blocks(source, format=source_format, offsets=offsets,
                                        length=verify.BLOCK),
                self.images.read_blocks(dest, format=dest_format, offsets=offsets,
                                        length=verify.BLOCK)), verify.READ_LIMIT)
        except TimeoutError:
            raise NotChecked(f"reading {len(offsets)} blocks of both images took more than "
                             f"{verify.READ_LIMIT:g} s") from None
        except ImageError as exc:
            raise NotChecked(str(exc)) from None
        step("read")
        mismatches, first = verify.compare(offsets, *views)
        if mismatches:
            return verify.mismatched(method, len(offsets), mismatches, first, elapsed())
        return verify.matched(method, len(offsets), elapsed())

    async def _settle(self, domain: str, target: str) -> None:
        """Wait (paused) until the mirror copied what the guest wrote last."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + verify.SETTLE
        while True:
            job = await self.hv.job_progress(domain, target)
            if job is None:
                raise NotChecked("the block job is gone")
            if job.cur == job.end:
                return
            if loop.time() >= deadline:
                raise NotChecked(f"the paused mirror did not settle within {verify.SETTLE:g} "
                                 f"s (cur {job.cur} of {job.end})")
            await asyncio.sleep(SETTLE_POLL)

    async def _resume(self, domain: str) -> None:
        for attempt in range(RESUME_TRIES):
            try:
                await self.hv.resume(domain, self.owner)
                return
            except (HypervisorError, HypervisorUnavailable) as exc:
                log.warning("%s: resume after the check failed (%s), try %d of %d", domain,
                            exc, attempt + 1, RESUME_TRIES)
                if attempt + 1 == RESUME_TRIES:
                    raise
                await asyncio.sleep(0.2 * 2 ** attempt)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
