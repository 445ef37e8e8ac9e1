"""Swap key-based auth for a managed-identity token on requests to Azure catalog hosts."""

from __future__ import annotations

import logging
import time

from mitmproxy import http

from addons.answers import catalog_host, destination, keyless_answer
from proxy import metrics
from proxy.audit import CallKey, CallLog
from proxy.catalog import CHALLENGE_SCOPE, Catalog, Service, Target
from proxy.challenge import ChallengeScopes
from proxy.errors import (
    MISDIRECTED,
    NOT_CONFIGURED,
    PLAIN_HTTP,
    TOKEN_UNAVAILABLE,
)
from proxy.flowstate import flow_state, start_state
from proxy.roles import operation_kind
from proxy.tokens import Identity, TokenCache, TokenUnavailable

logger = logging.getLogger(__name__)


class AzureAuth:
    """requestheaders: match the catalog, strip key material, attach a token, or refuse."""

    def __init__(self, catalog: Catalog, tokens: TokenCache, identity: Identity,
                 calls: CallLog | None = None, audit: bool = False) -> None:
        self.catalog = catalog
        self.tokens = tokens
        self.identity = identity
        self.calls = calls or CallLog(None)
        self.audit = audit
        self.challenges = ChallengeScopes()
        self._reported: set[str] = set()

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        target = self.catalog.match(catalog_host(flow), flow.request.path)
        if target is None:
            return
        started = time.perf_counter()
        try:
            await self._handle(flow, target)
        finally:
            metrics.ADDED_SECONDS.observe(time.perf_counter() - started)

    async def _handle(self, flow: http.HTTPFlow, target: Target) -> None:
        service = target.service
        state = start_state(flow, service.name, target.resource)
        if service.conversion is None:
            self._report_unsupported(catalog_host(flow), target)
            return
        if self.audit:
            self._audit(flow, target)
            return
        host = destination(flow).agreed_host()
        if host is None or host != catalog_host(flow):
            # Plain HTTP, or names that disagree: never a token. A key is never forwarded
            # either: such a request is refused when it carries key material.
            self._refuse_if_keyed(flow, service)
            return
        scope = self._scope(host, target)
        if scope is None:
            self._count(service.name, "passed_through")
            logger.info("%s: scope not known yet; learning it from the service's challenge",
                        service.name)
            return
        stripped = service.conversion.strip(flow.request)
        if stripped is None:
            self._count(service.name, "passed_through")
            return
        for scheme in stripped.schemes:
            metrics.KEY_MATERIAL_STRIPPED.labels(service=service.name, scheme=scheme).inc()
        if service.not_configured:
            self._refuse(flow, service.name, NOT_CONFIGURED, service.not_configured)
            return
        try:
            token = await self.tokens.get(service.identity or self.identity, scope)
        except TokenUnavailable as exc:
            self._refuse(flow, service.name, TOKEN_UNAVAILABLE, str(exc))
            return
        conversion = service.conversion
        conversion.attach(flow.request, token, stripped)
        state.converted, state.scope = True, scope
        state.identity = service.identity or self.identity
        state.reattach = lambda request, fresh: conversion.attach(request, fresh, stripped)
        self._count(service.name, "converted")
        self._record(flow, target, stripped.schemes, "converted")

    def _audit(self, flow: http.HTTPFlow, target: Target) -> None:
        """Change nothing; note the key-based call (found on a copy of the request)."""
        assert target.service.conversion is not None
        stripped = target.service.conversion.strip(flow.request.copy())
        if stripped is None:
            self._count(target.service.name, "passed_through")
            return
        self._count(target.service.name, "audited")
        self._record(flow, target, stripped.schemes, "audited")

    def _record(self, flow: http.HTTPFlow, target: Target, schemes: tuple[str, ...],
                handled: str) -> None:
        identity = (target.service.identity or self.identity).label
        operation = operation_kind(target.service.name, flow.request.method, flow.request.path,
                                   flow.request.headers.get)
        for scheme in schemes:
            self.calls.record(CallKey(target.service.name, target.resource,
                                      catalog_host(flow), scheme, operation, identity,
                                      handled))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or response.status_code != 401:
            return
        host = catalog_host(flow)
        target = self.catalog.match(host, flow.request.path)
        if target is None or target.service.scope != CHALLENGE_SCOPE:
            return
        if destination(flow).agreed_host() != host:
            return
        for challenge in response.headers.get_all("www-authenticate"):
            if scope := self.challenges.learn(host, challenge):
                logger.info("%s: learned scope %s from the service's challenge",
                            target.service.name, scope)
                return

    def _refuse_if_keyed(self, flow: http.HTTPFlow, service: Service) -> None:
        assert service.conversion is not None
        if service.conversion.strip(flow.request) is None:
            self._count(service.name, "passed_through")  # no key: on as the app sent it
            return
        if flow.request.scheme != "https" or not flow.client_conn.tls_established:
            self._refuse(flow, service.name, PLAIN_HTTP,
                         "keyless converts keys only over HTTPS; use https:// for "
                         f"{flow.request.host}", status=403)
        else:
            self._refuse(flow, service.name, MISDIRECTED,
                         "the CONNECT target, TLS server name and Host header must name the "
                         "same Azure host on port 443", status=421)

    def _scope(self, host: str, target: Target) -> str | None:
        if target.service.scope == CHALLENGE_SCOPE:
            return self.challenges.get(host)
        return target.scope

    def _report_unsupported(self, host: str, target: Target) -> None:
        self._count(target.service.name, "unsupported")
        if host not in self._reported:  # once per host: the metric counts the rest
            self._reported.add(host)
            logger.warning("%s: %s is not converted: %s", target.service.name, host,
                           target.service.note)

    @staticmethod
    def _count(service: str, outcome: str) -> None:
        metrics.REQUESTS.labels(service=service, outcome=outcome).inc()

    def _refuse(self, flow: http.HTTPFlow, service: str, code: str, reason: str,
                status: int = 503) -> None:
        # Fail closed: answer the app ourselves; the request (and its key) goes nowhere.
        flow.request.stream = False  # mitmproxy cannot stream a request it answers itself
        flow.response = keyless_answer(status, code, reason)
        if (state := flow_state(flow)) is not None:
            state.refused = True
        self._count(service, "refused")
        logger.error("%s %s refused: %s", service, flow.request.method, reason)
