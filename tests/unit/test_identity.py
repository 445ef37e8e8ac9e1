"""CredentialSource: one credential per (identity, scope), a fresh one once when a proven one
fails, and
the environment's service principal only for its own client id."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from azure.core.credentials import AccessTokenInfo
from azure.core.exceptions import ClientAuthenticationError
from azure.identity.aio import EnvironmentCredential

from proxy.identity import CredentialSource
from proxy.tokens import Identity

SCOPE = "https://storage.azure.com/.default"
OTHER_SCOPE = "https://vault.azure.net/.default"
SP = "5e5e5e5e-0000-4000-8000-00000000005e"
ROUTE = "aaaaaaaa-0000-4000-8000-00000000000a"


@dataclass(eq=False)
class FakeCredential:
    number: int
    failures: list[bool]  # per call: fail?
    calls: list[str] = field(default_factory=list)
    closed: bool = False

    async def get_token_info(self, scope: str) -> AccessTokenInfo:
        self.calls.append(scope)
        await asyncio.sleep(0)
        if self.failures and self.failures.pop(0):
            raise ClientAuthenticationError("AADSTS700027: stale certificate")
        return AccessTokenInfo(f"token-from-{self.number}", 2_000_000_000)

    async def close(self) -> None:
        self.closed = True


class Factory:
    def __init__(self, *plans: list[bool]) -> None:
        self.plans = list(plans)
        self.made: list[FakeCredential] = []

    def __call__(self, identity: Identity) -> Any:
        credential = FakeCredential(len(self.made), self.plans.pop(0) if self.plans else [])
        self.made.append(credential)
        return credential


def test_a_proven_credential_that_fails_is_replaced_once() -> None:
    async def run() -> tuple[str, str]:
        factory = Factory([False, True])
        source = CredentialSource(factory)
        first = await source(Identity(), SCOPE)
        second = await source(Identity(), SCOPE)  # fails on 0, succeeds on a fresh 1
        await asyncio.sleep(0)
        assert [c.number for c in factory.made] == [0, 1] and factory.made[0].closed
        return first.token, second.token

    assert asyncio.run(run()) == ("token-from-0", "token-from-1")


def test_a_credential_that_never_worked_is_not_retried() -> None:
    async def run() -> int:
        factory = Factory([True])
        source = CredentialSource(factory)
        with pytest.raises(ClientAuthenticationError):
            await source(Identity(), SCOPE)
        return len(factory.made)

    assert asyncio.run(run()) == 1


def test_the_fresh_credential_failing_too_is_the_answer() -> None:
    async def run() -> int:
        factory = Factory([False, True], [True, True])
        source = CredentialSource(factory)
        await source(Identity(), SCOPE)
        with pytest.raises(ClientAuthenticationError):
            await source(Identity(), SCOPE)
        with pytest.raises(ClientAuthenticationError):  # 1 never worked: no third credential
            await source(Identity(), SCOPE)
        return len(factory.made)

    assert asyncio.run(run()) == 2


def test_two_calls_failing_at_once_replace_the_credential_once() -> None:
    async def run() -> list[str]:
        factory = Factory([False, True, True])
        source = CredentialSource(factory)
        await source(Identity(), SCOPE)
        infos = await asyncio.gather(source(Identity(), SCOPE), source(Identity(), SCOPE))
        assert len(factory.made) == 2
        return [i.token for i in infos]

    assert asyncio.run(run()) == ["token-from-1", "token-from-1"]


def _chain(identity: Identity) -> list[type]:
    credential = CredentialSource._default_credential(identity)
    try:
        return [type(c) for c in credential.credentials]
    finally:
        asyncio.run(credential.close())


def test_the_environment_service_principal_serves_only_its_own_client_id(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"AZURE_CLIENT_ID": SP, "AZURE_TENANT_ID": "t",
                        "AZURE_CLIENT_SECRET": "s"}.items():
        monkeypatch.setenv(name, value)
    assert EnvironmentCredential in _chain(Identity())
    assert EnvironmentCredential in _chain(Identity(SP))
    assert EnvironmentCredential not in _chain(Identity(ROUTE))


def test_each_scope_has_its_own_credential() -> None:
    """azure-identity asks its endpoint at most once per 30 s per credential, across scopes:
    scopes sharing one would be handed their old tokens when they refresh together."""
    async def run() -> list[int]:
        factory = Factory()
        source = CredentialSource(factory)
        for scope in (SCOPE, OTHER_SCOPE, SCOPE):
            await source(Identity(), scope)
        source.forget(Identity())
        await asyncio.sleep(0)
        return [len(c.calls) for c in factory.made if c.closed]

    assert asyncio.run(run()) == [2, 1]
