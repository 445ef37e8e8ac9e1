"""`keyless webhook`: its flags (each also KEYLESS_WEBHOOK_<FLAG>) and its main."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from proxy.config import parse_host_port, parse_log_format, parse_log_level

WEBHOOK_FLAGS = (
    ("listen", "HOST:PORT", "0.0.0.0:8443", "Where the HTTPS server listens (/mutate, "
     "/healthz, /readyz)."),
    ("tls-cert", "FILE", "/etc/keyless-webhook/tls/tls.crt", "The serving certificate (PEM)."),
    ("tls-key", "FILE", "/etc/keyless-webhook/tls/tls.key", "Its private key (PEM)."),
    ("tls-reload-interval", "SECONDS", "10", "How often, at most, the certificate files are "
     "checked for a new pair."),
    ("config", "FILE", "/etc/keyless-webhook/config.yaml", "The injection defaults (YAML or "
     "JSON; optional)."),
    ("shutdown-delay", "SECONDS", "5", "On SIGTERM, fail /readyz and keep serving this long "
     "before exiting (so no review reaches a stopped webhook)."),
    ("log-level", "LEVEL", "info", "debug, info, warning or error."),
    ("log-format", "FORMAT", "json", "json or text."),
)


def env_name(flag: str) -> str:
    return "KEYLESS_WEBHOOK_" + flag.upper().replace("-", "_")


def add_webhook_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "webhook", help="run the Kubernetes mutating admission webhook that injects keyless "
        "into pods annotated keyless.io/inject: \"true\"")
    for name, metavar, default, text in WEBHOOK_FLAGS:
        parser.add_argument(f"--{name}", metavar=metavar, default=None,
                            help=f"{text} (env: {env_name(name)}; default: {default})")


def setting(args: argparse.Namespace, name: str, environ: Mapping[str, str]) -> str:
    value = getattr(args, name.replace("-", "_"), None)
    if value is None:
        value = environ.get(env_name(name), "").strip() or None
    return value if value is not None else next(d for n, _, d, _ in WEBHOOK_FLAGS if n == name)


def main(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    from proxy.k8s.defaults import DefaultsError, load_defaults
    from proxy.k8s.server import CertificateError, ReloadingCertificate, serve
    from proxy.logs import setup_logging

    try:
        listen = parse_host_port(setting(args, "listen", environ))
        interval = float(setting(args, "tls-reload-interval", environ))
        if not 0 < interval <= 3600:
            raise ValueError("--tls-reload-interval must be in (0, 3600] seconds")
        delay = float(setting(args, "shutdown-delay", environ))
        if not 0 <= delay <= 300:
            raise ValueError("--shutdown-delay must be in [0, 300] seconds")
        level = parse_log_level(setting(args, "log-level", environ))
        log_format = parse_log_format(setting(args, "log-format", environ))
        config = Path(setting(args, "config", environ))
        # a config path given explicitly must exist; the default one is optional
        explicit = args.config is not None or bool(environ.get(env_name("config"), "").strip())
        defaults = load_defaults(config, environ, required=explicit)
        certificate = ReloadingCertificate(Path(setting(args, "tls-cert", environ)),
                                           Path(setting(args, "tls-key", environ)), interval)
    except (ValueError, DefaultsError, CertificateError) as exc:
        print(f"keyless webhook: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(level, log_format)
    try:
        serve(listen, certificate, defaults, delay)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"keyless webhook: error: cannot listen on {listen[0]}:{listen[1]}: {exc}",
              file=sys.stderr)
        return 2
    return 0
