"""The tests' Microsoft Entra ID: one token signer every fake trusts, and its token endpoint.

Every access token in the tests, whichever identity source handed it out (the App Service and
IMDS managed-identity fakes, this module's token endpoint for service principals and workload
identity, the fake `az` of the Azure CLI tests, tokens an app brings itself), is minted by
`mint`: RS256, signed with `SIGNING_KEY`, a key pair made at import. The fake services check a
token the way an Entra-protected service does (`verify`): signature with the issuer's public
key, `iss`, `aud`, `exp`, `nbf`, and the identity it was issued to (`appid`, `oid`).

`FakeEntra` plays `https://login.microsoftonline.com` for azure-identity's async credentials
(`AZURE_AUTHORITY_HOST`). Those use azure-identity's own `AadClient`, not MSAL's network code:
a token request is one `POST {authority}/{tenant}/oauth2/v2.0/token` and nothing else (no
instance or OpenID discovery), which `FakeEntra.unexpected` lets a test prove. The endpoint
checks a client-credentials request like Entra: the tenant in the path, the grant type, the
application, a single `/.default` scope, and the credential — a client secret, a certificate
assertion (a JWT signed with the certificate's key, named by its thumbprint, for this token
URL), or a federated assertion (a Kubernetes service-account token from a `FakeCluster`, for
the subject and audience the application's federated credential names).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

__all__ = [
    "ISSUER",
    "OBJECT_ID",
    "SIGNING_KEY",
    "SYSTEM_ASSIGNED_CLIENT_ID",
    "TENANT_ID",
    "FakeCluster",
    "FakeEntra",
    "decode",
    "mint",
    "object_id_for",
    "verify",
    "write_client_certificate",
]

# Fixed, obviously fake identifiers so assertions can be exact.
TENANT_ID = "72f988bf-0000-4000-8000-00000000cafe"
SYSTEM_ASSIGNED_CLIENT_ID = "5a5a5a5a-0000-4000-8000-000000000001"
OBJECT_ID = "0b0b0b0b-0000-4000-8000-000000000002"  # the system-assigned identity's object id
# The v1 issuer: Azurite refuses the v2 form (login.microsoftonline.com/.../v2.0).
ISSUER = f"https://sts.windows.net/{TENANT_ID}/"
FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

# The issuer's signing key, made once per test process. Only its public half is used to verify.
SIGNING_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_KEY = SIGNING_KEY.public_key()
KEY_ID = base64.urlsafe_b64encode(hashlib.sha1(PUBLIC_KEY.public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()
).rstrip(b"=").decode()

_OBJECT_IDS = uuid.UUID("6b657965-6c65-7373-0000-000000000000")  # namespace for object ids


def object_id_for(client_id: str | None) -> str:
    """The object id of the service principal behind `client_id` (stable, distinct per id)."""
    if client_id is None or client_id == SYSTEM_ASSIGNED_CLIENT_ID:
        return OBJECT_ID
    return str(uuid.uuid5(_OBJECT_IDS, client_id))


# -- JWTs ---------------------------------------------------------------------------------------

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    # azure-identity's certificate assertion keeps the "=" padding; both forms decode.
    text = text.rstrip("=")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_rs256(header: dict[str, Any], payload: dict[str, Any],
               key: rsa.RSAPrivateKey = SIGNING_KEY) -> str:
    signing_input = ".".join(b64url(json.dumps(part, separators=(",", ":")).encode())
                             for part in (header, payload))
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def decode(token: str) -> dict[str, Any]:
    """A JWT's payload, verifying nothing (test helper)."""
    if token.lower().startswith("bearer "):
        token = token[7:]
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError(f"not a JWT: expected 3 dot-separated parts, got {len(parts)}")
    result: dict[str, Any] = json.loads(b64url_decode(parts[1]))
    return result


def _header(token: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(b64url_decode(token.split(".", 1)[0]))
    return result


def mint(audience: str, client_id: str | None = None, lifetime: int = 3600, *,
         now: int | None = None, issuer: str = ISSUER, not_before: int | None = None,
         key: rsa.RSAPrivateKey = SIGNING_KEY) -> str:
    """An Entra-style v1 access token for `audience` (verbatim `aud`), issued to `client_id`
    (default: the system-assigned identity). `issuer`, `not_before` and `key` exist to make
    bad tokens for calibration."""
    issued_at = int(time.time()) if now is None else now
    appid = client_id or SYSTEM_ASSIGNED_CLIENT_ID
    payload = {
        "aud": audience,
        "iss": issuer,
        "iat": issued_at,
        # Entra backdates nbf by five minutes for clock skew, so nbf checks never flake.
        "nbf": issued_at - 300 if not_before is None else not_before,
        "exp": issued_at + lifetime,
        "appid": appid,
        "oid": object_id_for(appid),
        "sub": object_id_for(appid),
        "tid": TENANT_ID,
        "idtyp": "app",
        "ver": "1.0",
        # Unique per token so tests can tell a refreshed token from a cached one.
        "jti": str(uuid.uuid4()),
    }
    return sign_rs256({"alg": "RS256", "typ": "JWT", "kid": KEY_ID}, payload, key)


def verify(token: str, audience: str, client_id: str | None = None, *,
           now: float | None = None) -> list[str]:
    """What an Entra-protected service would object to in `token` (empty: accepted).

    `client_id`: the identity the token must be issued to (`appid`, and its `oid`); None
    accepts any identity of the tenant. Messages never contain the token."""
    parts = token.split(".")
    if len(parts) != 3:
        return [f"token is not a JWT: {len(parts)} dot-separated parts"]
    try:
        header = _header(token)
        claims = decode(token)
        signature = b64url_decode(parts[2])
    except ValueError as exc:  # also JSON errors; binascii.Error is a ValueError
        return [f"token is not a JWT: {type(exc).__name__}"]
    if header.get("alg") != "RS256":
        return [f"token alg {header.get('alg')!r}: not an Entra token (RS256)"]
    if header.get("kid") != KEY_ID:
        return ["token signed with an unknown key (kid)"]
    try:
        PUBLIC_KEY.verify(signature, f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(),
                          hashes.SHA256())
    except InvalidSignature:
        return ["token signature does not verify with the issuer's key"]
    problems = []
    now = time.time() if now is None else now
    if claims.get("iss") != ISSUER:
        problems.append(f"token issuer {claims.get('iss')!r}, expected {ISSUER!r}")
    if claims.get("aud") != audience:
        problems.append(f"token audience {claims.get('aud')!r}, expected {audience!r}")
    if not isinstance(claims.get("exp"), int) or claims["exp"] <= now:
        problems.append("token expired")
    if not isinstance(claims.get("nbf"), int) or claims["nbf"] > now:
        problems.append("token not yet valid (nbf)")
    if claims.get("tid") != TENANT_ID:
        problems.append(f"token from tenant {claims.get('tid')!r}")
    if client_id is not None:
        if claims.get("appid") != client_id:
            problems.append(f"token for identity {claims.get('appid')!r}, expected {client_id!r}")
        elif claims.get("oid") != object_id_for(client_id):
            problems.append(f"token object id {claims.get('oid')!r} is not {client_id!r}'s")
    return problems


# -- a Kubernetes cluster's service-account token issuer ---------------------------------------

class FakeCluster:
    """The OIDC issuer of a cluster: signs the projected service-account tokens the kubelet
    writes to `AZURE_FEDERATED_TOKEN_FILE` (audience `api://AzureADTokenExchange`)."""

    def __init__(self, issuer: str | None = None) -> None:
        # Each cluster its own issuer URL, as AKS gives each cluster its own OIDC issuer.
        self.issuer = issuer or f"https://oidc.keyless-test.invalid/{uuid.uuid4()}/"
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def service_account_token(self, subject: str, lifetime: int = 3600) -> str:
        now = int(time.time())
        return sign_rs256(
            {"alg": "RS256", "typ": "JWT", "kid": "cluster"},
            {"aud": [FEDERATED_AUDIENCE], "iss": self.issuer, "sub": subject, "iat": now,
             "nbf": now, "exp": now + lifetime, "jti": str(uuid.uuid4())},
            self.key)

    def write_token(self, path: Path, subject: str, lifetime: int = 3600) -> str:
        """Write a fresh token like the kubelet does: whole, then swapped in atomically."""
        token = self.service_account_token(subject, lifetime)
        staged = path.with_name(path.name + ".new")
        staged.write_text(token)
        staged.replace(path)
        return token


def write_client_certificate(path: Path, client_id: str) -> x509.Certificate:
    """A self-signed RSA certificate with its key in one PEM file (what
    `AZURE_CLIENT_CERTIFICATE_PATH` names). Returns the certificate to register."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"keyless-test-{client_id}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM))
    return cert


# -- the token endpoint ------------------------------------------------------------------------

@dataclass
class Application:
    """An app registration (or user-assigned identity) and the credentials it accepts."""

    client_id: str
    secret: str | None = None
    certificate: x509.Certificate | None = None
    federated: list[tuple[FakeCluster, str]] = field(default_factory=list)  # (issuer, subject)


class EntraError(Exception):
    def __init__(self, status: int, error: str, code: str, description: str) -> None:
        super().__init__(description)
        self.status, self.error, self.code, self.description = status, error, code, description


class FakeEntra:
    """An HTTPS Entra token endpoint on 127.0.0.1 (see the module docstring).

    `calls` records each token request: tenant, grant_type, client_id, scope, how the client
    authenticated (`auth`: "secret", "certificate" or "federated"), the SHA-256 of a client
    assertion (`assertion_sha256`, to tell which file content was presented), status and the
    AADSTS code of a refusal. `unexpected` lists requests to any other path."""

    def __init__(self, cert_and_key: tuple[str, str], *, lifetime_seconds: int = 3600) -> None:
        self.lifetime_seconds = lifetime_seconds
        self.apps: dict[str, Application] = {}
        self._lock = threading.Lock()
        self._calls: list[dict[str, Any]] = []
        self._unexpected: list[str] = []
        self._issued: list[str] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.entra = self
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*cert_and_key)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FakeEntra:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def authority(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def token_url(self, tenant: str = TENANT_ID) -> str:
        return f"{self.authority}/{tenant}/oauth2/v2.0/token"

    # -- registrations -------------------------------------------------------------------------

    def app(self, client_id: str) -> Application:
        return self.apps.setdefault(client_id, Application(client_id))

    def add_secret(self, client_id: str, secret: str) -> None:
        self.app(client_id).secret = secret

    def add_certificate(self, client_id: str, certificate: x509.Certificate) -> None:
        self.app(client_id).certificate = certificate

    def add_federated(self, client_id: str, cluster: FakeCluster, subject: str) -> None:
        self.app(client_id).federated.append((cluster, subject))

    # -- records -------------------------------------------------------------------------------

    @property
    def calls(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(c) for c in self._calls]

    @property
    def issued(self) -> list[str]:
        with self._lock:
            return list(self._issued)

    @property
    def unexpected(self) -> list[str]:
        with self._lock:
            return list(self._unexpected)

    # -- request handling (server threads) ----------------------------------------------------

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        split = urlsplit(path)
        segments = split.path.strip("/").split("/")
        if method != "POST" or len(segments) != 4 or segments[1:] != ["oauth2", "v2.0", "token"]:
            with self._lock:
                self._unexpected.append(f"{method} {split.path}")
            return 404, _error_body("invalid_request", "AADSTS90027", "no such endpoint")
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        assertion = form.get("client_assertion")
        record: dict[str, Any] = {
            "tenant": segments[0], "grant_type": form.get("grant_type"),
            "client_id": form.get("client_id"), "scope": form.get("scope"), "auth": None,
            "assertion_sha256": hashlib.sha256(assertion.encode()).hexdigest()
            if assertion else None,
            "time": time.time(), "status": None, "code": None,
        }
        try:
            audience = self._token_request(form, segments[0], record)
        except EntraError as exc:
            record.update(status=exc.status, code=exc.code)
            with self._lock:
                self._calls.append(record)
            return exc.status, _error_body(exc.error, exc.code, exc.description)
        lifetime = self.lifetime_seconds
        token = mint(audience, record["client_id"], lifetime)
        record["status"] = 200
        with self._lock:
            self._calls.append(record)
            self._issued.append(token)
        return 200, {"token_type": "Bearer", "expires_in": lifetime,
                     "ext_expires_in": lifetime, "access_token": token}

    def _token_request(self, form: dict[str, str], tenant: str, record: dict[str, Any]) -> str:
        """Check a client-credentials request; returns the audience of the token to issue."""
        if tenant != TENANT_ID:
            raise EntraError(400, "invalid_tenant", "AADSTS90002", f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            raise EntraError(400, "unsupported_grant_type", "AADSTS70003",
                             "The app requested an unsupported grant type.")
        app = self.apps.get(form.get("client_id") or "")
        if app is None:
            raise EntraError(400, "unauthorized_client", "AADSTS700016",
                             "Application not found in the directory.")
        scopes = (form.get("scope") or "").split()
        if len(scopes) != 1 or not scopes[0].endswith("/.default"):
            raise EntraError(400, "invalid_scope", "AADSTS1002012",
                             "The client credentials flow needs one scope ending in /.default.")
        if "client_secret" in form:
            record["auth"] = "secret"
            if app.secret is None or not hmac.compare_digest(form["client_secret"], app.secret):
                raise EntraError(401, "invalid_client", "AADSTS7000215",
                                 "Invalid client secret provided.")
        elif "client_assertion" in form:
            if form.get("client_assertion_type") != JWT_BEARER:
                raise EntraError(400, "invalid_request", "AADSTS700024",
                                 "client_assertion_type must be jwt-bearer.")
            self._check_assertion(app, form["client_assertion"], tenant, record)
        else:
            raise EntraError(401, "invalid_client", "AADSTS7000218",
                             "The request body must contain client_assertion or client_secret.")
        return scopes[0].removesuffix("/.default")

    def _check_assertion(self, app: Application, assertion: str, tenant: str,
                         record: dict[str, Any]) -> None:
        parts = assertion.split(".")
        try:
            header, claims = _header(assertion), decode(assertion)
            signature = b64url_decode(parts[2])
        except (ValueError, IndexError) as exc:
            raise EntraError(400, "invalid_request", "AADSTS50027",
                             f"Invalid JWT token: {type(exc).__name__}.") from None
        signed = f"{parts[0]}.{parts[1]}".encode()
        now = time.time()
        if not (isinstance(claims.get("exp"), int) and claims["exp"] > now
                and isinstance(claims.get("nbf", 0), int) and claims.get("nbf", 0) <= now + 300):
            raise EntraError(400, "invalid_client", "AADSTS700024",
                             "Client assertion is not within its valid time range.")
        if claims.get("iss") != app.client_id:  # a federated token: its issuer is the cluster
            record["auth"] = "federated"
            for cluster, subject in app.federated:
                if claims.get("iss") != cluster.issuer:
                    continue
                try:
                    cluster.key.public_key().verify(signature, signed, padding.PKCS1v15(),
                                                    hashes.SHA256())
                except InvalidSignature:
                    continue
                audiences = claims.get("aud")
                audiences = audiences if isinstance(audiences, list) else [audiences]
                if claims.get("sub") == subject and FEDERATED_AUDIENCE in audiences:
                    return
                raise EntraError(400, "invalid_client", "AADSTS700213",
                                 "No matching federated identity record found.")
            raise EntraError(400, "invalid_client", "AADSTS700211",
                             "No matching federated identity record found for the issuer.")
        record["auth"] = "certificate"
        certificate = app.certificate
        if certificate is None or claims.get("sub") != app.client_id:
            raise EntraError(401, "invalid_client", "AADSTS700027",
                             "Client assertion contains an invalid signature.")
        # azure-identity keeps the base64 padding on thumbprints; compare without it.
        if header.get("alg") == "PS256":
            named = _unpadded(header.get("x5t#S256")) == b64url(
                certificate.fingerprint(hashes.SHA256()))
            pad: padding.AsymmetricPadding = padding.PSS(
                mgf=padding.MGF1(hashes.SHA256()), salt_length=hashes.SHA256.digest_size)
        elif header.get("alg") == "RS256":
            named = _unpadded(header.get("x5t")) == b64url(certificate.fingerprint(hashes.SHA1()))
            pad = padding.PKCS1v15()
        else:
            named, pad = False, padding.PKCS1v15()
        if not named:
            raise EntraError(401, "invalid_client", "AADSTS700027",
                             "The certificate with the assertion's thumbprint is not registered.")
        public_key = certificate.public_key()
        assert isinstance(public_key, rsa.RSAPublicKey)
        try:
            public_key.verify(signature, signed, pad, hashes.SHA256())
        except InvalidSignature:
            raise EntraError(401, "invalid_client", "AADSTS700027",
                             "Client assertion contains an invalid signature.") from None
        if claims.get("aud") != self.token_url(tenant):
            raise EntraError(400, "invalid_client", "AADSTS700021",
                             "Client assertion audience claim does not match the token URL.")


def _unpadded(thumbprint: object) -> str | None:
    return thumbprint.rstrip("=") if isinstance(thumbprint, str) else None


def _error_body(error: str, code: str, description: str) -> dict[str, Any]:
    return {"error": error, "error_description": f"{code}: {description}",
            "error_codes": [int(code.removeprefix("AADSTS"))],
            "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
            "trace_id": str(uuid.uuid4()), "correlation_id": str(uuid.uuid4())}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    entra: FakeEntra


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        status, answer = self.server.entra.handle(self.command, self.path, body)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json; charset=utf-8")
        self.send_header("cache-control", "no-store, no-cache")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _serve
