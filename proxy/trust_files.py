"""The trust files `keyless init` writes next to the public CA certificate, for the app:

- a PEM bundle: the system's CAs plus keyless' CA, for runtimes whose CA setting *replaces*
  the defaults (SSL_CERT_FILE, REQUESTS_CA_BUNDLE);
- a PKCS#12 Java truststore with the same certificates (javax.net.ssl.trustStore), written in
  Python because the keyless image has no JDK (no keytool).

Public certificates only: nothing here is secret (the store's password is the customary
`changeit`, an integrity check, not a secret).
"""

from __future__ import annotations

import os
import re
import ssl
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12

DEFAULT_PASSWORD = "changeit"
FALLBACK_SYSTEM_CAS = "/etc/ssl/certs/ca-certificates.crt"


class TrustFileError(Exception):
    pass


def system_ca_file() -> Path:
    """The system CA bundle OpenSSL uses (Debian's ca-certificates in the image)."""
    return Path(ssl.get_default_verify_paths().cafile or FALLBACK_SYSTEM_CAS)


PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----",
                       re.S)


def _certificates(pem: bytes, where: str) -> list[x509.Certificate]:
    """Each PEM block on its own: one odd certificate in a distribution's bundle (a negative
    serial, which newer cryptography refuses) must not keep the pod from starting."""
    found = []
    for block in PEM_BLOCK.findall(pem):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                found.append(x509.load_pem_x509_certificate(block))
            except ValueError:
                continue
    if not found:
        raise TrustFileError(f"{where}: not a PEM certificate list (no certificate in it)")
    return found


def bundle(system_pem: bytes, ca_pem: bytes) -> bytes:
    """System CAs then keyless' CA, one PEM file (both parts checked to hold certificates)."""
    _certificates(system_pem, "system CAs")
    _certificates(ca_pem, "keyless CA")
    return system_pem.rstrip(b"\n") + b"\n" + ca_pem.lstrip(b"\n")


def java_truststore(system_pem: bytes, ca_pem: bytes,
                    password: str = DEFAULT_PASSWORD) -> bytes:
    """A PKCS#12 truststore (Java reads it as trusted certificate entries)."""
    certs = [(f"keyless-{n}", c) for n, c in
             enumerate(_certificates(ca_pem, "keyless CA"))]
    certs += [(f"system-{n}", c) for n, c in
              enumerate(_certificates(system_pem, "system CAs"))]
    entries = [pkcs12.PKCS12Certificate(cert, name.encode()) for name, cert in certs]
    return pkcs12.serialize_java_truststore(entries, BestAvailableEncryption(password.encode()))


def write_public(path: Path, data: bytes) -> None:
    """Atomically, world-readable: the app (another UID) reads it from the shared volume."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    tmp.replace(path)
