"""Fuzzing every parser keyless runs on input from apps, services and configuration.

Arbitrary text must give a result or a clear ValueError — never another exception, a hang,
or a secret echoed back in a message. `make fuzz` runs each with 10,000 examples.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.http import Request

from proxy.authority import Destination
from proxy.catalog import Catalog, builtin_services
from proxy.challenge import scope_from_challenge
from proxy.config import parse_host_port, parse_network, parse_set
from proxy.connect_to import ConnectTo
from proxy.conversions import STRIPPERS, Conversion
from proxy.redact import redact
from proxy.routes import glob_to_regex, parse_route
from proxy.wire import remove_query_params, split_authority

CATALOG = Catalog(builtin_services("3a3a3a3a-0000-4000-8000-00000000a71a", True))
anything = st.text(max_size=200)
hostish = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.:[]@%*", max_size=80) | anything


def clear_error_or_result(parse, value):
    try:
        return parse(value)
    except ValueError as exc:
        assert str(exc), "a ValueError without a message is no clear error"
        return None


@given(anything)
def test_fuzz_config_parsers(text):
    for parse in (parse_host_port, parse_set, parse_network, ConnectTo.parse, glob_to_regex):
        clear_error_or_result(parse, text)


@given(hostish, st.integers(min_value=1, max_value=65535))
def test_fuzz_split_authority(text, port):
    parsed = split_authority(text, port)
    if parsed is not None:
        host, number = parsed
        assert host == host.lower() and 0 < number < 65536


@given(anything)
def test_fuzz_remove_query_params_only_removes(path):
    names = STRIPPERS["SAS"].names  # type: ignore[attr-defined]
    new, removed = remove_query_params(path, names)
    if not removed:
        assert new == path
    else:
        assert len(new) < len(path)
        assert remove_query_params(new, names)[1] == {}


@given(hostish, st.text(max_size=60))
def test_fuzz_catalog_match(host, path):
    target = CATALOG.match(host, "/" + path)
    if target is not None:
        assert CATALOG.intercepts(host)
        assert re.fullmatch(r"[a-z0-9.\-]+", host.lower())
        assert target.scope == "" or target.scope == "challenge" or "://" in target.scope


@given(anything)
def test_fuzz_challenge(header):
    scope = scope_from_challenge(header)
    assert scope is None or scope.startswith("https://")


@given(st.dictionaries(st.sampled_from(
    ["host", "service", "scope", "strip", "token-format", "client-id", "other"]),
    st.one_of(anything, st.lists(anything, max_size=3), st.integers()), max_size=6))
def test_fuzz_routes(raw):
    clear_error_or_result(lambda r: parse_route(r, 0, CATALOG), raw)


@given(hostish, st.integers(0, 70000), st.none() | hostish, st.none() | hostish, st.booleans())
def test_fuzz_destination(connect, port, sni, host_header, tls):
    agreed = Destination(connect, port, sni, host_header, tls).agreed_host()
    assert agreed is None or (tls and port == 443 and agreed == connect.lower())


header_values = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",),
                                               exclude_characters="\r\n\x00"), max_size=120)


@given(st.lists(st.tuples(st.sampled_from(
    ["authorization", "api-key", "ocp-apim-subscription-key", "aeg-sas-key", "aeg-sas-token",
     "subscription-key", "x-ms-date", "x-other"]), header_values), max_size=8), anything)
def test_fuzz_every_stripper_on_arbitrary_requests(headers, query):
    request = Request.make("GET", "https://x.example/")
    request.path = "/p?" + query.replace("#", "")
    request.headers.clear()
    for name, value in headers:
        request.headers.add(name, value)
    for name, stripper in STRIPPERS.items():
        found, _ = stripper(request)
        assert isinstance(found, list), name
        assert stripper(request)[0] == [], f"{name} left material it recognises"
    assert Conversion(tuple(STRIPPERS.values())).strip(request) is None


@given(anything)
def test_fuzz_redact_never_grows_secrets(text):
    out = redact(text, limit=10_000)
    for match in re.finditer(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*", text):
        assert match.group(0) not in out
