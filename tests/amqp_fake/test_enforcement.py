"""Each rule the fake namespace enforces bites, with the real azure-servicebus SDK as client.

These are the fake's mutation checks too: switching one enforcement off
(FakeNamespace(checks={...: False})) makes the test of that rule fail.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from azure.core.credentials import AccessToken
from azure.servicebus import ServiceBusClient, ServiceBusMessage, TransportType
from azure.servicebus.exceptions import ServiceBusError
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.amqp_fake.conftest import MintingCredential
from tests.amqp_fake.test_calibration import servicebus_entra
from tests.support import entra
from tests.support.fake_namespace import FakeNamespace

pytestmark = pytest.mark.e2e


def send_one(client: ServiceBusClient) -> None:
    with client, client.get_queue_sender("orders") as sender:
        sender.send_messages(ServiceBusMessage("x"))


def refused_reasons(ns: FakeNamespace) -> set[str]:
    return {e["reason"] for e in ns.events("put_token") if not e["accepted"]}


def assert_nothing_delivered(ns: FakeNamespace) -> None:
    assert not ns.events("transfer")
    assert not any(e["accepted"] for e in ns.events("attach") if e["address"] != "$cbs")


@pytest.mark.parametrize(("credential", "reason"), [
    (MintingCredential(lifetime=-60), "token expired"),
    (MintingCredential(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
     "signature does not verify with the issuer key"),
    (MintingCredential(issuer="https://sts.windows.net/00000000-0000-0000-0000-000000000000/"),
     'issuer "https://sts.windows.net/00000000-0000-0000-0000-000000000000/" not trusted'),
    (MintingCredential(audience="https://storage.azure.com"),
     'token audience "https://storage.azure.com", expected https://servicebus.azure.net'),
], ids=["expired", "wrong-signature", "wrong-issuer", "wrong-audience"])
def test_bad_tokens_are_refused(namespace, credential, reason):
    with pytest.raises(ServiceBusError):
        send_one(servicebus_entra(namespace, credential))
    assert refused_reasons(namespace) == {reason}
    assert_nothing_delivered(namespace)


def other_namespace_client(ns: FakeNamespace) -> ServiceBusClient:
    return ServiceBusClient(
        fully_qualified_namespace="othernamespace.servicebus.windows.net",
        credential=MintingCredential(), custom_endpoint_address=f"sb://127.0.0.1:{ns.amqps_port}",
        connection_verify=ns.ca_pem_path, transport_type=TransportType.Amqp, retry_total=0)


def test_open_hostname_of_another_namespace_is_refused(tmp_path, pki):
    # the test CA's leaf names only the fake's namespace: the SDK checks the SNI it sends
    # against it, so name the other namespace in the cert too to reach the AMQP open
    with FakeNamespace(tmp_path / "ns", pki,
                       tls_names=("othernamespace.servicebus.windows.net",)) as ns:
        with pytest.raises(ServiceBusError):
            send_one(other_namespace_client(ns))
        opens = ns.events("open")
        assert opens and {(e["hostname"], e["accepted"]) for e in opens} == {
            ("othernamespace.servicebus.windows.net", False)}
        assert not ns.events("put_token")


def test_put_token_for_another_namespace_is_refused(tmp_path, pki):
    """With the open-hostname rule off, the audience-host rule alone still refuses."""
    with FakeNamespace(tmp_path / "ns", pki, checks={"check_hostname": False},
                       tls_names=("othernamespace.servicebus.windows.net",)) as ns:
        with pytest.raises(ServiceBusError):
            send_one(other_namespace_client(ns))
        assert refused_reasons(ns) == {"audience host othernamespace.servicebus.windows.net "
                                       "is not the namespace"}
        assert_nothing_delivered(ns)


class SlowCredential(MintingCredential):
    """Takes longer than the namespace's put-token deadline to hand out a token."""

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        time.sleep(2.5)
        return super().get_token(*scopes, **kwargs)


def test_no_put_token_within_the_deadline_closes_the_connection(tmp_path, pki):
    with FakeNamespace(tmp_path / "ns", pki, put_token_deadline=1.0) as ns:
        with pytest.raises(ServiceBusError):
            send_one(servicebus_entra(ns, SlowCredential()))
        closed = ns.events("connection_closed")
        assert closed and closed[0]["reason"] == "no valid put-token within 1 seconds"
        assert_nothing_delivered(ns)


class ShortTokenCredential(MintingCredential):
    """A token that expires in a few seconds while telling the SDK it lasts an hour, so the
    SDK does not refresh it: the namespace must detach the link when it expires."""

    def get_token(self, *scopes: str, **_: object) -> AccessToken:
        token = entra.mint(scopes[0].removesuffix("/.default"), lifetime=3)
        return AccessToken(token, int(time.time()) + 3600)


def test_link_is_detached_when_its_token_expires(namespace):
    with servicebus_entra(namespace, ShortTokenCredential()) as client, \
            client.get_queue_receiver("orders", max_wait_time=1) as receiver:
        receiver.receive_messages(max_message_count=1, max_wait_time=1)
        detached = namespace.wait_for("link_detached", timeout=10)
    assert detached, namespace.events()
    assert detached[0]["address"].endswith("/orders")
    assert detached[0]["reason"] == "token expired"


def test_link_outlives_a_token_that_is_replaced(namespace):
    """The counterpart: with a long-lived token the link stays (the detach is the expiry)."""
    with servicebus_entra(namespace) as client, \
            client.get_queue_receiver("orders", max_wait_time=1) as receiver:
        receiver.receive_messages(max_message_count=1, max_wait_time=1)
        assert namespace.wait_for("link_detached", timeout=5) == []


def test_attach_without_a_token_is_refused(namespace):
    """No SDK attaches before its put-token; a bare rhea client does, and is refused."""
    completed = subprocess.run(
        [shutil.which("node") or "node", str(Path(__file__).with_name("attach_without_token.mjs")),
         str(namespace.amqps_port), namespace.namespace, "orders", namespace.ca_pem_path],
        capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parents[2])
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result == {"outcome": "refused", "condition": "amqp:unauthorized-access"}, completed
    attaches = [e for e in namespace.events("attach") if e["address"].endswith("/orders")]
    assert attaches and attaches[0]["accepted"] is False
    assert attaches[0]["reason"] == "no valid token for orders"


class JwtOfAnotherType(MintingCredential):
    """A valid Entra token that the real SDK sends with a put-token `type` other than "jwt": it
    takes the type from a credential's `token_type`. (Its own SAS goes as type "jwt" from the
    Python SDK, and keyless recognises a SAS by its body, so no SDK trips this rule by itself.)"""

    token_type = b"urn:keyless-test:not-jwt"


def jwt_of_another_type(ns: FakeNamespace) -> ServiceBusClient:
    return servicebus_entra(ns, JwtOfAnotherType())


def test_a_jwt_put_with_another_type_is_refused(namespace):
    with pytest.raises(ServiceBusError):
        send_one(jwt_of_another_type(namespace))
    assert refused_reasons(namespace) == {
        "token type urn:keyless-test:not-jwt with a jwt body"}
    assert_nothing_delivered(namespace)


def test_the_same_put_token_passes_with_the_type_rule_off(tmp_path, pki):
    """The rule's own mutation check: only `type` made the test above refuse."""
    with FakeNamespace(tmp_path / "ns", pki, checks={"check_type": False}) as ns:
        send_one(jwt_of_another_type(ns))
        puts = ns.events("put_token")
        assert puts and all(p["accepted"] for p in puts), puts
        assert {p["type"] for p in puts} == {"urn:keyless-test:not-jwt"}
