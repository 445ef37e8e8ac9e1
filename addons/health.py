"""Tells the admin server when the proxy is serving."""

from __future__ import annotations

from proxy.admin import Health


class ReportHealth:
    def __init__(self, health: Health) -> None:
        self.health = health

    def running(self) -> None:
        # mitmproxy calls `running` once its listeners are up.
        self.health.listening = True

    def done(self) -> None:
        self.health.listening = False
