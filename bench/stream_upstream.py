"""An HTTPS upstream for large transfers: it never holds a body in memory.

    python -m bench.stream_upstream --port 0 --cert C --key K

PUT/POST: reads the body in chunks and answers {"received": N}. GET ?size=N: streams N bytes.
Any request whose Authorization is not a Bearer token gets 401 (so a run through keyless
proves conversion). Prints one JSON line {"port": N} when listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from aiohttp import web

from tests.support.fast_upstream import serve_app

CHUNK = b"\x5a" * (1 << 20)


async def handle(request: web.Request) -> web.StreamResponse:
    if not request.headers.get("authorization", "").startswith("Bearer "):
        await request.read()
        return web.Response(status=401, body=b'{"error": "no bearer"}')
    if request.method in ("PUT", "POST"):
        received = 0
        async for chunk in request.content.iter_chunked(1 << 20):
            received += len(chunk)
        return web.json_response({"received": received})
    size = int(request.query.get("size", "0"))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    left = size
    while left > 0:
        piece = CHUNK if left >= len(CHUNK) else CHUNK[:left]
        await response.write(piece)
        left -= len(piece)
    await response.write_eof()
    return response


async def serve(port: int, cert: str, key: str) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    await serve_app(app, port, cert, key)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.cert, args.key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
