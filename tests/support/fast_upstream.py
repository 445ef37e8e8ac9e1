"""A fast HTTPS upstream for load tests and benchmarks: aiohttp, answers 200 to every request.

    python -m tests.support.fast_upstream --port 0 --cert C --key K [--require-bearer]

Prints one JSON line {"port": N} when listening. With --require-bearer it answers 401 to any
request whose Authorization is not a Bearer token (so a load run proves conversion).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import sys

from aiohttp import web

BODY = b'{"ok": true}'


def make_app(require_bearer: bool) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if require_bearer and not request.headers.get("authorization", "").startswith("Bearer "):
            return web.Response(status=401, body=b'{"error": "no bearer"}')
        return web.Response(body=BODY, content_type="application/json")

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(port: int, cert: str, key: str, require_bearer: bool) -> None:
    await serve_app(make_app(require_bearer), port, cert, key)


async def serve_app(app: web.Application, port: int, cert: str, key: str) -> None:
    """Serve `app` over TLS on 127.0.0.1:port, print {"port": N}, run until cancelled."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=context, backlog=1024)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(json.dumps({"port": bound}), flush=True)
    await asyncio.Event().wait()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--require-bearer", action="store_true")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.cert, args.key, args.require_bearer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
