"""`--workers N`: one supervisor and N worker processes, each a full keyless.

- The workers bind the same listen ports with SO_REUSEPORT; the kernel spreads the
  connections among them.
- The supervisor owns the credentials: it keeps the one token cache (single-flight fetches,
  background refresh) and hands tokens to the workers over a Unix socket in a private
  directory (0700), so the identity endpoint sees one call per (identity, scope) for the pod.
  Each worker keeps a local copy (its own TokenCache whose source is the supervisor).
- The supervisor serves the admin port: /metrics sums the workers' metrics (prometheus-client
  multiprocess mode, in a fresh private directory per run) with its own; /readyz is ready only
  while all N workers are, each reporting its readiness every half second.
- A worker that dies is started again (with backoff) and counted; SIGTERM is forwarded to
  every worker, each drains, and the supervisor waits for all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from proxy import metrics
from proxy.tokens import Identity, TokenUnavailable

logger = logging.getLogger(__name__)

WORKER_ID_ENV = "KEYLESS_INTERNAL_WORKER_ID"
SUPERVISOR_SOCKET_ENV = "KEYLESS_INTERNAL_SUPERVISOR_SOCKET"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STATUS_EVERY = 0.5  # seconds between a worker's readiness reports
STATUS_STALE = 3.0  # a worker silent this long is not counted as ready
RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)


class SupervisorError(Exception):
    """The supervisor refused or could not be reached; the message holds no secret."""


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process learns from its environment."""

    worker_id: str
    socket_path: str
    parent_pid: int

    @classmethod
    def from_environ(cls) -> WorkerRole | None:
        worker_id = os.environ.get(WORKER_ID_ENV)
        socket_path = os.environ.get(SUPERVISOR_SOCKET_ENV)
        if not worker_id or not socket_path:
            return None
        return cls(worker_id, socket_path, os.getppid())


async def ask(socket_path: str, request: dict[str, object], timeout: float) -> dict:
    """One request/answer (a JSON line each way) on the supervisor's socket, bounded."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(socket_path)
            try:
                writer.write(json.dumps(request).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
    except TimeoutError:
        raise SupervisorError(f"no answer from the supervisor within {timeout:g}s") from None
    except OSError as exc:
        raise SupervisorError(f"cannot reach the supervisor: {exc.strerror or exc}") from None
    try:
        answer = json.loads(line)
    except ValueError:
        raise SupervisorError("the supervisor closed the connection") from None
    if not isinstance(answer, dict):
        raise SupervisorError("unexpected answer from the supervisor")
    return answer


@dataclass(frozen=True)
class SuppliedToken:
    token: str = field(repr=False)
    expires_on: float
    refresh_on: float | None


class SupervisorTokens:
    """A worker's token source (TokenCache's `source`): the supervisor's token cache.

    `forget` (a service rejected the token) makes the next fetch for that identity ask the
    supervisor to drop its copy too, so the replay gets a really fresh token."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        self.socket_path, self.timeout = socket_path, timeout
        self._stale: set[Identity] = set()

    async def __call__(self, identity: Identity, scope: str) -> SuppliedToken:
        fresh = identity in self._stale
        self._stale.discard(identity)
        answer = await ask(self.socket_path, {"op": "token", "identity": identity.client_id,
                                              "scope": scope, "fresh": fresh}, self.timeout)
        if "error" in answer:  # the supervisor's own reason, as one process would give it
            raise TokenUnavailable(str(answer["error"]))
        try:
            return SuppliedToken(str(answer["token"]), float(answer["expires_on"]),
                                 float(answer["refresh_on"]))
        except (KeyError, TypeError, ValueError):
            raise SupervisorError("malformed token answer from the supervisor") from None

    def forget(self, identity: Identity) -> None:
        self._stale.add(identity)

    async def close(self) -> None:
        pass


async def report_status(role: WorkerRole, ready: Callable[[], bool],
                        orphaned: Callable[[], None]) -> None:
    """A worker's readiness, told to the supervisor every STATUS_EVERY seconds. A worker whose
    supervisor is gone (it was re-parented) drains itself: nobody would restart or probe it."""
    while True:
        if os.getppid() != role.parent_pid:
            logger.warning("the supervisor is gone: draining")
            orphaned()
            return
        try:
            await ask(role.socket_path, {"op": "status", "worker": role.worker_id,
                                         "pid": os.getpid(), "ready": ready()}, 2.0)
        except SupervisorError as exc:
            logger.debug("status report failed: %s", exc)
        await asyncio.sleep(STATUS_EVERY)


def merged_families(*sources: Iterable[Metric]) -> list[Metric]:
    """Metric families from several collectors with samples of the same name and labels
    combined: counters and histograms summed, gauges by their maximum (the only gauges both
    sides have are keyless_build_info and the CA expiry, the same everywhere)."""
    merged: dict[str, Metric] = {}
    positions: dict[tuple[str, str, tuple[tuple[str, str], ...]], int] = {}
    for source in sources:
        for family in source:
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation,
                                                      family.type, family.unit)
            for sample in family.samples:
                if sample.name.endswith("_created"):  # per process: meaningless summed
                    continue
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                if key not in positions:
                    positions[key] = len(target.samples)
                    target.samples.append(sample)
                    continue
                old = target.samples[positions[key]]
                value = max(old.value, sample.value) if family.type == "gauge" \
                    else old.value + sample.value
                target.samples[positions[key]] = old._replace(value=value)
    return list(merged.values())


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def pod_metrics(multiproc_dir: Path) -> bytes:
    """The admin port's /metrics: the workers' metrics (read from their files) and the
    supervisor's own (tokens, worker restarts)."""
    workers = CollectorRegistry()
    MultiProcessCollector(workers, path=str(multiproc_dir))
    return generate_latest(_Families(merged_families(workers.collect(),
                                                     metrics.REGISTRY.collect())))


@dataclass
class WorkerState:
    number: int
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    reported_at: float = 0.0
    ever_ready: bool = False

    def serving(self, now: float) -> bool:
        return (self.process is not None and self.process.returncode is None and self.ready
                and now - self.reported_at < STATUS_STALE)


@dataclass
class PodHealth:
    """The admin server's Health for the pod: ready while all N workers are."""

    workers: list[WorkerState]
    draining: bool = False
    clock: Callable[[], float] = time.monotonic

    @property
    def listening(self) -> bool:
        now = self.clock()
        return all(worker.serving(now) for worker in self.workers)

    @property
    def ready(self) -> bool:
        return self.listening and not self.draining


class Supervisor:
    def __init__(self, settings, argv: Sequence[str], tokens, runtime_dir: Path) -> None:
        self.settings, self.argv, self.tokens = settings, list(argv), tokens
        self.runtime_dir = runtime_dir
        self.socket_path = str(runtime_dir / "supervisor.sock")
        self.multiproc_dir = runtime_dir / "metrics"
        self.multiproc_dir.mkdir(mode=0o700)
        self.workers = [WorkerState(number) for number in range(settings.workers)]
        self.health = PodHealth(self.workers)
        self.failed: str | None = None
        self._stopping = asyncio.Event()

    def worker_env(self, number: int) -> dict[str, str]:
        return {**os.environ, WORKER_ID_ENV: str(number),
                SUPERVISOR_SOCKET_ENV: self.socket_path, MULTIPROC_ENV: str(self.multiproc_dir)}

    async def serve_workers(self) -> asyncio.Server:
        server = await asyncio.start_unix_server(self._answer_worker, self.socket_path)
        os.chmod(self.socket_path, 0o600)
        return server

    def from_a_worker(self, writer: asyncio.StreamWriter) -> bool:
        """Whether the peer is one of our workers (SO_PEERCRED): besides the directory's mode,
        no other process of the user (or root) is handed a token."""
        sock = writer.get_extra_info("socket")
        try:
            pid, _uid, _gid = struct.unpack(
                "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                      struct.calcsize("3i")))
        except (OSError, AttributeError):
            return False
        return any(worker.process is not None and worker.process.pid == pid
                   and worker.process.returncode is None for worker in self.workers)

    async def _answer_worker(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        if not self.from_a_worker(writer):
            logger.warning("refused a connection to the token socket from a process that is "
                           "not a worker")
            writer.close()
            return
        try:
            async with asyncio.timeout(self.settings.token_timeout + 10):
                request = json.loads(await reader.readline())
                answer = await self._answer(request)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (OSError, ValueError, TimeoutError, AttributeError, KeyError) as exc:
            logger.debug("worker request failed: %s", type(exc).__name__)
        finally:
            writer.close()

    async def _answer(self, request: dict) -> dict[str, object]:
        if request.get("op") == "status":
            number = int(request["worker"])
            worker = self.workers[number]
            if worker.process is not None and worker.process.pid == request.get("pid"):
                worker.ready, worker.reported_at = bool(request["ready"]), time.monotonic()
                worker.ever_ready |= worker.ready
            return {"ok": True}
        if request.get("op") == "token":
            identity, scope = Identity(request.get("identity") or None), str(request["scope"])
            if request.get("fresh"):
                self.tokens.invalidate(identity, scope)
            try:
                token = await self.tokens.get_token(identity, scope)
            except TokenUnavailable as exc:
                return {"error": str(exc)}
            return {"token": token.value, "expires_on": token.expires_on,
                    "refresh_on": token.refresh_on}
        return {"error": "unknown request"}

    async def keep_running(self, worker: WorkerState) -> None:
        """Start the worker; start it again whenever it dies, until the pod stops."""
        failures = launches = 0
        while not self._stopping.is_set():
            launches += 1
            worker.ready, worker.reported_at = False, 0.0
            started = time.monotonic()
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", *self.argv, env=self.worker_env(worker.number),
                stdin=asyncio.subprocess.DEVNULL,
                # a terminal's Ctrl-C reaches the supervisor alone, which drains the workers
                start_new_session=True)
            logger.info("worker %d started (pid %d)", worker.number, worker.process.pid)
            if self._stopping.is_set():  # the drain began while it was starting
                worker.process.send_signal(signal.SIGTERM)
            code = await worker.process.wait()
            mark_process_dead(worker.process.pid, str(self.multiproc_dir))
            if self._stopping.is_set():
                return
            if not worker.ever_ready and launches == 1:
                # a worker that fails on the pod's first start (port taken, bad option)
                # would fail again: the pod fails to start, as one process would
                self.failed = f"worker {worker.number} exited with {code} before it was ready"
                self._stopping.set()
                return
            metrics.WORKER_RESTARTS.inc()
            failures = 0 if time.monotonic() - started > 30 else failures + 1
            delay = RESTART_BACKOFF[min(failures, len(RESTART_BACKOFF) - 1)]
            logger.warning("worker %d (pid %d) exited with %s: starting it again in %gs",
                           worker.number, worker.process.pid, code, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    def drain(self) -> None:
        """SIGTERM/SIGINT: readiness fails and every worker drains (a second signal makes
        them stop at once, as in one process)."""
        if not self.health.draining:
            logger.info("draining %d worker(s)", len(self.workers))
        self.health.draining = True
        self._stopping.set()
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)

    async def wait_for_workers(self) -> int:
        """After the drain: wait for every worker (bounded by the drain timeout, plus time to
        shut down), then kill any left. 0 when all exited 0."""
        deadline = time.monotonic() + self.settings.drain_timeout + 15
        codes = []
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            try:
                codes.append(await asyncio.wait_for(process.wait(),
                                                    max(0.1, deadline - time.monotonic())))
            except TimeoutError:
                logger.warning("worker %d did not stop: killing it", worker.number)
                process.kill()
                codes.append(await process.wait())
        return 0 if all(code == 0 for code in codes) else 1


async def supervise(settings, argv: Sequence[str]) -> int:
    """`keyless run --workers N` (N >= 2): prepare the CA once, own the tokens, serve the admin
    port, run and watch the workers until SIGTERM."""
    from proxy.admin import AdminServer, AdminTokenError, read_admin_token
    from proxy.audit import STATE_FILE, CallLog, build_report
    from proxy.ca import CAError, expires_at, prepare_ca_for
    from proxy.identity import CredentialSource
    from proxy.mitm import StartupError
    from proxy.tokens import TokenCache

    try:
        # before any worker starts: N workers must not each generate a CA
        metrics.CA_EXPIRY.set(expires_at(prepare_ca_for(settings)))
        report_token = read_admin_token(settings.admin_token_file)
    except (CAError, AdminTokenError) as exc:
        raise StartupError(str(exc)) from None
    source = CredentialSource()
    tokens = TokenCache(source, expiry_margin=settings.token_margin,
                        wait_timeout=settings.token_timeout, forget=source.forget,
                        count_lookups=False)  # the workers count the lookups requests make
    collector = metrics.TokenExpiryCollector(tokens.peek, time.time)
    pod_only = [collector, metrics.WORKER_RESTARTS, metrics.WORKER_REQUESTS]
    for one in pod_only:
        metrics.REGISTRY.register(one)
    try:  # 0700; a short path: a Unix socket's path is limited to 107 bytes
        runtime_dir = Path(tempfile.mkdtemp(prefix="keyless-workers-"))
    except OSError:  # a read-only root filesystem: the confdir is writable
        runtime_dir = Path(tempfile.mkdtemp(prefix="workers-", dir=settings.confdir))
    supervisor = Supervisor(settings, argv, tokens, runtime_dir)
    state_file = settings.confdir / STATE_FILE
    admin = AdminServer(supervisor.health, *settings.admin,
                        report=lambda: build_report(CallLog(state_file).entries()),
                        report_token=report_token,
                        exposition=lambda: pod_metrics(supervisor.multiproc_dir))
    server = await supervisor.serve_workers()
    try:
        try:
            await admin.start()
        except OSError as exc:
            raise StartupError(
                f"cannot listen on admin address {settings.admin[0]}:{settings.admin[1]}: "
                f"{exc.strerror}") from None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.drain)
        logger.info("keyless supervisor: %d workers on %s:%s, admin on %s:%s",
                    settings.workers, *settings.listen, *settings.admin)
        keepers = [asyncio.create_task(supervisor.keep_running(worker))
                   for worker in supervisor.workers]
        await supervisor._stopping.wait()
        if supervisor.failed:
            supervisor.drain()
            await supervisor.wait_for_workers()
            raise StartupError(f"{supervisor.failed}; see its error above")
        code = await supervisor.wait_for_workers()
        for keeper in keepers:
            keeper.cancel()
        logger.info("all workers stopped")
        return code
    finally:
        server.close()
        await admin.stop()
        for one in pod_only:
            metrics.REGISTRY.unregister(one)
        await tokens.close()
        await source.close()
        shutil.rmtree(runtime_dir, ignore_errors=True)
