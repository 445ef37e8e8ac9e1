"""Small recording HTTP(S) servers and a counting TCP relay, all on loopback.

The recorders keep every header line (a list of pairs, in order, duplicates included) and the
raw bytes of each request as they arrived, so a test can search for a secret anywhere in what
a server received, not only in the headers a dict would have kept.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO, Self


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as a recording server received it."""

    method: str
    path: str
    headers: list[tuple[str, str]]  # every header line in order, names as sent
    body: bytes
    raw: bytes  # request line, header lines and body, byte for byte as they arrived

    def header_all(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive), in the order received."""
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        """The value of a header that must appear at most once (a repeat fails the test)."""
        values = self.header_all(name)
        assert len(values) <= 1, f"{name} appears {len(values)} times"
        return values[0] if values else None

    def has_header(self, name: str) -> bool:
        return bool(self.header_all(name))


class _TeeReader:
    """Wraps the request stream and keeps a copy of every byte the handler reads."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.taken = bytearray()

    def readline(self, limit: int = -1) -> bytes:
        line = self._stream.readline(limit)
        self.taken += line
        return line

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.taken += data
        return data

    def take(self) -> bytes:
        """The bytes read since the last take (one request's raw bytes)."""
        taken, self.taken = bytes(self.taken), bytearray()
        return taken

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RecordingServer._Server
    rfile: _TeeReader  # type: ignore[assignment]

    def setup(self) -> None:
        super().setup()
        self.rfile = _TeeReader(self.rfile)  # type: ignore[assignment]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            body = b""
            while size := int(self.rfile.readline(65537).split(b";")[0].strip() or b"0", 16):
                body += self.rfile.read(size)
                self.rfile.readline(65537)
            while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return body
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        owner = self.server.owner
        owner.requests.append(RecordedRequest(self.command, self.path,
                                              list(self.headers.items()), body,
                                              self.rfile.take()))
        body = b'{"ok": true}'
        status, extra = owner.responses.get(self.path.partition("?")[0], (200, {}))
        self.send_response(status)
        for name, value in extra.items():
            self.send_header(name, value)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle


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
    """Answers 200 to everything and records each request (a `RecordedRequest`)."""

    class _Server(ThreadingHTTPServer):
        daemon_threads = True
        owner: RecordingServer

    def __init__(self, tls: tuple[str, str] | None = None,
                 address: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.tls = tls
        self.requests: list[RecordedRequest] = []
        # path -> (status, extra headers), e.g. a redirect; everything else answers 200
        self.responses: dict[str, tuple[int, dict[str, str]]] = {}
        self._server = self._Server(address, _Recorder)
        self._server.owner = self
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]


class SocketServer:
    """A loopback TCP listener that hands each accepted connection to `serve` in a thread."""

    def __init__(self, address: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self._listener = socket.create_server(address)
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
    Requests are recorded like RecordingServer's (their heads only: bodies are not read).
    """

    def __init__(self, tls: tuple[str, str], stall_seconds: float = 30.0) -> None:
        super().__init__()
        self.requests: list[RecordedRequest] = []
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
                head = head.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
                lines = head.split(b"\r\n")
                method, path = lines[0].split(b" ")[:2]
                pairs = (line.partition(b":") for line in lines[1:] if b":" in line)
                headers = [(k.decode(), v.decode().strip()) for k, _, v in pairs]
                self.requests.append(RecordedRequest(method.decode(), path.decode(), headers,
                                                     b"", head))
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
