"""The Grafana dashboard queries only metrics keyless really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "keyless-dashboard.json"


def test_every_dashboard_query_names_an_exported_metric(keyless):
    # families are listed even before their first sample (labelled counters start empty)
    exported = {family.name for family in text_string_to_metric_families(keyless.metrics())}
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(expressions) >= 12
    for expr in expressions:
        for name in re.findall(r"\b(keyless_[a-z_]+)", expr):
            family = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert family in exported, f"{name} in the dashboard is not exported by keyless"
