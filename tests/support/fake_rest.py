"""REST fakes for Service Bus, Event Hubs, Communication Services, Maps, SignalR, Key Vault and
a custom Storage route, registered on the shared `FakeAzure`; and builders for the key-based
credentials legacy apps put on those requests (SAS, HMAC-SHA256, HS256 JWT, Shared Key).

Every fake checks the converted request with `fake_azure.check` (no key material left, Bearer,
token audience, identity) before it answers like the service does. Each `register_*` function
registers its host once per `FakeAzure`, so test modules and benchmarks can all call it.

The builders follow the services' REST documentation; the keys are dummies (nothing verifies a
signature: the fakes only accept Entra tokens, the point of keyless).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
import uuid
from collections import defaultdict, deque
from email.utils import formatdate
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

from tests.support.fake_azure import Expect, FakeAzure, FakeRequest, FakeResponse, check
from tests.support.identity_endpoint import SYSTEM_ASSIGNED_CLIENT_ID, TENANT_ID

SERVICEBUS_RESOURCE = "https://servicebus.azure.net"
EVENTHUBS_RESOURCE = "https://eventhubs.azure.net"
COMMUNICATION_RESOURCE = "https://communication.azure.com"
MAPS_RESOURCE = "https://atlas.microsoft.com"
SIGNALR_RESOURCE = "https://signalr.azure.com"
KEYVAULT_RESOURCE = "https://vault.azure.net"
STORAGE_RESOURCE = "https://storage.azure.com"

# Dummy keys, in the shapes the services hand out (base64 of 32 random-looking bytes).
DUMMY_SAS_KEY_NAME = "RootManageSharedAccessKey"
DUMMY_SAS_KEY = base64.b64encode(b"keyless-dummy-servicebus-key-32b").decode()
DUMMY_COMMUNICATION_KEY = base64.b64encode(b"keyless-dummy-communication-key!").decode()
DUMMY_SIGNALR_KEY = base64.b64encode(b"keyless-dummy-signalr-access-key").decode()
DUMMY_STORAGE_KEY = base64.b64encode(b"keyless-dummy-storage-account-ky" * 2).decode()
DUMMY_MAPS_KEY = "keyless-dummy-maps-subscription-key"

KEYVAULT_CHALLENGE = (
    f'Bearer authorization="https://login.microsoftonline.com/{TENANT_ID}", '
    f'resource="{KEYVAULT_RESOURCE}"'
)
# keyless' default for the shared *.servicebus.windows.net suffix: these paths name an event hub.
EVENTHUBS_PATH = re.compile(r"^/[^/?]+/(?:partitions|publishers|consumergroups)/")


# -- legacy credentials ------------------------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def servicebus_sas(resource_uri: str, key: str = DUMMY_SAS_KEY,
                   key_name: str = DUMMY_SAS_KEY_NAME, expiry: int | None = None) -> str:
    """The `Authorization` value of a Service Bus / Event Hubs REST call, the documented way.

    string-to-sign = url-encoded resource URI + "\\n" + expiry; sig = base64(HMAC-SHA256(key,
    string-to-sign)), URL-encoded; the key is used as its UTF-8 bytes (not base64-decoded).
    """
    se = str(expiry if expiry is not None else int(time.time()) + 3600)
    sr = quote_plus(resource_uri)
    digest = hmac.new(key.encode(), f"{sr}\n{se}".encode(), hashlib.sha256).digest()
    sig = quote(base64.b64encode(digest).decode(), safe="")
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={key_name}"


def communication_hmac_headers(method: str, url: str, body: bytes,
                               access_key: str = DUMMY_COMMUNICATION_KEY,
                               date: str | None = None) -> dict[str, str]:
    """Headers of a Communication Services call signed with the access key (HMAC-SHA256).

    string-to-sign = VERB + "\\n" + path-and-query + "\\n" + x-ms-date;host;x-ms-content-sha256
    values; the key is base64-decoded first.
    """
    parts = urlsplit(url)
    path_and_query = parts.path + (f"?{parts.query}" if parts.query else "")
    date = date or formatdate(usegmt=True)
    content_hash = base64.b64encode(hashlib.sha256(body).digest()).decode()
    to_sign = f"{method.upper()}\n{path_and_query}\n{date};{parts.netloc};{content_hash}"
    signature = base64.b64encode(
        hmac.new(base64.b64decode(access_key), to_sign.encode(), hashlib.sha256).digest()
    ).decode()
    return {
        "x-ms-date": date,
        "x-ms-content-sha256": content_hash,
        "Authorization": "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256"
                         f"&Signature={signature}",
    }


def signalr_jwt(audience: str, access_key: str = DUMMY_SIGNALR_KEY, lifetime: int = 3600,
                **claims: Any) -> str:
    """An HS256 JWT signed with the SignalR access key, as a server REST call carries it.

    `audience` is the request URL without query string or trailing slash.
    """
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT"}
    payload = {"aud": audience, "iat": now, "nbf": now, "exp": now + lifetime, **claims}
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, payload)
    )
    signature = hmac.new(access_key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64url(signature)}"


def storage_shared_key(account: str, method: str, path: str, headers: dict[str, str],
                       key: str = DUMMY_STORAGE_KEY) -> str:
    """`SharedKey account:sig` over the canonicalized x-ms-* headers and resource."""
    ms_headers = "".join(f"{k.lower()}:{v}\n" for k, v in sorted(headers.items())
                         if k.lower().startswith("x-ms-"))
    to_sign = "\n".join([method, "", "", headers.get("Content-Length", ""), "", "",
                         "", "", "", "", "", ""]) + "\n" + ms_headers + f"/{account}{path}"
    digest = hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest()
    return f"SharedKey {account}:{base64.b64encode(digest).decode()}"


def jwt_header(token: str) -> dict[str, Any]:
    head = token.split(".", 1)[0]
    result: dict[str, Any] = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    return result


def bearer_of(request: FakeRequest) -> str | None:
    value = request.header("authorization") or ""
    return value[len("Bearer "):] if value.startswith("Bearer ") else None


# -- shared fake plumbing ----------------------------------------------------------------------

def _first_time(fake: FakeAzure, name: str) -> bool:
    """True once per (fake, name): registrations are session-wide."""
    done: set[str] = fake.__dict__.setdefault("_fake_rest_registered", set())
    if name in done:
        return False
    done.add(name)
    return True


def refuse_unless(fake: FakeAzure, request: FakeRequest, expect: Expect,
                  **headers: str) -> FakeResponse | None:
    """`check` the request as FakeAzure would; on problems record them and answer 401."""
    problems = check(request, expect)
    if not problems:
        return None
    fake.problems.append((request.host, request.path, problems))
    return FakeResponse.json({"error": {"code": "FakeAzureCheckFailed",
                                        "message": "; ".join(problems)}}, 401, **headers)


def _entra_signed(request: FakeRequest) -> list[str]:
    """An Entra access token is RS256; an HS256 one was signed with the service's own key."""
    token = bearer_of(request)
    if token is None or token.count(".") != 2:
        return []  # `check` reports the missing or malformed token
    try:
        alg = jwt_header(token).get("alg")
    except ValueError as exc:
        return [f"token header undecodable: {exc}"]
    return [] if alg == "RS256" else [f"token alg {alg!r}: not an Entra token (RS256)"]


def _error(status: int, code: str, message: str) -> FakeResponse:
    return FakeResponse.json({"error": {"code": code, "message": message}}, status)


def _path_parts(request: FakeRequest) -> list[str]:
    return [p for p in urlsplit(request.path).path.split("/") if p]


# -- Service Bus and Event Hubs ----------------------------------------------------------------

def servicebus_audience(path: str) -> str:
    """The audience the shared-suffix namespace wants for `path` (keyless' default rule)."""
    return EVENTHUBS_RESOURCE if EVENTHUBS_PATH.match(path) else SERVICEBUS_RESOURCE


class _Messaging:
    """Queues (Service Bus) and event hubs (Event Hubs) of one namespace, in memory."""

    def __init__(self, fake: FakeAzure, event_hubs_namespace: bool) -> None:
        self.fake = fake
        self.event_hubs_namespace = event_hubs_namespace
        self.queues: dict[str, deque[tuple[bytes, dict[str, Any], str]]] = defaultdict(deque)
        self.events: dict[str, list[bytes]] = defaultdict(list)
        self.sequence = 0
        self.lock = threading.Lock()

    def __call__(self, request: FakeRequest) -> FakeResponse:
        path = urlsplit(request.path).path
        audience = EVENTHUBS_RESOURCE if self.event_hubs_namespace else servicebus_audience(path)
        expect = Expect(audience, client_id=SYSTEM_ASSIGNED_CLIENT_ID)
        if (refused := refuse_unless(self.fake, request, expect)) is not None:
            return refused
        if audience == EVENTHUBS_RESOURCE:
            return self._event_hub(request, _path_parts(request))
        return self._queue(request, _path_parts(request))

    def _event_hub(self, request: FakeRequest, parts: list[str]) -> FakeResponse:
        # POST /{hub}/messages, /{hub}/partitions/{id}/messages, /{hub}/publishers/{p}/messages
        if request.method != "POST" or len(parts) not in (2, 4) or parts[-1] != "messages":
            return _error(404, "NotFound", f"no event hub operation {request.method} "
                                           f"{urlsplit(request.path).path}")
        if not (request.header("content-type") or "").startswith("application/"):
            return _error(400, "BadRequest", "Content-Type required")
        with self.lock:
            self.events[parts[0]].append(request.body)
        return FakeResponse(201, b"", {"content-type": "application/xml; charset=utf-8"})

    def _queue(self, request: FakeRequest, parts: list[str]) -> FakeResponse:
        if request.method == "POST" and len(parts) == 2 and parts[1] == "messages":
            properties = json.loads(request.header("brokerproperties") or "{}")
            content_type = request.header("content-type") or "application/octet-stream"
            with self.lock:
                self.queues[parts[0]].append((request.body, properties, content_type))
            return FakeResponse(201, b"", {"content-type": "application/xml; charset=utf-8"})
        if (request.method == "DELETE" and len(parts) == 3
                and parts[1:] == ["messages", "head"]):  # receive and delete
            with self.lock:
                if not self.queues[parts[0]]:
                    return FakeResponse(204)
                body, properties, content_type = self.queues[parts[0]].popleft()
                self.sequence += 1
                broker = {"DeliveryCount": 1, "EnqueuedSequenceNumber": 0,
                          "EnqueuedTimeUtc": formatdate(usegmt=True),
                          "MessageId": uuid.uuid4().hex, "SequenceNumber": self.sequence,
                          "State": "Active", "TimeToLive": 1209600, **properties}
            return FakeResponse(200, body, {"content-type": content_type,
                                            "BrokerProperties": json.dumps(broker)})
        return _error(404, "NotFound", f"no queue operation {request.method} "
                                       f"{urlsplit(request.path).path}")


def register_servicebus(fake: FakeAzure, host: str) -> None:
    """A namespace on the shared suffix: Service Bus, except Event Hubs-shaped paths."""
    if _first_time(fake, f"servicebus:{host}"):
        fake.add(re.escape(host), None, _Messaging(fake, event_hubs_namespace=False))


def register_eventhubs(fake: FakeAzure, host: str) -> None:
    """A namespace declared Event Hubs (by a keyless route): every path wants Event Hubs."""
    if _first_time(fake, f"eventhubs:{host}"):
        fake.add(re.escape(host), None, _Messaging(fake, event_hubs_namespace=True))


# -- Communication Services --------------------------------------------------------------------

def register_communication(fake: FakeAzure, host: str) -> None:
    def handle(request: FakeRequest) -> FakeResponse:
        path = urlsplit(request.path).path
        if request.method == "POST" and path == "/emails:send":
            operation = str(uuid.uuid4())
            return FakeResponse.json(
                {"id": operation, "status": "Running", "error": None}, 202,
                **{"Operation-Location": f"https://{host}/emails/operations/{operation}"
                                         "?api-version=2023-03-31",
                   "operation-id": operation, "retry-after": "30"})
        if request.method == "POST" and path == "/sms":
            sms = request.json()
            return FakeResponse.json({"value": [
                {"to": recipient["to"], "messageId": f"Outgoing_{uuid.uuid4().hex}_noam",
                 "httpStatusCode": 202, "successful": True}
                for recipient in sms["smsRecipients"]]}, 202)
        return _error(404, "NotFound", f"{request.method} {path}")

    if _first_time(fake, f"communication:{host}"):
        fake.add(re.escape(host), Expect(COMMUNICATION_RESOURCE,
                                         client_id=SYSTEM_ASSIGNED_CLIENT_ID), handle)


# -- Azure Maps --------------------------------------------------------------------------------

SEATTLE = {
    "summary": {"query": "seattle", "queryType": "NON_NEAR", "queryTime": 23, "numResults": 1,
                "offset": 0, "totalResults": 1, "fuzzyLevel": 1},
    "results": [{
        "type": "Geography", "id": "US/GEO/p0/116318", "score": 1.0,
        "entityType": "Municipality",
        "address": {"municipality": "Seattle", "countrySecondarySubdivision": "King",
                    "countrySubdivision": "WA", "countrySubdivisionName": "Washington",
                    "countryCode": "US", "country": "United States", "countryCodeISO3": "USA",
                    "freeformAddress": "Seattle, WA"},
        "position": {"lat": 47.60323, "lon": -122.33028},
        "viewport": {"topLeftPoint": {"lat": 47.73416, "lon": -122.45989},
                     "btmRightPoint": {"lat": 47.48138, "lon": -122.22494}},
    }],
}


def register_maps(fake: FakeAzure, host: str, maps_client_id: str) -> None:
    def client_id_header(request: FakeRequest) -> list[str]:
        value = request.header("x-ms-client-id")
        return [] if value == maps_client_id else [
            f"x-ms-client-id {value!r}, expected the Maps account id {maps_client_id!r}"]

    def handle(request: FakeRequest) -> FakeResponse:
        if request.method == "GET" and urlsplit(request.path).path == "/search/address/json":
            query = dict(request.query)
            if query.get("api-version") != "1.0" or not query.get("query"):
                return _error(400, "BadRequest", "api-version=1.0 and query are required")
            return FakeResponse.json(SEATTLE)
        return _error(404, "NotFound", request.path)

    if _first_time(fake, f"maps:{host}"):
        fake.add(re.escape(host), Expect(MAPS_RESOURCE, client_id=SYSTEM_ASSIGNED_CLIENT_ID,
                                         extra_checks=(client_id_header,)), handle)


# -- SignalR -----------------------------------------------------------------------------------

def register_signalr(fake: FakeAzure, host: str) -> None:
    def handle(request: FakeRequest) -> FakeResponse:
        parts = _path_parts(request)
        # v1: POST /api/v1/hubs/{hub}; 2022-06-01: POST /api/hubs/{hub}/:send
        v1_broadcast = parts[:3] == ["api", "v1", "hubs"] and len(parts) == 4
        send = parts[:2] == ["api", "hubs"] and parts[3:] == [":send"]
        if request.method == "POST" and (v1_broadcast or send):
            message = request.json()
            if not isinstance(message, dict) or "target" not in message:
                return _error(400, "BadRequest", "a message needs a target")
            return FakeResponse(202)
        return _error(404, "NotFound", request.path)

    if _first_time(fake, f"signalr:{host}"):
        fake.add(re.escape(host), Expect(SIGNALR_RESOURCE, client_id=SYSTEM_ASSIGNED_CLIENT_ID,
                                         extra_checks=(_entra_signed,)), handle)


# -- Key Vault ---------------------------------------------------------------------------------

def register_keyvault(fake: FakeAzure, host: str,
                      secrets: dict[str, str] | None = None) -> None:
    """Key Vault's challenge flow: no token or a wrong one → 401 with `WWW-Authenticate`."""
    stored = dict(secrets or {"mysecret": "s3cret"})
    version = uuid.uuid4().hex

    def handle(request: FakeRequest) -> FakeResponse:
        challenge = {"WWW-Authenticate": KEYVAULT_CHALLENGE}
        if request.header("authorization") is None:
            return FakeResponse.json({"error": {
                "code": "Unauthorized",
                "message": "AKV10000: Request is missing a Bearer or PoP token."}},
                401, **challenge)
        expect = Expect(KEYVAULT_RESOURCE, client_id=SYSTEM_ASSIGNED_CLIENT_ID)
        if (refused := refuse_unless(fake, request, expect, **challenge)) is not None:
            return refused
        parts = _path_parts(request)
        if request.method == "GET" and len(parts) in (2, 3) and parts[0] == "secrets":
            if parts[1] not in stored:
                return _error(404, "SecretNotFound",
                              f"A secret with (name/id) {parts[1]} was not found in this key "
                              "vault.")
            now = int(time.time())
            return FakeResponse.json({
                "value": stored[parts[1]],
                "id": f"https://{host}/secrets/{parts[1]}/{version}",
                "attributes": {"enabled": True, "created": now, "updated": now,
                               "recoveryLevel": "Recoverable+Purgeable",
                               "recoverableDays": 90}})
        return _error(400, "BadParameter", f"{request.method} {request.path}")

    if _first_time(fake, f"keyvault:{host}"):
        fake.add(re.escape(host), None, handle)


# -- Custom route: a Storage blob endpoint under a custom domain, its own identity ----------

def register_storage_route(fake: FakeAzure, host: str, client_id: str) -> None:
    def recent_version(request: FakeRequest) -> list[str]:
        version = request.header("x-ms-version") or ""
        return [] if version >= "2017-11-09" else [
            f"x-ms-version {version!r} is too old for OAuth (need 2017-11-09 or later)"]

    def handle(request: FakeRequest) -> FakeResponse:
        if request.method == "PUT" and len(_path_parts(request)) == 2:
            if request.header("x-ms-blob-type") != "BlockBlob":
                return FakeResponse(400, b"", {"x-ms-error-code": "MissingRequiredHeader"})
            return FakeResponse(201, b"", {
                "ETag": f'"0x{uuid.uuid4().hex[:15].upper()}"',
                "Last-Modified": formatdate(usegmt=True),
                "Content-MD5": base64.b64encode(hashlib.md5(request.body).digest()).decode(),
                "x-ms-request-server-encrypted": "true",
                "x-ms-version": request.header("x-ms-version") or ""})
        return FakeResponse(400, b"", {"x-ms-error-code": "UnsupportedHttpVerb"})

    if _first_time(fake, f"storage-route:{host}"):
        fake.add(re.escape(host), Expect(STORAGE_RESOURCE, client_id=client_id,
                                         extra_checks=(recent_version,)), handle)


def register_all(fake: FakeAzure, hosts: dict[str, str], *, maps_client_id: str,
                 route_a_client_id: str) -> None:
    """Everything above, on the hosts named like tests/e2e/conftest.py's FAKE_HOSTS."""
    register_servicebus(fake, hosts["servicebus"])
    register_eventhubs(fake, hosts["eventhubs"])
    register_communication(fake, hosts["communication"])
    register_maps(fake, hosts["maps"], maps_client_id)
    register_signalr(fake, hosts["signalr"])
    register_keyvault(fake, hosts["keyvault"])
    register_storage_route(fake, hosts["route-a"], route_a_client_id)
