"""The CA keyless generates: ECDSA P-256 in mitmproxy's layout, usable by mitmproxy."""

from __future__ import annotations

import stat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from mitmproxy import certs

from proxy.ca import CA_CERT, CA_KEY_AND_CERT, prepare_ca


def test_generated_ca_is_ecdsa_p256_with_a_private_key_file(tmp_path) -> None:
    public = prepare_ca(tmp_path / "conf")
    assert public == tmp_path / "conf" / CA_CERT
    cert = x509.load_pem_x509_certificate(public.read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert stat.S_IMODE((tmp_path / "conf" / CA_KEY_AND_CERT).stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in public.read_bytes()


def test_mitmproxy_issues_ecdsa_host_certificates_from_it(tmp_path) -> None:
    prepare_ca(tmp_path)
    store = certs.CertStore.from_store(tmp_path, "mitmproxy", 2048)
    entry = store.get_cert("account.blob.core.windows.net", [])
    leaf = entry.cert.to_cryptography()
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    ca = x509.load_pem_x509_certificate((tmp_path / CA_CERT).read_bytes())
    leaf.verify_directly_issued_by(ca)


def test_an_existing_ca_is_kept(tmp_path) -> None:
    prepare_ca(tmp_path)
    before = (tmp_path / CA_KEY_AND_CERT).read_bytes()
    prepare_ca(tmp_path)
    assert (tmp_path / CA_KEY_AND_CERT).read_bytes() == before
