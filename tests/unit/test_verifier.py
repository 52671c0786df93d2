"""The check at the switch (agent.verifier through the follower) on the FAKES: the order of
its steps, a mismatch, None, the flush only where qcow2 metadata is read, a check that
cannot be made with and without spec.verify, a mirror that never settles, Full, a VM paused
by someone else, a pause a dead agent left. The e2e tests
(tests/e2e/test_verify_at_the_switch.py) run it on real images and a real guest."""

from __future__ import annotations

import asyncio

import pytest

from support.agent_on_fakes import FakeNode

pytestmark = [pytest.mark.asyncio, pytest.mark.looptime]

NODE = "node-1"
SOURCE = "/images/vm.qcow2"
SIZE = 1 << 20
CHECK_VERBS = {"pause", "job_progress", "flush_images", "pivot", "cancel", "resume"}


class Scenario(FakeNode):
    def __init__(self, tmp_path):
        super().__init__(tmp_path, node=NODE, status_interval=1.0, poll_interval=5.0)
        self.dom = self.hv.add_domain("vm")
        self.dest = str(tmp_path / "copy.qcow2")
        data = bytearray(SIZE)
        data[4096:8192] = b"x" * 4096
        self.images.views[SOURCE] = data
        self.images.views[self.dest] = bytearray(data)

    async def mirrored(self, **spec) -> dict:
        body = self.add("bc", {"domain": "vm", "disk": "vda", "dest": self.dest, **spec})
        self.follow(body)
        await self.until(lambda: self.phase("bc") == "Copying")
        self.hv.make_ready("vm")
        await self.until(lambda: self.status("bc").get("mirroredTime"))
        return body

    def check_verbs(self) -> list[str]:
        return [v for v in self.hv.verbs() if v in CHECK_VERBS]

    def verified_reason(self) -> str | None:
        found = [c for c in self.status("bc").get("conditions", []) if c["type"] == "Verified"]
        return found[0]["reason"] if found else None

    def verified(self) -> dict:
        return next(c for c in self.status("bc")["conditions"] if c["type"] == "Verified")


@pytest.fixture
def s(tmp_path):
    return Scenario(tmp_path)


async def test_the_default_check_pauses_flushes_compares_pivots_and_resumes(s):
    await s.mirrored(pivot=True)
    await s.reach("bc", "Pivoted")
    assert s.check_verbs() == ["pause", "job_progress", "flush_images", "pivot", "resume"]
    image_verbs = s.images.verbs()
    assert image_verbs[-3:] == ["data_map", "read_blocks", "read_blocks"]  # mapped first
    reads = [args for verb, args in s.images.calls if verb == "read_blocks"]
    assert {r[0] for r in reads} == {SOURCE, s.dest} and all(r[2] == 256 for r in reads)
    verification = s.status("bc")["verification"]
    assert verification["result"] == "Match" and verification["method"] == "Sample"
    assert verification["samples"] == 256 and verification["mismatches"] == 0
    assert s.verified()["status"] == "True" and s.verified()["reason"] == "Match"
    assert not s.hv.paused
    await s.finish()
    assert s.kube.reasons("bc")[-2:] == ["Verified", "Pivoted"]


async def test_a_mismatch_ends_the_job_on_the_source(s):
    await s.mirrored()
    s.images.views[s.dest][8 << 10:(8 << 10) + 5] = b"wrong"
    s.edit(s.body("bc"), pivot=True)
    await s.until(lambda: s.phase("bc") == "Failed")
    st = s.status("bc")
    assert s.check_verbs() == ["pause", "job_progress", "flush_images", "cancel", "resume"]
    assert "pivot" not in s.hv.verbs() and s.hv.disk("vm").source == SOURCE
    assert s.hv.disk("vm").job is None and not s.hv.paused  # ended, and resumed
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "VerifyMismatch" and "1 of 256" in failed["message"]
    assert st["verification"]["firstMismatch"] == 8 << 10
    assert s.verified()["reason"] == "VerifyMismatch"
    await s.finish()
    event = next(e for e in s.kube.events if e.reason == "VerifyMismatch")
    assert event.type == "Warning"


async def test_verify_none_pivots_without_a_pause(s):
    await s.mirrored(pivot=True, verify="None")
    await s.reach("bc", "Pivoted")
    assert s.check_verbs() == ["pivot"]
    assert "data_map" not in s.images.verbs()
    assert s.verified()["reason"] == "NotAsked"
    assert s.status("bc")["verification"]["result"] == "NotVerified"
    await s.finish()
    assert "NotVerified" not in s.kube.reasons("bc")


async def test_raw_images_are_read_without_a_flush(s):
    s.hv.disk("vm").format = "raw"
    await s.mirrored(pivot=True, format="raw")
    await s.reach("bc", "Pivoted")
    assert s.check_verbs() == ["pause", "job_progress", "pivot", "resume"]
    assert s.status("bc")["verification"]["result"] == "Match"
    await s.finish()


async def test_cannot_check_without_spec_verify_still_pivots(s):
    del s.images.views[SOURCE]
    await s.mirrored(pivot=True)
    await s.reach("bc", "Pivoted")
    assert "pause" not in s.hv.verbs()
    assert s.verified()["reason"] == "NotVerified"
    assert "cannot map the source's data" in s.status("bc")["verification"]["message"]
    await s.finish()
    assert "NotVerified" in s.kube.reasons("bc")


async def test_cannot_check_with_spec_verify_holds_the_pivot_until_it_can(s, looptime):
    views = s.images.views.pop(SOURCE)
    body = await s.mirrored(verify="Sample")
    s.edit(body, pivot=True)
    await s.until(lambda: s.verified_reason() == "NotVerifiable")
    assert s.phase("bc") == "Mirrored" and "pivot" not in s.hv.verbs()
    tries = s.images.verbs().count("data_map")
    await s.until(lambda: s.images.verbs().count("data_map") > tries)  # retried (back-off)
    assert s.phase("bc") == "Mirrored"
    s.images.views[SOURCE] = views  # readable again: the next retry checks and pivots
    await s.reach("bc", "Pivoted")
    assert s.verified()["reason"] == "Match"
    await s.finish()
    warnings = [e for e in s.kube.events if e.reason == "NotVerifiable"]
    assert warnings and all(e.type == "Warning" for e in warnings)


async def test_a_mirror_that_never_settles(s):
    await s.mirrored(verify="Sample")

    def busy() -> None:
        job = s.hv.disk("vm").job
        assert job is not None
        job.cur = job.end - 1

    s.hv.on_call["job_progress"] = busy
    s.edit(s.body("bc"), pivot=True)
    await s.until(lambda: "resume" in s.hv.verbs())
    await s.until(lambda: s.verified_reason() == "NotVerifiable")
    assert s.phase("bc") == "Mirrored" and "pivot" not in s.hv.verbs() and not s.hv.paused
    polls = s.hv.verbs().count("job_progress")
    assert 100 <= polls <= 250  # every 10 ms for 2 s, then given up
    assert "did not settle within 2 s" in s.verified()["message"]
    # Left out, the same copy pivots unchecked.
    s.edit(s.body("bc"), verify=None)
    await s.reach("bc", "Pivoted")
    assert s.verified()["reason"] == "NotVerified"
    await s.finish()


async def test_full_compares_every_block_within_its_bound(s):
    await s.mirrored(pivot=True, verify="Full")
    await s.reach("bc", "Pivoted")
    compares = [args for verb, args in s.images.calls if verb == "compare_in_use"]
    assert compares == [(SOURCE, s.dest, 60.0)]
    assert "read_blocks" not in s.images.verbs()
    assert s.check_verbs() == ["pause", "job_progress", "flush_images", "pivot", "resume"]
    assert s.status("bc")["verification"]["method"] == "Full"
    assert s.verified()["reason"] == "Match"
    await s.finish()


async def test_full_mismatch_names_the_offset(s):
    await s.mirrored(verify="Full")
    s.images.views[s.dest][SIZE - 1] = 1
    s.edit(s.body("bc"), pivot=True)
    await s.until(lambda: s.phase("bc") == "Failed")
    assert s.status("bc")["verification"]["firstMismatch"] == SIZE - 1
    assert s.hv.disk("vm").source == SOURCE
    await s.finish()


async def test_a_vm_paused_by_someone_else_is_checked_and_left_paused(s):
    await s.mirrored()
    s.hv.paused["vm"] = None  # virsh suspend, say
    s.edit(s.body("bc"), pivot=True)
    await s.reach("bc", "Pivoted")
    assert "resume" not in s.hv.verbs() and s.hv.paused == {"vm": None}
    await s.finish()


async def test_a_pause_left_by_a_dead_agent_is_resumed_by_the_next(s):
    s.hv.add_domain("other")
    s.hv.paused.update({"vm": NODE, "other": None})
    assert await s.agent.resume_left_paused() == ["vm"]
    assert s.hv.paused == {"other": None}  # never one paused by someone else
    assert await s.agent.resume_left_paused() == []


async def test_a_pause_left_by_a_dead_agent_is_resumed_once_libvirt_answers(s):
    """libvirt does not answer when the agent starts: the look for VMs its predecessor left
    paused fails; the agent's libvirt check looks again once libvirt answers."""
    s.hv.paused["vm"] = NODE
    s.hv.unreachable = True
    assert await s.agent.resume_left_paused() == []
    checking = asyncio.create_task(s.agent.check_libvirt())
    await asyncio.sleep(s.agent.config.libvirt_check_interval * 2)
    assert s.hv.paused == {"vm": NODE}  # still unreachable: nothing to do yet
    s.hv.unreachable = False
    await s.until(lambda: not s.hv.paused, timeout=s.agent.config.libvirt_check_interval * 2)
    looks = s.hv.verbs().count("resume_left_paused")
    await asyncio.sleep(s.agent.config.libvirt_check_interval * 3)
    assert s.hv.verbs().count("resume_left_paused") == looks  # found: not looked for again
    checking.cancel()
    await s.finish()


async def test_a_resume_that_fails_is_retried(s):
    await s.mirrored()
    s.hv.refusals["resume"] = 2
    s.edit(s.body("bc"), pivot=True)
    await s.reach("bc", "Pivoted")
    assert s.hv.verbs().count("resume") == 3 and not s.hv.paused
    await s.finish()


async def test_reads_that_take_too_long(s):
    s.images.read_delay = 3.0
    await s.mirrored(pivot=True)
    await s.reach("bc", "Pivoted")  # left out: pivots unchecked
    assert "more than 2 s" in s.verified()["message"]
    assert not s.hv.paused
    await s.finish()


@pytest.mark.parametrize("b_names", ["the domain's name", "the domain's uuid"])
async def test_one_pause_per_vm_at_a_time(s, b_names):
    """Two copies of one VM's disks pivot at once: their pauses never overlap (the first
    resume would let the guest run while the second check reads), also when one object
    names the VM and the other its uuid."""
    s.dom.disks["vdb"] = type(s.hv.disk("vm"))(target="vdb", source="/images/vm-b.qcow2")
    s.images.views["/images/vm-b.qcow2"] = bytearray(SIZE)
    dest_b = str(s.root / "copy-b.qcow2")
    s.images.views[dest_b] = bytearray(SIZE)
    s.images.read_delay = 0.5
    a = s.add("a", {"domain": "vm", "disk": "vda", "dest": s.dest, "pivot": True})
    b = s.add("b", {"domain": "vm" if b_names.endswith("name") else s.dom.uuid,
                    "disk": "vdb", "dest": dest_b, "pivot": True})
    s.follow(a)
    s.follow(b)
    await s.until(lambda: s.phase("a") == s.phase("b") == "Copying")
    s.hv.make_ready("vm", "vda")
    s.hv.make_ready("vm", "vdb")
    await s.until(lambda: s.phase("a") == s.phase("b") == "Pivoted")
    pauses = [v for v in s.hv.verbs() if v in ("pause", "resume")]
    assert pauses == ["pause", "resume", "pause", "resume"]
    await s.finish()
