"""The admin HTTP server: /metrics, /healthz, /readyz, /report. On its own port, loopback by
default.

Probes and Prometheus must reach it from outside the pod, so the image listens on all
interfaces. /healthz, /readyz and /metrics answer anyone who reaches the port: they carry no
secret (metrics labels are bounded: service names, outcomes, identity client ids and scopes,
which are identifiers, not credentials). /report lists the app's Azure resources, the
identities and the role assignments to create: a map of the deployment, so it answers only
loopback clients (the pod itself, `kubectl port-forward`) and clients that send the
operator's `--admin-token-file` secret as a bearer token.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.dial import ip_address
from proxy.metrics import REGISTRY

logger = logging.getLogger(__name__)
MIN_TOKEN_LENGTH = 16


class AdminTokenError(ValueError):
    pass


def read_admin_token(path: Path | None) -> str | None:
    """The /report bearer secret from `path` (surrounding whitespace dropped), or None."""
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise AdminTokenError(f"cannot read --admin-token-file {path}: {reason}") from None
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() or not c.isprintable() for c in token):
        raise AdminTokenError(
            f"--admin-token-file {path}: expected one secret of at least {MIN_TOKEN_LENGTH} "
            "printable characters without spaces")
    return token


def from_loopback(request: web.Request) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    address = ip_address(str(peer[0])) if peer else None
    return address is not None and address.is_loopback


def bearer_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


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
                 report: Callable[[], dict[str, Any]] = dict,
                 report_token: str | None = None,
                 exposition: Callable[[], bytes] = lambda: generate_latest(REGISTRY)) -> None:
        self.health = health
        self.exposition = exposition  # --workers: the supervisor sums the workers' metrics
        self.report_data = report
        self._report_token = report_token.encode() if report_token else None
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
            body=self.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
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

    async def report(self, request: web.Request) -> web.Response:
        if not from_loopback(request):
            given = bearer_token(request)
            if given is None:
                logger.warning("admin: /report refused to %s: no bearer token", request.remote)
                return web.Response(status=401, text="unauthorized\n",
                                    headers={"WWW-Authenticate": "Bearer"})
            # constant time; a None secret (none configured) matches nothing
            expected = self._report_token or b"\0"
            if not hmac.compare_digest(given.encode(), expected) or not self._report_token:
                logger.warning("admin: /report refused to %s: wrong token", request.remote)
                return web.Response(status=403, text="forbidden\n")
        return web.json_response(self.report_data())
