"""Which upstream a CancelRequest belongs to.

A client cancels a query by opening a new connection and sending the BackendKeyData it was
given at login. keyless hands the client the server's own key unchanged, so the request can go
upstream as it is; what keyless must know is which server the key came from, and that it is a
key of a connection it is relaying now (an unknown key is dropped, as the server would).
"""

from __future__ import annotations

Upstream = tuple[str, int]
Key = tuple[Upstream, int, bytes]


class CancelKeys:
    """The keys of the live connections, per process. One entry per relayed connection,
    removed when it ends, so the map is as large as the number of open connections."""

    def __init__(self) -> None:
        self._keys: dict[Key, int] = {}

    def remember(self, upstream: Upstream, pid: int, secret: bytes) -> None:
        key = (upstream, pid, secret)
        self._keys[key] = self._keys.get(key, 0) + 1

    def forget(self, upstream: Upstream, pid: int, secret: bytes) -> None:
        key = (upstream, pid, secret)
        count = self._keys.pop(key, 0) - 1
        if count > 0:
            self._keys[key] = count

    def knows(self, upstream: Upstream, pid: int, secret: bytes) -> bool:
        return (upstream, pid, secret) in self._keys

    def upstream_of(self, port: int, pid: int, secret: bytes) -> Upstream | None:
        """The one upstream on `port` this key belongs to (transparent mode: a cancel sent
        without TLS names no server). None if no live connection, or several, hold it."""
        found = {upstream for upstream, p, s in self._keys
                 if upstream[1] == port and p == pid and s == secret}
        return found.pop() if len(found) == 1 else None

    def __len__(self) -> int:
        return len(self._keys)


CANCEL_KEYS = CancelKeys()
