"""keyless' CA: generated in the confdir, or supplied (cert-manager, Key Vault, ...).

mitmproxy reads its CA from CONFDIR/mitmproxy-ca.pem (private key and certificate); apps
trust CONFDIR/mitmproxy-ca-cert.pem. The private key is never readable by group or others:
keyless refuses to start otherwise.

A generated CA has an ECDSA P-256 key (mitmproxy would make RSA-2048). mitmproxy signs every
certificate it shows an app with the CA's key and uses that key in every TLS handshake with
the app: ECDSA signs several times faster, which is most of the cost of an app that opens a
connection per request (docs/benchmarks.md). Every current TLS client supports it; supply an
RSA CA with --ca-cert/--ca-key for one that does not.
"""

from __future__ import annotations

import datetime
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


def generate_ca(confdir: Path, name: str = "keyless CA") -> None:
    """An ECDSA P-256 CA in mitmproxy's file layout, with mitmproxy's CA extensions."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keyless")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))  # clock skew, as mitmproxy
        .not_valid_after(now + datetime.timedelta(days=10 * 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pem_cert = cert.public_bytes(serialization.Encoding.PEM)
    _write(confdir / CA_KEY_AND_CERT, pem_key + pem_cert, 0o600)
    _write(confdir / CA_CERT, pem_cert, 0o644)


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
    elif not (confdir / CA_KEY_AND_CERT).exists():
        generate_ca(confdir)
    try:
        certs.CertStore.from_store(confdir, BASENAME, 2048)
    except (ValueError, OSError) as exc:
        raise CAError(f"cannot load or create the CA in {confdir}: {exc}") from None
    _check_private(confdir / CA_KEY_AND_CERT)
    return confdir / CA_CERT
