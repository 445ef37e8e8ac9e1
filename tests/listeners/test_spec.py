"""Listener specs: `--postgres/--mysql/--redis [ADDR:]PORT=HOST[:PORT][?OPTS]` and config."""

from __future__ import annotations

import argparse

import pytest

from proxy.config import ConfigError, add_flags, resolve
from proxy.listeners.spec import ListenerSpec, parse_listener
from proxy.tokens import Identity

GUID = "11111111-2222-4333-8444-555555555555"


def test_defaults_loopback_and_the_protocols_port() -> None:
    spec = parse_listener("postgres", "6432=db1.postgres.database.azure.com")
    assert spec == ListenerSpec("postgres", ("127.0.0.1", 6432),
                                ("db1.postgres.database.azure.com", 5432))
    assert spec.scope == "https://ossrdbms-aad.database.windows.net/.default"
    assert spec.name == "postgres:6432"
    assert parse_listener("mysql", "3307=m.mysql.database.azure.com").upstream[1] == 3306
    assert parse_listener("redis", "6379=c.redis.cache.windows.net").upstream == (
        "c.redis.cache.windows.net", 6380)
    managed = parse_listener("redis", "6379=c.westeurope.redis.azure.net")
    assert managed.upstream[1] == 10000
    assert managed.scope == "https://redis.azure.com/.default"


def test_options_address_and_port() -> None:
    spec = parse_listener(
        "postgres", f"0.0.0.0:6432=DB1.postgres.database.azure.com:6000?user=app%20role&"
        f"client-id={GUID}&client-tls=true")
    assert spec.listen == ("0.0.0.0", 6432)
    assert spec.upstream == ("db1.postgres.database.azure.com", 6000)
    assert spec.user == "app role"
    assert spec.identity == Identity(GUID)
    assert spec.client_tls is True


@pytest.mark.parametrize("text, reason", [
    ("6432=evil.example.com", "not an Azure postgres host"),
    ("6432=postgres.database.azure.com.evil.com", "not an Azure postgres host"),
    ("6432=.postgres.database.azure.com", "expected"),
    ("6432=x.mysql.database.azure.com", "not an Azure postgres host"),
    ("99999=x.postgres.database.azure.com", "expected"),
    ("x.postgres.database.azure.com", "expected"),
    ("6432=x.postgres.database.azure.com?password=x", "unknown option"),
    ("6432=x.postgres.database.azure.com?client-id=nope", "GUID"),
    ("6432=x.postgres.database.azure.com?client-tls=maybe", "true or false"),
])
def test_bad_specs_are_refused_clearly(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_listener("postgres", text)


def test_redis_has_no_client_tls_option() -> None:
    with pytest.raises(ValueError, match="client-tls is for PostgreSQL and MySQL"):
        parse_listener("redis", "6379=c.redis.cache.windows.net?client-tls=true")


def _resolve(argv: list[str], environ: dict[str, str] | None = None):
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return resolve(parser.parse_args(argv), environ or {})


def test_flags_env_and_file_give_the_same_listeners(tmp_path) -> None:
    text = "6432=db1.postgres.database.azure.com?user=app"
    from_flag = _resolve(["--postgres", text]).listeners
    from_env = _resolve([], {"KEYLESS_POSTGRES": text}).listeners
    config = tmp_path / "keyless.toml"
    config.write_text(f'postgres = ["{text}"]\n')
    from_file = _resolve(["--config", str(config)]).listeners
    assert from_flag == from_env == from_file
    assert from_flag[0].user == "app"


def test_an_explicit_route_allows_another_host(tmp_path) -> None:
    config = tmp_path / "keyless.toml"
    config.write_text('postgres = ["6432=pg.contoso.internal"]\n'
                      '[[route]]\nhost = "pg.contoso.internal"\nprotocol = "postgres"\n')
    assert _resolve(["--config", str(config)]).listeners[0].upstream == (
        "pg.contoso.internal", 5432)
    config.write_text('postgres = ["6432=pg.contoso.internal"]\n')
    with pytest.raises(ConfigError, match="not an Azure postgres host"):
        _resolve(["--config", str(config)])


def test_ports_must_not_collide_and_off_loopback_needs_an_allowlist() -> None:
    with pytest.raises(ConfigError, match="already used by --postgres"):
        _resolve(["--postgres", "6432=a.postgres.database.azure.com",
                  "--redis", "6432=c.redis.cache.windows.net"])
    with pytest.raises(ConfigError, match="already used by --listen"):
        _resolve(["--listen", "127.0.0.1:8080", "--mysql", "8080=m.mysql.database.azure.com"])
    with pytest.raises(ConfigError, match="off loopback without --allow-clients"):
        _resolve(["--postgres", "0.0.0.0:6432=a.postgres.database.azure.com"])
    allowed = _resolve(["--postgres", "0.0.0.0:6432=a.postgres.database.azure.com",
                        "--allow-clients", "10.0.0.0/8"])
    assert allowed.listeners[0].listen == ("0.0.0.0", 6432)


def test_an_amqps_reverse_target_becomes_an_amqp_listener() -> None:
    settings = _resolve(["--reverse", "5672=amqps://ns1.servicebus.windows.net",
                         "--reverse", "10000=https://acct.blob.core.windows.net"])
    assert settings.reverse == ((10000, "acct.blob.core.windows.net"),)
    assert settings.listeners == (ListenerSpec("amqp", ("127.0.0.1", 5672),
                                               ("ns1.servicebus.windows.net", 5671)),)
    assert settings.listeners[0].scope == "https://servicebus.azure.net/.default"
    for bad in ("5672=amqps://evil.example.com", "5672=amqps://ns1.servicebus.windows.net:443",
                "5672=amqp://ns1.servicebus.windows.net"):
        with pytest.raises(ConfigError):
            _resolve(["--reverse", bad])


def test_amqp_audiences_pick_service_bus_or_event_hubs(tmp_path) -> None:
    from proxy.listeners.connection import ClientTLS, Connection, Shared

    config = tmp_path / "keyless.toml"
    config.write_text('[[route]]\nhost = "hubs.servicebus.windows.net"\nservice = "eventhubs"\n')
    settings = _resolve(["--config", str(config),
                         "--reverse", "5672=amqps://bus.servicebus.windows.net"])
    shared = Shared(None, None, None, ClientTLS(tmp_path), catalog=settings.catalog())  # type: ignore[arg-type]
    conn = Connection(settings.listeners[0], "127.0.0.1:1", shared)
    bus, hubs = "servicebus", "eventhubs"
    assert conn.service_for("sb://bus.servicebus.windows.net/orders") == bus
    assert conn.service_for("amqp://bus.servicebus.windows.net/topic/Subscriptions/s") == bus
    assert conn.service_for("sb://hubs.servicebus.windows.net/telemetry") == hubs  # the route
    assert conn.service_for(
        "sb://bus.servicebus.windows.net/telemetry/ConsumerGroups/$Default/Partitions/0") == hubs
