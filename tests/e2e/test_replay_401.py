"""A 401 to a converted request: a fresh token and one replay, when the body was kept.

Each test has a keyless process of its own: the token cache and the 30 s between two
invalidations of the same (identity, scope) are per process, so the tests pass alone and in
any order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest
import requests

from tests.e2e.conftest import DEAD_PROXY_ENV, FAKE_HOSTS, route_app_through
from tests.support.fake_azure import Expect, FakeAzure, FakeRequest, FakeResponse, check
from tests.support.keyless import KeylessProcess

pytestmark = pytest.mark.e2e
HOST = FAKE_HOSTS["revoking"]
SEARCH_RESOURCE = "https://search.azure.com"


class Revoking:
    """Accepts a token until told to revoke the next one it sees; then answers 401 to it."""

    def __init__(self) -> None:
        self.revoke_next = False
        self.revoked: set[str] = set()
        self.seen: list[FakeRequest] = []

    def __call__(self, request: FakeRequest) -> FakeResponse:
        self.seen.append(request)
        problems = check(request, Expect(audience=SEARCH_RESOURCE))
        if problems:
            return FakeResponse.json({"error": {"code": "Check", "message": str(problems)}}, 400)
        token = bearer(request)
        if self.revoke_next:
            self.revoked.add(token)
            self.revoke_next = False
        if token in self.revoked:
            return FakeResponse.json({"error": {"code": "InvalidToken"}}, 401,
                                     **{"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return FakeResponse.json({"stored": len(request.body)}, 201)


def bearer(request: FakeRequest) -> str:
    return (request.header("authorization") or "")[len("Bearer "):]


@pytest.fixture
def revoking(fake_azure: FakeAzure) -> Revoking:
    """The session fake's handler for HOST, registered once; no revocation pending."""
    upstream = getattr(fake_azure, "_revoking", None)
    if upstream is None:
        upstream = fake_azure._revoking = Revoking()  # type: ignore[attr-defined]
        fake_azure.add(re.escape(HOST), None, upstream)
    upstream.revoke_next = False
    return upstream


@pytest.fixture
def own_keyless(tmp_path, pki, fake_azure, module_identity,
                monkeypatch) -> Iterator[KeylessProcess]:
    """A fresh keyless (empty token cache, no invalidation yet) that the app goes through."""
    process = KeylessProcess(tmp_path / "keyless-replay", [
        "--connect-to", f"{HOST}:443:127.0.0.1:{fake_azure.port}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
    ], {**module_identity.env(), **DEAD_PROXY_ENV}).start()
    route_app_through(monkeypatch, process)
    yield process
    assert process.stop() == 0, process.log()


def retries(keyless: KeylessProcess, action: str) -> float:
    return keyless.metric("keyless_token_retries_total", service="search", action=action)


def put(body: bytes) -> requests.Response:
    return requests.put(f"https://{HOST}/indexes/i/docs?api-version=2024-07-01", data=body,
                        headers={"api-key": "dummy", "content-type": "application/json"},
                        timeout=30)


def test_revoked_token_is_replaced_and_the_request_replayed_once(own_keyless, revoking):
    assert put(b'{"warm": 1}').status_code == 201  # a token is cached
    revoking.revoke_next = True
    body = os.urandom(2048)
    before = len(revoking.seen)

    response = put(body)

    assert response.status_code == 201 and response.json() == {"stored": 2048}
    first, second = revoking.seen[before:]
    assert bearer(first) in revoking.revoked and bearer(second) not in revoking.revoked
    assert first.body == second.body == body
    assert retries(own_keyless, "replayed") == 1
    assert retries(own_keyless, "passed_on") == 0


def test_large_body_is_not_replayed_but_its_401_forgets_the_token_and_no_token_storm(
    own_keyless, revoking, module_identity
):
    def token_calls() -> int:
        return len(module_identity.calls_for(SEARCH_RESOURCE))

    calls = token_calls()
    assert put(b'{"warm": 1}').status_code == 201  # a token is cached
    assert token_calls() == calls + 1
    revoking.revoke_next = True
    seen = len(revoking.seen)

    large = put(os.urandom(100 * 1024))  # larger than keyless keeps: the 401 is passed on

    assert large.status_code == 401
    assert len(revoking.seen) == seen + 1, "a body keyless did not keep cannot be replayed"
    revoked = bearer(revoking.seen[-1])
    assert retries(own_keyless, "passed_on") == 1 and retries(own_keyless, "replayed") == 0
    # The 401 forgot the token all the same: the next (small) request goes out with a fresh
    # one at once (not after a 401 of its own and a replay).
    seen = len(revoking.seen)
    assert put(b"{}").status_code == 201
    assert token_calls() == calls + 2
    assert len(revoking.seen) == seen + 1 and bearer(revoking.seen[-1]) != revoked
    assert retries(own_keyless, "replayed") == 0

    # That fresh token is revoked too, within 30 s of the last invalidation: keyless passes
    # the 401s on and does not fetch again for each of them.
    revoking.revoke_next = True
    for _ in range(6):
        assert put(b"{}").status_code == 401
    assert token_calls() == calls + 2
    assert retries(own_keyless, "passed_on") == 7 and retries(own_keyless, "replayed") == 0
