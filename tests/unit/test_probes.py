"""The liveness endpoint answers as soon as start() returned (no window of refused
connections after the agent announces it is ready)."""

from __future__ import annotations

import asyncio
import json

from blockcopy.adapters.probes import LivenessServer
from support.agents import free_port


async def _get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_serves_once_start_returns_and_stops_serving_after_stop():
    async def scenario():
        port = free_port()
        server = LivenessServer(host="127.0.0.1", port=port,
                                report=lambda: {"libvirt": "connected"})
        await server.start()
        try:
            status, body = await _get(port, "/healthz")
            assert (status, json.loads(body)) == (200, {"status": "ok", "libvirt": "connected"})
            assert (await _get(port, "/other"))[0] == 404
        finally:
            await server.stop()
        try:
            await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return "refused"
        return "still served"
    assert asyncio.run(scenario()) == "refused"
