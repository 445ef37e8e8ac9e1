"""A legacy Java app (azure-storage-blob, account key) goes passwordless through keyless.

The app (tests/apps/java/storage, `LegacyStorageApp`) is the same code in every run; only its
environment changes: the proxy (environment variables or JVM system properties in
`JAVA_TOOL_OPTIONS`, which every JVM reads at start) and the truststore (a copy of the JDK's
`cacerts` plus keyless' CA, `-Djavax.net.ssl.trustStore`). No code change, no retry: the app
builds its clients with the SDK's defaults and tries each request once. Each test runs on
each of azure-core's HTTP client plug-ins (Netty, the default; OkHttp; the JDK HttpClient),
chosen by azure-core's own AZURE_HTTP_CLIENT_IMPLEMENTATION.

docs/languages/java.md states what these tests prove, line by line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import BLOB_HOST, DEAD_PROXY_ENV
from tests.support.azurite import ACCOUNT, WRONG_KEY, Azurite, free_port
from tests.support.jvm import MavenApp, java_home, java_truststore, maven_app
from tests.support.keyless import KeylessProcess

pytestmark = pytest.mark.e2e

MAIN = "keyless.LegacyStorageApp"
APP_TIMEOUT = 120
BLOB_SIZE = 8 * 1024 * 1024 + 17  # two 4 MiB blocks and 17 bytes: staged blocks + commit
# The bogus `sig` of the app's SAS URL (URL-encoded base64): never valid, never logged.
SAS_SIGNATURE = "a2V5bGVzcy1qYXZhLWJvZ3VzLXNpZ25hdHVyZQ%3D%3D"
LEGACY_BLOB = (
    f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
    f"BlobEndpoint=https://{BLOB_HOST}"
)
PROXY_PASSWORD = "corp-proxy-password-6c1f"
LEGACY = {"AZURE_STORAGE_CONNECTION_STRING": LEGACY_BLOB}
# What the app sends with its Shared Key: create container, 3 staged blocks + commit, get
# (downloadContent), list blocks, put sas.txt, list, 2 deletes, list, delete container.
SHARED_KEY_REQUESTS = 13
SAS_REQUESTS = 1  # the get through the SAS URL
_AZURITE_REQUEST = re.compile(
    r"RequestMethod=(?P<method>\S+) RequestURL=(?P<url>\S+) RequestHeaders:(?P<headers>\{.*\})"
    r" ClientIP=")
# azure-core's HTTP client plug-ins on the app's classpath: the provider class that
# AZURE_HTTP_CLIENT_IMPLEMENTATION names, and the client class the app then reports using.
# (With several on the classpath and none named, azure-core takes the first that
# ServiceLoader finds: classpath order, not Netty.)
CLIENTS = {
    "netty": ("com.azure.core.http.netty.NettyAsyncHttpClientProvider",
              "com.azure.core.http.netty.NettyAsyncHttpClient"),
    "okhttp": ("com.azure.core.http.okhttp.OkHttpAsyncClientProvider",
               "com.azure.core.http.okhttp.OkHttpAsyncHttpClient"),
    "jdk": ("com.azure.core.http.jdk.httpclient.JdkHttpClientProvider",
            "com.azure.core.http.jdk.httpclient.JdkHttpClient"),
}
# How each client reports a name it cannot resolve (only keyless knows the fake Azure names).
UNRESOLVED = {"java.net.UnknownHostException", "java.nio.channels.UnresolvedAddressException"}
# Anything that could route, trust or configure the JVM other than what each test passes.
SCRUBBED = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY", "JAVA_TOOL_OPTIONS",
            "JDK_JAVA_OPTIONS", "_JAVA_OPTIONS", "AZURE_STORAGE_CONNECTION_STRING",
            "AZURE_HTTP_CLIENT_IMPLEMENTATION", "AZURE_LOG_LEVEL", "BLOB_SIZE",
            "SAS_SIGNATURE")


@pytest.fixture(scope="module")
def storage_app() -> MavenApp:
    return maven_app("storage")


@pytest.fixture(params=sorted(CLIENTS))
def client(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def truststore(keyless, tmp_path_factory) -> Path:
    """The recipe: the JDK's public CAs plus keyless' CA."""
    return java_truststore(keyless.ca_path, tmp_path_factory.mktemp("java") / "keyless.p12")


def trusting(store: Path) -> list[str]:
    return [f"-Djavax.net.ssl.trustStore={store}", "-Djavax.net.ssl.trustStorePassword=changeit"]


def run_java(app: MavenApp, client: str, env: dict[str, str],
             jvm_options: list[str] | None = None,
             ) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """The app on HTTP client `client` with `env` and, in JAVA_TOOL_OPTIONS, `jvm_options`;
    its JSON result."""
    base = {k: v for k, v in os.environ.items() if k.upper() not in SCRUBBED}
    options = {"JAVA_TOOL_OPTIONS": " ".join(jvm_options)} if jvm_options else {}
    completed = subprocess.run(
        app.command(MAIN),
        env={**base, **app_env(client), **options, **env},
        capture_output=True, text=True, timeout=APP_TIMEOUT,
    )
    lines = completed.stdout.strip().splitlines()
    assert lines, f"no output (exit {completed.returncode}):\n{completed.stderr}"
    return json.loads(lines[-1]), completed


def app_env(client: str) -> dict[str, str]:
    return {"BLOB_SIZE": str(BLOB_SIZE), "SAS_SIGNATURE": SAS_SIGNATURE,
            "AZURE_HTTP_CLIENT_IMPLEMENTATION": CLIENTS[client][0]}


def counters(process: KeylessProcess) -> tuple[float, float, float]:
    return (
        process.metric("keyless_requests_total", outcome="converted", service="storage-blob"),
        process.metric("keyless_key_material_stripped_total",
                       scheme="SharedKey", service="storage-blob"),
        process.metric("keyless_key_material_stripped_total",
                       scheme="SAS", service="storage-blob"),
    )


def assert_round_trip(result: dict[str, Any], completed: subprocess.CompletedProcess[str],
                      client: str) -> None:
    assert completed.returncode == 0 and result["ok"], (result, completed.stderr[-3000:])
    assert result["httpClient"] == CLIENTS[client][1]
    assert result["size"] == BLOB_SIZE
    assert result["downloadedSha256"] == result["uploadedSha256"]
    assert result["blockCount"] == 3  # staged blocks and a commit, not one put
    assert result["sasRead"] == "read through a SAS URL"
    assert result["listed"] == ["payload.bin", "sas.txt"]
    assert result["afterDelete"] == []


def assert_converted(process: KeylessProcess, before: tuple[float, float, float]) -> None:
    """keyless converted every request of the app; neither its key nor the SAS left a trace."""
    deadline = time.monotonic() + 30  # the counters move after the answer; poll, generously
    while (now := counters(process))[0] - before[0] < SHARED_KEY_REQUESTS + SAS_REQUESTS \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    converted, shared_key, sas = (a - b for a, b in zip(now, before, strict=True))
    assert converted >= SHARED_KEY_REQUESTS + SAS_REQUESTS, (before, now)
    assert shared_key >= SHARED_KEY_REQUESTS, (before, now)
    assert sas >= SAS_REQUESTS, (before, now)
    log = process.log()
    assert WRONG_KEY not in log
    assert SAS_SIGNATURE not in log and "a2V5bGVzcy1qYXZh" not in log


def assert_azurite_saw_tokens(azurite: Azurite, container: str) -> None:
    """What reached the service for the app's container: tokens only, no key, no SAS."""
    seen = []
    for line in azurite.debug_log_text().splitlines():
        match = _AZURITE_REQUEST.search(line)
        if match and f"/{container}" in match["url"]:
            headers = {k.lower(): v for k, v in json.loads(match["headers"]).items()}
            seen.append((match["method"], match["url"],
                         headers.get("authorization", "").split(" ", 1)[0]))
    assert len(seen) >= SHARED_KEY_REQUESTS + SAS_REQUESTS, seen
    assert {scheme for _, _, scheme in seen} == {"Bearer"}, seen
    assert not [url for _, url, _ in seen if "sig=" in url], seen
    assert "a2V5bGVzcy1qYXZh" not in azurite.debug_log_text()


def assert_never_reached_keyless(result: dict[str, Any], completed, process: KeylessProcess,
                                 before: tuple[float, float, float]) -> None:
    """The app went around keyless: the fake name does not resolve outside keyless."""
    assert completed.returncode == 1 and not result["ok"], (result, completed.stderr[-3000:])
    assert result["step"] == "create" and result["status"] is None, result
    assert UNRESOLVED & set(result["causes"]), result
    assert counters(process) == before


# -- forward mode: what the SDK honours ----------------------------------------------------

def test_https_proxy_host_system_properties_route_the_app_through_keyless(
        storage_app, client, keyless, truststore, azurite):
    """The recommended way: one JAVA_TOOL_OPTIONS with -Dhttps.proxyHost/Port (azure-core
    reads them without java.net.useSystemProxies) and the truststore."""
    before = counters(keyless)

    result, completed = run_java(storage_app, client, LEGACY, [
        *trusting(truststore), "-Dhttps.proxyHost=127.0.0.1", f"-Dhttps.proxyPort={keyless.port}",
    ])

    assert_round_trip(result, completed, client)
    assert_converted(keyless, before)
    assert_azurite_saw_tokens(azurite, result["container"])


def test_http_proxy_host_system_properties_alone_route_https_too(
        storage_app, client, keyless, truststore, azurite):
    """azure-core falls back to http.proxyHost/Port for https URLs (the JDK's own
    HttpURLConnection would not)."""
    before = counters(keyless)

    result, completed = run_java(storage_app, client, LEGACY, [
        *trusting(truststore), "-Dhttp.proxyHost=127.0.0.1", f"-Dhttp.proxyPort={keyless.port}",
    ])

    assert_round_trip(result, completed, client)
    assert_converted(keyless, before)
    assert_azurite_saw_tokens(azurite, result["container"])


def test_https_proxy_environment_variable_alone_is_ignored(
        storage_app, client, keyless, truststore, azurite):
    """HTTPS_PROXY without -Djava.net.useSystemProxies=true: azure-core does not look at it,
    the app resolves the service's name itself (and fails here, where only keyless knows it)."""
    before = counters(keyless)

    result, completed = run_java(storage_app, client, {
        "AZURE_STORAGE_CONNECTION_STRING": LEGACY_BLOB, "HTTPS_PROXY": keyless.proxy_url,
    }, trusting(truststore))

    assert_never_reached_keyless(result, completed, keyless, before)


def test_https_proxy_environment_variable_with_use_system_proxies_routes_the_app(
        storage_app, client, keyless, truststore, azurite):
    before = counters(keyless)

    result, completed = run_java(storage_app, client, {
        "AZURE_STORAGE_CONNECTION_STRING": LEGACY_BLOB, "HTTPS_PROXY": keyless.proxy_url,
    }, [*trusting(truststore), "-Djava.net.useSystemProxies=true"])

    assert_round_trip(result, completed, client)
    assert_converted(keyless, before)
    assert_azurite_saw_tokens(azurite, result["container"])


def test_proxy_credentials_in_https_proxy(storage_app, client, keyless, truststore, azurite):
    """An app whose HTTPS_PROXY still names a corporate proxy's user and password. keyless asks
    for no proxy authentication and the password appears nowhere. Netty and OkHttp go through;
    the JDK HttpClient plug-in then sends its requests WITHOUT their Authorization header
    (the JDK's behaviour once a proxy Authenticator is set): keyless sees no key to convert,
    passes the request on, and the service refuses it as anonymous."""
    before = counters(keyless)
    proxy = keyless.proxy_url.replace("http://", f"http://corp-user:{PROXY_PASSWORD}@")

    result, completed = run_java(storage_app, client, {
        "AZURE_STORAGE_CONNECTION_STRING": LEGACY_BLOB, "HTTPS_PROXY": proxy,
    }, [*trusting(truststore), "-Djava.net.useSystemProxies=true"])

    if client == "jdk":
        assert completed.returncode == 1 and not result["ok"], (result, completed.stderr)
        assert (result["step"], result["status"], result["code"]) == (
            "create", 403, "AuthorizationFailure"), result
        assert counters(keyless) == before
    else:
        assert_round_trip(result, completed, client)
        assert_converted(keyless, before)
        assert_azurite_saw_tokens(azurite, result["container"])
    assert PROXY_PASSWORD not in keyless.log() + azurite.debug_log_text()


def test_no_proxy_naming_the_service_sends_the_app_around_keyless(
        storage_app, client, keyless, truststore, azurite):
    before = counters(keyless)

    result, completed = run_java(storage_app, client, {
        "AZURE_STORAGE_CONNECTION_STRING": LEGACY_BLOB, "HTTPS_PROXY": keyless.proxy_url,
        "NO_PROXY": "localhost,.blob.core.windows.net",
    }, [*trusting(truststore), "-Djava.net.useSystemProxies=true"])

    assert_never_reached_keyless(result, completed, keyless, before)


def test_no_proxy_of_other_names_keeps_the_app_on_keyless(
        storage_app, client, keyless, truststore, azurite):
    """NO_PROXY for the cluster's own names (the Kubernetes recipe's) leaves Azure on keyless."""
    before = counters(keyless)

    result, completed = run_java(storage_app, client, {
        "AZURE_STORAGE_CONNECTION_STRING": LEGACY_BLOB, "HTTPS_PROXY": keyless.proxy_url,
        "NO_PROXY": "localhost,127.0.0.1,.svc,.cluster.local",
    }, [*trusting(truststore), "-Djava.net.useSystemProxies=true"])

    assert_round_trip(result, completed, client)
    assert_converted(keyless, before)
    assert_azurite_saw_tokens(azurite, result["container"])


def test_http_non_proxy_hosts_naming_the_service_sends_the_app_around_keyless(
        storage_app, client, keyless, truststore, azurite):
    """http.nonProxyHosts applies to the https.proxy* properties too (there is no
    https.nonProxyHosts)."""
    before = counters(keyless)

    result, completed = run_java(storage_app, client, LEGACY, [
        *trusting(truststore), "-Dhttps.proxyHost=127.0.0.1", f"-Dhttps.proxyPort={keyless.port}",
        "-Dhttp.nonProxyHosts=localhost|*.blob.core.windows.net",
    ])

    assert_never_reached_keyless(result, completed, keyless, before)


def test_http_non_proxy_hosts_of_other_names_keeps_the_app_on_keyless(
        storage_app, client, keyless, truststore, azurite):
    before = counters(keyless)

    result, completed = run_java(storage_app, client, LEGACY, [
        *trusting(truststore), "-Dhttps.proxyHost=127.0.0.1", f"-Dhttps.proxyPort={keyless.port}",
        "-Dhttp.nonProxyHosts=localhost|127.0.0.1|*.svc|*.cluster.local",
    ])

    assert_round_trip(result, completed, client)
    assert_converted(keyless, before)
    assert_azurite_saw_tokens(azurite, result["container"])


def aliases(store: Path) -> set[str]:
    listed = subprocess.run(["keytool", "-list", "-keystore", str(store), "-storepass",
                             "changeit"], capture_output=True, text=True, timeout=60, check=True)
    return {line.split(",", 1)[0] for line in listed.stdout.splitlines()
            if "trustedCertEntry" in line}


def test_truststore_is_the_jdks_public_cas_plus_keyless_ca(truststore):
    cacerts = java_home() / "lib" / "security" / "cacerts"
    public = aliases(cacerts)

    assert len(public) > 50, "the JDK's cacerts is (nearly) empty: install ca-certificates-java"
    assert aliases(truststore) == public | {"keyless"}


# -- calibration: the app really verifies TLS, the key really is wrong ---------------------

def test_through_keyless_without_its_ca_the_app_fails_tls(
        storage_app, client, keyless):
    """The JDK's own cacerts (no keyless CA): the success above is the truststore's doing."""
    before = counters(keyless)

    result, completed = run_java(storage_app, client, LEGACY, [
        "-Dhttps.proxyHost=127.0.0.1", f"-Dhttps.proxyPort={keyless.port}",
    ])

    assert completed.returncode == 1 and not result["ok"], (result, completed.stderr[-3000:])
    assert result["step"] == "create" and result["status"] is None, result
    assert "javax.net.ssl.SSLHandshakeException" in result["causes"], result
    assert counters(keyless)[0] == before[0]


def test_same_java_app_straight_to_azurite_is_refused(
        storage_app, client, azurite, pki, tmp_path):
    store = java_truststore(pki.ca_pem_path, tmp_path / "azurite-ca.p12")

    result, completed = run_java(storage_app, client, {"AZURE_STORAGE_CONNECTION_STRING": (
        f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
        f"BlobEndpoint=https://127.0.0.1:{azurite.blob_port}/{ACCOUNT}")}, trusting(store))

    assert completed.returncode == 1 and not result["ok"], (result, completed.stderr[-3000:])
    assert result["step"] == "create", result
    # Azurite under --oauth basic answers a bad Shared Key with 400 InvalidAuthenticationInfo,
    # Azure with 403 AuthenticationFailed. Either way: refused.
    assert (result["status"], result["code"]) in {
        (400, "InvalidAuthenticationInfo"), (403, "AuthenticationFailed")
    }, result


# -- reverse mode: no proxy, no CA ----------------------------------------------------------

def test_reverse_mode_needs_no_proxy_and_no_truststore(
        storage_app, client, tmp_path, pki, azurite,
                                                        module_identity):
    port = free_port()
    process = KeylessProcess(tmp_path, [
        "--reverse", f"{port}=https://{BLOB_HOST}",
        "--connect-to", f"{BLOB_HOST}:443:127.0.0.1:{azurite.blob_port}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
    ], {**module_identity.env(), **DEAD_PROXY_ENV}).start()
    try:
        before = counters(process)

        result, completed = run_java(storage_app, client, {"AZURE_STORAGE_CONNECTION_STRING": (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
            f"BlobEndpoint=http://localhost:{port}")})

        assert_round_trip(result, completed, client)
        assert_converted(process, before)
        assert_azurite_saw_tokens(azurite, result["container"])
    finally:
        assert process.stop() == 0, process.log()[-2000:]

