"""A wss endpoint that records every WebSocket message it gets and answers none: it shows
exactly which bytes keyless let through (the fake namespace interprets them instead)."""

from __future__ import annotations

import asyncio
import ssl
import threading
from typing import Self

from aiohttp import WSMsgType, web

from tests.support.azurite import TestPKI, free_port


class RecordingWebSocket:
    def __init__(self, pki: TestPKI, namespace: str) -> None:
        self.pki, self.namespace = pki, namespace
        self.wss_port = free_port()
        self.upgrades: list[str] = []  # the path of each upgrade
        self.messages: list[bytes] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def recorded(self) -> list[bytes]:
        with self._lock:
            return list(self.messages)

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=["AMQPWSB10"])
        await ws.prepare(request)
        with self._lock:
            self.upgrades.append(request.path)
        async for message in ws:
            if message.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                data = message.data if isinstance(message.data, bytes) else message.data.encode()
                with self._lock:
                    self.messages.append(data)
        return ws

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/$servicebus/websocket", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*self.pki.issue_server_cert(self.namespace))
        await web.TCPSite(self._runner, "127.0.0.1", self.wss_port, ssl_context=context).start()

    def start(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
