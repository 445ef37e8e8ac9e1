"""`keyless check`: everything keyless needs, tried once, with one line per finding.

For an init container or CI (like cloud-sql-proxy's --run-connection-test): the effective
configuration (flags, environment and file merged; secrets redacted), a token for every
configured scope and listener, a verified TLS connection to each route's and reverse
target's host, a real login through every database/cache listener, and the CA files and
their permissions. Exit status 0 only when every check passed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from proxy.audit import CallLog
from proxy.ca import CA_CERT, CA_KEY_AND_CERT, CAError, _check_private, configured_zones
from proxy.config import FLAGS, Settings
from proxy.connect_to import ConnectToTable
from proxy.dial import AppDialer
from proxy.identity import CredentialSource
from proxy.listeners import probe
from proxy.listeners.connection import ClientTLS, Shared
from proxy.listeners.server import Listener
from proxy.listeners.spec import ListenerSpec
from proxy.listeners.upstream import UpstreamDialer, UpstreamError, upstream_tls_context
from proxy.redact import redact
from proxy.tokens import Identity, TokenCache, TokenUnavailable

SECRET_FLAGS = {"proxy-auth"}


@dataclass(frozen=True, slots=True)
class Finding:
    ok: bool
    what: str
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.what}: {self.detail}"


def effective_configuration(settings: Settings) -> list[str]:
    lines = []
    for flag in FLAGS:
        value = getattr(settings, flag.attr)
        if flag.name in SECRET_FLAGS and value:
            shown = "<redacted>"
        elif flag.name in ("listen", "admin"):
            shown = _show(value)
        elif isinstance(value, tuple):
            shown = ", ".join(_show(item) for item in value) or "none"
        else:
            shown = _show(value)
        lines.append(f"  {flag.name} = {shown}")
    for spec in settings.listeners:
        lines.append(f"  listener {spec.name}: {spec.listen[0]}:{spec.listen[1]} -> "
                     f"{spec.upstream[0]}:{spec.upstream[1]} (identity {spec.identity.label}"
                     f"{', user ' + spec.user if spec.user else ''}"
                     f"{', TLS to the app' if spec.client_tls else ''})")
    for service in settings.routes:
        lines.append(f"  route {service.name}: {service.host_pattern} scope {service.scope}")
    return lines


def _show(value: object) -> str:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return f"{value[0]}:{value[1]}"
    if dataclasses.is_dataclass(value):
        return ":".join(str(part or "") for part in dataclasses.astuple(value))  # type: ignore[arg-type]
    return str(value) if value not in (None, "") else "none"


def exact_host(pattern: str) -> str | None:
    """A route's host when it names one host (no wildcard), else None."""
    plain = pattern.replace(r"\.", ".").replace(r"\-", "-")
    return plain if re.fullmatch(r"[a-z0-9.-]+", plain) else None


def check_ca(settings: Settings) -> list[Finding]:
    findings = []
    if settings.ca_cert or settings.ca_key:
        for path, what in ((settings.ca_cert, "--ca-cert"), (settings.ca_key, "--ca-key")):
            if path is None or not path.is_file():
                findings.append(Finding(False, "ca", f"{what} {path or '(missing)'} is not a "
                                                     "readable file"))
        if settings.ca_key and settings.ca_key.is_file():
            findings.append(_private(settings.ca_key))
        return findings
    key_file = settings.confdir / CA_KEY_AND_CERT
    if not key_file.exists():
        return [Finding(True, "ca", f"none in {settings.confdir} yet: `keyless run` or "
                                     "`keyless init` generates it")]
    findings.append(_private(key_file))
    try:
        from cryptography import x509

        from proxy.ca import _now, stale_reasons

        chain = x509.load_pem_x509_certificates(key_file.read_bytes())
        reasons = stale_reasons(chain, configured_zones(settings), settings.ca_validity, _now())
    except (ValueError, CAError) as exc:
        return [*findings, Finding(False, "ca", f"cannot read {key_file}: {exc}")]
    public = settings.confdir / CA_CERT
    findings.append(Finding(public.is_file(), "ca",
                            f"apps trust {public}" if public.is_file() else f"{public} missing"))
    findings.append(Finding(not reasons, "ca", "fits this configuration" if not reasons
                            else "keyless run will replace it: " + "; ".join(reasons)))
    return findings


def _private(path: Path) -> Finding:
    try:
        _check_private(path)
    except CAError as exc:
        return Finding(False, "ca", str(exc))
    return Finding(True, "ca", f"{path} is private (mode {path.stat().st_mode & 0o777:o})")


def token_keys(settings: Settings, default: Identity) -> list[tuple[Identity, str]]:
    keys: list[tuple[Identity, str]] = [(default, scope) for scope in settings.ready_scopes]
    for service in settings.routes:
        if "{" not in service.scope and service.scope.startswith(("https://", "api://")):
            keys.append((service.identity or default, service.scope))
    for spec in settings.listeners:
        keys.append((spec.identity if spec.identity.client_id else default, spec.scope))
    return list(dict.fromkeys(keys))


async def check_tokens(tokens: TokenCache, keys: list[tuple[Identity, str]]) -> list[Finding]:
    findings = []
    for identity, scope in keys:
        what = f"token {scope} (identity {identity.label})"
        try:
            token = await tokens.get_token(identity, scope)
        except TokenUnavailable as exc:
            findings.append(Finding(False, what, str(exc)))
            continue
        import time

        findings.append(Finding(True, what, f"valid for {int(token.expires_on - time.time())}s"))
    return findings


async def check_hosts(dialer: UpstreamDialer, hosts: list[str]) -> list[Finding]:
    findings = []
    for host in hosts:
        try:
            _, writer = await dialer.open(host, 443, tls=True)
            writer.close()
            findings.append(Finding(True, f"dial {host}:443", "TLS verified"))
        except UpstreamError as exc:
            findings.append(Finding(False, f"dial {host}:443", str(exc)))
    return findings


async def check_listener(spec: ListenerSpec, shared: Shared) -> Finding:
    what = f"listener {spec.name} -> {spec.upstream[0]}:{spec.upstream[1]}"
    if spec.protocol == "amqp":  # put-tokens are per entity: nothing to log in to yet
        try:
            _, writer = await shared.dialer.open(*spec.upstream, tls=True)
            writer.close()
        except UpstreamError as exc:
            return Finding(False, what, str(exc))
        return Finding(True, what, "TLS verified (put-tokens are per entity: the token check "
                                   "above covers them)")
    if spec.protocol in ("postgres", "mysql") and not spec.user:
        reason = await _tls_only(spec, shared.dialer)
        return Finding(reason is None, what, reason or (
            "TLS verified; login not tried: the app names the user (set ?user= to try it)"))
    listener = Listener(dataclasses.replace(spec, listen=("127.0.0.1", 0)), shared)
    try:
        await listener.start()
        assert listener._server is not None
        port = listener._server.sockets[0].getsockname()[1]
        streams = await asyncio.open_connection("127.0.0.1", port)
        if spec.protocol == "postgres":
            login = probe.postgres(streams, spec.user or "")
        elif spec.protocol == "mysql":
            login = probe.mysql(streams, spec.user or "")
        else:
            login = probe.redis(streams)
        reason = await asyncio.wait_for(login, probe.PROBE_TIMEOUT)
        streams[1].close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        reason = f"no answer from the login ({type(exc).__name__})"
    finally:
        await listener.stop()
    return Finding(reason is None, what, "logged in with the token" if reason is None
                   else redact(reason, limit=300))


async def _tls_only(spec: ListenerSpec, dialer: UpstreamDialer) -> str | None:
    """Dial and upgrade to verified TLS the protocol's way, without logging in."""
    try:
        reader, writer = await dialer.open(*spec.upstream, tls=False)
        if spec.protocol == "postgres":
            writer.write(struct.pack("!ii", 8, 80877103))  # SSLRequest
            await writer.drain()
            if await reader.readexactly(1) != b"S":
                return "the server does not offer TLS"
        else:
            header = await reader.readexactly(4)
            greeting = await reader.readexactly(int.from_bytes(header[:3], "little"))
            if greeting[:1] == b"\xff":
                return "the server refused the connection: " + greeting[9:].decode(
                    "utf-8", "replace")
            flags = 0x00000200 | 0x00008000 | 0x00000800  # PROTOCOL_41 | SECURE | SSL
            payload = struct.pack("<IIB", flags, 1 << 24, 45) + b"\0" * 23
            writer.write(struct.pack("<I", len(payload))[:3] + bytes([header[3] + 1]) + payload)
            await writer.drain()
        await dialer.start_tls(writer, spec.upstream[0])
        writer.close()
    except UpstreamError as exc:
        return str(exc)
    except (OSError, asyncio.IncompleteReadError) as exc:
        return f"connection failed ({type(exc).__name__})"
    return None


async def run_checks(settings: Settings, default: Identity) -> list[Finding]:
    findings = check_ca(settings)
    source = CredentialSource()
    tokens = TokenCache(source, expiry_margin=settings.token_margin,
                        wait_timeout=settings.token_timeout)
    try:
        findings += await check_tokens(tokens, token_keys(settings, default))
        try:
            trust = upstream_tls_context(settings.set)
        except UpstreamError as exc:
            return [*findings, Finding(False, "upstream trust", str(exc))]
        from addons.guard import DenyDestinations

        guard = DenyDestinations(settings.deny_networks)
        dialer = UpstreamDialer(AppDialer(ConnectToTable(settings.connect_to), guard.denied),
                                trust)
        hosts = [host for _, host in settings.reverse]
        hosts += [h for service in settings.routes if (h := exact_host(service.host_pattern))]
        findings += await check_hosts(dialer, list(dict.fromkeys(hosts)))
        shared = Shared(tokens, dialer, CallLog(None),
                        ClientTLS(settings.confdir / CA_KEY_AND_CERT))
        for spec in settings.listeners:
            if not spec.identity.client_id:
                spec = dataclasses.replace(spec, identity=default)
            findings.append(await check_listener(spec, shared))
    finally:
        await tokens.close()
        await source.close()
    return findings


def main(settings: Settings, default: Identity, out: TextIO = sys.stdout) -> int:
    print("keyless check: effective configuration", file=out)
    print("\n".join(effective_configuration(settings)), file=out)
    findings = asyncio.run(run_checks(settings, default))
    for finding in findings:
        print(finding.line(), file=out)
    failed = [finding for finding in findings if not finding.ok]
    print(f"keyless check: {len(findings) - len(failed)} ok, {len(failed)} failed", file=out)
    return 1 if failed else 0
