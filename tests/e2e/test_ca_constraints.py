"""keyless' CA cannot vouch for hosts keyless does not intercept: real TLS clients (Python ssl,
Node.js, Java 17, Go) enforce its Name Constraints, and apps through a real keyless still work.

The client programs live in tests/apps/tls-clients/; each connects to 127.0.0.1 as a given
host name, trusts only the given CA file, sends GET / and prints ACCEPTED or REJECTED.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from proxy.ca import CA_CERT, CA_KEY_AND_CERT, prepare_ca
from proxy.catalog import Catalog
from tests.e2e.conftest import BLOB_HOST, DEAD_PROXY_ENV
from tests.support.azurite import ACCOUNT, WRONG_KEY, free_port
from tests.support.keyless import KeylessProcess, keyless_command

pytestmark = pytest.mark.e2e

CLIENTS_DIR = Path(__file__).parents[1] / "apps" / "tls-clients"
INSIDE = "keylessacct.blob.core.windows.net"
OUTSIDE = "www.example.com"
INSTALL_HINT = {
    "node": "apt-get install nodejs (Node.js 18 or later)",
    "java": "apt-get install openjdk-17-jdk-headless",
    "javac": "apt-get install openjdk-17-jdk-headless",
    "go": "install Go from https://go.dev/dl/ (or apt-get install golang) and put it on PATH",
}


def require(tool: str) -> str:
    found = shutil.which(tool) or (f"/usr/local/go/bin/{tool}" if tool == "go" and Path(
        "/usr/local/go/bin/go").exists() else None)
    if found is None:
        raise RuntimeError(f"the CA constraint tests need `{tool}`: {INSTALL_HINT[tool]}")
    return found


# A TLS client: (host, port, ca file) -> (accepted, output).
Client = Callable[[str, int, Path], tuple[bool, str]]


def _run(command: list[str]) -> tuple[bool, str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode in (0, 1), output  # 2: the client itself failed
    return done.returncode == 0 and output.startswith("ACCEPTED"), output


def python_client(host: str, port: int, ca: Path) -> tuple[bool, str]:
    context = ssl.create_default_context(cafile=str(ca))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        with (socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
              context.wrap_socket(raw, server_hostname=host) as tls):
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            return True, "ACCEPTED " + tls.recv(4096).decode().split("\r\n")[0]
    except ssl.SSLError as exc:
        return False, f"REJECTED {exc}"


@pytest.fixture(scope="module")
def clients(tmp_path_factory) -> dict[str, Client]:
    """The four clients, built for this run (javac, go build); missing tools are errors."""
    build = tmp_path_factory.mktemp("tls-clients")
    node, java = require("node"), require("java")
    subprocess.run([require("javac"), "-d", str(build), str(CLIENTS_DIR / "TlsClient.java")],
                   check=True, timeout=120)
    subprocess.run([require("go"), "build", "-o", str(build / "tlsclient"),
                    str(CLIENTS_DIR / "main.go")], check=True, timeout=300,
                   env={**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": ""})
    return {
        "python": python_client,
        "node": lambda h, p, ca: _run([node, str(CLIENTS_DIR / "client.js"), h, str(p), str(ca)]),
        "java": lambda h, p, ca: _run([java, "-cp", str(build), "TlsClient", h, str(p),
                                       str(ca)]),
        "go": lambda h, p, ca: _run([str(build / "tlsclient"), h, str(p), str(ca)]),
    }


# Certificates minted here with `cryptography`, independently of keyless' own leaf code.

def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def mint_leaf(ca_key, ca: x509.Certificate, names: list[x509.GeneralName],
              ) -> tuple[bytes, bytes]:
    """A leaf for `names` from `ca`; the PEM holds the leaf and `ca` (the chain served)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    first = next(n.value for n in names if isinstance(n, x509.DNSName))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first)]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=5))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value),
            critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    chain = cert.public_bytes(serialization.Encoding.PEM)
    if ca.issuer != ca.subject:
        chain += ca.public_bytes(serialization.Encoding.PEM)
    return chain, _key_pem(key)


def unconstrained_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unconstrained test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=10))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


class LoopbackTLSServer:
    """Answers every TLS connection's first request with 200; handshake failures are fine."""

    def __init__(self, workdir: Path, cert_pem: bytes, key_pem: bytes) -> None:
        (workdir / "cert.pem").write_bytes(cert_pem)
        (workdir / "key.pem").write_bytes(key_pem)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(workdir / "cert.pem", workdir / "key.pem")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.5)
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                try:
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        request = b""
                        while b"\r\n\r\n" not in request and len(request) < 65536:
                            chunk = tls.recv(4096)
                            if not chunk:
                                break
                            request += chunk
                        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"
                                    b"Connection: close\r\n\r\n")
                except (ssl.SSLError, OSError):
                    pass  # the client refused our certificate: that is the point

    def __enter__(self) -> LoopbackTLSServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.listener.close()


@dataclass
class Case:
    name: str
    host: str
    port: int
    ca: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[dict[str, Case]]:
    """Loopback servers with leaves from keyless' generated CA, and one from a CA without
    constraints (the control: the same outside leaf is then accepted)."""
    root = tmp_path_factory.mktemp("ca-constraints")
    confdir = root / "confdir"
    prepare_ca(confdir, zones=Catalog().permitted_zones())
    ca_pem = confdir / CA_CERT  # the root: all the app trusts
    key_file = (confdir / CA_KEY_AND_CERT).read_bytes()
    ca = x509.load_pem_x509_certificates(key_file)[0]  # the signing CA keyless holds
    ca_key = serialization.load_pem_private_key(key_file, None)
    free_key, free_ca = unconstrained_ca()
    (root / "free-ca.pem").write_bytes(free_ca.public_bytes(serialization.Encoding.PEM))
    dns = x509.DNSName
    leaves = {
        "inside": (INSIDE, mint_leaf(ca_key, ca, [dns(INSIDE)]), ca_pem),
        "outside": (OUTSIDE, mint_leaf(ca_key, ca, [dns(OUTSIDE)]), ca_pem),
        # the right host, plus an IP address (what a transparent-mode leaf would name)
        "inside-with-ip": (INSIDE, mint_leaf(ca_key, ca, [
            dns(INSIDE), x509.IPAddress(ipaddress.ip_address("20.60.1.1"))]), ca_pem),
        "outside-unconstrained-ca": (OUTSIDE, mint_leaf(free_key, free_ca, [dns(OUTSIDE)]),
                                     root / "free-ca.pem"),
    }
    servers = []
    cases = {}
    for name, (host, (cert, key), trust) in leaves.items():
        workdir = root / name
        workdir.mkdir()
        server = LoopbackTLSServer(workdir, cert, key).__enter__()
        servers.append(server)
        cases[name] = Case(name, host, server.port, trust)
    try:
        yield cases
    finally:
        for server in servers:
            server.__exit__(None, None, None)


RUNTIMES = ("python", "node", "java", "go")
# How each runtime says "the CA's Name Constraints forbid this name".
CONSTRAINT_REFUSAL = {
    "python": "subtree violation",  # OpenSSL: permitted / excluded subtree violation
    "node": "subtree violation",
    "java": "name constraints check failed",
    "go": "not authorized to sign for this name",
}


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_clients_accept_a_leaf_inside_the_zones(clients, served, runtime) -> None:
    case = served["inside"]
    accepted, output = clients[runtime](case.host, case.port, case.ca)
    assert accepted, output
    assert "HTTP/1.1 200" in output


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_clients_reject_a_leaf_outside_the_zones_from_the_same_ca(clients, served,
                                                                  runtime) -> None:
    case = served["outside"]
    accepted, output = clients[runtime](case.host, case.port, case.ca)
    assert not accepted, output
    assert CONSTRAINT_REFUSAL[runtime] in output, output
    # control: the same kind of leaf from a CA without constraints passes, so the refusal
    # above is the constraints' doing, not a broken test certificate
    control = served["outside-unconstrained-ca"]
    accepted, output = clients[runtime](control.host, control.port, control.ca)
    assert accepted, output


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_clients_reject_a_leaf_that_also_names_an_ip_address(clients, served,
                                                             runtime) -> None:
    case = served["inside-with-ip"]
    accepted, output = clients[runtime](case.host, case.port, case.ca)
    assert not accepted, output
    assert CONSTRAINT_REFUSAL[runtime] in output, output


# A real keyless process.

def _connect_through(proxy_port: int, host: str, ca: Path) -> x509.Certificate:
    """CONNECT through keyless, then a strict TLS handshake as `host`; the leaf it showed."""
    context = ssl.create_default_context(cafile=str(ca))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as raw:
        raw.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
        answer = raw.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        with context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _verify_with_constraints(confdir: Path, leaf: x509.Certificate, host: str) -> None:
    root = x509.load_pem_x509_certificate((confdir / CA_CERT).read_bytes())
    signing = x509.load_pem_x509_certificates((confdir / CA_KEY_AND_CERT).read_bytes())[0]
    (PolicyBuilder().store(Store([root])).build_server_verifier(x509.DNSName(host))
     .verify(leaf, [signing]))


# keyless' default is lazy (the upstream is dialled when a request is forwarded, so
# mitmproxy's leaf would hold the SNI and the CONNECT host); eager makes mitmproxy copy the
# upstream certificate's names into its leaf, here Azurite's 127.0.0.1 and localhost, which
# the CA's constraints forbid: keyless' leaf must name the host alone either way.
@pytest.mark.parametrize("strategy", ["lazy", "eager"])
def test_an_app_through_keyless_reaches_a_catalog_host_with_a_leaf_in_zone(
        tmp_path, pki, azurite, module_identity, monkeypatch, strategy) -> None:
    process = KeylessProcess(tmp_path, [
        "--connect-to", f"{BLOB_HOST}:443:127.0.0.1:{azurite.blob_port}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
        "--set", f"connection_strategy={strategy}",
    ], {**module_identity.env(), **DEAD_PROXY_ENV}).start()
    try:
        ca_pem = Path(process.ca_path)
        ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
        permitted = {n.value for n in ca.extensions.get_extension_for_class(
            x509.NameConstraints).value.permitted_subtrees}
        assert "blob.core.windows.net" in permitted
        # 90 days (the default) from two days back (clock skew, as mitmproxy)
        assert ca.not_valid_after_utc - ca.not_valid_before_utc == datetime.timedelta(days=92)
        # what operators alert on: a running keyless does not rotate its CA
        assert process.metric("keyless_ca_expiry_timestamp_seconds") == \
            ca.not_valid_after_utc.timestamp()

        leaf = _connect_through(process.port, BLOB_HOST, ca_pem)
        assert leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [BLOB_HOST]
        assert leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress) == []
        assert leaf.not_valid_after_utc <= ca.not_valid_after_utc
        _verify_with_constraints(process.confdir, leaf, BLOB_HOST)

        # the legacy app: its SDK, a wrong key, keyless' CA, the proxy variables
        monkeypatch.setenv("HTTPS_PROXY", process.proxy_url)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", process.ca_path)
        for name in ("NO_PROXY", "no_proxy", "https_proxy", "HTTP_PROXY", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
        legacy = (f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};"
                  f"AccountKey={WRONG_KEY};EndpointSuffix=core.windows.net")
        container = BlobServiceClient.from_connection_string(legacy).create_container(
            f"ca{uuid.uuid4().hex[:8]}")
        container.upload_blob("in-zone.txt", b"through a constrained CA")
        assert container.download_blob("in-zone.txt").readall() == b"through a constrained CA"
        container.delete_container()
    finally:
        assert process.stop() == 0, process.log()[-3000:]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_every_runtime_accepts_keyless_own_leaf(clients, tmp_path, pki, azurite,
                                                module_identity, runtime) -> None:
    """TLS straight to a keyless reverse listener as the catalog host: the leaf keyless makes
    passes each runtime's checks, and the request reaches Azurite through keyless."""
    port = free_port()
    process = KeylessProcess(tmp_path, [
        "--reverse", f"{port}=https://{BLOB_HOST}",
        "--connect-to", f"{BLOB_HOST}:443:127.0.0.1:{azurite.blob_port}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
    ], {**module_identity.env(), **DEAD_PROXY_ENV}).start()
    try:
        accepted, output = clients[runtime](BLOB_HOST, port, Path(process.ca_path))
        assert accepted, output + process.log()[-2000:]
        assert "HTTP/1.1 " in output  # Azurite's answer to GET / (through keyless)
    finally:
        assert process.stop() == 0, process.log()[-3000:]


def test_a_tls_client_without_sni_gets_a_leaf_without_an_ip(tmp_path, pki, azurite,
                                                            module_identity) -> None:
    """mitmproxy would name the listener's IP address in this leaf (and, in transparent
    mode, the destination IP): the CA excludes every IP, so keyless names the host alone."""
    port = free_port()
    process = KeylessProcess(tmp_path, [
        "--reverse", f"{port}=https://{BLOB_HOST}",
        "--connect-to", f"{BLOB_HOST}:443:127.0.0.1:{azurite.blob_port}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
    ], {**module_identity.env(), **DEAD_PROXY_ENV}).start()
    try:
        context = ssl.create_default_context(cafile=process.ca_path)
        context.check_hostname = False  # no name to check: the chain is still verified
        with (socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
              context.wrap_socket(raw, server_hostname=None) as tls):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        leaf = x509.load_der_x509_certificate(der)
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [BLOB_HOST]
        assert names.get_values_for_type(x509.IPAddress) == []
    finally:
        assert process.stop() == 0, process.log()[-3000:]


def test_a_route_for_a_whole_top_level_domain_stops_startup(tmp_path) -> None:
    config = tmp_path / "keyless.toml"
    config.write_text('[[route]]\nhost = "*.internal"\nservice = "storage-blob"\n')
    done = subprocess.run([*keyless_command(), "run", "--confdir", str(tmp_path / "conf"),
                           "--config", str(config), "--listen", f"127.0.0.1:{free_port()}",
                           "--admin", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "'*.internal' has no DNS zone of at least two labels" in done.stderr
    assert not (tmp_path / "conf" / CA_KEY_AND_CERT).exists()


def test_a_new_route_replaces_the_generated_ca_and_init_publishes_it(tmp_path, pki,
                                                                     module_identity) -> None:
    config = tmp_path / "keyless.toml"
    config.write_text("")
    args = ["--config", str(config)]
    env = {**module_identity.env(), **DEAD_PROXY_ENV}
    first = KeylessProcess(tmp_path, args, env).start()
    assert first.stop() == 0, first.log()
    ca_pem = first.confdir / CA_CERT
    before = ca_pem.read_bytes()
    assert "replaced keyless' CA" not in first.log()

    config.write_text('[[route]]\nhost = "storage-*.contoso.internal"\n'
                      'service = "storage-blob"\n')
    second = KeylessProcess(tmp_path, args, env).start()
    try:
        after = ca_pem.read_bytes()
        assert after != before
        log = second.log()
        assert "replaced keyless' CA" in log and "does not permit contoso.internal" in log
        assert "Apps must trust the new certificate" in log
        permitted = {n.value for n in x509.load_pem_x509_certificate(after).extensions
                     .get_extension_for_class(x509.NameConstraints).value.permitted_subtrees}
        assert "contoso.internal" in permitted
        leaf = _connect_through(second.port, "storage-a.contoso.internal", ca_pem)
        _verify_with_constraints(second.confdir, leaf, "storage-a.contoso.internal")
    finally:
        assert second.stop() == 0, second.log()

    # the init container, with the same configuration, publishes this CA and keeps it
    out = tmp_path / "shared" / "keyless-ca.pem"
    done = subprocess.run([*keyless_command(), "init", "--confdir", str(first.confdir),
                           "--config", str(config), "--ca-out", str(out)],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == after == ca_pem.read_bytes()
    printed = subprocess.run([*keyless_command(), "ca", "--confdir", str(first.confdir),
                              "--config", str(config)], capture_output=True, timeout=60)
    assert printed.stdout == after
    # `keyless ca` only prints: with another configuration it warns, and keeps the CA a
    # running keyless uses
    other = subprocess.run([*keyless_command(), "ca", "--confdir", str(first.confdir)],
                           capture_output=True, timeout=60)
    assert other.stdout == after == ca_pem.read_bytes()
    assert b"does not fit this configuration" in other.stderr
    assert b"permits zones no longer configured: contoso.internal" in other.stderr
