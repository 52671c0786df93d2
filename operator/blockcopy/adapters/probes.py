"""The liveness endpoint, served by the agent itself.

kopf can serve one too, but it starts it only after every startup handler returned, so an
agent that logs "agent ready" from its startup handler would announce a port that is not
bound yet (a probe, or a test, right after the line got "connection refused"). Serving it
here lets the agent bind the port first and only then say it is ready.

The probe answers 200 while the event loop runs: a wedged loop is what a restart cures. An
unreachable libvirtd is not (the agent retries it and says so in status), so it is reported
in the body, not in the status code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import aiohttp.web

log = logging.getLogger(__name__)


class LivenessServer:
    """``GET <path>`` → 200 and a small JSON document from ``report()``."""

    def __init__(self, *, host: str, port: int, path: str = "/healthz",
                 report: Callable[[], dict[str, Any]] = dict):
        self._host, self._port, self._path = host, port, path
        self._report = report
        self._runner: aiohttp.web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and serve; returns once the port accepts connections."""
        app = aiohttp.web.Application()
        app.add_routes([aiohttp.web.get(self._path, self._get)])
        runner = aiohttp.web.AppRunner(app, handle_signals=False, access_log=None,
                                       shutdown_timeout=1.0)
        await runner.setup()
        await aiohttp.web.TCPSite(runner, self._host, self._port).start()
        self._runner = runner
        log.info("liveness probe served on http://%s:%d%s", self._host, self._port, self._path)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _get(self, _request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"status": "ok", **self._report()})
