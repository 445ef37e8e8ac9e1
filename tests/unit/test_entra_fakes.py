"""Calibration of the fakes' token checks and of FakeEntra: a good token or request passes, and
each thing an Entra-protected service (or Entra itself) refuses is refused."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.core.pipeline.transport import AioHttpTransport
from azure.identity.aio import (
    CertificateCredential,
    ClientSecretCredential,
    WorkloadIdentityCredential,
)
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.azurite import TestPKI
from tests.support.entra import (
    ISSUER,
    KEY_ID,
    TENANT_ID,
    FakeCluster,
    FakeEntra,
    b64url,
    decode,
    mint,
    object_id_for,
    sign_rs256,
    verify,
    write_client_certificate,
)
from tests.support.fake_azure import Expect, FakeRequest, check
from tests.support.identity_endpoint import FakeIdentityEndpoint

AUDIENCE = "https://storage.azure.com"
CLIENT = "aaaaaaaa-0000-4000-8000-00000000000a"
OTHER = "bbbbbbbb-0000-4000-8000-00000000000b"


def request_with(authorization: str) -> FakeRequest:
    return FakeRequest("GET", "acct.blob.core.windows.net", "/c?comp=list",
                       [("Authorization", authorization), ("x-ms-version", "2021-08-06")], b"")


def claims_for(client_id: str = CLIENT, **changes: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "aud": AUDIENCE, "iss": ISSUER, "iat": now, "nbf": now - 300, "exp": now + 3600,
        "appid": client_id, "oid": object_id_for(client_id), "tid": TENANT_ID}
    claims.update(changes)
    return claims


def signed(claims: dict[str, object], key: rsa.RSAPrivateKey | None = None) -> str:
    header = {"alg": "RS256", "typ": "JWT", "kid": KEY_ID}
    return sign_rs256(header, claims) if key is None else sign_rs256(header, claims, key)


def problems(token: str, client_id: str | None = CLIENT) -> list[str]:
    return check(request_with(f"Bearer {token}"), Expect(AUDIENCE, client_id=client_id))


def test_a_good_token_passes_check() -> None:
    assert problems(mint(AUDIENCE, CLIENT)) == []
    assert problems(signed(claims_for())) == []
    assert problems(mint(AUDIENCE), client_id=None) == []  # any identity of the tenant


def tampered(token: str) -> str:
    """The same signature over another identity's claims."""
    head, _, signature = token.split(".")
    other_body = mint(AUDIENCE, OTHER).split(".")[1]
    return f"{head}.{other_body}.{signature}"


@pytest.mark.parametrize(("token", "expected"), [
    (signed(claims_for(), rsa.generate_private_key(public_exponent=65537, key_size=2048)),
     "token signature does not verify"),
    (tampered(mint(AUDIENCE, CLIENT)), "token signature does not verify"),
    (mint(AUDIENCE, CLIENT).rsplit(".", 1)[0] + ".", "token signature does not verify"),
    (sign_rs256({"alg": "RS256", "typ": "JWT", "kid": "another-key"}, claims_for()),
     "unknown key"),
    (f"{mint(AUDIENCE, CLIENT).split('.')[0]}.x.y", "not a JWT"),
    ("not-a-jwt", "not a JWT"),
    (signed(claims_for(iss=f"https://login.microsoftonline.com/{TENANT_ID}/v2.0")),
     "token issuer"),
    (signed(claims_for(iss="https://sts.windows.net/00000000-0000-0000-0000-000000000000/")),
     "token issuer"),
    (mint(AUDIENCE, CLIENT, now=int(time.time()) - 7200), "token expired"),
    (signed(claims_for(exp=int(time.time()) - 1)), "token expired"),
    # far ahead: the parameters are made at collection, maybe many minutes before the test
    (mint(AUDIENCE, CLIENT, not_before=int(time.time()) + 10 * 365 * 86400), "token not yet valid"),
    (mint("https://vault.azure.net", CLIENT), "token audience"),
    (mint(AUDIENCE + "/", CLIENT), "token audience"),
    (mint(AUDIENCE, OTHER), "token for identity"),
    (signed(claims_for(oid=object_id_for(OTHER))), "token object id"),
    (signed(claims_for(tid="00000000-0000-0000-0000-000000000000")), "token from tenant"),
])
def test_check_refuses_what_an_entra_protected_service_refuses(token: str,
                                                                expected: str) -> None:
    found = problems(token)
    assert any(expected in p for p in found), found
    assert all(token not in p for p in found)  # never echoes the token


def test_an_unsigned_or_hs256_token_is_refused() -> None:
    body = mint(AUDIENCE, CLIENT).split(".")[1]
    for alg in ("none", "HS256"):
        head = sign_rs256({"alg": alg, "typ": "JWT"}, {}).split(".")[0]
        assert any("not an Entra token" in p for p in verify(f"{head}.{body}.", AUDIENCE))


def test_check_verifies_the_cosmos_form_too() -> None:
    good = mint("https://cosmos.azure.com", CLIENT)
    bad = mint("https://cosmos.azure.com", CLIENT, now=int(time.time()) - 7200)
    expect = Expect("https://cosmos.azure.com", auth_format="cosmos", client_id=CLIENT)
    assert check(request_with(f"type%3Daad%26ver%3D1.0%26sig%3D{good}"), expect) == []
    assert "token expired" in check(request_with(f"type%3Daad%26ver%3D1.0%26sig%3D{bad}"),
                                    expect)


def test_identity_endpoint_tokens_are_signed_by_the_issuer() -> None:
    with FakeIdentityEndpoint(protocol="imds") as imds:
        request = urllib.request.Request(
            f"{imds.url}?api-version=2018-02-01&resource={AUDIENCE}&client_id={CLIENT}",
            headers={"Metadata": "true"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as response:
            body = json.load(response)
        assert all(isinstance(value, str) for value in body.values())
        assert verify(body["access_token"], AUDIENCE, CLIENT) == []
        without_header = urllib.request.Request(
            f"{imds.url}?api-version=2018-02-01&resource={AUDIENCE}")
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(without_header, timeout=10)
        assert refused.value.code == 400


# -- FakeEntra ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def entra(pki: TestPKI) -> Iterator[FakeEntra]:
    with FakeEntra(pki.issue_server_cert()) as fake:
        yield fake


def options(entra: FakeEntra, pki: TestPKI) -> dict[str, object]:
    return {"authority": entra.authority,
            "transport": AioHttpTransport(connection_verify=pki.ca_pem_path)}


async def _token(credential: object) -> str:
    async with credential:  # type: ignore[attr-defined]
        info = await credential.get_token_info(f"{AUDIENCE}/.default")  # type: ignore[attr-defined]
        return str(info.token)


def test_client_secret_right_and_wrong(entra: FakeEntra, pki: TestPKI) -> None:
    entra.add_secret("5e000000-0000-4000-8000-000000000001", "right")
    token = asyncio.run(_token(ClientSecretCredential(
        TENANT_ID, "5e000000-0000-4000-8000-000000000001", "right", **options(entra, pki))))
    assert verify(token, AUDIENCE, "5e000000-0000-4000-8000-000000000001") == []
    with pytest.raises(ClientAuthenticationError, match="AADSTS7000215"):
        asyncio.run(_token(ClientSecretCredential(
            TENANT_ID, "5e000000-0000-4000-8000-000000000001", "wrong", **options(entra, pki))))
    with pytest.raises(ClientAuthenticationError, match="AADSTS90002"):
        asyncio.run(_token(ClientSecretCredential(
            "11111111-0000-4000-8000-000000000000", "5e000000-0000-4000-8000-000000000001",
            "right", **options(entra, pki))))
    with pytest.raises(ClientAuthenticationError, match="AADSTS700016"):
        asyncio.run(_token(ClientSecretCredential(
            TENANT_ID, "5e000000-0000-4000-8000-0000000000ff", "right", **options(entra, pki))))


def test_certificate_signature_and_thumbprint(entra: FakeEntra, pki: TestPKI,
                                              tmp_path: Path) -> None:
    client_id = "5e000000-0000-4000-8000-000000000002"
    entra.add_certificate(client_id, write_client_certificate(tmp_path / "ok.pem", client_id))
    token = asyncio.run(_token(CertificateCredential(
        TENANT_ID, client_id, str(tmp_path / "ok.pem"), **options(entra, pki))))
    assert verify(token, AUDIENCE, client_id) == []
    write_client_certificate(tmp_path / "other.pem", client_id)
    with pytest.raises(ClientAuthenticationError, match="AADSTS700027"):
        asyncio.run(_token(CertificateCredential(
            TENANT_ID, client_id, str(tmp_path / "other.pem"), **options(entra, pki))))


def _post(entra: FakeEntra, pki: TestPKI, form: dict[str, str]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(entra.token_url(), data=urlencode(form).encode())
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=pki.client_ssl_context()))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_certificate_assertion_for_another_token_url_or_a_forged_signature(
        entra: FakeEntra, pki: TestPKI, tmp_path: Path) -> None:
    client_id = "5e000000-0000-4000-8000-000000000003"
    certificate = write_client_certificate(tmp_path / "c.pem", client_id)
    entra.add_certificate(client_id, certificate)
    key = serialization.load_pem_private_key((tmp_path / "c.pem").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT",
              "x5t": b64url(certificate.fingerprint(hashes.SHA1()))}

    def post(claims: dict[str, object], signer: rsa.RSAPrivateKey,
             thumbprint: str = header["x5t"]) -> tuple[int, str]:
        assertion = sign_rs256({**header, "x5t": thumbprint}, claims, signer)
        status, body = _post(entra, pki, {
            "grant_type": "client_credentials", "client_id": client_id,
            "scope": f"{AUDIENCE}/.default", "client_assertion": assertion,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"})
        return status, str(body.get("error_description", ""))[:12]

    claims = {"aud": entra.token_url(), "iss": client_id, "sub": client_id, "nbf": now,
              "exp": now + 600, "jti": "1"}
    assert post(claims, key)[0] == 200  # RS256 with the SHA-1 x5t (the ADFS form) works too
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert post(claims, forger) == (401, "AADSTS700027")
    assert post(claims, key, thumbprint=b64url(b"another certificate's")) == (401, "AADSTS700027")
    other_url = {**claims, "aud": "https://login.microsoftonline.com/x/oauth2/v2.0/token"}
    assert post(other_url, key) == (400, "AADSTS700021")
    assert post({**claims, "exp": now - 1}, key) == (400, "AADSTS700024")


def test_federated_assertion_subject_issuer_expiry_and_request_shape(
        entra: FakeEntra, pki: TestPKI, tmp_path: Path) -> None:
    cluster, stranger = FakeCluster(), FakeCluster()
    client_id = "c0000000-0000-4000-8000-000000000001"
    subject = "system:serviceaccount:shop:keyless"
    entra.add_federated(client_id, cluster, subject)
    token_file = tmp_path / "token"

    def fetch() -> str:
        return asyncio.run(_token(WorkloadIdentityCredential(
            tenant_id=TENANT_ID, client_id=client_id, token_file_path=str(token_file),
            **options(entra, pki))))

    cluster.write_token(token_file, subject)
    assert decode(fetch())["appid"] == client_id
    for writer, who, code in ((cluster, "system:serviceaccount:shop:other", "AADSTS700213"),
                              (stranger, subject, "AADSTS700211")):
        writer.write_token(token_file, who)
        with pytest.raises(ClientAuthenticationError, match=code):
            fetch()
    cluster.write_token(token_file, subject, lifetime=-60)
    with pytest.raises(ClientAuthenticationError, match="AADSTS700024"):
        fetch()
    assertion = cluster.service_account_token(subject)
    jwt_bearer = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    base = {"grant_type": "client_credentials", "client_id": client_id,
            "scope": f"{AUDIENCE}/.default", "client_assertion": assertion,
            "client_assertion_type": jwt_bearer}
    assert _post(entra, pki, base)[0] == 200
    for change, error in (({"grant_type": "password"}, "unsupported_grant_type"),
                          ({"scope": AUDIENCE}, "invalid_scope"),
                          ({"scope": f"{AUDIENCE}/.default https://vault.azure.net/.default"},
                           "invalid_scope"),
                          ({"client_assertion_type": "jwt"}, "invalid_request")):
        status, body = _post(entra, pki, {**base, **change})
        assert (status, body["error"]) == (400, error), change
    assert entra.unexpected == []
