"""Rate, time left and convergence from libvirt's cur/end samples (pure), and the follow loop
turning them into status.rate, status.eta and the Converging condition (on the FAKES)."""

from __future__ import annotations

import asyncio

import pytest

from blockcopy.core.progress import ProgressWindow, duration
from support.agent_on_fakes import FakeNode

MiB = 1 << 20


def test_rate_and_eta_of_a_steady_copy():
    w = ProgressWindow(window=10)
    for t in range(11):  # 10 MiB/s, nothing dirtied
        w.add(t, cur=t * 10 * MiB, end=500 * MiB)
    e = w.estimate()
    assert e.rate == 10 * MiB and e.growth == 0
    assert e.eta == pytest.approx(40)  # 400 MiB left
    assert e.converging is True


def test_a_guest_that_writes_faster_than_the_copy_does_not_converge():
    w = ProgressWindow(window=10)
    for t in range(12):  # copies 5 MiB/s, the guest dirties 6 MiB/s
        w.add(t, cur=t * 5 * MiB, end=100 * MiB + t * 6 * MiB)
    e = w.estimate()
    assert e.eta is None and e.converging is False
    assert e.rate == 5 * MiB and e.growth == 6 * MiB


def test_no_verdict_before_a_whole_window():
    w = ProgressWindow(window=10)
    w.add(0, 0, 100)
    assert w.estimate() is None
    w.add(3, 10, 200)
    assert w.estimate().converging is None


def test_an_end_that_wobbles_keeps_the_window():
    w = ProgressWindow(window=10)
    for t in range(12):  # QEMU counts the bytes in flight in end: it goes up and down
        w.add(t, cur=t * MiB, end=100 * MiB + (t % 2) * MiB)
    e = w.estimate()
    assert e.converging is True and e.rate == MiB


def test_counters_that_go_back_start_a_new_window():
    w = ProgressWindow(window=10)
    for t in range(5):
        w.add(t, cur=t * MiB, end=10 * MiB)
    w.add(5, cur=0, end=20 * MiB)  # another job
    assert w.estimate() is None


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (0.2, "1s"), (45, "45s"), (90, "1m30s"),
                                           (3723, "1h2m3s")])
def test_durations(seconds, text):
    assert duration(seconds) == text


def _follow_a_copy(node: FakeNode, tmp_path, **spec) -> None:
    node.hv.add_domain("vm")
    node.follow(node.add("bc", {"domain": "vm", "disk": "vda",
                                "dest": str(tmp_path / "c.qcow2"), **spec}))


async def _progress(node: FakeNode, cur: int, end: int, *, copied: int,
                    dirtied: int) -> tuple[int, int]:
    """15 s of libvirt's cur/end samples: ``copied`` and ``dirtied`` bytes a second."""
    for _ in range(15):
        cur, end = cur + copied, end + dirtied
        node.hv.progress("vm", cur=cur, end=end)
        await asyncio.sleep(1)
    return cur, end


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_status_shows_rate_eta_and_not_converging_until_the_bandwidth_rises(tmp_path):
    node = FakeNode(tmp_path, status_interval=1.0)
    _follow_a_copy(node, tmp_path)
    await asyncio.sleep(1)
    # copies 2 MiB/s, the guest dirties 3 MiB/s
    cur, end = await _progress(node, 0, 100 * MiB, copied=2 * MiB, dirtied=3 * MiB)
    status = node.status("bc")
    (cond,) = [c for c in status["conditions"] if c["type"] == "Converging"]
    assert (cond["status"], cond["reason"]) == ("False", "NotConverging")
    assert "Raise spec.bandwidth" in cond["message"]
    assert status["rate"] == 2 * MiB and status.get("eta") is None
    # the bandwidth was raised: 10 MiB/s copied
    await _progress(node, cur, end, copied=10 * MiB, dirtied=3 * MiB)
    status = node.status("bc")
    (cond,) = [c for c in status["conditions"] if c["type"] == "Converging"]
    assert (cond["status"], cond["reason"]) == ("True", "Converging")
    assert status["rate"] == 10 * MiB and status["eta"].endswith("s")
    node.hv.make_ready("vm")
    await asyncio.sleep(1)
    status = node.status("bc")
    assert status["phase"] == "Mirrored" and status.get("rate") is None
    await node.finish()
    assert [e.reason for e in node.kube.events].count("NotConverging") == 1


async def _not_converging(tmp_path, caps, **spec):
    node = FakeNode(tmp_path)
    node.hv.capabilities_value = caps
    _follow_a_copy(node, tmp_path, **spec)
    await asyncio.sleep(1)
    # copies 2 MiB/s, the guest dirties 3 MiB/s
    await _progress(node, 0, 100 * MiB, copied=2 * MiB, dirtied=3 * MiB)
    await node.finish()
    return node.hv, node.kube


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_convergence_auto_switches_a_running_copy_to_write_blocking_on_qemu_8_2(tmp_path):
    from blockcopy.model.ports import Capabilities

    hv, kube = await _not_converging(tmp_path, Capabilities((11, 3, 0), (10, 0, 2)),
                                     convergence="auto")
    assert [args for _, verb, args in hv.calls if verb == "set_copy_mode"] == [
        ("vm", "vda", "write-blocking")]
    assert hv.disk("vm").job.copy_mode == "write-blocking"
    status = kube.status_of("bc")
    assert status["copyMode"] == "write-blocking"
    (assist,) = [c for c in status["conditions"] if c["type"] == "ConvergenceAssist"]
    assert (assist["status"], assist["reason"]) == ("True", "WriteBlocking")
    assert [e.reason for e in kube.events].count("WriteBlocking") == 1


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_convergence_auto_on_qemu_7_2_says_it_cannot_and_goes_on(tmp_path):
    from blockcopy.model.ports import Capabilities

    hv, kube = await _not_converging(tmp_path, Capabilities((9, 0, 0), (7, 2, 0)),
                                     convergence="auto")
    assert "set_copy_mode" not in hv.verbs() and hv.disk("vm").job is not None
    status = kube.status_of("bc")
    (assist,) = [c for c in status["conditions"] if c["type"] == "ConvergenceAssist"]
    assert (assist["status"], assist["reason"]) == ("False", "NeedsQEMU82")
    assert "QEMU 8.2" in assist["message"] and status["phase"] == "Copying"
    assert [e.reason for e in kube.events].count("NeedsQEMU82") == 1
    assert "copyMode" not in status


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_without_convergence_auto_nothing_is_switched(tmp_path):
    from blockcopy.model.ports import Capabilities

    hv, kube = await _not_converging(tmp_path, Capabilities((11, 3, 0), (10, 0, 2)))
    assert "set_copy_mode" not in hv.verbs()
    assert not [c for c in kube.status_of("bc")["conditions"]
                if c["type"] == "ConvergenceAssist"]


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_spec_needing_more_than_the_host_has_is_refused(tmp_path):
    from blockcopy.model.ports import Capabilities

    node = FakeNode(tmp_path)
    hv, kube = node.hv, node.kube
    hv.capabilities_value = Capabilities((7, 10, 0), (6, 2, 0))
    hv.add_domain("vm")
    body = node.add("bc", {"domain": "vm", "disk": "vda", "dest": str(tmp_path / "c.qcow2"),
                           "flags": ["synchronousWrites"]})
    await asyncio.wait_for(node.agent.follow(body, node.stop), 10)
    status = kube.status_of("bc")
    assert status["phase"] == "Failed" and "libvirt 8.0" in status["message"]
    assert [c["reason"] for c in status["conditions"] if c["type"] == "Failed"] == [
        "NotSupportedHere"]
    assert "start_copy" not in hv.verbs()
