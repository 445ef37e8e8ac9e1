"""A 401 to a converted request: a fresh token and one replay, when the body was kept."""

from __future__ import annotations

import os
import re

import pytest
import requests

from tests.e2e.conftest import FAKE_HOSTS
from tests.support.fake_azure import Expect, FakeAzure, FakeRequest, FakeResponse, check

pytestmark = pytest.mark.e2e
HOST = FAKE_HOSTS["revoking"]


class Revoking:
    """Accepts a token until told to revoke the next one it sees; then answers 401 to it."""

    def __init__(self) -> None:
        self.revoke_next = False
        self.revoked: set[str] = set()
        self.seen: list[FakeRequest] = []

    def __call__(self, request: FakeRequest) -> FakeResponse:
        self.seen.append(request)
        problems = check(request, Expect(audience="https://search.azure.com"))
        if problems:
            return FakeResponse.json({"error": {"code": "Check", "message": str(problems)}}, 400)
        token = (request.header("authorization") or "")[len("Bearer "):]
        if self.revoke_next:
            self.revoked.add(token)
            self.revoke_next = False
        if token in self.revoked:
            return FakeResponse.json({"error": {"code": "InvalidToken"}}, 401,
                                     **{"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return FakeResponse.json({"stored": len(request.body)}, 201)


@pytest.fixture(scope="module")
def revoking(fake_azure: FakeAzure) -> Revoking:
    upstream = getattr(fake_azure, "_revoking", None)
    if upstream is None:
        upstream = fake_azure._revoking = Revoking()  # type: ignore[attr-defined]
        fake_azure.add(re.escape(HOST), None, upstream)
    return upstream


def retries(keyless, action: str) -> float:
    return keyless.metric("keyless_token_retries_total", service="search", action=action)


def put(body: bytes) -> requests.Response:
    return requests.put(f"https://{HOST}/indexes/i/docs?api-version=2024-07-01", data=body,
                        headers={"api-key": "dummy", "content-type": "application/json"},
                        timeout=30)


def test_revoked_token_is_replaced_and_the_request_replayed_once(through_keyless, revoking):
    assert put(b'{"warm": 1}').status_code == 201  # a token is cached
    revoking.revoke_next = True
    body = os.urandom(2048)
    before = len(revoking.seen)

    response = put(body)

    assert response.status_code == 201 and response.json() == {"stored": 2048}
    first, second = revoking.seen[before:]
    assert first.header("authorization") != second.header("authorization")
    assert first.body == second.body == body
    assert retries(through_keyless, "replayed") == 1


def test_large_body_cannot_be_replayed_and_repeated_401s_cost_no_token_storm(
    through_keyless, revoking, identity
):
    revoking.revoke_next = True
    large = put(os.urandom(100 * 1024))  # larger than keyless keeps: the 401 is passed on
    assert large.status_code == 401
    calls = len(identity.calls_for("https://search.azure.com"))
    # The revoked token is still cached; within 30 s of the last fresh fetch, keyless does not
    # fetch again for every 401: it passes them on.
    for _ in range(5):
        assert put(b"{}").status_code == 401
    assert len(identity.calls_for("https://search.azure.com")) == calls
    assert retries(through_keyless, "passed_on") >= 6
