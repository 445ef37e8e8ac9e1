"""The order of keyless' request addons is part of their contract (proxy/mitm.py
request_chain): this test fails when a reordering would let a request leave unchecked."""

from __future__ import annotations

from addons.azure_auth import AzureAuth
from addons.failclosed import FailClosed
from addons.pool import PoolUpstream
from addons.replay import ReplayUnauthorized
from addons.storage_batch import ResignBlobBatch
from addons.stream import StreamBodies
from proxy.audit import CallLog
from proxy.cli import build_parser
from proxy.config import resolve
from proxy.mitm import request_chain
from proxy.tokens import TokenCache
from proxy.upstream import UpstreamPool


async def _no_token(*_):
    raise AssertionError("no token is fetched while building the chain")


def test_fail_closed_sits_between_the_conversion_and_everything_that_sends():
    settings = resolve(build_parser().parse_args(["run"]))
    chain = request_chain(settings, settings.catalog(), TokenCache(_no_token), CallLog(None),
                          UpstreamPool())
    kinds = [type(addon) for addon in chain]
    position = {kind: kinds.index(kind) for kind in kinds}
    assert position[StreamBodies] < position[AzureAuth]  # others may turn streaming off
    assert position[AzureAuth] + 1 == position[FailClosed]
    # Both send the request later (pool: request hook; replay: response hook).
    assert position[FailClosed] < position[ReplayUnauthorized]
    assert position[FailClosed] < position[PoolUpstream]
    # the batch is re-signed (request hook) before the pool sends it (request hook)
    assert position[AzureAuth] < position[ResignBlobBatch] < position[PoolUpstream]
