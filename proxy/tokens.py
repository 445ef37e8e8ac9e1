"""The token cache: one Entra token per (identity, scope), fetched once, refreshed early.

azure-identity's own caching does not single-flight concurrent misses and its async path
stops serving a token at `refresh_on`, so keyless keeps its own cache:

- entries live in a cachetools `TLRUCache` whose per-entry expiry is the token's `expires_on`
  minus a safety margin, so a token that expires within the margin is never handed out;
- concurrent misses for one key share one fetch;
- at `refresh_on` the token is refreshed in the background while the current one keeps
  serving; a failed refresh keeps the still-valid token and is retried after a pause;
- a request waits at most `wait_timeout` seconds for a token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from cachetools import TLRUCache

from proxy import metrics
from proxy.redact import redact

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Identity:
    """Which managed identity a token is for: a user-assigned client id, or the default one."""

    client_id: str | None = None

    @property
    def label(self) -> str:
        return self.client_id or "default"


class TokenInfo(Protocol):
    """What a credential returns (azure-core's `AccessTokenInfo` has these)."""

    token: str
    expires_on: int
    refresh_on: int | None


TokenSource = Callable[[Identity, str], Awaitable[TokenInfo]]
Key = tuple[Identity, str]


@dataclass(frozen=True, slots=True)
class Token:
    value: str = field(repr=False)
    expires_on: float
    refresh_on: float


class TokenUnavailable(Exception):
    """No usable token could be had. The message is safe to show: it never holds a secret."""


class TokenCache:
    def __init__(
        self,
        source: TokenSource,
        *,
        clock: Callable[[], float] = time.time,
        expiry_margin: float = 300.0,
        wait_timeout: float = 10.0,
        refresh_retry: float = 30.0,
        maxsize: int = 1024,
        forget: Callable[[Identity], None] | None = None,
        count_fetches: bool = True,
        count_lookups: bool = True,
    ) -> None:
        # --workers: a worker's fetches go to the supervisor, whose lookups are the workers'
        # fetches; each side counts only what means something at its level
        self._count_fetches, self._count_lookups = count_fetches, count_lookups
        self._source = source
        self._forget = forget
        self._invalidated_at: dict[Key, float] = {}
        self._clock = clock
        self._margin = expiry_margin
        self._wait_timeout = wait_timeout
        self._refresh_retry = refresh_retry
        self._cache: TLRUCache[Key, Token] = TLRUCache(
            maxsize, ttu=lambda _key, token, _now: token.expires_on - self._margin, timer=clock
        )
        self._inflight: dict[Key, asyncio.Task[Token]] = {}
        self._refresh_failed_at: dict[Key, float] = {}
        self._timers: dict[Key, asyncio.TimerHandle] = {}

    async def get(self, identity: Identity, scope: str) -> str:
        """A token valid for more than the margin, from the cache or a (shared) fetch."""
        return (await self.get_token(identity, scope)).value

    async def get_token(self, identity: Identity, scope: str,
                        valid_until: float | None = None) -> Token:
        """`get` with the token's expiry and refresh time (a listener schedules its
        re-authentication by them). `valid_until`: a cached token that expires earlier is
        not used; a fresh one is fetched (an AMQP put-token must outlive the SAS it
        replaces, since the client renews on the SAS's schedule)."""
        key = (identity, scope)
        token = self._cache.get(key)
        if token is not None and valid_until is not None and token.expires_on < valid_until \
                and key not in self._inflight and self.invalidate(identity, scope):
            # invalidate() also makes the credential forget its own copy (it would hand the
            # same token back), at most once per 30 s per key: an identity whose tokens are
            # all shorter keeps serving the one it has
            token = None
        if token is not None:
            if self._count_lookups:
                metrics.TOKEN_CACHE.labels(result="hit").inc()
            if self._clock() >= token.refresh_on:
                self._refresh(key)
            return token
        if self._count_lookups:
            metrics.TOKEN_CACHE.labels(result="miss").inc()
        task = self._inflight.get(key) or self._start_fetch(key)
        try:
            token = await asyncio.wait_for(asyncio.shield(task), self._wait_timeout)
        except TimeoutError:
            raise TokenUnavailable(
                f"no token for scope {scope} (identity {identity.label}) "
                f"within {self._wait_timeout:g}s"
            ) from None
        return token

    def invalidate(self, identity: Identity, scope: str, min_interval: float = 30.0) -> bool:
        """Forget a token the service rejected, so the next request fetches afresh.

        At most once per `min_interval` per key: a service that rejects every token must not
        turn each request into a token fetch. Returns whether the token was forgotten.
        """
        key = (identity, scope)
        now = self._clock()
        if now - self._invalidated_at.get(key, float("-inf")) < min_interval:
            return False
        self._invalidated_at[key] = now
        self._cache.pop(key, None)
        if self._forget is not None:
            self._forget(identity)  # the credential's own cache would hand the token back
        return True

    def peek(self) -> dict[Key, Token]:
        """The usable tokens now cached (for metrics and readiness; values stay inside)."""
        return {key: token for key, token in list(self._cache.items())}

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._inflight.values()):
            task.cancel()
        self._inflight.clear()

    def _start_fetch(self, key: Key) -> asyncio.Task[Token]:
        task = asyncio.get_running_loop().create_task(self._fetch(key))
        self._inflight[key] = task
        task.add_done_callback(lambda t: self._fetch_done(key, t))
        return task

    def _fetch_done(self, key: Key, task: asyncio.Task[Token]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled() and task.exception() is not None:
            self._refresh_failed_at[key] = self._clock()
            if key in self._cache:  # a refresh failed: retry later while the token still serves
                self._refresh_in(key, self._refresh_retry)

    async def _fetch(self, key: Key) -> Token:
        identity, scope = key
        started = time.perf_counter()
        try:
            info = await self._source(identity, scope)
        except (asyncio.CancelledError, TokenUnavailable):
            raise  # a TokenUnavailable already says why (--workers: the supervisor's reason)
        except Exception as exc:  # any credential failure becomes a clear, secret-free reason
            self._fetched("error")
            reason = redact(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            logger.warning("token fetch failed for scope %s (identity %s): %s",
                           scope, identity.label, reason)
            raise TokenUnavailable(
                f"could not get a token for scope {scope} (identity {identity.label}): {reason}"
            ) from None
        finally:
            if self._count_fetches:
                metrics.TOKEN_FETCH_SECONDS.observe(time.perf_counter() - started)
        now = self._clock()
        expires_on = float(info.expires_on)
        if expires_on - self._margin <= now:
            self._fetched("expired")
            raise TokenUnavailable(
                f"the token for scope {scope} (identity {identity.label}) expires within "
                f"{self._margin:g}s of issue"
            )
        current = self._cache.get(key)
        if current is not None and expires_on <= current.expires_on:
            # The source handed back the token we have (azure-identity serves its own cached
            # token while its refresh is failing or paused): keep it, and ask again only after
            # the retry pause, so an unchanged token never turns into a tight refresh loop.
            self._fetched("unchanged")
            postponed = replace(current, refresh_on=now + self._refresh_retry)
            self._cache[key] = postponed
            self._refresh_in(key, self._refresh_retry)
            return postponed
        refresh_on = float(info.refresh_on) if info.refresh_on else now + (expires_on - now) / 2
        # Refresh no later than half-way into the margin-free lifetime left, so a slow or
        # failing refresh still has time before the token stops being served.
        usable_until = expires_on - self._margin
        refresh_on = min(refresh_on, usable_until - (usable_until - now) / 4)
        token = Token(info.token, expires_on, refresh_on)
        self._cache[key] = token
        self._refresh_failed_at.pop(key, None)
        # Idle sidecars refresh too: a timer fires at refresh_on even without traffic.
        self._refresh_in(key, max(0.0, refresh_on - now))
        self._fetched("ok")
        logger.info("token cached for scope %s (identity %s), expires in %ds",
                    scope, identity.label, int(expires_on - now))
        return token

    def _fetched(self, result: str) -> None:
        if self._count_fetches:
            metrics.TOKEN_FETCHES.labels(result=result).inc()

    def _refresh_in(self, key: Key, delay: float) -> None:
        if old := self._timers.pop(key, None):
            old.cancel()
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._refresh, key)

    def _refresh(self, key: Key) -> None:
        if key in self._inflight:
            return
        failed_at = self._refresh_failed_at.get(key)
        recently_failed = failed_at is not None and self._clock() - failed_at < self._refresh_retry
        if recently_failed and key in self._cache:
            return  # a valid token still serves; try again after the pause
        task = self._start_fetch(key)
        # A failed background refresh is logged in _fetch; the current token keeps serving.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
