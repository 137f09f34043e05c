"""The HTTP endpoint Prometheus scrapes: GET /metrics (and /healthz for probes).

The sidecar's workers bind it together (SO_REUSEPORT); in multiprocess mode every one of them
answers with the sum over all workers.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..config import parse_address
from .metrics import exposition

log = logging.getLogger("extproc.metrics")


async def _metrics(_request: web.Request) -> web.Response:
    # Reading the workers' files (multiprocess mode) is disk I/O: not on the event loop.
    body = await asyncio.to_thread(exposition)
    return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})


async def _healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


class MetricsServer:
    def __init__(self, listen: str, reuse_port: bool = False) -> None:
        self.listen = listen
        self.reuse_port = reuse_port  # the sidecar's workers all serve the same address
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", _metrics)
        app.router.add_get("/healthz", _healthz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = parse_address(self.listen)
        site = web.TCPSite(self._runner, host, port, reuse_port=self.reuse_port)
        await site.start()
        addresses = self._runner.addresses  # (host, port, ...) of each bound socket
        self.port = addresses[0][1] if addresses else port
        log.info("metrics on http://%s:%s/metrics", host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
