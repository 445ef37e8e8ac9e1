"""A refusal that means "the identity lacks a role" explains itself: one log line, a metric."""

from __future__ import annotations

import json
import re

import pytest
import requests

from tests.e2e.conftest import FAKE_HOSTS
from tests.support.fake_azure import Expect, FakeAzure, FakeRequest, FakeResponse

pytestmark = pytest.mark.e2e


def refusal(status: int, body: dict, **headers: str):
    def handler(request: FakeRequest) -> FakeResponse:
        if request.path.startswith("/network-rules"):  # a 403 that is not about roles
            return FakeResponse.json({"error": {"code": "AuthorizationFailure"}}, 403,
                                     **{"x-ms-error-code": "AuthorizationFailure"})
        return FakeResponse.json(body, status, **headers)
    return handler


DENIALS = {
    # service: (host, audience, request, expected role, the service's refusal)
    "storage-blob": (FAKE_HOSTS["denied-storage"], "https://storage.azure.com",
                     ("PUT", "/c/b", {"Authorization": "SharedKey denied:c2ln"}),
                     "Storage Blob Data Contributor",
                     refusal(403, {"error": "This request is not authorized to perform this "
                                            "operation using this permission."},
                             **{"x-ms-error-code": "AuthorizationPermissionMismatch"})),
    "cosmos": (FAKE_HOSTS["denied-cosmos"], "https://deniedcosmos.documents.azure.com",
               ("GET", "/dbs/db/colls/c/docs/1",
                {"authorization": "type%3Dmaster%26ver%3D1.0%26sig%3Dc2ln"}),
               "Cosmos DB Built-in Data Reader",
               refusal(403, {"code": "Forbidden", "message": "Request blocked by Auth"},
                       **{"x-ms-substatus": "5301"})),
    "openai": (FAKE_HOSTS["denied-openai"], "https://cognitiveservices.azure.com",
               ("POST", "/openai/deployments/d/chat/completions?api-version=2024-10-21",
                {"api-key": "k"}),
               "Cognitive Services OpenAI User",
               refusal(403, {"error": {"code": "PermissionDenied",
                                       "message": "The principal lacks the required data "
                                                  "action"}})),
    "servicebus": (FAKE_HOSTS["denied-servicebus"], "https://servicebus.azure.net",
                   ("POST", "/q/messages", {"Authorization": "SharedAccessSignature sr=x&sig=y"}),
                   "Azure Service Bus Data Sender",
                   refusal(401, {"error": {"code": 401, "message": "Unauthorized access. "
                                           "'Send' claim(s) are required to perform this "
                                           "operation."}})),
    "search": (FAKE_HOSTS["denied-search"], "https://search.azure.com",
               ("GET", "/indexes/i/docs?api-version=2024-07-01&search=*", {"api-key": "k"}),
               "Search Index Data Reader",
               refusal(403, {"error": {"code": "Forbidden", "message": "Forbidden"}})),
}


@pytest.fixture(scope="module")
def denials(fake_azure: FakeAzure) -> dict:
    if not getattr(fake_azure, "_denials_registered", False):
        for service, (host, audience, _, _, handler) in DENIALS.items():
            token_form = "cosmos" if service == "cosmos" else "bearer"
            fake_azure.add(re.escape(host), Expect(audience=audience, auth_format=token_form),
                           handler)
        fake_azure._denials_registered = True  # type: ignore[attr-defined]
    return DENIALS


def denial_count(keyless, service: str) -> float:
    return keyless.metric("keyless_authorization_denials_total", service=service)


def rbac_lines(keyless) -> list[str]:
    lines = []
    for line in keyless.log().splitlines():
        try:
            message = json.loads(line)["message"]
        except (ValueError, KeyError):
            message = line
        if message.startswith("RBAC:"):
            lines.append(message)
    return lines


@pytest.mark.parametrize("service", sorted(DENIALS))
def test_rbac_refusal_names_identity_resource_and_role(through_keyless, denials, service):
    host, _, (method, path, headers), role, _ = denials[service]
    before_lines, before_count = len(rbac_lines(through_keyless)), denial_count(
        through_keyless, service)
    response = requests.request(method, f"https://{host}{path}", headers=headers, timeout=10)
    assert response.status_code in (401, 403)  # the service's answer reaches the app as is
    new = rbac_lines(through_keyless)[before_lines:]
    assert len(new) == 1, new
    resource = host.split(".")[0]
    assert "identity default may not" in new[0] and f"{service} {resource}" in new[0]
    assert f"'{role}'" in new[0]
    assert denial_count(through_keyless, service) == before_count + 1


def test_a_403_that_is_not_about_roles_is_not_called_one(through_keyless, denials):
    host = FAKE_HOSTS["denied-storage"]
    before = len(rbac_lines(through_keyless))
    response = requests.get(f"https://{host}/network-rules/b", timeout=10,
                            headers={"Authorization": "SharedKey denied:c2ln"})
    assert response.status_code == 403
    assert len(rbac_lines(through_keyless)) == before
