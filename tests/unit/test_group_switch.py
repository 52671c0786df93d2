"""The check at the switch for a disk group (agent.groupswitch) on the FAKES (fake clock): the
group switches all or none, in one pause of the guest. All match: one pause, every member
pivoted inside it; one destination differs: no member pivots, that member Failed
VerifyMismatch, the others Mirrored GroupMemberMismatch; a check asked for that cannot be
made on one member: none pivots, retried; the followers reaching the pivot together share
one switch; a member whose follower was elsewhere records its own share; a mismatched job
libvirt will not end; a pivot libvirt refuses mid-group (no check recorded for it); verify:
None everywhere (no pause); an agent that dies mid-switch. Then the review's cases: a chain
move member reached by the switch before its follower's first look; a follower that ends
mid-switch (nothing kept); a member whose job ends before the pivots (none pivots); a resume
that failed (retried once libvirt answers); libvirt unreachable after the first pivot; an
agent that stops mid-switch. The pure rules are tests/unit/test_groupswitch.py's; on real
QEMU: tests/e2e/test_verify_at_the_switch.py."""

from __future__ import annotations

import asyncio

import pytest

from blockcopy.model.ports import HypervisorError
from support.agent_on_fakes import FakeNode, GroupNode
from support.fakes import Stop

pytestmark = [pytest.mark.asyncio, pytest.mark.looptime]

SIZE = 1 << 20  # each guest view: 256 blocks, all of them sampled
DISKS = ("vda", "vdb", "vdc")
PAUSE_VERBS = ("pause", "resume")


class Env(GroupNode):
    """Members vda, vdb, vdc of group g on domain vm (support.agent_on_fakes.GroupNode),
    every source and destination readable (the fake guest views, identical)."""

    def __init__(self, tmp_path, disks=DISKS, **spec):
        super().__init__(tmp_path, disks=disks, **spec)  # the members' loops start later
        for i, d in enumerate(disks):
            data = bytearray(SIZE)
            data[i * 4096:(i + 1) * 4096] = d.encode() * 1365 + b"x"
            self.images.views[str(tmp_path / f"{d}.qcow2")] = data
            self.images.views[self.dests[d]] = bytearray(data)

    def corrupt(self, d):
        """The destination holds something else than the mirror wrote there."""
        self.images.views[self.dests[d]][8192:8197] = b"wrong"

    def pauses(self):
        return [v for v in self.hv.verbs() if v in PAUSE_VERBS]

    def condition(self, d, kind):
        return next((c for c in self.status(d).get("conditions", []) if c["type"] == kind),
                    {})

    def verified(self, d):
        return self.condition(d, "Verified")

    def on_source(self, d):
        return self.hv.disk("vm", d).source == str(self.root / f"{d}.qcow2")

    def events(self, reason):
        return [e for e in self.kube.events if e.reason == reason]


async def test_every_member_matches_one_pause_and_every_pivot_inside_it(tmp_path):
    env = Env(tmp_path)
    await env.mirrored()
    env.pivot_all()
    await env.until(lambda: all(env.phase(d) == "Pivoted" for d in DISKS))
    assert env.pauses() == ["pause", "resume"]  # one pause for the whole group
    verbs = env.hv.verbs()
    pivots = [i for i, v in enumerate(verbs) if v == "pivot"]
    assert len(pivots) == 3 and verbs.index("pause") < pivots[0]
    assert pivots[-1] < verbs.index("resume")  # every pivot inside the pause
    assert verbs.count("flush_images") == 1  # one flush for all
    assert env.images.verbs().count("data_map") == 3  # one check of each member
    assert not env.hv.paused
    pause_ms = set()
    for d in DISKS:
        assert env.hv.disk("vm", d).source == env.dests[d]
        check = env.status(d)["verification"]
        assert (check["result"], check["samples"], check["mismatches"]) == ("Match", 256, 0)
        pause_ms.add(check["pauseMs"])
        assert (env.verified(d)["status"], env.verified(d)["reason"]) == ("True", "Match")
    assert len(pause_ms) == 1  # the same pause
    await env.finish()
    assert sorted(e.name for e in env.events("Verified")) == list(DISKS)


async def test_one_mismatch_and_no_member_pivots(tmp_path):
    env = Env(tmp_path)
    await env.mirrored()
    env.corrupt("vdb")
    env.pivot_all()
    await env.until(lambda: env.phase("vdb") == "Failed")
    await env.until(lambda: all(env.verified(d).get("reason") == "GroupMemberMismatch"
                                for d in ("vda", "vdc")))
    assert "pivot" not in env.hv.verbs()
    assert all(env.on_source(d) for d in DISKS)  # the VM stays on its sources
    assert env.pauses() == ["pause", "resume"] and not env.hv.paused
    # vdb: exactly as a single disk's mismatch
    failed = next(c for c in env.status("vdb")["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "VerifyMismatch"
    assert env.status("vdb")["verification"]["result"] == "Mismatch"
    assert env.hv.disk("vm", "vdb").job is None
    # the others: Mirrored, their jobs running, the group's reason naming vdb
    for d in ("vda", "vdc"):
        assert env.phase(d) == "Mirrored" and env.hv.disk("vm", d).job is not None
        verified = env.verified(d)
        assert verified["status"] == "False" and "the copy of vdb differs" in \
            verified["message"]
        assert env.status(d)["verification"]["result"] == "Match"  # their own check
    # ... and they stay there (the group gate: a member is Failed), never pivoted
    await asyncio.sleep(120)
    assert "pivot" not in env.hv.verbs() and env.pauses() == ["pause", "resume"]
    assert all(env.phase(d) == "Mirrored" for d in ("vda", "vdc"))
    assert "vdb is Failed" in env.status("vda")["message"]
    assert env.verified("vda")["reason"] == "GroupMemberMismatch"  # kept by the gate's looks
    await env.finish()
    warnings = env.events("GroupMemberMismatch")
    assert sorted({e.name for e in warnings}) == ["vda", "vdc"]
    assert all(e.type == "Warning" and "vdb" in e.message for e in warnings)
    assert [e.type for e in env.events("VerifyMismatch")] == ["Warning"]


async def test_a_mismatched_job_libvirt_will_not_end_is_retried_and_never_pivoted(tmp_path):
    env = Env(tmp_path, disks=("vda", "vdb"))
    await env.mirrored()
    env.corrupt("vdb")
    env.hv.refusals["cancel"] = 1
    env.pivot_all()
    await env.until(lambda: env.phase("vdb") == "Failed", timeout=300)
    assert env.hv.verbs().count("cancel") == 2  # refused, then again on the retry
    assert "pivot" not in env.hv.verbs() and env.on_source("vda") and env.on_source("vdb")
    assert env.verified("vdb")["reason"] == "VerifyMismatch"
    await env.until(lambda: env.verified("vda").get("reason") == "GroupMemberMismatch")
    assert env.phase("vda") == "Mirrored" and not env.hv.paused
    await env.finish()
    (refused,) = [e for e in env.events("PivotRefused") if e.name == "vdb"]
    assert "libvirt refused to end the job" in refused.message


async def test_a_check_asked_for_that_cannot_be_made_holds_every_member(tmp_path):
    env = Env(tmp_path, verify="Sample")
    source = str(tmp_path / "vdb.qcow2")
    view = env.images.views.pop(source)  # vdb's source cannot be read
    await env.mirrored()
    env.pivot_all()
    await env.until(lambda: env.verified("vdb").get("reason") == "NotVerifiable")
    await env.until(lambda: all(env.verified(d).get("reason") == "GroupMemberNotVerifiable"
                                for d in ("vda", "vdc")))
    assert all(env.phase(d) == "Mirrored" for d in DISKS)
    assert "pause" not in env.hv.verbs() and "pivot" not in env.hv.verbs()
    assert "cannot be made on vdb" in env.verified("vda")["message"]
    tries = env.images.verbs().count("data_map")
    await env.until(lambda: env.images.verbs().count("data_map") > tries)  # retried
    assert "pivot" not in env.hv.verbs()
    env.images.views[source] = view  # readable again: the next try switches the group
    await env.until(lambda: all(env.phase(d) == "Pivoted" for d in DISKS), timeout=300)
    assert env.pauses() == ["pause", "resume"]
    assert all(env.verified(d)["reason"] == "Match" for d in DISKS)
    await env.finish()
    assert all(e.type == "Warning" for e in env.events("GroupMemberNotVerifiable"))


async def test_followers_that_reach_the_pivot_together_share_one_switch(tmp_path):
    env = Env(tmp_path)
    env.images.read_delay = 0.5  # the check takes a while: the others arrive meanwhile
    switch = env.agent.switch
    runs, callers = [], []
    run, pivot = switch._switch, switch.pivot

    async def counted_run(key):
        runs.append(key)
        await run(key)

    async def counted_pivot(key, *, by):
        callers.append(by.name)
        return await pivot(key, by=by)
    switch._switch, switch.pivot = counted_run, counted_pivot
    await env.mirrored()
    env.pivot_all()  # every follower is poked at once
    await env.until(lambda: all(env.phase(d) == "Pivoted" for d in DISKS))
    assert sorted(callers) == list(DISKS)  # each asked...
    assert len(runs) == 1  # ... and one switch did it
    assert env.pauses() == ["pause", "resume"]
    assert env.images.verbs().count("data_map") == 3
    assert all(env.status(d)["verification"]["result"] == "Match" for d in DISKS)
    await env.finish()


@pytest.mark.parametrize("corrupt", [False, True], ids=["pivoted", "mismatched"])
async def test_a_member_whose_follower_was_elsewhere_records_its_share(tmp_path, corrupt):
    """vdc's follower is held up (its lock taken) while vda's and vdb's switch the group:
    once it looks, it records the check the switch made of vdc, not a bare job end."""
    env = Env(tmp_path)
    await env.mirrored()
    if corrupt:
        env.corrupt("vdc")
    lock = env.agent.followers[("ns", "vdc")].lock
    await lock.acquire()
    env.pivot_all()
    if corrupt:
        await env.until(lambda: env.hv.disk("vm", "vdc").job is None)
    else:
        await env.until(lambda: env.phase("vda") == env.phase("vdb") == "Pivoted")
        assert env.hv.disk("vm", "vdc").source == env.dests["vdc"]
    await asyncio.sleep(1)
    assert env.phase("vdc") == "Mirrored"  # not recorded yet
    lock.release()
    if corrupt:
        status = await env.reach("vdc", "Failed")
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "VerifyMismatch"  # not JobCanceled
        assert status["verification"]["result"] == "Mismatch"
        assert all(env.on_source(d) for d in DISKS)
        await env.until(lambda: env.verified("vda").get("reason") == "GroupMemberMismatch")
    else:
        status = await env.reach("vdc", "Pivoted")
        assert status["verification"]["result"] == "Match"
        assert env.verified("vdc")["reason"] == "Match"
        assert status["verification"]["pauseMs"] == \
            env.status("vda")["verification"]["pauseMs"]
    assert env.pauses() == ["pause", "resume"]
    await env.finish()


async def test_a_member_that_looks_after_its_pivot_and_before_the_resume_records_its_share(
        tmp_path):
    """vdc's follower was elsewhere (held up) while vda's and vdb's switch the group; it
    goes on right after the pivots, while the guest is being resumed (on libvirt, the pivot's
    job event wakes it then). Its own look sees its disk pivoted before the switch has given
    out the members' shares: it must wait for them and record the check the switch made of
    vdc, with zero detection put back, not a bare Pivoted."""
    env = Env(tmp_path)
    await env.mirrored()
    lock = env.agent.followers[("ns", "vdc")].lock
    await lock.acquire()
    resume = env.hv.resume

    async def slow_resume(domain, owner):
        if lock.locked():
            lock.release()  # vdc's follower goes on: its disk is pivoted by now
        await asyncio.sleep(1)
        await resume(domain, owner)
    env.hv.resume = slow_resume
    env.pivot_all()
    await env.until(lambda: all(env.phase(d) == "Pivoted" for d in DISKS))
    assert env.pauses() == ["pause", "resume"]
    for d in DISKS:
        assert env.status(d).get("verification", {}).get("result") == "Match", d
        assert env.verified(d)["reason"] == "Match", d
    back = [a[1] for _, v, a in env.hv.calls if v == "set_zero_detection" and not a[2]]
    assert sorted(back) == list(DISKS)
    await env.finish()


async def test_zero_detection_is_put_back_on_every_pivoted_member(tmp_path):
    env = Env(tmp_path, disks=("vda", "vdb"))
    await env.until(lambda: all(env.status(d).get("zeroDetection") == "unmap"
                                for d in ("vda", "vdb")))
    await env.mirrored()
    env.pivot_all()
    await env.until(lambda: all(env.phase(d) == "Pivoted" for d in ("vda", "vdb")))
    back = [a for _, v, a in env.hv.calls if v == "set_zero_detection" and not a[2]]
    assert sorted(back) == [("vm", "vda", False, False), ("vm", "vdb", False, False)]
    await env.finish()


async def test_a_pivot_libvirt_refuses_mid_group(tmp_path):
    """vda pivoted, then libvirt refuses vdb's: that cannot be undone. vda is Pivoted, vdb
    (refused) and vdc (not tried) stay Mirrored, say so, and switch together on the retry
    (vda's phase change wakes them at once)."""
    env = Env(tmp_path)
    await env.mirrored()
    refused = []

    def refuse_vdb():
        if env.hv.calls[-1][2][1] == "vdb" and not refused:
            refused.append(env.hv.disk("vm", "vda").source == env.dests["vda"])
            raise HypervisorError("fault injection: pivot refused")
    env.hv.on_call["pivot"] = refuse_vdb
    env.pivot_all()
    await env.until(lambda: all(env.phase(d) == "Pivoted" for d in DISKS), timeout=300)
    assert refused == [True]  # vda was pivoted when vdb's pivot was refused
    assert [a[1] for _, v, a in env.hv.calls if v == "pivot"] == ["vda", "vdb", "vdb", "vdc"]
    assert env.pauses() == ["pause", "resume"] * 2  # the retry: vdb and vdc in one pause
    assert not env.hv.paused
    for d in ("vdb", "vdc"):
        assert env.kube.phases_written(d)[-3:] == ["Mirrored", "Pivoting", "Pivoted"]
    await env.finish()
    told = {e.name: e.message for e in env.events("PivotRefused")}
    assert sorted(told) == ["vdb", "vdc"] and all(
        e.type == "Warning" for e in env.events("PivotRefused"))
    assert told["vdb"].startswith("Mirrored: libvirt refused the pivot, will retry")
    assert "vda of group g pivoted before it (a pivot cannot be undone)" in told["vdb"]
    assert "libvirt refused the pivot of vdb" in told["vdc"]


async def test_verify_none_on_every_member_pivots_without_a_pause(tmp_path):
    env = Env(tmp_path, verify="None")
    await env.mirrored()
    env.pivot_all()
    await env.until(lambda: all(env.phase(d) == "Pivoted" for d in DISKS))
    assert env.pauses() == [] and env.hv.verbs().count("pivot") == 3
    assert "data_map" not in env.images.verbs()
    assert all(env.verified(d)["reason"] == "NotAsked" for d in DISKS)
    await env.finish()


# -- an agent that dies mid-switch ------------------------------------------------------------

async def _dies_and_restarts(env):
    """The agent process dies where it is (its tasks never go on); a new one starts on the
    same hypervisor and API server, resumes the pause it left, and follows every member."""
    for task in env.tasks:
        task.cancel()
    await asyncio.gather(*env.tasks, return_exceptions=True)
    old = env.agent.switch
    env.agent, env.stop, env.tasks = env._agent(), Stop(), []
    assert await env.agent.resume_left_paused() == ["vm"]
    for d in env.bodies:
        env.follow(d)
    return old


async def test_an_agent_that_dies_between_two_pivots(tmp_path):
    env = Env(tmp_path)
    await env.mirrored()
    never = asyncio.Event()
    pivot = env.hv.pivot

    async def dies_at_vdb(domain, target):
        if target == "vdb":
            await never.wait()  # the process is gone: nothing after this happens
        await pivot(domain, target)
    env.hv.pivot = dies_at_vdb
    env.pivot_all()
    await env.until(lambda: env.hv.disk("vm", "vda").source == env.dests["vda"])
    await asyncio.sleep(1)
    assert env.hv.paused == {"vm": "n"}
    env.hv.pivot = pivot
    old = await _dies_and_restarts(env)
    await env.until(lambda: all(env.phase(d) == "Pivoted" for d in DISKS), timeout=300)
    assert all(env.hv.disk("vm", d).source == env.dests[d] for d in DISKS)
    assert all(env.status(d)["verification"]["result"] == "Match" for d in ("vdb", "vdc"))
    assert not env.hv.paused
    for task in old._running.values():
        task.cancel()
    await env.finish()


async def test_an_agent_that_dies_after_ending_a_mismatched_job(tmp_path):
    env = Env(tmp_path)
    await env.mirrored()
    env.corrupt("vdb")
    never = asyncio.Event()
    resume = env.hv.resume

    async def dies_before_resuming(domain, owner):
        await never.wait()
    env.hv.resume = dies_before_resuming
    env.pivot_all()
    await env.until(lambda: env.hv.disk("vm", "vdb").job is None)
    await asyncio.sleep(1)
    env.hv.resume = resume
    old = await _dies_and_restarts(env)
    await env.until(lambda: env.phase("vdb") == "Failed")
    await env.until(lambda: all("vdb is Failed" in env.status(d).get("message", "")
                                for d in ("vda", "vdc")))
    assert all(env.phase(d) == "Mirrored" for d in ("vda", "vdc"))
    assert "pivot" not in env.hv.verbs() and all(env.on_source(d) for d in DISKS)
    assert not env.hv.paused
    for task in old._running.values():
        task.cancel()
    await env.finish()


# -- a member the switch reaches before its own follower looked at it ---------------------------

async def test_a_chain_move_member_is_not_switched_before_its_layers_are_taken_up(tmp_path):
    """After a restart the new agent follows the members one by one. vda is a chain move
    whose lower images were not all verified when the old agent stopped; its follower exists
    (the gate counts it followed) but has not looked at its disk yet when vdb's step opens
    the gate and starts the switch: the switch must see vda's layer copies as its status
    records them (not verified: hold the pivot), not as a follower without a chain move."""
    node = FakeNode(tmp_path)
    (tmp_path / "new").mkdir()
    node.hv.add_domain("vm", disks={"vda": str(tmp_path / "vda.qcow2"),
                                    "vdb": str(tmp_path / "vdb.qcow2")})
    node.hv.disk("vm", "vda").chain = (str(tmp_path / "l1.qcow2"), str(tmp_path / "b.qcow2"))
    never = asyncio.Event()
    copy_layer = node.images.copy_layer

    async def stuck(*args, **kw):
        await never.wait()
    node.images.copy_layer = stuck  # the old agent's layer copies never end
    old = {"domain": "vm", "group": "g", "verify": "None"}
    bodies = {"vda": node.add("vda", {**old, "disk": "vda", "backingChain": "copy",
                                      "dest": str(tmp_path / "new" / "vda.qcow2")},
                              created="2025-12-31T23:00:00Z"),
              "vdb": node.add("vdb", {**old, "disk": "vdb",
                                      "dest": str(tmp_path / "new" / "vdb.qcow2")},
                              created="2025-12-31T23:00:00Z")}
    for body in bodies.values():
        node.follow(body)
    await node.until(lambda: all(node.phase(d) == "Copying" for d in bodies))
    for d in bodies:
        node.hv.make_ready("vm", d)
    await node.until(lambda: all(node.phase(d) == "Mirrored" for d in bodies))
    assert [layer["state"] for layer in node.status("vda")["layers"]] != ["Verified"] * 2
    await node.restart()
    node.images.copy_layer = copy_layer
    for body in bodies.values():
        body["spec"]["pivot"] = True
    # The new agent: vdb followed first (held: vda is not followed yet) ...
    node.follow(bodies["vdb"])
    await node.until(lambda: "not followed" in node.status("vdb").get("message", ""))
    # ... then vda, whose first look at its disk takes a while.
    observe, first = node.hv.observe, asyncio.Event()

    async def slow_first_look(domain, disk):
        if disk == "vda" and not first.is_set():
            first.set()
            await asyncio.sleep(30)
        return await observe(domain, disk)
    node.hv.observe = slow_first_look
    layers_at_pivot = []
    node.hv.on_call["pivot"] = lambda: layers_at_pivot.append(
        [layer["state"] for layer in node.status("vda").get("layers", [])])
    node.follow(bodies["vda"])
    await node.until(first.is_set)
    node.agent.followers[("ns", "vdb")].poke()  # vdb looks again: the gate is open
    await node.until(lambda: all(node.phase(d) == "Pivoted" for d in bodies), timeout=300)
    assert layers_at_pivot and all(states == ["Verified", "Verified"]
                                   for states in layers_at_pivot)
    await node.finish()


async def test_a_member_no_longer_followed_mid_switch_leaves_no_share_behind(tmp_path):
    """vdc's follower ends while the switch is in its pause (kopf cancels the daemon of an
    object being deleted, or of an agent stopping, after its cancellation timeout): the share
    the switch makes for vdc afterwards would never be taken. Nothing of the switch is kept
    once every follower took its share (a long-lived agent switches many groups)."""
    env = Env(tmp_path)
    env.images.read_delay = 1.5  # the pause lasts a while
    await env.mirrored()
    env.pivot_all()
    await env.until(lambda: env.hv.paused)
    vdc = env.tasks[DISKS.index("vdc")]
    vdc.cancel()
    await asyncio.gather(vdc, return_exceptions=True)
    assert ("ns", "vdc") not in env.agent.followers
    await env.until(lambda: env.phase("vda") == env.phase("vdb") == "Pivoted")
    await env.until(lambda: not env.hv.paused)
    assert env.agent.switch._shares == {}
    assert env.agent.switch._running == {}
    env.tasks.remove(vdc)
    await env.finish()



async def test_a_member_deleted_mid_switch_is_not_cut_out_of_it(tmp_path):
    """vdc is deleted while the switch is in its pause, after the members' jobs were looked
    at and right before the first pivot: kopf cancels its follower, and its deletion handler
    (Agent.cancel_for_deletion) would end its job at once. All or none: the deletion waits
    for the switch, which had taken vdc in before the deletion came, rather than end vdc's
    job between the others' pivots (vda and vdb on their copies, vdc on its source)."""
    env = Env(tmp_path)
    await env.mirrored()
    body, deletion = env.bodies["vdc"], []
    pivot = env.hv.pivot

    async def deleted_before_the_first_pivot(domain, target):
        if not deletion:
            body["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
            vdc = env.tasks[DISKS.index("vdc")]
            vdc.cancel()  # kopf ends the daemon of an object being deleted
            await asyncio.gather(vdc, return_exceptions=True)
            deletion.append(asyncio.create_task(env.agent.cancel_for_deletion(body)))
            await asyncio.sleep(0.1)  # the deletion handler goes on meanwhile
        await pivot(domain, target)
    env.hv.pivot = deleted_before_the_first_pivot
    env.pivot_all()
    await env.until(lambda: deletion and deletion[0].done() and not env.hv.paused)
    assert [env.on_source(d) for d in DISKS] == [False, False, False], deletion[0].result()
    assert deletion[0].result() == "nothing to cancel: no job of this BlockCopy is running"
    env.tasks.pop(DISKS.index("vdc"))
    await env.until(lambda: env.phase("vda") == env.phase("vdb") == "Pivoted")
    await env.finish()


async def test_a_member_being_deleted_is_not_switched(tmp_path):
    """vdc is being deleted (its deletion handler ends its job: the VM stays on that source)
    while its follower is still in a step: the group does not switch it (WaitingForGroup);
    once vdc is gone, vda and vdb switch without it. (A follower between two steps ends at
    once: vdc is then no longer a member.)"""
    env = Env(tmp_path)
    await env.mirrored()
    body = env.bodies["vdc"]
    follower = env.agent.followers[("ns", "vdc")]
    await follower.lock.acquire()
    follower.poke()
    await asyncio.sleep(1)  # vdc's follower is in a step, held up
    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    env.pivot_all()
    await env.until(lambda: "vdc is being deleted" in env.status("vda").get("message", ""))
    assert "pivot" not in env.hv.verbs() and "pause" not in env.hv.verbs()
    follower.lock.release()
    assert (await env.agent.cancel_for_deletion(body)).startswith("cancelled the copy")
    del env.kube.objects[("ns", "vdc")]  # the finalizer goes, and so does the object
    await env.until(lambda: env.phase("vda") == env.phase("vdb") == "Pivoted", timeout=60)
    assert env.on_source("vdc") and env.pauses() == ["pause", "resume"]
    await env.finish()


@pytest.mark.parametrize("verify", ["None", None], ids=["verify-None", "verify-left-out"])
async def test_a_member_whose_pivot_did_not_happen_records_no_check(tmp_path, verify):
    """libvirt refuses vdb's pivot (vda pivoted before it): vdb and vdc stay Mirrored,
    PivotRefused, and switch on the retry. Nothing they record meanwhile may say they
    pivoted: their check is the retry's (a single disk whose pivot libvirt refuses records
    no check either)."""
    env = Env(tmp_path, **({"verify": verify} if verify else {}))
    if verify is None:  # left out, and cannot be made (no guest views): pivots unchecked
        for d in DISKS:
            env.images.views.pop(str(tmp_path / f"{d}.qcow2"))
    await env.mirrored()
    refused = []

    def refuse_vdb():
        if env.hv.calls[-1][2][1] == "vdb" and not refused:
            refused.append(True)
            raise HypervisorError("fault injection: pivot refused")
    env.hv.on_call["pivot"] = refuse_vdb
    seen = {}  # what vdb and vdc recorded with PivotRefused (retried at once: vda's phase)
    patch = env.kube.patch_status

    async def recorded(namespace, name, status, **kw):
        stored = await patch(namespace, name, status, **kw)
        if name in ("vdb", "vdc") and env.condition(name, "Mirrored").get("reason") == \
                "PivotRefused":
            seen.setdefault(name, (env.phase(name), env.verified(name).get("message", "")))
        return stored
    env.kube.patch_status = recorded
    env.pivot_all()
    await env.until(lambda: all(env.phase(d) == "Pivoted" for d in DISKS), timeout=300)
    assert sorted(seen) == ["vdb", "vdc"]
    for d, (phase, verified) in seen.items():
        assert phase == "Mirrored" and "pivoted" not in verified, (d, verified)
    await env.finish()
    for d in DISKS:  # the check that let it pivot, told once
        assert "pivoted without a check" in env.verified(d)["message"]
        told = [e for e in env.events("NotVerified") if e.name == d]
        assert len(told) == (1 if verify is None else 0), told


@pytest.mark.parametrize("verify", [None, "None"], ids=["in-the-pause", "no-pause"])
async def test_a_member_whose_job_ends_before_the_pivots_holds_the_whole_group(tmp_path,
                                                                              verify):
    """vdc's job fails (its destination filled up, say) after the switch looked at it and
    before the first pivot; with a pause (verify left out: its check finds the job gone and
    lets it pass, as a lone disk would try its pivot) or without one (verify: None). All or
    none: no member pivots, vdc ends Failed, the others stay Mirrored on their sources,
    held by vdc."""
    env = Env(tmp_path, **({"verify": verify} if verify else {}))
    await env.mirrored()

    vdc = env.agent.followers[("ns", "vdc")]
    looked = vdc.switch_copy

    async def then_it_fails():
        copy = await looked()
        if env.hv.disk("vm", "vdc").job is not None:
            env.hv.fail_job("vm", "vdc")
        return copy
    vdc.switch_copy = then_it_fails
    env.pivot_all()
    await env.until(lambda: env.phase("vdc") == "Failed", timeout=60)
    await env.until(lambda: all("vdc is Failed" in env.status(d).get("message", "")
                                for d in ("vda", "vdb")), timeout=60)
    assert "pivot" not in env.hv.verbs() and all(env.on_source(d) for d in DISKS)
    assert all(env.phase(d) == "Mirrored" for d in ("vda", "vdb")) and not env.hv.paused
    await env.finish()
    # Those in the switch that found vdc's job gone say so; a member that joined the next
    # one (vdc Failed by then) names vdc's phase instead.
    waiting = env.events("WaitingForGroup")
    assert any("the block job of vdc is gone" in e.message for e in waiting)
    assert all(any("vdc is" in e.message or "job of vdc" in e.message for e in waiting
                   if e.name == d) for d in ("vda", "vdb"))


async def test_a_guest_whose_resume_failed_is_resumed_once_libvirt_answers(tmp_path):
    """Every member pivoted in the pause, then libvirt is unreachable for longer than the
    resume's retries (10 s): nothing will pause this VM again (the group is done), yet the
    guest must not stay paused until the agent restarts. The agent's libvirt check resumes
    it once libvirt answers again."""
    env = Env(tmp_path, disks=("vda", "vdb"))
    checking = asyncio.create_task(env.agent.check_libvirt())
    await env.mirrored()
    loop = asyncio.get_running_loop()

    def outage():
        if not env.hv.unreachable and "resume" not in env.hv.verbs()[:-1]:
            env.hv.unreachable = True
            loop.call_later(10, setattr, env.hv, "unreachable", False)
    env.hv.on_call["resume"] = outage
    env.pivot_all()
    await env.until(lambda: all(env.phase(d) == "Pivoted" for d in ("vda", "vdb")),
                    timeout=120)
    await env.until(lambda: not env.hv.paused, timeout=60)
    assert env.hv.disk("vm", "vda").source == env.dests["vda"]
    checking.cancel()
    await env.finish()


async def test_an_agent_that_stops_mid_switch_resumes_the_guest_before_it_lets_go(tmp_path):
    """The agent is told to stop while a group's switch is in its pause: kopf stops the
    followers (cancelled after their timeout), then runs the cleanup (Agent.stop, which
    closes the libvirt connection). A lone disk's check ran in its follower, so cancelling
    the follower resumed its guest; the group's switch runs apart from every follower and
    must be ended (its guest resumed) before the connection goes."""
    env = Env(tmp_path)
    env.images.read_delay = 1.5
    await env.mirrored()
    env.pivot_all()
    await env.until(lambda: env.hv.paused)
    for task in env.tasks:  # kopf cancels the daemons
        task.cancel()
    await asyncio.gather(*env.tasks, return_exceptions=True)
    paused_at_close = []
    close = env.hv.close

    async def closing():
        paused_at_close.append(dict(env.hv.paused))
        await close()
    env.hv.close = closing
    await env.agent.stop()
    assert paused_at_close == [{}]
    assert all(task.done() for task in env.tasks) and not env.agent.switch._running


async def test_libvirt_unreachable_after_the_first_pivot_leaves_every_member_true(tmp_path):
    """vda pivoted, then libvirt cannot be reached (20 s) in the pause: vdb and vdc were not
    pivoted, the guest cannot be resumed meanwhile. vda is recorded as it is (its share:
    pivoted, checked); vdb and vdc stay Pivoting, their jobs running, and switch together
    once libvirt answers, checked again, in a pause that resumes the guest."""
    env = Env(tmp_path)
    await env.mirrored()
    pivot = env.hv.pivot

    async def then_down(domain, target):
        await pivot(domain, target)
        if target == "vda":
            env.hv.unreachable = True
    env.hv.pivot = then_down
    env.pivot_all()
    await env.until(lambda: env.hv.unreachable)
    await asyncio.sleep(20)
    assert env.hv.disk("vm", "vda").source == env.dests["vda"]
    assert env.status("vda")["verification"]["result"] == "Match"
    assert [env.phase(d) for d in ("vdb", "vdc")] == ["Pivoting", "Pivoting"]
    assert env.on_source("vdb") and env.on_source("vdc") and env.hv.paused
    env.hv.unreachable = False
    await env.until(lambda: all(env.phase(d) == "Pivoted" for d in DISKS), timeout=300)
    assert not env.hv.paused and env.pauses().count("pause") == 2
    assert all(env.status(d)["verification"]["result"] == "Match" for d in DISKS)
    await env.finish()
