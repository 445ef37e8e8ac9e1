"""deploy/compose: its structure (no Docker here), and a rehearsal of it with real processes.

The rehearsal runs what compose would, on loopback: make_certs.py, Azurite with the compose
service's arguments, the fake identity endpoint with its arguments, keyless with the compose
environment, and the sample app through its start.sh with its environment. Only addresses
change (compose's service names and fixed ports become 127.0.0.1 and free ports, volumes
become directories).

What it cannot show, with no Docker engine on these machines: that the images build and that
compose's own networking and volumes behave as assumed. The Dockerfile's side is covered by
test_image_equivalent.py (stage 2 reproduced) and hadolint (test_manifests.py).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.azurite import ACCOUNT_KEY, AzuriteError, find_azurite
from tests.support.keyless import keyless_command

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
SERVICES = {"certs", "azurite", "keyless-init", "keyless", "identity", "app"}


def load() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


# -- structure --------------------------------------------------------------------------------


def test_services_and_what_they_reference_exist() -> None:
    compose = load()
    services = compose["services"]
    assert set(services) == SERVICES
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            build = service["build"]
            context = COMPOSE_DIR / (build if isinstance(build, str) else build["context"])
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get(
                "dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file(), f"{name}: no {context / dockerfile}"
        if "image" in service and "build" not in service:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name}: bind source {source} missing"
            else:
                assert source in declared_volumes, f"{name}: volume {source} not declared"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"


def test_app_and_identity_share_keyless_network_and_wiring_agrees() -> None:
    services = load()["services"]
    keyless, identity, app = services["keyless"], services["identity"], services["app"]
    # a pod's loopback: keyless' proxy stays on 127.0.0.1, the identity endpoint too
    assert app["network_mode"] == identity["network_mode"] == "service:keyless"
    assert app["depends_on"]["keyless"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(keyless["healthcheck"]["test"])
    kenv, aenv = env_of(keyless), env_of(app)
    assert "KEYLESS_LISTEN" not in kenv, "the image's loopback listen address must stay"
    port = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/msi/token", kenv["IDENTITY_ENDPOINT"])
    assert port, kenv["IDENTITY_ENDPOINT"]
    command = identity["command"]
    assert command[command.index("--port") + 1] == port.group(1)
    assert command[command.index("--secret") + 1] == kenv["IDENTITY_HEADER"]
    assert aenv["HTTPS_PROXY"] == "http://127.0.0.1:8080"
    # the app's key is wrong (but well-formed), so only keyless can make its calls succeed
    key = re.search(r"AccountKey=([^;]+)", aenv["AZURE_STORAGE_CONNECTION_STRING"]).group(1)
    assert key != ACCOUNT_KEY and len(base64.b64decode(key)) == 64
    # keyless dials Azurite for the Azure name and trusts the test CA made by `certs`
    host, _, addr, _ = kenv["KEYLESS_CONNECT_TO"].split(":")
    assert host == "devstoreaccount1.blob.core.windows.net" and addr == "azurite"
    assert "--oauth=basic" in services["azurite"]["command"]
    # the app reads only the public CA certificate; the confdir is keyless' alone
    assert all("keyless-confdir" not in v for v in app.get("volumes", []))
    assert any(v.startswith("keyless-ca:") and v.endswith(":ro") for v in app["volumes"])


# -- rehearsal --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, process: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{what} exited with {process.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{what} did not listen on {port} within {timeout}s")


def admin_get(port: int, path: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


def test_make_certs_gives_a_certificate_keyless_can_verify(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(COMPOSE_DIR / "certs" / "make_certs.py"),
                    str(tmp_path)], check=True, timeout=60, capture_output=True)
    assert (tmp_path / "azurite-key.pem").stat().st_mode & 0o777 == 0o600
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "azurite.pem", tmp_path / "azurite-key.pem")
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, client.wrap_socket(
                raw, server_hostname="devstoreaccount1.blob.core.windows.net") as tls:
            tls.sendall(b"x")
        thread.join(timeout=5)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for process in reversed(started):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@pytest.mark.e2e
def test_compose_rehearsal_wrong_key_app_succeeds_through_keyless(
        tmp_path: Path, processes: list[subprocess.Popen]) -> None:
    try:
        azurite_bin = find_azurite()
    except AzuriteError as exc:
        pytest.fail(f"Azurite (npm) is missing, run `npm ci` in the repository root: {exc}")
    if shutil.which("sh") is None:
        pytest.fail("no sh for the app's start.sh: `apt-get install -y dash`")
    services = load()["services"]
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("KEYLESS_", "AZURE_", "IDENTITY_", "MSI_"))
                and k.lower() not in ("https_proxy", "http_proxy", "no_proxy", "all_proxy")}
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(logs / f"{name}.log", "wb") as log:
            process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        processes.append(process)
        return process

    def log(name: str) -> str:
        return (logs / f"{name}.log").read_text(errors="replace")

    # certs
    certs = tmp_path / "certs"
    subprocess.run([sys.executable, str(COMPOSE_DIR / "certs" / "make_certs.py"), str(certs)],
                   check=True, timeout=60, capture_output=True)

    # azurite: the compose command, with loopback, a free port and local paths
    azurite_port = free_port()
    replace = {"--blobHost": "127.0.0.1", "--blobPort": str(azurite_port),
               "--location": str(tmp_path / "azurite"), "--cert": str(certs / "azurite.pem"),
               "--key": str(certs / "azurite-key.pem")}
    command = services["azurite"]["command"]
    assert command[0] == "azurite-blob"
    args = []
    for arg in command[1:]:
        name, eq, _ = arg.partition("=")
        args.append(f"{name}={replace[name]}" if eq and name in replace else arg)
    blob_bin = str(Path(azurite_bin).with_name("azurite-blob"))
    azurite = start("azurite", [blob_bin, *args], base_env)
    wait_port(azurite_port, azurite, "azurite")

    # identity: the compose command with a free port
    kenv = env_of(services["keyless"])
    identity_port = free_port()
    identity_cmd = services["identity"]["command"]
    identity_cmd = [sys.executable, str(REPO / "tests" / "support" / "identity_endpoint.py"),
                    *identity_cmd[2:]]
    identity_cmd[identity_cmd.index("--port") + 1] = str(identity_port)
    identity = start("identity", identity_cmd, base_env)
    wait_port(identity_port, identity, "identity endpoint")

    # keyless-init: its compose command, volumes as directories
    confdir, ca_dir = tmp_path / "confdir", tmp_path / "keyless-ca"
    init_cmd = [str(confdir) if a == "/var/run/keyless" else a.replace(
        "/var/run/keyless-ca/", f"{ca_dir}/") for a in services["keyless-init"]["command"]]
    init = subprocess.run([*keyless_command(), *init_cmd], env=base_env, capture_output=True,
                          text=True, timeout=60)
    assert init.returncode == 0, init.stdout + init.stderr
    app_ca = ca_dir / Path(init_cmd[init_cmd.index("--ca-out") + 1]).name
    assert app_ca.is_file() and app_ca.stat().st_mode & 0o777 == 0o644

    # keyless: the compose environment; addresses moved to loopback, paths to tmp
    admin_port, proxy_port = free_port(), free_port()
    env = {**base_env, **kenv}
    env.update({
        "KEYLESS_CONNECT_TO": re.sub(r":azurite:\d+$", f":127.0.0.1:{azurite_port}",
                                     kenv["KEYLESS_CONNECT_TO"]),
        "KEYLESS_SET": kenv["KEYLESS_SET"].replace("/certs/", f"{certs}/"),
        "IDENTITY_ENDPOINT": kenv["IDENTITY_ENDPOINT"].replace(":40342/", f":{identity_port}/"),
        "KEYLESS_ADMIN": f"127.0.0.1:{admin_port}",
        "KEYLESS_LISTEN": f"127.0.0.1:{proxy_port}",
        "KEYLESS_CONFDIR": str(confdir),
    })
    keyless = start("keyless", [*keyless_command(), "run"], env)
    deadline = time.monotonic() + 60
    while admin_get(admin_port, "/readyz")[0] != 200:
        assert keyless.poll() is None, log("keyless")
        assert time.monotonic() < deadline, "keyless not ready:\n" + log("keyless")
        time.sleep(0.2)

    # the app: its start.sh and environment, with the proxy port and paths moved
    aenv = env_of(services["app"])
    app_env = {**base_env, **aenv}
    app_env.update({
        "PATH": f"{Path(sys.executable).parent}:{base_env.get('PATH', '/usr/bin:/bin')}",
        "HTTPS_PROXY": aenv["HTTPS_PROXY"].replace(":8080", f":{proxy_port}"),
        "KEYLESS_CA": aenv["KEYLESS_CA"].replace("/var/run/keyless-ca/", f"{ca_dir}/"),
        "REQUESTS_CA_BUNDLE": str(tmp_path / "ca-bundle.pem"),
    })
    result = subprocess.run(["sh", str(COMPOSE_DIR / "app" / "start.sh")], env=app_env,
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr + "\n--- keyless:\n"
                                    + log("keyless"))
    assert result.stdout.startswith("OK: wrote and read"), result.stdout
    _, metrics = admin_get(admin_port, "/metrics")
    converted = re.search(
        r'keyless_requests_total\{[^}]*outcome="converted"[^}]*service="storage-blob"[^}]*\}'
        r' ([0-9.e+]+)|keyless_requests_total\{[^}]*service="storage-blob"[^}]*'
        r'outcome="converted"[^}]*\} ([0-9.e+]+)', metrics)
    assert converted and float(converted.group(1) or converted.group(2)) >= 3, metrics
