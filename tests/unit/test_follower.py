"""The follow loop on a fake clock (looptime) against the FAKE hypervisor and API of
tests/support/fakes.py: the scenarios whose timing matters (back-offs, races, restarts),
deterministic and in milliseconds of real time. The e2e tests run the same paths for real."""

from __future__ import annotations

import asyncio
import itertools
import os

import pytest

from blockcopy.model.observation import JobEvent, MirrorReady
from blockcopy.model.ports import HypervisorError
from support.agent_on_fakes import FakeNode
from support.invalid_specs import INVALID

pytestmark = [pytest.mark.asyncio, pytest.mark.looptime]

NODE = "node-1"


class Scenario(FakeNode):
    """An agent on the fakes, one VM, and its BlockCopies (named "bc" unless said)."""

    def __init__(self, tmp_path, **config_fields):
        super().__init__(tmp_path, node=NODE, status_interval=1.0, poll_interval=5.0,
                         **config_fields)
        self.dom = self.hv.add_domain("vm")
        self.dest = str(tmp_path / "copy.qcow2")

    def create(self, name: str = "bc", status: dict | None = None, **spec) -> dict:
        return self.add(name, {"domain": "vm", "disk": "vda", "dest": self.dest, **spec},
                        status=status)

    def phase(self, name: str = "bc") -> str | None:
        return super().phase(name)


@pytest.fixture
def s(tmp_path):
    return Scenario(tmp_path)


async def test_copy_mirror_pivot_on_request(s, looptime):
    body = s.create()
    s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    assert s.hv.verbs()[:5] == ["observe", "capabilities", "image_users", "disk_size",
                                "start_copy"]
    s.hv.progress("vm", cur=10, end=100)
    await s.until(lambda: s.kube.status_of("bc").get("cur") == 10)

    s.hv.make_ready("vm")
    ready_at = float(looptime)
    mirrored_at = await s.until(lambda: s.phase() == "Mirrored")
    assert mirrored_at - ready_at < 0.1  # the READY event wakes the loop; no slot wait

    s.edit(body, pivot=True)
    await s.until(lambda: s.phase() == "Pivoted")
    assert s.hv.disk("vm").source == s.dest
    assert s.kube.phases_written("bc") == ["Copying", "Mirrored", "Pivoting", "Pivoted"]
    await s.finish()
    # The check at the switch could not read the fake images (no guest views): the copy
    # pivoted without it (spec.verify left out), and said so.
    assert s.kube.reasons("bc") == ["Started", "Mirrored", "Pivoting", "NotVerified",
                                    "Pivoted"]
    verified = next(c for c in s.kube.status_of("bc")["conditions"] if c["type"] == "Verified")
    assert (verified["status"], verified["reason"]) == ("False", "NotVerified")


async def test_adopts_the_running_job_after_a_restart(s):
    # The job runs (started by a previous agent process); status says Copying.
    body = s.create(pivot=True)
    s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    started = dict(s.kube.status_of("bc"))
    await s.restart()  # a new agent process on the same fakes
    body["status"] = started
    s.follow(body)
    s.hv.make_ready("vm")
    await s.until(lambda: s.phase() == "Pivoted")
    assert s.hv.verbs().count("start_copy") == 1  # adopted, not started twice
    await s.finish()


async def test_adopts_a_job_it_never_recorded(s):
    """The agent died between libvirt's start and its status write: the next one finds a job
    of ours (same destination) and adopts it instead of failing on a busy disk."""
    body = s.create()
    s.hv.disk("vm").job = None
    from blockcopy.model.api import Flag
    from blockcopy.model.ports import CopyRequest
    await s.hv.start_copy(CopyRequest(domain="vm", target="vda", dest=s.dest, format="qcow2",
                                      flags=frozenset({Flag.TRANSIENT_JOB})))
    s.hv.make_ready("vm", emit=False)
    s.follow(body)
    await s.until(lambda: s.phase() == "Mirrored")
    assert s.kube.status_of("bc")["conditions"][0]["reason"] == "Adopted"
    assert s.hv.verbs().count("start_copy") == 1
    await s.finish()


async def test_a_second_object_with_the_same_dest_does_not_adopt_the_first_ones_job(s):
    """Two BlockCopies of one disk to one dest, created together (both pass the destination
    check before either job exists; found by tests/e2e/test_fuzz_api.py): the second must
    not take the first one's job for its own. One copies, the other fails DiskBusy; the
    first one's job is not touched when the second is deleted."""
    first, second = s.create("first"), s.create("second")
    s.follow(first)
    s.follow(second)
    await s.until(lambda: {s.phase("first"), s.phase("second")} == {"Copying", "Failed"})
    busy = "first" if s.phase("first") == "Failed" else "second"
    failed = s.kube.status_of(busy)
    assert next(c for c in failed["conditions"] if c["type"] == "Failed")["reason"] == \
        "DiskBusy", failed
    assert s.hv.verbs().count("start_copy") == 1
    s.hv.make_ready("vm")
    owner = "second" if busy == "first" else "first"
    await s.until(lambda: s.phase(owner) == "Mirrored")
    assert s.phase(busy) == "Failed"
    await s.finish()


async def test_refused_pivot_backs_off_5_5_5_10_30(s, looptime):
    body = s.create(pivot=True)
    s.hv.refusals["pivot"] = 5
    s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    s.hv.make_ready("vm")
    await s.until(lambda: s.phase() == "Pivoted", timeout=300)
    tries = s.hv.times("pivot")
    gaps = [round(b - a, 1) for a, b in itertools.pairwise(tries)]
    assert gaps == [5, 5, 5, 10, 30]
    await s.finish()
    refusals = [e for e in s.kube.events if e.reason == "PivotRefused"]
    assert [e.type for e in refusals] == ["Warning"] * 5  # one per refusal
    # No flapping per retry: the intent once, Mirrored while refused, then the pivot that
    # went through (recorded as Pivoting, then Pivoted).
    assert s.kube.phases_written("bc") == ["Copying", "Pivoting", "Mirrored", "Pivoting",
                                           "Pivoted"]


async def test_a_libvirt_event_racing_a_refused_pivot_does_not_cut_the_back_off(s):
    """The race fixed last: READY arrives while the (refused) pivot call is in flight. The
    event is already reflected in what the loop saw; only the 5 s back-off may end the wait."""
    body = s.create(pivot=True)
    s.hv.refusals["pivot"] = 1
    s.hv.on_call["pivot"] = lambda: s.hv.emit("vm", "vda", JobEvent.READY)
    s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    s.hv.make_ready("vm")
    await s.until(lambda: s.phase() == "Pivoted")
    first, second = s.hv.times("pivot")
    assert second - first == pytest.approx(5, abs=0.05)
    await s.finish()


async def test_a_spec_change_cuts_a_back_off_short(s):
    body = s.create(pivot=True)
    s.hv.refusals["pivot"] = 10
    s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    s.hv.make_ready("vm")
    await s.until(lambda: len(s.hv.times("pivot")) == 2)
    refused_at = s.hv.times("pivot")[-1]
    await asyncio.sleep(1)
    s.edit(body, pivot=False, abort=True)  # the user gives up on the pivot
    await s.until(lambda: s.phase() == "Aborted")
    assert s.hv.times("cancel")[0] - refused_at == pytest.approx(1, abs=0.05)
    assert s.hv.disk("vm").source != s.dest  # the VM stays on its source
    await s.finish()


async def test_libvirt_unreachable_retries_1_2_5_10_30_and_says_so_once(s):
    body = s.create()
    s.hv.unreachable = True
    s.follow(body)
    loop = asyncio.get_running_loop()
    await asyncio.sleep(60)
    observed = s.hv.times("observe")
    gaps = [round(b - a) for a, b in itertools.pairwise(observed)]
    assert gaps == [1, 2, 5, 10, 30]
    assert s.kube.reasons("bc") == ["LibvirtUnreachable"]  # one Event for the outage
    assert "libvirt unreachable since" in s.kube.status_of("bc")["message"]
    back_at = loop.time()
    s.hv.unreachable = False
    await s.until(lambda: s.phase() == "Copying")
    assert loop.time() - back_at <= 30
    await s.finish()
    assert s.kube.reasons("bc") == ["LibvirtUnreachable", "LibvirtReachable", "Started"]


async def test_a_failed_look_is_retried_1_2_5_not_a_crashed_loop(s):
    # libvirt fails a query while a transient domain is being destroyed ("Unable to read
    # from monitor"): before, the error escaped the loop and kopf restarted it 60 s later.
    body = s.create()
    s.hv.refusals["observe"] = 3
    task = s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    observed = s.hv.times("observe")
    gaps = [round(b - a) for a, b in itertools.pairwise(observed[:4])]
    assert gaps == [1, 2, 5]
    assert not task.done()  # the loop went on by itself
    await s.finish()
    assert task.exception() is None
    assert "Started" in s.kube.reasons("bc")


async def test_progress_is_written_at_most_once_per_interval(s, looptime):
    body = s.create(bandwidth=1)
    s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    start = float(looptime)
    for i in range(100):  # cur grows every 0.1 s for 10 s
        s.hv.progress("vm", cur=i + 1, end=1000)
        await asyncio.sleep(0.1)
    writes = [t for t, name, st in s.kube.status_writes if t >= start and "cur" in st]
    assert 8 <= len(writes) <= 11, writes
    gaps = [b - a for a, b in itertools.pairwise(writes)]
    assert min(gaps) >= 0.99
    await s.finish()


async def test_many_copies_share_the_agents_progress_budget(tmp_path, looptime):
    s = Scenario(tmp_path, progress_budget=2.0)
    names = [f"vm{i}" for i in range(10)]
    for name in names:
        s.hv.add_domain(name)
        s.follow(s.create(name, domain=name, bandwidth=1, dest=str(tmp_path / f"{name}.qcow2")))
    await s.until(lambda: all(s.phase(name) == "Copying" for name in names))
    start, looks = float(looptime), s.hv.verbs().count("observe")
    for i in range(200):  # every copy's cur grows every 0.1 s for 20 s
        for name in names:
            s.hv.progress(name, cur=i + 1, end=10_000)
        await asyncio.sleep(0.1)
    writes = [(t, name) for t, name, st in s.kube.status_writes if t >= start]
    # 10 copies, 2 refreshes per second in all: each copy every 5 s (not every 1 s).
    assert len(writes) <= 2 * 20 + len(names), writes
    assert s.hv.verbs().count("observe") - looks <= 2 * 20 + len(names)
    for name in names:
        times = [t for t, n in writes if n == name]
        assert 3 <= len(times) <= 5, (name, times)
        assert min(b - a for a, b in itertools.pairwise(times)) >= 4.99
    # A phase change is not paced: READY -> Mirrored at once.
    s.hv.make_ready("vm3")
    ready_at = float(looptime)
    assert await s.until(lambda: s.phase("vm3") == "Mirrored") - ready_at < 0.1
    await s.finish()


async def test_deleting_stops_the_loop_and_cancel_for_deletion_ends_the_job(s):
    body = s.create()
    task = s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:10Z"
    s.stop.set()  # kopf stops the daemon of an object being deleted
    await task
    outcome = await s.agent.cancel_for_deletion(body)
    assert outcome.startswith(f"cancelled the copy to {s.dest}")
    assert s.hv.disk("vm").job is None and s.hv.disk("vm").source != s.dest
    assert await s.agent.cancel_for_deletion(body) == \
        "nothing to cancel: no job of this BlockCopy is running"


async def test_job_failure_ends_failed_on_the_source(s):
    body = s.create()
    s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    s.hv.fail_job("vm")
    await s.until(lambda: s.phase() == "Failed")
    status = s.kube.status_of("bc")
    assert [c["reason"] for c in status["conditions"] if c["type"] == "Failed"] == ["JobFailed"]
    await s.finish()
    assert s.kube.events[-1].type == "Warning"


async def test_mirror_state_after_ready_without_event(s):
    """No READY event (missed while disconnected): the fallback look finds ready='yes'."""
    body = s.create()
    s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    s.hv.make_ready("vm", emit=False)
    at = await s.until(lambda: s.phase() == "Mirrored")
    assert s.hv.disk("vm").job.ready == MirrorReady.READY
    assert at <= 2  # the Copying poll runs every status interval
    await s.finish()


async def test_a_destination_in_the_source_chain_is_refused_before_libvirt(s, tmp_path):
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"QFI\xfb")
    s.hv.disk("vm").chain = (str(base),)
    body = s.create(dest=str(base), flags=["reuseExternal"])
    await s.agent.follow(body, s.stop)  # terminal: returns by itself
    status = s.kube.status_of("bc")
    assert status["phase"] == "Failed"
    assert [c["reason"] for c in status["conditions"] if c["type"] == "Failed"] == [
        "DestInSourceChain"]
    assert "start_copy" not in s.hv.verbs()
    assert base.read_bytes() == b"QFI\xfb"


async def test_an_object_deleted_under_a_pivot_intent_is_let_go_without_the_pivot(s):
    """The intent (Pivoting) must be stored before the pivot; an object deleted meanwhile
    (the API server answers 404) ends the loop there: no pivot, no crash of the daemon."""
    body = s.create(pivot=True)
    task = s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    del s.kube.objects[("ns", "bc")]  # deleted, finalizer and all (the API says 404)
    s.hv.make_ready("vm")
    await asyncio.wait_for(task, 30)
    assert task.exception() is None
    assert "pivot" not in s.hv.verbs() and s.hv.disk("vm").source != s.dest
    await s.finish()


async def test_a_finished_object_edited_later_acknowledges_the_new_generation(s):
    """Nothing is done for an edit of a Pivoted object, and its status says so for the new
    generation (Flux's kstatus reads observedGeneration first)."""
    body = s.create(pivot=True)
    s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    s.hv.make_ready("vm")
    await s.until(lambda: s.phase() == "Pivoted")
    await s.finish()
    body["status"] = s.kube.status_of("bc")
    s.edit(body, bandwidth="10Mi")
    await s.agent.acknowledge(body)
    status = s.kube.status_of("bc")
    assert status["observedGeneration"] == 2 and status["phase"] == "Pivoted"
    assert {c["observedGeneration"] for c in status["conditions"]} == {2}
    writes = len(s.kube.status_writes)
    await s.agent.acknowledge(s.kube.objects[("ns", "bc")])  # once is enough
    assert len(s.kube.status_writes) == writes


async def test_a_vanished_destination_holds_the_pivot_on_the_source(s, tmp_path):
    """The destination file deleted (or replaced) while Mirrored: no pivot onto a file
    without a name; Mirrored with DestinationIntact False and one Warning; abort still ends
    it on the source."""
    body = s.create()
    s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    recorded = s.kube.status_of("bc")["destIdentity"]
    assert recorded["kind"] == "file" and recorded["inode"] > 0
    s.hv.make_ready("vm")
    await s.until(lambda: s.phase() == "Mirrored")
    os.unlink(s.dest)
    s.edit(body, pivot=True)
    await s.until(lambda: any(c["type"] == "DestinationIntact" and c["status"] == "False"
                              for c in s.kube.status_of("bc").get("conditions") or []))
    await asyncio.sleep(30)  # looked at again meanwhile: still held, no second Warning
    assert s.phase() == "Mirrored" and "pivot" not in s.hv.verbs()
    assert s.hv.verbs().count("image_users") == 1  # only the start: a missing file is nobody's
    status = s.kube.status_of("bc")
    assert [c["reason"] for c in status["conditions"] if c["type"] == "DestinationIntact"] == [
        "DestVanished"]
    assert [e.reason for e in s.kube.events].count("DestVanished") == 1
    # Another file of the same name is not the copy either.
    with open(s.dest, "wb"):
        pass
    s.edit(body, bandwidth="1Mi")
    await s.until(lambda: [c["reason"] for c in s.kube.status_of("bc")["conditions"]
                           if c["type"] == "DestinationIntact"] == ["DestReplaced"])
    assert "pivot" not in s.hv.verbs()
    s.edit(body, abort=True)
    await s.until(lambda: s.phase() == "Aborted")
    assert s.hv.disk("vm").source != s.dest
    await s.finish()


async def test_a_destination_another_domain_uses_is_refused_before_anything_starts(s, tmp_path):
    """reuseExternal onto the image of another, stopped domain: refused (DestInUse), the
    other image untouched, no job."""
    other = tmp_path / "other.qcow2"
    other.write_bytes(b"QFI\\xfb" + b"\\0" * 508)
    s.hv.add_domain("other-vm", disks={"vda": str(other)}, running=False, persistent=True)
    body = s.create(dest=str(other), flags=["reuseExternal"], pivot=True)
    await s.agent.follow(body, s.stop)
    status = s.kube.status_of("bc")
    assert status["phase"] == "Failed"
    assert [c["reason"] for c in status["conditions"] if c["type"] == "Failed"] == ["DestInUse"]
    assert "'other-vm' (not running)" in status["message"]
    assert "start_copy" not in s.hv.verbs()
    # Also as a backing file of a stopped domain's image (read from the image header).
    base = tmp_path / "shared-base.qcow2"
    base.write_bytes(b"QFI\\xfb")
    s.images.chains[str(other)] = [str(base)]
    body = s.create("bc2", dest=str(base), flags=["reuseExternal"])
    await s.agent.follow(body, s.stop)
    assert "a backing image of disk vda of domain 'other-vm'" in s.kube.status_of("bc2")["message"]
    assert "start_copy" not in s.hv.verbs()


async def test_zeros_are_detected_on_the_destination_from_the_first_byte_on(s):
    """The copy starts throttled to 1 B/s with a 4 MiB buffer, the destination node is
    reopened with zero detection, then the spec's speed is set; after the pivot the node is
    as libvirt configured it again."""
    body = s.create(bandwidth="8Mi")
    s.follow(body)
    await s.until(lambda: s.kube.status_of("bc").get("zeroDetection") == "unmap")
    (request,) = [a[0] for _, v, a in s.hv.calls if v == "start_copy"]
    assert (request.bandwidth, request.buf_size) == (1, 4 << 20)
    verbs = s.hv.verbs()
    start = verbs.index("start_copy")
    assert verbs[start + 1:start + 3] == ["set_zero_detection", "set_bandwidth"]
    assert [a for _, v, a in s.hv.calls if v == "set_zero_detection"] == [
        ("vm", "vda", True, True)]
    assert s.hv.disk("vm").job.bandwidth == 8 << 20
    s.hv.make_ready("vm")
    s.edit(body, pivot=True)
    await s.until(lambda: s.phase() == "Pivoted")
    assert [a for _, v, a in s.hv.calls if v == "set_zero_detection"][-1] == (
        "vm", "vda", False, False)
    assert not s.hv.disk("vm").zero_detection
    await s.finish()


async def test_a_reopen_libvirt_refuses_leaves_a_right_copy_at_full_speed(s):
    s.hv.refusals["set_zero_detection"] = 1
    body = s.create()
    s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    status = s.kube.status_of("bc")
    assert status["zeroDetection"].startswith("off (fault injection")
    assert s.hv.disk("vm").job.bandwidth == 0  # the throttle lifted anyway
    await s.finish()


async def test_a_copy_left_throttled_by_a_dead_agent_is_reopened_and_lifted(s):
    """The agent died between the throttled start and the reopen: the next one finds a
    job at 1 B/s and does both."""
    body = s.create(detectZeroes=True)
    from blockcopy.model.api import Flag
    from blockcopy.model.ports import CopyRequest
    await s.hv.start_copy(CopyRequest(domain="vm", target="vda", dest=s.dest, format="qcow2",
                                      flags=frozenset({Flag.TRANSIENT_JOB}), bandwidth=1))
    body["status"] = {"phase": "Copying", "target": "vda", "startTime": "2026-01-01T00:00:00Z",
                      "startedSpec": {"domain": "vm", "disk": "vda", "dest": s.dest}}
    s.follow(body)
    await s.until(lambda: s.kube.status_of("bc").get("zeroDetection") == "unmap")
    assert s.hv.disk("vm").job.bandwidth == 0 and s.hv.disk("vm").zero_detection
    await s.finish()


async def test_zero_detection_can_be_turned_off(s):
    body = s.create(detectZeroes=False, bandwidth="1Mi")
    s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    (request,) = [a[0] for _, v, a in s.hv.calls if v == "start_copy"]
    assert (request.bandwidth, request.buf_size) == (1 << 20, 0)
    assert "set_zero_detection" not in s.hv.verbs()
    assert s.kube.status_of("bc")["zeroDetection"] == "off (spec.detectZeroes: false)"
    await s.finish()


LUKS = "<encryption format='luks'><secret type='passphrase' uuid='0b0c-5e'/></encryption>"


async def test_an_encrypted_disk_is_copied_encrypted_with_its_secret(s, tmp_path):
    s.hv.disk("vm").encryption = LUKS
    body = s.create(pivot=True)
    s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    (request,) = [a[0] for _, v, a in s.hv.calls if v == "start_copy"]
    assert request.encryption == LUKS
    assert s.kube.status_of("bc")["zeroDetection"] == "off (an encrypted destination)"
    # A pre-created destination must be encrypted too; an NBD export cannot be made so.
    plain = tmp_path / "plain.qcow2"
    plain.write_bytes(b"QFI\xfb")
    s.hv.add_domain("vm2").disks["vda"].encryption = LUKS
    bad = s.create("bad", domain="vm2", dest=str(plain), flags=["reuseExternal"])
    await s.agent.follow(bad, s.stop)
    assert [c["reason"] for c in s.kube.status_of("bad")["conditions"]
            if c["type"] == "Failed"] == ["DestNotEncrypted"]
    s.images.encrypted.add(str(plain))
    await s.finish()


async def test_a_new_encrypted_destination_qemu_failed_to_format_is_tried_again(s):
    """QEMU 7.2 times its LUKS key derivation by CPU time and fails at once when one round
    measured 0 ms ("Unable to get accurate CPU usage", a third of the encrypted copies on a
    loaded host): the start is made again, and nothing else is."""
    s.hv.disk("vm").encryption = LUKS
    refusals = [2]

    def refuse() -> None:
        if refusals[0]:
            refusals[0] -= 1
            raise HypervisorError("operation failed: failed to format image: 'Unable to get "
                                  "accurate CPU usage'")
    s.hv.on_call["start_copy"] = refuse
    body = s.create()
    s.follow(body)
    await s.until(lambda: s.phase() == "Copying")
    assert s.hv.verbs().count("start_copy") == 3
    await s.finish()


async def test_a_refusal_that_does_not_pass_is_not_tried_again(s):
    s.hv.refusals["start_copy"] = 1
    body = s.create()
    s.follow(body)
    await s.until(lambda: s.phase() == "Failed")
    assert s.hv.verbs().count("start_copy") == 1
    assert [c["reason"] for c in s.kube.status_of("bc")["conditions"]
            if c["type"] == "Failed" and c["status"] == "True"] == ["CopyRefused"]
    await s.finish()


@pytest.mark.parametrize("row", [r for r in INVALID if r.agent and isinstance(r.spec, dict)],
                         ids=lambda r: r.id)
async def test_a_spec_admitted_before_the_crd_refused_it_fails_untouched(s, row):
    """The agent's second line: an object the API server admitted before the CRD's rules
    (tests/support/invalid_specs.py) existed ends Failed/InvalidSpec with its message and a
    Warning Event, and libvirt is asked nothing that acts on a disk."""
    s.follow(s.add("bc", row.spec))
    await s.until(lambda: s.phase() == "Failed", timeout=30)
    status = s.status("bc")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert row.agent in status["message"]
    assert "InvalidSpec" in s.kube.reasons("bc")
    assert not {"start_copy", "pivot", "cancel", "set_bandwidth"} & set(s.hv.verbs())
    await s.finish()
