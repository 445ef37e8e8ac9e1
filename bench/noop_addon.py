"""A mitmproxy addon that does nothing: plain mitmdump with it is the "architecture floor"
keyless is compared against (same mitmproxy, same interception, no keyless logic)."""

from __future__ import annotations


class NoOp:
    pass


addons = [NoOp()]
