"""Fixtures for the fake namespace's calibration: the test CA and a credential minting tokens."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from azure.core.credentials import AccessToken

from tests.support import entra
from tests.support.azurite import TestPKI
from tests.support.fake_namespace import FakeNamespace


class MintingCredential:
    """A TokenCredential as azure-identity's: a token for the scope's resource (`aud`), from
    the tests' issuer. `lifetime`/`issuer`/`key`/`audience` make the bad tokens of the
    enforcement checks. `scopes` records what the SDK asked for."""

    def __init__(self, lifetime: int = 3600, *, issuer: str = entra.ISSUER,
                 key=entra.SIGNING_KEY, audience: str | None = None) -> None:
        self.lifetime, self.issuer, self.key, self.audience = lifetime, issuer, key, audience
        self.scopes: list[str] = []

    def get_token(self, *scopes: str, **_: object) -> AccessToken:
        self.scopes.extend(scopes)
        audience = self.audience or scopes[0].removesuffix("/.default")
        token = entra.mint(audience, lifetime=self.lifetime, issuer=self.issuer, key=self.key)
        return AccessToken(token, int(time.time()) + self.lifetime)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def namespace(tmp_path, pki) -> Iterator[FakeNamespace]:
    with FakeNamespace(tmp_path / "ns", pki) as fake:
        yield fake
