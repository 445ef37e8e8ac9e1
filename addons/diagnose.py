"""When Azure refuses a converted request for lack of a role, say which role to assign."""

from __future__ import annotations

import logging

from mitmproxy import http

from proxy import metrics
from proxy.diagnosis import rbac_denial
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
        reason = rbac_denial(service, response.status_code, response.headers.get,
                             response.raw_content or b"")
        if reason is None:
            return
        metrics.AUTHORIZATION_DENIALS.labels(service=service).inc()
        operation = operation_kind(service, flow.request.method, flow.request.path,
                                   flow.request.headers.get)
        roles = ROLES.get(service)
        role = (roles.write if operation == "write" else roles.read) if roles else "a data role"
        logger.warning(
            "RBAC: identity %s may not %s on %s %s (%s, %s): assign the built-in role "
            "'%s' to it on that resource (keyless report prints the commands)",
            state.identity_label, operation, service, state.resource, response.status_code,
            reason, role,
        )
