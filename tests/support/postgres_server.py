"""A real PostgreSQL server (Debian's postgresql package) for the tests, on a loopback port.

It plays Azure Database for PostgreSQL as far as a login goes: TLS with a certificate for the
Azure host name (from the test CA), `hostssl ... password` for TCP logins, so the server asks
for a cleartext password over TLS exactly like an Entra role does, and plain TCP refused. A
test sets a role's password to the token the fake identity will hand keyless: a login that
works proves keyless answered with the token. The superuser `postgres` logs in over the Unix
socket (trust) for setup and inspection.

Started with its own data directory and stopped by the test; never the system service.
When the tests run as root (CI containers), the server runs as the `postgres` system user,
which the package creates (initdb and postgres refuse to run as root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

import psycopg
from psycopg import sql

from tests.support.azurite import TestPKI, free_port

AZURE_HOST = "keylesspg.postgres.database.azure.com"
PG_BIN_DIRS = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin",
               "/usr/lib/postgresql/15/bin")
INSTALL_HINT = "install PostgreSQL: `apt-get install -y postgresql` (Debian's server package)"
STARTUP_TIMEOUT = 30.0


class PostgresServerError(RuntimeError):
    pass


def find_pg_bin() -> Path:
    """The directory of initdb/postgres: $KEYLESS_PG_BIN, else Debian's versioned paths."""
    explicit = os.environ.get("KEYLESS_PG_BIN")
    candidates = [explicit] if explicit else list(PG_BIN_DIRS)
    for candidate in candidates:
        if (Path(candidate) / "postgres").exists() and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise PostgresServerError(f"no PostgreSQL server binaries in {', '.join(candidates)}: "
                              f"{INSTALL_HINT} (or set KEYLESS_PG_BIN)")


class PostgresServer:
    """`with PostgresServer(pki) as server:`; `server.port` is its TCP port on 127.0.0.1."""

    def __init__(self, pki: TestPKI, *, host_name: str = AZURE_HOST,
                 settings: dict[str, str] | None = None) -> None:
        self.pki = pki
        self.host_name = host_name
        self.bin = find_pg_bin()
        self.port = free_port()
        self.settings = settings or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.directory: Path | None = None
        self._run_as = _server_user()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        # Not under pytest's tmp_path: its directories are private to the tests' user, and
        # the server runs as `postgres` when the tests run as root.
        self.directory = Path(tempfile.mkdtemp(prefix="keyless-pg-"))
        try:
            self._init()
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def _init(self) -> None:
        assert self.directory is not None
        data = self.data_dir
        self._own(self.directory)
        self._run([str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                   "--auth-local=trust", "--auth-host=reject", "--no-sync", "--no-instructions"])
        cert, key = self.pki.issue_server_cert(self.host_name)
        shutil.copyfile(cert, data / "server.crt")
        shutil.copyfile(key, data / "server.key")
        (data / "server.key").chmod(0o600)
        (data / "pg_hba.conf").write_text(
            "local all all trust\n"
            # TCP: TLS and a cleartext password (what an Azure Entra role sees), never plain
            "hostssl all all 127.0.0.1/32 password\n"
            "hostssl all all ::1/128 password\n"
            "host all all 127.0.0.1/32 reject\n"
            "host all all ::1/128 reject\n")
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.directory}'",
            "ssl": "on",
            "ssl_cert_file": "'server.crt'",
            "ssl_key_file": "'server.key'",
            "log_connections": "on",
            "log_disconnections": "off",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] '",
            "max_connections": "100",
            "shared_buffers": "16MB",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            **self.settings,
        }
        with open(data / "postgresql.conf", "a") as handle:
            handle.write("\n# keyless tests\n")
            handle.writelines(f"{name} = {value}\n" for name, value in conf.items())
        for path in (data / "server.crt", data / "server.key", data / "pg_hba.conf"):
            self._own(path)

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data_dir)],
                stdout=log, stderr=subprocess.STDOUT, **self._user_kwargs())
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PostgresServerError(f"postgres exited with {self.process.returncode}:\n"
                                          f"{self.log_text()[-3000:]}")
            try:
                with self.admin():
                    return
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise PostgresServerError(f"postgres not ready within {STARTUP_TIMEOUT}s:\n"
                                  f"{self.log_text()[-3000:]}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()  # SIGTERM: smart shutdown; SIGINT would be "fast"
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        directory, self.directory = self.directory, None
        if directory is not None:
            self._last_log = (directory / "server.log").read_text(errors="replace") \
                if (directory / "server.log").exists() else ""
            shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- use ---------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        assert self.directory is not None, "server not started"
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        assert self.directory is not None, "server not started"
        return self.directory / "server.log"

    def log_text(self) -> str:
        if self.directory is None:
            return getattr(self, "_last_log", "")
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def admin(self, dbname: str = "postgres") -> psycopg.Connection:
        """The superuser over the Unix socket (trust), autocommit."""
        assert self.directory is not None, "server not started"
        return psycopg.connect(host=str(self.directory), port=self.port, user="postgres",
                               dbname=dbname, autocommit=True, connect_timeout=5)

    def create_role(self, name: str, password: str, *, database: str | None = None) -> None:
        """A login role with `password` (e.g. a token) that owns `database` (default: its own
        name) and may create in its public schema."""
        database = database or name
        with self.admin() as admin:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)))
            admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(database), sql.Identifier(name)))

    def set_password(self, name: str, password: str) -> None:
        with self.admin() as admin:
            admin.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)))

    def dsn(self, user: str, password: str, *, dbname: str | None = None,
            sslmode: str = "verify-full") -> str:
        """A libpq connection string straight to the server, for the Azure host name, the
        test CA trusted."""
        return psycopg.conninfo.make_conninfo(
            host=self.host_name, hostaddr="127.0.0.1", port=self.port, user=user,
            password=password, dbname=dbname or user, sslmode=sslmode,
            sslrootcert=self.pki.ca_pem_path, connect_timeout=10)

    # -- helpers -----------------------------------------------------------------------------

    def _run(self, command: list[str]) -> None:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                   **self._user_kwargs())
        if completed.returncode != 0:
            raise PostgresServerError(f"{command[0]} failed ({completed.returncode}):\n"
                                      f"{completed.stdout}{completed.stderr}")

    def _user_kwargs(self) -> dict[str, object]:
        if self._run_as is None:
            return {}
        return {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}

    def _own(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)


def _server_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresServerError("the tests run as root and there is no `postgres` user to run "
                                  f"the server as: {INSTALL_HINT}") from None
