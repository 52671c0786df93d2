"""The files the agent makes itself: a prepared destination (a deeper base, a chain move's
placeholders), and the lower images of a chain move, copied into their placeholders and
verified while the mirror of the top image runs (the oVirt flow). The layer copies run in the
background of one follower; the pivot waits until every layer is Verified
(``core.gates.layers``). Each layer's state is kept in status.layers, so a restarted agent
copies again only what was not verified. A follower without a chain move holds
``NO_LAYER_COPIES``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from blockcopy.core.plans import LayerState, Plan, PlanKind
from blockcopy.model.observation import LayersView
from blockcopy.model.ports import ImageError, Images

log = logging.getLogger(__name__)


class NoLayerCopies:
    """The null object: no chain move, nothing copied aside."""

    view = LayersView()

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


NO_LAYER_COPIES = NoLayerCopies()


def chain_plan(raw_plan: Mapping[str, Any] | None, *, format: str | None,
               chain: Sequence[str], chain_formats: Sequence[str]) -> Plan | None:
    """The chain move recorded in status.plan, with its images' formats (as libvirt last
    showed them; qcow2 where unknown), or None when the plan is no chain move."""
    raw = raw_plan or {}
    if raw.get("kind") != PlanKind.CHAIN:
        return None
    recorded = tuple(raw["chain"])
    known = dict(zip(chain, chain_formats, strict=False))
    formats = (format or "qcow2", *(known.get(p) or "qcow2" for p in recorded[1:]))
    return Plan(PlanKind.CHAIN, recorded, formats, tuple(raw["targets"]))


class LayerCopies:
    def __init__(self, plan: Plan, images: Images, *, recorded: Sequence[Mapping[str, Any]],
                 on_change: Callable[[list[dict[str, Any]]], None]):
        self.plan, self.images, self.on_change = plan, images, on_change
        by_source = {layer.get("source"): layer for layer in recorded}
        self.layers: list[dict[str, Any]] = []
        for source, target, _ in plan.lower:
            old = by_source.get(source) or {}
            state = old.get("state") if old.get("state") == LayerState.VERIFIED else \
                LayerState.PENDING  # anything not verified is copied again
            self.layers.append({"source": source, "dest": target, "state": str(state)})
        self._task: asyncio.Task[None] | None = None

    @property
    def verified(self) -> int:
        return sum(layer["state"] == LayerState.VERIFIED for layer in self.layers)

    @property
    def all_verified(self) -> bool:
        return self.verified == len(self.layers)

    @property
    def failure(self) -> str | None:
        for layer in self.layers:
            if layer["state"] == LayerState.FAILED:
                return f"{layer['source']} -> {layer['dest']}: {layer.get('message', '')}"
        return None

    @property
    def view(self) -> LayersView:
        return LayersView(chain_move=True, total=len(self.layers), verified=self.verified,
                          failure=self.failure)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if not self.running and not self.all_verified and self.failure is None:
            self._task = asyncio.create_task(self._run(), name="layers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _set(self, index: int, state: LayerState, message: str | None = None) -> None:
        layer = self.layers[index - 1]
        layer["state"] = str(state)
        if message is None:
            layer.pop("message", None)
        else:
            layer["message"] = message
        self.on_change([dict(layer) for layer in self.layers])

    async def _run(self) -> None:
        # From the bottom up, one layer at a time, each copied then verified: copying a
        # layer opens its placeholder's backing chain (the copies below it), which must not
        # be written meanwhile (qemu-img's image locks refuse it), and a layer reads the same
        # as its source only once everything below it does. All of it runs while the top
        # image is mirrored.
        todo = [i for i in range(1, len(self.plan.chain))
                if self.layers[i - 1]["state"] != LayerState.VERIFIED]
        for i in sorted(todo, reverse=True):
            try:
                await self._copy(i)
            except ImageError:
                return
            try:
                difference = await verify_layer(self.plan, i, self.images)
            except ImageError as exc:
                difference = str(exc)
            if difference is not None:
                self._set(i, LayerState.FAILED, f"verification failed: {difference}")
                return
            self._set(i, LayerState.VERIFIED)

    async def _copy(self, index: int) -> None:
        self._set(index, LayerState.COPYING)
        try:
            await copy_layer(self.plan, index, self.images)
        except ImageError as exc:
            self._set(index, LayerState.FAILED, str(exc))
            raise
        self._set(index, LayerState.COPIED)


async def prepare(plan: Plan, images: Images) -> None:
    """Create (or create again: a restarted agent redoes its own plan) the plan's files."""
    if plan.kind == PlanKind.BASE:
        assert plan.base is not None
        base_format = plan.formats[plan.chain.index(plan.base)]
        dest = plan.targets[0]
        # D backed by the top's backing file Lk, then rebased onto B: the safe rebase writes
        # into D every cluster where Lk ... L1 (read-only backing images) differ from B.
        await images.create(dest, format="qcow2", size=plan.capacity, backing=plan.chain[1],
                            backing_format=plan.formats[1])
        await images.rebase(dest, backing=plan.base, backing_format=base_format)
        return
    # A chain move: placeholders from the bottom up, each backed by the one below it under a
    # relative name (the chain stays valid wherever its directory is mounted).
    for i in range(len(plan.chain) - 1, -1, -1):
        below = plan.targets[i + 1] if i + 1 < len(plan.targets) else None
        size = plan.capacity if i == 0 else (await images.info(plan.chain[i])).virtual_size
        fmt = "qcow2" if i == 0 or below is not None else plan.formats[i]
        await images.create(plan.targets[i], format=fmt, size=size,
                            backing=os.path.basename(below) if below else None,
                            backing_format=plan.formats[i + 1] if below else None)


async def copy_layer(plan: Plan, index: int, images: Images) -> None:
    """Copy image ``index`` (>= 1) of a chain move into its placeholder."""
    below = plan.targets[index + 1] if index + 1 < len(plan.targets) else None
    await images.copy_layer(plan.chain[index], plan.targets[index], format=plan.formats[index],
                             backing=os.path.basename(below) if below else None,
                             backing_format=plan.formats[index + 1] if below else None)


async def verify_layer(plan: Plan, index: int, images: Images) -> str | None:
    """None when image ``index`` and its copy (each with the chain below it) read the same."""
    return await images.identical(plan.chain[index], plan.targets[index],
                                  format=plan.formats[index])
