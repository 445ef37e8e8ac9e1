"""Pieces for running a protocol session in-process (the transparent-mode session tests):
a token source answering one static token, and a Connection that keeps its login results."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.listeners.connection import Connection


@dataclass
class StaticToken:
    token: str
    expires_on: int
    refresh_on: int | None = None


class RecordingConnection(Connection):
    """The framework's Connection, keeping each login result for the test."""

    results: list[str]

    def login(self, result: str) -> None:
        self.results.append(result)
        super().login(result)
