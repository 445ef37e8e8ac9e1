"""keyless' CA: generated in the confdir, or supplied (cert-manager, Key Vault, ...).

mitmproxy reads its CA from CONFDIR/mitmproxy-ca.pem (private key and certificate); apps
trust CONFDIR/mitmproxy-ca-cert.pem. The private key is never readable by group or others:
keyless refuses to start otherwise.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

BASENAME = "mitmproxy"
CA_KEY_AND_CERT = f"{BASENAME}-ca.pem"
CA_CERT = f"{BASENAME}-ca-cert.pem"


class CAError(Exception):
    pass


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CAError(
            f"the CA private key {path} is readable by others (mode {mode:o}): "
            f"run `chmod 600 {path}`; keyless will not use a key others can read"
        )


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def prepare_ca(confdir: Path, ca_cert: Path | None = None, ca_key: Path | None = None) -> Path:
    """Make sure the confdir holds a usable CA; return the public certificate's path."""
    from mitmproxy import certs  # imported late: `keyless --help` stays fast

    confdir.mkdir(parents=True, exist_ok=True)
    if (ca_cert is None) != (ca_key is None):
        raise CAError("give both --ca-cert and --ca-key, or neither")
    if ca_cert is not None and ca_key is not None:
        try:
            _check_private(ca_key)
            key, cert = ca_key.read_bytes(), ca_cert.read_bytes()
        except OSError as exc:
            raise CAError(f"cannot read the supplied CA: {exc.strerror}: {exc.filename}") \
                from None
        if b"PRIVATE KEY" not in key or b"CERTIFICATE" not in cert:
            raise CAError("--ca-key must be a PEM private key and --ca-cert a PEM certificate")
        _write(confdir / CA_KEY_AND_CERT, key.rstrip() + b"\n" + cert, 0o600)
        _write(confdir / CA_CERT, cert, 0o644)
    try:
        certs.CertStore.from_store(confdir, BASENAME, 2048)
    except (ValueError, OSError) as exc:
        raise CAError(f"cannot load or create the CA in {confdir}: {exc}") from None
    _check_private(confdir / CA_KEY_AND_CERT)
    return confdir / CA_CERT
