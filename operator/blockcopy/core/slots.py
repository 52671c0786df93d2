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
        """This object starts (or a job of it runs already): it takes a slot, over the
        limit if need be, and leaves the queue; the others learn their new place."""
        was_waiting = self._waiting.pop(key, None) is not None
        self.active.add(key)
        if was_waiting and self._waiting:
            self.on_change()

    def place(self, key: Key, *, created: str) -> int:
        """0 when the object may start now, else the place it has (or would have) in the
        queue (1 = next). A question: nothing changes (``wait`` and ``hold`` change)."""
        if key in self.active or self.limit <= 0:
            return 0
        order = sorted({**self._waiting, key: (created, *key)}.items(), key=lambda kv: kv[1])
        keys = [k for k, _ in order]
        if len(self.active) < self.limit and keys[0] == key:
            return 0
        return keys.index(key) + 1

    def wait(self, key: Key, *, created: str) -> None:
        """The object waits in the queue (ordered by ``created``, its creationTimestamp)."""
        if key not in self.active:
            self._waiting.setdefault(key, (created, *key))

    def request(self, key: Key, *, created: str) -> int:
        """``place``, then hold the slot (0) or wait in the queue (else)."""
        place = self.place(key, created=created)
        if place == 0:
            self.hold(key)
        else:
            self.wait(key, created=created)
        return place

    def release(self, key: Key) -> None:
        """Finished, failed, deleted or no longer followed: the next one may start."""
        was_waiting = self._waiting.pop(key, None) is not None
        was_active = key in self.active
        self.active.discard(key)
        if (was_waiting or was_active) and self._waiting:
            self.on_change()
