"""Every named stripper, property-based: key material goes, everything unrelated stays."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.http import Request

from proxy.conversions import STRIPPERS, TOKEN_FORMATS, conversion
from proxy.wire import remove_query_params

text = st.text(alphabet=st.characters(codec="ascii", categories=("L", "N"),
                                      include_characters="+/=-_.~%"), min_size=1, max_size=24)
KEY_HEADER_NAMES = {"authorization", "api-key", "ocp-apim-subscription-key",
                    "ocp-apim-subscription-region", "aeg-sas-key", "aeg-sas-token",
                    "subscription-key"}
KEY_QUERY_NAMES = frozenset({"api-key", "aeg-sas-key", "subscription-key", "sv", "ss", "srt",
                             "sp", "st", "se", "sip", "spr", "sr", "si", "sig", "ses", "rscc",
                             "rscd", "rsce", "rscl", "rsct", "tn", "spk", "srk", "epk", "erk",
                             "skoid", "sktid", "skt", "ske", "sks", "skv", "sdd", "saoid",
                             "suoid", "scid"})
unrelated_header_names = st.sampled_from(
    ["x-ms-date", "x-ms-version", "content-type", "x-ms-client-request-id", "x-custom", "accept",
     "x-api-key-hint", "apikey", "subscription", "ocp-apim-trace"])
unrelated_query_names = st.sampled_from(
    ["comp", "restype", "prefix", "api-version", "timeout", "query", "sigma", "svc", "keys",
     "api_key", "subscription", "$filter", "label"])


def jwt(alg: str, payload: str) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{part({'alg': alg, 'typ': 'JWT'})}.{part({'sub': payload})}.c2lnbmF0dXJl"


def casing(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.upper(), name.title()])


# For each stripper: a strategy of (headers to add, query pieces to add) that carry its key.
def auth(*schemes: str) -> st.SearchStrategy:
    return st.tuples(st.sampled_from(schemes).flatmap(casing), text).map(
        lambda p: ([("Authorization", f"{p[0]} {p[1]}")], []))


def header(*names: str) -> st.SearchStrategy:
    return st.tuples(st.sampled_from(names).flatmap(casing), text).map(lambda p: ([p], []))


def query(*names: str) -> st.SearchStrategy:
    spelled = st.sampled_from(names).flatmap(
        lambda n: st.sampled_from([n, n.upper(), quote(n, safe=""),
                                   "".join(f"%{ord(c):02X}" for c in n)]))
    return st.lists(st.tuples(spelled, text.map(lambda v: v.replace("&", ""))),
                    min_size=1, max_size=4).map(lambda pairs: ([], [f"{n}={v}" for n, v in pairs]))


MATERIAL: dict[str, st.SearchStrategy] = {
    "SharedKey": auth("SharedKey", "SharedKeyLite"),
    "SAS": query("sv", "sig", "se", "sp", "skoid", "rscd", "tn", "saoid"),
    "SharedAccessSignature": auth("SharedAccessSignature"),
    "HMAC-SHA256": auth("HMAC-SHA256"),
    "api-key": header("api-key"),
    "api-key-query": query("api-key"),
    "Ocp-Apim-Subscription-Key": st.tuples(casing("Ocp-Apim-Subscription-Key"), text,
                                           st.booleans()).map(
        lambda p: ([(p[0], p[1])] + ([("Ocp-Apim-Subscription-Region", "westus2")]
                                      if p[2] else []), [])),
    "aeg-sas-key": header("aeg-sas-key"),
    "aeg-sas-key-query": query("aeg-sas-key"),
    "aeg-sas-token": header("aeg-sas-token"),
    "subscription-key": header("subscription-key"),
    "subscription-key-query": query("subscription-key"),
    "cosmos-key": st.tuples(st.sampled_from(["master", "resource"]), text, st.booleans()).map(
        lambda p: ([("authorization", (quote if p[2] else str)(
            f"type={p[0]}&ver=1.0&sig={p[1]}"))], [])),
    "access-key-jwt": st.sampled_from(["HS256", "HS384", "HS512"]).flatmap(
        lambda alg: text.map(lambda s: ([("Authorization", f"Bearer {jwt(alg, s)}")], []))),
    "bearer": text.map(lambda t: ([("Authorization", f"Bearer {t}")], [])),
}


def test_every_stripper_has_a_property_test():
    assert set(MATERIAL) == set(STRIPPERS)


@pytest.mark.parametrize("name", sorted(STRIPPERS))
def test_property_stripper_removes_its_key_material_and_nothing_else(name):
    @settings(deadline=None)
    @given(
        material=MATERIAL[name],
        other_headers=st.lists(st.tuples(unrelated_header_names, text), max_size=5),
        other_query=st.lists(st.tuples(unrelated_query_names, text.map(
            lambda v: v.replace("&", ""))), max_size=5),
        order=st.randoms(use_true_random=False),
    )
    def check(material, other_headers, other_query, order):
        key_headers, key_pieces = material
        unrelated_pieces = [f"{n}={v}" for n, v in other_query]
        pieces = unrelated_pieces + key_pieces
        order.shuffle(pieces)
        request = Request.make("GET", "https://service.example/")
        request.path = "/a/b" + ("?" + "&".join(pieces) if pieces else "")
        request.headers.clear()
        for n, v in other_headers + key_headers:
            request.headers.add(n, v)
        stripper = STRIPPERS[name]

        found, _ = stripper(request)

        assert found, "the stripper did not recognise its own key material"
        # nothing key-bearing of this kind remains: a second pass finds nothing
        assert stripper(request)[0] == []
        for key_name, _ in key_headers:
            assert key_name not in request.headers
        # unrelated headers untouched, in order
        assert [(n.decode(), v.decode()) for n, v in request.headers.fields] == other_headers
        # unrelated query pieces untouched, byte for byte, in their order
        remaining = request.path.partition("?")[2]
        kept = [p for p in pieces if p in unrelated_pieces]
        assert (remaining.split("&") if remaining else []) == kept

    check()


@pytest.mark.parametrize("name", sorted(STRIPPERS))
def test_stripper_ignores_requests_without_its_material(name):
    request = Request.make("GET", "https://service.example/")
    request.path = "/a?comp=list&sigma=1&prefix=sig%3D"
    request.headers.clear()
    request.headers["x-ms-date"] = "Tue, 01 Jan 2030 00:00:00 GMT"
    request.headers["authorization"] = "Basic dXNlcjpwYXNz"
    assert STRIPPERS[name](request) == ([], {})
    assert request.path == "/a?comp=list&sigma=1&prefix=sig%3D"
    assert request.headers["authorization"] == "Basic dXNlcjpwYXNz"


def test_signalr_leaves_an_entra_rs256_token_alone():
    request = Request.make("POST", "https://hub.service.signalr.net/api/v1/hubs/chat")
    request.headers["authorization"] = f"Bearer {jwt('RS256', 'entra')}"
    assert STRIPPERS["access-key-jwt"](request) == ([], {})


def test_cosmos_token_format_is_url_encoded_aad():
    name, value = TOKEN_FORMATS["cosmos"]("eyJ0.eyJ1.c2ln")
    assert (name, value) == ("authorization", "type%3Daad%26ver%3D1.0%26sig%3DeyJ0.eyJ1.c2ln")


def test_openai_conversion_strips_key_and_region_then_attaches_bearer():
    convert = conversion("api-key", "api-key-query", "Ocp-Apim-Subscription-Key")
    request = Request.make("POST", "https://r.openai.azure.com/")
    request.path = "/openai/deployments/d/chat/completions?api-version=2024-10-21&api-key=k"
    request.headers["Ocp-Apim-Subscription-Key"] = "k"
    request.headers["Ocp-Apim-Subscription-Region"] = "westus2"
    request.headers["api-key"] = "k"
    stripped = convert.strip(request)
    assert stripped is not None
    assert set(stripped.schemes) == {"api-key", "Ocp-Apim-Subscription-Key"}
    convert.attach(request, "tok", stripped)
    assert request.path == "/openai/deployments/d/chat/completions?api-version=2024-10-21"
    assert dict(request.headers) == {"content-length": "0", "authorization": "Bearer tok"}


def test_key_names_list_matches_the_sas_set():
    # keeps the property tests' notion of "key material" in step with the product's
    sas_only = KEY_QUERY_NAMES - {"api-key", "aeg-sas-key", "subscription-key"}
    path = "/?" + "&".join(f"{n}=1" for n in sorted(sas_only))
    assert remove_query_params(path, STRIPPERS["SAS"].names)[0] == "/"  # type: ignore[attr-defined]
