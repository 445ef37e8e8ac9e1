"""When Azure refuses a converted request, say why: which role to assign for a missing role,
what the service said instead for the other refusals (network rules, a rejected token, ...)."""

from __future__ import annotations

import logging

from mitmproxy import http

from proxy import metrics
from proxy.diagnosis import RefusalKind, read_refusal
from proxy.flowstate import converted
from proxy.roles import ROLES, operation_kind

logger = logging.getLogger(__name__)


class DiagnoseDenials:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Refusals are small: keep their body (instead of streaming it) to read the reason.
        if converted(flow) and flow.response is not None \
                and flow.response.status_code in (401, 403):
            flow.response.stream = False

    def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        state = converted(flow)
        if state is None or response is None:
            return
        service = state.service
        refusal = read_refusal(service, response.status_code, response.headers.get,
                               response.raw_content or b"")
        if refusal is None:
            return
        operation = operation_kind(service, flow.request.method, flow.request.path,
                                   flow.request.headers.get)
        if refusal.kind is not RefusalKind.MISSING_ROLE:
            # A 401 is the token replay's business, unless it says keys are off: a keyless bug.
            if response.status_code == 403 or refusal.kind is RefusalKind.LOCAL_AUTH_DISABLED:
                metrics.UPSTREAM_REFUSALS.labels(service=service, kind=refusal.kind.value).inc()
                logger.warning("Refused: identity %s may not %s on %s %s (%s, %s): %s",
                               state.identity_label, operation, service, state.resource,
                               response.status_code, refusal.code, refusal.meaning)
            return
        metrics.AUTHORIZATION_DENIALS.labels(service=service).inc()
        roles = ROLES.get(service)
        role = (roles.write if operation == "write" else roles.read) if roles else "a data role"
        logger.warning(
            "RBAC: identity %s may not %s on %s %s (%s, %s): assign the built-in role "
            "'%s' to it on that resource (keyless report prints the commands)",
            state.identity_label, operation, service, state.resource, response.status_code,
            refusal.code, role,
        )
