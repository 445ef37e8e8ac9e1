"""The admin HTTP server: /metrics, /healthz, /readyz. On its own port, loopback by default."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.metrics import REGISTRY


@dataclass
class Health:
    listening: bool = False
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.listening and not self.draining


class AdminServer:
    def __init__(self, health: Health, host: str, port: int) -> None:
        self.health = health
        self.host, self.port = host, port
        app = web.Application()
        app.add_routes([
            web.get("/metrics", self.metrics),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
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
        state = "draining" if self.health.draining else "not listening yet"
        return web.Response(status=503, text=f"not ready: {state}\n")
