"""Transparent mode with real traffic and real iptables, inside network namespaces.

The "pod" is a network namespace the test creates. In it run keyless (`--transparent`, as its
own UID 10001, verifying upstream TLS against the test CA), the fake identity endpoint (on
the pod's own loopback) and the legacy app (the real Storage SDK with a wrong key and no
proxy variables, as UID 10002, trusting keyless' CA). The pod applies exactly the rules
`keyless iptables --uid 10001 --listen ...` prints.

"Azure" is a second namespace, joined to the pod by a veth pair: Azurite (HTTPS on :443,
OAuth), a non-catalog TLS host (example.test, certificate from another CA) and an impostor
for a catalog name (certificate from another CA). They cannot live on the pod's loopback:
the recipe exempts 127.0.0.0/8 (the identity endpoint and other local sidecars must never
be redirected), so a stand-in Azure there would never see keyless. The pod's hosts file
(`/etc/netns/POD/hosts`) sends the Azure names there, and an IPv6-only catalog name to a
recording server for the recipe's ip6tables half. Every address (10.200.0.0/24,
fd00:200::/64) exists only inside these two namespaces; both are deleted, with everything
running in them, on every exit path. keyless listens on 127.0.0.1 and [::1] with no
--allow-clients: redirected connections keep the pod's address as their source.

Azurite's --debug log records each request's headers: the test reads only the
Authorization scheme and the client address from it, never the credential.

iptables: the distribution's `iptables` (iptables-nft, the nf_tables backend) works inside
a namespace on this kernel, as does iptables-legacy; KEYLESS_IPTABLES picks another binary.

Without root or the tools the test fails with the install hint
(`apt-get install -y iptables iproute2`); it never skips.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.e2e.conftest import BLOB_HOST
from tests.support.azurite import ACCOUNT, WRONG_KEY, Azurite
from tests.support.netns import (
    APP_UID,
    KEYLESS_UID,
    RecordingTLSServer,
    TransparentPod,
    transparent_pod,
)

pytestmark = pytest.mark.e2e

POD_ADDRESS = "10.200.0.1"
AZURITE_ADDRESS = "10.200.0.2"
OTHER_ADDRESS = "10.200.0.3"  # example.test: not in the catalog
IMPOSTOR_ADDRESS = "10.200.0.4"  # claims a catalog name with another CA's certificate
OTHER_HOST = "example.test"
IMPOSTOR_HOST = "keylessimpostor.blob.core.windows.net"
# A catalog name whose server rejects the first token (401): keyless replays over its own
# upstream connection, which must be exempt from the redirect too.
REPLAY_ADDRESS = "10.200.0.6"
REPLAY_HOST = "keylessreplay.blob.core.windows.net"
# IPv6 (unique local addresses, inside the two namespaces only): a catalog name with only
# an IPv6 address, served by a recording server with a certificate keyless trusts.
POD_ADDRESS6 = "fd00:200::1"
SIX_ADDRESS = "fd00:200::5"
SIX_HOST = "keylesssix.blob.core.windows.net"
APP = Path(__file__).resolve().parents[1] / "apps" / "transparent_app.py"
LEGACY_BLOB = (f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
               f"BlobEndpoint=https://{BLOB_HOST}")
_AZURITE_REQUEST = re.compile(
    r"RequestMethod=(?P<method>\S+) RequestURL=(?P<url>\S+) RequestHeaders:(?P<headers>\{.*\})"
    r" ClientIP=(?P<client>\S+) Protocol=")


def azurite_requests(azurite: Azurite, container: str) -> list[dict[str, str]]:
    """What Azurite received for `container`: method, client address, the Authorization
    scheme and header names (never the credential itself)."""
    seen = []
    for line in azurite.debug_log_text().splitlines():
        match = _AZURITE_REQUEST.search(line)
        if match and f"/{container}" in match["url"]:
            headers = {k.lower(): v for k, v in json.loads(match["headers"]).items()}
            scheme = headers.get("authorization", "").split(" ", 1)[0]
            seen.append({"method": match["method"], "url": match["url"],
                         "client": match["client"],
                         "scheme": scheme, "header_names": ",".join(sorted(headers))})
    return seen


class Pod(TransparentPod):
    other_ca_path: str
    azurite: Azurite
    other: RecordingTLSServer
    impostor: RecordingTLSServer
    local: RecordingTLSServer
    six: RecordingTLSServer
    replay: RecordingTLSServer

    @property
    def keyless_ca_path(self) -> str:
        return self.keyless_ca

    def app(self, *args: str, ca_bundle: str | None = None) -> dict[str, Any]:
        """The legacy app, inside the pod as its own UID; no proxy variables at all."""
        return self.run_app(sys.executable, str(APP), *args,
                            env={"REQUESTS_CA_BUNDLE": ca_bundle or self.keyless_ca_path})

    def azurite_requests(self, container: str) -> list[dict[str, str]]:
        return azurite_requests(self.azurite, container)

    def converted(self) -> float:
        return self.keyless.metric("keyless_requests_total", outcome="converted")

    def tunnelled(self) -> float:
        return self.keyless.metric("keyless_requests_total", outcome="tunnelled")


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    hosts = {BLOB_HOST: AZURITE_ADDRESS, OTHER_HOST: OTHER_ADDRESS,
             IMPOSTOR_HOST: IMPOSTOR_ADDRESS, SIX_HOST: SIX_ADDRESS, REPLAY_HOST: REPLAY_ADDRESS}
    with transparent_pod("", POD_ADDRESS, (AZURITE_ADDRESS, OTHER_ADDRESS, IMPOSTOR_ADDRESS,
                                           REPLAY_ADDRESS), hosts, kind=Pod) as pod:
        pod.pod.exec("ip", "-6", "addr", "add", f"{POD_ADDRESS6}/64", "dev", "veth0", "nodad")
        pod.azure.exec("ip", "-6", "addr", "add", f"{SIX_ADDRESS}/64", "dev", "veth1", "nodad")
        workdir, pki = pod.workdir, pod.pki
        pod.azurite = pod.in_azure(Azurite(workdir / "azurite", pki, host=AZURITE_ADDRESS,
                                           blob_port=443))
        # Another CA: example.test's real one, and the impostor's.
        other_ca = trustme.CA(organization_name="Not The Test CA")
        pod.other_ca_path = str(workdir / "pki" / "other-ca.pem")
        other_ca.cert_pem.write_to_path(pod.other_ca_path)
        servers = []
        for start_in, address, host in ((pod.in_azure, OTHER_ADDRESS, OTHER_HOST),
                                        (pod.in_azure, IMPOSTOR_ADDRESS, IMPOSTOR_HOST),
                                        (pod.in_pod, "127.0.0.1", "localhost")):  # a sidecar
            leaf = other_ca.issue_cert(host)
            cert, key = workdir / "pki" / f"{host}.pem", workdir / "pki" / f"{host}.key"
            cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            key.write_bytes(leaf.private_key_pem.bytes())
            servers.append(start_in(RecordingTLSServer(address, 443, (str(cert), str(key)),
                                                       f"hello from {host}")))
        for address, host in ((SIX_ADDRESS, SIX_HOST), (REPLAY_ADDRESS, REPLAY_HOST)):
            servers.append(pod.in_azure(RecordingTLSServer(
                address, 443, pki.issue_server_cert(host), f"hello from {host}")))
        pod.other, pod.impostor, pod.local, pod.six, pod.replay = servers

        # No --allow-clients: redirected connections keep the app's source address (the
        # pod's, not loopback), and keyless accepts them on its loopback listener.
        pod.start_keyless("--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
                          "--token-timeout", "5", "--log-level", "debug")
        yield pod


@pytest.fixture
def redirected(pod: Pod) -> Pod:
    pod.apply_rules()
    return pod


def failure_context(pod: Pod) -> str:
    return f"keyless log tail:\n{pod.keyless.log()[-4000:]}"


def test_without_the_rules_azurite_refuses_the_apps_wrong_key(pod):
    pod.pod.flush_nat()
    assert "KEYLESS_OUTPUT" not in pod.pod.nat_rules() + pod.pod.nat_rules("ip6tables")
    container = f"norules{uuid.uuid4().hex[:10]}"
    converted_before = pod.converted()

    # The app as it was before keyless: trusting the service's own CA.
    result = pod.app("blob", LEGACY_BLOB, container, ca_bundle=pod.pki.ca_pem_path)

    assert result["outcome"] == "refused", result
    assert result["status"] in (400, 403), result  # --oauth basic answers 400 to a bad key
    seen = pod.azurite_requests(container)
    assert seen and {r["scheme"] for r in seen} == {"SharedKey"}, seen
    assert {r["client"] for r in seen} == {POD_ADDRESS}
    assert pod.converted() == converted_before


def test_sdk_with_a_wrong_key_reaches_azurite_with_a_token(redirected):
    pod = redirected
    assert pod.redirecting()
    container = f"transparent{uuid.uuid4().hex[:10]}"
    converted_before, tunnelled_before = pod.converted(), pod.tunnelled()
    token_calls_before = len(pod.identity.calls)

    result = pod.app("blob", LEGACY_BLOB, container)

    assert result["outcome"] == "ok", (result, failure_context(pod))
    assert result["uid"] == APP_UID and pod.keyless.uid_running() == KEYLESS_UID
    assert result["names"] == ["blob-0", "blob-1"]
    seen = pod.azurite_requests(container)
    assert seen, "Azurite saw none of the app's requests"
    assert {r["scheme"] for r in seen} == {"Bearer"}, seen  # no Shared Key, ever
    assert not [r for r in seen if "sig=" in r["url"]], seen  # nor a SAS
    # keyless' own connection comes from the pod too (its UID is exempt, not its address)
    assert {r["client"] for r in seen} == {POD_ADDRESS}
    # One conversion per request: keyless' own upstream connection was not redirected back
    # to keyless (which would convert it a second time, or loop).
    assert len(seen) == len(result["statuses"])
    assert pod.converted() - converted_before == len(seen)
    assert pod.tunnelled() == tunnelled_before
    assert len(pod.identity.calls) - token_calls_before <= 1  # cached after the first


def test_a_non_catalog_tls_host_is_tunnelled_untouched(redirected):
    pod = redirected
    tunnelled_before, converted_before = pod.tunnelled(), pod.converted()
    connections_before = len(pod.other.connections)

    result = pod.app("get", OTHER_HOST, pod.other_ca_path)

    assert result["outcome"] == "answered", (result, failure_context(pod))
    assert result["status"] == 200 and result["body"] == f"hello from {OTHER_HOST}"
    # the app saw the host's real certificate, not one from keyless' CA
    assert result["issuer"]["organizationName"] == "Not The Test CA"
    # it went through keyless (redirected, then tunnelled), and arrived as the app sent it
    assert pod.tunnelled() - tunnelled_before == 1
    assert pod.converted() == converted_before
    arrived = pod.other.connections[connections_before:]
    assert len(arrived) == 1 and arrived[0]["handshake"] == "ok"
    assert b"\r\nAuthorization: SharedKey devstoreaccount1:" in arrived[0]["received"]


def test_an_impostor_for_a_catalog_name_gets_no_token_and_no_key(redirected):
    pod = redirected
    connections_before = len(pod.impostor.connections)

    result = pod.app("get", IMPOSTOR_HOST, pod.keyless_ca_path)

    # keyless refused the impostor's certificate (another CA) and answered the app itself
    assert result["outcome"] == "answered", (result, failure_context(pod))
    assert result["status"] == 502, result
    assert "Bearer" not in result["body"] and "eyJ" not in result["body"]
    arrived = pod.impostor.connections[connections_before:]
    assert arrived, "keyless never dialled the impostor: the test proved nothing"
    # nothing beyond a TLS handshake that keyless broke off
    assert all(c["handshake"] != "ok" for c in arrived), arrived
    assert pod.impostor.received() == b""


@pytest.mark.parametrize("host_header", [OTHER_HOST, "otheraccount.blob.core.windows.net"])
def test_a_catalog_name_with_another_host_header_is_refused(redirected, host_header):
    pod = redirected
    requests_before = len(pod.azurite.debug_log_text())

    result = pod.app("get", BLOB_HOST, pod.keyless_ca_path, host_header)

    assert result["outcome"] == "answered", (result, failure_context(pod))
    assert result["status"] in (403, 421), result
    assert "Keyless" in result["body"], result  # keyless' own answer, not Azurite's
    assert "RequestMethod=" not in pod.azurite.debug_log_text()[requests_before:]


def test_https_to_the_pods_loopback_is_not_redirected(redirected):
    pod = redirected
    tunnelled_before, converted_before = pod.tunnelled(), pod.converted()

    result = pod.app("get", "localhost", pod.other_ca_path)

    assert result["outcome"] == "answered", (result, failure_context(pod))
    assert result["status"] == 200 and result["body"] == "hello from localhost"
    # the recipe's 127.0.0.0/8 exemption: keyless never saw this connection
    assert pod.tunnelled() == tunnelled_before and pod.converted() == converted_before


def test_ipv6_https_is_redirected_and_converted_too(redirected):
    """The recipe's ip6tables half: an app reaching a catalog name over IPv6 goes to keyless
    at [::1] and out with a token; never around keyless with its key."""
    pod = redirected
    connections_before, converted_before = len(pod.six.connections), pod.converted()
    # An app that trusts the service's own CA as well: around keyless, it would send its key.
    both = pod.workdir / "app" / "keyless-and-service-ca.pem"
    both.write_text(Path(pod.keyless_ca_path).read_text() + Path(pod.pki.ca_pem_path).read_text())
    both.chmod(0o644)

    result = pod.app("get", SIX_HOST, str(both))

    arrived = pod.six.connections[connections_before:]
    key_went_out = b"SharedKey" in pod.six.received()
    assert not key_went_out, "the app's key reached the IPv6 server around keyless"
    assert result["outcome"] == "answered", (result, failure_context(pod))
    assert result["status"] == 200 and result["body"] == f"hello from {SIX_HOST}"
    assert result["issuer"]["organizationName"] == "keyless"  # intercepted, not tunnelled
    assert pod.converted() - converted_before == 1 and len(arrived) == 1
    schemes = re.findall(rb"\r\nauthorization: (\w+) ", arrived[0]["received"], re.IGNORECASE)
    assert schemes == [b"Bearer"], schemes


def test_a_401_is_replayed_once_over_keyless_own_exempt_connection(redirected):
    pod = redirected
    pod.replay.queued.append((401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}))
    connections_before = len(pod.replay.connections)
    replayed_before = pod.keyless.metric("keyless_token_retries_total", action="replayed")

    result = pod.app("get", REPLAY_HOST, pod.keyless_ca_path)

    assert result["outcome"] == "answered", (result, failure_context(pod))
    assert result["status"] == 200 and result["body"] == f"hello from {REPLAY_HOST}", result
    assert pod.keyless.metric("keyless_token_retries_total", action="replayed") \
        - replayed_before == 1
    arrived = pod.replay.connections[connections_before:]
    tokens = [re.findall(rb"\r\nauthorization: Bearer (\S+)", c["received"], re.IGNORECASE)
              for c in arrived]
    # the converted request, then the replay (keyless' pool, as its own UID) with a new token
    assert [len(t) for t in tokens] == [1, 1], [c["handshake"] for c in arrived]
    assert tokens[0] != tokens[1], "the replay reused the rejected token"
    assert b"SharedKey" not in pod.replay.received()
