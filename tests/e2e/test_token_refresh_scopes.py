"""Five scopes of one identity refreshed together: every one really reaches the endpoint,
and no request is left without a token (azure-identity asks its endpoint at most once per
30 s per credential and answers from its cache meanwhile)."""

from __future__ import annotations

import re
import time

import pytest
import requests

from tests.e2e.conftest import DEAD_PROXY_ENV
from tests.support.azurite import free_port
from tests.support.fake_azure import Expect, FakeAzure, FakeRequest, FakeResponse, check
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess

pytestmark = pytest.mark.e2e
HOST = "refresh.search.windows.net"
SCOPES = ("https://cosmos.azure.com/.default", "https://ossrdbms-aad.database.windows.net/.default",
          "https://search.azure.com/.default", "https://servicebus.azure.net/.default",
          "https://storage.azure.com/.default")
# usable for 50 s, refreshed at 31.5-35 s (jitter): azure-identity asks its endpoint at
# most once per 30 s per credential, so a shorter life could not be refreshed early
LIFETIME, MARGIN = 70, 20


def search(request: FakeRequest) -> FakeResponse:
    problems = check(request, Expect(audience="https://search.azure.com"))
    if request.header("api-key") is not None:
        problems.append("the app's key reached the service")
    if problems:
        return FakeResponse.json({"error": {"code": "Check", "message": str(problems)}}, 401)
    return FakeResponse.json({"value": []}, 200)


def test_scopes_refreshed_together_all_reach_the_endpoint_and_no_request_fails(tmp_path, pki):
    port = free_port()
    with FakeAzure(pki.issue_server_cert(HOST)) as fake, \
            FakeIdentityEndpoint(lifetime_seconds=LIFETIME) as identity:
        fake.add(re.escape(HOST), None, search)
        keyless = KeylessProcess(tmp_path / "keyless", [
            "--reverse", f"{port}=https://{HOST}", "--token-margin", str(MARGIN),
            "--connect-to", f"{HOST}:443:127.0.0.1:{fake.port}",
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
            *[arg for scope in SCOPES for arg in ("--ready-scopes", scope)],
        ], {**identity.env(), **DEAD_PROXY_ENV}).start(timeout=60)
        try:
            started = time.monotonic()
            statuses = []
            app = requests.Session()
            app.trust_env = False  # no proxy: the reverse port is the service
            for _ in range(300):  # bounded: every 0.2 s until 3 s past the first tokens
                if time.monotonic() - started > LIFETIME - MARGIN + 3:
                    break
                answer = app.get(f"http://127.0.0.1:{port}/indexes?api-version=2024-07-01",
                                      headers={"api-key": "dummy"}, timeout=15)
                statuses.append(answer.status_code)
                time.sleep(0.2)
        finally:
            keyless.stop()
        assert statuses and set(statuses) == {200}, (sorted(set(statuses)), keyless.log()[-3000:])
        first = min(call["time"] for call in identity.calls)
        usable_end = first + LIFETIME - MARGIN
        for scope in SCOPES:
            resource = scope.removesuffix("/.default")
            before = [c for c in identity.calls_for(resource) if c["time"] < usable_end]
            assert len(before) >= 2, f"{resource}: no refresh reached the endpoint in time"
