"""The webhook's HTTPS server: POST /mutate (AdmissionReview v1), GET /healthz and /readyz.

The stdlib's ThreadingHTTPServer, with TLS done per connection in the handler's thread, so a
slow handshake never blocks accept. The serving pair is re-read when the files change (checked
at most every `reload_interval` seconds, on the next connection): a rotated kubernetes.io/tls
Secret takes effect without a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from proxy.k8s.defaults import Defaults
from proxy.k8s.review import MAX_BODY, Answer, answer, error, too_large

log = logging.getLogger("keyless.webhook")
HANDSHAKE_TIMEOUT = 10.0
READ_TIMEOUT = 10.0
# A body over the limit is read and dropped up to this much (then the connection is closed).
DISCARD_LIMIT = 64 * 1024 * 1024


class CertificateError(Exception):
    pass


class ReloadingCertificate:
    """An SSLContext for the current cert/key files; a new one when their content changes."""

    def __init__(self, cert: Path, key: Path, reload_interval: float) -> None:
        self.cert, self.key = cert, key
        self.reload_interval = reload_interval
        self._lock = threading.Lock()
        self._digest = b""
        self._checked = 0.0
        self._context = self._load()  # the first pair must load: fail at start, loudly

    def _read(self) -> tuple[bytes, bytes]:
        try:
            return self.cert.read_bytes(), self.key.read_bytes()
        except OSError as exc:
            raise CertificateError(f"cannot read the serving certificate: {exc}") from None

    def _load(self) -> ssl.SSLContext:
        cert, key = self._read()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            raise CertificateError(f"{self.cert} / {self.key}: not a matching PEM certificate "
                                   f"and key ({type(exc).__name__})") from None
        self._digest = hashlib.sha256(cert + b"\0" + key).digest()
        self._checked = time.monotonic()
        return context

    def context(self) -> ssl.SSLContext:
        with self._lock:
            if time.monotonic() - self._checked < self.reload_interval:
                return self._context
            self._checked = time.monotonic()
            try:
                cert, key = self._read()
                if hashlib.sha256(cert + b"\0" + key).digest() == self._digest:
                    return self._context
                self._context = self._load()
                log.info("serving certificate reloaded from %s", self.cert)
            except CertificateError as exc:
                # mid-rotation (one file written, not the other) or broken: keep the old pair
                log.warning("serving certificate not reloaded, keeping the current one: %s", exc)
            return self._context


class WebhookServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], certificate: ReloadingCertificate,
                 defaults: Defaults) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        self.certificate = certificate
        self.defaults = defaults
        self.draining = threading.Event()
        super().__init__(address, WebhookHandler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            tls = self.certificate.context().wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            tls.settimeout(READ_TIMEOUT)
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            tls.close()


class WebhookHandler(BaseHTTPRequestHandler):
    server: WebhookServer
    protocol_version = "HTTP/1.1"
    server_version = "keyless-webhook"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one decision line per review instead of an access log

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, {"status": "ok"})
        elif self.path == "/readyz":
            # draining: out of the Service's endpoints, still answering what arrives
            draining = self.server.draining.is_set()
            self._send(503 if draining else 200,
                       {"status": "draining" if draining else "ok"})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/mutate":
            self._send(404, {"error": "not found"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._answer(error(411, "a Content-Length is required"), close=True)
            return
        if length < 0:
            self._answer(error(400, "bad Content-Length"), close=True)
            return
        if length > MAX_BODY:
            head = self.rfile.read(min(length, 4096))
            if length > DISCARD_LIMIT:
                self._answer(too_large(head, length), close=True)
                return
            self._discard(length - len(head))
            self._answer(too_large(head, length))
            return
        body = self.rfile.read(length)
        try:
            result = answer(body, self.server.defaults)
        except Exception as exc:  # a bug must not hang the API server's call: answer, log
            result = error(500, f"internal error ({type(exc).__name__})")
        self._answer(result)

    def _discard(self, remaining: int) -> None:
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)

    def _answer(self, result: Answer, close: bool = False) -> None:
        level = logging.INFO if result.status == 200 else logging.WARNING
        log.log(level, "admission %s", result.log)
        self._send(result.status, result.body, close)

    def _send(self, status: int, body: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)


def serve(address: tuple[str, int], certificate: ReloadingCertificate, defaults: Defaults,
          shutdown_delay: float = 5.0) -> None:
    """Serve until SIGTERM/SIGINT; then fail /readyz and keep answering for `shutdown_delay`
    seconds, so the Service stops sending reviews before the process goes (a review that
    reached a dying webhook would be Ignored: a pod created without keyless)."""
    with WebhookServer(address, certificate, defaults) as server:
        host, port = server.server_address[:2]

        def drain_then_stop() -> None:
            time.sleep(shutdown_delay)
            server.shutdown()

        def on_signal(signum: int, _frame: Any) -> None:
            if not server.draining.is_set():
                server.draining.set()
                log.info("signal %s: draining for %.1f s, then stopping", signum,
                         shutdown_delay)
                threading.Thread(target=drain_then_stop, daemon=True).start()

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        log.info("keyless webhook listening on https://%s:%s/mutate (excluded namespaces: %s)",
                 host, port, ",".join(defaults.exclude_namespaces))
        server.serve_forever(poll_interval=0.5)
        log.info("keyless webhook stopped")
