"""MySQL through keyless ÷ direct with the token, side by side in one run (mysqlslap).

    python -m bench.mysql_bench [--rounds 3] [--json FILE] [--smoke]

A real MariaDB (tests/support/mysql_server.py) with TLS for the Azure name and a user whose
password is the token; a fake identity endpoint that hands keyless that token; keyless with a
`--mysql` listener. Each scenario runs MariaDB's `mysqlslap` direct (TLS, the token as the
password: what the app would do without keyless) and through keyless (plain TCP on loopback,
a wrong password), alternating, `--rounds` times; the ratio of the medians is printed
(> 1: keyless is faster). Every run is bounded by mysqlslap's own counts and a timeout.

- steady:   8 clients, 1,000 `SELECT 1` each on one connection (keyless' relay cost per
            round trip: two more sends and receives, the most a query can pay);
- rows:     8 clients, 250 queries of 200 rows (~22 KB) each on one connection;
- connect:  4 clients, a new connection for every query (`--detach=1`: the login cost,
            keyless' own TLS upstream, its token cache: one token fetch for the whole run).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.azurite import TestPKI, free_port
from tests.support.identity_endpoint import FakeIdentityEndpoint, make_token
from tests.support.keyless import KeylessProcess
from tests.support.mysql_server import OSSRDBMS_RESOURCE, TEST_DATABASE, MariaDB

HOST = "benchmysql.mysql.database.azure.com"
USER = "bench_app"
SELECT_1 = "SELECT 1"
ROWS = "SELECT seq, REPEAT('x', 100) FROM seq_1_to_200"  # MariaDB's SEQUENCE engine
SCENARIOS = {
    "steady": (SELECT_1, ["--concurrency=8", "--number-of-queries=8000"]),
    "rows": (ROWS, ["--concurrency=8", "--number-of-queries=2000"]),
    "connect": (SELECT_1, ["--concurrency=4", "--number-of-queries=2000", "--detach=1"]),
}
RUN_TIMEOUT = 300
AVERAGE = re.compile(r"Average number of seconds to run all queries: ([0-9.]+) seconds")


def mysqlslap() -> str:
    found = shutil.which("mysqlslap") or shutil.which("mariadb-slap")
    if found is None:
        sys.exit("mysqlslap is missing: apt-get install -y mariadb-client")
    return found


def run(binary: str, port: int, password: str, tls: list[str],
        scenario: tuple[str, list[str]]) -> float:
    query, options = scenario
    command = [binary, "--no-defaults", "--host=127.0.0.1", f"--port={port}", f"--user={USER}",
               f"--password={password}", f"--create-schema={TEST_DATABASE}", "--no-drop",
               f"--query={query}", "--iterations=1", *tls, *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    match = AVERAGE.search(done.stdout)
    if done.returncode != 0 or match is None:
        # never print the command: it holds the token
        sys.exit(f"mysqlslap failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return float(match.group(1))


def smaller(option: str) -> str:
    if option.startswith("--number-of-queries="):
        return f"--number-of-queries={int(option.split('=')[1]) // 10}"
    return option


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true",
                        help="one round of a tenth of the queries (the test suite's check)")
    args = parser.parse_args(argv)
    scenarios = {name: (query, [smaller(option) for option in options])
                 for name, (query, options) in SCENARIOS.items()} if args.smoke else SCENARIOS
    rounds = 1 if args.smoke else args.rounds
    binary = mysqlslap()
    results: dict[str, dict[str, float | list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="keyless-mysql-bench-") as tmp, \
            FakeIdentityEndpoint() as identity:
        work = Path(tmp)
        pki = TestPKI(work / "pki")
        token = make_token(OSSRDBMS_RESOURCE, lifetime=3600)
        identity.queue_tokens(OSSRDBMS_RESOURCE, token)
        with MariaDB(work / "mariadb", pki.issue_server_cert(HOST), pki.ca_pem_path) as db:
            db.create_token_user(USER, token)
            listen = free_port()
            keyless = KeylessProcess(work / "keyless", [
                "--mysql", f"{listen}={HOST}",
                "--connect-to", f"{HOST}:3306:127.0.0.1:{db.port}",
                "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
                "--log-level", "warning",
            ], identity.env()).start()
            try:
                direct_tls = [f"--ssl-ca={pki.ca_pem_path}", "--ssl-verify-server-cert"]
                for name, scenario in scenarios.items():
                    direct, through = [], []
                    for _ in range(rounds):
                        direct.append(run(binary, db.port, token, direct_tls, scenario))
                        through.append(run(binary, listen, "wrong-password", ["--skip-ssl"],
                                           scenario))
                    ratio = statistics.median(direct) / statistics.median(through)
                    results[name] = {"direct_s": direct, "keyless_s": through,
                                     "ratio": round(ratio, 3)}
                fetches = len(identity.calls_for(OSSRDBMS_RESOURCE))
            finally:
                keyless.stop()
    print(f"{'scenario':<10} {'direct s (median)':>18} {'keyless s (median)':>19} "
          f"{'keyless ÷ direct':>17}")
    for name, row in results.items():
        print(f"{name:<10} {statistics.median(row['direct_s']):>18.3f} "
              f"{statistics.median(row['keyless_s']):>19.3f} {row['ratio']:>16.2f}x")
    print(f"token fetches for the whole run: {fetches}")
    if args.json:
        args.json.write_text(json.dumps({"mysql": results, "token_fetches": fetches}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
