"""The agent writes its version into every status it builds (status.agentVersion, which
`kubectl blockcopy version` lists per node), on the fake hypervisor and API of
tests/support/fakes.py. Read back through the real API server:
tests/e2e/test_kubectl_output_on_server.py."""

from __future__ import annotations

import pytest

import blockcopy
from support.agent_on_fakes import FakeNode

pytestmark = [pytest.mark.asyncio, pytest.mark.looptime]


async def test_every_status_write_carries_the_agents_version(tmp_path):
    node = FakeNode(tmp_path, node="node-1", status_interval=1.0, poll_interval=5.0)
    node.hv.add_domain("vm")
    body = node.add("bc", {"domain": "vm", "disk": "vda", "dest": str(tmp_path / "c.qcow2")})
    node.follow(body)
    await node.until(lambda: node.phase("bc") == "Copying")
    node.hv.make_ready("vm")
    await node.until(lambda: node.phase("bc") == "Mirrored")
    writes = [status for _, name, status in node.kube.status_writes if name == "bc"]
    phased = [w for w in writes if "phase" in w]
    assert len(phased) >= 2
    assert all(w["agentVersion"] == blockcopy.__version__ and w["nodeName"] == "node-1"
               for w in phased), phased
    assert node.kube.status_of("bc")["agentVersion"] == blockcopy.__version__
