"""The CA keyless generates: ECDSA P-256 in mitmproxy's layout, usable by mitmproxy, and unable
to vouch for anything keyless does not intercept (Name Constraints, short validity)."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import certs

from proxy.ca import (
    CA_CERT,
    CA_KEY_AND_CERT,
    CAError,
    configured_zones,
    in_zone,
    leaf_certificate,
    prepare_ca,
)
from proxy.catalog import Catalog, builtin_services, fold_zones, host_pattern_zones
from proxy.cli import build_parser
from proxy.config import ConfigError, resolve
from proxy.routes import glob_to_regex

ZONES = Catalog().permitted_zones()
NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ca_key(confdir) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key((confdir / CA_KEY_AND_CERT).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def signer(confdir) -> x509.Certificate:
    """The signing CA: the first certificate of mitmproxy's key file."""
    return x509.load_pem_x509_certificates((confdir / CA_KEY_AND_CERT).read_bytes())[0]


def verify(confdir, leaf: x509.Certificate, host: str,
           when: datetime.datetime | None = None) -> None:
    """The app's view: trust the root only, get the signing CA from the server, and verify
    with RFC 5280 name constraints (cryptography's own verifier)."""
    verifier = (PolicyBuilder().store(Store([load(confdir / CA_CERT)])).time(
        when or datetime.datetime.now(datetime.UTC)).build_server_verifier(x509.DNSName(host)))
    verifier.verify(leaf, [signer(confdir)])


def test_generated_ca_is_ecdsa_p256_with_a_private_key_file(tmp_path) -> None:
    public = prepare_ca(tmp_path / "conf", zones=ZONES)
    assert public == tmp_path / "conf" / CA_CERT
    cert = load(public)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert stat.S_IMODE((tmp_path / "conf" / CA_KEY_AND_CERT).stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in public.read_bytes()


@pytest.mark.parametrize(("tier", "path_length"), [("root", 1), ("signer", 0)])
def test_generated_ca_is_constrained_to_the_catalog_zones_and_no_ip(tmp_path, tier,
                                                                     path_length) -> None:
    root = load(prepare_ca(tmp_path, zones=ZONES, validity_days=30, now=NOW))
    cert = root if tier == "root" else signer(tmp_path)
    extension = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert extension.critical
    permitted = {n.value for n in extension.value.permitted_subtrees}
    assert permitted == set(ZONES)
    assert all(isinstance(n, x509.DNSName) for n in extension.value.permitted_subtrees)
    assert {"blob.core.windows.net", "blob.core.chinacloudapi.cn",
            "blob.core.usgovcloudapi.net", "documents.azure.com"} <= permitted
    assert {n.value for n in extension.value.excluded_subtrees} == {
        ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")}
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == path_length
    assert cert.not_valid_after_utc == NOW + datetime.timedelta(days=30)
    assert cert.not_valid_before_utc == NOW - datetime.timedelta(days=2)


def test_only_the_signing_key_is_kept_the_root_key_is_gone(tmp_path) -> None:
    root = load(prepare_ca(tmp_path, zones=ZONES))
    key_file = (tmp_path / CA_KEY_AND_CERT).read_bytes()
    assert key_file.count(b"PRIVATE KEY-----") == 2  # one key: BEGIN and END
    assert ca_key(tmp_path).public_key() == signer(tmp_path).public_key()
    assert signer(tmp_path).public_key() != root.public_key()
    signer(tmp_path).verify_directly_issued_by(root)
    assert x509.load_pem_x509_certificates(key_file)[1] == root


def test_cryptography_verifier_accepts_zone_leaves_and_rejects_others(tmp_path) -> None:
    prepare_ca(tmp_path, zones=ZONES)
    key, ca = ca_key(tmp_path), signer(tmp_path)
    inside = leaf_certificate(key, ca, "account.blob.core.windows.net")
    verify(tmp_path, inside, "account.blob.core.windows.net")
    assert inside.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [
        "account.blob.core.windows.net"]
    with pytest.raises(VerificationError):
        verify(tmp_path, leaf_certificate(key, ca, "www.example.com"), "www.example.com")


def test_mitmproxy_issues_ecdsa_host_certificates_from_it(tmp_path) -> None:
    prepare_ca(tmp_path, zones=ZONES)
    store = certs.CertStore.from_store(tmp_path, "mitmproxy", 2048)
    entry = store.get_cert("account.blob.core.windows.net",
                           [x509.DNSName("account.blob.core.windows.net")])
    leaf = entry.cert.to_cryptography()
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    leaf.verify_directly_issued_by(signer(tmp_path))
    verify(tmp_path, leaf, "account.blob.core.windows.net")
    # What mitmproxy's leaf would be in transparent mode (SNI plus the destination IP): the
    # constraints reject it. That is why keyless replaces it (addons/leaf.py).
    with_ip = store.get_cert("account.blob.core.windows.net", [
        x509.DNSName("account.blob.core.windows.net"),
        x509.IPAddress(ipaddress.ip_address("20.60.1.1"))]).cert.to_cryptography()
    with pytest.raises(VerificationError):
        verify(tmp_path, with_ip, "account.blob.core.windows.net")


def test_a_fitting_ca_is_kept(tmp_path) -> None:
    prepare_ca(tmp_path, zones=ZONES, now=NOW)
    before = (tmp_path / CA_KEY_AND_CERT).read_bytes()
    prepare_ca(tmp_path, zones=ZONES, now=NOW + datetime.timedelta(days=19))
    assert (tmp_path / CA_KEY_AND_CERT).read_bytes() == before


@pytest.mark.parametrize(("change", "reason"), [
    ({"zones": (*ZONES, "contoso.internal")}, "does not permit contoso.internal"),
    ({"zones": ZONES[1:]}, f"permits zones no longer configured: {ZONES[0]}"),
    ({"now": NOW + datetime.timedelta(days=21)}, "expires on 2026-07-01"),
    ({"now": NOW + datetime.timedelta(days=31)}, "expired on 2026-07-01"),
    ({"validity_days": 7}, "more than --ca-validity 7"),
])
def test_a_ca_that_no_longer_fits_is_replaced_loudly(tmp_path, caplog, change, reason) -> None:
    prepare_ca(tmp_path, zones=ZONES, validity_days=30, now=NOW)
    before = signer(tmp_path)
    arguments = {"zones": ZONES, "validity_days": 30, "now": NOW} | change
    with caplog.at_level(logging.WARNING):
        root = load(prepare_ca(tmp_path, **arguments))
    after = signer(tmp_path)
    assert after.public_key() != before.public_key()
    after.verify_directly_issued_by(root)
    assert {n.value for n in after.extensions.get_extension_for_class(
        x509.NameConstraints).value.permitted_subtrees} == set(arguments["zones"])
    assert after.not_valid_after_utc == arguments["now"] + datetime.timedelta(
        days=arguments["validity_days"])
    message = caplog.text
    assert reason in message and "Apps must trust the new certificate" in message
    assert ca_key(tmp_path).public_key() == after.public_key()


def test_printing_never_replaces_a_ca(tmp_path, caplog) -> None:
    prepare_ca(tmp_path, zones=ZONES, now=NOW)
    before = (tmp_path / CA_KEY_AND_CERT).read_bytes()
    with caplog.at_level(logging.WARNING):
        prepare_ca(tmp_path, zones=ZONES[1:], now=NOW, replace=False)
    assert (tmp_path / CA_KEY_AND_CERT).read_bytes() == before
    assert "does not fit this configuration" in caplog.text


def test_an_unconstrained_ca_from_an_older_keyless_is_replaced(tmp_path, caplog) -> None:
    certs.CertStore.create_store(tmp_path, "mitmproxy", 2048)  # mitmproxy's own: no limits
    (tmp_path / CA_KEY_AND_CERT).chmod(0o600)
    with caplog.at_level(logging.WARNING):
        cert = load(prepare_ca(tmp_path, zones=ZONES))
    assert "no Name Constraints" in caplog.text
    assert cert.extensions.get_extension_for_class(x509.NameConstraints).critical


def test_a_one_tier_ca_or_a_foreign_public_file_is_replaced(tmp_path, caplog) -> None:
    prepare_ca(tmp_path, zones=ZONES)
    key_file = tmp_path / CA_KEY_AND_CERT
    signing = signer(tmp_path)
    key_file.write_bytes(key_file.read_bytes().split(b"-----END CERTIFICATE-----")[0]
                         + b"-----END CERTIFICATE-----\n")  # the signer alone
    with caplog.at_level(logging.WARNING):
        prepare_ca(tmp_path, zones=ZONES)
    assert "not a constrained root with a constrained signing CA" in caplog.text
    assert signer(tmp_path).public_key() != signing.public_key()
    caplog.clear()
    signing = signer(tmp_path)
    (tmp_path / CA_CERT).write_bytes(b"")  # apps would trust nothing
    with caplog.at_level(logging.WARNING):
        root = load(prepare_ca(tmp_path, zones=ZONES))
    assert "is not its root certificate" in caplog.text
    signer(tmp_path).verify_directly_issued_by(root)


def _supplied_ca(tmp_path, constraints: x509.NameConstraints | None,
                 days_left: int = 365) -> tuple:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator CA")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(1)
               .not_valid_before(now - datetime.timedelta(days=400))
               .not_valid_after(now + datetime.timedelta(days=days_left))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True))
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    cert_path, key_path = tmp_path / "ca.crt", tmp_path / "ca.key"
    cert_path.write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_a_supplied_ca_without_constraints_is_used_as_is_with_a_warning(tmp_path,
                                                                        caplog) -> None:
    cert_path, key_path = _supplied_ca(tmp_path, None, days_left=400)
    with caplog.at_level(logging.WARNING):
        public = prepare_ca(tmp_path / "conf", cert_path, key_path, zones=ZONES,
                            validity_days=1)
    assert public.read_bytes() == cert_path.read_bytes()  # never regenerated
    assert "has no X.509 Name Constraints" in caplog.text
    assert "blob.core.windows.net" in caplog.text


def test_a_supplied_ca_that_cannot_serve_the_configuration_is_refused(tmp_path) -> None:
    narrow = x509.NameConstraints(permitted_subtrees=[x509.DNSName("blob.core.windows.net")],
                                  excluded_subtrees=None)
    cert_path, key_path = _supplied_ca(tmp_path, narrow)
    with pytest.raises(CAError, match=r"do not permit .*documents\.azure\.com"):
        prepare_ca(tmp_path / "conf", cert_path, key_path, zones=ZONES)
    # the same CA is fine for a configuration inside its zone
    prepare_ca(tmp_path / "conf", cert_path, key_path, zones=("blob.core.windows.net",))
    excluding = x509.NameConstraints(permitted_subtrees=None,
                                     excluded_subtrees=[x509.DNSName("core.windows.net")])
    cert_path, key_path = _supplied_ca(tmp_path, excluding)
    with pytest.raises(CAError, match=r"do not permit .*blob\.core\.windows\.net"):
        prepare_ca(tmp_path / "conf", cert_path, key_path, zones=ZONES)
    ip_only = x509.NameConstraints(  # no DNS subtree: DNS names are not constrained
        permitted_subtrees=[x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))],
        excluded_subtrees=None)
    cert_path, key_path = _supplied_ca(tmp_path, ip_only)
    prepare_ca(tmp_path / "conf", cert_path, key_path, zones=ZONES)
    expired_cert, expired_key = _supplied_ca(tmp_path, None, days_left=-1)
    with pytest.raises(CAError, match="not now"):
        prepare_ca(tmp_path / "conf2", expired_cert, expired_key, zones=ZONES)


def test_leaves_never_outlive_the_ca(tmp_path) -> None:
    prepare_ca(tmp_path, zones=ZONES, validity_days=10, now=NOW)
    ca = signer(tmp_path)
    leaf = leaf_certificate(ca_key(tmp_path), ca, "a.queue.core.windows.net",
                            now=NOW + datetime.timedelta(days=5))
    assert leaf.not_valid_after_utc == ca.not_valid_after_utc
    assert leaf.not_valid_before_utc >= ca.not_valid_before_utc
    verify(tmp_path, leaf, "a.queue.core.windows.net", when=NOW + datetime.timedelta(days=9))


# The zones come from the catalog's own host patterns.

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_host_the_catalog_intercepts_is_inside_a_permitted_zone(data) -> None:
    catalog = Catalog(builtin_services(keyvault_swap_bearer=True))
    zones = catalog.permitted_zones()
    service = data.draw(st.sampled_from(catalog.services))
    host = data.draw(st.from_regex(service.host_pattern, fullmatch=True))
    assert catalog.intercepts(host)
    assert any(in_zone(host, zone) for zone in zones), (host, zones)


def test_zones_are_narrow() -> None:
    assert "core.windows.net" not in ZONES and "azure.com" not in ZONES
    assert "microsoft.com" not in ZONES and "atlas.microsoft.com" in ZONES
    assert all(zone.count(".") >= 1 for zone in ZONES)
    assert "vault.azure.net" not in ZONES  # Key Vault is intercepted only when configured
    assert "vault.azure.net" in Catalog(builtin_services(
        keyvault_swap_bearer=True)).permitted_zones()


@pytest.mark.parametrize(("host", "zones"), [
    ("storage-*.contoso.internal", {"contoso.internal"}),  # * inside a label: parent zone
    ("*.blob.contoso.internal", {"blob.contoso.internal"}),
    ("api.contoso.internal", {"api.contoso.internal"}),
])
def test_route_hosts_give_their_zone(host, zones) -> None:
    assert host_pattern_zones(glob_to_regex(host)) == zones


def test_a_route_for_a_whole_top_level_domain_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="two labels"):
        host_pattern_zones(glob_to_regex("*.com"))
    config = tmp_path / "k.toml"
    config.write_text('[[route]]\nhost = "*.internal"\nservice = "storage-blob"\n')
    settings_ = resolve(build_parser().parse_args(["run", "--config", str(config)]), {})
    with pytest.raises(CAError, match="two labels"):
        configured_zones(settings_)


def test_configured_zones_add_routes_and_fold_subzones(tmp_path) -> None:
    config = tmp_path / "k.toml"
    config.write_text('[[route]]\nhost = "storage-*.contoso.internal"\nservice = "storage-blob"\n'
                      '[[route]]\nhost = "x.y.contoso.internal"\nservice = "storage-blob"\n')
    args = build_parser().parse_args(["run", "--config", str(config),
                                      "--reverse", "8081=https://acct.blob.core.windows.net"])
    zones = configured_zones(resolve(args, {}))
    assert set(zones) == set(ZONES) | {"contoso.internal"}
    assert fold_zones(["a.b.c", "b.c", "x.c"]) == ("b.c", "x.c")


def test_ca_validity_flag() -> None:
    args = build_parser().parse_args(["run"])
    assert resolve(args, {}).ca_validity == 90
    assert resolve(args, {"KEYLESS_CA_VALIDITY": "7"}).ca_validity == 7
    with pytest.raises(ConfigError, match="1 to 3650"):
        resolve(build_parser().parse_args(["run", "--ca-validity", "0"]), {})
