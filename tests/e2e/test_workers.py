"""`--workers N`: real supervisor and worker processes, a real app client (requests, aiohttp)
with a dummy key in forward mode, and a fake Azure Search upstream that checks each converted
request the way the service would (Entra token: signature, issuer, audience, expiry; no key
left)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import requests

from proxy.audit import STATE_FILE, CallLog
from tests.e2e.conftest import DEAD_PROXY_ENV, FAKE_HOSTS, route_app_through
from tests.support.azurite import free_port
from tests.support.fake_azure import Expect, FakeAzure, FakeRequest, FakeResponse, check
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess

pytestmark = pytest.mark.e2e
HOST = FAKE_HOSTS["search"]
SEARCH_RESOURCE = "https://search.azure.com"
DUMMY_KEY = "dummy-admin-key-the-app-still-sends"


class Search:
    """Accepts a request only as Search would after keyless: a valid Entra token, no key."""

    def __init__(self) -> None:
        self.seen: list[FakeRequest] = []
        self.problems: list[list[str]] = []
        self.slow_seconds = 0.0
        self.lock = threading.Lock()

    def __call__(self, request: FakeRequest) -> FakeResponse:
        with self.lock:
            self.seen.append(request)
        problems = check(request, Expect(audience=SEARCH_RESOURCE))
        if DUMMY_KEY in str(request.headers) or DUMMY_KEY.encode() in request.body:
            problems.append("the app's key reached the service")
        if problems:
            with self.lock:
                self.problems.append(problems)
            return FakeResponse.json({"error": {"code": "Check", "message": str(problems)}}, 401)
        if "slow" in request.path:
            time.sleep(self.slow_seconds)
        return FakeResponse.json({"stored": len(request.body)}, 201)


@pytest.fixture(scope="module")
def search(pki) -> Iterator[tuple[FakeAzure, Search]]:
    upstream = Search()
    with FakeAzure(pki.issue_server_cert(HOST)) as fake:
        fake.add(re.escape(HOST), None, upstream)
        # 500 requests released at once by the first token open as many upstream
        # connections: a listen backlog of 5 (socketserver's default) would drop most
        fake._server.socket.listen(1024)
        yield fake, upstream


def start_workers(tmp_path: Path, workers: int, fake: FakeAzure, pki, identity,
                  *extra: str) -> KeylessProcess:
    return KeylessProcess(tmp_path / f"keyless-{workers}", [
        "--workers", str(workers), "--log-format", "text",
        "--connect-to", f"{HOST}:443:127.0.0.1:{fake.port}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
        *extra,
    ], {**identity.env(), **DEAD_PROXY_ENV}).start(timeout=60)


@contextlib.contextmanager
def stopped_cleanly(keyless: KeylessProcess) -> Iterator[KeylessProcess]:
    """The running keyless; it must then stop with exit code 0 (every worker drained)."""
    try:
        yield keyless
    finally:
        assert keyless.stop() == 0, keyless.log()


def put(path: str = "/indexes/i/docs", body: bytes = b'{"value": []}') -> requests.Response:
    # a new connection per request: the kernel spreads connections, not requests
    return requests.put(f"https://{HOST}{path}?api-version=2024-07-01", data=body,
                        headers={"api-key": DUMMY_KEY, "content-type": "application/json"},
                        timeout=30)


def worker_pids(supervisor_pid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == supervisor_pid:  # ppid
            pids.append(int(stat.parent.name))
    return sorted(pids)


def poll(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds}s: {what}"
        time.sleep(0.1)


def test_two_workers_share_the_port_and_metrics_sum_across_them(
    tmp_path, pki, search, monkeypatch
):
    fake, upstream = search
    with FakeIdentityEndpoint() as identity, \
            stopped_cleanly(start_workers(tmp_path, 2, fake, pki, identity)) as keyless:
        route_app_through(monkeypatch, keyless)
        seen = len(upstream.seen)
        answers = [put() for _ in range(40)]
        assert [a.status_code for a in answers] == [201] * 40, answers[0].text
        assert len(upstream.seen) == seen + 40 and not upstream.problems
        per_worker = [keyless.metric("keyless_worker_requests_total", worker=str(n))
                      for n in range(2)]
        assert all(count > 0 for count in per_worker), per_worker  # both served
        assert sum(per_worker) == 40
        # the pod's one /metrics: each worker's counter summed
        assert keyless.metric("keyless_requests_total", service="search",
                              outcome="converted") == 40
        assert keyless.metric("keyless_key_material_stripped_total", service="search") == 40
        assert len(identity.calls) == 1
        assert keyless.metric("keyless_token_fetches_total", result="ok") == 1
        metrics = keyless.metrics()
        assert not any(token in metrics for token in identity.issued)
    log = keyless.log()
    assert " worker=0 " in log and " worker=1 " in log and " worker=supervisor " in log
    # one audit state file, in today's format, with both workers' calls merged into it
    calls = CallLog(keyless.confdir / STATE_FILE).entries()
    assert [(c["service"], c["handled"], c["count"]) for c in calls] == [
        ("search", "converted", 40)]
    assert not any(token in log for token in identity.issued)


async def cold_requests(proxy_url: str, ca_path: str, count: int) -> list[int]:
    context = ssl.create_default_context(cafile=ca_path)
    connector = aiohttp.TCPConnector(limit=0, force_close=True, ssl=context)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with session.put(f"https://{HOST}/indexes/i/docs?api-version=2024-07-01",
                                   data=b"{}", proxy=proxy_url,
                                   headers={"api-key": DUMMY_KEY},
                                   timeout=aiohttp.ClientTimeout(total=90)) as response:
                return response.status

        return await asyncio.gather(*(one() for _ in range(count)))


def test_500_cold_requests_over_4_workers_make_one_identity_call(tmp_path, pki, search):
    fake, upstream = search
    # the identity endpoint takes its time: every request arrives while no token is cached
    with FakeIdentityEndpoint(mode="slow", delay_seconds=3.0) as identity, \
            stopped_cleanly(start_workers(tmp_path, 4, fake, pki, identity,
                                    "--token-timeout", "60")) as keyless:
        statuses = asyncio.run(cold_requests(keyless.proxy_url, keyless.ca_path, 500))
        assert statuses == [201] * 500
        assert not upstream.problems
        assert len(identity.calls_for(SEARCH_RESOURCE)) == 1
        per_worker = [keyless.metric("keyless_worker_requests_total", worker=str(n))
                      for n in range(4)]
        assert sum(per_worker) == 500 and all(count > 0 for count in per_worker), per_worker


def test_a_killed_worker_is_restarted_and_the_pod_is_unready_meanwhile(
    tmp_path, pki, search, monkeypatch
):
    fake, _ = search
    with FakeIdentityEndpoint() as identity, \
            stopped_cleanly(start_workers(tmp_path, 2, fake, pki, identity)) as keyless:
        route_app_through(monkeypatch, keyless)
        assert put().status_code == 201
        assert keyless.process is not None
        before = worker_pids(keyless.process.pid)
        assert len(before) == 2
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        poll(lambda: keyless.get("/readyz")[0] == 503, 10, "/readyz 503 without a worker")
        assert "not ready" in keyless.get("/readyz")[1]
        # the other worker serves while the victim is away
        assert [put().status_code for _ in range(5)] == [201] * 5
        poll(lambda: keyless.get("/readyz")[0] == 200, 60, "ready again")
        after = worker_pids(keyless.process.pid)
        assert len(after) == 2 and victim not in after
        assert keyless.metric("keyless_worker_restarts_total") == 1
        assert [put().status_code for _ in range(10)] == [201] * 10
        # one token call for the pod, the restarted worker included
        assert len(identity.calls) == 1


def test_sigterm_lets_every_in_flight_request_finish_then_all_exit_0(
    tmp_path, pki, search, monkeypatch
):
    fake, upstream = search
    upstream.slow_seconds = 3.0
    with FakeIdentityEndpoint() as identity:
        keyless = start_workers(tmp_path, 2, fake, pki, identity)
        assert keyless.process is not None
        workers = worker_pids(keyless.process.pid)
        route_app_through(monkeypatch, keyless)
        assert put().status_code == 201  # a token is cached
        results: list[int] = []
        seen = len(upstream.seen)
        threads = [threading.Thread(target=lambda: results.append(put("/slow/docs").status_code))
                   for _ in range(8)]
        for thread in threads:
            thread.start()
        poll(lambda: len(upstream.seen) >= seen + 8, 20, "the slow requests reached upstream")
        keyless.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=30)
        assert results == [201] * 8
        assert keyless.process.wait(timeout=30) == 0, keyless.log()
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
        assert "draining" in keyless.log()


def test_a_token_error_is_refused_with_the_supervisors_reason_not_a_hang(
    tmp_path, pki, search, monkeypatch
):
    fake, upstream = search
    with FakeIdentityEndpoint(mode="error") as identity, \
            stopped_cleanly(start_workers(tmp_path, 2, fake, pki, identity,
                                    "--token-timeout", "5")) as keyless:
        route_app_through(monkeypatch, keyless)
        seen = len(upstream.seen)
        started = time.monotonic()
        refused = put()
        assert time.monotonic() - started < 15
        assert refused.status_code == 503, refused.text
        # the supervisor's reason, as one process would give it, not a relay error
        assert refused.json()["error"]["message"].startswith(
            "could not get a token for scope https://search.azure.com/.default "
            "(identity default): ClientAuthenticationError: ")
        assert len(upstream.seen) == seen, "a request without a token reached the service"


def test_a_port_taken_fails_the_start_and_no_worker_stays(tmp_path, pki, search):
    fake, _ = search
    with FakeIdentityEndpoint() as identity, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        keyless = KeylessProcess(tmp_path / "taken", [
            "--workers", "2", "--connect-to", f"{HOST}:443:127.0.0.1:{fake.port}",
        ], {**identity.env(), **DEAD_PROXY_ENV})
        keyless.port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="exited with 2"):
            keyless.start(timeout=60)
        assert "before it was ready" in keyless.log()


def test_workers_of_a_killed_supervisor_drain_and_exit(tmp_path, pki, search):
    fake, _ = search
    with FakeIdentityEndpoint() as identity:
        keyless = start_workers(tmp_path, 2, fake, pki, identity)
        assert keyless.process is not None
        workers = worker_pids(keyless.process.pid)
        keyless.process.kill()
        keyless.process.wait(timeout=10)
        poll(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 30,
             "the orphaned workers exited")
        assert "the supervisor is gone: draining" in keyless.log()


def test_the_token_socket_answers_only_the_workers(tmp_path, pki, search, monkeypatch):
    fake, _ = search
    with FakeIdentityEndpoint() as identity, \
            stopped_cleanly(start_workers(tmp_path, 2, fake, pki, identity)) as keyless:
        route_app_through(monkeypatch, keyless)
        assert put().status_code == 201  # the supervisor holds a token now
        assert keyless.process is not None
        worker = worker_pids(keyless.process.pid)[0]
        environ = dict(item.split("=", 1) for item in Path(
            f"/proc/{worker}/environ").read_text().split("\0") if "=" in item)
        path = environ["KEYLESS_INTERNAL_SUPERVISOR_SOCKET"]
        assert oct(Path(path).parent.stat().st_mode & 0o777) == "0o700"
        with socket.socket(socket.AF_UNIX) as stranger:  # this test is not a worker
            stranger.settimeout(10)
            stranger.connect(path)
            # The supervisor checks the peer's credentials on accept and may close before
            # our request is written (BrokenPipe) or read (ConnectionReset): both mean
            # "disconnected with nothing handed out", as does a clean EOF.
            try:
                stranger.sendall(b'{"op": "token", "identity": null, '
                                 b'"scope": "https://search.azure.com/.default"}\n')
                answer = stranger.recv(65536)
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
            assert answer == b""  # closed, nothing handed out
        assert "not a worker" in keyless.log()


def test_reverse_mode_under_two_workers(tmp_path, pki, search):
    """A reverse https mode binds TCP and UDP in mitmproxy; under --workers its port is
    shared over TCP (the app speaks plain HTTP to it)."""
    fake, upstream = search
    with FakeIdentityEndpoint() as identity:
        reverse_port = free_port()
        with stopped_cleanly(start_workers(tmp_path, 2, fake, pki, identity,
                                 "--reverse", f"{reverse_port}=https://{HOST}")) as keyless:
            seen = len(upstream.seen)
            answers = []
            for _ in range(20):
                with requests.Session() as app:  # a new connection each
                    app.trust_env = False  # no proxy: the reverse port is the service
                    answers.append(app.put(f"http://127.0.0.1:{reverse_port}/indexes/i/docs"
                                           "?api-version=2024-07-01", data=b"{}",
                                           headers={"api-key": DUMMY_KEY}, timeout=30))
            assert [a.status_code for a in answers] == [201] * 20
            assert len(upstream.seen) == seen + 20 and not upstream.problems
            per_worker = [keyless.metric("keyless_worker_requests_total", worker=str(n))
                          for n in range(2)]
            assert sum(per_worker) == 20 and all(count > 0 for count in per_worker), per_worker
