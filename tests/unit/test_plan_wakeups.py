"""Which child events wake a plan's daemon (runtime.controller._child_event): a new child,
a phase change, pivot/abort asked, deletion; not a progress write (cur/end every second
per copying child), which the running plan's 2-second rounds take in."""

from __future__ import annotations

import copy
from typing import Any

from blockcopy.controller.plans import ControllerConfig
from blockcopy.runtime import controller


def child(phase: str | None = "Copying", cur: int = 0, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": "p-0", "uid": "u-0",
                         "labels": {"blockcopy.dev/plan": "p"}},
            "spec": {"domain": "vm", "pivot": False, **spec},
            "status": {"phase": phase, "cur": cur, "end": 100}}


def woken(memo: Any, body: dict[str, Any], type: str = "MODIFIED") -> bool:
    waker = controller._waker(memo, "ns", "p")
    waker.clear()
    assert controller._child_event(body, memo, type=type) is False  # never a handler
    return waker.is_set()


def test_progress_alone_does_not_wake_the_plan() -> None:
    memo = controller.memo_for(ControllerConfig())
    assert woken(memo, child(cur=0), "ADDED")
    assert not woken(memo, child(cur=10))
    assert not woken(memo, child(cur=90))
    assert woken(memo, child("Mirrored", cur=100))
    assert woken(memo, child("Mirrored", cur=100, pivot=True))
    assert not woken(memo, child("Mirrored", cur=100, pivot=True))
    deleting = copy.deepcopy(child("Mirrored", cur=100, pivot=True))
    deleting["metadata"]["deletionTimestamp"] = "2026-12-04T00:00:00Z"
    assert woken(memo, deleting)
    assert woken(memo, deleting, "DELETED")
    assert memo.children == {}


def test_objects_of_no_plan_wake_nothing() -> None:
    memo = controller.memo_for(ControllerConfig())
    body = child()
    body["metadata"]["labels"] = {}
    assert controller._child_event(body, memo, type="ADDED") is False
    assert memo.wakers == {} and memo.children == {}
