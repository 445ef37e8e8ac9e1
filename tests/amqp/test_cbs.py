"""proxy/amqp/cbs.py: SAS recognition by the body, the local endpoint's rewrites for every
SDK's audience and address forms."""

from __future__ import annotations

import pytest

from proxy.amqp.cbs import parse_sas, rewrite_address, rewrite_hostname

NS = "keylessbus.servicebus.windows.net"


@pytest.mark.parametrize(("address", "expected"), [
    ("sb://localhost:5672/orders", f"sb://{NS}/orders"),  # Python, JS audiences
    ("amqps://localhost:5672/orders", f"amqps://{NS}/orders"),  # Python link address, .NET
    ("amqp://127.0.0.1:5672/topic/Subscriptions/sub", f"amqp://{NS}/topic/Subscriptions/sub"),
    ("sb://localhost:5672/telemetry/ConsumerGroups/$Default/Partitions/0",
     f"sb://{NS}/telemetry/ConsumerGroups/$Default/Partitions/0"),
    ("amqps://localhost:5672/orders/$management", f"amqps://{NS}/orders/$management"),
    ("$cbs", "$cbs"), ("orders", "orders"), ("telemetry/Partitions/1", "telemetry/Partitions/1"),
    (f"sb://{NS}/orders", f"sb://{NS}/orders"),
])
def test_local_addresses_become_the_namespace(address, expected):
    assert rewrite_address(address, NS, "*") == expected


def test_transparent_and_other_authorities_are_kept():
    assert rewrite_address("sb://localhost:5672/orders", NS, None) == "sb://localhost:5672/orders"
    assert rewrite_address("sb://other:5672/orders", NS, "localhost:5672") == \
        "sb://other:5672/orders"
    assert rewrite_address("sb://LOCALHOST:5672/orders", NS, "localhost:5672") == \
        f"sb://{NS}/orders"


def test_hostnames():
    assert rewrite_hostname("localhost", NS, "*") == NS
    assert rewrite_hostname("localhost", NS, "localhost:5672") == NS
    assert rewrite_hostname("elsewhere", NS, "localhost:5672") == "elsewhere"
    assert rewrite_hostname("localhost", NS, None) == "localhost"


def test_sas_is_recognised_by_its_body_and_only_non_secret_fields_are_kept():
    sas = parse_sas("SharedAccessSignature sr=sb%3A%2F%2Flocalhost%2Forders&sig=c2ln%3D"
                    "&se=1796170000&skn=RootManageSharedAccessKey")
    assert sas is not None
    assert (sas.audience, sas.expiry, sas.key_name) == (
        "sb://localhost/orders", 1796170000.0, "RootManageSharedAccessKey")
    assert "c2ln" not in repr(sas)
    assert parse_sas("eyJhbGciOiJSUzI1NiJ9.e30.sig") is None
    assert parse_sas("SharedAccessSignature sig=x&se=soon").expiry is None
