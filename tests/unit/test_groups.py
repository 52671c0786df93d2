"""Disk groups on the FAKES (fake clock): members pivot only together, a slow member holds
the others Mirrored, and the group abort quiesces the VM once, ends every member's job, and
always resumes."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from blockcopy.agent.groups import _aliases
from blockcopy.model.ports import HypervisorError
from support.agent_on_fakes import GroupNode
from support.fakes import Stop

pytestmark = [pytest.mark.asyncio, pytest.mark.looptime]


T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


Env = GroupNode  # pivot=True: every member with pivot: true from the start


async def test_no_member_pivots_until_every_member_is_mirrored_with_pivot(tmp_path):
    env = Env(tmp_path)
    await env.until(lambda: all(env.phase(d) == "Copying" for d in env.bodies))
    for d in ("vda", "vdb", "vdc"):
        env.edit(d, pivot=True)
    env.hv.make_ready("vm", "vda")
    env.hv.make_ready("vm", "vdb")  # vdc is slow (say bandwidth-limited)
    await asyncio.sleep(5)
    assert [env.phase(d) for d in ("vda", "vdb", "vdc")] == ["Mirrored", "Mirrored", "Copying"]
    assert "pivot" not in env.hv.verbs()
    status = env.kube.status_of("vda")
    assert "vdc is Copying" in status["message"]
    assert {m["name"]: m["phase"] for m in status["group"]["members"]} == {
        "vda": "Mirrored", "vdb": "Mirrored", "vdc": "Copying"}
    env.hv.make_ready("vm", "vdc")
    await env.until(lambda: all(env.phase(d) == "Pivoted" for d in env.bodies))
    pivots = env.hv.times("pivot")
    assert len(pivots) == 3 and max(pivots) - min(pivots) < 0.5  # in a row
    await env.finish()


async def test_a_member_without_pivot_true_holds_the_group(tmp_path):
    env = Env(tmp_path, disks=("vda", "vdb"))
    await env.until(lambda: all(env.phase(d) == "Copying" for d in env.bodies))
    env.edit("vda", pivot=True)
    env.hv.make_ready("vm", "vda")
    env.hv.make_ready("vm", "vdb")
    await asyncio.sleep(5)
    assert env.phase("vda") == "Mirrored" and "vdb has no pivot: true" in \
        env.kube.status_of("vda")["message"]
    env.edit("vdb", pivot=True)
    await env.until(lambda: all(env.phase(d) == "Pivoted" for d in env.bodies))
    await env.finish()


async def test_a_group_abort_quiesces_once_ends_every_job_and_resumes(tmp_path):
    env = Env(tmp_path)
    await env.mirrored()
    env.edit("vda", abort=True)
    env.edit("vdb", abort=True)
    await asyncio.sleep(3)
    assert "cancel" not in env.hv.verbs()  # vdc has no abort: true yet
    assert "waiting for abort: true on vdc" in env.kube.status_of("vda")["message"]
    env.edit("vdc", abort=True)
    await env.until(lambda: all(env.phase(d) == "Aborted" for d in env.bodies))
    verbs = env.hv.verbs()
    assert verbs.count("quiesce") == 1 and verbs.count("unquiesce") == 1
    first_cancel = verbs.index("cancel")
    assert verbs.index("quiesce") < first_cancel and verbs.count("cancel") == 3
    assert max(i for i, v in enumerate(verbs) if v == "cancel") < verbs.index("unquiesce")
    assert env.hv.suspended == set()  # resumed
    assert all("consistent point-in-time" in env.kube.status_of(d)["message"]
               for d in env.bodies)
    await env.finish()
    await env.agent.recorder.drain()
    assert [e.reason for e in env.kube.events].count("GroupAborted") >= 1


async def test_a_member_that_looked_before_the_groups_abort_does_not_abort_it_again(tmp_path):
    """vdc's step looks at its job before the group's abort (started by vda's step) ends it,
    and asks for the abort after it ended: nothing is left to end, so the guest is not
    suspended a second time."""
    env = Env(tmp_path)
    await env.mirrored()
    env.edit("vda", abort=True)
    env.edit("vdb", abort=True)
    await env.until(lambda: "waiting for abort: true on vdc" in
                    env.kube.status_of("vda").get("message", ""))
    observe, stale = env.hv.observe, []

    async def look_then_wait(domain, disk):
        state = await observe(domain, disk)
        if disk == "vdc" and env.bodies["vdc"]["spec"].get("abort") and not stale:
            stale.append(state)  # its job as it was; the group's abort goes on meanwhile
            await env.until(lambda: "unquiesce" in env.hv.verbs() and not env.hv.suspended)
        return state
    env.hv.observe = look_then_wait
    env.edit("vdc", abort=True)
    await env.until(lambda: all(env.phase(d) == "Aborted" for d in env.bodies))
    assert stale and stale[0].job is not None
    assert env.hv.verbs().count("quiesce") == 1
    await env.finish()


async def test_the_vm_is_resumed_even_when_cancelling_fails(tmp_path):
    env = Env(tmp_path, disks=("vda", "vdb"))
    await env.mirrored()
    original = env.hv.cancel

    async def failing_cancel(domain, target):
        if target == "vdb":
            raise HypervisorError("fault injection: cancel refused")
        await original(domain, target)
    env.hv.cancel = failing_cancel
    env.edit("vda", abort=True)
    env.edit("vdb", abort=True)
    # (A call is in verbs() once made; its effect comes when libvirt answers.)
    await env.until(lambda: "unquiesce" in env.hv.verbs() and env.hv.suspended == set(),
                    timeout=30)
    await env.until(lambda: env.phase("vda") == "Aborted")
    await env.finish()


async def test_a_member_no_agent_follows_yet_holds_the_group(tmp_path):
    """vdc exists in the API but is not followed yet (not claimed yet, say): vda and vdb,
    Mirrored with pivot: true, must not take themselves for the whole group."""
    env = Env(tmp_path, followed=("vda", "vdb"), pivot=True)
    await env.until(lambda: env.phase("vda") == "Copying" and env.phase("vdb") == "Copying")
    env.hv.make_ready("vm", "vda")
    env.hv.make_ready("vm", "vdb")
    await env.until(lambda: env.phase("vda") == "Mirrored" and env.phase("vdb") == "Mirrored")
    await asyncio.sleep(10)
    assert "pivot" not in env.hv.verbs()
    message = env.kube.status_of("vda")["message"]
    assert "vdc is not started" in message and "vda is" not in message  # not its own stale phase
    env.follow("vdc")
    await env.until(lambda: env.phase("vdc") == "Copying")
    env.hv.make_ready("vm", "vdc")
    await env.until(lambda: all(env.phase(d) == "Pivoted" for d in env.bodies))
    await env.finish()


async def test_a_group_waits_for_members_created_just_after_the_newest(tmp_path):
    """Every member Mirrored one second after the newest was created: the group waits until
    5 s after that creation (others may be on their way), then pivots by itself."""
    env = Env(tmp_path, disks=("vda", "vdb"), created="2026-01-01T00:00:00Z", pivot=True)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await env.until(lambda: env.phase("vda") == "Copying" and env.phase("vdb") == "Copying")
    env.hv.make_ready("vm", "vda")
    env.hv.make_ready("vm", "vdb")
    await env.until(lambda: env.phase("vda") == "Mirrored" and env.phase("vdb") == "Mirrored")
    await env.until(lambda: "may still join" in env.kube.status_of("vdb")["message"])
    assert loop.time() < 5 and "pivot" not in env.hv.verbs()
    await env.until(lambda: all(env.phase(d) == "Pivoted" for d in env.bodies), timeout=30)
    pivots = env.hv.times("pivot")
    # the agent's clock is T0 + loop time, and the members were created at T0
    assert 5 <= min(pivots) and max(pivots) < 7, (start, pivots)
    await env.finish()


async def test_a_group_whose_members_cannot_be_listed_stays_on_its_sources(tmp_path):
    env = Env(tmp_path, disks=("vda", "vdb"), pivot=True)
    env.kube.failing_lists = 4
    listing, failed_at = env.kube.list_namespace, []

    async def list_namespace(namespace):
        try:
            return await listing(namespace)
        except ConnectionError:
            failed_at.append(asyncio.get_running_loop().time())
            raise
    env.kube.list_namespace = list_namespace
    await env.until(lambda: env.phase("vda") == "Copying" and env.phase("vdb") == "Copying")
    env.hv.make_ready("vm", "vda")
    env.hv.make_ready("vm", "vdb")
    await env.until(lambda: all(env.phase(d) == "Pivoted" for d in env.bodies), timeout=60)
    # No pivot while the members could not be listed (whenever a look found them listed
    # again: with a slower API server, right after the last failed listing).
    first_pivot = min(t for t, v, _ in env.hv.calls if v == "pivot")
    assert len(failed_at) == 4 and max(failed_at) < first_pivot
    assert any(t < first_pivot and "cannot be listed" in (b.get("message") or "")
               for t, n, b in env.kube.status_writes if n == "vda")
    await env.finish()


async def test_a_member_claimed_by_another_nodes_agent_is_named_with_its_node(tmp_path):
    """vdb names the same domain and group, but another node's agent claimed it (a VM of
    the same name there): this agent never follows it, and vda's status says where it is."""
    from blockcopy.model.api import NODE_LABEL
    env = Env(tmp_path, followed=("vda",), pivot=True)
    vdb = env.bodies["vdb"]
    vdb["metadata"]["labels"][NODE_LABEL] = "n2"
    vdb["status"] = {"phase": "Mirrored"}
    del env.bodies["vdc"], env.kube.objects[("ns", "vdc")]
    await env.until(lambda: env.phase("vda") == "Copying")
    env.hv.make_ready("vm", "vda")
    await env.until(lambda: "on node n2" in env.kube.status_of("vda").get("message", ""))
    assert env.phase("vda") == "Mirrored" and "pivot" not in env.hv.verbs()
    await env.finish()


async def _both_ready_and_held_as_aliases(env):
    """vda and vdb copy, their mirrors get ready, and each names the other as an alias."""
    await env.until(lambda: env.phase("vda") == "Copying" and env.phase("vdb") == "Copying")
    env.hv.make_ready("vm", "vda")
    env.hv.make_ready("vm", "vdb")
    await env.until(lambda: "names this VM" in env.status("vda").get("message", "")
                    and "names this VM" in env.status("vdb").get("message", ""))


async def test_members_naming_the_vm_by_name_and_by_uuid_hold_each_other(tmp_path):
    """vdb names the VM by its UUID, vda by its name, in the same group: keyed by how they
    name it they would be two groups, each switching alone (the VM split between copies and
    sources). Neither pivots; each says which object names the VM the other way; once the
    alias is deleted, the rest of the group switches."""
    env = Env(tmp_path, disks=("vda", "vdb"), followed=("vda",), pivot=True)
    uuid = env.hv._domain("vm").uuid
    env.bodies["vdb"]["spec"]["domain"] = uuid
    env.follow("vdb")
    await _both_ready_and_held_as_aliases(env)
    await asyncio.sleep(30)
    assert [env.phase(d) for d in ("vda", "vdb")] == ["Mirrored", "Mirrored"]
    assert "pivot" not in env.hv.verbs()
    assert f"vdb names this VM {uuid!r}" in env.status("vda")["message"]
    assert "vda names this VM 'vm'" in env.status("vdb")["message"]
    # vdb aborted (the user's way out): vda's group is vda alone, and it switches.
    env.edit("vdb", pivot=False, abort=True)
    await env.until(lambda: env.phase("vdb") == "Aborted")
    # vdb's end wakes vda (another key, the same group): it switches now, not at its next
    # fallback look.
    await env.until(lambda: env.phase("vda") == "Pivoted", timeout=3)
    assert env.hv.disk("vm", "vdb").source == str(tmp_path / "vdb.qcow2")
    assert env.hv.disk("vm", "vda").source == str(tmp_path / "vda.copy.qcow2")
    await env.finish()


async def test_an_alias_deleted_wakes_the_member_it_held(tmp_path):
    """vdb (naming the VM by its UUID) is deleted while it holds vda: kopf stops vdb's
    daemon, and vda, no longer held (an object being deleted switches nothing), switches
    at once rather than at its next fallback look; vdb's copy ends on its source."""
    env = Env(tmp_path, disks=("vda", "vdb"), followed=("vda",), pivot=True)
    env.bodies["vdb"]["spec"]["domain"] = env.hv._domain("vm").uuid
    own_stop = Stop()
    vdb = asyncio.create_task(env.agent.follow(env.bodies["vdb"], own_stop))
    await _both_ready_and_held_as_aliases(env)
    await asyncio.sleep(30)
    assert env.phase("vda") == "Mirrored" and "pivot" not in env.hv.verbs()
    env.bodies["vdb"]["metadata"]["deletionTimestamp"] = "2026-01-01T00:05:00Z"
    own_stop.set()  # kopf stops the daemon of an object being deleted
    await vdb
    stopped = asyncio.get_running_loop().time()
    pivoted = await env.until(lambda: env.phase("vda") == "Pivoted", timeout=60)
    assert pivoted - stopped < 3, f"vda switched {pivoted - stopped:.1f} s after vdb went"
    assert (await env.agent.cancel_for_deletion(env.bodies["vdb"])).startswith(
        "cancelled the copy")
    assert env.hv.disk("vm", "vdb").source == str(tmp_path / "vdb.qcow2")
    assert env.hv.disk("vm", "vda").source == str(tmp_path / "vda.copy.qcow2")
    await env.finish()


async def test_an_alias_created_after_a_members_look_holds_the_groups_switch(tmp_path):
    """vda's look lists the group (no alias yet) and opens its gate; vdb, naming the VM by
    its UUID in the same group, is created before the switch lists the group again. The
    switch's own gate, on that fresh listing, must see vdb as an alias too: otherwise vda
    pivots alone and vdb, a group of its own, switches later or never (the VM split
    between copies and sources)."""
    env = Env(tmp_path, disks=("vda", "vdb"), followed=("vda",), pivot=True)
    uuid = env.hv._domain("vm").uuid
    vdb = env.kube.objects.pop(("ns", "vdb"))
    vdb["spec"]["domain"] = uuid
    await env.until(lambda: env.phase("vda") == "Copying")
    listing, lists = env.kube.list_namespace, []

    async def list_namespace(namespace):
        listed = await listing(namespace)
        lists.append(len(listed))
        if len(lists) == 1:  # vda's look has its listing: vdb arrives right after
            env.kube.objects[("ns", "vdb")] = vdb
        return listed
    env.kube.list_namespace = list_namespace
    env.hv.make_ready("vm", "vda")
    await env.until(lambda: len(lists) >= 2 and "names this VM" in
                    env.status("vda").get("message", ""))
    await asyncio.sleep(30)
    assert env.phase("vda") == "Mirrored" and "pivot" not in env.hv.verbs()
    await env.finish()


@pytest.mark.parametrize("spelling", [str.upper, lambda u: u.replace("-", "")],
                         ids=["upper-case", "no-hyphens"])
async def test_members_naming_the_vm_by_two_spellings_of_its_uuid_hold_each_other(
        tmp_path, spelling):
    """libvirt reads a UUID in any case, with or without its hyphens: vda and vdb name one
    VM by two spellings of its UUID, two groups by their keys; neither may switch alone."""
    env = Env(tmp_path, disks=("vda", "vdb"), followed=(), pivot=True)
    uuid = env.hv._domain("vm").uuid
    env.bodies["vda"]["spec"]["domain"] = uuid
    env.bodies["vdb"]["spec"]["domain"] = spelling(uuid)
    env.follow("vda")
    env.follow("vdb")
    await _both_ready_and_held_as_aliases(env)
    assert "pivot" not in env.hv.verbs()
    await env.finish()


async def test_a_vm_named_alike_in_another_case_is_not_an_alias():
    """libvirt's names are case-sensitive: "VM" is another VM than "vm" (no hold)."""
    listed = [{"metadata": {"namespace": "ns", "name": "vdb"},
               "spec": {"domain": "VM", "group": "g"}}]
    assert _aliases(listed, ("ns", "g", "1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
                    ("vm", "1b4e28ba-2fa1-11d2-883f-0016d3cca427")) == ()
    assert _aliases(listed, ("ns", "g", "1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
                    ("VM", "1b4e28ba-2fa1-11d2-883f-0016d3cca427")) == (("vdb", "VM"),)
