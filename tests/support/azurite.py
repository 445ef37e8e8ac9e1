"""Run Azurite over HTTPS with OAuth enabled, trusting a throwaway test CA.

Azurite only accepts bearer tokens over HTTPS (`--oauth basic` rejects plain
HTTP), so every instance gets a server certificate from `TestPKI`. Clients
must trust `TestPKI.ca_pem_path`.

Production-style URLs stay enabled: a request with
`Host: devstoreaccount1.blob.core.windows.net` is routed by Azurite to the
account named by the host, exactly like real Azure. Requests to an IP host
(`https://127.0.0.1:PORT/devstoreaccount1/...`) take the account from the
first path segment instead.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import IO, Self

import trustme

__all__ = [
    "ACCOUNT",
    "ACCOUNT_KEY",
    "SERVER_HOSTNAMES",
    "WRONG_KEY",
    "Azurite",
    "AzuriteError",
    "TestPKI",
    "find_azurite",
]

# The public, documented Azurite development account.
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
# Well-formed (64 bytes, base64) but not the account key: signs fine, auth fails.
WRONG_KEY = base64.b64encode(bytes([0x01]) * 64).decode("ascii")

# Names Azurite's certificate covers, besides 127.0.0.1 and localhost.
SERVER_HOSTNAMES: tuple[str, ...] = (
    "*.blob.core.windows.net",
    "*.queue.core.windows.net",
    "*.table.core.windows.net",
    f"{ACCOUNT}.blob.core.windows.net",
    f"{ACCOUNT}.queue.core.windows.net",
    f"{ACCOUNT}.table.core.windows.net",
)

_REPO_ROOT = Path(__file__).resolve().parents[2]
_STARTUP_TIMEOUT = 30.0
_STOP_TIMEOUT = 5.0


class AzuriteError(RuntimeError):
    pass


class TestPKI:
    """A throwaway CA (trustme) that writes PEM files into `directory`."""

    # Keep pytest from trying to collect this as a test class.
    __test__ = False

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self._issued = 0
        self._ca_pem_path: str | None = None

    @property
    def ca_pem_path(self) -> str:
        """Path of the CA certificate PEM.

        A str, not a Path: requests (used by azure-core's sync transport)
        silently ignores a non-str `verify` value and falls back to the
        system CA bundle.
        """
        if self._ca_pem_path is None:
            path = self.directory / "ca.pem"
            self.ca.cert_pem.write_to_path(str(path))
            self._ca_pem_path = str(path)
        return self._ca_pem_path

    def issue_server_cert(self, *hostnames: str) -> tuple[str, str]:
        """Issue a leaf cert for 127.0.0.1, localhost and `hostnames`.

        Returns (cert_pem_path, key_pem_path); the cert file holds the leaf
        followed by any intermediates, ready for a server's cert option.
        """
        names = list(dict.fromkeys(("127.0.0.1", "localhost", *hostnames)))
        leaf = self.ca.issue_cert(*names)
        self._issued += 1
        cert_path = self.directory / f"server-{self._issued}.pem"
        key_path = self.directory / f"server-{self._issued}.key"
        cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key_path.write_bytes(leaf.private_key_pem.bytes())
        return str(cert_path), str(key_path)

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


def find_azurite(azurite_bin: str | None = None) -> str:
    """Locate the azurite executable: argument, $KEYLESS_AZURITE, node_modules."""
    candidates: list[tuple[str, str]] = []
    if azurite_bin:
        candidates.append(("azurite_bin argument", azurite_bin))
    if env_bin := os.environ.get("KEYLESS_AZURITE"):
        candidates.append(("KEYLESS_AZURITE", env_bin))
    candidates.append(("repo node_modules", str(_REPO_ROOT / "node_modules" / ".bin" / "azurite")))
    for source, candidate in candidates:
        resolved = shutil.which(candidate)
        if resolved:
            return resolved
        if source != "repo node_modules":
            # An explicit choice that doesn't exist is a configuration error,
            # not a reason to quietly use some other Azurite.
            raise AzuriteError(f"azurite from {source} not found or not executable: {candidate}")
    raise AzuriteError(
        f"azurite not found at {candidates[-1][1]}; run `npm install` in {_REPO_ROOT} "
        "(or set KEYLESS_AZURITE to an azurite executable)"
    )


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    # Racy by nature (the port is released before Azurite binds it), but the
    # kernel hands out ephemeral ports round-robin so reuse is unlikely. Within this process
    # a port is never handed out twice: two calls in a row once returned the same port (one
    # keyless' --listen and --admin, which then failed to start).
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port not handed out before in 100 tries")


class Azurite:
    """An Azurite process (blob, queue, table) on 127.0.0.1 with HTTPS + OAuth.

    Quirk of `--oauth basic`: Azurite tries SharedKey, then SAS, then Bearer,
    and the Bearer step rejects any non-Bearer Authorization header. So a
    SharedKey request with a wrong signature gets 400 InvalidAuthenticationInfo
    rather than real Azure's 403 AuthenticationFailed. Pass `oauth=False` for
    an instance that answers wrong keys with 403 AuthorizationFailure (but
    then refuses Bearer tokens).
    """

    def __init__(
        self,
        workdir: Path | str,
        pki: TestPKI,
        azurite_bin: str | None = None,
        *,
        oauth: bool = True,
        host: str = "127.0.0.1",
        blob_port: int = 0,
    ) -> None:
        """`host` and `blob_port` (0: any free port) are where Azurite listens: e.g. an
        address inside a network namespace and 443, with `start()` run inside it
        (tests/support/netns.py `Netns.call`). The certificate then covers `host` too."""
        self.workdir = Path(workdir)
        self.oauth = oauth
        self.host = host
        self._requested_blob_port = blob_port
        self.pki = pki
        self.azurite_bin = find_azurite(azurite_bin)
        self.blob_port = 0
        self.queue_port = 0
        self.table_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.command: list[str] = []
        self.log_path = self.workdir / "azurite.log"
        self.debug_log_path = self.workdir / "debug.log"
        self._log_file: IO[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout: float = _STARTUP_TIMEOUT) -> Self:
        if self.process is not None:
            raise AzuriteError("Azurite already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        data_dir = self.workdir / "data"
        data_dir.mkdir(exist_ok=True)
        cert, key = self.pki.issue_server_cert(*SERVER_HOSTNAMES, self.host)
        ports = _distinct_free_ports(3, self.host, exclude={self._requested_blob_port})
        self.blob_port, self.queue_port, self.table_port = ports
        if self._requested_blob_port:
            self.blob_port = self._requested_blob_port
        self.command = [
            self.azurite_bin,
            "--blobHost", self.host,
            "--blobPort", str(self.blob_port),
            "--queueHost", self.host,
            "--queuePort", str(self.queue_port),
            "--tableHost", self.host,
            "--tablePort", str(self.table_port),
            "--location", str(data_dir),
            "--debug", str(self.debug_log_path),
            *(["--oauth", "basic"] if self.oauth else []),
            "--cert", cert,
            "--key", key,
            "--skipApiVersionCheck",
            # Azurite phones home by default; tests must stay on loopback.
            "--disableTelemetry",
        ]  # fmt: skip
        env = dict(os.environ)
        # A stray AZURITE_ACCOUNTS would replace the well-known dev account.
        env.pop("AZURITE_ACCOUNTS", None)
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=env,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        ctx = self.pki.client_ssl_context()
        pending = {self.blob_port, self.queue_port, self.table_port}
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while pending:
            if (rc := self.process.poll()) is not None:
                raise AzuriteError(
                    f"Azurite exited with code {rc} during startup:\n{self._log_tail()}"
                )
            for port in sorted(pending):
                if _tls_handshake_ok(ctx, self.host, port):
                    pending.discard(port)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise AzuriteError(
                    f"Azurite not accepting TLS on ports {sorted(pending)} after {timeout:.0f}s:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- convenience ---------------------------------------------------------

    @property
    def blob_url(self) -> str:
        """Path-style account URL (account in the path, host is the IP)."""
        return f"https://{self.host}:{self.blob_port}/{ACCOUNT}"

    @property
    def queue_url(self) -> str:
        return f"https://{self.host}:{self.queue_port}/{ACCOUNT}"

    @property
    def table_url(self) -> str:
        return f"https://{self.host}:{self.table_port}/{ACCOUNT}"

    def connection_string(self, key: str = ACCOUNT_KEY) -> str:
        """Shared-key connection string pointing at this instance."""
        return (
            f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={self.blob_url};QueueEndpoint={self.queue_url};"
            f"TableEndpoint={self.table_url};"
        )

    def log_text(self) -> str:
        """Azurite's stdout/stderr (the access log) so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def debug_log_text(self) -> str:
        """Azurite's --debug log: per-request detail, incl. auth failure reasons."""
        try:
            return self.debug_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "<empty log>"


def _distinct_free_ports(count: int, host: str = "127.0.0.1",
                         exclude: set[int] | None = None) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in ports and port not in (exclude or set()):
            ports.append(port)
    return ports


def _tls_handshake_ok(ctx: ssl.SSLContext, host: str, port: int) -> bool:
    try:
        with (
            socket.create_connection((host, port), timeout=1.0) as raw,
            ctx.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except OSError:  # includes ssl.SSLError
        return False
