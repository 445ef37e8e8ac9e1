"""Storage strip/attach rules, and the catalog that picks them."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.http import Headers, Request

from proxy.catalog import Catalog
from proxy.conversions import STORAGE_SAS_PARAMS
from proxy.wire import remove_query_params

BLOB = Catalog().match("acct.blob.core.windows.net").service.conversion  # type: ignore
FILES = Catalog().match("acct.file.core.windows.net").service.conversion  # type: ignore
TOKEN = "the-token"


def request(path: str = "/c/b", **headers: str) -> Request:
    req = Request.make("GET", "https://acct.blob.core.windows.net/")
    req.path = path  # set raw: URL parsing would normalise what we check byte for byte
    for name, value in headers.items():
        req.headers[name.replace("_", "-")] = value
    return req


@pytest.mark.parametrize("scheme", ["SharedKey", "SharedKeyLite", "sharedkey"])
def test_shared_key_header_is_replaced_by_bearer(scheme):
    req = request(authorization=f"{scheme} acct:c2lnbmF0dXJl", x_ms_version="2023-11-03")
    stripped = BLOB.strip(req)
    assert stripped is not None and stripped.schemes[0].lower() == scheme.lower()
    assert "authorization" not in req.headers
    BLOB.attach(req, TOKEN, stripped)
    assert req.headers.get_all("authorization") == [f"Bearer {TOKEN}"]
    assert req.headers["x-ms-version"] == "2023-11-03"


def test_every_sas_parameter_goes_and_everything_else_stays_byte_for_byte():
    path = (
        "/cont/dir%2Fblob%20name.txt?comp=block&blockid=QUJD%3D%3D&sv=2021-08-06&ss=b"
        "&srt=sco&sp=rwdlac&se=2030-01-01T00%3A00%3A00Z&st=2020-01-01&spr=https&sig=abc%2Bdef%3D"
        "&timeout=30&sigma=1&svc=2&x-sig=3&&prefix=sig%3D"
    )
    req = request(path)
    stripped = BLOB.strip(req)
    assert stripped is not None and stripped.schemes == ("SAS",)
    assert req.path == (
        "/cont/dir%2Fblob%20name.txt?comp=block&blockid=QUJD%3D%3D&timeout=30&sigma=1&svc=2"
        "&x-sig=3&&prefix=sig%3D"
    )
    BLOB.attach(req, TOKEN, stripped)
    # the SAS' own version is kept as the API version the app asked for
    assert req.headers["x-ms-version"] == "2021-08-06"


def test_sas_names_are_matched_decoded_and_case_insensitively():
    req = request("/c/b?%73ig=secret&SIG=again&Se=x&keep=1")
    assert BLOB.strip(req) is not None
    assert req.path == "/c/b?keep=1"


def test_lookalikes_stay():
    path = "/sv=1/sig/blob?sigma=1&svc=2&sigs=3&ssig=4&signature=5&prefix=sv&se_x=6"
    req = request(path)
    assert BLOB.strip(req) is None
    assert req.path == path


def test_only_sas_query_leaves_no_question_mark():
    req = request("/c/b?sv=2020-02-10&sig=x")
    BLOB.strip(req)
    assert req.path == "/c/b"


def test_request_without_key_material_is_left_alone():
    req = request("/c/b?comp=list", authorization="Bearer app-own-token")
    assert BLOB.strip(req) is None
    assert req.headers["authorization"] == "Bearer app-own-token"


def test_unknown_authorization_scheme_is_not_treated_as_key():
    req = request(authorization="Basic dXNlcjpwYXNz")
    assert BLOB.strip(req) is None


@pytest.mark.parametrize(
    ("sent", "expected"),
    [("2015-02-21", "2017-11-09"), ("2017-11-09", "2017-11-09"), ("2025-01-05", "2025-01-05"),
     ("garbage", "2017-11-09")],
)
def test_old_versions_are_raised_for_oauth(sent, expected):
    req = request(authorization="SharedKey a:b", x_ms_version=sent)
    BLOB.attach(req, TOKEN, BLOB.strip(req))  # type: ignore[arg-type]
    assert req.headers["x-ms-version"] == expected


def test_sas_without_version_header_gets_minimum_when_sv_is_old():
    req = request("/c/b?sv=2015-04-05&sig=x")
    BLOB.attach(req, TOKEN, BLOB.strip(req))  # type: ignore[arg-type]
    assert req.headers["x-ms-version"] == "2017-11-09"


def test_files_get_backup_intent_and_a_recent_version():
    req = request(authorization="SharedKey a:b", x_ms_version="2021-06-08")
    FILES.attach(req, TOKEN, FILES.strip(req))  # type: ignore[arg-type]
    assert req.headers["x-ms-file-request-intent"] == "backup"
    assert req.headers["x-ms-version"] == "2022-11-02"
    assert req.headers["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize(
    ("host", "service"),
    [
        ("acct.blob.core.windows.net", "storage-blob"),
        ("ACCT.Blob.Core.Windows.Net", "storage-blob"),
        ("acct-secondary.blob.core.windows.net", "storage-blob"),
        ("acct.privatelink.blob.core.windows.net", "storage-blob"),
        ("acct.z17.blob.storage.azure.net", "storage-blob"),
        ("acct.queue.core.chinacloudapi.cn", "storage-queue"),
        ("acct.table.core.usgovcloudapi.net", "storage-table"),
        ("acct.file.core.windows.net", "storage-file"),
        ("acct.dfs.core.windows.net", "storage-dfs"),
        ("devstoreaccount1.blob.core.windows.net", "storage-blob"),
    ],
)
def test_catalog_knows_storage_hosts_in_every_cloud(host, service):
    match = Catalog().match(host)
    assert match is not None and match.service.name == service
    assert match.scope == "https://storage.azure.com/.default"


@pytest.mark.parametrize(
    "host",
    [
        "acct.blob.core.windows.net.evil.test",
        "acct.blob.core.windows.net.",
        "evilcore.windows.net",
        "blob.core.windows.net",
        "a.blob.core.windows.net",  # accounts have 3-24 characters
        "acct.blob.core.windows.nett",
        "x.acct.blob.core.windows.net",
        "acct.web.core.windows.net",
        "example.com",
        "127.0.0.1",
    ],
)
def test_catalog_rejects_lookalike_hosts(host):
    assert Catalog().match(host) is None and not Catalog().intercepts(host)


# --- property-based: arbitrary queries mixing SAS and unrelated parameters -----------------

def spellings(name: str) -> st.SearchStrategy[str]:
    """The SAS name as the service would still read it: any case, percent-encoded or not."""
    encoded = "".join(f"%{ord(c):02X}" for c in name)
    return st.sampled_from([name, name.upper(), quote(name, safe=""), encoded])


sas_names = st.sampled_from(sorted(STORAGE_SAS_PARAMS)).flatmap(spellings)
query_text = st.text(
    alphabet=st.characters(codec="ascii", exclude_characters="&#", exclude_categories=("Cc",)),
    max_size=12,
)
other_names = query_text.filter(
    lambda n: "=" not in n and n.lower() not in STORAGE_SAS_PARAMS
    and remove_query_params(f"/?{n}=", STORAGE_SAS_PARAMS)[1] == {}
)


@given(
    pieces=st.lists(
        st.one_of(
            st.tuples(st.just("sas"), sas_names, query_text.map(lambda v: v.replace("=", ""))),
            st.tuples(st.just("other"), other_names, query_text),
        ),
        max_size=12,
    ),
    path=query_text.map(lambda p: "/c/" + p.replace("?", "")),
)
def test_property_no_sas_remains_and_the_rest_is_unchanged(pieces, path):
    query = "&".join(f"{name}={value}" for _, name, value in pieces)
    req = request(path + ("?" + query if pieces else ""))
    stripped = BLOB.strip(req)
    expected_rest = [f"{n}={v}" for kind, n, v in pieces if kind == "other"]
    has_sas = any(kind == "sas" for kind, _, _ in pieces)
    assert (stripped is not None) == has_sas
    if has_sas:
        assert req.path == path + ("?" + "&".join(expected_rest) if expected_rest else "")
        # nothing SAS-like is left, by any spelling
        assert remove_query_params(req.path, STORAGE_SAS_PARAMS)[1] == {}
    else:
        assert req.path == path + ("?" + query if pieces else "")


@given(
    auth=st.builds(
        lambda s, v: f"{s} {v}",
        st.sampled_from(["SharedKey", "SHAREDKEYLITE", "sharedKey"]),
        query_text,
    ),
    others=st.dictionaries(
        st.sampled_from(["x-ms-date", "x-ms-client-request-id", "content-type", "x-custom"]),
        query_text,
    ),
)
def test_property_shared_key_never_survives_and_other_headers_do(auth, others):
    headers = Headers(authorization=auth, **{k.replace("-", "_"): v for k, v in others.items()})
    req = Request.make("PUT", "https://acct.blob.core.windows.net/c/b", b"", headers)
    before = {k: v for k, v in req.headers.items() if k.lower() != "authorization"}
    stripped = BLOB.strip(req)
    assert stripped is not None
    assert "authorization" not in req.headers
    assert {k: v for k, v in req.headers.items()} == before
