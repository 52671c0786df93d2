"""The lower images of a chain move, copied into their placeholders and verified while the
mirror of the top image runs (the oVirt flow). Runs in the background of one follower; the
pivot waits until every layer is Verified. Each layer's state is kept in status.layers, so a
restarted agent copies again only what was not verified."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from blockcopy import plans
from blockcopy.plans import LayerState, Plan
from blockcopy.ports import ImageError, Images

log = logging.getLogger(__name__)


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
                difference = await plans.verify_layer(self.plan, i, self.images)
            except ImageError as exc:
                difference = str(exc)
            if difference is not None:
                self._set(i, LayerState.FAILED, f"verification failed: {difference}")
                return
            self._set(i, LayerState.VERIFIED)

    async def _copy(self, index: int) -> None:
        self._set(index, LayerState.COPYING)
        try:
            await plans.copy_layer(self.plan, index, self.images)
        except ImageError as exc:
            self._set(index, LayerState.FAILED, str(exc))
            raise
        self._set(index, LayerState.COPIED)
