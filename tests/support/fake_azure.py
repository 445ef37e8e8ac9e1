"""One HTTPS server on loopback that plays the Azure services no emulator covers here.

keyless dials it through `--connect-to` while the app keeps real Azure host names. Each
service is a handler chosen by the Host header. Before a handler answers, the server checks
the converted request the way the service would (see `Expect`): the exact auth form, no
leftover key material anywhere, and a token an Entra-protected service accepts: signed by the
tests' Entra issuer (tests/support/entra.py `verify`), right issuer and audience, within its
`nbf`..`exp` window, issued to the identity the route names (`appid`, `oid`). A
failed check answers 401 with the problems in a JSON error (so the SDK call fails loudly) and
is recorded in `problems`.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from tests.support.entra import verify
from tests.support.upstreams import ThreadedHTTPServer

# Every name or parameter that carries key material in some Azure scheme. None may survive.
KEY_HEADERS = ("api-key", "ocp-apim-subscription-key", "aeg-sas-key", "aeg-sas-token",
               "subscription-key")
KEY_QUERY = ("sig", "se", "skn", "sv", "aeg-sas-key", "subscription-key", "api-key", "code",
             "sr")
KEY_AUTH_SCHEMES = ("sharedkey", "sharedkeylite", "sharedaccesssignature", "hmac-sha256")


@dataclass
class FakeRequest:
    method: str
    host: str  # from the Host header, without port
    path: str  # raw path with query
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def query(self) -> list[tuple[str, str]]:
        return parse_qsl(urlsplit(self.path).query, keep_blank_values=True)

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class FakeResponse:
    status: int = 200
    body: bytes | Iterable[bytes] = b""
    headers: dict[str, str] = field(default_factory=dict)
    # for streamed bodies (server-sent events): seconds to wait before each chunk
    chunk_delay: float = 0.0

    @classmethod
    def json(cls, data: Any, status: int = 200, **headers: str) -> FakeResponse:
        return cls(status, json.dumps(data).encode(),
                   {"content-type": "application/json", **headers})


@dataclass
class Expect:
    """How a service wants the converted request to look."""

    audience: str  # the token's `aud`
    auth_format: str = "bearer"  # "bearer" or "cosmos"
    client_id: str | None = None  # the identity (token `appid`/`oid`); None: any of the tenant
    extra_checks: tuple[Callable[[FakeRequest], list[str]], ...] = ()


def token_of(request: FakeRequest, auth_format: str) -> tuple[str | None, list[str]]:
    value = request.header("authorization")
    if value is None:
        return None, ["no Authorization header"]
    if auth_format == "cosmos":
        # The gateway URL-decodes the header: the SDK's own Entra form is not encoded.
        match = re.fullmatch(r"type=aad&ver=1\.0&sig=(.+)", unquote(value))
        if not match:
            return None, [f"authorization is not type=aad&ver=1.0&sig=… (URL-encoded): "
                          f"{value[:30]!r}"]
        return match.group(1), []
    if not value.startswith("Bearer "):
        return None, [f"authorization is not Bearer: {value[:20]!r}"]
    return value[len("Bearer "):], []


def leftover_key_material(request: FakeRequest) -> list[str]:
    problems = []
    for name in KEY_HEADERS:
        if request.header(name) is not None:
            problems.append(f"key header {name} left in the request")
    for name, _ in request.query:
        if name.lower() in KEY_QUERY:
            problems.append(f"key query parameter {name} left in the request")
    for key, value in request.headers:
        if key.lower() == "authorization" and value.split(" ", 1)[0].lower() in KEY_AUTH_SCHEMES:
            problems.append(f"key-based Authorization {value.split(' ', 1)[0]} left")
    return problems


def check(request: FakeRequest, expect: Expect) -> list[str]:
    problems = leftover_key_material(request)
    token, token_problems = token_of(request, expect.auth_format)
    problems += token_problems
    if token is not None:
        problems += verify(token, expect.audience, expect.client_id)
    for extra in expect.extra_checks:
        problems += extra(request)
    return problems


Handler = Callable[[FakeRequest], FakeResponse]


@dataclass
class Service:
    host_pattern: re.Pattern[str]
    expect: Expect | None  # None: no auth check (the handler decides)
    handler: Handler


class FakeAzure(ThreadedHTTPServer):
    def __init__(self, cert_and_key: tuple[str, str]) -> None:
        self.services: list[Service] = []
        self.requests: list[FakeRequest] = []
        self.problems: list[tuple[str, str, list[str]]] = []  # (host, path, problems)
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*cert_and_key)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]

    def add(self, host_regex: str, expect: Expect | None, handler: Handler) -> None:
        """Serve hosts matching `host_regex` (full match) with `handler`, checked by `expect`."""
        self.services.append(Service(re.compile(host_regex), expect, handler))

    def requests_for(self, host: str) -> list[FakeRequest]:
        with self._lock:
            return [r for r in self.requests if r.host == host]

    def handle(self, request: FakeRequest) -> FakeResponse:
        with self._lock:
            self.requests.append(request)
        for service in self.services:
            if service.host_pattern.fullmatch(request.host):
                if service.expect is not None:
                    problems = check(request, service.expect)
                    if problems:
                        with self._lock:
                            self.problems.append((request.host, request.path, problems))
                        return FakeResponse.json(
                            {"error": {"code": "FakeAzureCheckFailed",
                                       "message": "; ".join(problems)}}, status=401)
                return service.handler(request)
        return FakeResponse.json({"error": {"code": "NoFakeForHost",
                                            "message": request.host}}, status=404)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeAzure


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        host = (self.headers.get("host") or "").rsplit(":", 1)[0] if not (
            self.headers.get("host") or "").startswith("[") else self.headers["host"]
        request = FakeRequest(self.command, host.lower(), self.path,
                              list(self.headers.items()), self._read_body())
        response = self.server.fake.handle(request)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        if isinstance(response.body, bytes):
            self.send_header("content-length", str(len(response.body)))
            self.end_headers()
            self.wfile.write(response.body)
            return
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for chunk in _iterate(response.body):
            if response.chunk_delay:
                time.sleep(response.chunk_delay)
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _serve


def _iterate(body: Iterable[bytes]) -> Iterator[bytes]:
    yield from body
