"""Data-plane fakes for Cosmos DB (gateway mode), App Configuration and Event Grid.

Each `register_*` adds one service to a `FakeAzure` (once per instance: calling it again
returns the same state) and returns that service's state, so tests and benchmarks can look at
what the fake stored. The handlers answer just enough like the real service for the real
Python SDKs to complete their calls; the auth checks are `FakeAzure`'s (see `Expect`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from tests.support.fake_azure import Expect, FakeAzure, FakeRequest, FakeResponse

COSMOS_ACCOUNT = "keylesscosmos"
COSMOS_HOST = f"{COSMOS_ACCOUNT}.documents.azure.com"
COSMOS_REGIONAL_HOST = f"{COSMOS_ACCOUNT}-westus2.documents.azure.com"
COSMOS_AUDIENCE = f"https://{COSMOS_HOST}"
COSMOS_DATABASE = "appdb"
COSMOS_CONTAINER = "items"
COSMOS_PARTITION_KEY_PATH = "/pk"
APPCONFIG_HOST = "keylessconfig.azconfig.io"
# What the current SDK (azure-appconfiguration 1.10) asks for, derived from the host name:
# keyless follows the current SDK by default (a route can choose https://appconfig.azure.com).
APPCONFIG_AUDIENCE = "https://azconfig.io"
EVENTGRID_HOST = "keylesstopic.westus2-1.eventgrid.azure.net"
EVENTGRID_AUDIENCE = "https://eventgrid.azure.net"

_COSMOS_DB_RID = "kQ1SAA=="
_COSMOS_COLL_RID = "kQ1SAPbcRgA="
_COSMOS_PKRANGES_ETAG = '"00000000-0000-0000-0000-00000000pk01"'


def _http_date() -> str:
    return formatdate(usegmt=True)


def _etag() -> str:
    return f'"{uuid.uuid4()}"'


def _required_headers(*names: str):
    """An extra check: each header must be present (after keyless rewrote the request)."""

    def check(request: FakeRequest) -> list[str]:
        return [f"header {name} missing" for name in names if not request.header(name)]

    return check


# --------------------------------------------------------------------------- Cosmos DB


@dataclass
class CosmosState:
    items: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> stored document
    lsn: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _cosmos_headers(state: CosmosState, content_path: str = "", alt_path: str = "",
                    **extra: str) -> dict[str, str]:
    headers = {
        "content-type": "application/json",
        "date": _http_date(),
        "x-ms-activity-id": str(uuid.uuid4()),
        "x-ms-request-charge": "1",
        "x-ms-session-token": f"0:-1#{state.lsn}",
        "x-ms-serviceversion": "version=2.14.0.0",
        "x-ms-gatewayversion": "version=2.14.0",
        "x-ms-schemaversion": "1.18",
        "x-ms-last-state-change-utc": _http_date(),
        "lsn": str(state.lsn),
        "x-ms-global-committed-lsn": str(state.lsn),
        "x-ms-number-of-read-regions": "0",
        "x-ms-transport-request-id": "1",
        "x-ms-cosmos-llsn": str(state.lsn),
        "x-ms-cosmos-quorum-acked-llsn": str(state.lsn),
        "x-ms-xp-role": "1",
        "x-ms-resource-quota": "documentSize=51200;documentsSize=52428800;collectionSize=52428800;",
        "x-ms-resource-usage": "documentSize=0;documentsSize=0;collectionSize=0;",
    }
    if content_path:
        headers["x-ms-content-path"] = content_path
    if alt_path:
        headers["x-ms-alt-content-path"] = alt_path
    headers.update(extra)
    return headers


def _cosmos_error(state: CosmosState, status: int, code: str, message: str,
                  substatus: str = "0") -> FakeResponse:
    return FakeResponse.json({"code": code, "message": message}, status,
                             **_cosmos_headers(state), **{"x-ms-substatus": substatus})


def _cosmos_account(host: str) -> dict[str, Any]:
    regional = {"name": "West US 2",
                "databaseAccountEndpoint": f"https://{COSMOS_REGIONAL_HOST}:443/"}
    query_engine = {"maxSqlQueryInputLength": 262144, "maxJoinsPerSqlQuery": 5,
                    "maxLogicalAndPerSqlQuery": 500, "maxLogicalOrPerSqlQuery": 500,
                    "maxUdfRefPerSqlQuery": 10, "maxInExpressionItemsCount": 16000,
                    "queryDenyList": [], "spatialMaxGeometryPointCount": 256,
                    "sqlAllowNonFiniteNumbers": False, "sqlDisableOptimizationFlags": 0,
                    "enableSpatialIndexing": True, "maxInMemorySortDocumentCount": 500,
                    "maxQueryRequestTimeoutFraction": 0.9, "sqlAllowAggregateFunctions": True,
                    "sqlAllowGroupByClause": True, "allowNewKeywords": True,
                    "sqlAllowLike": True, "sqlAllowSubQuery": True, "sqlAllowScalarSubQuery": True,
                    "sqlAllowTop": True}
    return {
        "_self": "",
        "id": COSMOS_ACCOUNT,
        "_rid": host,
        "media": "//media/",
        "addresses": "//addresses/",
        "_dbs": "//dbs/",
        "writableLocations": [regional],
        "readableLocations": [regional],
        "enableMultipleWriteLocations": False,
        "continuousBackupEnabled": False,
        "enableNRegionSynchronousCommit": False,
        "enablePerPartitionFailoverBehavior": False,
        "userReplicationPolicy": {"asyncReplication": False, "minReplicaSetSize": 3,
                                  "maxReplicasetSize": 4},
        "userConsistencyPolicy": {"defaultConsistencyLevel": "Session"},
        "systemReplicationPolicy": {"minReplicaSetSize": 3, "maxReplicasetSize": 4},
        "readPolicy": {"primaryReadCoefficient": 1, "secondaryReadCoefficient": 1},
        "queryEngineConfiguration": json.dumps(query_engine),
    }


def _cosmos_database() -> dict[str, Any]:
    return {"id": COSMOS_DATABASE, "_rid": _COSMOS_DB_RID, "_self": f"dbs/{_COSMOS_DB_RID}/",
            "_etag": '"00000000-0000-0000-0000-0000000db001"', "_colls": "colls/",
            "_users": "users/", "_ts": 1700000000}


def _cosmos_container() -> dict[str, Any]:
    return {
        "id": COSMOS_CONTAINER,
        "indexingPolicy": {"indexingMode": "consistent", "automatic": True,
                           "includedPaths": [{"path": "/*"}],
                           "excludedPaths": [{"path": '/"_etag"/?'}]},
        "partitionKey": {"paths": [COSMOS_PARTITION_KEY_PATH], "kind": "Hash", "version": 2},
        "conflictResolutionPolicy": {"mode": "LastWriterWins",
                                     "conflictResolutionPath": "/_ts",
                                     "conflictResolutionProcedure": ""},
        "geospatialConfig": {"type": "Geography"},
        "_rid": _COSMOS_COLL_RID,
        "_ts": 1700000000,
        "_self": f"dbs/{_COSMOS_DB_RID}/colls/{_COSMOS_COLL_RID}/",
        "_etag": '"00000000-0000-0000-0000-0000000c0001"',
        "_docs": "docs/", "_sprocs": "sprocs/", "_triggers": "triggers/", "_udfs": "udfs/",
        "_conflicts": "conflicts/",
    }


def _cosmos_pkranges() -> dict[str, Any]:
    return {"_rid": _COSMOS_COLL_RID, "_count": 1, "PartitionKeyRanges": [{
        "_rid": f"{_COSMOS_COLL_RID[:-1]}CAAAAAAAAAA==", "id": "0", "_etag": _COSMOS_PKRANGES_ETAG,
        "minInclusive": "", "maxExclusive": "FF", "ridPrefix": 0,
        "_self": f"dbs/{_COSMOS_DB_RID}/colls/{_COSMOS_COLL_RID}/pkranges/0/",
        "throughputFraction": 1, "status": "online", "parents": [], "ownedArchivalPKRangeIds": [],
        "_ts": 1700000000, "_lsn": 1}]}


def _cosmos_handler(state: CosmosState):
    coll_path = f"dbs/{COSMOS_DATABASE}/colls/{COSMOS_CONTAINER}"

    def handle(request: FakeRequest) -> FakeResponse:
        parts = [unquote(p) for p in urlsplit(request.path).path.strip("/").split("/") if p]
        method = request.method
        if method == "GET" and not parts:
            return FakeResponse.json(_cosmos_account(request.host), **_cosmos_headers(state))
        if parts[:2] != ["dbs", COSMOS_DATABASE]:
            return _cosmos_error(state, 404, "NotFound", "Resource Not Found (database)")
        if len(parts) == 2 and method == "GET":
            return FakeResponse.json(_cosmos_database(), **_cosmos_headers(
                state, _COSMOS_DB_RID, f"dbs/{COSMOS_DATABASE}", etag=_cosmos_database()["_etag"]))
        if parts[2:4] != ["colls", COSMOS_CONTAINER]:
            return _cosmos_error(state, 404, "NotFound", "Resource Not Found (container)")
        rest = parts[4:]
        if not rest and method == "GET":
            return FakeResponse.json(_cosmos_container(), **_cosmos_headers(
                state, _COSMOS_COLL_RID, f"dbs/{COSMOS_DATABASE}",
                etag=_cosmos_container()["_etag"]))
        if rest == ["pkranges"] and method == "GET":
            if request.header("if-none-match") == _COSMOS_PKRANGES_ETAG:
                return FakeResponse(304, b"", _cosmos_headers(
                    state, _COSMOS_COLL_RID, coll_path, etag=_COSMOS_PKRANGES_ETAG))
            return FakeResponse.json(_cosmos_pkranges(), **_cosmos_headers(
                state, _COSMOS_COLL_RID, coll_path, etag=_COSMOS_PKRANGES_ETAG,
                **{"x-ms-item-count": "1"}))
        if rest[:1] != ["docs"]:
            return _cosmos_error(state, 400, "BadRequest", f"unsupported path {request.path}")
        if len(rest) == 1 and method == "POST":
            return _cosmos_create(state, request, coll_path)
        if len(rest) == 2 and method == "GET":
            return _cosmos_read(state, request, rest[1], coll_path)
        return _cosmos_error(state, 405, "MethodNotAllowed", f"{method} {request.path}")

    return handle


def _partition_key_header(request: FakeRequest) -> Any:
    raw = request.header("x-ms-documentdb-partitionkey")
    return json.loads(raw) if raw else None


def _cosmos_create(state: CosmosState, request: FakeRequest, coll_path: str) -> FakeResponse:
    document = request.json()
    if not isinstance(document, dict) or not isinstance(document.get("id"), str):
        return _cosmos_error(state, 400, "BadRequest", "The input content is invalid: no id")
    pk_field = COSMOS_PARTITION_KEY_PATH.lstrip("/")
    if _partition_key_header(request) != [document.get(pk_field)]:
        return _cosmos_error(state, 400, "BadRequest",
                             "PartitionKey extracted from document doesn't match the one "
                             "specified in the header", "1001")
    upsert = (request.header("x-ms-documentdb-is-upsert") or "").lower() == "true"
    with state.lock:
        if document["id"] in state.items and not upsert:
            return _cosmos_error(state, 409, "Conflict",
                                 "Entity with the specified id already exists in the system.")
        state.lsn += 1
        doc_rid = base64.b64encode(
            base64.b64decode(_COSMOS_COLL_RID) + state.lsn.to_bytes(8, "big")).decode()
        stored = {**document, "_rid": doc_rid,
                  "_self": f"dbs/{_COSMOS_DB_RID}/colls/{_COSMOS_COLL_RID}/docs/{doc_rid}/",
                  "_etag": _etag(), "_attachments": "attachments/", "_ts": int(time.time())}
        state.items[document["id"]] = stored
        headers = _cosmos_headers(state, _COSMOS_COLL_RID, coll_path, etag=stored["_etag"],
                                  **{"x-ms-documentdb-partitionkeyrangeid": "0"})
    return FakeResponse.json(stored, 201, **headers)


def _cosmos_read(state: CosmosState, request: FakeRequest, item_id: str,
                 coll_path: str) -> FakeResponse:
    with state.lock:
        stored = state.items.get(item_id)
        pk_field = COSMOS_PARTITION_KEY_PATH.lstrip("/")
        if stored is None or _partition_key_header(request) != [stored.get(pk_field)]:
            return _cosmos_error(state, 404, "NotFound",
                                 "Entity with the specified id does not exist in the system.")
        headers = _cosmos_headers(state, _COSMOS_COLL_RID, coll_path, etag=stored["_etag"],
                                  **{"x-ms-documentdb-partitionkeyrangeid": "0"})
        return FakeResponse.json(stored, **headers)


def register_cosmos(fake_azure: FakeAzure) -> CosmosState:
    """Cosmos DB NoSQL gateway for account `keylesscosmos`: account (global and regional),
    database `appdb`, container `items` (partition key /pk), create and read items."""
    state: CosmosState | None = getattr(fake_azure, "_fake_cosmos_state", None)
    if state is None:
        state = CosmosState()
        expect = Expect(audience=COSMOS_AUDIENCE, auth_format="cosmos",
                        extra_checks=(_required_headers("x-ms-date", "x-ms-version"),))
        fake_azure.add(re.escape(COSMOS_HOST) + "|" + re.escape(COSMOS_REGIONAL_HOST), expect,
                       _cosmos_handler(state))
        fake_azure._fake_cosmos_state = state  # type: ignore[attr-defined]
    return state


# --------------------------------------------------------------------------- App Configuration

APPCONFIG_KV_TYPE = "application/vnd.microsoft.appconfig.kv+json; charset=utf-8"


@dataclass
class AppConfigState:
    settings: dict[tuple[str, str | None], dict[str, Any]] = field(default_factory=dict)
    sequence: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _appconfig_headers(state: AppConfigState, **extra: str) -> dict[str, str]:
    return {"sync-token": f"zAJw6V16=MDoxNyM0Nzc4MTQ4;sn={state.sequence}",
            "x-ms-request-id": str(uuid.uuid4()), "x-ms-correlation-request-id": str(uuid.uuid4()),
            "date": _http_date(), **extra}


def _appconfig_error(state: AppConfigState, status: int, title: str, detail: str) -> FakeResponse:
    body = {"type": "https://azconfig.io/errors/" + title.lower().replace(" ", "-"),
            "title": title, "name": "", "detail": detail, "status": status}
    return FakeResponse(status, json.dumps(body).encode(), _appconfig_headers(
        state, **{"content-type": "application/problem+json; charset=utf-8"}))


def _appconfig_handler(state: AppConfigState):
    def handle(request: FakeRequest) -> FakeResponse:
        split = urlsplit(request.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        if not query.get("api-version"):
            return _appconfig_error(state, 400, "Invalid Request", "api-version is required")
        if not split.path.startswith("/kv/") or len(split.path) <= len("/kv/"):
            return _appconfig_error(state, 404, "Not Found", f"no route {split.path}")
        key = unquote(split.path[len("/kv/"):])
        label = query.get("label") or None
        if label == "\0":
            label = None
        if request.method == "PUT":
            return _appconfig_put(state, request, key, label)
        if request.method == "GET":
            with state.lock:
                stored = state.settings.get((key, label))
                if stored is None:
                    return _appconfig_error(state, 404, "Not Found", f"key {key!r} not found")
                if request.header("if-none-match") == stored["etag"]:
                    return FakeResponse(304, b"", _appconfig_headers(state, etag=stored["etag"]))
                return FakeResponse(200, json.dumps(stored).encode(), _appconfig_headers(
                    state, etag=stored["etag"], **{"content-type": APPCONFIG_KV_TYPE,
                                                   "last-modified": _http_date()}))
        return _appconfig_error(state, 405, "Method Not Allowed", request.method)

    return handle


def _appconfig_put(state: AppConfigState, request: FakeRequest, key: str,
                   label: str | None) -> FakeResponse:
    content_type = (request.header("content-type") or "").split(";")[0].strip()
    if content_type not in ("application/vnd.microsoft.appconfig.kv+json", "application/json"):
        return _appconfig_error(state, 415, "Unsupported Media Type", content_type)
    body = request.json() or {}
    with state.lock:
        existing = state.settings.get((key, label))
        if_match = request.header("if-match")
        if if_match and if_match != "*" and (existing is None or existing["etag"] != if_match):
            return _appconfig_error(state, 412, "Precondition Failed", "etag mismatch")
        if existing is not None and existing.get("locked"):
            return _appconfig_error(state, 409, "Conflict", f"key {key!r} is read-only")
        state.sequence += 1
        stored = {
            "etag": hashlib.sha256(f"{key}{label}{state.sequence}".encode()).hexdigest()[:32],
            "key": key, "label": label, "content_type": body.get("content_type"),
            "value": body.get("value"), "tags": body.get("tags") or {},
            "locked": False,
            "last_modified": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        }
        state.settings[(key, label)] = stored
        return FakeResponse(200, json.dumps(stored).encode(), _appconfig_headers(
            state, etag=f'"{stored["etag"]}"', **{"content-type": APPCONFIG_KV_TYPE,
                                                  "last-modified": _http_date()}))


def register_appconfig(fake_azure: FakeAzure) -> AppConfigState:
    """App Configuration store `keylessconfig`: set (PUT) and get (GET) key-values."""
    state: AppConfigState | None = getattr(fake_azure, "_fake_appconfig_state", None)
    if state is None:
        state = AppConfigState()
        fake_azure.add(re.escape(APPCONFIG_HOST), Expect(audience=APPCONFIG_AUDIENCE),
                       _appconfig_handler(state))
        fake_azure._fake_appconfig_state = state  # type: ignore[attr-defined]
    return state


# --------------------------------------------------------------------------- Event Grid


@dataclass
class EventGridState:
    # one entry per accepted publish: (content-type, the events as received)
    batches: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [event for _, batch in self.batches for event in batch]


_EVENTGRID_EVENT_FIELDS = ("id", "subject", "eventType", "eventTime", "data", "dataVersion")
_CLOUD_EVENT_FIELDS = ("id", "source", "type", "specversion")


def _eventgrid_error(status: int, code: str, message: str) -> FakeResponse:
    return FakeResponse.json({"error": {"code": code, "message": message}}, status)


def _eventgrid_handler(state: EventGridState):
    def handle(request: FakeRequest) -> FakeResponse:
        split = urlsplit(request.path)
        query = dict(parse_qs(split.query))
        if split.path != "/api/events" or request.method != "POST":
            return _eventgrid_error(404, "NotFound", f"{request.method} {split.path}")
        if not query.get("api-version"):
            return _eventgrid_error(400, "BadRequest", "api-version is required")
        content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
        required = (_CLOUD_EVENT_FIELDS if content_type == "application/cloudevents-batch+json"
                    else _EVENTGRID_EVENT_FIELDS if content_type == "application/json" else None)
        if required is None:
            return _eventgrid_error(415, "UnsupportedMediaType", content_type)
        try:
            events = request.json()
        except ValueError as exc:
            return _eventgrid_error(400, "BadRequest", f"body is not JSON: {exc}")
        if not isinstance(events, list) or not events:
            return _eventgrid_error(400, "BadRequest", "expected a non-empty JSON array")
        for event in events:
            missing = [name for name in required if name not in event]
            if missing:
                return _eventgrid_error(400, "BadRequest", f"event lacks {missing}")
        with state.lock:
            state.batches.append((content_type, events))
        return FakeResponse(200, b"", {"x-ms-request-id": str(uuid.uuid4()),
                                       "date": _http_date()})

    return handle


def register_eventgrid(fake_azure: FakeAzure) -> EventGridState:
    """Event Grid topic `keylesstopic`: publish EventGridEvent or CloudEvent batches."""
    state: EventGridState | None = getattr(fake_azure, "_fake_eventgrid_state", None)
    if state is None:
        state = EventGridState()
        fake_azure.add(re.escape(EVENTGRID_HOST), Expect(audience=EVENTGRID_AUDIENCE),
                       _eventgrid_handler(state))
        fake_azure._fake_eventgrid_state = state  # type: ignore[attr-defined]
    return state


def cosmos_quote(value: str) -> str:
    """How keyless (and the Cosmos docs) write `type=aad&ver=1.0&sig=<token>` on the wire."""
    return quote(value, safe="-_.!~*'()")
