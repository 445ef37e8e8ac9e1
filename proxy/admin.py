"""The admin HTTP server: /metrics, /healthz, /readyz. On its own port, loopback by default."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.metrics import REGISTRY


@dataclass
class Health:
    listening: bool = False
    draining: bool = False
    tokens_ready: Callable[[], bool] = lambda: True  # --ready-scopes cached?

    @property
    def ready(self) -> bool:
        return self.listening and not self.draining and self.tokens_ready()


class AdminServer:
    def __init__(self, health: Health, host: str, port: int,
                 report: Callable[[], dict[str, Any]] = dict) -> None:
        self.health = health
        self.report_data = report
        self.host, self.port = host, port
        app = web.Application()
        app.add_routes([
            web.get("/metrics", self.metrics),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/report", self.report),
        ])
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, _request: web.Request) -> web.Response:
        if self.health.ready:
            return web.Response(text="ready\n")
        if self.health.draining:
            state = "draining"
        elif not self.health.listening:
            state = "not listening yet"
        else:
            state = "waiting for the initial tokens (--ready-scopes)"
        return web.Response(status=503, text=f"not ready: {state}\n")

    async def report(self, _request: web.Request) -> web.Response:
        return web.json_response(self.report_data())
