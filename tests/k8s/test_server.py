"""The webhook process itself: certificate rotation without a restart, its config file, its
flags' environment variables, and a clear refusal of bad start-up input."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import time

import pytest
from cryptography import x509

from tests.k8s.support import FIXTURES, PODS_CONFIG_EXAMPLE, Webhook, apply, fixture_pods, review
from tests.support.keyless import keyless_command

RELOAD = 0.5


def served_serial(webhook: Webhook) -> int:
    """The serial number of the certificate a new TLS handshake gets."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", webhook.port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def serial_of(leaf) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


def test_a_rotated_certificate_is_served_without_a_restart(tmp_path):
    webhook = Webhook(tmp_path, reload_interval=RELOAD).start()
    try:
        first = serial_of_file(webhook)
        assert served_serial(webhook) == first
        pid = webhook.process.pid
        # a connection kept open across the rotation keeps working
        keep = http_keepalive(webhook)
        rotated = webhook.ca.issue_cert("127.0.0.1", "localhost")
        webhook.install(rotated)
        deadline = time.monotonic() + 10
        while served_serial(webhook) != serial_of(rotated):
            assert time.monotonic() < deadline, webhook.log()
            time.sleep(0.1)
        assert webhook.process.poll() is None and webhook.process.pid == pid
        assert "serving certificate reloaded" in webhook.log()
        # an admission on the new certificate, verified against the CA
        pod = fixture_pods()["deployment-nginx"]
        apply(pod, webhook.mutate(review(pod)))
        keep.request("GET", "/healthz")
        assert keep.getresponse().status == 200
        keep.close()
        # a broken pair (mid-rotation) keeps the current one, and says so
        webhook.key_path.write_text("not a key")
        time.sleep(RELOAD * 2)
        assert served_serial(webhook) == serial_of(rotated)
        assert "not reloaded, keeping the current one" in webhook.log()
    finally:
        webhook.stop()


def serial_of_file(webhook: Webhook) -> int:
    return x509.load_pem_x509_certificate(webhook.cert_path.read_bytes()).serial_number


def http_keepalive(webhook: Webhook):
    import http.client

    connection = http.client.HTTPSConnection("127.0.0.1", webhook.port, timeout=5,
                                             context=webhook.context())
    connection.request("GET", "/readyz")
    response = connection.getresponse()
    assert response.status == 200
    response.read()
    return connection


def test_the_config_file_sets_the_injection_defaults(tmp_path):
    webhook = Webhook(tmp_path, config=PODS_CONFIG_EXAMPLE).start()
    try:
        pods = fixture_pods()
        pod = pods["deployment-nginx"]
        patched = apply(pod, webhook.mutate(review(pod)))
        keyless = next(c for c in patched["spec"]["initContainers"] if c["name"] == "keyless")
        assert keyless["image"] == "registry.example.com/keyless:9.9.9"
        assert keyless["imagePullPolicy"] == "Always"
        assert keyless["resources"] == {"requests": {"cpu": "20m", "memory": "96Mi"},
                                        "limits": {"memory": "192Mi"}}
        env = {e["name"]: e["value"] for e in keyless["env"]}
        assert env["KEYLESS_READY_SCOPES"] == "https://storage.azure.com/.default"
        assert env["KEYLESS_LISTEN"] == "127.0.0.1:8181"
        app = {e["name"]: e["value"] for e in patched["spec"]["containers"][0]["env"]}
        assert app["HTTPS_PROXY"] == "http://127.0.0.1:8181"
        assert app["NO_PROXY"].endswith(",10.0.0.0/8")
        # excludeNamespaces from the file, on top of the ones always excluded
        other = review(pod, namespace="legacy")
        assert "patch" not in webhook.mutate(other)["response"]
    finally:
        webhook.stop()


def run_webhook(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*keyless_command(), "webhook", *args], capture_output=True,
                          text=True, timeout=30, env=env)


@pytest.mark.parametrize("args, message", [
    (["--tls-cert", "/nonexistent/tls.crt", "--tls-key", "/nonexistent/tls.key"],
     "cannot read the serving certificate"),
    (["--config", "/nonexistent/config.yaml"], "no such file"),
    (["--listen", "nowhere"], "expected HOST:PORT"),
])
def test_bad_start_up_input_exits_2_with_the_reason(tmp_path, args, message):
    result = run_webhook(*args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_flags_have_keyless_webhook_environment_variables(tmp_path):
    import os

    webhook = Webhook(tmp_path)  # writes a valid pair; only the environment points at it
    env = {**os.environ, "KEYLESS_WEBHOOK_TLS_CERT": str(webhook.cert_path),
           "KEYLESS_WEBHOOK_TLS_KEY": "/nonexistent/by-env.key"}
    result = run_webhook(env=env)
    assert result.returncode == 2 and "by-env.key" in result.stderr, result.stderr
    (tmp_path / "bad.yaml").write_text("mode: sidecar\n")
    env["KEYLESS_WEBHOOK_CONFIG"] = str(tmp_path / "bad.yaml")
    result = run_webhook(env=env)
    assert result.returncode == 2 and "mode must be" in result.stderr, result.stderr


def test_sigterm_fails_readiness_keeps_answering_then_exits_0(tmp_path):
    webhook = Webhook(tmp_path, shutdown_delay=1.5).start()
    try:
        assert webhook.request("GET", "/readyz")[0] == 200
        started = time.monotonic()
        webhook.process.send_signal(signal.SIGTERM)
        deadline = started + 5
        while webhook.request("GET", "/readyz")[0] != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # still answering reviews the API server already routed here
        pod = fixture_pods()["deployment-nginx"]
        apply(pod, webhook.mutate(review(pod)))
        assert webhook.process.wait(timeout=10) == 0
        assert time.monotonic() - started >= 1.5
        assert "draining" in webhook.log()
    finally:
        webhook.stop()


def test_the_charts_rendered_config_is_accepted_and_used(tmp_path):
    config = (FIXTURES / "webhook-config" / "chart-default.yaml").read_text()
    webhook = Webhook(tmp_path, config=config).start()
    try:
        pod = fixture_pods()["deployment-nginx"]
        patched = apply(pod, webhook.mutate(review(pod)))
        keyless = next(c for c in patched["spec"]["initContainers"] if c["name"] == "keyless")
        assert keyless["image"] == "keyless:0.1.0"
        assert keyless["resources"]["requests"] == {"cpu": "50m", "memory": "128Mi"}
    finally:
        webhook.stop()
