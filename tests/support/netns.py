"""Network namespaces for end-to-end tests that need real routing and real iptables.

A test creates its own namespaces (unique names per run), joins them with a veth pair whose
addresses exist only inside them, gives one of them a hosts file (`/etc/netns/NAME/hosts`,
which `ip netns exec` bind-mounts over /etc/hosts), and runs programs inside:

- `Netns.exec(...)` / `Netns.popen(...)`: a command inside, optionally as another UID
  (setpriv), seeing the namespace's hosts file;
- `Netns.call(fn)`: a Python callable run on a thread that joined the namespace (setns).
  Sockets it opens belong to the namespace for good, and processes it starts are born inside
  it: that is how servers of the test process itself (the fake identity endpoint, recording
  TLS servers) and Azurite come to listen inside a namespace.

`Netns.delete()` kills every process left in the namespace (by pid) and deletes it and its
/etc/netns folder; `namespaces()` does that on every exit path.

`transparent_pod(...)` builds the whole "pod" the transparent-mode tests share: a pod
namespace (keyless as KEYLESS_UID, the fake identity endpoint on its loopback, the legacy app
as APP_UID) joined by a veth pair to an "azure" namespace (the stand-in services, under their
Azure names in the pod's hosts file), keyless started with `--transparent` and the recipe
`keyless iptables` prints for it. `start_fake_namespace(...)` puts the fake Service Bus /
Event Hubs namespace in the azure side at its AMQPS (and WebSocket) port.

Needs root, `ip` (iproute2), `iptables`/`ip6tables` and `setpriv` (util-linux).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

import pytest

from tests.e2e.conftest import DEAD_PROXY_ENV
from tests.support.azurite import TestPKI
from tests.support.fake_namespace import FakeNamespace
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess, keyless_command

__all__ = [
    "APP_UID",
    "INSTALL_HINT",
    "KEYLESS_UID",
    "FakeNamespaceOnAzure",
    "NamespacePod",
    "NamespacedKeyless",
    "Netns",
    "RecordingTLSServer",
    "TcpForwarder",
    "TransparentPod",
    "iptables_command",
    "link",
    "namespaces",
    "netns_unavailable",
    "require_netns",
    "splice",
    "start_fake_namespace",
    "transparent_pod",
]

INSTALL_HINT = "apt-get install -y iptables iproute2"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_TOOLS = ("ip", "iptables", "ip6tables", "setpriv", "nsenter")
_COMMAND_TIMEOUT = 20.0
# keyless runs as its own UID (the recipe's owner match exempts it); the app as another one
KEYLESS_UID, APP_UID = 10001, 10002
T = TypeVar("T")


def netns_unavailable() -> str | None:
    """Why this machine cannot run namespace tests, or None when it can."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns add, iptables)"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)}: install with `{INSTALL_HINT}`"
    probe = f"keyless-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          timeout=_COMMAND_TIMEOUT)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    try:
        nat = subprocess.run(["ip", "netns", "exec", probe, *iptables_command(), "-t", "nat",
                              "-S"], capture_output=True, text=True, timeout=_COMMAND_TIMEOUT)
        if nat.returncode != 0:
            return (f"iptables cannot use the nat table inside a namespace: {nat.stderr.strip()}"
                    f" (kernel nf_tables/ip_tables nat support; `{INSTALL_HINT}`)")
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True,
                       timeout=_COMMAND_TIMEOUT)
    return None


def require_netns() -> None:
    """Fail, with the reason and the install hint, when namespaces cannot be made here: a
    missing prerequisite is a reason to fix the machine, not to prove less (no skips)."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.fail(f"{reason}; transparent mode is proved in network namespaces: run the "
                    f"tests as root with `{INSTALL_HINT}`")


def iptables_command(tool: str = "iptables") -> list[str]:
    """The binary the recipe's `iptables` (or `ip6tables`) lines run as.

    Debian's `iptables` is iptables-nft (the nf_tables backend), which works inside a network
    namespace; this machine's kernel also accepts iptables-legacy there. KEYLESS_IPTABLES
    chooses another (e.g. iptables-legacy on a kernel without nf_tables); its ip6tables twin
    is the same name with ip6tables.
    """
    chosen = os.environ.get("KEYLESS_IPTABLES", "iptables")
    return [chosen.replace("iptables", tool, 1)]


def _reach_the_interpreter() -> list[str]:
    """setpriv flags that let another UID run this interpreter and the code when they are out
    of its reach.

    On a developer machine the venv's Python may be pyenv's under root's 0700 home (or the
    checkout under a 0750 home): a plain UID could not even load it. Then the process keeps
    CAP_DAC_READ_SEARCH (read and traverse any file), which changes nothing the tests prove:
    iptables' owner match sees the UID.
    """
    needed = (Path(sys.executable).resolve(), Path(sys.base_prefix).resolve() / "lib",
              Path(sys.prefix).resolve(), _REPO_ROOT)
    for folder in {p for path in needed for p in (path, *path.parents) if p.is_dir()}:
        if not folder.stat().st_mode & 0o001:
            return ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    return []


class Netns:
    """One network namespace the test created; `delete()` removes it and what runs in it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = Path("/run/netns") / name
        self.etc = Path("/etc/netns") / name
        self.created = False

    def create(self) -> Self:
        self._run(["ip", "netns", "add", self.name])
        self.created = True
        self.exec("ip", "link", "set", "lo", "up")
        return self

    def write_hosts(self, names: Mapping[str, str]) -> None:
        """The namespace's /etc/hosts (as `ip netns exec` shows it): name -> address."""
        self.etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost",
                 *(f"{address} {name}" for name, address in names.items())]
        (self.etc / "hosts").write_text("\n".join(lines) + "\n")

    # -- running things inside ------------------------------------------------

    def command(self, *argv: str, uid: int | None = None) -> list[str]:
        """argv run inside the namespace (hosts file included), as `uid` when given."""
        user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                *_reach_the_interpreter(), "--"] if uid is not None else []
        return ["ip", "netns", "exec", self.name, *user, *argv]

    def exec(self, *argv: str, uid: int | None = None, env: Mapping[str, str] | None = None,
             timeout: float = _COMMAND_TIMEOUT, check: bool = True,
             ) -> subprocess.CompletedProcess[str]:
        return self._run(self.command(*argv, uid=uid), env=env, timeout=timeout, check=check)

    def popen(self, *argv: str, uid: int | None = None, env: Mapping[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command(*argv, uid=uid), env=env, **kwargs)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 60.0) -> T:
        """fn(*args) on a thread inside the namespace: its sockets and children live there."""
        outcome: dict[str, Any] = {}

        def inside() -> None:
            try:
                with open(self.path) as handle:
                    os.setns(handle.fileno(), os.CLONE_NEWNET)
                outcome["value"] = fn(*args)
            except BaseException as exc:  # handed to the caller below
                outcome["error"] = exc

        thread = threading.Thread(target=inside, name=f"netns:{self.name}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"{fn!r} did not return within {timeout}s in {self.name}")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]  # type: ignore[no-any-return]

    # -- iptables --------------------------------------------------------------------

    def run_recipe(self, script: str, workdir: Path) -> None:
        """Run a shell recipe (e.g. `keyless iptables` output) inside, as printed: its
        `iptables`/`ip6tables` are those of `iptables_command()` (shims on PATH if needed)."""
        path = "/usr/sbin:/usr/bin:/sbin:/bin"
        if iptables_command() != ["iptables"]:
            shims = workdir / "iptables-shims"
            shims.mkdir(exist_ok=True)
            for tool in ("iptables", "ip6tables"):
                target = iptables_command(tool)[0]
                with contextlib.suppress(FileExistsError):
                    (shims / tool).symlink_to(shutil.which(target) or target)
            path = f"{shims}:{path}"
        file = workdir / f"recipe-{secrets.token_hex(3)}.sh"
        file.write_text(script + "\n")
        self.exec("sh", str(file), env={"PATH": path})

    def nat_rules(self, tool: str = "iptables") -> str:
        return self.exec(*iptables_command(tool), "-t", "nat", "-S").stdout

    def flush_nat(self) -> None:
        """Remove every nat rule and chain (IPv4 and IPv6) of this namespace."""
        for tool in ("iptables", "ip6tables"):
            self.exec(*iptables_command(tool), "-t", "nat", "-F")
            self.exec(*iptables_command(tool), "-t", "nat", "-X")

    def pids(self) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                                text=True, timeout=_COMMAND_TIMEOUT)
        return [int(pid) for pid in listed.stdout.split()]

    # -- cleanup -------------------------------------------------------------------

    def delete(self) -> None:
        """Kill what still runs inside (TERM, then KILL), delete the namespace and its /etc."""
        if self.created:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                # never this process: its helper threads may sit in the namespace
                pids = [pid for pid in self.pids() if pid != os.getpid()]
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                deadline = time.monotonic() + 5
                while set(self.pids()) - {os.getpid()} and time.monotonic() < deadline:
                    time.sleep(0.1)
            subprocess.run(["ip", "netns", "delete", self.name], capture_output=True,
                           timeout=_COMMAND_TIMEOUT)
            self.created = False
        shutil.rmtree(self.etc, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.etc.parent.rmdir()  # /etc/netns itself, when no one else uses it

    @staticmethod
    def _run(argv: Sequence[str], env: Mapping[str, str] | None = None,
             timeout: float = _COMMAND_TIMEOUT, check: bool = True,
             ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(list(argv), capture_output=True, text=True, env=env,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n"
                               f"{done.stdout}{done.stderr}")
        return done


@contextlib.contextmanager
def namespaces(*roles: str) -> Iterator[dict[str, Netns]]:
    """Fresh namespaces, one per role (names unique per run), deleted on every exit path."""
    run = secrets.token_hex(3)
    made = {role: Netns(f"kl-{role}-{run}") for role in roles}
    try:
        for ns in made.values():
            ns.create()
        yield made
    finally:
        for ns in made.values():
            ns.delete()


def link(a: Netns, a_address: str, b: Netns, b_addresses: Sequence[str]) -> None:
    """A veth pair between a and b, created inside a (never in the host's namespace).

    Addresses are CIDRs (e.g. 10.200.0.1/24); b may carry several (one per stand-in server).
    """
    a_end, b_end = "veth0", "veth1"
    a.exec("ip", "link", "add", a_end, "type", "veth", "peer", "name", b_end, "netns", b.name)
    a.exec("ip", "addr", "add", a_address, "dev", a_end)
    for address in b_addresses:
        b.exec("ip", "addr", "add", address, "dev", b_end)
    a.exec("ip", "link", "set", a_end, "up")
    b.exec("ip", "link", "set", b_end, "up")


def readable_dir(path: Path) -> Path:
    """A folder the apps' and keyless' own UIDs can read (pytest's tmp_path is root's 0700)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path


def run_app(netns: Netns, uid: int, workdir: Path, *argv: str, timeout: float = 120.0,
            env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A legacy test app run inside `netns` as `uid`, no proxy variables; its last stdout
    line is its JSON result."""
    done = netns.exec(*argv, uid=uid, timeout=timeout, check=False, env={
        "PATH": "/usr/bin:/bin", "HOME": str(workdir / "app"), **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


class NamespacedKeyless(KeylessProcess):
    """The real keyless process, run inside `netns` as `uid` (its own, for the iptables
    exemption). Admin requests (readiness, /metrics) are made from inside the namespace."""

    def __init__(self, netns: Netns, uid: int, workdir: Path, args: list[str],
                 env: dict[str, str]) -> None:
        super().__init__(workdir, args, env)
        self.netns = netns
        self.uid = uid
        self.confdir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.confdir, uid, uid)

    def command(self) -> list[str]:
        return self.netns.command(*super().command(), uid=self.uid)

    def get(self, path: str) -> tuple[int, str]:
        return self.netns.call(super().get, path, timeout=10)

    def uid_running(self) -> int:
        """The real UID of the running keyless process (ip netns exec and setpriv exec)."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Uid:"))
                   .split()[1])


class RecordingTLSServer:
    """A TLS server at (address, port) that records, per connection, whether the handshake
    completed and every byte received after it; answers any request with 200 and `banner`,
    except that the answers in `queued` ((status, headers), oldest first) go out first.

    Start it inside a namespace with `Netns.call(server.start)`.
    """

    def __init__(self, address: str, port: int, cert: tuple[str, str], banner: str) -> None:
        self.address = (address, port)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(*cert)
        self.banner = banner.encode()
        self.connections: list[dict[str, Any]] = []
        self.queued: list[tuple[int, dict[str, str]]] = []
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()

    def start(self) -> Self:
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        self._listener = socket.create_server(self.address, family=family)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _accept(self) -> None:
        listener = self._listener
        while listener is not None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        record: dict[str, Any] = {"handshake": None, "received": b""}
        with self._lock:
            self.connections.append(record)
        raw.settimeout(10)
        try:
            conn = self.context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            record["handshake"] = f"failed: {exc.__class__.__name__}"
            raw.close()
            return
        record["handshake"] = "ok"
        with conn:
            try:
                while b"\r\n\r\n" not in record["received"]:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    record["received"] += chunk
                with self._lock:
                    status, headers = self.queued.pop(0) if self.queued else (200, {})
                extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
                conn.sendall(f"HTTP/1.1 {status} Scripted\r\nContent-Type: text/plain\r\n"
                             f"Connection: close\r\n{extra}Content-Length: {len(self.banner)}"
                             "\r\n\r\n".encode() + self.banner)
            except (OSError, ssl.SSLError):
                return

    def received(self) -> bytes:
        with self._lock:
            return b"".join(c["received"] for c in self.connections)


def splice(a: socket.socket, b: socket.socket) -> None:
    """Relay a <-> b byte for byte (a thread each way) until either side ends; then both close."""
    a.settimeout(None)
    b.settimeout(None)
    for source, sink in ((a, b), (b, a)):
        threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class TcpForwarder:
    """Forwards (address, port) to 127.0.0.1:to_port, byte for byte, inside the namespace it
    is started in (`netns.call(forwarder.start)`): a server that listens on its namespace's
    loopback becomes reachable at a veth address, and sees its clients as local ones.
    `connections` counts what arrived."""

    def __init__(self, address: str, port: int, to_port: int) -> None:
        self.address, self.port, self.to_port = address, port, to_port
        self.connections = 0
        self._listener: socket.socket | None = None
        self._stop = threading.Event()

    def start(self) -> Self:
        self._listener = socket.create_server((self.address, self.port))
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True,
                         name=f"forward:{self.address}:{self.port}").start()
        return self

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            self.connections += 1
            try:
                server = socket.create_connection(("127.0.0.1", self.to_port), timeout=10)
            except OSError:
                client.close()
                continue
            splice(client, server)

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()


class _Server(Protocol):
    def start(self) -> Any: ...

    def stop(self) -> None: ...




@dataclass
class TransparentPod:
    """The pod and azure namespaces of a transparent-mode test, with what runs in them.

    Built by `transparent_pod(...)`; `start_keyless(...)` fills `keyless`, `keyless_ca` (a
    copy the app's UID can read) and `rules` (what `keyless iptables` printed for it).
    Everything started through it is stopped when the `transparent_pod` block ends. A test
    subclasses it for its own app helpers and the servers it adds (`kind=`)."""

    pod: Netns
    azure: Netns
    workdir: Path
    pki: TestPKI
    identity: FakeIdentityEndpoint
    stack: contextlib.ExitStack = field(repr=False)
    keyless: NamespacedKeyless = field(init=False)
    keyless_ca: str = field(init=False)
    rules: str = field(init=False)

    def in_azure[S: _Server](self, server: S, timeout: float = 60.0) -> S:
        """Start `server` inside the azure namespace; stop it at the end."""
        self.azure.call(server.start, timeout=timeout)
        self.stack.callback(server.stop)
        return server

    def in_pod[S: _Server](self, server: S, timeout: float = 60.0) -> S:
        """Start `server` inside the pod (e.g. on its loopback, exempt from the redirect)."""
        self.pod.call(server.start, timeout=timeout)
        self.stack.callback(server.stop)
        return server

    def forward(self, address: str, port: int, to_port: int) -> TcpForwarder:
        """(address, port) in the azure namespace, forwarded to its loopback's to_port."""
        return self.in_azure(TcpForwarder(address, port, to_port))

    @property
    def app_dir(self) -> Path:
        return readable_dir(self.workdir / "app")

    def start_keyless(self, *args: str, recipe: Sequence[str] = (),
                      env: Mapping[str, str] | None = None) -> NamespacedKeyless:
        """keyless `--transparent ARGS` in the pod as KEYLESS_UID, with the fake identity and
        no usable proxy variables; then its CA for the app and the recipe (`keyless iptables
        --listen ... --uid KEYLESS_UID RECIPE`), which the test applies when it wants it."""
        keyless_dir = readable_dir(self.workdir / "keyless")
        self.keyless = NamespacedKeyless(self.pod, KEYLESS_UID, keyless_dir, [
            "--transparent", *args,
        ], {**self.identity.env(), **DEAD_PROXY_ENV, "HOME": str(keyless_dir), **(env or {})})
        self.stack.callback(self.keyless.stop)
        self.keyless.start(timeout=60)
        keyless_ca = self.app_dir / "keyless-ca.pem"
        shutil.copyfile(self.keyless.ca_path, keyless_ca)
        keyless_ca.chmod(0o644)
        self.keyless_ca = str(keyless_ca)
        self.rules = subprocess.run(
            [*keyless_command(), "iptables", "--listen", f"127.0.0.1:{self.keyless.port}",
             "--uid", str(KEYLESS_UID), *recipe], capture_output=True, text=True,
            timeout=30, check=True).stdout
        return self.keyless

    def redirect(self) -> None:
        """Exactly the printed rules, and no others, in the pod."""
        self.pod.flush_nat()
        self.pod.run_recipe(self.rules, self.workdir)

    def redirecting(self) -> bool:
        return all("KEYLESS_OUTPUT" in self.pod.nat_rules(tool)
                   for tool in ("iptables", "ip6tables"))

    def apply_rules(self) -> None:
        """The printed rules, unless they are in place already (tests that share them)."""
        if not self.redirecting():
            self.redirect()

    def run_app(self, *argv: str, timeout: float = 120.0,
                env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """A legacy app in the pod as APP_UID (see `run_app`)."""
        return run_app(self.pod, APP_UID, self.workdir, *argv, timeout=timeout, env=env)


@contextlib.contextmanager
def transparent_pod[P: TransparentPod](
        label: str, pod_address: str, azure_addresses: Sequence[str], hosts: Mapping[str, str],
        kind: type[P] = TransparentPod,  # type: ignore[assignment]
) -> Iterator[P]:
    """A fresh pod/azure pair of namespaces (`LABELpod`, `LABELazure`, unique per run), a veth
    between them (pod_address/24 in the pod, azure_addresses/24 on the azure side), the pod's
    hosts file (Azure name -> azure address), a test CA and the fake identity endpoint on
    the pod's loopback. Everything, keyless included, is torn down on every exit path."""
    require_netns()
    # Not under pytest's tmp_path: that is root's 0700 folder, and keyless and the app run
    # as other UIDs.
    workdir = readable_dir(Path(tempfile.mkdtemp(prefix=f"keyless-netns-{label}-")))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        spaces = stack.enter_context(namespaces(f"{label}pod", f"{label}azure"))
        pod_ns, azure_ns = spaces[f"{label}pod"], spaces[f"{label}azure"]
        link(pod_ns, f"{pod_address}/24", azure_ns, [f"{a}/24" for a in azure_addresses])
        pod_ns.write_hosts(hosts)
        pki = TestPKI(readable_dir(workdir / "pki"))
        pod = kind(pod_ns, azure_ns, workdir, pki, FakeIdentityEndpoint(), stack)
        pod.in_pod(pod.identity)  # on the pod's loopback: exempt from the redirect
        yield pod


@dataclass
class FakeNamespaceOnAzure:
    """The fake namespace (rhea) in the azure namespace, reachable at address:5671 (AMQPS)
    and address:443 (AMQP over WebSockets); the forwarders count what arrived."""

    fake: FakeNamespace
    forwarder: TcpForwarder
    wss_forwarder: TcpForwarder


class NamespacePod(TransparentPod):
    """A pod whose azure side runs the fake Service Bus / Event Hubs namespace."""

    upstream: FakeNamespaceOnAzure  # set by start_fake_namespace

    @property
    def fake(self) -> FakeNamespace:
        return self.upstream.fake


def start_fake_namespace(pod: NamespacePod, address: str, namespace: str) -> None:
    """The fake `namespace` in pod's azure side, at address:5671 and address:443."""
    fake = pod.in_azure(FakeNamespace(pod.workdir / "fake", pod.pki, namespace))
    pod.upstream = FakeNamespaceOnAzure(fake, pod.forward(address, 5671, fake.amqps_port),
                                        pod.forward(address, 443, fake.wss_port))
