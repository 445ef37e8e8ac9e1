"""bench/mysql_bench.py runs (smoke size): every scenario through keyless and direct, one
token fetch for the whole run. No timing is asserted (the machine is shared)."""

from __future__ import annotations

import json

import pytest

from bench import mysql_bench

pytestmark = pytest.mark.e2e


def test_mysql_bench_smoke(tmp_path, capsys):
    out = tmp_path / "mysql.json"
    assert mysql_bench.main(["--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["mysql"]) == set(mysql_bench.SCENARIOS)
    for row in result["mysql"].values():
        assert len(row["direct_s"]) == len(row["keyless_s"]) == 1 and row["ratio"] > 0
    assert result["token_fetches"] == 1
    assert "keyless ÷ direct" in capsys.readouterr().out
