"""The certificate an app sees: one DNS name, its own host, within the CA's validity.

mitmproxy's leaf names the SNI and also the server address (an IP in transparent mode) and,
with an eager connection strategy, every name of the upstream certificate. keyless' CA
carries Name Constraints (proxy/ca.py): a leaf naming an IP or a host outside the permitted
zones would make the app reject the whole chain. So, after mitmproxy's TlsConfig has built the
connection, the certificate is replaced by one for the app's host alone, from the same CA key
pair (mitmproxy's leaves use the CA's key too, so the private key in place still matches).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from pathlib import Path

from cachetools import LRUCache
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import tls
from OpenSSL import crypto

from proxy.ca import leaf_certificate

logger = logging.getLogger(__name__)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class OneNameLeaves:
    """Must come after mitmproxy's TlsConfig (it replaces the certificate TlsConfig set)."""

    def __init__(self, ca_file: Path) -> None:
        self.ca_file = ca_file
        self._ca: tuple[object, x509.Certificate] | None = None
        # per host: the leaf, converted once for pyOpenSSL
        self._leaves: LRUCache[str, tuple[x509.Certificate, crypto.X509]] = LRUCache(1024)

    def _load_ca(self) -> tuple[object, x509.Certificate]:
        if self._ca is None:
            raw = self.ca_file.read_bytes()
            self._ca = (serialization.load_pem_private_key(raw, None),
                        x509.load_pem_x509_certificate(raw))
        return self._ca

    def leaf(self, host: str) -> tuple[x509.Certificate, crypto.X509]:
        now = datetime.datetime.now(datetime.UTC)
        cached = self._leaves.get(host)
        if cached is None or cached[0].not_valid_after_utc <= now:
            key, ca = self._load_ca()
            cert = leaf_certificate(key, ca, host, now)  # type: ignore[arg-type]
            cached = self._leaves[host] = (cert, crypto.X509.from_cryptography(cert))
        return cached

    def tls_start_client(self, tls_start: tls.TlsData) -> None:
        if tls_start.ssl_conn is None or tls_start.is_dtls:
            return
        context = tls_start.context
        host = context.client.sni
        if not host and context.server.address and not _is_ip(context.server.address[0]):
            host = context.server.address[0]  # reverse mode, an app that sends no SNI
        if not host or _is_ip(host):
            return  # no name to certify: mitmproxy's leaf stays (and the app rejects it)
        tls_start.ssl_conn.use_certificate(self.leaf(host.lower().rstrip("."))[1])
