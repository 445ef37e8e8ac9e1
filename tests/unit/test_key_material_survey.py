"""Key material the survey found beyond the Authorization header: Service Bus' supplementary
SAS headers (forward_to) and Event Grid namespaces' `SharedAccessKey` (the installed
azure-eventgrid sends it; its request is made by the SDK itself here)."""

from __future__ import annotations

import pytest
from azure.core.credentials import AzureKeyCredential
from azure.core.pipeline.transport import HttpRequest
from azure.eventgrid import EventGridPublisherClient
from mitmproxy.test import tutils

from proxy.catalog import Catalog, builtin_services
from tests.support.sdk_capture import KeepRequests, StaticCredential

CATALOG = Catalog(builtin_services("3a3a3a3a-0000-4000-8000-00000000a71a", True))
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJ4In0.c2ln"
SAS = ("SharedAccessSignature sr=https%3a%2f%2fbus.servicebus.windows.net%2ftarget"
       "&sig=c2ln&se=1&skn=Root")


def converted(host: str, method: bytes, path: str, headers: dict[str, str]):
    request = tutils.treq(method=method, host=host, port=443, path=path.encode(),
                          headers=tuple((k.encode(), v.encode()) for k, v in headers.items()))
    target = CATALOG.match(host, path)
    assert target is not None and target.service.conversion is not None
    stripped = target.service.conversion.strip(request)
    assert stripped is not None
    target.service.conversion.attach(request, TOKEN, stripped)
    return target, request, stripped


def test_service_bus_forward_to_sas_headers_get_the_token():
    target, request, stripped = converted(
        "bus.servicebus.windows.net", b"PUT", "/source?api-version=2021-05",
        {"Authorization": SAS, "ServiceBusSupplementaryAuthorization": SAS,
         "ServiceBusDlqSupplementaryAuthorization": SAS, "content-type": "application/atom+xml"})
    assert target.service.name == "servicebus"
    assert set(stripped.schemes) == {"SharedAccessSignature", "SupplementarySAS"}
    for name in ("authorization", "servicebussupplementaryauthorization",
                 "servicebusdlqsupplementaryauthorization"):
        assert request.headers[name] == f"Bearer {TOKEN}"
    assert "sig=" not in str(request.headers)


def test_a_supplementary_header_that_is_not_a_sas_is_left_alone():
    _, request, _ = converted("bus.servicebus.windows.net", b"PUT", "/q?api-version=2021-05",
                              {"Authorization": SAS,
                               "ServiceBusSupplementaryAuthorization": "Bearer apps-own"})
    assert request.headers["servicebussupplementaryauthorization"] == "Bearer apps-own"


def namespace_publish(credential: object) -> HttpRequest:
    keep = KeepRequests()
    client = EventGridPublisherClient("https://ns1.westus2-1.eventgrid.azure.net", credential,
                                      namespace_topic="orders", transport=keep, retry_total=0)
    with pytest.raises(ConnectionAbortedError):
        client.send({"id": "1", "source": "s", "type": "t", "specversion": "1.0"})
    (request,) = keep.kept
    return request


def test_event_grid_namespace_key_becomes_what_entra_mode_sends():
    keyed = namespace_publish(AzureKeyCredential("dummy-namespace-key"))
    entra = namespace_publish(StaticCredential(TOKEN))
    assert keyed.headers["Authorization"] == "SharedAccessKey dummy-namespace-key"
    path = keyed.url.split(".net", 1)[1]
    target, request, stripped = converted("ns1.westus2-1.eventgrid.azure.net", b"POST", path,
                                          dict(keyed.headers))
    assert target.service.name == "eventgrid" and stripped.schemes == ("SharedAccessKey",)
    assert target.scope == "https://eventgrid.azure.net/.default"
    assert request.headers["authorization"] == entra.headers["Authorization"]
    assert "dummy-namespace-key" not in str(request.headers)


def test_stripping_alone_removes_the_supplementary_sas():
    service = CATALOG.by_name("servicebus")
    assert service is not None and service.conversion is not None
    request = tutils.treq(method=b"PUT", host="bus.servicebus.windows.net", path=b"/q",
                          headers=((b"ServiceBusDlqSupplementaryAuthorization", SAS.encode()),))
    assert service.conversion.strip(request) is not None
    assert "servicebusdlqsupplementaryauthorization" not in request.headers
