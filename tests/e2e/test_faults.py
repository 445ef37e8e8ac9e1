"""Faults at the token endpoint and upstream: bounded outcomes, no key forwarded, still serving."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.e2e.conftest import DEAD_PROXY_ENV
from tests.support.azurite import free_port
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess
from tests.support.upstreams import FaultyServer

pytestmark = pytest.mark.e2e
HOST = "faulty.blob.core.windows.net"
KEY = {"Authorization": "SharedKey faulty:c2lnbmF0dXJl", "x-ms-version": "2021-08-06"}
CLIENT_TIMEOUT = 30  # the bound: a hung keyless fails the test instead of hanging it


@pytest.fixture(scope="module")
def faulty(pki) -> Iterator[FaultyServer]:
    with FaultyServer(pki.issue_server_cert(HOST), stall_seconds=20) as server:
        yield server


@pytest.fixture
def start_keyless(tmp_path, pki, faulty) -> Iterator[Callable[..., KeylessProcess]]:
    started: list[KeylessProcess] = []

    def start(env: dict[str, str], *extra: str) -> KeylessProcess:
        process = KeylessProcess(
            tmp_path / f"keyless-{len(started)}",
            ["--connect-to", f"{HOST}:443:127.0.0.1:{faulty.port}",
             "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
             "--token-timeout", "3", *extra],
            {**env, **DEAD_PROXY_ENV},
        ).start()
        started.append(process)
        return process

    yield start
    for process in started:
        assert process.stop() == 0, process.log()


def call(process: KeylessProcess, path: str = "/c/b", timeout: float = CLIENT_TIMEOUT):
    return requests.get(f"https://{HOST}{path}", headers=KEY, timeout=timeout,
                        proxies={"https": process.proxy_url}, verify=process.ca_path)


def no_key_forwarded(faulty: FaultyServer) -> None:
    for seen in faulty.requests:
        assert not any(value.lower().startswith("sharedkey")
                       for value in seen.header_all("authorization"))


@pytest.mark.parametrize("mode", ["error", "throttle", "slow", "drop", "down"])
def test_token_endpoint_fault_at_start_refuses_then_recovers(start_keyless, faulty, mode):
    with FakeIdentityEndpoint(mode="ok" if mode == "down" else mode,
                              delay_seconds=6) as endpoint:
        env = endpoint.env()
        if mode == "down":
            env["IDENTITY_ENDPOINT"] = f"http://127.0.0.1:{free_port()}/msi/token"
        process = start_keyless(env)
        before = len(faulty.requests)

        refused = call(process)

        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "KeylessTokenUnavailable"
        assert len(faulty.requests) == before, "a request went upstream without a token"
        assert process.metric("keyless_requests_total", outcome="refused") >= 1
        assert process.get("/healthz")[0] == 200

        if mode != "down":  # the endpoint recovers: keyless serves again, same process
            endpoint.mode = "ok"
            deadline = time.monotonic() + 20
            while (response := call(process)).status_code != 200 and \
                    time.monotonic() < deadline:
                time.sleep(0.5)
            assert response.status_code == 200
            assert (faulty.requests[-1].header("authorization") or "").startswith("Bearer ")
    no_key_forwarded(faulty)


def test_token_endpoint_dies_mid_life_keeps_serving_the_valid_token(start_keyless, faulty):
    # A 20 s token, refreshed at ~10 s. azure-identity hides a failing refresh behind its own
    # still-valid token, so keyless keeps serving until the token's end, then refuses (503),
    # without hammering the endpoint, and recovers when the endpoint does.
    with FakeIdentityEndpoint(lifetime_seconds=20) as endpoint:
        process = start_keyless(endpoint.env(), "--token-margin", "1")
        assert call(process).status_code == 200
        endpoint.mode = "error"
        (token,) = endpoint.issued
        expires = endpoint.decode(token)["exp"]
        calls: list[tuple[float, int, float]] = []  # (started, status, ended), wall clock
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            started = time.time()
            status = call(process).status_code
            calls.append((started, status, time.time()))
            if status == 503:
                break
            time.sleep(0.3)
        statuses = [status for _, status, _ in calls]
        assert statuses.count(200) >= 2 and statuses[-1] == 503, statuses
        assert set(statuses) <= {200, 503}
        # Judged against the token's own life, not a count of calls (a slow machine makes
        # fewer): served until --token-margin (1 s) before its end, refused only after that.
        # (`exp` has whole seconds: one second of slack each way.)
        assert all(ended <= expires + 1 for _, status, ended in calls if status == 200), calls
        assert calls[-1][2] >= expires - 1 - 1, (calls[-1], expires)
        assert process.metric("keyless_token_fetches_total", result="unchanged") >= 1, \
            "keyless never tried to refresh"
        fetches = process.metric("keyless_token_fetches_total")
        assert fetches <= 10, f"{fetches} token fetches in ~20 s: a refresh loop"
        endpoint.mode = "ok"
        deadline = time.monotonic() + 40
        while call(process).status_code != 200:
            assert time.monotonic() < deadline, "keyless did not recover"
            time.sleep(0.5)
    no_key_forwarded(faulty)


def test_upstream_faults_have_bounded_outcomes_and_are_counted(start_keyless, faulty):
    with FakeIdentityEndpoint() as endpoint:
        process = start_keyless(endpoint.env())
        assert call(process).status_code == 200

        reset = call(process, "/reset")  # a new app connection: over the upstream pool
        assert reset.status_code == 502
        assert reset.json()["error"]["code"] == "KeylessUpstreamFailed"
        with pytest.raises(requests.exceptions.ReadTimeout):
            call(process, "/stall", timeout=2)
        assert call(process, "/status/500").status_code == 500
        passed_on = call(process, "/status/503")
        assert passed_on.status_code == 503 and passed_on.json()["error"]["code"] == "Fault"

        assert call(process).status_code == 200  # still serving
        # Each reached the service once: keyless never sends a request twice.
        paths = [r.path.partition("?")[0] for r in faulty.requests]
        assert paths.count("/reset") == 1 and paths.count("/stall") == 1, paths
        assert process.metric("keyless_upstream_errors_total", service="storage-blob") >= 1
        assert process.metric("keyless_upstream_responses_total", service="storage-blob",
                      status_class="5xx") == 2
        assert process.metric("keyless_upstream_responses_total", service="storage-blob",
                      status_class="2xx") >= 2
    no_key_forwarded(faulty)
