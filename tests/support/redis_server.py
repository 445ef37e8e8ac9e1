"""A real Debian redis-server for the Redis listener tests: TLS only, ACL users per token.

Started on free loopback ports with its own directory under the test's tmp_path (never the
system service), `port 0` (no plain TCP), `tls-port` with a certificate for the Azure name
from the test CA, `tls-auth-clients no` (Azure does not ask clients for certificates), no
persistence, and the `default` user switched off: only the ACL users the test creates (one per
token object id, the token as its password, like Azure's data access policy assignments) can
log in.

`admin()` is a redis-py client logged in as the fixture's own admin user, over the same TLS
port, for the test to create and delete users (`add_token_user`, `delete_user`).
"""

from __future__ import annotations

import secrets
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Self

import redis

from tests.support.azurite import TestPKI, free_port
from tests.support.entra import ISSUER, KEY_ID, SYSTEM_ASSIGNED_CLIENT_ID, TENANT_ID, sign_rs256

INSTALL_HINT = "install Debian's redis-server (apt-get install redis-server) or set PATH"
ADMIN_USER = "keyless-test-admin"


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(f"redis-server not found: {INSTALL_HINT}")
    return found


class RedisServer:
    """One redis-server process with TLS for `host_name` (keylesscache.redis.cache.windows.net)."""

    def __init__(self, directory: Path, pki: TestPKI, host_name: str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.host_name = host_name
        self.port = 0
        self.admin_password = secrets.token_urlsafe(24)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.directory / "redis.log"
        self._admin: redis.Redis | None = None

    def config(self, cert: str, key: str) -> str:
        return "\n".join([
            "bind 127.0.0.1",
            "port 0",
            f"tls-port {self.port}",
            f"tls-cert-file {cert}",
            f"tls-key-file {key}",
            f"tls-ca-cert-file {self.pki.ca_pem_path}",
            "tls-auth-clients no",
            f"dir {self.directory}",
            'save ""',
            "appendonly no",
            "daemonize no",
            f"logfile {self.log_path}",
            "user default off",
            f"user {ADMIN_USER} on >{self.admin_password} ~* &* +@all",
            "",
        ])

    def start(self, timeout: float = 20.0) -> Self:
        binary = find_redis_server()
        cert, key = self.pki.issue_server_cert(self.host_name)
        self.port = free_port()
        conf = self.directory / "redis.conf"
        conf.write_text(self.config(cert, key))
        conf.chmod(0o600)
        self.process = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, cwd=self.directory)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n"
                                   f"{self.log()}")
            try:
                if self.admin().ping():
                    return self
            except (redis.ConnectionError, OSError):
                self._admin = None
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {timeout:g}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients -------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        return self.pki.client_ssl_context()

    def client(self, username: str | None, password: str | None, **kwargs: object) -> redis.Redis:
        """A direct redis-py client over verified TLS for the Azure name (what an app that
        talks to the cache itself would use)."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=self.pki.ca_pem_path,
            ssl_check_hostname=False, username=username, password=password,
            socket_timeout=10, **kwargs,  # type: ignore[arg-type]
        )

    def admin(self) -> redis.Redis:
        if self._admin is None:
            self._admin = self.client(ADMIN_USER, self.admin_password)
        return self._admin

    def add_token_user(self, object_id: str, *tokens: str) -> None:
        """An ACL user named by the object id with these tokens as passwords (Azure's data
        access policy assignment for that identity)."""
        self.admin().execute_command("ACL", "SETUSER", object_id, "on",
                                     *(f">{token}" for token in tokens), "~*", "&*", "+@all")

    def delete_user(self, object_id: str) -> int:
        """ACL DELUSER: redis-server also closes every connection authenticated as it."""
        return int(self.admin().execute_command("ACL", "DELUSER", object_id))

    def client_count(self) -> int:
        return len(self.admin().client_list())


def mint_token(object_id: str, lifetime: int, *, now: int | None = None,
               audience: str = "https://redis.azure.com") -> str:
    """An Entra-style access token for Redis whose `oid` claim is `object_id` (one per token
    generation in the re-auth tests: each generation logs in as its own ACL user, so deleting
    the previous user shows which connections re-authenticated)."""
    issued_at = int(time.time()) if now is None else now
    payload = {
        "aud": audience, "iss": ISSUER, "iat": issued_at, "nbf": issued_at - 300,
        "exp": issued_at + lifetime, "appid": SYSTEM_ASSIGNED_CLIENT_ID, "oid": object_id,
        "sub": object_id, "tid": TENANT_ID, "idtyp": "app", "ver": "1.0",
        "jti": secrets.token_hex(8),
    }
    return sign_rs256({"alg": "RS256", "typ": "JWT", "kid": KEY_ID}, payload)
