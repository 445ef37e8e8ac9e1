"""The injected init steps run for real: `keyless init` writes the CA, the bundle and a Java
truststore Java reads; `keyless iptables --apply` installs the recipe in a network namespace
(the way the injected NET_ADMIN step does), idempotently, and the redirect works."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import threading
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from tests.k8s.support import fixture_pods, injected_command
from tests.support.jvm import _tool
from tests.support.keyless import keyless_command
from tests.support.netns import namespaces, require_netns

SYSTEM_CAS = ssl.get_default_verify_paths().cafile


def run_init(tmp_path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = injected_command(fixture_pods()["deployment-nginx"], "keyless-init",
                               {"/var/run/keyless-ca": str(tmp_path / "ca")})
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYLESS_")}
    env["KEYLESS_CONFDIR"] = str(tmp_path / "confdir")
    return subprocess.run([*keyless_command(), *command[1:], *extra], capture_output=True,
                          text=True, timeout=60, env=env)


def test_keyless_init_writes_the_public_ca_bundle_and_truststore(tmp_path):
    done = run_init(tmp_path)
    assert done.returncode == 0, done.stderr
    ca_dir = tmp_path / "ca"
    ca = x509.load_pem_x509_certificate((ca_dir / "keyless-ca.pem").read_bytes())
    with warnings.catch_warnings():  # a Debian root with a negative serial: allowed here
        warnings.simplefilter("ignore")
        system = x509.load_pem_x509_certificates(Path(SYSTEM_CAS).read_bytes())
        bundle = x509.load_pem_x509_certificates((ca_dir / "ca-bundle.pem").read_bytes())
        store = pkcs12.load_pkcs12((ca_dir / "truststore.p12").read_bytes(), b"changeit")
    assert bundle == [*system, ca]
    assert store.key is None  # public certificates only
    assert {c.certificate for c in store.additional_certs} == {*system, ca}
    for name in ("keyless-ca.pem", "ca-bundle.pem", "truststore.p12"):
        mode = stat.S_IMODE((ca_dir / name).stat().st_mode)
        assert mode == 0o644, (name, oct(mode))  # the app runs as another UID
    # no private key in the shared directory, whatever its name
    for path in ca_dir.iterdir():
        assert b"PRIVATE KEY" not in path.read_bytes(), path
    # Java reads it as trusted certificate entries
    listed = subprocess.run([_tool("keytool"), "-list", "-keystore", str(ca_dir / "truststore.p12"),
                             "-storetype", "PKCS12", "-storepass", "changeit"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert listed.stdout.count("trustedCertEntry") == len(system) + 1
    assert "keyless-0" in listed.stdout


def test_keyless_init_refuses_an_unreadable_system_bundle(tmp_path):
    done = run_init(tmp_path, "--system-cas", str(tmp_path / "missing.pem"))
    assert done.returncode == 2 and "cannot read the system CAs" in done.stderr, done.stderr
    (tmp_path / "junk.pem").write_text("not a certificate")
    done = run_init(tmp_path, "--system-cas", str(tmp_path / "junk.pem"))
    assert done.returncode == 2 and "not a PEM certificate list" in done.stderr, done.stderr


def test_keyless_iptables_apply_installs_the_printed_recipe_idempotently(tmp_path):
    require_netns()
    pod = fixture_pods()["transparent"]
    command = injected_command(pod, "keyless-iptables", {})
    assert command[:3] == ["keyless", "iptables", "--apply"]
    printed = subprocess.run([*keyless_command(), *[a for a in command[1:] if a != "--apply"]],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    with namespaces("applied", "printed") as ns:
        for _ in range(2):  # a restarted init step replaces its chain, never doubles it
            done = ns["applied"].exec(*keyless_command(), *command[1:], check=False)
            assert done.returncode == 0, done.stderr
        ns["printed"].run_recipe(printed, tmp_path)
        for tool in ("iptables", "ip6tables"):
            assert ns["applied"].nat_rules(tool) == ns["printed"].nat_rules(tool)
            assert ns["applied"].nat_rules(tool).count("-j KEYLESS_OUTPUT") == 1
        assert "--uid-owner 10001 -j RETURN" in ns["applied"].nat_rules()
        route_to_nowhere(ns["applied"])
        assert redirected(ns["applied"], uid=10002), "the app's HTTPS must reach keyless"
        # calibration: keyless' own UID goes out as it is (and finds nobody there)
        assert not redirected(ns["applied"], uid=10001)


def route_to_nowhere(ns) -> None:
    """A route to 10.9.0.0/24 where nobody answers: only the redirect completes a connection."""
    ns.exec("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    ns.exec("ip", "addr", "add", "10.9.0.1/24", "dev", "v0")
    ns.exec("ip", "link", "set", "v0", "up")
    ns.exec("ip", "link", "set", "v1", "up")


def redirected(ns, uid: int) -> bool:
    """Whether a connection from `uid` to 10.9.0.2:443 arrives at keyless' 127.0.0.1:8080."""
    server = ns.call(lambda: socket.create_server(("127.0.0.1", 8080)))
    server.settimeout(10)
    arrived: list[bool] = []

    def accept() -> None:
        try:
            conn, _ = server.accept()
            arrived.append(conn.recv(5) == b"hello")
            conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    client = ("import socket; s = socket.create_connection(('10.9.0.2', 443), timeout=3); "
              "s.sendall(b'hello'); s.close()")
    done = ns.exec("python3", "-c", client, uid=uid, check=False)
    server.close()
    thread.join(10)
    assert (done.returncode == 0) == (arrived == [True]), done.stderr
    return arrived == [True]
