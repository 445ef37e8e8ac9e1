"""Fake managed-identity token endpoint: the App Service protocol, or IMDS.

azure-identity's ManagedIdentityCredential picks the App Service flavour when
IDENTITY_ENDPOINT and IDENTITY_HEADER are set, then sends

    GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=<resource>[&client_id=<id>]
    X-IDENTITY-HEADER: <secret>

With `protocol="imds"` the server plays the Instance Metadata Service of VMs and AKS
pod-managed identity instead; AZURE_POD_IDENTITY_AUTHORITY_HOST points azure-identity at it
(in place of 169.254.169.254, and without the availability probe):

    GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=<resource>[&client_id=<id>]
    Metadata: true

Tokens are signed by tests/support/entra.py's issuer key (`mint`), so the fake services
verify them like Entra-protected services do; Azurite's `--oauth basic` mode only decodes
them and checks iss/aud/nbf/exp.

Standalone use (prints the env vars as one JSON line, serves until killed):

    python tests/support/identity_endpoint.py --port 0
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, Self, get_args
from urllib.parse import parse_qs, urlsplit

if __package__ in (None, ""):  # run as a script: make `tests.support` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.entra import (
    OBJECT_ID,
    SYSTEM_ASSIGNED_CLIENT_ID,
    TENANT_ID,
    decode,
    mint,
)

__all__ = [
    "API_VERSION",
    "IMDS_API_VERSION",
    "IMDS_TOKEN_PATH",
    "MODES",
    "OBJECT_ID",
    "SYSTEM_ASSIGNED_CLIENT_ID",
    "TENANT_ID",
    "TOKEN_PATH",
    "FakeIdentityEndpoint",
    "Mode",
    "Protocol",
    "decode",
    "make_token",
]

API_VERSION = "2019-08-01"
TOKEN_PATH = "/msi/token"
IMDS_API_VERSION = "2018-02-01"
IMDS_TOKEN_PATH = "/metadata/identity/oauth2/token"

Mode = Literal["ok", "error", "throttle", "slow", "drop"]
MODES: tuple[str, ...] = get_args(Mode)
Protocol = Literal["app-service", "imds"]

# Query parameters that select a user-assigned identity; all are recorded.
_IDENTITY_PARAMS = ("client_id", "principal_id", "mi_res_id", "object_id")


def make_token(
    resource: str,
    client_id: str | None = None,
    lifetime: int = 3600,
    *,
    now: int | None = None,
) -> str:
    """An access token for `resource` (verbatim `aud`) issued to `client_id` (default: the
    system-assigned identity), signed by the tests' Entra issuer (tests/support/entra.py)."""
    return mint(resource, client_id, lifetime, now=now)


class _Server(ThreadingHTTPServer):
    # Handler threads must never keep the test process alive (e.g. "slow" mode).
    daemon_threads = True
    block_on_close = False
    endpoint: FakeIdentityEndpoint


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes every request to stderr, which drowns test output.
        pass

    def do_GET(self) -> None:
        self.server.endpoint._handle(self)

    def send_json(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _error_body(status: int, code: str, message: str) -> dict[str, Any]:
    return {"statusCode": status, "error": code, "message": message}


class FakeIdentityEndpoint:
    """A real HTTP token endpoint on 127.0.0.1 for ManagedIdentityCredential.

    `protocol`: "app-service" (IDENTITY_ENDPOINT/IDENTITY_HEADER) or "imds"
    (AZURE_POD_IDENTITY_AUTHORITY_HOST). `mode`, `lifetime_seconds` and `delay_seconds` may
    be changed while the server runs; each request reads them when it arrives.
    """

    decode = staticmethod(decode)

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        lifetime_seconds: int = 3600,
        mode: Mode = "ok",
        delay_seconds: float = 2.0,
        secret: str | None = None,
        protocol: Protocol = "app-service",
    ) -> None:
        if protocol not in get_args(Protocol):
            raise ValueError(f"protocol must be one of {get_args(Protocol)}, got {protocol!r}")
        self.protocol: Protocol = protocol
        self.host = host
        self.port = port
        self.secret: str = secret or secrets.token_urlsafe(24)
        self.lifetime_seconds = lifetime_seconds
        self.delay_seconds = delay_seconds
        self._mode: Mode = "ok"
        self.mode = mode
        self._lock = threading.Lock()
        self._calls: list[dict[str, Any]] = []
        self._issued: list[str] = []
        self._queued: dict[str, list[str]] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("FakeIdentityEndpoint already started")
        server = _Server((self.host, self.port), _Handler)
        server.endpoint = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-identity-endpoint:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- configuration -----------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, value: Mode) -> None:
        # Reject typos loudly; a misspelt mode would silently behave as "ok".
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        self._mode = value

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeIdentityEndpoint not started")
        path = IMDS_TOKEN_PATH if self.protocol == "imds" else TOKEN_PATH
        return f"http://{self.host}:{self.port}{path}"

    def env(self) -> dict[str, str]:
        """Environment that makes ManagedIdentityCredential use this server."""
        if self.protocol == "imds":
            return {"AZURE_POD_IDENTITY_AUTHORITY_HOST": f"http://{self.host}:{self.port}"}
        return {"IDENTITY_ENDPOINT": self.url, "IDENTITY_HEADER": self.secret}

    # -- records (snapshots: safe to iterate while requests arrive) ---------

    @property
    def calls(self) -> list[dict[str, Any]]:
        """One dict per request: resource, client_id, time, status, and the
        other identity selectors (principal_id, mi_res_id, object_id).
        status is None when the connection was dropped without an answer."""
        with self._lock:
            return [dict(c) for c in self._calls]

    @property
    def issued(self) -> list[str]:
        with self._lock:
            return list(self._issued)

    def queue_tokens(self, resource: str, *tokens: str) -> None:
        """Hand out these tokens (made with `make_token`), in order, for `resource` before
        minting new ones: a database test sets a user's password to the token keyless will
        get. The answer's expiry is the token's own `exp`."""
        with self._lock:
            self._queued.setdefault(resource, []).extend(tokens)

    def calls_for(self, resource: str) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["resource"] == resource]

    def reset(self) -> None:
        with self._lock:
            self._calls.clear()
            self._issued.clear()

    # -- request handling (runs on server threads) ---------------------------

    def _handle(self, req: _Handler) -> None:
        split = urlsplit(req.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        record: dict[str, Any] = {
            "resource": query.get("resource"),
            "time": time.time(),
            "status": None,
            "path": split.path,
            "api_version": query.get("api-version"),
        }
        for name in _IDENTITY_PARAMS:
            record[name] = query.get(name)
        with self._lock:
            self._calls.append(record)
        # Read the mode once so a concurrent change can't split one request.
        mode = self.mode

        def reply(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            with self._lock:
                record["status"] = status
            req.send_json(status, body, headers)

        refusal = (self._refuse_imds(req, split.path, record) if self.protocol == "imds"
                   else self._refuse_app_service(req, split.path, record))
        if refusal is not None:
            reply(*refusal)
            return

        if mode == "drop":
            # Send nothing; the server then closes the socket, so the client
            # sees the connection end with no status line at all.
            req.close_connection = True
            return
        if mode == "error":
            reply(
                500,
                _error_body(500, "internal_error", "fake identity endpoint is in error mode"),
            )
            return
        if mode == "throttle":
            reply(
                429,
                _error_body(429, "throttled", "too many requests"),
                {"Retry-After": "1"},
            )
            return
        if mode == "slow":
            time.sleep(self.delay_seconds)

        client_id = record["client_id"]
        lifetime = self.lifetime_seconds
        now = int(time.time())
        with self._lock:
            queued = self._queued.get(record["resource"] or "")
            token = queued.pop(0) if queued else None
        if token is None:
            token = make_token(record["resource"], client_id, lifetime, now=now)
        else:
            lifetime = int(decode(token)["exp"]) - now
        with self._lock:
            self._issued.append(token)
        if self.protocol == "imds":
            # IMDS answers every field as a string, and both expires_in and resource.
            reply(200, {
                "access_token": token,
                "client_id": client_id or SYSTEM_ASSIGNED_CLIENT_ID,
                "expires_in": str(lifetime),
                "expires_on": str(now + lifetime),
                "ext_expires_in": str(lifetime),
                "not_before": str(now - 300),
                "resource": record["resource"],
                "token_type": "Bearer",
            })
            return
        reply(
            200,
            {
                "access_token": token,
                # App Service sends epoch seconds as a string; keep that quirk.
                "expires_on": str(now + lifetime),
                "resource": record["resource"],
                "token_type": "Bearer",
                "client_id": client_id or SYSTEM_ASSIGNED_CLIENT_ID,
            },
        )

    def _refuse_app_service(
        self, req: _Handler, path: str, record: dict[str, Any]
    ) -> tuple[int, dict[str, Any]] | None:
        if path != TOKEN_PATH:
            return 404, _error_body(404, "not_found", f"no such path {path}")
        if req.headers.get("X-IDENTITY-HEADER") != self.secret:
            return 401, _error_body(401, "unauthorized", "missing or wrong X-IDENTITY-HEADER")
        if not record["api_version"]:
            return 400, _error_body(400, "bad_request", "api-version is required")
        if not record["resource"]:
            return 400, _error_body(400, "bad_request", "resource is required")
        return None

    @staticmethod
    def _refuse_imds(
        req: _Handler, path: str, record: dict[str, Any]
    ) -> tuple[int, dict[str, Any]] | None:
        def invalid(description: str) -> tuple[int, dict[str, Any]]:
            return 400, {"error": "invalid_request", "error_description": description}

        if path != IMDS_TOKEN_PATH:
            return 404, {"error": "not_found", "error_description": f"no such path {path}"}
        if req.headers.get("Metadata") != "true":
            return invalid("Required metadata header not specified")
        if req.headers.get("X-Forwarded-For") is not None:
            # IMDS refuses anything that looks proxied.
            return invalid("Requests with X-Forwarded-For header are not allowed")
        if record["api_version"] != IMDS_API_VERSION:
            return invalid(f"api-version {record['api_version']!r} is not supported here")
        if not record["resource"]:
            return invalid("Required query variable 'resource' is missing")
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help="TCP port on 127.0.0.1 (0 = pick a free one)",
    )
    parser.add_argument("--lifetime", type=int, default=3600, help="token lifetime in seconds")
    parser.add_argument("--secret", default=None, help="X-IDENTITY-HEADER value (default: random)")
    args = parser.parse_args(argv)

    endpoint = FakeIdentityEndpoint(
        port=args.port, lifetime_seconds=args.lifetime, secret=args.secret
    )
    endpoint.start()
    print(json.dumps(endpoint.env()), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        endpoint.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
