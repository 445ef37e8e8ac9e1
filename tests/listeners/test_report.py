"""What the listeners record for `keyless report`: password logins (audit) and converted
logins, and the setup plan per database/cache server."""

from __future__ import annotations

from proxy.audit import CallLog, build_report, render_text
from proxy.listeners.connection import ClientTLS, Connection, Shared
from proxy.listeners.spec import parse_listener
from proxy.tokens import TokenCache


def connection(calls: CallLog, text: str, protocol: str) -> Connection:
    async def source(identity, scope):
        raise AssertionError("no token")

    shared = Shared(TokenCache(source), None, calls, ClientTLS(None))  # type: ignore[arg-type]
    return Connection(parse_listener(protocol, text), "127.0.0.1:1", shared)


def test_password_logins_are_planned_and_converted_ones_clear_the_verdict() -> None:
    calls = CallLog(None, clock=iter(range(100)).__next__)
    pg = connection(calls, "6432=orders.postgres.database.azure.com", "postgres")
    pg.record_password_login("app_user")
    pg.record_password_login("app_user")
    connection(calls, "6380=sessions.redis.cache.windows.net", "redis").record_password_login(
        "default")
    report = build_report(calls.entries())
    by_resource = {item["resource"]: item for item in report["inventory"]}
    assert by_resource["orders"]["schemes"] == {"password": 2}
    assert by_resource["orders"]["local_auth_can_be_disabled"] is False
    plans = {login["service"]: login["setup"] for login in report["database_logins"]}
    assert any("pgaadauth_create_principal" in step for step in plans["postgres"])
    assert any("access-policy-assignment create" in step for step in plans["redis"])
    text = render_text(report)
    assert "## Database and cache logins" in text and "pgaadauth_create_principal" in text
    assert "app_user" not in text  # user names are not recorded, only the server

    pg.login("converted")  # later, through keyless without --audit
    after = {item["resource"]: item for item in build_report(calls.entries())["inventory"]}
    assert after["orders"]["local_auth_can_be_disabled"] is True
    assert after["sessions"]["local_auth_can_be_disabled"] is False


def test_amqp_links_plan_the_sender_and_receiver_roles_by_service() -> None:
    from proxy.amqp.session import _Events

    calls = CallLog(None)
    conn = connection(calls, "5672=bus.servicebus.windows.net", "amqp")
    events = _Events(conn, lambda address: "eventhubs" if "telemetry" in address
                     else "servicebus")
    events("attach", {"role": "send", "address": "amqps://bus.servicebus.windows.net/orders"})
    events("attach", {"role": "receive", "address": "amqps://bus.servicebus.windows.net/orders"})
    events("attach", {"role": "send", "address": "amqps://bus.servicebus.windows.net/telemetry"})
    roles = {(a["service"], a["role"]) for a in build_report(calls.entries())["role_assignments"]}
    assert roles == {("servicebus", "Azure Service Bus Data Sender"),
                     ("servicebus", "Azure Service Bus Data Receiver"),
                     ("eventhubs", "Azure Event Hubs Data Sender")}
