"""A per-node limit on copies running at once (``--max-active-copies``), first come, first
served. A copy holds a slot from the moment it would start (or prepare) until it is finished,
failed, deleted or its agent stops; a job found running (adopted after a restart) holds one
whatever the limit. The others wait in the Queued phase, told their place in the queue.
In-memory: after a restart the queue forms again from the objects' creation times."""

from __future__ import annotations

from collections.abc import Callable

Key = tuple[str, str]  # (namespace, name)


class CopySlots:
    def __init__(self, limit: int, on_change: Callable[[], None] = lambda: None):
        self.limit = limit  # 0: no limit
        self.on_change = on_change  # a slot freed, or the queue moved up: tell the waiters
        self.active: set[Key] = set()
        self._waiting: dict[Key, tuple[str, str, str]] = {}  # key -> order

    @property
    def waiting(self) -> list[Key]:
        return sorted(self._waiting, key=self._waiting.__getitem__)

    def hold(self, key: Key) -> None:
        """A job of this object runs already: it takes a slot, over the limit if need be."""
        self._waiting.pop(key, None)
        self.active.add(key)

    def request(self, key: Key, *, created: str) -> int:
        """0 when the object may start now (it then holds a slot), else its place in the
        queue (1 = next). ``created``: the object's creationTimestamp, the queue's order."""
        if key in self.active:
            return 0
        self._waiting.setdefault(key, (created, *key))
        if self.limit <= 0 or (len(self.active) < self.limit and self.waiting[0] == key):
            self.hold(key)
            if self._waiting:
                self.on_change()  # the queue moved up: the others learn their new place
            return 0
        return self.waiting.index(key) + 1

    def release(self, key: Key) -> None:
        """Finished, failed, deleted or no longer followed: the next one may start."""
        was_waiting = self._waiting.pop(key, None) is not None
        was_active = key in self.active
        self.active.discard(key)
        if (was_waiting or was_active) and self._waiting:
            self.on_change()
