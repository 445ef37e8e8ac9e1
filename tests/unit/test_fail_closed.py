"""The fail-closed invariant, per way in: a request to a catalog host that still carries key
material is refused, never forwarded; and transparent mode converts by the TLS server name.

Mutations checked once: FailClosed.requestheaders returning at once failed the 8 refusal tests;
destination_names() giving only `request.host` failed 3 (transparent mode's two and the
names-disagree case); catalog_host() returning mitmproxy's request host (the review's bug: in
transparent mode that is an IP, so nothing was converted) failed the 2 transparent ones.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow

from addons.azure_auth import AzureAuth
from addons.failclosed import FailClosed
from proxy.catalog import Catalog, builtin_services
from proxy.flowstate import converted, flow_state, start_state
from proxy.invariant import leftover_key_material
from proxy.tokens import Identity, TokenCache

BLOB = "myaccount.blob.core.windows.net"
AZURE_IP = "10.200.0.2"  # transparent mode: the redirected connection's original address
SHARED_KEY = "SharedKey myaccount:c2lnbmF0dXJl"
MODES = {
    "regular": "regular",
    "reverse": f"reverse:https://{BLOB}@127.0.0.1:10000",
    "transparent": "transparent",
}


def catalog() -> Catalog:
    return Catalog(builtin_services(keyvault_swap_bearer=True))


def flow_in(mode: str, host: str = BLOB, host_header: str | None = None,
            sni: str | None = BLOB, path: str = "/c/b.txt",
            authorization: str | None = SHARED_KEY):
    flow = tflow.tflow()
    flow.client_conn.proxy_mode = ProxyMode.parse(MODES[mode])
    flow.client_conn.sni = sni
    flow.client_conn.tls = True
    flow.server_conn.sni = None
    request = flow.request
    request.scheme, request.port, request.path = "https", 443, path
    # In transparent mode mitmproxy's request host is the original destination address.
    request.host = AZURE_IP if mode == "transparent" else host
    flow.server_conn.address = (request.host, 443)
    request.headers["host"] = host_header or host
    if authorization:
        request.headers["authorization"] = authorization
    request.headers["x-ms-version"] = "2021-08-06"
    return flow


def refused(flow) -> bool:
    return flow.response is not None and flow.response.status_code == 403 \
        and flow.response.headers.get("x-ms-error-code") == "KeylessKeyNotConverted"


@pytest.mark.parametrize("mode", MODES)
def test_unconverted_key_is_refused_in_every_mode(mode):
    flow = flow_in(mode)
    FailClosed(catalog()).requestheaders(flow)
    assert refused(flow)
    assert b"c2lnbmF0dXJl" not in flow.response.content  # the signature is not echoed


@pytest.mark.parametrize("mode", MODES)
def test_sas_left_in_the_query_is_refused_in_every_mode(mode):
    flow = flow_in(mode, path="/c/b.txt?sv=2021-08-06&sig=abc%3D&se=2030-01-01",
                   authorization=None)
    FailClosed(catalog()).requestheaders(flow)
    assert refused(flow)


@pytest.mark.parametrize("mode", MODES)
def test_request_without_key_material_passes(mode):
    flow = flow_in(mode, authorization=None)
    FailClosed(catalog()).requestheaders(flow)
    assert flow.response is None


def test_only_a_converted_request_passes_with_what_the_check_would_call_key_material():
    # The conversion stripped it for the one name everybody agreed on: not checked again.
    # The same request not marked converted (say a conversion skipped it) is refused.
    path = "/c/b.txt?sig=as-the-app-sent-it"
    flow = flow_in("regular", path=path, authorization="Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln")
    FailClosed(catalog()).requestheaders(flow)
    assert refused(flow)
    flow = flow_in("regular", path=path, authorization="Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln")
    start_state(flow, "storage-blob", "myaccount").converted = True
    FailClosed(catalog()).requestheaders(flow)
    assert flow.response is None


def test_names_that_disagree_are_each_checked():
    # The request host names a non-Azure host, the TLS server name and Host header name Azure.
    flow = flow_in("regular", host="example.org", host_header=BLOB)
    FailClosed(catalog()).requestheaders(flow)
    assert refused(flow)
    flow = flow_in("transparent", sni="example.org", host_header=BLOB)
    FailClosed(catalog()).requestheaders(flow)
    assert refused(flow)


def test_non_azure_hosts_and_audit_mode_are_left_alone():
    flow = flow_in("regular", host="example.org", sni="example.org")
    FailClosed(catalog()).requestheaders(flow)
    assert flow.response is None
    flow = flow_in("transparent")
    FailClosed(catalog(), audit=True).requestheaders(flow)
    assert flow.response is None


def test_an_apps_own_entra_token_to_key_vault_is_not_key_material():
    flow = flow_in("regular", host="myvault.vault.azure.net", sni="myvault.vault.azure.net",
                   path="/secrets/s?api-version=7.4", authorization="Bearer app-token")
    FailClosed(catalog()).requestheaders(flow)
    assert flow.response is None


def test_leftover_is_a_pure_function_of_names_and_head():
    headers = flow_in("regular").request.headers
    assert leftover_key_material(catalog(), [None, "EXAMPLE.org", BLOB.upper() + "."],
                                 "/c", headers) == ("storage-blob", ("SharedKey",))
    assert "authorization" in headers  # the check strips a copy, never the request


@dataclass
class Info:
    token: str
    expires_on: int
    refresh_on: int | None = None


class Source:
    def __init__(self) -> None:
        self.calls: list[tuple[Identity, str]] = []

    async def __call__(self, identity: Identity, scope: str) -> Info:
        self.calls.append((identity, scope))
        return Info(f"token-{len(self.calls)}", int(time.time()) + 3600)


def run_auth(flow, source: Source) -> None:
    async def go() -> None:
        tokens = TokenCache(source)
        try:
            await AzureAuth(catalog(), tokens, Identity()).requestheaders(flow)
            FailClosed(catalog()).requestheaders(flow)
        finally:
            await tokens.close()
    asyncio.run(go())


def test_transparent_mode_converts_by_server_name():
    flow = flow_in("transparent")
    source = Source()
    run_auth(flow, source)
    assert flow.response is None
    assert flow.request.headers["authorization"] == "Bearer token-1"
    assert source.calls == [(Identity(), "https://storage.azure.com/.default")]
    state = converted(flow)
    assert state is not None and state.service == "storage-blob" and state.resource == "myaccount"
    assert flow.request.host == AZURE_IP  # mitmproxy still dials the original address


def test_transparent_host_header_naming_another_host_is_refused():
    flow = flow_in("transparent", host_header="otheraccount.blob.core.windows.net")
    source = Source()
    run_auth(flow, source)
    assert flow.response is not None and flow.response.status_code == 421
    assert source.calls == []  # no token was even fetched
    assert flow_state(flow).refused
