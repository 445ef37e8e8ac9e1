"""The `keyless` command: `keyless run` serves; `keyless ca` prints the CA certificate."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy import __version__
from proxy.config import ConfigError, Settings, add_flags, resolve
from proxy.connect_to import ConnectToEventLoop, ConnectToTable

CA_BASENAME = "mitmproxy"


def ca_certificate(confdir: Path) -> bytes:
    """The public CA certificate in PEM, generating the CA on first use."""
    from mitmproxy import certs  # imported late: `keyless --help` stays fast

    certs.CertStore.from_store(confdir, CA_BASENAME, 2048)
    return (confdir / f"{CA_BASENAME}-ca-cert.pem").read_bytes()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level != "debug":
        # mitmproxy narrates every connection at info level; keep keyless' own lines readable.
        logging.getLogger("mitmproxy").setLevel(logging.WARNING)
        # azure-identity logs every successful token call at info level.
        logging.getLogger("azure").setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyless",
        description="Sidecar proxy that makes legacy apps passwordless on Azure.",
    )
    parser.add_argument("--version", action="version", version=f"keyless {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the proxy and the admin server")
    add_flags(run)
    ca = commands.add_parser("ca", help="print the CA certificate (PEM) apps must trust")
    add_flags(ca)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = resolve(args)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.command == "ca":
        sys.stdout.buffer.write(ca_certificate(settings.confdir))
        return 0
    return run(settings)


def run(settings: Settings) -> int:
    from proxy.mitm import StartupError, serve

    setup_logging(settings.log_level)
    table = ConnectToTable(settings.connect_to)

    def loop_factory() -> asyncio.AbstractEventLoop:
        loop = ConnectToEventLoop()
        loop.connect_to = table
        return loop

    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(serve(settings))
    except StartupError as exc:
        print(f"keyless: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
