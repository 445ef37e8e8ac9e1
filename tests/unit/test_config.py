"""Flags beat environment beat TOML file; bad input gets a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cli import build_parser
from proxy.config import FLAGS, ConfigError, flag_reference, resolve
from proxy.connect_to import ConnectTo

README = Path(__file__).resolve().parents[2] / "README.md"


def settings(argv: list[str], env: dict[str, str] | None = None):
    return resolve(build_parser().parse_args(["run", *argv]), env or {})


def test_defaults_are_safe():
    s = settings([])
    assert s.listen == ("127.0.0.1", 8080)
    assert s.admin[0] == "127.0.0.1" and s.admin[1] not in (8080, 80, 443, 9090)
    assert s.connect_to == () and s.set == ()
    assert s.confdir == Path("~/.keyless").expanduser()


def test_flag_beats_env_beats_file(tmp_path):
    config = tmp_path / "keyless.toml"
    config.write_text(
        'listen = "127.0.0.1:1111"\nadmin = "127.0.0.1:2222"\ntoken-timeout = 7\n'
        'connect-to = ["a.blob.core.windows.net:443:127.0.0.1:10000"]\n'
        '[set]\nssl_insecure = false\nconnection_strategy = "lazy"\n'
    )
    env = {"KEYLESS_ADMIN": "127.0.0.1:3333", "KEYLESS_LISTEN": "127.0.0.1:4444"}
    s = settings(["--config", str(config), "--listen", "127.0.0.1:5555"], env)
    assert s.listen == ("127.0.0.1", 5555)  # flag
    assert s.admin == ("127.0.0.1", 3333)  # env
    assert s.token_timeout == 7  # file
    assert s.connect_to == (ConnectTo("a.blob.core.windows.net", 443, "127.0.0.1", 10000),)
    assert s.set == (("ssl_insecure", "false"), ("connection_strategy", "lazy"))


def test_repeatable_env_values_split_on_commas(tmp_path):
    env = {"KEYLESS_CONNECT_TO": "a.b:443:127.0.0.1:1, c.d:443:127.0.0.1:2",
           "KEYLESS_CONFIG": str(tmp_path / "missing.toml")}
    with pytest.raises(ConfigError, match="cannot read config file"):
        settings([], env)
    del env["KEYLESS_CONFIG"]
    assert [r.to_port for r in settings([], env).connect_to] == [1, 2]
    # a flag replaces the env list as a whole
    s = settings(["--connect-to", "x.y:443:127.0.0.1:3"], env)
    assert [r.to_port for r in s.connect_to] == [3]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "8080"], "--listen: expected HOST:PORT"),
        (["--connect-to", "a:443:b"], "expected HOST:PORT:ADDR:PORT"),
        (["--connect-to", "a:99999:b:1"], "invalid port"),
        (["--set", "novalue"], "expected NAME=VALUE"),
        (["--token-timeout", "-1"], "seconds"),
        (["--log-level", "loud"], "expected debug"),
    ],
)
def test_bad_values_are_reported_clearly(argv, message):
    with pytest.raises(ConfigError, match=message):
        settings(argv)


def test_unknown_and_malformed_toml_are_reported(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('listne = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match=r"unknown key.*listne"):
        settings(["--config", str(bad)])
    bad.write_text("listen = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        settings(["--config", str(bad)])


def test_readme_documents_every_flag_from_the_code():
    text = README.read_text()
    assert flag_reference() in text, "README flag table is stale: paste flag_reference()"
    for flag in FLAGS:
        assert f"--{flag.name}" in text and flag.env in text
