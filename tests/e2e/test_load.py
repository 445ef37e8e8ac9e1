"""Load and soak, bounded: 100k requests at concurrency 50 through keyless, no proxy errors.

KEYLESS_LOAD_REQUESTS sets the count (default 100000). No timing is asserted: the run is
bounded at 25 minutes (it takes a few; 7 on a 2-core machine shared by many test runs) and
only fails on that bound when the machine is too slow to reach the count at all.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import DEAD_PROXY_ENV
from tests.support.keyless import KeylessProcess
from tests.support.load import run_load

pytestmark = pytest.mark.e2e
HOST = "loadtest.blob.core.windows.net"
TOTAL = int(os.environ.get("KEYLESS_LOAD_REQUESTS", "100000"))
MAX_SECONDS = 25 * 60


@pytest.fixture(scope="module")
def upstream(pki) -> Iterator[int]:
    cert, key = pki.issue_server_cert(HOST)
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fast_upstream", "--cert", cert, "--key", key,
         "--require-bearer"], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield json.loads(process.stdout.readline())["port"]
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.timeout(MAX_SECONDS + 300)
def test_100k_requests_at_concurrency_50_without_proxy_errors(tmp_path, pki, module_identity,
                                                               upstream):
    process = KeylessProcess(tmp_path, [
        "--connect-to", f"{HOST}:443:127.0.0.1:{upstream}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
        "--log-level", "warning",
    ], {**module_identity.env(), **DEAD_PROXY_ENV}).start()
    rss: dict[str, int] = {"start": process.rss_bytes()}
    try:
        result = asyncio.run(run_load(
            f"https://{HOST}/c/blob?comp=metadata", proxy=process.proxy_url,
            ca_file=process.ca_path, total=TOTAL, concurrency=50, max_seconds=MAX_SECONDS,
            headers={"Authorization": "SharedKey loadtest:c2lnbmF0dXJl",
                     "x-ms-version": "2021-08-06"},
            checkpoint=lambda name: rss.__setitem__(name, process.rss_bytes()),
        ))
        rss["end"] = process.rss_bytes()
    finally:
        assert process.stop() == 0, process.log()[-2000:]
    mib = {k: round(v / 2**20, 1) for k, v in rss.items()}
    print(f"\nload: {result.requests} requests in {result.seconds:.1f}s "
          f"({result.requests / result.seconds:.0f} req/s), statuses {dict(result.statuses)}, "
          f"errors {dict(result.errors)}, keyless RSS MiB {mib}")
    assert result.requests == TOTAL, (
        f"the machine reached only {result.requests} of {TOTAL} requests within its "
        f"{MAX_SECONDS} s bound ({result.requests / result.seconds:.0f} req/s)")
    assert result.failures == 0, (dict(result.statuses), dict(result.errors))
    # steady state: no growth worth the name between the middle and the end of the run
    assert rss["end"] < rss["middle"] * 1.2, mib
