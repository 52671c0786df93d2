"""The status writer's timing on a fake clock (looptime): phase changes at once, progress
coalesced to one write per interval, a phase change carrying the newest progress, no-op
writes skipped, failed writes retried, a deleted object given up."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from blockcopy.agent.writer import ObjectGone, StatusWriter
from support.fakes import FakeKube

pytestmark = [pytest.mark.asyncio, pytest.mark.looptime]


@pytest.fixture
def kube() -> FakeKube:
    kube = FakeKube()
    kube.add("bc", {"domain": "vm"}, namespace="ns")
    return kube


def writer(kube: FakeKube, interval: float = 1.0) -> StatusWriter:
    return StatusWriter(kube, namespace="ns", name="bc", interval=interval)


def progress(cur: int, phase: str = "Copying") -> dict:
    return {"phase": phase, "cur": cur, "end": 100}


async def test_progress_is_coalesced_to_one_write_per_interval(kube, looptime):
    w = writer(kube)
    for cur in range(1, 51):  # 50 updates over 5 s
        w.submit(progress(cur), urgent=False)
        await asyncio.sleep(0.1)
    await w.flush()
    times = [t for t, _, _ in kube.status_writes]
    assert len(times) == 6  # t = 0, 1, 2, 3, 4, 5
    assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(times))
    assert kube.status_of("bc")["cur"] == 50  # the newest state won


async def test_a_phase_change_is_written_at_once_with_the_newest_progress(kube, looptime):
    w = writer(kube)
    w.submit(progress(1), urgent=False)
    await asyncio.sleep(0.1)  # written at t=0; the next progress slot is t=1
    w.submit(progress(2), urgent=False)  # pending until t=1
    await asyncio.sleep(0.2)
    w.submit({**progress(3), "phase": "Mirrored"}, urgent=True)
    await asyncio.sleep(0.01)
    assert [body["phase"] for _, _, body in kube.status_writes] == ["Copying", "Mirrored"]
    assert kube.status_writes[-1][0] == pytest.approx(0.3)  # not at the t=1 slot
    assert kube.status_of("bc")["cur"] == 3  # the pending progress rode along
    await w.flush()
    assert len(kube.status_writes) == 2  # the pending progress write was superseded


async def test_write_returns_when_stored(kube, looptime):
    w = writer(kube)
    w.submit(progress(1), urgent=False)
    await asyncio.sleep(0.5)
    await w.write({**progress(2), "phase": "Pivoting"})
    assert kube.status_of("bc")["phase"] == "Pivoting"
    assert float(looptime) == pytest.approx(0.5)


async def test_equal_states_are_not_written_again(kube):
    w = writer(kube)
    for _ in range(5):
        w.submit(progress(7), urgent=False)
        await asyncio.sleep(2)
    await w.flush()
    assert len(kube.status_writes) == 1


async def test_a_failed_write_is_retried_with_the_newest_state(kube, looptime):
    kube.failing = 2
    w = writer(kube)
    w.submit(progress(1), urgent=True)
    await asyncio.sleep(0.5)
    w.submit(progress(2), urgent=False)
    await w.flush()
    assert [body["cur"] for _, _, body in kube.status_writes] == [2]
    assert kube.status_writes[0][0] == pytest.approx(2.0)  # after two 1 s retry waits


async def test_a_deleted_object_is_given_up(kube):
    w = writer(kube)
    del kube.objects[("ns", "bc")]
    with pytest.raises(ObjectGone):
        await w.write(progress(1))
    w.submit(progress(2), urgent=True)  # ignored from now on
    await w.flush()
    assert kube.status_writes == []


async def test_the_interval_may_change_between_writes(kube, looptime):
    """The agent's progress pace: the interval grows when more copies run."""
    interval = [1.0]
    w = StatusWriter(kube, namespace="ns", name="bc", interval=lambda: interval[0])
    for cur in range(1, 31):  # 30 updates over 3 s, then 30 over 15 s at a 5 s interval
        w.submit(progress(cur), urgent=False)
        await asyncio.sleep(0.1)
    interval[0] = 5.0
    for cur in range(31, 61):
        w.submit(progress(cur), urgent=False)
        await asyncio.sleep(0.5)
    await w.flush()
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(t for t, _, _ in kube.status_writes)]
    assert gaps[:2] == [1.0, 1.0]
    assert all(g >= 5.0 for g in gaps[3:]), gaps
    assert kube.status_of("bc")["cur"] == 60


async def test_a_state_taken_back_while_waiting_for_the_slot_writes_nothing(kube, looptime):
    """Progress 2 waits for the t=1 slot; meanwhile the state goes back to what the API holds
    (progress 1), so nothing is pending. The writer must not then write "nothing": a merge
    patch of ``status: null`` deletes the whole status (seen in CI: startTime and kopf's
    bookkeeping gone, the API server's immutability rules bypassed)."""
    w = writer(kube)
    w.submit(progress(1), urgent=False)
    await asyncio.sleep(0.1)  # written at t=0
    w.submit(progress(2), urgent=False)  # pending until t=1
    await asyncio.sleep(0.2)
    w.submit(progress(1), urgent=False)  # equal to what is stored: dropped
    await w.flush()
    assert [body for _, _, body in kube.status_writes] == [progress(1)]
    assert kube.status_of("bc") == progress(1)
