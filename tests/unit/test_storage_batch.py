"""Blob Batch bodies and copy sources: what the real SDK sends, re-signed as Entra mode does.

The batch bodies here are made by the installed azure-storage-blob itself (its transport is
replaced by one that keeps the request), in key, SAS and Entra mode.
"""

from __future__ import annotations

import re
from email.parser import BytesParser
from email.policy import HTTP

import pytest
from azure.core.pipeline.transport import HttpRequest
from azure.storage.blob import ContainerClient, StandardBlobTier
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.test import tflow, tutils

from addons.storage_batch import ResignBlobBatch
from proxy.catalog import Catalog, builtin_services
from proxy.conversions import STRIPPERS, conversion
from proxy.flowstate import start_state
from proxy.storage_batch import (
    MALFORMED,
    MAX_BATCH_BYTES,
    TOO_LARGE,
    BatchError,
    boundary_of,
    check_length,
    is_batch,
    key_material,
    parse_batch,
    rewrite_batch,
)
from tests.support.sdk_capture import KeepRequests, StaticCredential

ACCOUNT = "devstoreaccount1"
HOST = f"{ACCOUNT}.blob.core.windows.net"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
SAS = "sv=2021-08-06&ss=b&srt=sco&sp=rwdlac&se=2030-01-01&sig=c2lnbmF0dXJl%3D"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL3N0b3JhZ2UuYXp1cmUuY29tIn0.c2ln"
FRESH = "eyJhbGciOiJSUzI1NiJ9.eyJqdGkiOiJmcmVzaCJ9.ZnJlc2g"
VOLATILE = re.compile(rb"(x-ms-date: [^\r]+|x-ms-client-request-id: [^\r]+|batch_[0-9a-f-]+)")


def sdk_batch(mode: str, operation: str = "delete") -> HttpRequest:
    """The batch request azure-storage-blob sends in `mode` (key, sas or entra)."""
    credential = {"key": {"account_name": ACCOUNT, "account_key": KEY}, "sas": SAS,
                  "entra": StaticCredential(TOKEN)}[mode]
    kept: list[HttpRequest] = []
    container = ContainerClient(f"https://{HOST}", "cont", credential=credential,
                                transport=KeepRequests(kept), retry_total=0)
    with pytest.raises(Exception):  # noqa: B017 - the transport stops every call
        if operation == "delete":
            container.delete_blobs("a", "b/c d", "ü")
        else:
            container.set_standard_blob_tier_blobs(StandardBlobTier.COOL, "a", "b")
    (request,) = kept
    return request


def independent_parts(body: bytes, content_type: str) -> list[tuple[bytes, dict[str, str]]]:
    """Sub-requests read by the standard library's MIME parser (not keyless' own)."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    parts = []
    for part in message.iter_parts():
        assert part.get_content_type() == "application/http"
        raw = part.get_payload(decode=True)
        request_line, _, rest = raw.partition(b"\r\n")
        headers = {}
        for line in rest.split(b"\r\n"):
            if line:
                name, _, value = line.decode().partition(":")
                assert name.lower() not in headers, "a header appears twice"
                headers[name.lower()] = value.strip()
        parts.append((request_line, headers))
    return parts


@pytest.mark.parametrize("operation", ["delete", "tier"])
def test_key_mode_batch_becomes_exactly_what_entra_mode_sends(operation):
    keyed, entra = sdk_batch("key", operation), sdk_batch("entra", operation)
    assert b"SharedKey" in keyed.body
    rewritten = rewrite_batch(keyed.body, keyed.headers["Content-Type"], TOKEN)
    assert VOLATILE.sub(b"", rewritten) == VOLATILE.sub(b"", entra.body)


@pytest.mark.parametrize("operation", ["delete", "tier"])
def test_sas_mode_batch_loses_every_sas_and_gains_the_token(operation):
    sas, entra = sdk_batch("sas", operation), sdk_batch("entra", operation)
    assert b"sig=" in sas.body
    rewritten = rewrite_batch(sas.body, sas.headers["Content-Type"], TOKEN)
    assert VOLATILE.sub(b"", rewritten) == VOLATILE.sub(b"", entra.body)
    for line, headers in independent_parts(rewritten, sas.headers["Content-Type"]):
        assert b"sig=" not in line and b"sv=" not in line
        assert headers["authorization"] == f"Bearer {TOKEN}"


def test_rest_reference_form_without_the_trailing_blank_line_is_read():
    # The REST reference's example: the sub-request's header block is closed by the
    # delimiter's own CRLF.
    body = (b"--batch_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary"
            b"\r\nContent-ID: 0\r\n\r\nDELETE /container0/blob0 HTTP/1.1\r\n"
            b"x-ms-date: Thu, 14 Jun 2018 16:46:54 GMT\r\n"
            b"Authorization: SharedKey account:G4jjBXA7LI/RnWKIOQ8i9xH4p76pAQ+4Fs4R1VxasaE=\r\n"
            b"Content-Length: 0\r\n\r\n--batch_1--\r\n")
    rewritten = rewrite_batch(body, "multipart/mixed; boundary=batch_1", TOKEN)
    [(line, headers)] = independent_parts(rewritten, "multipart/mixed; boundary=batch_1")
    assert line == b"DELETE /container0/blob0 HTTP/1.1"
    assert headers == {"x-ms-date": "Thu, 14 Jun 2018 16:46:54 GMT",
                       "authorization": f"Bearer {TOKEN}", "content-length": "0"}


def test_rewriting_again_with_a_fresh_token_leaves_only_the_fresh_token():
    keyed = sdk_batch("key")
    content_type = keyed.headers["Content-Type"]
    once = rewrite_batch(keyed.body, content_type, TOKEN)
    twice = rewrite_batch(once, content_type, FRESH)
    assert TOKEN.encode() not in twice
    assert twice.count(FRESH.encode()) == 3
    assert key_material(parse_batch(twice, boundary_of(content_type))) == []


def test_key_material_finds_what_the_sdk_puts_in_sub_requests():
    for mode, expected in (("key", ["sharedkey"] * 3), ("sas", ["SAS"] * 3), ("entra", [])):
        request = sdk_batch(mode)
        parts = parse_batch(request.body, boundary_of(request.headers["Content-Type"]))
        assert key_material(parts) == expected


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("POST", "/cont?restype=container&comp=batch", True),
    ("POST", "/?comp=batch", True),
    ("post", "/?COMP=BATCH&sv=1", True),
    ("PUT", "/?comp=batch", False),
    ("POST", "/cont/comp=batch", False),
    ("POST", "/?comp=batchx", False),
    ("POST", "/?comp=list", False),
])
def test_is_batch(method, path, expected):
    assert is_batch(method, path) is expected


def test_limits_are_the_services():
    template = sdk_batch("key")
    boundary = boundary_of(template.headers["Content-Type"])
    head, _, _ = template.body.partition(b"\r\n--" + boundary.encode())
    part = head[len(b"--" + boundary.encode()):]
    many = b"".join(b"--" + boundary.encode() + part + b"\r\n" for _ in range(257))
    with pytest.raises(BatchError) as caught:
        rewrite_batch(many + b"--" + boundary.encode() + b"--\r\n",
                      template.headers["Content-Type"], TOKEN)
    assert (caught.value.code, caught.value.status) == (TOO_LARGE, 413)
    exactly = b"".join(b"--" + boundary.encode() + part + b"\r\n" for _ in range(256))
    assert rewrite_batch(exactly + b"--" + boundary.encode() + b"--\r\n",
                         template.headers["Content-Type"], TOKEN).count(b"Bearer") == 256
    with pytest.raises(BatchError) as caught:
        parse_batch(b"x" * (MAX_BATCH_BYTES + 1), boundary)
    assert caught.value.code == TOO_LARGE
    check_length(str(MAX_BATCH_BYTES))
    for length, status in ((str(MAX_BATCH_BYTES + 1), 413), (None, 411), ("12x", 411)):
        with pytest.raises(BatchError) as caught:
            check_length(length)
        assert caught.value.status == status


SIGNATURE = "lH0SI0CSMvC9h6qdeTeGQ/T4Uflms7lV2nzfz55nW6Q="
GOOD_PART = (b"Content-Type: application/http\r\nContent-ID: 0\r\n\r\n"
             b"DELETE /cont/a HTTP/1.1\r\nAuthorization: SharedKey acct:" + SIGNATURE.encode()
             + b"\r\nContent-Length: 0\r\n\r\n")


def body_of(*parts: bytes, boundary: bytes = b"b1") -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) \
        + b"--" + boundary + b"--\r\n"


@pytest.mark.parametrize(("body", "content_type"), [
    (body_of(GOOD_PART), "application/json"),
    (body_of(GOOD_PART), "multipart/mixed"),
    (body_of(GOOD_PART), "multipart/mixed; boundary=b1; boundary=b2"),
    (body_of(GOOD_PART), "multipart/mixed; boundary=" + "x" * 71),
    (body_of(GOOD_PART), "multipart/mixed; boundary=b2"),
    (b"preamble\r\n" + body_of(GOOD_PART), "multipart/mixed; boundary=b1"),
    (body_of(GOOD_PART)[:-8], "multipart/mixed; boundary=b1"),  # no closing boundary
    (b"--b1--\r\n", "multipart/mixed; boundary=b1"),  # no part
    (body_of(GOOD_PART.replace(b"\r\n", b"\n")), "multipart/mixed; boundary=b1"),
    (body_of(GOOD_PART.replace(b"Content-Length: 0", b"Content-Length: 0\nX-Evil: 1")),
     "multipart/mixed; boundary=b1"),
    (body_of(GOOD_PART.replace(b"application/http", b"text/plain")),
     "multipart/mixed; boundary=b1"),
    (body_of(GOOD_PART.replace(b"Content-ID: 0", b"Authorization: SharedKey a:b")),
     "multipart/mixed; boundary=b1"),
    (body_of(GOOD_PART.replace(b"DELETE /cont/a", b"DELETE https://evil.example/a")),
     "multipart/mixed; boundary=b1"),
    (body_of(GOOD_PART.replace(b"HTTP/1.1", b"HTTP/2")), "multipart/mixed; boundary=b1"),
    (body_of(GOOD_PART.replace(b"\r\nContent-Length: 0", b"\r\n continued")),
     "multipart/mixed; boundary=b1"),  # obs-fold
    (body_of(GOOD_PART + b"a body"), "multipart/mixed; boundary=b1"),
    (body_of(GOOD_PART.replace(b"Content-Length", b"Content Length")),
     "multipart/mixed; boundary=b1"),
    (body_of(GOOD_PART).replace(b"--b1\r\n", b"--b1xyz\r\n", 1), "multipart/mixed; boundary=b1"),
])
def test_malformed_batches_are_refused_without_echoing_them(body, content_type):
    assert rewrite_batch(body_of(GOOD_PART), "multipart/mixed; boundary=b1", TOKEN)
    with pytest.raises(BatchError) as caught:
        rewrite_batch(body, content_type, TOKEN)
    assert caught.value.code == MALFORMED and caught.value.status == 400
    assert SIGNATURE not in caught.value.message and "evil" not in caught.value.message


def _mutations() -> st.SearchStrategy[bytes]:
    base = sdk_batch("key").body
    edits = st.lists(st.tuples(st.integers(0, len(base)), st.integers(0, 8),
                               st.binary(max_size=8) | st.sampled_from(
                                   [b"\r\n", b"\n", b"--", b"\r\n\r\n", b": ", b" ", b"?sig=x"])),
                     max_size=4)

    def apply(changes: list[tuple[int, int, bytes]]) -> bytes:
        body = base
        for at, cut, insert in changes:
            body = body[:at] + insert + body[at + cut:]
        return body
    return edits.map(apply)


BOUNDARY_TYPE = sdk_batch("key").headers["Content-Type"]


@settings(max_examples=400, deadline=None)
@given(st.one_of(_mutations(), st.binary(max_size=400)))
def test_fuzz_any_body_is_refused_clearly_or_comes_out_key_free(body):
    try:
        rewritten = rewrite_batch(body, BOUNDARY_TYPE, TOKEN)
    except BatchError as exc:
        assert exc.message and exc.code in (MALFORMED, TOO_LARGE)
        assert "SharedKey devstoreaccount1:" not in exc.message
        return
    parts = parse_batch(rewritten, boundary_of(BOUNDARY_TYPE))
    assert key_material(parts) == []
    for part in parts:
        assert [v for n, v in part.headers if n.lower() == b"authorization"] \
            == [b"Bearer " + TOKEN.encode()]


# The addon: buffering, refusal, and the 401 replay's fresh token ---------------------------

def batch_flow(request: HttpRequest, authorization: str = f"Bearer {TOKEN}"):
    flow = tflow.tflow()
    flow.request = tutils.treq(method=b"POST", host=HOST, port=443, scheme=b"https",
                               path=request.url.split(HOST, 1)[1].encode(),
                               headers=((b"content-type",
                                         request.headers["Content-Type"].encode()),
                                        (b"content-length", str(len(request.body)).encode()),
                                        (b"authorization", authorization.encode())),
                               content=request.body)
    state = start_state(flow, "storage-blob", ACCOUNT)
    state.converted = True
    attached: list[str] = []
    state.reattach = lambda req, fresh: attached.append(fresh) or req.headers.__setitem__(
        "authorization", f"Bearer {fresh}")
    return flow, state, attached


def test_addon_buffers_rewrites_and_resigns_on_reattach():
    flow, state, attached = batch_flow(sdk_batch("key"))
    flow.request.stream = True
    addon = ResignBlobBatch()
    addon.requestheaders(flow)
    assert flow.request.stream is False and flow.response is None
    addon.request(flow)
    body = flow.request.raw_content
    assert b"SharedKey" not in body and body.count(TOKEN.encode()) == 3
    assert flow.request.headers["content-length"] == str(len(body))
    assert state.reattach is not None
    state.reattach(flow.request, FRESH)
    assert attached == [FRESH]
    assert TOKEN.encode() not in flow.request.raw_content
    assert flow.request.raw_content.count(FRESH.encode()) == 3


@pytest.mark.parametrize("header", ["transfer-encoding", "content-encoding"])
def test_addon_refuses_what_it_cannot_buffer_or_read(header):
    flow, state, _ = batch_flow(sdk_batch("key"))
    flow.request.headers[header] = "gzip"
    ResignBlobBatch().requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 411
    assert state.refused


def test_addon_refuses_a_malformed_body_before_it_leaves():
    request = sdk_batch("key")
    flow, state, _ = batch_flow(request)
    flow.request.raw_content = request.body.replace(b"Content-Type: application/http",
                                                    b"Content-Type: text/plain")
    addon = ResignBlobBatch()
    addon.requestheaders(flow)
    addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert b"KeylessBatchMalformed" in flow.response.content and state.refused
    assert b"SharedKey" not in flow.response.content


def test_addon_leaves_other_flows_alone():
    flow, state, _ = batch_flow(sdk_batch("key"))
    state.converted = False
    flow.request.stream = True
    addon = ResignBlobBatch()
    addon.requestheaders(flow)
    addon.request(flow)
    assert flow.request.stream is True and b"SharedKey" in flow.request.raw_content


# Copy sources (proxy/conversions.py, part of the Storage conversion) -------------------------

STORAGE = Catalog(builtin_services("3a3a3a3a-0000-4000-8000-00000000a71a", True))
SOURCE = "https://source.blob.core.windows.net/c/src%20blob.txt"


def convert(path: str, **headers: str):
    request = tutils.treq(method=b"PUT", host=HOST, port=443, path=path.encode(),
                          headers=tuple((k.encode(), v.encode()) for k, v in headers.items()))
    target = STORAGE.match(HOST, path)
    assert target is not None and target.service.conversion is not None
    stripped = target.service.conversion.strip(request)
    assert stripped is not None
    target.service.conversion.attach(request, TOKEN, stripped)
    return request, stripped


@pytest.mark.parametrize(("path", "headers"), [
    ("/c/dst", {"x-ms-requires-sync": "true"}),  # Copy Blob From URL
    ("/c/dst", {"x-ms-blob-type": "BlockBlob"}),  # Put Blob From URL
    ("/c/dst?comp=block&blockid=YQ%3D%3D", {}),  # Put Block From URL
    ("/c/dst?comp=appendblock", {}),  # Append Block From URL
    ("/c/dst?comp=page", {"x-ms-page-write": "update"}),  # Put Page From URL
])
def test_sas_on_a_storage_source_becomes_a_source_token(path, headers):
    request, stripped = convert(path, **{"x-ms-copy-source": f"{SOURCE}?{SAS}&snapshot=1",
                                         "authorization": "SharedKey a:b",
                                         "x-ms-version": "2026-10-06", **headers})
    assert request.headers["x-ms-copy-source"] == f"{SOURCE}?snapshot=1"
    assert request.headers["x-ms-copy-source-authorization"] == f"Bearer {TOKEN}"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["x-ms-version"] == "2026-10-06"
    assert set(stripped.schemes) == {"SharedKey", "CopySourceSAS"}


def test_async_copy_loses_the_sas_and_gets_no_source_token():
    request, _ = convert("/c/dst", **{"x-ms-copy-source": f"{SOURCE}?{SAS}",
                                      "authorization": "SharedKey a:b"})
    assert request.headers["x-ms-copy-source"] == SOURCE
    assert "x-ms-copy-source-authorization" not in request.headers


def test_a_source_token_raises_an_old_version():
    request, _ = convert("/c/dst?comp=block&blockid=YQ", **{
        "x-ms-copy-source": f"{SOURCE}?{SAS}", "authorization": "SharedKey a:b",
        "x-ms-version": "2019-12-12"})
    assert request.headers["x-ms-version"] == "2020-10-02"


def test_a_plain_http_storage_source_loses_its_sas_but_gets_no_token():
    request, stripped = convert("/c/dst", **{
        "x-ms-copy-source": f"http://source.blob.core.windows.net/c/b?{SAS}",
        "x-ms-requires-sync": "true", "authorization": "SharedKey a:b"})
    assert request.headers["x-ms-copy-source"] == "http://source.blob.core.windows.net/c/b"
    assert "x-ms-copy-source-authorization" not in request.headers
    assert set(stripped.schemes) == {"SharedKey", "CopySourceSAS"}


@pytest.mark.parametrize("source", [
    f"https://example.com/file.txt?{SAS}",  # not Azure Storage: not ours
    f"ftp://source.blob.core.windows.net/c/b?{SAS}",
    f"https://source.blob.core.windows.net.evil.example/c/b?{SAS}",
])
def test_other_sources_are_left_alone(source):
    request, stripped = convert("/c/dst", **{"x-ms-copy-source": source,
                                             "x-ms-requires-sync": "true",
                                             "authorization": "SharedKey a:b"})
    assert request.headers["x-ms-copy-source"] == source
    assert "x-ms-copy-source-authorization" not in request.headers
    assert stripped.schemes == ("SharedKey",)


def test_a_copy_source_sas_alone_is_key_material():
    sas_stripper = STRIPPERS["SAS"]
    request = tutils.treq(method=b"PUT", path=b"/c/dst?comp=block&blockid=YQ",
                          headers=((b"x-ms-copy-source", f"{SOURCE}?{SAS}".encode()),))
    assert sas_stripper(request) == (["CopySourceSAS"], {"copy_source_sas": "1"})


def test_rename_sources_lose_their_sas():
    dfs = conversion("SharedKey", "SAS")
    request = tutils.treq(method=b"PUT", path=b"/fs/new?mode=legacy", headers=(
        (b"x-ms-rename-source", f"/fs/old%20name?{SAS}".encode()),
        (b"x-ms-file-rename-source",
         f"https://acct.file.core.windows.net/share/old?{SAS}".encode())))
    stripped = dfs.strip(request)
    assert stripped is not None and stripped.schemes == ("CopySourceSAS",)
    dfs.attach(request, TOKEN, stripped)
    assert request.headers["x-ms-rename-source"] == "/fs/old%20name"
    assert request.headers["x-ms-file-rename-source"] == "https://acct.file.core.windows.net/share/old"
    assert "x-ms-copy-source-authorization" not in request.headers


@pytest.mark.parametrize(("length", "status"), [(str(MAX_BATCH_BYTES + 1), 413), (None, 411)])
def test_addon_refuses_before_buffering_what_the_service_would_not_take(length, status):
    flow, state, _ = batch_flow(sdk_batch("key"))
    if length is None:
        del flow.request.headers["content-length"]
    else:
        flow.request.headers["content-length"] = length
    flow.request.stream = True
    ResignBlobBatch().requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == status and state.refused
