"""Suite-wide rules: no silent gaps, and the hypothesis profiles.

A skipped or xfailed test is reported as a failure: `make test` either runs a test or says
why it could not (a missing prerequisite fails with its install command). This holds
everywhere, not only in CI.

Hypothesis profiles: `ci` (default, quick) and `fuzz` (the dedicated ≥ 10k-example run).

    HYPOTHESIS_PROFILE=fuzz make fuzz
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile(
    "fuzz", max_examples=10_000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


NO_GAPS = ("This suite allows no skip and no xfail: install the missing prerequisite "
           "(README, Tests) or fix the test.")


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """A skip or an xfail of a test (a marker, pytest.skip, importorskip, a fixture, a
    plugin) becomes a failure that names the reason."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if hasattr(report, "wasxfail") and (report.skipped or report.passed):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} is marked xfail ({report.wasxfail}). {NO_GAPS}"
    elif report.skipped:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} did not run: {skip_reason(report)}. {NO_GAPS}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """The same for a whole module skipped while collecting (importorskip at the top)."""
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if report.skipped:
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} was not collected: {skip_reason(report)}. " \
            + NO_GAPS
