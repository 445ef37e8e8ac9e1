"""FakeAzure handlers for Azure OpenAI, Azure AI Search, a regional Cognitive Services
endpoint and a custom route (an `api-key` API behind an explicit scope).

Each `register_*` function adds one service to a `FakeAzure` and returns an object holding
what the tests need to look at. Calling it again on the same FakeAzure returns the object
registered first (one registration per session, so e2e tests and benchmarks can share it).

The checks before each handler are FakeAzure's (`Expect`): Bearer only, the token audience
and identity the real service would want, no key header left. The handlers then answer the
way the service does, with JSON shaped like the real one.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from tests.support.fake_azure import Expect, FakeAzure, FakeRequest, FakeResponse

OPENAI_HOST = "keylessai.openai.azure.com"
AI_REGIONAL_HOST = "westus2.api.cognitive.microsoft.com"
SEARCH_HOST = "keylesssearch.search.windows.net"
ROUTE_B_HOST = "api-b.contoso.internal"

COGNITIVE_AUDIENCE = "https://cognitiveservices.azure.com"
SEARCH_AUDIENCE = "https://search.azure.com"
ROUTE_B_AUDIENCE = "api://keyless-test-api-b"

SEARCH_INDEX = "myindex"
# The test names its streamed request with this header to find the StreamRecord for it.
STREAM_ID_HEADER = "x-fake-stream-id"

def _once[T](fake_azure: FakeAzure, name: str, build: Callable[[], T]) -> T:
    registered: dict[str, Any] = fake_azure.__dict__.setdefault("_fake_ai_registered", {})
    if name not in registered:
        registered[name] = build()
    return registered[name]


def _error(status: int, code: str, message: str) -> FakeResponse:
    return FakeResponse.json({"error": {"code": code, "message": message}}, status=status)


def header_absent(name: str) -> Callable[[FakeRequest], list[str]]:
    """An extra check: `name` must not reach the service."""

    def check(request: FakeRequest) -> list[str]:
        return [f"header {name} left in the request"] if request.header(name) is not None else []

    return check


# -- Azure OpenAI -----------------------------------------------------------------------

_CHAT_PATH = re.compile(r"/openai/deployments/(?P<deployment>[^/]+)/chat/completions")
_FILTER_OK = {
    "hate": {"filtered": False, "severity": "safe"},
    "self_harm": {"filtered": False, "severity": "safe"},
    "sexual": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": False, "severity": "safe"},
}
OPENAI_MODEL = "gpt-4o-2024-08-06"


@dataclass
class StreamRecord:
    """One streamed chat completion as the fake sent it."""

    stream_id: str
    events: list[bytes] = field(default_factory=list)  # each `data: ...\n\n` event, in order
    written_at: list[float] = field(default_factory=list)  # time.monotonic() after each write
    finished: threading.Event = field(default_factory=threading.Event)  # set after the last
    finished_at: float | None = None


@dataclass
class OpenAIFake:
    host: str
    stream_events: int = 5  # data events before `data: [DONE]` (at least 3)
    chunk_delay: float = 0.4  # seconds before each event, [DONE] included
    streams: dict[str, StreamRecord] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def stream(self, stream_id: str, timeout: float = 10.0) -> StreamRecord:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if stream_id in self.streams:
                    return self.streams[stream_id]
            time.sleep(0.01)
        raise AssertionError(f"no streamed request {stream_id!r} reached the fake")

    @staticmethod
    def reply_to(prompt: str) -> str:
        return f"Echo: {prompt}"

    def handle(self, request: FakeRequest) -> FakeResponse:
        split = urlsplit(request.path)
        match = _CHAT_PATH.fullmatch(split.path)
        if request.method != "POST" or not match:
            return _error(404, "404", "Resource not found")
        if not any(name == "api-version" and value for name, value in request.query):
            return _error(404, "404", "Resource not found")  # what Azure says without one
        try:
            body = request.json()
            prompt = str(body["messages"][-1]["content"])
        except (ValueError, KeyError, IndexError, TypeError):
            return _error(400, "BadRequest", "messages is required")
        reply = self.reply_to(prompt)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        headers = {"apim-request-id": str(uuid.uuid4()), "x-ms-region": "West US 2",
                   "x-request-id": str(uuid.uuid4())}
        if body.get("stream"):
            stream_id = request.header(STREAM_ID_HEADER) or completion_id
            record = StreamRecord(stream_id)
            with self._lock:
                self.streams[stream_id] = record
            return FakeResponse(
                200, self._events(record, completion_id, reply),
                {**headers, "content-type": "text/event-stream; charset=utf-8",
                 "cache-control": "no-cache"},
                chunk_delay=self.chunk_delay)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        completion_tokens = len(reply.split())
        return FakeResponse.json({
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": OPENAI_MODEL,
            "system_fingerprint": "fp_b2ffeb16ee",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": _FILTER_OK}],
            "choices": [{
                "index": 0,
                "finish_reason": "stop",
                "logprobs": None,
                "message": {"role": "assistant", "content": reply, "refusal": None},
                "content_filter_results": _FILTER_OK,
            }],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }, **headers)

    def _events(self, record: StreamRecord, completion_id: str, reply: str) -> Iterator[bytes]:
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {"id": completion_id if choices else "", "object": "chat.completion.chunk",
                    "created": created if choices else 0, "model": OPENAI_MODEL if choices else "",
                    "system_fingerprint": "fp_b2ffeb16ee", "choices": choices, **extra}

        pieces = split_evenly(reply, max(1, self.stream_events - 2))
        payloads: list[dict[str, Any]] = [
            # Azure's first event: prompt filter results, no choices.
            chunk([], prompt_filter_results=[{"prompt_index": 0,
                                              "content_filter_results": _FILTER_OK}]),
        ]
        for i, piece in enumerate(pieces):
            delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            payloads.append(chunk([{"index": 0, "delta": delta, "finish_reason": None,
                                    "logprobs": None, "content_filter_results": _FILTER_OK}]))
        payloads.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop",
                                "logprobs": None, "content_filter_results": {}}]))
        events = [b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads]
        events.append(b"data: [DONE]\n\n")
        for event in events:
            record.events.append(event)
            yield event
            # The server resumes this generator only after writing (and flushing) the event.
            record.written_at.append(time.monotonic())
        record.finished_at = record.written_at[-1]
        record.finished.set()


def split_evenly(text: str, parts: int) -> list[str]:
    """`text` cut into `parts` consecutive, non-empty-where-possible pieces."""
    size, rest = divmod(len(text), parts)
    pieces, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < rest else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def register_openai(fake_azure: FakeAzure, host: str = OPENAI_HOST,
                    audience: str = COGNITIVE_AUDIENCE) -> OpenAIFake:
    """Azure OpenAI chat completions (plain and streamed) on `host`: Bearer for `audience`,
    no `api-key`, no `Ocp-Apim-Subscription-Key`, no `Ocp-Apim-Subscription-Region`."""

    def build() -> OpenAIFake:
        fake = OpenAIFake(host)
        fake_azure.add(re.escape(host), Expect(
            audience=audience,
            extra_checks=(header_absent("ocp-apim-subscription-region"),),
        ), fake.handle)
        return fake

    return _once(fake_azure, f"openai:{host}", build)


# -- Regional Cognitive Services endpoint (keys only: keyless must not convert) ------------


@dataclass
class AIRegionalFake:
    host: str

    def handle(self, request: FakeRequest) -> FakeResponse:
        # No auth check: this endpoint only takes keys, so whatever the app sent must arrive.
        path = urlsplit(request.path).path
        if request.method == "POST" and path == "/text/analytics/v3.1/languages":
            try:
                documents = request.json()["documents"]
            except (ValueError, KeyError, TypeError):
                return _error(400, "InvalidRequest", "documents is required")
            return FakeResponse.json({
                "documents": [{"id": d.get("id"), "warnings": [],
                               "detectedLanguage": {"name": "English", "iso6391Name": "en",
                                                    "confidenceScore": 1.0}}
                              for d in documents],
                "errors": [],
                "modelVersion": "2022-10-01",
            }, **{"apim-request-id": str(uuid.uuid4())})
        return _error(404, "404", "Resource not found")


def register_ai_regional(fake_azure: FakeAzure, host: str = AI_REGIONAL_HOST) -> AIRegionalFake:
    """A regional `{region}.api.cognitive.microsoft.com` endpoint: no check at all (it takes
    keys, not tokens); the test compares what arrived with what the app sent."""

    def build() -> AIRegionalFake:
        fake = AIRegionalFake(host)
        fake_azure.add(re.escape(host), None, fake.handle)
        return fake

    return _once(fake_azure, f"ai-regional:{host}", build)


# -- Azure AI Search ---------------------------------------------------------------------

HOTELS: tuple[dict[str, Any], ...] = (
    {"hotelId": "1", "hotelName": "Stay-Kay City Hotel", "category": "Boutique", "rating": 3.6,
     "description": "Classic hotel near the city center, walking distance to the river."},
    {"hotelId": "2", "hotelName": "Old Century Hotel", "category": "Boutique", "rating": 3.6,
     "description": "Renovated rooms in a historic building, close to the river and museums."},
    {"hotelId": "3", "hotelName": "Gastronomic Landscape Hotel", "category": "Suite",
     "rating": 4.8, "description": "Gastronomic hotel with views of the harbour."},
)


@dataclass
class SearchFake:
    host: str
    index: str = SEARCH_INDEX
    documents: tuple[dict[str, Any], ...] = HOTELS

    def handle(self, request: FakeRequest) -> FakeResponse:
        split = urlsplit(request.path)
        path = unquote(split.path)
        if not any(name == "api-version" and value for name, value in request.query):
            return _error(400, "MissingApiVersionParameter",
                          "The api-version query parameter (?api-version=) is required.")
        if request.method != "POST" or path != f"/indexes('{self.index}')/docs/search.post.search":
            return _error(404, "ResourceNotFound", f"No resource for {request.method} {path}")
        try:
            query = request.json()
        except ValueError:
            return _error(400, "InvalidRequestParameter", "The request body is not JSON.")
        text = (query.get("search") or "*").strip()
        words = [w.lower() for w in text.split() if w != "*"]
        hits = []
        for doc in self.documents:
            haystack = " ".join(str(v) for v in doc.values()).lower()
            score = sum(haystack.count(w) for w in words) if words else 1
            if score:
                hits.append({"@search.score": float(score), **doc})
        hits.sort(key=lambda h: -h["@search.score"])
        if query.get("top") is not None:
            hits = hits[: int(query["top"])]
        result: dict[str, Any] = {"value": hits}
        if query.get("count"):
            result["@odata.count"] = len(hits)
        return FakeResponse.json(result, **{"request-id": str(uuid.uuid4()),
                                            "elapsed-time": "7", "odata-version": "4.0"})


def register_search(fake_azure: FakeAzure, host: str = SEARCH_HOST,
                    audience: str = SEARCH_AUDIENCE) -> SearchFake:
    """Azure AI Search document search on `host`: Bearer for `audience`, no `api-key`."""

    def build() -> SearchFake:
        fake = SearchFake(host)
        fake_azure.add(re.escape(host), Expect(audience=audience), fake.handle)
        return fake

    return _once(fake_azure, f"search:{host}", build)


# -- Custom route B: an in-house API taking `api-key`, converted with an explicit scope -------

THINGS = [{"id": "thing-1", "name": "first"}, {"id": "thing-2", "name": "second"}]


@dataclass
class RouteBFake:
    host: str

    def handle(self, request: FakeRequest) -> FakeResponse:
        if request.method == "GET" and urlsplit(request.path).path == "/things":
            return FakeResponse.json({"things": THINGS})
        return FakeResponse.json({"error": "not found"}, status=404)


def register_route_b(fake_azure: FakeAzure, client_id: str, host: str = ROUTE_B_HOST,
                     audience: str = ROUTE_B_AUDIENCE) -> RouteBFake:
    """GET /things on `host`: Bearer for `audience` issued to `client_id`, no `api-key`."""

    def build() -> RouteBFake:
        fake = RouteBFake(host)
        fake_azure.add(re.escape(host), Expect(audience=audience, client_id=client_id),
                       fake.handle)
        return fake

    return _once(fake_azure, f"route-b:{host}", build)
