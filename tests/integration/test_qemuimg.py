"""The qemu-img client (blockcopy.adapters.qemuimg) against the real qemu-img: an NBD export whose
server never answers ends in an ImageError within the probe's timeout, not in a wait
forever (the agent starts copies one at a time: one stuck probe would stop every start)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from blockcopy.adapters import qemuimg
from blockcopy.model.ports import ImageError
from support.agents import free_port

pytestmark = pytest.mark.integration


def test_export_size_of_a_server_that_never_answers_times_out(monkeypatch):
    monkeypatch.setattr(qemuimg, "NBD_PROBE_TIMEOUT", 2.0)
    with socket.socket() as tarpit:  # accepts connections (the backlog), never replies
        tarpit.bind(("127.0.0.1", 0))
        tarpit.listen(8)
        uri = f"nbd://127.0.0.1:{tarpit.getsockname()[1]}/exp"
        started = time.monotonic()
        with pytest.raises(ImageError, match="no answer within 2 s"):
            asyncio.run(qemuimg.QemuImg().export_size(uri))
        assert time.monotonic() - started < 10


def test_export_size_of_a_closed_port_fails_at_once():
    port = free_port()  # nothing listens on it
    started = time.monotonic()
    with pytest.raises(ImageError, match="qemu-img info failed"):
        asyncio.run(qemuimg.QemuImg().export_size(f"nbd://127.0.0.1:{port}/exp"))
    assert time.monotonic() - started < 10
