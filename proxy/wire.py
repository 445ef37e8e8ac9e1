"""Small, pure helpers for the parts of an HTTP request keyless touches: headers and the query."""

from __future__ import annotations

from typing import Protocol
from urllib.parse import unquote


class Headers(Protocol):
    """The header operations conversions need (mitmproxy's `Headers` has them all)."""

    def get(self, key: str, default: str | None = None) -> str | None: ...
    def get_all(self, key: str) -> list[str]: ...
    def __setitem__(self, key: str, value: str) -> None: ...
    def __delitem__(self, key: str) -> None: ...
    def __contains__(self, key: object) -> bool: ...


class RequestHead(Protocol):
    """A request as conversions see it: the raw path (with its query) and the headers."""

    path: str
    headers: Headers


def auth_scheme(value: str) -> str:
    """The scheme word of an Authorization value, lowercased ("sharedkey", "bearer", ...)."""
    return value.strip().split(" ", 1)[0].lower()


def remove_query_params(path: str, names: frozenset[str]) -> tuple[str, dict[str, str]]:
    """Remove the query parameters whose (percent-decoded, lowercased) name is in `names`.

    Everything else in the path survives byte for byte: the path itself, the order, spelling
    and encoding of the other parameters, even empty pieces. Returns the new path and the
    removed parameters as {name: raw value}.
    """
    base, sep, query = path.partition("?")
    if not sep:
        return path, {}
    kept: list[str] = []
    removed: dict[str, str] = {}
    for piece in query.split("&"):
        raw_name, _, value = piece.partition("=")
        name = unquote(raw_name, errors="replace").lower()
        if name in names:
            removed[name] = value
        else:
            kept.append(piece)
    if not removed:
        return path, {}
    return (base + "?" + "&".join(kept)) if kept else base, removed


def split_authority(authority: str, default_port: int) -> tuple[str, int] | None:
    """Split a Host header or CONNECT authority into (lowercased host, port); None if malformed."""
    authority = authority.strip()
    if authority.startswith("["):
        host, sep, rest = authority[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
    else:
        host, _, port_text = authority.partition(":")
        if ":" in port_text:
            return None
    if not host:
        return None
    if not port_text:
        return host.lower(), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return host.lower(), int(port_text)
