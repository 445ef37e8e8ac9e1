"""keyless' benchmark suite: direct vs plain mitmdump vs keyless, measured side by side.

    python -m bench.run [--smoke] [--out DIR] [--profile FILE]

Everything runs on 127.0.0.1 with real processes: a fast aiohttp HTTPS upstream, a streaming
upstream for large bodies, Azurite (HTTPS, --oauth basic), a fake managed-identity endpoint,
plain mitmdump with a no-op addon, and keyless. Every load loop is bounded in count and time.
Only ratios measured in the same run mean anything (the machine is shared); nothing here
asserts an absolute timing. With --out, writes DIR/benchmarks.json and DIR/benchmarks.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.azurite import ACCOUNT, WRONG_KEY, Azurite, TestPKI, free_port
from tests.support.identity_endpoint import FakeIdentityEndpoint, make_token
from tests.support.keyless import KeylessProcess
from tests.support.load import LoadResult, run_load

REPO = Path(__file__).resolve().parents[1]
BENCH_HOST = "bench.blob.core.windows.net"  # catalog host served by the fast upstream
BIG_HOST = "big.blob.core.windows.net"  # catalog host served by the streaming upstream
BLOB_HOST = f"{ACCOUNT}.blob.core.windows.net"  # catalog host served by Azurite
STORAGE_RESOURCE = "https://storage.azure.com"
PATH = "/c/blob?comp=metadata"
# What the legacy app sends through keyless ...
SHARED_KEY_HEADERS = {"Authorization": "SharedKey bench:c2ln", "x-ms-version": "2021-08-06"}
# ... and what reaches the upstream after conversion; direct and mitmdump runs send this, so
# one upstream that demands a Bearer token serves every configuration (and proves conversion).
BEARER_HEADERS = {"Authorization": "Bearer " + "e" * 40, "x-ms-version": "2021-08-06"}
# keyless' own outgoing proxy variables point nowhere: token calls must not use them.
DEAD_PROXY_ENV = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
                  "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
                  "NO_PROXY": "", "no_proxy": ""}
MB = 1_000_000  # the issue's targets are in MB
PLAIN = "keyless (no pool, RSA CA)"  # keyless with only what mitmproxy itself does upstream


@dataclass(frozen=True)
class Profile:
    """Sizes and bounds of one run."""

    name: str
    rounds: int  # interleaved rounds per HTTP measurement
    seconds: float  # length of one timed HTTP run
    cap: int  # request cap of one timed HTTP run
    sdk_ops: int  # uploads (and as many downloads) per SDK round
    sdk_rounds: int
    large_bytes: int
    cold_requests: int
    soak_requests: int
    soak_seconds: float
    cold_delay: float  # how long the token endpoint takes to answer the first (only) call


FULL = Profile("full", rounds=3, seconds=4.0, cap=200_000, sdk_ops=200, sdk_rounds=2,
               large_bytes=1 << 30, cold_requests=500, soak_requests=100_000,
               soak_seconds=420.0, cold_delay=2.0)
SMOKE = Profile("smoke", rounds=1, seconds=0.7, cap=3_000, sdk_ops=20, sdk_rounds=1,
                large_bytes=64 << 20, cold_requests=500, soak_requests=2_000,
                soak_seconds=20.0, cold_delay=1.0)


# -- processes -----------------------------------------------------------------------------


def spawn_with_port(command: list[str], timeout: float = 20.0) -> tuple[subprocess.Popen[str], int]:
    """Start a server that prints {"port": N} on its first stdout line."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    if not line:
        process.kill()
        raise RuntimeError(f"{command[:3]} did not report its port")
    return process, int(json.loads(line)["port"])


def stop_process(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Mitmdump:
    """Plain mitmdump with a no-op addon, configured like keyless' core (lazy upstream
    connections, streamed bodies), verifying the upstream against the test CA."""

    def __init__(self, workdir: Path, upstream_ca: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.confdir = workdir / "mitmdump-conf"
        self.upstream_ca = upstream_ca
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "mitmdump.log"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_path(self) -> str:
        return str(self.confdir / "mitmproxy-ca-cert.pem")

    def start(self, timeout: float = 30.0) -> Mitmdump:
        command = [
            str(Path(sys.executable).with_name("mitmdump")), "-q",
            "--listen-host", "127.0.0.1", "--listen-port", str(self.port),
            "--set", f"confdir={self.confdir}",
            "--set", f"ssl_verify_upstream_trusted_ca={self.upstream_ca}",
            "--set", "connection_strategy=lazy",
            "--set", "stream_large_bodies=1",
            "-s", str(REPO / "bench" / "noop_addon.py"),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mitmdump exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                if Path(self.ca_path).exists():
                    return self
            time.sleep(0.1)
        raise RuntimeError("mitmdump did not start")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


def rsa_ca(directory: Path) -> list[str]:
    """--ca-cert/--ca-key for an RSA-2048 CA like mitmproxy's own (keyless makes ECDSA)."""
    from mitmproxy import certs

    certs.CertStore.create_store(directory, "rsa", 2048)
    pem = (directory / "rsa-ca.pem").read_text()
    split = pem.index("-----BEGIN CERTIFICATE-----")
    key, cert = directory / "rsa-ca.key", directory / "rsa-ca.crt"
    key.write_text(pem[:split])
    key.chmod(0o600)
    cert.write_text(pem[split:])
    return ["--ca-cert", str(cert), "--ca-key", str(key)]


def keyless_args(pki: TestPKI, *connect_to: str) -> list[str]:
    args = ["--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}", "--log-level", "warning"]
    for spec in connect_to:
        args += ["--connect-to", spec]
    return args


class RSSSampler:
    """Samples a process' RSS in a background thread."""

    def __init__(self, process: KeylessProcess, every: float = 0.5) -> None:
        self.process, self.every = process, every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append((time.monotonic() - started, self.process.rss_bytes()))
            self._stop.wait(self.every)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# -- statistics ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Tally:
    """Accumulates interleaved rounds of one configuration."""

    requests: int = 0
    seconds: float = 0.0
    failures: int = 0
    latencies: list[float] = field(default_factory=list)
    round_rps: list[float] = field(default_factory=list)

    def add(self, result: LoadResult) -> None:
        self.requests += result.requests
        self.seconds += result.seconds
        self.failures += result.failures
        self.latencies += result.latencies
        self.round_rps.append(result.requests / result.seconds if result.seconds else 0.0)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "rps": round(self.requests / self.seconds, 1) if self.seconds else 0.0,
            "round_rps": [round(r, 1) for r in self.round_rps],
            "p50_ms": round(percentile(self.latencies, 0.50) * 1000, 3),
            "p99_ms": round(percentile(self.latencies, 0.99) * 1000, 3),
            "failures": self.failures,
        }


def rotated(items: list[Any], by: int) -> list[Any]:
    by %= len(items)
    return items[by:] + items[:by]


# -- scenarios -------------------------------------------------------------------------------


@dataclass
class Target:
    """One way to reach the upstream: URL, proxy, CA the client trusts, headers."""

    name: str
    url: str
    proxy: str | None
    ca_file: str
    headers: dict[str, str]


async def load(target: Target, *, concurrency: int, new_conn: bool, total: int,
               seconds: float) -> LoadResult:
    return await run_load(target.url, proxy=target.proxy, ca_file=target.ca_file, total=total,
                          concurrency=concurrency, max_seconds=seconds, headers=target.headers,
                          new_connection_each_time=new_conn)


async def warm(target: Target) -> None:
    """Cert generation, the token cache, imports: nothing of it belongs in a timed run."""
    result = await load(target, concurrency=4, new_conn=False, total=100, seconds=30)
    if result.failures or result.requests < 100:
        raise RuntimeError(f"warm-up of {target.name} failed: {dict(result.statuses)} "
                           f"{dict(result.errors)}")


async def http_matrix(targets: list[Target], cases: list[tuple[str, int]],
                      profile: Profile) -> list[dict[str, Any]]:
    """Each case (connection mode, concurrency) for every target, rounds interleaved and the
    order rotated per round, so the machine's drift hits all of them alike."""
    for target in targets:
        await warm(target)
    tallies = {(mode, c, t.name): Tally() for mode, c in cases for t in targets}
    for r in range(profile.rounds):
        for mode, c in cases:
            for target in rotated(targets, r):
                result = await load(target, concurrency=c, new_conn=(mode == "new-conn"),
                                    total=profile.cap, seconds=profile.seconds)
                tallies[(mode, c, target.name)].add(result)
    return [{"mode": mode, "concurrency": c, "config": name, **tally.summary()}
            for (mode, c, name), tally in tallies.items()]


class StaticToken:
    """The direct-token baseline's TokenCredential: a ready token, as a credential with a
    warm cache would hand out."""

    def __init__(self) -> None:
        from azure.core.credentials import AccessToken

        self._token = AccessToken(make_token(STORAGE_RESOURCE), int(time.time()) + 3600)

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        return self._token


def sdk_scenario(azurite: Azurite, keyless: KeylessProcess, mitm: Mitmdump, pki: TestPKI,
                 profile: Profile) -> dict[str, Any]:
    """The real azure-storage-blob SDK, 1 KiB uploads and downloads against Azurite: the
    legacy app (wrong key) through keyless vs the SDK given a token directly; the same
    direct-token SDK through plain mitmdump shows what any interception costs."""
    from azure.storage.blob import BlobServiceClient

    direct = BlobServiceClient(azurite.blob_url, credential=StaticToken(),
                               connection_verify=pki.ca_pem_path)
    via_mitm = BlobServiceClient(azurite.blob_url, credential=StaticToken(),
                                 proxies={"https": mitm.proxy_url, "http": mitm.proxy_url},
                                 connection_verify=mitm.ca_path)
    legacy = BlobServiceClient.from_connection_string(
        f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
        f"BlobEndpoint=https://{BLOB_HOST}",
        proxies={"https": keyless.proxy_url, "http": keyless.proxy_url},
        connection_verify=keyless.ca_path,
    )
    name = f"bench{uuid.uuid4().hex[:10]}"
    direct.create_container(name)
    clients = {"direct-token SDK": direct.get_container_client(name),
               "direct-token SDK via mitmdump": via_mitm.get_container_client(name),
               "legacy SDK via keyless": legacy.get_container_client(name)}
    payload = os.urandom(1024)
    for label, client in clients.items():  # warm: connections, token, certificates
        for i in range(10):
            client.upload_blob(f"warm-{label[:6]}-{i}", payload, overwrite=True)
    tallies = {label: {"up": Tally(), "down": Tally()} for label in clients}
    for r in range(profile.sdk_rounds):
        for label, client in rotated(list(clients.items()), r):
            for op in ("up", "down"):
                latencies: list[float] = []
                started = time.perf_counter()
                for i in range(profile.sdk_ops):
                    blob = f"b{r}-{i}"
                    sent = time.perf_counter()
                    if op == "up":
                        client.upload_blob(blob, payload, overwrite=True)
                    else:
                        data = client.download_blob(f"b{r}-{i}").readall()
                        if data != payload:
                            raise RuntimeError(f"{label} downloaded the wrong bytes")
                    latencies.append(time.perf_counter() - sent)
                tallies[label][op].add(LoadResult(requests=len(latencies),
                                                  seconds=time.perf_counter() - started,
                                                  latencies=latencies))
    direct.delete_container(name)
    result: dict[str, Any] = {"ops_per_round": profile.sdk_ops, "rounds": profile.sdk_rounds}
    for label, ops in tallies.items():
        both = Tally()
        for tally in ops.values():
            both.requests += tally.requests
            both.seconds += tally.seconds
            both.latencies += tally.latencies
        result[label] = {"upload": ops["up"].summary(), "download": ops["down"].summary(),
                         "all": both.summary()}
    return result


async def chunks(size: int) -> AsyncIterator[bytes]:
    block = b"\xa5" * (1 << 20)
    left = size
    while left > 0:
        piece = block if left >= len(block) else block[:left]
        left -= len(piece)
        yield piece


async def transfer(target: Target, size: int) -> dict[str, float]:
    """One streamed upload and one streamed download of `size` bytes."""
    context = ssl.create_default_context(cafile=target.ca_file)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        started = time.perf_counter()
        async with session.put(target.url, proxy=target.proxy, data=chunks(size), timeout=timeout,
                               headers={**target.headers, "Content-Length": str(size),
                                        "x-ms-blob-type": "BlockBlob"}) as response:
            body = await response.json()
            if response.status != 200 or body.get("received") != size:
                raise RuntimeError(f"{target.name} upload: {response.status} {body}")
        up = time.perf_counter() - started
        started = time.perf_counter()
        received = 0
        async with session.get(f"{target.url}?size={size}", proxy=target.proxy,
                               headers=target.headers, timeout=timeout) as response:
            if response.status != 200:
                raise RuntimeError(f"{target.name} download: {response.status}")
            async for chunk in response.content.iter_chunked(1 << 20):
                received += len(chunk)
        down = time.perf_counter() - started
        if received != size:
            raise RuntimeError(f"{target.name} download: {received} of {size} bytes")
    return {"upload_s": round(up, 3), "download_s": round(down, 3),
            "upload_MBps": round(size / up / MB, 1), "download_MBps": round(size / down / MB, 1)}


def metric_sum(metrics_text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- the suite ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import mitmproxy.version

    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    free = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "free": free,
            "python": platform.python_version(), "mitmproxy": mitmproxy.version.VERSION,
            "kernel": platform.release()}


def run_suite(profile: Profile, workdir: Path, profile_out: str | None) -> dict[str, Any]:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "NO_PROXY",
                 "no_proxy", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE"):
        os.environ.pop(name, None)
    started = time.monotonic()
    results: dict[str, Any] = {"profile": profile.name, "machine": machine(), "timings": {}}

    def lap(name: str, since: float) -> None:
        results["timings"][name] = round(time.monotonic() - since, 1)
        print(f"  [{name}: {results['timings'][name]}s]", flush=True)

    pki = TestPKI(workdir / "pki")
    with contextlib.ExitStack() as stack:
        cert, key = pki.issue_server_cert(BENCH_HOST)
        fast, fast_port = spawn_with_port([sys.executable, "-m", "tests.support.fast_upstream",
                                           "--cert", cert, "--key", key, "--require-bearer"])
        stack.callback(stop_process, fast)
        big_cert, big_key = pki.issue_server_cert(BIG_HOST)
        big, big_port = spawn_with_port([sys.executable, "-m", "bench.stream_upstream",
                                         "--cert", big_cert, "--key", big_key])
        stack.callback(stop_process, big)
        azurite = stack.enter_context(Azurite(workdir / "azurite", pki))
        identity = stack.enter_context(FakeIdentityEndpoint())
        mitm = Mitmdump(workdir, pki.ca_pem_path).start()
        stack.callback(mitm.stop)
        keyless = KeylessProcess(workdir / "keyless", keyless_args(
            pki, f"{BENCH_HOST}:443:127.0.0.1:{fast_port}",
            f"{BLOB_HOST}:443:127.0.0.1:{azurite.blob_port}"),
            {**identity.env(), **DEAD_PROXY_ENV}).start()
        stack.callback(keyless.stop)

        ip_url = f"https://127.0.0.1:{fast_port}{PATH}"
        direct = Target("direct", ip_url, None, pki.ca_pem_path, BEARER_HEADERS)
        via_mitm = Target("mitmdump", ip_url, mitm.proxy_url, mitm.ca_path, BEARER_HEADERS)
        via_keyless = Target("keyless", f"https://{BENCH_HOST}{PATH}", keyless.proxy_url,
                             keyless.ca_path, SHARED_KEY_HEADERS)
        tunnel = Target("keyless (tunnel)", ip_url, keyless.proxy_url, pki.ca_pem_path,
                        BEARER_HEADERS)

        print("1-2. HTTPS through the proxy: keep-alive and a new connection per request",
              flush=True)
        t = time.monotonic()
        cases = [("keep-alive", 1), ("keep-alive", 10), ("new-conn", 1), ("new-conn", 10)]
        results["http"] = asyncio.run(http_matrix([direct, via_mitm, via_keyless], cases,
                                                  profile))
        lap("http", t)

        print("2b. new connection per request: what keyless' own upstream pool and ECDSA CA "
              "add (a keyless without them, run like mitmdump)", flush=True)
        t = time.monotonic()
        plain_args = [*keyless_args(pki, f"{BENCH_HOST}:443:127.0.0.1:{fast_port}"),
                      "--upstream-pool", "false", *rsa_ca(workdir / "rsa-ca")]
        plain = KeylessProcess(workdir / "keyless-plain", plain_args,
                               {**identity.env(), **DEAD_PROXY_ENV}).start()
        stack.callback(plain.stop)
        via_plain = Target(PLAIN, f"https://{BENCH_HOST}{PATH}", plain.proxy_url,
                           plain.ca_path, SHARED_KEY_HEADERS)
        results["http_plain"] = asyncio.run(http_matrix(
            [via_mitm, via_keyless, via_plain], [("new-conn", 1), ("new-conn", 10)], profile))
        plain.stop()
        lap("http_plain", t)

        print("3. a non-Azure host tunnelled through keyless", flush=True)
        t = time.monotonic()
        tunnelled_before = metric_sum(keyless.metrics(), "keyless_requests_total",
                                      outcome="tunnelled")
        results["tunnel"] = asyncio.run(http_matrix(
            [direct, tunnel], [("keep-alive", 1), ("keep-alive", 10), ("new-conn", 10)], profile))
        results["tunnel_connections_counted"] = metric_sum(
            keyless.metrics(), "keyless_requests_total", outcome="tunnelled") - tunnelled_before
        lap("tunnel", t)

        print("4. azure-storage-blob SDK against Azurite", flush=True)
        t = time.monotonic()
        results["sdk"] = sdk_scenario(azurite, keyless, mitm, pki, profile)
        lap("sdk", t)

        if profile_out:
            print("(profiling keyless under keep-alive load with py-spy)", flush=True)
            results["py_spy"] = profile_keyless(keyless, via_keyless, profile_out)
            print(results["py_spy"], flush=True)

        results["keyless_metrics_after_throughput"] = {
            "converted": metric_sum(keyless.metrics(), "keyless_requests_total",
                                    outcome="converted"),
            "token_calls": len(identity.calls),
        }

        print("5. a large upload and download", flush=True)
        t = time.monotonic()
        big_keyless = KeylessProcess(workdir / "keyless-big", keyless_args(
            pki, f"{BIG_HOST}:443:127.0.0.1:{big_port}"),
            {**identity.env(), **DEAD_PROXY_ENV}).start()
        stack.callback(big_keyless.stop)
        size = profile.large_bytes
        big_direct = Target("direct", f"https://127.0.0.1:{big_port}/c/big.bin", None,
                            pki.ca_pem_path, BEARER_HEADERS)
        big_via = Target("keyless", f"https://{BIG_HOST}/c/big.bin", big_keyless.proxy_url,
                         big_keyless.ca_path, SHARED_KEY_HEADERS)
        asyncio.run(transfer(big_via, 1 << 20))  # warm: token, certificate
        rss_before = big_keyless.rss_bytes()
        with RSSSampler(big_keyless) as sampler:
            large = {"bytes": size,
                     "direct": asyncio.run(transfer(big_direct, size)),
                     "keyless": asyncio.run(transfer(big_via, size))}
        large["keyless_rss_before_MB"] = round(rss_before / MB, 1)
        large["keyless_peak_rss_MB"] = round(big_keyless.peak_rss_bytes() / MB, 1)
        large["keyless_rss_samples"] = [(round(s, 1), r) for s, r in sampler.samples]
        results["large"] = large
        big_keyless.stop()
        lap("large", t)

        print("6. cold cache, concurrent requests: calls reaching the token endpoint", flush=True)
        t = time.monotonic()
        with FakeIdentityEndpoint(mode="slow",
                                  delay_seconds=profile.cold_delay) as cold_identity:
            cold = KeylessProcess(workdir / "keyless-cold", keyless_args(
                pki, f"{BENCH_HOST}:443:127.0.0.1:{fast_port}"),
                {**cold_identity.env(), **DEAD_PROXY_ENV}).start()
            try:
                result = asyncio.run(run_load(
                    f"https://{BENCH_HOST}{PATH}", proxy=cold.proxy_url, ca_file=cold.ca_path,
                    total=profile.cold_requests, concurrency=profile.cold_requests,
                    max_seconds=60, headers=SHARED_KEY_HEADERS))
                text = cold.metrics()
            finally:
                cold.stop()
            results["cold_cache"] = {
                "requests": result.requests,
                "statuses": {str(k): v for k, v in result.statuses.items()},
                "errors": dict(result.errors),
                "seconds": round(result.seconds, 2),
                "token_calls": len(cold_identity.calls),
                "token_calls_by_resource": sorted({str(c["resource"])
                                                   for c in cold_identity.calls}),
                "cache_misses": metric_sum(text, "keyless_token_cache_lookups_total",
                                           result="miss"),
                "cache_hits": metric_sum(text, "keyless_token_cache_lookups_total",
                                         result="hit"),
            }
        lap("cold_cache", t)

        print(f"7. keyless RSS across {profile.soak_requests} requests", flush=True)
        t = time.monotonic()
        results["soak"] = soak(workdir, pki, identity, fast_port, profile)
        lap("soak", t)

    results["timings"]["total"] = round(time.monotonic() - started, 1)
    results["targets"] = evaluate(results)
    return results


def soak(workdir: Path, pki: TestPKI, identity: FakeIdentityEndpoint, fast_port: int,
         profile: Profile) -> dict[str, Any]:
    process = KeylessProcess(workdir / "keyless-soak", keyless_args(
        pki, f"{BENCH_HOST}:443:127.0.0.1:{fast_port}"),
        {**identity.env(), **DEAD_PROXY_ENV}).start()
    rss: dict[str, int] = {}
    try:
        target = Target("keyless", f"https://{BENCH_HOST}{PATH}", process.proxy_url,
                        process.ca_path, SHARED_KEY_HEADERS)
        asyncio.run(warm(target))
        rss["start"] = process.rss_bytes()
        with RSSSampler(process, every=1.0) as sampler:
            result = asyncio.run(run_load(
                target.url, proxy=target.proxy, ca_file=target.ca_file,
                total=profile.soak_requests, concurrency=10, max_seconds=profile.soak_seconds,
                headers=target.headers,
                checkpoint=lambda name: rss.__setitem__(name, process.rss_bytes())))
        rss["end"] = process.rss_bytes()
        rss["peak"] = process.peak_rss_bytes()
    finally:
        process.stop()
    samples = sampler.samples
    half = len(samples) // 2
    first = [r for _, r in samples[:half]] or [rss["start"]]
    second = [r for _, r in samples[half:]] or [rss["end"]]
    middle = rss.get("middle", rss["start"])
    return {
        "requests": result.requests,
        "requested": profile.soak_requests,
        "seconds": round(result.seconds, 1),
        "rps": round(result.requests / result.seconds, 1),
        "failures": result.failures,
        "rss_start_MB": round(rss["start"] / MB, 1),
        "rss_middle_MB": round(middle / MB, 1),
        "rss_end_MB": round(rss["end"] / MB, 1),
        "rss_peak_MB": round(rss["peak"] / MB, 1),
        "first_half_mean_MB": round(sum(first) / len(first) / MB, 1),
        "second_half_mean_MB": round(sum(second) / len(second) / MB, 1),
        "growth_second_half": round(rss["end"] / middle - 1, 4),
        "rss_samples": [(round(s, 1), r) for s, r in samples],
    }


def profile_keyless(keyless: KeylessProcess, target: Target, out: str) -> str:
    """py-spy (raw, collapsed stacks) on keyless during 20 s of keep-alive c=10 load; returns
    the summary of bench.profile_summary."""
    from bench.profile_summary import summarise

    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    assert keyless.process is not None
    recorder = subprocess.Popen([pyspy, "record", "-d", "20", "-r", "250", "-f", "raw", "-p",
                                 str(keyless.process.pid), "-o", out, "--nonblocking"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        asyncio.run(load(target, concurrency=10, new_conn=False, total=1_000_000, seconds=21))
        output, _ = recorder.communicate(timeout=60)
    finally:
        stop_process(recorder)
    if not Path(out).exists():
        return f"py-spy wrote nothing: {output.strip()[-500:]}"
    return summarise(Path(out))


# -- targets, tables, plot -------------------------------------------------------------------


def row(results: dict[str, Any], section: str, mode: str, c: int, config: str) -> dict[str, Any]:
    return next(r for r in results[section]
                if r["mode"] == mode and r["concurrency"] == c and r["config"] == config)


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []

    def add(name: str, measured: str, value: float, goal: str, met: bool | None) -> None:
        targets.append({"name": name, "measured": measured, "value": value, "target": goal,
                        "met": met})

    ratio_targets = (("keep-alive", "keep-alive req/s", 0.95, ">= 0.95x"),
                     ("new-conn", "new connection each request", 2.0, ">= 2x (aim)"))
    for mode, label, floor, goal in ratio_targets:
        for c in (1, 10):
            k, m = row(results, "http", mode, c, "keyless"), \
                row(results, "http", mode, c, "mitmdump")
            ratio = k["rps"] / m["rps"]
            add(f"{label} c={c}: keyless / mitmdump",
                f"{k['rps']:.0f} / {m['rps']:.0f} req/s", ratio, goal, ratio >= floor)
    k, d = row(results, "http", "keep-alive", 1, "keyless"), \
        row(results, "http", "keep-alive", 1, "direct")
    added = k["p50_ms"] - d["p50_ms"]
    add("added p50, keep-alive c=1: keyless - direct",
        f"{k['p50_ms']:.2f} - {d['p50_ms']:.2f} ms", added, "<= 1.2 ms", added <= 1.2)
    m = row(results, "http", "keep-alive", 1, "mitmdump")
    add("(info) added p50, keep-alive c=1: mitmdump - direct",
        f"{m['p50_ms']:.2f} - {d['p50_ms']:.2f} ms", m["p50_ms"] - d["p50_ms"], "-", None)
    for c in (1, 10):
        k, m, p = (row(results, "http_plain", "new-conn", c, name)
                   for name in ("keyless", "mitmdump", PLAIN))
        add(f"(info) new connection c={c}: keyless / mitmdump / {PLAIN}",
            f"{k['rps']:.0f} / {m['rps']:.0f} / {p['rps']:.0f} req/s", k["rps"] / p["rps"],
            "-", None)
    for mode, c in (("keep-alive", 1), ("keep-alive", 10), ("new-conn", 10)):
        t, d = row(results, "tunnel", mode, c, "keyless (tunnel)"), \
            row(results, "tunnel", mode, c, "direct")
        add(f"(info) non-Azure host tunnelled, {mode} c={c}: keyless / direct",
            f"{t['rps']:.0f} / {d['rps']:.0f} req/s", t["rps"] / d["rps"], "-", None)
    cold = results["cold_cache"]
    add(f"token calls, {cold['requests']} concurrent requests on a cold cache",
        f"{cold['token_calls']} call(s)", cold["token_calls"], "exactly 1",
        cold["token_calls"] == 1)
    sdk = results["sdk"]
    k_ops = sdk["legacy SDK via keyless"]["all"]["rps"]
    d_ops = sdk["direct-token SDK"]["all"]["rps"]
    add("SDK 1 KiB upload+download ops/s: legacy via keyless / direct-token",
        f"{k_ops:.0f} / {d_ops:.0f} ops/s", k_ops / d_ops, ">= 0.8x", k_ops / d_ops >= 0.8)
    m_ops = sdk["direct-token SDK via mitmdump"]["all"]["rps"]
    add("(info) SDK ops/s: legacy via keyless / direct-token via mitmdump",
        f"{k_ops:.0f} / {m_ops:.0f} ops/s", k_ops / m_ops, "-", None)
    for op in ("upload", "download"):
        k_p50 = sdk["legacy SDK via keyless"][op]["p50_ms"]
        m_p50 = sdk["direct-token SDK via mitmdump"][op]["p50_ms"]
        d_p50 = sdk["direct-token SDK"][op]["p50_ms"]
        add(f"(info) SDK 1 KiB {op} p50: keyless / mitmdump / direct",
            f"{k_p50:.1f} / {m_p50:.1f} / {d_p50:.1f} ms", k_p50 / d_p50, "-", None)
    large = results["large"]
    gib = large["bytes"] / (1 << 30)
    size = f"{gib:g} GiB" if gib >= 1 else f"{large['bytes'] >> 20} MiB"
    peak = large["keyless_peak_rss_MB"]
    add(f"keyless peak RSS, {size} upload + download", f"{peak:.1f} MB", peak, "<= 150 MB",
        peak <= 150)
    for way in ("upload", "download"):
        k_rate, d_rate = large["keyless"][f"{way}_MBps"], large["direct"][f"{way}_MBps"]
        add(f"(info) {size} {way} MB/s: keyless / direct", f"{k_rate:.0f} / {d_rate:.0f} MB/s",
            k_rate / d_rate, "-", None)
    soak_ = results["soak"]
    n = soak_["requests"]
    add(f"steady RSS after {n} requests", f"{soak_['rss_end_MB']:.1f} MB", soak_["rss_end_MB"],
        "<= 130 MB", soak_["rss_end_MB"] <= 130)
    growth = soak_["growth_second_half"]
    add(f"RSS growth over the second half of {n} requests",
        f"{soak_['rss_middle_MB']:.1f} -> {soak_['rss_end_MB']:.1f} MB", growth * 100,
        "< 5 %", growth < 0.05)
    return targets


def fmt(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def tables(results: dict[str, Any]) -> str:
    out = ["| target | measured | ratio / value | target | |", "| --- | --- | --- | --- | --- |"]
    for t in results["targets"]:
        mark = {True: "met", False: "**missed**", None: ""}[t["met"]]
        out.append(f"| {t['name']} | {t['measured']} | {fmt(t['value'])} | {t['target']} | "
                   f"{mark} |")
    out += ["",
            "| case | config | req/s | p50 ms | p99 ms | requests | failures | req/s per round |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for section in ("http", "http_plain", "tunnel"):
        for r in results[section]:
            out.append(f"| {section}: {r['mode']} c={r['concurrency']} | {r['config']} | "
                       f"{r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                       f"{r['requests']} | {r['failures']} | "
                       f"{', '.join(f'{x:.0f}' for x in r['round_rps'])} |")
    sdk = results["sdk"]
    for label in ("direct-token SDK", "direct-token SDK via mitmdump", "legacy SDK via keyless"):
        for op in ("upload", "download"):
            r = sdk[label][op]
            out.append(f"| SDK 1 KiB {op} (Azurite) | {label} | {r['rps']:.0f} | "
                       f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['requests']} | "
                       f"{r['failures']} | {', '.join(f'{x:.0f}' for x in r['round_rps'])} |")
    large, cold, soak_ = results["large"], results["cold_cache"], results["soak"]
    out += ["",
            f"- large transfer, {large['bytes']} bytes: direct {large['direct']}, keyless "
            f"{large['keyless']}; keyless RSS before {large['keyless_rss_before_MB']} MB, "
            f"peak {large['keyless_peak_rss_MB']} MB",
            f"- cold cache: {cold['requests']} requests in {cold['seconds']} s, statuses "
            f"{cold['statuses']}, errors {cold['errors']}, token calls {cold['token_calls']} "
            f"({', '.join(cold['token_calls_by_resource'])}), cache misses "
            f"{cold['cache_misses']:.0f}, hits {cold['cache_hits']:.0f}",
            f"- soak: {soak_['requests']} of {soak_['requested']} requests in "
            f"{soak_['seconds']} s ({soak_['rps']} req/s, {soak_['failures']} failures); RSS "
            f"start {soak_['rss_start_MB']}, middle {soak_['rss_middle_MB']}, end "
            f"{soak_['rss_end_MB']}, peak {soak_['rss_peak_MB']} MB; mean of samples first "
            f"half {soak_['first_half_mean_MB']}, second half {soak_['second_half_mean_MB']} MB",
            f"- phase times (s): {results['timings']}"]
    return "\n".join(out)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [("keep-alive", 1), ("keep-alive", 10), ("new-conn", 1), ("new-conn", 10)]
    configs = ["direct", "mitmdump", "keyless"]
    colors = {"direct": "#888888", "mitmdump": "#4c72b0", "keyless": "#dd8452"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    width = 0.26
    for ax, metric, label in ((axes[0], "rps", "req/s (higher is better)"),
                              (axes[1], "p50_ms", "p50 latency, ms (lower is better)")):
        for i, config in enumerate(configs):
            values = [row(results, "http", m, c, config)[metric] for m, c in cases]
            xs = [x + (i - 1) * width for x in range(len(cases))]
            bars = ax.bar(xs, values, width, label=config, color=colors[config])
            ax.bar_label(bars, fmt="%.0f" if metric == "rps" else "%.1f", fontsize=7)
        ax.set_xticks(range(len(cases)), [f"{m}\nc={c}" for m, c in cases])
        ax.set_title(label)
        ax.legend()
    samples = results["soak"]["rss_samples"]
    axes[2].plot([s for s, _ in samples], [r / MB for _, r in samples], color=colors["keyless"])
    axes[2].set_title(f"keyless RSS (MB), {results['soak']['requests']} requests at c=10")
    axes[2].set_xlabel("seconds")
    axes[2].set_ylim(bottom=0)
    fig.suptitle(f"keyless benchmarks ({results['profile']} run, "
                 f"{results['machine']['nproc']} cores, same run side by side)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small sizes (under a minute)")
    parser.add_argument("--out", type=Path, help="write benchmarks.json and benchmarks.png here")
    parser.add_argument("--profile", metavar="FILE",
                        help="also record keyless under load with py-spy (raw collapsed "
                             "stacks to FILE) and print where its CPU time goes")
    parser.add_argument("--keep-workdir", action="store_true")
    args = parser.parse_args(argv)
    profile = SMOKE if args.smoke else FULL
    workdir = Path(tempfile.mkdtemp(prefix="keyless-bench-"))
    print(f"keyless benchmarks, {profile.name} run, workdir {workdir}", flush=True)
    try:
        results = run_suite(profile, workdir, args.profile)
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(tables(results))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmarks.json").write_text(json.dumps(results, indent=1))
        plot(results, args.out / "benchmarks.png")
        print(f"\nwrote {args.out / 'benchmarks.json'} and {args.out / 'benchmarks.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
