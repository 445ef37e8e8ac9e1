"""Small recording HTTP(S) servers and a counting TCP relay, all on loopback."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RecordingServer._Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        owner = self.server.owner
        owner.requests.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
             "body": body}
        )
        body = b'{"ok": true}'
        status, extra = owner.responses.get(self.path.partition("?")[0], (200, {}))
        self.send_response(status)
        for name, value in extra.items():
            self.send_header(name, value)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = _handle


class ThreadedHTTPServer:
    """Runs a ThreadingHTTPServer (`self._server`) in a daemon thread while in a `with`."""

    _server: ThreadingHTTPServer

    def __enter__(self) -> Self:
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class RecordingServer(ThreadedHTTPServer):
    """Answers 200 to everything and records method, path and headers of each request."""

    class _Server(ThreadingHTTPServer):
        daemon_threads = True
        owner: RecordingServer

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self.tls = tls
        self.requests: list[dict[str, Any]] = []
        # path -> (status, extra headers), e.g. a redirect; everything else answers 200
        self.responses: dict[str, tuple[int, dict[str, str]]] = {}
        self._server = self._Server(("127.0.0.1", 0), _Recorder)
        self._server.owner = self
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]


class SocketServer:
    """A loopback TCP listener that hands each accepted connection to `serve` in a thread."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()

    def __enter__(self) -> Self:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError


class CountingRelay(SocketServer):
    """A TCP relay to `target` that counts connections and bytes sent towards the target."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__()
        self.target = target
        self.connections = 0
        self.bytes_to_target = 0

    def serve(self, conn: socket.socket) -> None:
        self.connections += 1
        upstream = socket.create_connection(self.target)
        threading.Thread(target=self._pipe, args=(upstream, conn, False), daemon=True).start()
        self._pipe(conn, upstream, True)

    def _pipe(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        try:
            while data := source.recv(65536):
                if counted:
                    self.bytes_to_target += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class FaultyServer(SocketServer):
    """A TLS server whose behaviour is chosen by the request path.

    /reset: close the connection with a TCP reset after reading the request;
    /stall: read the request, then say nothing for `stall_seconds`;
    /status/NNN: answer NNN; anything else: 200.
    Requests are recorded like RecordingServer's.
    """

    def __init__(self, tls: tuple[str, str], stall_seconds: float = 30.0) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []
        self.stall_seconds = stall_seconds
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(*tls)

    def serve(self, raw: socket.socket) -> None:  # type: ignore[override]
        try:
            conn = self._context.wrap_socket(raw, server_side=True)
            conn.settimeout(self.stall_seconds + 5)
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                lines = head.split(b"\r\n")
                method, path = lines[0].split(b" ")[:2]
                headers = dict(
                    (k.decode().lower(), v.decode().strip())
                    for k, _, v in (line.partition(b":") for line in lines[1:] if b":" in line)
                )
                self.requests.append({"method": method.decode(), "path": path.decode(),
                                      "headers": headers})
                route = path.decode().partition("?")[0]
                if route == "/reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    conn.close()
                    return
                if route == "/stall":
                    self._closed.wait(self.stall_seconds)
                    conn.close()
                    return
                status = int(route.split("/")[2]) if route.startswith("/status/") else 200
                body = b'{"error": {"code": "Fault"}}' if status >= 400 else b'{"ok": true}'
                conn.sendall(
                    f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\n\r\n".encode() + body)
        except (OSError, ssl.SSLError, ValueError, IndexError):
            return
