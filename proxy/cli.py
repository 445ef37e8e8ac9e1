"""The `keyless` command: `keyless run` serves; `keyless ca` prints the CA certificate."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy import __version__
from proxy.ca import CAError, prepare_ca_for
from proxy.config import ConfigError, Settings, add_flags, resolve
from proxy.dial import CheckedDialLoop
from proxy.logs import setup_logging
from proxy.transparent import transparent_rules


def ca_certificate(settings: Settings, replace: bool = True) -> bytes:
    """The public CA certificate in PEM, generating (or installing a supplied) CA first;
    `replace`: also replace a generated CA that does not fit the settings."""
    return prepare_ca_for(settings, replace).read_bytes()


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
    init = commands.add_parser(
        "init", help="prepare the CA and write its public certificate for the app, then exit "
        "(for an init container)")
    add_flags(init)
    init.add_argument("--ca-out", metavar="FILE", required=True,
                      help="where the app reads the CA certificate (e.g. a shared volume)")
    iptables = commands.add_parser(
        "iptables", help="print the iptables rules that send the pod's HTTPS to keyless in "
        "transparent mode (for a privileged init container)")
    add_flags(iptables)
    iptables.add_argument("--uid", type=int, default=10001,
                          help="keyless' own UID, whose traffic is exempted (default 10001)")
    check = commands.add_parser(
        "check", help="check the configuration, the identity's tokens, the upstreams (with a "
        "real login through each listener) and the CA files; exit non-zero on any failure")
    add_flags(check)
    report = commands.add_parser(
        "report", help="print the migration report from what keyless recorded in CONFDIR")
    add_flags(report)
    report.add_argument("--json", action="store_true", help="the report as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = resolve(args)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        if args.command == "ca":
            sys.stdout.buffer.write(ca_certificate(settings, replace=False))
            return 0
        if args.command == "init":
            out = Path(args.ca_out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(ca_certificate(settings))
            out.chmod(0o644)
            print(f"keyless: wrote the CA certificate to {out}", file=sys.stderr)
            return 0
    except CAError as exc:
        print(f"keyless: error: {exc}", file=sys.stderr)
        return 2
    if args.command == "iptables":
        print("\n".join(transparent_rules(settings.listen[1], args.uid,
                                          settings.transparent_listen[1],
                                          settings.transparent_databases)))
        return 0
    if args.command == "check":
        from proxy.check import main as check_main
        from proxy.mitm import default_identity

        # the findings say what failed; the credential chain's own narration is noise here
        setup_logging("error", settings.log_format)
        logging.getLogger("azure").setLevel(logging.ERROR)
        return check_main(settings, default_identity())
    if args.command == "report":
        return print_report(settings.confdir, as_json=args.json)
    return run(settings, sys.argv[1:] if argv is None else list(argv))


def print_report(confdir: Path, as_json: bool) -> int:
    from proxy.audit import STATE_FILE, CallLog, build_report, render_text

    report = build_report(CallLog(confdir / STATE_FILE).entries())
    print(json.dumps(report, indent=2) if as_json else render_text(report))
    return 0


def run(settings: Settings, argv: Sequence[str] = ()) -> int:
    from proxy.mitm import StartupError, serve
    from proxy.workers import WorkerRole, supervise

    worker = WorkerRole.from_environ()
    supervisor = worker is None and settings.workers > 1
    setup_logging(settings.log_level, settings.log_format,
                  worker="supervisor" if supervisor else worker and worker.worker_id)
    try:
        if supervisor:  # --workers N: it starts N processes like this one, as workers
            return asyncio.run(supervise(settings, argv))
        # mitmproxy's upstream connects resolve through this loop: it hands them the
        # addresses the dialer checked (proxy/dial.py); everything else resolves as usual.
        with asyncio.Runner(loop_factory=CheckedDialLoop) as runner:
            return runner.run(serve(settings, worker))
    except StartupError as exc:
        print(f"keyless: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
