"""Disk layouts on the FAKES (fake clock): a base at any depth, a chain move with the pivot
held for the lower images, NBD destinations, and the space check. What the agent asks of
libvirt and qemu-img, in which order, and what it records first. The e2e tests run the same
on real images."""

from __future__ import annotations

import pytest

from blockcopy.model.api import Flag
from support.agent_on_fakes import FakeNode

pytestmark = [pytest.mark.asyncio, pytest.mark.looptime]
NODE = "n1"


class Env(FakeNode):
    """One VM whose disk has a chain top -> l1 -> l2 -> b, and one BlockCopy "bc"."""

    def __init__(self, tmp_path, **config):
        super().__init__(tmp_path, node=NODE, **config)
        (tmp_path / "new").mkdir()
        self.dom = self.hv.add_domain("vm", disks={"vda": str(tmp_path / "top.qcow2")})
        self.disk = self.hv.disk("vm")
        self.disk.chain = tuple(str(tmp_path / n) for n in ("l1.qcow2", "l2.qcow2", "b.qcow2"))

    def follow(self, **spec) -> dict:
        body = self.add("bc", {"domain": "vm", "disk": "vda", **spec})
        super().follow(body)
        return body

    def status(self, name: str = "bc") -> dict:
        return super().status(name)

    async def phase(self, phase):
        return await self.reach("bc", phase)


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def reason(status: dict) -> str:
    return next(c["reason"] for c in status["conditions"] if c["type"] == "Failed")


async def test_a_deeper_base_prepares_the_destination_then_mirrors_shallowly(env):
    dest = str(env.root / "new" / "d.qcow2")
    base = env.disk.chain[2]
    env.follow(dest=dest, base=base, pivot=True)
    await env.phase("Copying")
    # The plan was recorded (its own write, the Preparing phase) before anything was created.
    first = next(b for _, _, b in env.kube.status_writes if b.get("phase") == "Preparing")
    assert first["plan"] == {"kind": "base", "chain": [env.disk.source, *env.disk.chain],
                             "targets": [dest]}
    assert first["createdFiles"] == [dest]
    assert env.kube.phases_written("bc")[:2] == ["Preparing", "Copying"]
    assert [v for v in env.images.verbs() if v != "info"] == ["create", "rebase"]
    _, create = env.images.calls[0]
    assert create[0] == dest and create[3] == env.disk.chain[0]  # backed by the top's backing
    assert env.images.calls[1][1][:2] == (dest, base)  # then rebased onto the base
    (request,) = [args[0] for _, verb, args in env.hv.calls if verb == "start_copy"]
    assert request.flags >= {Flag.SHALLOW, Flag.REUSE_EXTERNAL} and request.format == "qcow2"
    env.hv.make_ready("vm")
    await env.phase("Pivoted")
    await env.finish()


async def test_a_base_outside_the_chain_is_refused_before_anything_is_created(env):
    dest = env.root / "new" / "d.qcow2"
    env.follow(dest=str(dest), base=str(env.root / "other.qcow2"))
    status = await env.phase("Failed")
    assert reason(status) == "BaseNotInChain"
    assert env.images.calls == [] and "start_copy" not in env.hv.verbs()
    assert not dest.exists()


async def test_the_chain_is_checked_again_right_before_the_job(env):
    dest = str(env.root / "new" / "d.qcow2")

    original_rebase = env.images.rebase

    async def rebase_then_the_chain_changes(*a, **kw):
        await original_rebase(*a, **kw)
        env.disk.chain = env.disk.chain[1:]  # someone commits a layer meanwhile
    env.images.rebase = rebase_then_the_chain_changes
    env.follow(dest=dest, base=env.disk.chain[2])
    status = await env.phase("Failed")
    assert reason(status) == "ChainChanged" and "start_copy" not in env.hv.verbs()
    assert status["createdFiles"] == [dest]  # listed, never deleted


async def test_a_restarted_agent_finishes_the_recorded_plan(env):
    dest = str(env.root / "new" / "d.qcow2")
    base = env.disk.chain[2]
    env.images.fail = {"rebase": "killed"}  # the first agent dies while rebasing
    env.follow(dest=dest, base=base)
    status = await env.phase("Failed")
    assert reason(status) == "PreparationFailed"
    # A restart while Preparing (status says so) finishes the same plan.
    env.kube.objects[("ns", "bc")]["status"] = {
        "phase": "Preparing", "plan": status["plan"], "createdFiles": status["createdFiles"]}
    env.images.fail = {}
    env.images.calls.clear()
    await env.restart()
    FakeNode.follow(env, env.body("bc"))
    await env.phase("Copying")
    assert [v for v in env.images.verbs() if v != "info"] == ["create", "rebase"]
    await env.finish()


async def test_a_chain_move_holds_the_pivot_until_every_layer_is_verified(env):
    dest = str(env.root / "new" / "top.qcow2")
    env.follow(dest=dest, backingChain="copy", pivot=True)
    await env.phase("Copying")
    targets = [str(env.root / "new" / n) for n in ("top.qcow2", "l1.qcow2", "l2.qcow2",
                                                    "b.qcow2")]
    assert env.status()["plan"]["targets"] == targets
    creates = [args for verb, args in env.images.calls if verb == "create"]
    # Placeholders from the bottom up, each backed by the one below under a relative name.
    assert [(c[0], c[3]) for c in creates] == [
        (targets[3], None), (targets[2], "b.qcow2"), (targets[1], "l2.qcow2"),
        (targets[0], "l1.qcow2")]
    env.hv.make_ready("vm")  # the top is mirrored before the layers are copied
    await env.until(lambda: any(c.get("reason") == "WaitingForLayers"
                                for c in env.status().get("conditions", [])))
    assert env.status()["phase"] == "Mirrored" and "pivot" not in env.hv.verbs()
    await env.phase("Pivoted")
    layers = env.status()["layers"]
    assert [(layer["source"], layer["state"]) for layer in layers] == [
        (p, "Verified") for p in env.disk.chain]
    # Copied and verified from the bottom up, and only then the pivot.
    verified = [args[0] for verb, args in env.images.calls if verb == "identical"]
    assert verified == list(reversed(env.disk.chain))
    # The last qemu-img call before the pivot's own check (data_map) verified a layer.
    assert [v for v in env.images.verbs() if v != "data_map"][-1] == "identical"
    assert env.hv.verbs().count("pivot") == 1
    assert sorted(env.status()["createdFiles"]) == sorted(targets)
    await env.finish()


async def test_a_layer_that_does_not_verify_ends_the_job_on_the_source(env):
    dest = str(env.root / "new" / "top.qcow2")
    env.images.differ = {env.disk.chain[1]}
    env.follow(dest=dest, backingChain="copy", pivot=True)
    await env.phase("Copying")
    env.hv.make_ready("vm")
    status = await env.phase("Failed")
    assert reason(status) == "LayerCopyFailed" and "Content mismatch" in status["message"]
    assert "cancel" in env.hv.verbs() and "pivot" not in env.hv.verbs()
    assert env.disk.source == str(env.root / "top.qcow2") and env.disk.job is None
    assert len(status["createdFiles"]) == 4


async def test_nbd_destinations_must_be_allowed_and_the_same_size(tmp_path):
    uri = "nbd://127.0.0.1:10900/exp"
    env = Env(tmp_path)
    env.follow(dest=uri)
    status = await env.phase("Failed")
    assert reason(status) == "DestNotAllowed" and env.hv.verbs() == []

    (tmp_path / "b").mkdir()
    env = Env(tmp_path / "b", allowed_network_dests=("127.0.0.1:10900",))
    env.images.export_sizes[uri] = env.disk.size - 4096
    env.follow(dest=uri)
    assert reason(await env.phase("Failed")) == "DestNoSpace"
    assert "start_copy" not in env.hv.verbs()

    (tmp_path / "c").mkdir()
    env = Env(tmp_path / "c", allowed_network_dests=("127.0.0.1:10900",))
    env.images.export_sizes[uri] = env.disk.size
    env.follow(dest=uri, pivot=True)
    await env.phase("Copying")
    (request,) = [args[0] for _, verb, args in env.hv.calls if verb == "start_copy"]
    assert request.network is not None and request.network.uri == uri
    assert request.format == "raw" and Flag.REUSE_EXTERNAL in request.flags
    env.hv.make_ready("vm")
    await env.phase("Pivoted")
    assert env.disk.source == uri
    await env.finish()


async def test_no_copy_starts_that_cannot_fit(env):
    env.disk.allocation = 1 << 60  # an exabyte of data: no file system here holds that
    env.disk.size = 1 << 60
    dest = env.root / "new" / "d.qcow2"
    env.follow(dest=str(dest))
    status = await env.phase("Failed")
    assert reason(status) == "DestNoSpace" and "free" in status["message"]
    assert "start_copy" not in env.hv.verbs() and not dest.exists()
