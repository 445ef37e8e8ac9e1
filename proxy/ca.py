"""keyless' CA: generated in the confdir, or supplied (cert-manager, Key Vault, ...).

mitmproxy reads its CA from CONFDIR/mitmproxy-ca.pem (private key, certificate, then the rest
of the chain); apps trust CONFDIR/mitmproxy-ca-cert.pem. The private key is never readable by
group or others: keyless refuses to start otherwise.

A generated CA has an ECDSA P-256 key (mitmproxy would make RSA-2048). mitmproxy signs every
certificate it shows an app with the CA's key and uses that key in every TLS handshake with
the app: ECDSA signs several times faster, which is most of the cost of an app that opens a
connection per request (docs/benchmarks.md). Every current TLS client supports it; supply an
RSA CA with --ca-cert/--ca-key for one that does not.

A generated CA cannot be misused beyond what keyless intercepts: critical X.509 Name
Constraints permit only the catalog's DNS zones (plus routes and reverse targets) and exclude
every IP address, and it is valid for --ca-validity days. It is two-tier (a root whose key is
dropped, and the signing CA keyless keeps) because Java ignores constraints on a trust anchor.
At start keyless makes a new one when the configured zones changed or the CA is in the last
third of its validity. A supplied CA is
never replaced: keyless refuses one that is expired or excludes a configured zone and warns
about one without constraints.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

    from proxy.config import Settings

logger = logging.getLogger(__name__)

BASENAME = "mitmproxy"
CA_KEY_AND_CERT = f"{BASENAME}-ca.pem"
CA_CERT = f"{BASENAME}-ca-cert.pem"
DEFAULT_VALIDITY_DAYS = 90
CLOCK_SKEW = datetime.timedelta(days=2)  # a CA valid from two days ago, as mitmproxy does
# Leaves keyless shows apps: as long as mitmproxy's (199 days), never past the CA's end.
LEAF_VALIDITY = datetime.timedelta(days=199)
# No IP address is ever a keyless name: a leaked key must not mint certificates for one.
EXCLUDED_NETWORKS = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


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


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def name_constraints(zones: Iterable[str]) -> x509.NameConstraints:
    """Permit these DNS zones (and their subdomains) only; exclude every IP address."""
    from cryptography import x509

    return x509.NameConstraints(
        permitted_subtrees=[x509.DNSName(zone) for zone in sorted(set(zones))],
        excluded_subtrees=[x509.IPAddress(net) for net in EXCLUDED_NETWORKS],
    )


def _ca_certificate(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                    issuer_key: ec.EllipticCurvePrivateKey, path_length: int,
                    zones: Sequence[str], not_before: datetime.datetime,
                    not_after: datetime.datetime) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(name_constraints(zones), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
    )
    if issuer_key is not key:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def generate_ca(confdir: Path, zones: Sequence[str], validity_days: float,
                name: str = "keyless CA", now: datetime.datetime | None = None) -> None:
    """A two-tier ECDSA P-256 CA in mitmproxy's file layout, both certificates with Name
    Constraints for `zones`, valid for `validity_days`.

    Apps trust the root; the root's key signs the signing CA and is then dropped, never
    written anywhere. Two tiers because Java (and RFC 5280 allows it) ignores constraints
    on a trust anchor but enforces them on an intermediate; and with the root key gone, even
    the confdir's key cannot issue anything the signing CA's constraints forbid.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if not zones:
        raise CAError("no DNS zone to permit: keyless' CA would be unconstrained")
    now = now or _now()
    window = (now - CLOCK_SKEW, now + datetime.timedelta(days=validity_days))
    root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keyless")])
    signer_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} (signing)"),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keyless")])
    # path length: the root one CA below it (the signer), the signer leaves only
    root = _ca_certificate(root_name, root_key, root_name, root_key, 1, zones, *window)
    signer = _ca_certificate(signer_name, key, root_name, root_key, 0, zones, *window)
    del root_key  # never stored: nothing can sign another CA under this root
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pem_root = root.public_bytes(serialization.Encoding.PEM)
    pem_signer = signer.public_bytes(serialization.Encoding.PEM)
    # mitmproxy signs with the first certificate and sends the rest as the chain
    _write(confdir / CA_KEY_AND_CERT, pem_key + pem_signer + pem_root, 0o600)
    _write(confdir / CA_CERT, pem_root, 0o644)


def in_zone(name: str, zone: str) -> bool:
    """RFC 5280 DNS name constraint matching: the zone itself or any name below it."""
    name, zone = name.lower().rstrip("."), zone.lower().lstrip(".")
    return name == zone or name.endswith("." + zone)


def _constraints(cert: x509.Certificate) -> x509.NameConstraints | None:
    from cryptography import x509

    try:
        return cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None


def _dns(subtrees: Iterable[x509.GeneralName] | None) -> set[str]:
    from cryptography import x509

    return {str(n.value).lower() for n in subtrees or () if isinstance(n, x509.DNSName)}


def renew_before(validity_days: float) -> datetime.timedelta:
    """Renew in the last third of the validity: a pod restarted weekly never meets an expiry."""
    return datetime.timedelta(days=validity_days) / 3


def stale_reasons(chain: Sequence[x509.Certificate], zones: Sequence[str],
                  validity_days: float, now: datetime.datetime) -> list[str]:
    """Why a generated CA (signing CA, root) no longer fits the configuration ([] when it
    does)."""
    reasons = []
    cert = chain[0]
    constraints = _constraints(cert)
    if constraints is None:
        return ["it has no Name Constraints (made by an older keyless)"]
    if len(chain) != 2 or _constraints(chain[1]) != constraints:
        return ["it is not a constrained root with a constrained signing CA"]
    permitted = _dns(constraints.permitted_subtrees)
    if missing := sorted(set(zones) - permitted):
        reasons.append(f"it does not permit {', '.join(missing)}")
    if extra := sorted(permitted - set(zones)):
        reasons.append(f"it permits zones no longer configured: {', '.join(extra)}")
    excluded = {n.value for n in constraints.excluded_subtrees or ()}
    if not set(EXCLUDED_NETWORKS) <= excluded:
        reasons.append("it does not exclude IP addresses")
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    if lifetime > datetime.timedelta(days=validity_days) + CLOCK_SKEW:
        reasons.append(f"it is valid for {lifetime.days} days, more than --ca-validity "
                       f"{validity_days:g}")
    left = cert.not_valid_after_utc - now
    if left <= datetime.timedelta(0):
        reasons.append(f"it expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    elif left < renew_before(validity_days):
        reasons.append(f"it expires on {cert.not_valid_after_utc:%Y-%m-%d}")
    if cert.not_valid_before_utc > now:
        reasons.append("it is not valid yet (clock change?)")
    return reasons


def _same_file(path: Path, cert: x509.Certificate) -> bool:
    from cryptography.hazmat.primitives import serialization

    try:
        return path.read_bytes() == cert.public_bytes(serialization.Encoding.PEM)
    except OSError:
        return False


def check_supplied(cert: x509.Certificate, zones: Sequence[str],
                   now: datetime.datetime) -> None:
    """A supplied CA is the operator's: refuse what cannot work, warn about what is unsafe."""
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise CAError(f"the supplied CA (--ca-cert) is valid from "
                      f"{cert.not_valid_before_utc:%Y-%m-%d} to "
                      f"{cert.not_valid_after_utc:%Y-%m-%d}, not now: give a current one")
    constraints = _constraints(cert)
    if constraints is None:
        logger.warning(
            "the supplied CA (--ca-cert) has no X.509 Name Constraints: whoever obtains its "
            "key can impersonate any site to the apps that trust it. Issue it with permitted "
            "DNS subtrees %s and excluded IP ranges 0.0.0.0/0 and ::/0", ", ".join(zones))
    else:
        permitted = _dns(constraints.permitted_subtrees)
        excluded = _dns(constraints.excluded_subtrees)
        # no DNS subtree among the permitted ones leaves DNS names unconstrained (RFC 5280)
        refused = [zone for zone in zones
                   if (permitted and not any(in_zone(zone, p) for p in permitted))
                   or any(in_zone(zone, e) or in_zone(e, zone) for e in excluded)]
        if refused:
            raise CAError(f"the supplied CA (--ca-cert) has Name Constraints that do not "
                          f"permit {', '.join(refused)}: apps would reject keyless' "
                          "certificates for them. Reissue it or change the configuration")
    left = cert.not_valid_after_utc - now
    if left < datetime.timedelta(days=7):
        logger.warning("the supplied CA (--ca-cert) expires on %s: rotate it and restart "
                       "keyless", f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def prepare_ca(confdir: Path, ca_cert: Path | None = None, ca_key: Path | None = None, *,
               zones: Sequence[str], validity_days: float = DEFAULT_VALIDITY_DAYS,
               replace: bool = True, now: datetime.datetime | None = None) -> Path:
    """Make sure the confdir holds a usable CA for these DNS zones; return the public
    certificate's path. A generated CA that no longer fits is replaced (loudly), unless
    `replace` is false (`keyless ca` only prints: it must not pull the CA from under a
    running keyless that has another configuration)."""
    from cryptography import x509
    from mitmproxy import certs  # imported late: `keyless --help` stays fast

    now = now or _now()
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
        try:
            check_supplied(x509.load_pem_x509_certificate(cert), zones, now)
        except ValueError:
            raise CAError("--ca-cert is not a readable PEM certificate") from None
        _write(confdir / CA_KEY_AND_CERT, key.rstrip() + b"\n" + cert, 0o600)
        _write(confdir / CA_CERT, cert, 0o644)
    elif not (confdir / CA_KEY_AND_CERT).exists():
        generate_ca(confdir, zones, validity_days, now=now)
        logger.info("generated keyless' CA in %s, valid until %s, for %d DNS zones", confdir,
                    f"{now + datetime.timedelta(days=validity_days):%Y-%m-%d}", len(zones))
    else:
        _check_private(confdir / CA_KEY_AND_CERT)
        try:
            existing = x509.load_pem_x509_certificates(
                (confdir / CA_KEY_AND_CERT).read_bytes())
        except ValueError:
            raise CAError(f"cannot read the CA in {confdir / CA_KEY_AND_CERT}") from None
        reasons = stale_reasons(existing, zones, validity_days, now)
        if not reasons and not _same_file(confdir / CA_CERT, existing[1]):
            reasons = [f"{CA_CERT} is not its root certificate"]
        if reasons and not replace:
            logger.warning("the CA in %s does not fit this configuration (%s): `keyless run` "
                           "or `keyless init` with it would replace it", confdir,
                           "; ".join(reasons))
        elif reasons:
            generate_ca(confdir, zones, validity_days, now=now)
            logger.warning(
                "replaced keyless' CA in %s because %s. Apps must trust the new certificate "
                "%s: restart them (or re-run `keyless init --ca-out`) so they read it again",
                confdir, "; ".join(reasons), confdir / CA_CERT)
    try:
        certs.CertStore.from_store(confdir, BASENAME, 2048)
    except (ValueError, OSError) as exc:
        raise CAError(f"cannot load or create the CA in {confdir}: {exc}") from None
    _check_private(confdir / CA_KEY_AND_CERT)
    return confdir / CA_CERT


def configured_zones(settings: Settings) -> tuple[str, ...]:
    """The DNS zones keyless intercepts with these settings: the catalog (with routes) and
    the reverse targets (already catalog hosts, so normally folded away)."""
    from proxy.catalog import fold_zones

    try:
        zones = settings.catalog().permitted_zones()
    except ValueError as exc:
        raise CAError(str(exc)) from None
    # Listeners that offer TLS to the app show it a leaf for their upstream's name.
    listener_hosts = [spec.upstream[0] for spec in settings.listeners if spec.client_tls]
    if settings.transparent and settings.transparent_databases:  # any Azure database name
        from proxy.listeners.spec import PROTOCOLS

        listener_hosts += [suffix.lstrip(".") for info in PROTOCOLS.values()
                           for suffix in info.suffixes]
    return fold_zones([*zones, *(host for _, host in settings.reverse), *listener_hosts])


def prepare_ca_for(settings: Settings, replace: bool = True) -> Path:
    """prepare_ca with the settings' CA files, zones and validity."""
    return prepare_ca(settings.confdir, settings.ca_cert, settings.ca_key,
                      zones=configured_zones(settings), validity_days=settings.ca_validity,
                      replace=replace)


def expires_at(public_cert: Path) -> float:
    """When the CA that apps trust (and so every leaf) expires, as a Unix time."""
    from cryptography import x509

    chain = x509.load_pem_x509_certificates(public_cert.read_bytes())
    return min(cert.not_valid_after_utc for cert in chain).timestamp()


def leaf_certificate(ca_key: CertificateIssuerPrivateKeyTypes, ca: x509.Certificate,
                     host: str, now: datetime.datetime | None = None) -> x509.Certificate:
    """The certificate keyless shows an app for `host`: that one DNS name only (never an IP,
    never names copied from elsewhere), the CA's own key as mitmproxy does, and never valid
    past the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = now or _now()
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key())  # type: ignore[arg-type]
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, host)] if len(host) < 64 else []
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject)).issuer_name(ca.subject)
        .public_key(ca.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - CLOCK_SKEW, ca.not_valid_before_utc))
        .not_valid_after(min(now + LEAF_VALIDITY, ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]),
                       critical=not subject)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
