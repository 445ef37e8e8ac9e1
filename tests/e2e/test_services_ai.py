"""Azure OpenAI, Azure AI Search and a custom `api-key` route: legacy apps keep their SDK and a
dummy key; through keyless the service sees only a managed-identity token. The regional
Cognitive Services endpoint takes no tokens: keyless reports it and leaves the request alone.

Each service also has a test that sends the app's own key-bearing request straight to the
fake upstream and gets 401, so a pass through keyless means keyless did the conversion.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import openai
import pytest
import requests
from azure.core.credentials import AccessToken, AzureKeyCredential
from azure.core.exceptions import ClientAuthenticationError
from azure.search.documents import SearchClient
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import FAKE_HOSTS, ROUTE_B_CLIENT_ID, ROUTE_B_SCOPE
from tests.support.azurite import TestPKI
from tests.support.fake_ai import (
    COGNITIVE_AUDIENCE,
    HOTELS,
    OPENAI_MODEL,
    ROUTE_B_AUDIENCE,
    SEARCH_AUDIENCE,
    SEARCH_INDEX,
    STREAM_ID_HEADER,
    THINGS,
    AIRegionalFake,
    OpenAIFake,
    RouteBFake,
    SearchFake,
    register_ai_regional,
    register_openai,
    register_route_b,
    register_search,
)
from tests.support.fake_azure import FakeAzure, FakeRequest
from tests.support.identity_endpoint import SYSTEM_ASSIGNED_CLIENT_ID, decode, make_token
from tests.support.keyless import KeylessProcess

pytestmark = pytest.mark.e2e

OPENAI_HOST = FAKE_HOSTS["openai"]
REGIONAL_HOST = FAKE_HOSTS["ai-regional"]
SEARCH_HOST = FAKE_HOSTS["search"]
ROUTE_B_HOST = FAKE_HOSTS["route-b"]
API_VERSION = "2024-10-21"
DEPLOYMENT = "gpt-4o"
CHAT_PATH = f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={API_VERSION}"
LANGUAGES_PATH = "/text/analytics/v3.1/languages"
# The legacy apps' keys: wrong for any service, unique so the logs can be searched for them.
DUMMY_KEY = f"dummy-{uuid.uuid4().hex}"
TIMEOUT = 30


@dataclass
class AIFakes:
    fake_azure: FakeAzure
    openai: OpenAIFake
    regional: AIRegionalFake
    search: SearchFake
    route_b: RouteBFake


@pytest.fixture(scope="module")
def ai(fake_azure: FakeAzure) -> AIFakes:
    return AIFakes(
        fake_azure,
        register_openai(fake_azure, OPENAI_HOST),
        register_ai_regional(fake_azure, REGIONAL_HOST),
        register_search(fake_azure, SEARCH_HOST),
        register_route_b(fake_azure, ROUTE_B_CLIENT_ID, ROUTE_B_HOST),
    )


@pytest.fixture
def app_env(monkeypatch, through_keyless: KeylessProcess) -> KeylessProcess:
    """through_keyless, plus the CA variable httpx (the openai SDK) reads."""
    monkeypatch.setenv("SSL_CERT_FILE", through_keyless.ca_path)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    return through_keyless


@pytest.fixture
def no_proxy_env(monkeypatch) -> None:
    """No proxy, no CA variables: the app talks to the fake upstream itself."""
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY",
                 "all_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE",
                 "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)


# -- helpers ------------------------------------------------------------------------------


class NewRequests:
    """The requests that reach the fake for `host` from now on."""

    def __init__(self, fake_azure: FakeAzure, host: str) -> None:
        self.fake_azure, self.host = fake_azure, host
        self.start = len(fake_azure.requests_for(host))

    def __call__(self) -> list[FakeRequest]:
        return self.fake_azure.requests_for(self.host)[self.start:]

    def one(self) -> FakeRequest:
        arrived = self()
        assert len(arrived) == 1, [(r.method, r.path) for r in arrived]
        return arrived[0]


def bearer_claims(request: FakeRequest) -> dict[str, Any]:
    authorization = request.header("authorization")
    assert authorization is not None and authorization.startswith("Bearer "), authorization
    return decode(authorization)


def header_names(request: FakeRequest) -> set[str]:
    return {name.lower() for name, _ in request.headers}


def straight_to_fake(fake_azure: FakeAzure, pki: TestPKI, method: str, host: str, path: str,
                     headers: dict[str, str], **kwargs: Any) -> requests.Response:
    """The request as the app would send it to `host`, but to the fake's port (no proxy)."""
    with requests.Session() as session:
        session.trust_env = False
        return session.request(method, f"https://127.0.0.1:{fake_azure.port}{path}",
                               headers={"Host": host, **headers}, verify=pki.ca_pem_path,
                               timeout=TIMEOUT, **kwargs)


def problems_for(fake_azure: FakeAzure, host: str) -> list[str]:
    return [p for h, _, found in fake_azure.problems if h == host for p in found]


def metric_value(text: str, sample_name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(
                    sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def eventually(probe: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := probe()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return result


def openai_client(**kwargs: Any) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(api_version=API_VERSION, max_retries=0, timeout=TIMEOUT,
                              **kwargs)


def chat_body(prompt: str) -> dict[str, Any]:
    return {"model": DEPLOYMENT, "messages": [{"role": "user", "content": prompt}]}


def no_secret_in_log(keyless: KeylessProcess) -> None:
    log = keyless.log()
    assert DUMMY_KEY not in log
    assert "eyJ" not in log  # no JWT either


# -- Azure OpenAI -------------------------------------------------------------------------


def test_openai_chat_completion_with_dummy_key_through_keyless(ai, app_env, identity):
    arrived = NewRequests(ai.fake_azure, OPENAI_HOST)
    client = openai_client(api_key=DUMMY_KEY, azure_endpoint=f"https://{OPENAI_HOST}")
    prompt = f"Say hello to {uuid.uuid4().hex}"

    completion = client.chat.completions.create(
        model=DEPLOYMENT, messages=[{"role": "user", "content": prompt}])

    assert completion.choices[0].message.content == OpenAIFake.reply_to(prompt)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == OPENAI_MODEL
    assert completion.usage is not None and completion.usage.total_tokens > 0
    upstream = arrived.one()
    assert upstream.method == "POST" and upstream.path == CHAT_PATH
    assert "api-key" not in header_names(upstream)
    claims = bearer_claims(upstream)
    assert claims["aud"] == COGNITIVE_AUDIENCE
    assert claims["appid"] == SYSTEM_ASSIGNED_CLIENT_ID
    assert upstream.json()["messages"] == [{"role": "user", "content": prompt}]
    assert identity.calls_for(COGNITIVE_AUDIENCE), "no token fetched for Cognitive Services"
    no_secret_in_log(app_env)


def test_openai_streamed_chat_completion_is_not_buffered(ai, app_env):
    client = openai_client(api_key=DUMMY_KEY, azure_endpoint=f"https://{OPENAI_HOST}")
    arrived = NewRequests(ai.fake_azure, OPENAI_HOST)
    stream_id = uuid.uuid4().hex
    prompt = "Stream a few words back to me, please"
    relayed_before = app_env.metric("keyless_upstream_pool_requests_total", service="openai",
                                    result="pooled_streamed")

    stream = client.chat.completions.create(
        model=DEPLOYMENT, messages=[{"role": "user", "content": prompt}], stream=True,
        extra_headers={STREAM_ID_HEADER: stream_id})
    record = ai.openai.stream(stream_id)
    timeline: list[tuple[float, bool]] = []  # (monotonic time, fake finished?) per chunk
    chunks = []
    for chunk in stream:
        timeline.append((time.monotonic(), record.finished.is_set()))
        chunks.append(chunk)
    stream.close()

    print("chunk arrivals (s after the first; fake finished?):",
          [(round(t - timeline[0][0], 2), done) for t, done in timeline],
          "fake finished at", round((record.finished_at or 0) - timeline[0][0], 2))
    assert record.finished.is_set()
    # The first event reached the app while the fake was still sending the rest.
    first_at, finished_then = timeline[0]
    assert not finished_then, "first event arrived only after the fake had sent everything"
    assert record.finished_at is not None and first_at < record.finished_at
    # Everything arrived, in order, as separate events.
    assert len(chunks) == len(record.events) - 1  # all but `data: [DONE]`
    assert chunks[0].choices == [] and chunks[0].prompt_filter_results
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == OpenAIFake.reply_to(prompt)
    # A new client's first request: it went over the upstream pool, streamed by the relay.
    assert app_env.metric("keyless_upstream_pool_requests_total", service="openai",
                          result="pooled_streamed") == relayed_before + 1
    assert chunks[-1].choices[0].finish_reason == "stop"
    upstream = arrived.one()
    assert "api-key" not in header_names(upstream)
    assert bearer_claims(upstream)["aud"] == COGNITIVE_AUDIENCE
    assert upstream.json()["stream"] is True


def test_ocp_apim_subscription_key_and_region_are_removed(ai, app_env):
    arrived = NewRequests(ai.fake_azure, OPENAI_HOST)
    prompt = f"ocp-apim {uuid.uuid4().hex}"

    response = requests.post(
        f"https://{OPENAI_HOST}{CHAT_PATH}", json=chat_body(prompt), timeout=TIMEOUT,
        headers={"Ocp-Apim-Subscription-Key": DUMMY_KEY,
                 "Ocp-Apim-Subscription-Region": "westus2"})

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == OpenAIFake.reply_to(prompt)
    upstream = arrived.one()
    names = header_names(upstream)
    assert "ocp-apim-subscription-key" not in names
    assert "ocp-apim-subscription-region" not in names
    assert bearer_claims(upstream)["aud"] == COGNITIVE_AUDIENCE
    no_secret_in_log(app_env)


def test_openai_app_straight_to_the_fake_is_refused(ai, no_proxy_env, pki):
    client = openai_client(
        api_key=DUMMY_KEY, azure_endpoint=f"https://127.0.0.1:{ai.fake_azure.port}",
        default_headers={"Host": OPENAI_HOST},
        http_client=openai.DefaultHttpxClient(verify=pki.client_ssl_context()))
    arrived = NewRequests(ai.fake_azure, OPENAI_HOST)

    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(
            model=DEPLOYMENT, messages=[{"role": "user", "content": "hello"}])

    assert caught.value.status_code == 401
    sent = arrived.one()
    assert sent.header("api-key") == DUMMY_KEY  # the SDK's wire form
    assert sent.header("authorization") is None
    assert "key header api-key left in the request" in problems_for(ai.fake_azure, OPENAI_HOST)


def test_ocp_apim_key_straight_to_the_fake_is_refused(ai, pki):
    response = straight_to_fake(
        ai.fake_azure, pki, "POST", OPENAI_HOST, CHAT_PATH, json=chat_body("hello"),
        headers={"Ocp-Apim-Subscription-Key": DUMMY_KEY,
                 "Ocp-Apim-Subscription-Region": "westus2"})

    assert response.status_code == 401
    message = response.json()["error"]["message"]
    assert "key header ocp-apim-subscription-key left in the request" in message
    assert "header ocp-apim-subscription-region left in the request" in message


def test_openai_fake_takes_the_sdks_entra_form_and_checks_it(ai, no_proxy_env, pki):
    """The fake is no stricter than the service: the SDK's own Entra mode passes; a token
    for another audience, or a leftover region header, does not."""
    def client(token: str, **headers: str) -> openai.AzureOpenAI:
        return openai_client(
            azure_ad_token=token, azure_endpoint=f"https://127.0.0.1:{ai.fake_azure.port}",
            default_headers={"Host": OPENAI_HOST, **headers},
            http_client=openai.DefaultHttpxClient(verify=pki.client_ssl_context()))
    messages: Any = [{"role": "user", "content": "entra"}]

    good = client(make_token(COGNITIVE_AUDIENCE)).chat.completions.create(
        model=DEPLOYMENT, messages=messages)
    assert good.choices[0].message.content == OpenAIFake.reply_to("entra")
    with pytest.raises(openai.AuthenticationError, match="token audience"):
        client(make_token("https://storage.azure.com")).chat.completions.create(
            model=DEPLOYMENT, messages=messages)
    with pytest.raises(openai.AuthenticationError, match="ocp-apim-subscription-region"):
        client(make_token(COGNITIVE_AUDIENCE), **{"Ocp-Apim-Subscription-Region": "westus2"}
               ).chat.completions.create(model=DEPLOYMENT, messages=messages)


# -- Regional Cognitive Services endpoint: reported, not converted ---------------------------


def test_regional_endpoint_is_reported_and_passed_on_unchanged(ai, app_env):
    keyless = app_env
    before = metric_value(keyless.metrics(), "keyless_requests_total",
                          service="ai-regional", outcome="unsupported")
    arrived = NewRequests(ai.fake_azure, REGIONAL_HOST)
    document_id = uuid.uuid4().hex
    body = json.dumps({"documents": [{"id": document_id, "text": "Hello world"}]}).encode()
    sent_headers = {"Ocp-Apim-Subscription-Key": DUMMY_KEY,
                    "Ocp-Apim-Subscription-Region": "westus2",
                    "Content-Type": "application/json"}

    response = requests.post(f"https://{REGIONAL_HOST}{LANGUAGES_PATH}?showStats=false",
                             data=body, headers=sent_headers, timeout=TIMEOUT)

    assert response.status_code == 200, response.text
    assert response.json()["documents"][0]["id"] == document_id
    upstream = arrived.one()
    assert upstream.method == "POST"
    assert upstream.path == f"{LANGUAGES_PATH}?showStats=false"
    assert upstream.body == body
    for name, value in sent_headers.items():
        assert upstream.header(name) == value, name
    assert upstream.header("authorization") is None
    after = metric_value(keyless.metrics(), "keyless_requests_total",
                         service="ai-regional", outcome="unsupported")
    assert after >= 1 and after > before, (before, after)
    assert eventually(lambda: [line for line in keyless.log().splitlines()
                               if REGIONAL_HOST in line]), keyless.log()[-2000:]
    no_secret_in_log(keyless)


# -- Azure AI Search ----------------------------------------------------------------------


def test_search_with_dummy_key_through_keyless(ai, app_env):
    arrived = NewRequests(ai.fake_azure, SEARCH_HOST)
    client = SearchClient(f"https://{SEARCH_HOST}", SEARCH_INDEX, AzureKeyCredential(DUMMY_KEY))

    results = list(client.search("river", top=10))

    by_id = {r["hotelId"]: r for r in results}
    assert set(by_id) == {"1", "2"}
    assert by_id["1"]["hotelName"] == HOTELS[0]["hotelName"]
    assert all(r["@search.score"] == 1.0 for r in results)
    upstream = arrived.one()
    assert upstream.method == "POST"
    assert upstream.path.startswith(f"/indexes('{SEARCH_INDEX}')/docs/search.post.search?")
    assert ("api-version", client._config.api_version) in upstream.query
    assert upstream.json() == {"search": "river", "top": 10}
    assert "api-key" not in header_names(upstream)
    claims = bearer_claims(upstream)
    assert claims["aud"] == SEARCH_AUDIENCE
    assert claims["appid"] == SYSTEM_ASSIGNED_CLIENT_ID
    no_secret_in_log(app_env)


def test_search_app_straight_to_the_fake_is_refused(ai, no_proxy_env, pki):
    client = SearchClient(f"https://127.0.0.1:{ai.fake_azure.port}", SEARCH_INDEX,
                          AzureKeyCredential(DUMMY_KEY), connection_verify=pki.ca_pem_path,
                          headers={"Host": SEARCH_HOST})
    arrived = NewRequests(ai.fake_azure, SEARCH_HOST)

    with pytest.raises(ClientAuthenticationError) as caught:
        list(client.search("river"))

    assert caught.value.status_code == 401
    sent = arrived.one()
    assert sent.header("api-key") == DUMMY_KEY  # the SDK's wire form
    assert sent.header("authorization") is None


def test_search_fake_takes_the_sdks_entra_form_and_checks_it(ai, no_proxy_env, pki):
    class Credential:
        def __init__(self, audience: str) -> None:
            self.audience, self.scopes = audience, []

        def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
            self.scopes.extend(scopes)
            return AccessToken(make_token(self.audience), int(time.time()) + 3600)

    def search(credential: Credential) -> list[dict[str, Any]]:
        client = SearchClient(f"https://127.0.0.1:{ai.fake_azure.port}", SEARCH_INDEX,
                              credential, connection_verify=pki.ca_pem_path,
                              headers={"Host": SEARCH_HOST})
        return list(client.search("harbour"))

    good = Credential(SEARCH_AUDIENCE)
    assert [r["hotelId"] for r in search(good)] == ["3"]
    assert good.scopes == [SEARCH_AUDIENCE + "/.default"]
    with pytest.raises(ClientAuthenticationError, match="token audience"):
        search(Credential(COGNITIVE_AUDIENCE))


# -- Custom route B: explicit scope and its own identity ------------------------------------


def test_route_b_uses_its_scope_and_identity(ai, app_env, identity):
    arrived = NewRequests(ai.fake_azure, ROUTE_B_HOST)

    response = requests.get(f"https://{ROUTE_B_HOST}/things", headers={"api-key": DUMMY_KEY},
                            timeout=TIMEOUT)

    assert response.status_code == 200, response.text
    assert response.json() == {"things": THINGS}
    upstream = arrived.one()
    assert upstream.path == "/things"
    assert "api-key" not in header_names(upstream)
    claims = bearer_claims(upstream)
    assert claims["aud"] == ROUTE_B_AUDIENCE
    assert claims["appid"] == ROUTE_B_CLIENT_ID
    resource = ROUTE_B_SCOPE.removesuffix("/.default")
    assert any(call["client_id"] == ROUTE_B_CLIENT_ID for call in identity.calls_for(resource))
    no_secret_in_log(app_env)


def test_route_b_app_straight_to_the_fake_is_refused(ai, pki):
    response = straight_to_fake(ai.fake_azure, pki, "GET", ROUTE_B_HOST, "/things",
                                headers={"api-key": DUMMY_KEY})

    assert response.status_code == 401
    assert "key header api-key left in the request" in response.json()["error"]["message"]


@pytest.mark.parametrize(("token", "problem"), [
    (make_token(ROUTE_B_AUDIENCE, ROUTE_B_CLIENT_ID), None),
    (make_token(ROUTE_B_AUDIENCE), "token for identity"),  # the default identity
    (make_token(COGNITIVE_AUDIENCE, ROUTE_B_CLIENT_ID), "token audience"),
], ids=["right", "default-identity", "wrong-audience"])
def test_route_b_fake_checks_audience_and_identity(ai, pki, token, problem):
    response = straight_to_fake(ai.fake_azure, pki, "GET", ROUTE_B_HOST, "/things",
                                headers={"Authorization": f"Bearer {token}"})

    if problem is None:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 401
        assert problem in response.json()["error"]["message"]
