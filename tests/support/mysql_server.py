"""MySQL-protocol servers for tests: a real MariaDB, and a fake that wants the token in clear.

`MariaDB`: Debian's mariadbd with its own data directory under the test's tmp dir, on a free
loopback port, with TLS (a test-CA certificate for the Azure name). Users are made with
`create_token_user`: `REQUIRE SSL`, mysql_native_password, the password being the very token
the fake identity will hand keyless, so a successful login proves keyless logged in with it.

`FakeMySQLServer`: the `mysql_clear_password` path (Azure Database for MySQL asks for it for
Entra users; MariaDB cannot without PAM) and caching_sha2_password's full authentication. It
requires TLS after an SSLRequest, asks for the password in clear, checks it the way Azure
would (tests.support.entra.verify: signature, issuer, audience, expiry) and answers OK or
ERR 1045; after OK it answers COM_PING, COM_QUIT and COM_QUERY with a one-cell result.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Self

import pymysql

from proxy.mysql import codec
from tests.support.azurite import free_port
from tests.support.entra import verify

OSSRDBMS_RESOURCE = "https://ossrdbms-aad.database.windows.net"
TEST_DATABASE = "keyless_test"

INSTALL_HINT = "install Debian's MariaDB server: apt-get install -y mariadb-server"


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or next(
            (str(p) for d in ("/usr/sbin", "/usr/bin") if (p := Path(d, name)).exists()), None)
        if found:
            return found
    raise RuntimeError(f"none of {names} found: {INSTALL_HINT}")


class MariaDB:
    """A throwaway mariadbd on 127.0.0.1 with TLS for `hostname`'s certificate."""

    def __init__(self, directory: Path, cert_and_key: tuple[str, str], ca_path: str, *,
                 host: str = "127.0.0.1", port: int | None = None) -> None:
        self.directory = Path(directory)
        self.cert, self.key = cert_and_key
        self.ca_path = ca_path
        self.host = host  # another address only inside a network namespace the test made
        self.port = port or free_port()
        self.datadir = self.directory / "data"
        self.socket_path = self.directory / "mysqld.sock"
        self.log_path = self.directory / "mariadbd.err"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        install = subprocess.run(
            [_binary("mariadb-install-db", "mysql_install_db"), "--no-defaults",
             f"--datadir={self.datadir}", "--auth-root-authentication-method=normal",
             "--skip-test-db", f"--user={_user()}"],
            capture_output=True, timeout=120)
        if install.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {install.stdout.decode()[-2000:]}"
                               f"{install.stderr.decode()[-2000:]}")
        command = [
            _binary("mariadbd", "mysqld"), "--no-defaults",
            f"--datadir={self.datadir}", f"--socket={self.socket_path}",
            f"--port={self.port}", f"--bind-address={self.host}", f"--user={_user()}",
            f"--pid-file={self.directory / 'mariadbd.pid'}", f"--log-error={self.log_path}",
            f"--ssl-cert={self.cert}", f"--ssl-key={self.key}", f"--ssl-ca={self.ca_path}",
            "--skip-name-resolve", "--skip-log-bin", "--innodb-buffer-pool-size=32M",
            "--max-connections=200",
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {self.process.returncode}:\n"
                                   f"{self.log()}")
            try:
                self.sql("SELECT 1")
                break
            except pymysql.err.OperationalError:
                time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError(f"mariadbd not ready within {timeout}s:\n{self.log()}")
        self.sql(f"CREATE DATABASE IF NOT EXISTS {TEST_DATABASE}")
        return self

    def admin(self) -> pymysql.connections.Connection:
        """root over the unix socket (the tests' own administration, never through keyless)."""
        return pymysql.connect(unix_socket=str(self.socket_path), user="root", password="",
                               autocommit=True, connect_timeout=5)

    def sql(self, statement: str, args: tuple[object, ...] | None = None) -> list[tuple]:
        with contextlib.closing(self.admin()) as connection, connection.cursor() as cursor:
            cursor.execute(statement, args)
            return list(cursor.fetchall())

    def create_token_user(self, user: str, password: str) -> None:
        """A user that must use TLS and whose (native) password is `password`."""
        self.sql(f"DROP USER IF EXISTS '{user}'@'%'")
        self.sql(f"CREATE USER '{user}'@'%%' IDENTIFIED VIA mysql_native_password "
                 "USING PASSWORD(%s) REQUIRE SSL", (password,))
        self.sql(f"GRANT ALL PRIVILEGES ON {TEST_DATABASE}.* TO '{user}'@'%'")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _user() -> str:
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


# -- the fake server ------------------------------------------------------------------------

# clear: AuthSwitch to mysql_clear_password; caching_sha2: its full auth (0x01 0x04);
# sha2_fast: the caching_sha2 scramble checked against `expected_password`, 0x01 0x03, OK;
# switch_native: AuthSwitch to mysql_native_password with a new nonce, scramble checked;
# refuse: ERR 1045 whatever comes; reset: closed after the response; no_tls: no CLIENT_SSL.
# ed25519: AuthSwitch to MariaDB's client_ed25519, which no token can answer.
FakeMode = Literal["clear", "caching_sha2", "sha2_fast", "switch_native", "refuse", "reset",
                   "no_tls", "ed25519"]

FAKE_CAPABILITIES = (
    codec.CLIENT_LONG_PASSWORD | codec.CLIENT_FOUND_ROWS | codec.CLIENT_LONG_FLAG
    | codec.CLIENT_CONNECT_WITH_DB | codec.CLIENT_PROTOCOL_41 | codec.CLIENT_SSL
    | codec.CLIENT_TRANSACTIONS | codec.CLIENT_SECURE_CONNECTION | codec.CLIENT_MULTI_STATEMENTS
    | codec.CLIENT_MULTI_RESULTS | codec.CLIENT_PLUGIN_AUTH | codec.CLIENT_CONNECT_ATTRS
    | codec.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | codec.CLIENT_DEPRECATE_EOF
)
FAKE_NONCE = b"0123456789abcdefghij"
SWITCH_NONCE = b"ABCDEFGHIJ0123456789"
INSECURE_TRANSPORT = codec.Err(3159, "HY000", "Connections using insecure transport are "
                               "prohibited while --require_secure_transport=ON.")
COM_QUIT, COM_QUERY, COM_PING = 0x01, 0x03, 0x0E


@dataclass
class Login:
    """One login attempt the fake saw (the password is kept for the test's own checks)."""

    user: str
    database: str | None
    client_plugin: str | None
    capabilities: int
    attributes: tuple[tuple[str, str], ...] | None
    password: bytes = field(default=b"", repr=False)
    problems: list[str] = field(default_factory=list)
    accepted: bool = False


class FakeMySQLServer:
    """A TLS-requiring MySQL peer on 127.0.0.1 that checks the password as an Entra token."""

    def __init__(self, cert_and_key: tuple[str, str], *, mode: FakeMode = "clear",
                 audience: str = OSSRDBMS_RESOURCE, client_id: str | None = None) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(*cert_and_key)
        self.mode: FakeMode = mode
        self.audience = audience
        self.client_id = client_id
        self.expected_password: bytes | None = None  # for the scramble modes
        self.connections = 0
        self.logins: list[Login] = []
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingTCPServer | None = None
        self.port = 0

    def start(self) -> Self:
        fake = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError, codec.ProtocolError, ssl.SSLError):
                    fake._serve(self.request)

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         name=f"fake-mysql:{self.port}", daemon=True).start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.connections = 0
            self.logins.clear()

    # -- one connection (a server thread) --------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        with self._lock:
            self.connections += 1
        mode = self.mode
        plugin = (codec.CACHING_SHA2 if mode in ("caching_sha2", "sha2_fast", "switch_native")
                  else codec.NATIVE)
        capabilities = FAKE_CAPABILITIES & ~(codec.CLIENT_SSL if mode == "no_tls" else 0)
        greeting = codec.Handshake("8.0.21-fake-azure", 7, FAKE_NONCE, capabilities, 45,
                                   0x0002, plugin)
        _send(sock, 0, codec.encode_handshake(greeting))
        seq, payload = _recv(sock)
        if not codec.is_ssl_request(payload):
            with self._lock:  # a login in the clear: recorded, refused
                self.logins.append(_plain_login(payload))
            _send(sock, seq + 1, codec.encode_err(INSECURE_TRANSPORT))
            return
        tls = self.context.wrap_socket(sock, server_side=True)
        seq, payload = _recv(tls)
        response = codec.decode_handshake_response(payload)
        login = Login(response.user, response.database, response.auth_plugin,
                      response.capabilities, response.attributes)
        with self._lock:
            self.logins.append(login)
        if mode == "reset":
            tls.close()
            return
        if mode == "ed25519":
            _send(tls, seq + 1, codec.encode_auth_switch(
                codec.AuthSwitch("client_ed25519", SWITCH_NONCE[:32] + b"\0")))
            with contextlib.suppress(OSError, codec.ProtocolError):
                _, login.password = _recv(tls)  # nothing should come
            return
        if mode in ("sha2_fast", "switch_native"):
            self._scrambled(tls, seq, response, login)
            return
        if mode == "caching_sha2" and response.auth_plugin == codec.CACHING_SHA2:
            # the scramble cannot be checked without the password: ask for it in clear
            _send(tls, seq + 1, codec.encode_auth_more_data(codec.PERFORM_FULL_AUTH))
        else:
            _send(tls, seq + 1, codec.encode_auth_switch(codec.AuthSwitch(codec.CLEAR, b"")))
        seq, payload = _recv(tls)
        login.password = payload[:-1] if payload.endswith(b"\0") else payload
        try:
            token = login.password.decode()
        except UnicodeDecodeError:
            token = ""
        login.problems = verify(token, self.audience, self.client_id)
        if mode == "refuse" and not login.problems:
            login.problems = ["this server refuses every login (mode refuse)"]
        if login.problems:
            _send(tls, seq + 1, codec.encode_err(codec.Err(
                codec.ER_ACCESS_DENIED, "28000",
                f"Access denied for user '{response.user}'@'127.0.0.1' (using password: YES)")))
            return
        login.accepted = True
        _send(tls, seq + 1, codec.encode_ok())
        self._commands(tls, response)

    def _scrambled(self, tls: ssl.SSLSocket, seq: int, response: codec.HandshakeResponse,
                   login: Login) -> None:
        """The scramble paths: checked against the password the test says is right."""
        expected = self.expected_password or b""
        if self.mode == "switch_native":
            _send(tls, seq + 1, codec.encode_auth_switch(
                codec.AuthSwitch(codec.NATIVE, SWITCH_NONCE + b"\0")))
            seq, answer = _recv(tls)
            right = expected and answer == codec.scramble_native(expected, SWITCH_NONCE)
        else:
            answer = response.auth_response
            right = (expected and response.auth_plugin == codec.CACHING_SHA2
                     and answer == codec.scramble_caching_sha2(expected, FAKE_NONCE))
            if right:
                seq += 1
                _send(tls, seq, codec.encode_auth_more_data(codec.FAST_AUTH_OK))
        login.password = answer
        if not right:
            login.problems = ["wrong scramble"]
            _send(tls, seq + 1, codec.encode_err(codec.Err(
                codec.ER_ACCESS_DENIED, "28000",
                f"Access denied for user '{response.user}'@'127.0.0.1' (using password: YES)")))
            return
        login.accepted = True
        _send(tls, seq + 1, codec.encode_ok())
        self._commands(tls, response)

    def _commands(self, tls: ssl.SSLSocket, response: codec.HandshakeResponse) -> None:
        deprecate_eof = bool(response.capabilities & codec.CLIENT_DEPRECATE_EOF)
        for _ in range(10_000):
            seq, payload = _recv(tls)
            command = payload[:1]
            if command == bytes((COM_QUIT,)) or not command:
                return
            if command == bytes((COM_PING,)):
                _send(tls, seq + 1, codec.encode_ok())
            elif command == bytes((COM_QUERY,)) and not payload[1:].strip().lower().startswith(
                    b"select"):
                _send(tls, seq + 1, codec.encode_ok())  # SET NAMES, SET AUTOCOMMIT, ...
            elif command == bytes((COM_QUERY,)):
                value = response.user if b"user" in payload.lower() else "1"
                for offset, packet in enumerate(_one_cell(value, deprecate_eof)):
                    _send(tls, seq + 1 + offset, packet)
            else:
                _send(tls, seq + 1, codec.encode_err(codec.Err(1047, "08S01", "Unknown command")))


def _plain_login(payload: bytes) -> Login:
    try:
        response = codec.decode_handshake_response(payload)
    except codec.ProtocolError:
        return Login("?", None, None, 0, None, payload, ["not a handshake response"])
    return Login(response.user, response.database, response.auth_plugin,
                 response.capabilities, response.attributes, response.auth_response,
                 ["login without TLS"])


def _one_cell(value: str, deprecate_eof: bool) -> list[bytes]:
    """A text result set: one VARCHAR column "value", one row."""
    column = (codec.lenenc_bytes(b"def") + codec.lenenc_bytes(b"") + codec.lenenc_bytes(b"")
              + codec.lenenc_bytes(b"") + codec.lenenc_bytes(b"value")
              + codec.lenenc_bytes(b"value") + b"\x0c" + (45).to_bytes(2, "little")
              + (255).to_bytes(4, "little") + b"\xfd" + b"\0\0" + b"\0" + b"\0\0")
    eof = b"\xfe\0\0\x02\0"
    end = b"\xfe" + codec.encode_ok()[1:] if deprecate_eof else eof
    packets = [codec.lenenc_int(1), column]
    if not deprecate_eof:
        packets.append(eof)
    packets += [codec.lenenc_bytes(value.encode()), end]
    return packets


def _send(sock: socket.socket, seq: int, payload: bytes) -> None:
    sock.sendall(codec.encode_packet(seq, payload))


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise OSError("peer closed")
        data += chunk
    return bytes(data)


def _recv(sock: socket.socket) -> tuple[int, bytes]:
    length, seq = codec.decode_header(_recv_exact(sock, codec.HEADER_SIZE))
    return seq, _recv_exact(sock, length)
