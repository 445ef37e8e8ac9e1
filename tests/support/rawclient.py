"""A deliberately low-level HTTP client for attacks on keyless: every byte is ours to choose."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from cryptography import x509


def _read_all(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    data = b""
    try:
        while len(data) < limit and (chunk := sock.recv(65536)):
            data += chunk
    except (TimeoutError, ssl.SSLError, ConnectionError):
        pass
    return data


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def _read_body(sock: socket.socket, head: bytes) -> bytes:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            wanted, body = int(value), b""
            while len(body) < wanted and (chunk := sock.recv(wanted - len(body))):
                body += chunk
            return body
    return _read_all(sock)


def status_of(response: bytes) -> int:
    parts = response.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def plain(proxy_port: int, raw: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes to the proxy (absolute-form requests, odd CONNECT lines) and read all."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout) as sock:
        sock.sendall(raw)
        return _read_all(sock)


@dataclass(frozen=True, slots=True)
class Exchange:
    """What the app saw of one crafted tunnel."""

    connect_status: int  # keyless' answer to the CONNECT line
    response: bytes  # the answer inside the tunnel (or to the CONNECT, when refused)
    alpn: str | None  # the protocol negotiated inside the tunnel
    peer_certificate: bytes | None  # DER of the certificate the app was shown (None: no TLS)

    def certificate(self) -> x509.Certificate | None:
        if self.peer_certificate is None:
            return None
        return x509.load_der_x509_certificate(self.peer_certificate)


def exchange(proxy_port: int, target: bytes | str, sni: str | None, raw: bytes,
             timeout: float = 10, alpn: list[str] | None = None, tls: bool = True) -> Exchange:
    """CONNECT target, TLS with `sni` (None: no SNI), send `raw`, read the answer.
    `tls=False`: send `raw` in the clear inside the tunnel.

    Certificates are not checked (the attacker does not care) but the one shown is kept, so
    a test can tell whether keyless intercepted (its CA signed it) or tunnelled (the server's own).
    """
    target_bytes = target.encode() if isinstance(target, str) else target
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout) as sock:
        sock.sendall(b"CONNECT " + target_bytes + b" HTTP/1.1\r\nHost: " + target_bytes +
                     b"\r\n\r\n")
        head = _read_head(sock)
        status = status_of(head)
        if status != 200:
            return Exchange(status, head + _read_body(sock, head), None, None)
        if not tls:
            sock.sendall(raw)
            return Exchange(status, _read_all(sock), None, None)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if alpn:
            context.set_alpn_protocols(alpn)
        try:
            with context.wrap_socket(sock, server_hostname=sni) as tls:
                negotiated = tls.selected_alpn_protocol()
                certificate = tls.getpeercert(binary_form=True)
                tls.sendall(raw)
                return Exchange(status, _read_all(tls), negotiated, certificate)
        except (ssl.SSLError, ConnectionError) as exc:
            return Exchange(status, f"TLS failed: {exc}".encode(), None, None)


def tunnel(proxy_port: int, target: bytes | str, sni: str | None, raw: bytes,
           timeout: float = 10, alpn: list[str] | None = None) -> tuple[int, bytes, str | None]:
    """`exchange`, as (CONNECT status, response bytes, negotiated ALPN)."""
    seen = exchange(proxy_port, target, sni, raw, timeout, alpn)
    return seen.connect_status, seen.response, seen.alpn


def request(method: str, target: str, host: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close",
             "Content-Length: 0"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
