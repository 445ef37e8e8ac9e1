"""The token cache, with a fake clock and a fake credential."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from proxy.tokens import Identity, TokenCache, TokenUnavailable

SCOPE = "https://storage.azure.com/.default"
ME = Identity()


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Info:
    token: str
    expires_on: int
    refresh_on: int | None = None


class FakeCredential:
    """Counts calls; hands out token-1, token-2, ...; can fail or hang on demand."""

    def __init__(self, clock: Clock, lifetime: int = 3600, refresh_after: int | None = 1800):
        self.clock = clock
        self.lifetime = lifetime
        self.refresh_after = refresh_after
        self.calls: list[tuple[Identity, str]] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def __call__(self, identity: Identity, scope: str) -> Info:
        self.calls.append((identity, scope))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        now = self.clock()
        refresh = now + self.refresh_after if self.refresh_after else None
        return Info(f"token-{len(self.calls)}", now + self.lifetime, refresh)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def make(lifetime: int = 3600, **kwargs) -> tuple[Clock, FakeCredential, TokenCache]:
    clock = Clock()
    credential = FakeCredential(clock, lifetime=lifetime)
    kwargs.setdefault("expiry_margin", 300)
    return clock, credential, TokenCache(credential, clock=clock, **kwargs)


def test_200_concurrent_cold_requests_make_exactly_one_fetch():
    async def scenario():
        _, credential, cache = make()
        credential.gate = asyncio.Event()
        waiters = [asyncio.create_task(cache.get(ME, SCOPE)) for _ in range(200)]
        await settle()
        credential.gate.set()
        tokens = await asyncio.gather(*waiters)
        await cache.close()
        return credential.calls, tokens

    calls, tokens = asyncio.run(scenario())
    assert len(calls) == 1
    assert set(tokens) == {"token-1"}


def test_each_identity_and_scope_has_its_own_entry():
    async def scenario():
        _, credential, cache = make()
        other = Identity("11111111-1111-1111-1111-111111111111")
        results = [
            await cache.get(ME, SCOPE),
            await cache.get(other, SCOPE),
            await cache.get(ME, "https://cognitiveservices.azure.com/.default"),
            await cache.get(ME, SCOPE),
        ]
        await cache.close()
        return credential.calls, results

    calls, results = asyncio.run(scenario())
    assert len(calls) == 3
    assert results == ["token-1", "token-2", "token-3", "token-1"]


def test_refreshes_in_the_background_at_refresh_on_and_keeps_serving_meanwhile():
    async def scenario():
        clock, credential, cache = make()
        first = await cache.get(ME, SCOPE)
        clock.now += 1799
        before_refresh_on = await cache.get(ME, SCOPE)
        calls_before = len(credential.calls)
        clock.now += 2
        credential.gate = asyncio.Event()  # the refresh is slow: the old token still serves
        during = await cache.get(ME, SCOPE)
        credential.gate.set()
        await settle()
        after = await cache.get(ME, SCOPE)
        await cache.close()
        return first, before_refresh_on, calls_before, during, after, len(credential.calls)

    first, before, calls_before, during, after, calls = asyncio.run(scenario())
    assert (first, before, calls_before) == ("token-1", "token-1", 1)
    assert during == "token-1"
    assert after == "token-2"
    assert calls == 2


def test_failed_refresh_keeps_serving_the_still_valid_token_and_retries_later():
    async def scenario():
        clock, credential, cache = make(refresh_retry=30)
        await cache.get(ME, SCOPE)
        clock.now += 1801
        credential.fail = RuntimeError("identity endpoint said 500")
        served = [await cache.get(ME, SCOPE)]
        await settle()
        served.append(await cache.get(ME, SCOPE))  # within the retry pause: no new call
        await settle()
        calls_during_pause = len(credential.calls)
        clock.now += 31
        credential.fail = None
        served.append(await cache.get(ME, SCOPE))  # still the old one; refresh restarted
        await settle()
        served.append(await cache.get(ME, SCOPE))
        await cache.close()
        return served, calls_during_pause, len(credential.calls)

    served, calls_during_pause, calls = asyncio.run(scenario())
    assert served == ["token-1", "token-1", "token-1", "token-3"]
    assert calls_during_pause == 2
    assert calls == 3


def test_a_token_within_the_margin_is_never_served():
    async def scenario():
        clock, credential, cache = make(expiry_margin=300)
        await cache.get(ME, SCOPE)
        credential.fail = RuntimeError("down")
        clock.now += 3600 - 300  # exactly at expires_on - margin
        with pytest.raises(TokenUnavailable):
            await cache.get(ME, SCOPE)
        credential.fail = None
        fresh = await cache.get(ME, SCOPE)
        await cache.close()
        return fresh

    assert asyncio.run(scenario()) == "token-3"


def test_a_token_issued_already_inside_the_margin_is_refused():
    async def scenario():
        _, _, cache = make(lifetime=200, expiry_margin=300)
        try:
            await cache.get(ME, SCOPE)
        finally:
            await cache.close()

    with pytest.raises(TokenUnavailable, match="expires within 300s"):
        asyncio.run(scenario())


def test_waiting_for_a_token_is_bounded():
    async def scenario():
        _, credential, cache = make(wait_timeout=0.05)
        credential.gate = asyncio.Event()  # never opens
        started = time.perf_counter()
        try:
            await cache.get(ME, SCOPE)
        finally:
            elapsed = time.perf_counter() - started
            await cache.close()
        return elapsed

    with pytest.raises(TokenUnavailable, match=r"within 0\.05s"):
        asyncio.run(scenario())


def test_failure_reasons_never_carry_secrets():
    secret_jwt = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJ4In0.c2lnbmF0dXJlLWJ5dGVz"

    async def scenario():
        _, credential, cache = make()
        credential.fail = RuntimeError(f"bad response: {{'access_token': '{secret_jwt}'}}")
        try:
            await cache.get(ME, SCOPE)
        finally:
            await cache.close()

    with pytest.raises(TokenUnavailable) as caught:
        asyncio.run(scenario())
    assert secret_jwt not in str(caught.value)
    assert "RuntimeError" in str(caught.value)


def test_invalidate_forces_a_new_fetch():
    async def scenario():
        _, credential, cache = make()
        first = await cache.get(ME, SCOPE)
        cache.invalidate(ME, SCOPE)
        second = await cache.get(ME, SCOPE)
        await cache.close()
        return first, second, len(credential.calls)

    assert asyncio.run(scenario()) == ("token-1", "token-2", 2)


def test_an_idle_cache_refreshes_on_its_own_timer():
    async def scenario():
        credential = FakeCredential(Clock(), lifetime=3600, refresh_after=None)
        credential.clock = time.time  # type: ignore[assignment]
        cache = TokenCache(credential, expiry_margin=3599.8)  # real clock
        await cache.get(ME, SCOPE)
        await asyncio.sleep(0.5)  # no requests meanwhile
        calls = len(credential.calls)
        await cache.close()
        return calls

    assert asyncio.run(scenario()) >= 2


def test_an_unchanged_token_from_the_source_does_not_cause_a_refresh_loop():
    # azure-identity answers a refresh with its own cached token while its refresh fails;
    # keyless must keep serving it and wait the retry pause, not ask again and again.
    async def scenario():
        clock, credential, cache = make(refresh_retry=30)
        first = await cache.get(ME, SCOPE)
        same = Info("token-1", int(clock.now) + 3600, None)

        async def unchanged(identity, scope):
            credential.calls.append((identity, scope))
            return same

        cache._source = unchanged  # the source now only ever returns the old token
        clock.now += 1801
        served = []
        for _ in range(50):
            served.append(await cache.get(ME, SCOPE))
            await settle()
        calls_in_pause = len(credential.calls)
        clock.now += 31
        await cache.get(ME, SCOPE)
        await settle()
        await cache.close()
        return first, set(served), calls_in_pause, len(credential.calls)

    first, served, calls_in_pause, calls = asyncio.run(scenario())
    assert served == {first}
    assert calls_in_pause == 2  # the first fetch and one refresh, not fifty
    assert calls == 3


def test_a_token_that_would_expire_before_valid_until_is_replaced():
    clock, credential, cache = make(lifetime=3600)

    async def scenario() -> None:
        first = await cache.get_token(ME, SCOPE)
        # valid long enough: the cached token serves
        assert (await cache.get_token(ME, SCOPE, valid_until=first.expires_on - 1)) == first
        assert len(credential.calls) == 1
        clock.now += 1200  # the cached token now expires in 40 minutes
        fresh = await cache.get_token(ME, SCOPE, valid_until=clock.now + 3000)
        assert fresh.value == "token-2" and fresh.expires_on >= clock.now + 3000
        assert len(credential.calls) == 2
        assert (await cache.get_token(ME, SCOPE)) == fresh  # and it is the one cached now
        await cache.close()

    asyncio.run(scenario())


def test_a_token_inside_the_margin_makes_the_credential_fetch_afresh_once() -> None:
    """azure-identity hands back its cached token until 300 s before expiry: one inside a
    larger margin is unusable, and a fresh credential is asked once."""
    clock, forgotten = Clock(), []
    answers = [Info("cached", int(clock.now) + 100), Info("fresh", int(clock.now) + 3600)]

    async def source(identity: Identity, scope: str) -> Info:
        return answers.pop(0)

    async def run() -> str:
        cache = TokenCache(source, clock=clock, expiry_margin=300, forget=forgotten.append)
        try:
            return await cache.get(ME, SCOPE)
        finally:
            await cache.close()

    assert asyncio.run(run()) == "fresh" and forgotten == [ME]


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 1800.0), (0.5, 1710.0), (1.0, 1620.0)])
def test_refreshes_come_earlier_by_up_to_a_tenth_at_random(draw: float, expected: float) -> None:
    clock = Clock()
    credential = FakeCredential(clock, lifetime=3600, refresh_after=1800)

    async def run() -> float:
        cache = TokenCache(credential, clock=clock, uniform=lambda: draw)
        try:
            return (await cache.get_token(ME, SCOPE)).refresh_on - clock.now
        finally:
            await cache.close()

    assert asyncio.run(run()) == pytest.approx(expected)
