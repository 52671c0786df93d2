"""The tenant policy: parsing (clear errors), who may copy what, and the follow loop refusing
a forbidden object before any libvirt action (on the FAKES)."""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from blockcopy.core.domainxml import tenant_of
from blockcopy.core.policy import Policy, PolicyError, parse
from blockcopy.runtime.cli import load_policy as load
from support.agent_on_fakes import FakeNode
from support.fakes import Stop

RULES = {"rules": [
    {"namespaces": ["team-a"], "domains": ["web-*"], "destinations": ["/images/a"]},
    {"namespaces": ["team-b*"], "tenant": "b", "destinations": ["/images/b", "/images/shared"]},
]}


@pytest.fixture
def policy() -> Policy:
    return parse(RULES)


def precheck(policy: Policy, namespace: str, dest: str) -> str | None:
    """As the agent asks: with the destination resolved on this file system."""
    return policy.precheck(namespace=namespace, dest=dest, resolved=os.path.realpath(dest))


def test_no_policy_allows_everything():
    assert not Policy().enabled
    assert Policy().check(namespace="x", domain="y", tenant=None, dest="/z",
                          resolved="/z") is None
    assert load(None) == Policy() and load("") == Policy()


def test_namespaces_not_covered_are_refused_before_libvirt(policy):
    refused = precheck(policy, "team-c", "/images/a/x.qcow2")
    assert refused is not None and "'team-c' may not use BlockCopy" in refused
    assert precheck(policy, "team-a", "/images/a/x.qcow2") is None
    assert precheck(policy, "team-b-dev", "/images/shared/x") is None


def test_destinations_are_per_namespace_and_resolved(policy, tmp_path):
    refused = precheck(policy, "team-a", "/images/b/x.qcow2")
    assert refused is not None and "its destination roots are /images/a" in refused
    assert precheck(policy, "team-a", "/images/a/../b/x.qcow2") is not None
    # Symlinks are resolved by the caller; the policy compares what it is given.
    link = tmp_path / "a-link"
    link.symlink_to("/images/b")
    rooted = parse({"rules": [{"namespaces": ["t"], "domains": ["*"],
                               "destinations": ["/images/a"]}]})
    assert precheck(rooted, "t", str(link / "x.qcow2")) is not None


def test_a_network_destination_is_under_no_root(policy, tmp_path, monkeypatch):
    """Not a path relative to the agent's working directory (it was: with the agent started
    in /images/a, an NBD export counted as under that root)."""
    for cwd in ("/", "/images/a"):
        (tmp_path / cwd.lstrip("/")).mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(tmp_path / cwd.lstrip("/"))
        rooted = parse({"rules": [{"namespaces": ["team-a"], "domains": ["*"],
                                   "destinations": [str(tmp_path / cwd.lstrip("/"))]}]})
        for dest in ("nbd://10.0.0.1:10809/exp", "nbd+unix:///exp?socket=/run/n.sock"):
            refused = rooted.precheck(namespace="team-a", dest=dest, resolved=dest)
            assert refused is not None and "may not write" in refused, (cwd, dest)


def test_domains_by_name_pattern_or_by_tenant(policy):
    ok = {"tenant": None, "dest": "/images/a/x", "resolved": "/images/a/x"}
    assert policy.check(namespace="team-a", domain="web-1", **ok) is None
    refused = policy.check(namespace="team-a", domain="db-1", **ok)
    assert refused is not None and "may not act on domain 'db-1'" in refused
    b = {"dest": "/images/b/x", "resolved": "/images/b/x"}
    assert policy.check(namespace="team-b", domain="anything", tenant="b", **b) is None
    assert policy.check(namespace="team-b", domain="anything", tenant="a", **b) is not None
    assert policy.check(namespace="team-b", domain="anything", tenant=None, **b) is not None


@pytest.mark.parametrize("raw, message", [
    ([], "a mapping with a list under 'rules'"),
    ({"rules": [{"namespaces": ["a"], "domains": ["x"]}]},
     "rules[0].destinations must be a list of non-empty strings"),
    ({"rules": [{"namespaces": [], "domains": ["x"], "destinations": ["/d"]}]},
     "needs namespaces and destinations"),
    ({"rules": [{"namespaces": ["a"], "destinations": ["/d"]}]}, "needs domains or a tenant"),
    ({"rules": [{"namespaces": ["a"], "domains": ["x"], "destinations": ["rel"]}]},
     "must be absolute"),
    ({"rules": [{"namespaces": "a", "domains": ["x"], "destinations": ["/d"]}]},
     "must be a list of non-empty strings"),
    ({"rules": [{"namespaces": ["a"], "domains": ["x"], "destinations": ["/d"],
                 "dest": "/typo"}]}, "unknown keys ['dest']"),
])
def test_invalid_policies_say_what_is_wrong(raw, message):
    with pytest.raises(PolicyError, match=re.escape(message)):
        parse(raw)


def test_load_reads_yaml(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("rules:\n- namespaces: [a]\n  domains: ['*']\n  destinations: [/d]\n")
    assert load(str(path)).rules[0].namespaces == ("a",)
    path.write_text("rules: [\n")
    with pytest.raises(PolicyError, match="not YAML"):
        load(str(path))


def test_tenant_comes_from_the_domains_metadata():
    xml = """<domain><name>vm</name><metadata>
      <other:x xmlns:other="https://example.com/x" tenant="nope"/>
      <blockcopy:policy xmlns:blockcopy="https://blockcopy.dev/policy/v1" tenant="team-a"/>
      </metadata></domain>"""
    assert tenant_of(xml) == "team-a"
    assert tenant_of("<domain><name>vm</name></domain>") is None


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_forbidden_object_fails_without_any_libvirt_action(tmp_path):
    allowed = tmp_path / "images" / "a"
    allowed.mkdir(parents=True)
    policy = parse({"rules": [{"namespaces": ["ns"], "domains": ["web-*"],
                               "destinations": [str(allowed)]}]})
    node = FakeNode(tmp_path, policy=policy)
    hv, kube, agent = node.hv, node.kube, node.agent
    hv.add_domain("db-1")
    body = node.add("bc", {"domain": "db-1", "disk": "vda", "dest": str(allowed / "c.qcow2")})
    await asyncio.wait_for(agent.follow(body, Stop()), 10)
    status = kube.status_of("bc")
    assert status["phase"] == "Failed"
    assert "may not act on domain 'db-1'" in status["message"]
    assert [c["reason"] for c in status["conditions"] if c["type"] == "Failed"] == ["Forbidden"]
    assert hv.verbs() == ["observe"]  # a read-only look at the domain, nothing else
    outside = node.add("bc2", {"domain": "web-1", "disk": "vda",
                               "dest": str(tmp_path / "c.qcow2")})
    await asyncio.wait_for(agent.follow(outside, Stop()), 10)
    assert kube.status_of("bc2")["phase"] == "Failed"
    # Both refusals say where they come from (before libvirt, and after the look).
    assert all(kube.status_of(n)["message"].endswith("(the agent's policy); nothing was "
                                                     "started") for n in ("bc", "bc2"))
    assert hv.verbs() == ["observe"]  # refused before libvirt was asked anything
    await agent.recorder.drain()
    assert [e.type for e in kube.events] == ["Warning", "Warning"]
