"""A deliberately low-level HTTP client for attacks on keyless: every byte is ours to choose."""

from __future__ import annotations

import socket
import ssl


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


def tunnel(proxy_port: int, target: bytes | str, sni: str | None, raw: bytes,
           timeout: float = 10, alpn: list[str] | None = None) -> tuple[int, bytes, str | None]:
    """CONNECT target, TLS with `sni` (None: no SNI), send `raw`; return (CONNECT status,
    response bytes, negotiated ALPN). Certificates are not checked: the attacker does not care.
    """
    target_bytes = target.encode() if isinstance(target, str) else target
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout) as sock:
        sock.sendall(b"CONNECT " + target_bytes + b" HTTP/1.1\r\nHost: " + target_bytes +
                     b"\r\n\r\n")
        head = _read_head(sock)
        status = status_of(head)
        if status != 200:
            return status, head + _read_body(sock, head), None
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if alpn:
            context.set_alpn_protocols(alpn)
        try:
            with context.wrap_socket(sock, server_hostname=sni) as tls:
                negotiated = tls.selected_alpn_protocol()
                tls.sendall(raw)
                return status, _read_all(tls), negotiated
        except (ssl.SSLError, ConnectionError) as exc:
            return status, f"TLS failed: {exc}".encode(), None


def request(method: str, target: str, host: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close",
             "Content-Length: 0"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
