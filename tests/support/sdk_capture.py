"""Capture what an Azure SDK would send, without sending it (for unit tests of conversions)."""

from __future__ import annotations

import time

from azure.core.credentials import AccessToken
from azure.core.pipeline.transport import HttpRequest, RequestsTransport


class KeepRequests(RequestsTransport):
    """A transport that keeps each request the SDK built and sends nothing."""

    def __init__(self, kept: list[HttpRequest] | None = None) -> None:
        super().__init__()
        self.kept = kept if kept is not None else []

    def send(self, request, **kwargs):  # type: ignore[no-untyped-def]
        self.kept.append(request)
        raise ConnectionAbortedError("kept, not sent")


class StaticCredential:
    """A TokenCredential that hands out one ready token: the SDK in its own Entra mode."""

    def __init__(self, token: str) -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)
