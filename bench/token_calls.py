"""What one keyless pod asks of its identity endpoint: calls per (identity, scope), when, and
what happens while the endpoint fails. The figures behind docs/scale.md.

    python -m bench.token_calls [--scenario steady|failing|short-lived|all] [--out FILE]

Every pod is the real keyless (`--workers 1` and `--workers 2` side by side, each with its
own fake managed-identity endpoint, the App Service protocol that azure-identity really
speaks), reverse mode to a local HTTPS upstream that demands a Bearer token.

- steady: 5 scopes fetched at start (`--ready-scopes`), tokens that live 60 s
  (`--token-margin 5`), c=10 load for 65 s: how many calls per scope, and when.
- failing: the endpoint answers 500 / 429 (Retry-After: 1) / nothing, cache cold, c=10 load
  for 30 s: calls per second the pod makes, what the app gets.
- short-lived: tokens of 400 s with `--token-margin 350` (a margin above azure-identity's own
  300 s refresh offset), one request every 0.2 s for 110 s: when requests fail.

Only loopback; every loop is bounded in count and time; no timing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from bench.run import (
    BENCH_HOST,
    DEAD_PROXY_ENV,
    PATH,
    SHARED_KEY_HEADERS,
    keyless_args,
    spawn_with_port,
    stop_process,
)
from tests.support.azurite import TestPKI, free_port
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess
from tests.support.load import run_load

SCOPES = ("https://storage.azure.com/.default", "https://vault.azure.net/.default",
          "https://servicebus.azure.net/.default", "https://cosmos.azure.com/.default",
          "https://ossrdbms-aad.database.windows.net/.default")


class Pods:
    """The upstream, and keyless pods started on demand (each stopped at the end)."""

    def __init__(self, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.workdir, self.stack = workdir, stack
        self.pki = TestPKI(workdir / "pki")
        cert, key = self.pki.issue_server_cert(BENCH_HOST)
        upstream, self.upstream_port = spawn_with_port(
            [sys.executable, "-m", "tests.support.fast_upstream", "--cert", cert, "--key", key,
             "--require-bearer"])
        stack.callback(stop_process, upstream)
        self.count = 0

    def start(self, workers: int, endpoint: FakeIdentityEndpoint, *extra: str,
              wait_ready: bool = True) -> str:
        """A pod; returns the URL of its reverse port (plain HTTP in, TLS to the upstream)."""
        self.count += 1
        port = free_port()
        keyless = KeylessProcess(self.workdir / f"keyless-{self.count}", [
            *keyless_args(self.pki, f"{BENCH_HOST}:443:127.0.0.1:{self.upstream_port}"),
            "--reverse", f"{port}=https://{BENCH_HOST}", "--workers", str(workers), *extra,
        ], {**endpoint.env(), **DEAD_PROXY_ENV}).start(timeout=90, wait_ready=wait_ready)
        self.stack.callback(keyless.stop)
        return f"http://127.0.0.1:{port}{PATH}"

    def endpoint(self, **options: Any) -> FakeIdentityEndpoint:
        return self.stack.enter_context(FakeIdentityEndpoint(**options))


async def load(url: str, pki: TestPKI, seconds: float, concurrency: int = 10) -> dict[str, Any]:
    result = await run_load(url, proxy=None, ca_file=pki.ca_pem_path, total=1_000_000,
                            concurrency=concurrency, max_seconds=seconds,
                            headers=SHARED_KEY_HEADERS)
    return {"requests": result.requests, "statuses": dict(result.statuses),
            "errors": dict(result.errors), "seconds": round(result.seconds, 1)}


async def probe(url: str, seconds: float, every: float) -> list[tuple[float, int]]:
    """One request every `every` seconds for `seconds`: (time since start, status)."""
    answers: list[tuple[float, int]] = []
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        for _ in range(int(seconds / every) + 1):  # bounded by count and by time
            sent = time.monotonic()
            if sent - started > seconds:
                break
            try:
                async with session.get(url, headers=SHARED_KEY_HEADERS,
                                       timeout=aiohttp.ClientTimeout(total=15)) as response:
                    await response.read()
                    answers.append((round(sent - started, 1), response.status))
            except (aiohttp.ClientError, TimeoutError):
                answers.append((round(sent - started, 1), 0))
            await asyncio.sleep(max(0.0, every - (time.monotonic() - sent)))
    return answers


def calls_by_resource(endpoint: FakeIdentityEndpoint) -> dict[str, list[float]]:
    """Each resource's call times, in seconds since the endpoint's first call."""
    calls = endpoint.calls
    if not calls:
        return {}
    first = min(c["time"] for c in calls)
    found: dict[str, list[float]] = {}
    for call in calls:
        found.setdefault(call["resource"], []).append(round(call["time"] - first, 1))
    return found


def steady(pods: Pods, seconds: float = 65.0) -> dict[str, Any]:
    endpoints = {w: pods.endpoint(lifetime_seconds=60) for w in (1, 2)}
    urls = {w: pods.start(w, endpoints[w], "--token-margin", "5",
                          *[arg for scope in SCOPES for arg in ("--ready-scopes", scope)])
            for w in (1, 2)}
    started = time.monotonic()

    async def both() -> list[dict[str, Any]]:
        return await asyncio.gather(*(load(urls[w], pods.pki, seconds) for w in (1, 2)))

    loads = dict(zip((1, 2), asyncio.run(both()), strict=True))
    window = time.monotonic() - started
    return {str(w): {"load": loads[w], "window_seconds": round(window, 1),
                     "calls": calls_by_resource(endpoints[w]),
                     "calls_total": len(endpoints[w].calls)} for w in (1, 2)}


def failing(pods: Pods, mode: str, seconds: float = 30.0) -> dict[str, Any]:
    endpoints = {w: pods.endpoint(mode="ok") for w in (1, 2)}
    urls = {w: pods.start(w, endpoints[w]) for w in (1, 2)}
    for endpoint in endpoints.values():
        endpoint.mode = mode  # type: ignore[assignment]

    async def both() -> list[dict[str, Any]]:
        return await asyncio.gather(*(load(urls[w], pods.pki, seconds) for w in (1, 2)))

    loads = dict(zip((1, 2), asyncio.run(both()), strict=True))
    results = {}
    for w in (1, 2):
        calls = endpoints[w].calls
        gaps = [round(b["time"] - a["time"], 2) for a, b in itertools.pairwise(calls)]
        results[str(w)] = {"load": loads[w], "calls": len(calls),
                           "calls_per_second": round(len(calls) / seconds, 2),
                           "statuses_at_endpoint": dict(Counter(str(c["status"]) for c in calls)),
                           "largest_gaps_s": sorted(gaps)[-5:]}
    return results


def short_lived(pods: Pods, seconds: float = 110.0) -> dict[str, Any]:
    endpoint = pods.endpoint(lifetime_seconds=400)
    url = pods.start(1, endpoint, "--token-margin", "350",
                     "--ready-scopes", "https://storage.azure.com/.default")
    answers = asyncio.run(probe(url, seconds, 0.2))
    failed = [t for t, status in answers if status != 200]
    return {"requests": len(answers), "statuses": dict(Counter(s for _, s in answers)),
            "first_failure_s": failed[0] if failed else None,
            "last_failure_s": failed[-1] if failed else None,
            "calls": calls_by_resource(endpoint)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("steady", "failing", "short-lived", "all"),
                        default="all")
    parser.add_argument("--seconds", type=float, help="override each scenario's duration")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    timing = {"seconds": args.seconds} if args.seconds else {}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="keyless-bench-tokens-") as workdir, \
            contextlib.ExitStack() as stack:
        pods = Pods(Path(workdir), stack)
        if args.scenario in ("steady", "all"):
            results["steady"] = steady(pods, **timing)
            print("steady:", json.dumps(results["steady"]))
        if args.scenario in ("failing", "all"):
            results["failing"] = {mode: failing(pods, mode, **timing)
                                  for mode in ("error", "throttle", "drop")}
            print("failing:", json.dumps(results["failing"]))
        if args.scenario in ("short-lived", "all"):
            results["short_lived"] = short_lived(pods, **timing)
            print("short-lived:", json.dumps(results["short_lived"]))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
