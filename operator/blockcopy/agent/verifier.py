"""The pivot, verified (``spec.verify``, rules in ``core.verify``): where the source holds
data is mapped first (the guest runs meanwhile); then the guest is paused, the paused mirror
is given up to 2 s to reach cur == end, QEMU flushes where a qcow2 image's metadata would be
read, the guest's view of both images is read at the sampled blocks (within 2 s) and
compared; on a match the pivot happens while the guest is still paused, and the guest is
resumed whatever happened (with retries). A mismatch ends the job on the source. Full
compares every block with qemu-img (a longer pause: up to 10 s per GiB, 60 s at least).

One pause per VM at a time. The steps are also the group switch's (``agent.groupswitch``):
``plan`` each member before the pause, then, in one pause (``paused``), ``check`` them all,
each mirror settled, one flush for all. A VM that was already paused by someone else is
checked as it is and never resumed by the agent; a VM the agent paused carries a mark in its
live metadata, so that the node's next agent resumes it if this one dies meanwhile
(``Agent.resume_left_paused``). A resume that fails every retry (libvirt unreachable for a
while) is tried again by this agent's libvirt check (``resume_unresumed``): the next pause of
that VM would resume it too, but after a pivot there may be none.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence

from blockcopy.core import verify
from blockcopy.core.verify import Copy, Result
from blockcopy.model.api import Verify
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
class Planned:
    """A copy to check in the pause, and the blocks to read there (none for Full)."""

    copy: Copy
    offsets: list[int]


class Pause:
    """One pause of a guest, for the log: when each step in it ended, and how long it was."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.at = self._loop.time()
        self.steps: dict[str, float] = {}  # step -> loop time it ended
        self.ms = 0  # the whole pause, once resumed

    def step(self, name: str) -> None:
        self.steps[name] = self._loop.time()
        self.ms = _ms(self._loop.time() - self.at)

    def elapsed(self) -> int:
        return _ms(self._loop.time() - self.at)

    def log(self, domain: str, what: str) -> None:
        last, took = self.at, []
        for name, at in self.steps.items():
            took.append(f"{name} {_ms(at - last)}")
            last = at
        log.info("%s: guest paused %d ms for the check at the switch (%s; %s ms)", domain,
                 self.ms, what, ", ".join(took))


class Verifier:
    """Agent-wide: one pause per VM at a time."""

    def __init__(self, hv: Hypervisor, images: Images, *, owner: str,
                 seed: Callable[[], bytes] = lambda: os.urandom(32)):
        self.hv, self.images, self.owner, self.seed = hv, images, owner, seed
        self._pauses: dict[str, asyncio.Lock] = {}
        # VMs paused here whose resume failed every retry: the name used, its pause lock's key
        self.unresumed: dict[str, str] = {}

    async def pivot(self, copy: Copy) -> Result:
        """Check the copy and pivot on a match (or where the check is not asked for, or
        cannot be made and was not asked for explicitly); end the job on a mismatch; leave it
        Mirrored when a check asked for cannot be made. HypervisorError from the pivot
        itself is raised (a refusal) after the guest is resumed."""
        spec = copy.spec
        planned = await self.plan(copy)
        if isinstance(planned, Result):
            if not planned.held:
                await self.hv.pivot(spec.domain, copy.target)
            return planned
        async with self.paused(spec.domain, uuid=copy.disk.domain_uuid) as pause:
            result, = await self.check(pause, [planned])
            if result.result == verify.MISMATCH:
                await self.hv.cancel(spec.domain, copy.target)
                pause.step("cancel")
            elif not result.held:
                await self.hv.pivot(spec.domain, copy.target)
                pause.step("pivot")
        pause.log(spec.domain, f"{result.method.value}: {result.result}")
        return dataclasses.replace(result, pause_ms=pause.ms)

    async def plan(self, copy: Copy) -> Result | Planned:
        """Before the pause: what to read in it, or the result when no check is made there
        (not asked for, or cannot be made: ``Result.held`` when asked for explicitly)."""
        spec, disk = copy.spec, copy.disk
        if spec.verify == Verify.NONE:
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
            return verify.not_verified(spec, why)
        # The blocks are drawn before the pause (the data map is the source's, mapped above).
        return Planned(copy, verify.sample(self.seed(), data.size, data.data) if data else [])

    @contextlib.asynccontextmanager
    async def paused(self, domain: str, *, uuid: str | None) -> AsyncIterator[Pause]:
        """The guest paused (one pause per VM at a time: the lock is the domain's uuid where
        known, as one object may name the VM and another its uuid), resumed whatever
        happens."""
        key = uuid or domain
        async with self._pauses.setdefault(key, asyncio.Lock()):
            ours = await self.hv.pause(domain, self.owner)
            pause = Pause()
            try:
                yield pause
            finally:
                if ours:
                    try:
                        await self._resume(domain)
                    except BaseException:
                        self.unresumed[domain] = key
                        raise
                    self.unresumed.pop(domain, None)
                pause.step("resume")

    async def resume_unresumed(self) -> list[str]:
        """Resume the VMs whose resume after a check failed every retry (never during a
        pause of the same VM: its lock is taken). Returns those resumed now."""
        resumed = []
        for domain, key in sorted(self.unresumed.items()):
            async with self._pauses.setdefault(key, asyncio.Lock()):
                if domain not in self.unresumed:  # a pause of it since resumed it
                    continue
                try:
                    await self.hv.resume(domain, self.owner)
                except HypervisorError as exc:
                    log.warning("%s: still paused after the check at the switch, resume "
                                "failed again: %s", domain, exc)
                    continue
                self.unresumed.pop(domain, None)
                resumed.append(domain)
        return resumed

    async def check(self, pause: Pause, planned: Sequence[Planned]) -> list[Result]:
        """In the pause: every mirror settled, QEMU's flush (once, where a qcow2 image is
        read), each copy compared. A check that cannot be made is ``not_verified``."""
        results: dict[int, Result] = {}
        deadline = asyncio.get_running_loop().time() + verify.SETTLE
        for i, each in enumerate(planned):
            try:
                await self._settle(each.copy.spec.domain, each.copy.target, deadline)
            except NotChecked as exc:
                results[i] = verify.not_verified(each.copy.spec, str(exc))
        pause.step("settle")
        flushing = [i for i, each in enumerate(planned) if i not in results and
                    verify.needs_flush(source_format=str(each.copy.disk.source_format),
                                       dest_format=str(each.copy.dest_format))]
        if flushing:
            try:
                await self.hv.flush_images(planned[0].copy.spec.domain)
                pause.step("flush")
            except HypervisorUnavailable:
                raise
            except HypervisorError as exc:
                for i in flushing:
                    results[i] = verify.not_verified(
                        planned[i].copy.spec, f"QEMU could not flush the images ({exc})")
        todo = [i for i in range(len(planned)) if i not in results]
        compared = await asyncio.gather(*(self._compare(planned[i], pause) for i in todo),
                                        return_exceptions=True)
        for i, got in zip(todo, compared, strict=True):
            if isinstance(got, BaseException):
                raise got  # all of them ended first (none left running in the pause)
            results[i] = got
        return [results[i] for i in range(len(planned))]

    async def _compare(self, planned: Planned, pause: Pause) -> Result:
        copy, offsets = planned.copy, planned.offsets
        spec, source, dest = copy.spec, copy.disk.source or "", copy.spec.dest
        source_format, dest_format = str(copy.disk.source_format), str(copy.dest_format)
        method = spec.verify or Verify.SAMPLE
        try:
            if method == Verify.FULL:
                size = (await self.hv.disk_size(spec.domain, copy.target)).capacity
                try:
                    differ = await self.images.compare_in_use(
                        source, dest, format_a=source_format, format_b=dest_format,
                        timeout=verify.full_limit(size))
                except ImageError as exc:
                    raise NotChecked(str(exc)) from None
                if differ is None:
                    return verify.matched(method, 0, pause.elapsed())
                return verify.mismatched(method, 0, 1, verify.offset_in(differ),
                                         pause.elapsed(), detail=differ)
            try:
                # (asyncio.timeout, not wait_for: a cancelled wait_for leaves the gather's
                # CancelledError unretrieved, logged whenever the GC finds it.)
                async with asyncio.timeout(verify.READ_LIMIT):
                    views = await asyncio.gather(
                        self.images.read_blocks(source, format=source_format,
                                                offsets=offsets, length=verify.BLOCK),
                        self.images.read_blocks(dest, format=dest_format, offsets=offsets,
                                                length=verify.BLOCK))
            except TimeoutError:
                raise NotChecked(f"reading {len(offsets)} blocks of both images took more "
                                 f"than {verify.READ_LIMIT:g} s") from None
            except ImageError as exc:
                raise NotChecked(str(exc)) from None
        except NotChecked as exc:
            return verify.not_verified(spec, str(exc))
        pause.step("read")
        mismatches, first = verify.compare(offsets, *views)
        if mismatches:
            return verify.mismatched(method, len(offsets), mismatches, first, pause.elapsed())
        return verify.matched(method, len(offsets), pause.elapsed())

    async def _settle(self, domain: str, target: str, deadline: float) -> None:
        """Wait (paused) until the mirror copied what the guest wrote last."""
        loop = asyncio.get_running_loop()
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
