"""Backends of other providers behind the one OpenAI endpoint (Anthropic's Messages API, AWS
Bedrock's Converse signed by Envoy, Google's Gemini API with a key and Vertex AI with a token
from application default credentials, Azure OpenAI's deployments with a key or an Entra ID
token),
alone, in failover pools and in canary splits, through the real Envoy, with the openai SDK as
the client and the fake LLM speaking each provider's API (it refuses what the provider
would)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from extproc.devtools.fake_llm.identity import IDENTITY_HEADER_SECRET

from .conftest import (
    BACKEND_A_SECRET,
    BACKEND_B_SECRET,
    Gateway,
    free_port,
    running_gateway,
    wait_http,
)

pytestmark = pytest.mark.e2e

MODEL = "claude"
PROVIDER_MODEL = "claude-sonnet-4-5"
RESPONSE_TOKENS = 8  # the second fake's
OPENAI_MODEL = "fake-gpt-4o"  # the first fake's name for it


# Envoy signs Bedrock's requests with these (the standard AWS variables of its environment);
# the fake checks each signature with the same.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDGATEWAYTEST0001",
    "AWS_SECRET_ACCESS_KEY": "gateway-test-secret-key",
    "AWS_SESSION_TOKEN": "gateway-test-session-token",
}
BEDROCK_MODEL = "anthropic.claude-3-5-sonnet-20241022-v2:0"
GEMINI_MODEL = "gemini-2.5-flash"


def write_service_account(path: Path, token_uri: str) -> None:
    """A Google service account key (a fresh RSA key) whose token endpoint is `token_uri`."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    account = {
        "type": "service_account",
        "project_id": "gw-test",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": "gateway@gw-test.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(account))


def pool(*members: tuple[str, str]) -> dict:
    """A model whose (backend, model) members are failover pools, in priority order."""
    return {
        "targets": [{"backend": b, "model": m, "priority": i} for i, (b, m) in enumerate(members)]
    }


def canary(*members: tuple[str, str]) -> dict:
    """A model split evenly among its (backend, model) members."""
    return {"targets": [{"backend": b, "model": m, "weight": 50} for b, m in members]}


def with_providers(config: dict, overloaded: str, google_key: Path) -> None:
    fake_b = config["backends"]["fake-b"]["url"].rstrip("/")
    # Gemini: the Gemini API with a key; Vertex AI with a token from Google's application
    # default credentials (a service account key whose token endpoint is the second fake's).
    config["backends"]["gemini"] = {
        "url": f"{fake_b}/v1beta",
        "type": "gemini",
        "api_key": {"env": "TEST_BACKEND_B_KEY"},
    }
    config["backends"]["vertex"] = {
        "url": f"{fake_b}/v1/projects/gw-test/locations/us-central1/publishers/google",
        "type": "gemini",
        "token_from": "google_adc",
    }
    config["models"]["gemini"] = {"targets": [{"backend": "gemini", "model": GEMINI_MODEL}]}
    config["models"]["gemini-vertex"] = {"targets": [{"backend": "vertex", "model": GEMINI_MODEL}]}
    config["models"]["gemini-embedding"] = {
        "type": "embedding",
        "targets": [{"backend": "gemini", "model": "gemini-embedding-001"}],
    }
    config["models"]["titan-embedding"] = {
        "type": "embedding",
        "targets": [{"backend": "bedrock", "model": "amazon.titan-embed-text-v2:0"}],
    }
    config["models"]["gpt-then-vertex"] = pool(
        ("openai-overloaded", OPENAI_MODEL), ("vertex", GEMINI_MODEL)
    )
    write_service_account(google_key, f"{fake_b}/_fake/identity/google-token")
    os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = str(google_key)
    config["backends"]["bedrock"] = {
        "url": fake_b.replace("localhost", "127.0.0.1"),
        "type": "bedrock",
        "aws_region": "us-east-1",
        "max_tokens": 48,
    }
    config["models"]["claude-bedrock"] = {
        "targets": [{"backend": "bedrock", "model": BEDROCK_MODEL}]
    }
    config["backends"]["bedrock-overloaded"] = {
        "url": overloaded,
        "type": "bedrock",
        "aws_region": "us-east-1",
        "eject_after_failures": 1000,
    }
    # Pools: Envoy's signing is in the backend's own cluster, which a pool's attempts do not
    # pass: the sidecar signs them (botocore, the same AWS variables).
    config["models"]["gpt-then-bedrock"] = pool(
        ("openai-overloaded", OPENAI_MODEL), ("bedrock", BEDROCK_MODEL)
    )
    config["models"]["bedrock-then-gpt"] = pool(
        ("bedrock-overloaded", BEDROCK_MODEL), ("fake-a", OPENAI_MODEL)
    )
    config["models"]["bedrock-or-gpt"] = canary(
        ("bedrock", BEDROCK_MODEL), ("fake-a", OPENAI_MODEL)
    )
    config["backends"]["azure"] = {
        "url": f"{fake_b}/openai",
        "type": "azure",
        "api_key": {"env": "TEST_BACKEND_B_KEY"},
    }
    config["models"]["gpt-azure"] = {"targets": [{"backend": "azure", "model": "my-gpt-4o"}]}
    # Entra ID: the sidecar's azure-identity finds App Service's managed identity, the second
    # fake's identity endpoint (the variables are read when the stack starts, after this).
    config["backends"]["azure-entra"] = {
        "url": f"{fake_b}/openai",
        "type": "azure",
        "token_from": "azure_identity",
        "api_version": "2025-04-01-preview",
    }
    config["models"]["gpt-entra"] = {"targets": [{"backend": "azure-entra", "model": "my-gpt-4o"}]}
    os.environ["IDENTITY_ENDPOINT"] = f"{fake_b}/_fake/identity/azure-msi"
    os.environ["IDENTITY_HEADER"] = IDENTITY_HEADER_SECRET
    config["models"]["embed-azure"] = {
        "type": "embedding",
        "targets": [{"backend": "azure", "model": "my-embedder"}],
    }
    config["backends"]["anthropic"] = {
        "url": f"{fake_b}/v1",
        "type": "anthropic",
        "api_key": {"env": "TEST_BACKEND_B_KEY"},
        "max_tokens": 64,
    }
    config["models"][MODEL] = {"targets": [{"backend": "anthropic", "model": PROVIDER_MODEL}]}
    # A fake that answers every request 503 (529 on Anthropic's API), never ejected, so that
    # every request tries it first.
    for name, kind in (("anthropic-overloaded", "anthropic"), ("openai-overloaded", "openai")):
        config["backends"][name] = {
            "url": f"{overloaded}/v1",
            "type": kind,
            "api_key": {"env": "TEST_BACKEND_B_KEY"},
            "eject_after_failures": 1000,
        }
    config["backends"]["anthropic-slow"] = {**config["backends"]["anthropic"], "timeout_s": 1}
    config["models"]["claude-slow"] = {
        "targets": [{"backend": "anthropic-slow", "model": PROVIDER_MODEL}]
    }
    # Response guards judge the translated text, streamed or not.
    config.setdefault("guards", {})["deny-out"] = {"type": "deny", "keywords": ["self-destruct"]}
    config.setdefault("guards", {})["secrets-out"] = {"type": "pii", "entities": ["email"]}
    guarded = {"guardrails": {"response": ["deny-out", "secrets-out"]}}
    config["models"]["claude-guarded"] = {**config["models"][MODEL], **guarded}
    config["models"]["bedrock-guarded"] = {
        "targets": [{"backend": "bedrock", "model": BEDROCK_MODEL}],
        **guarded,
    }
    config["models"]["claude-then-gpt"] = pool(
        ("anthropic-overloaded", PROVIDER_MODEL), ("fake-a", OPENAI_MODEL)
    )
    config["models"]["gpt-then-claude"] = pool(
        ("openai-overloaded", OPENAI_MODEL), ("anthropic", PROVIDER_MODEL)
    )
    config["models"]["claude-or-gpt"] = canary(
        ("anthropic", PROVIDER_MODEL), ("fake-a", OPENAI_MODEL)
    )


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("provider")
    port = free_port()
    identity = ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "GOOGLE_APPLICATION_CREDENTIALS")
    saved = {k: os.environ.get(k) for k in (*AWS_ENV, *identity)}
    os.environ.update(AWS_ENV)  # for Envoy, the sidecar and the fakes, started below
    with (tmp / "overloaded.log").open("wb") as log:
        overloaded = subprocess.Popen(
            [sys.executable, "-m", "extproc", "fake-llm", "--name", "overloaded",
             "--listen", f"127.0.0.1:{port}", "--fault", "503"],
            stdout=log, stderr=log,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz")
        edit = partial(with_providers, overloaded=url, google_key=tmp / "google-sa.json")
        with running_gateway(tmp, edit=edit) as gateway:
            yield gateway
    finally:
        overloaded.terminate()
        overloaded.wait(10)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="sk-team-a", max_retries=0)


def last_sent(gw: Gateway) -> dict:
    return gw.fake_requests(gw.fake_b)[-1]


def test_a_chat_completion_served_by_anthropic(gw: Gateway) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    )
    answer = raw.parse()
    # The model that served it, as an OpenAI backend's answer names its own.
    assert answer.model == PROVIDER_MODEL and answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens == RESPONSE_TOKENS
    assert raw.headers["x-aigw-backend"] == "anthropic"
    assert raw.headers["x-aigw-completion-tokens"] == str(RESPONSE_TOKENS)
    sent = last_sent(gw)
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == BACKEND_B_SECRET
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent["headers"]  # the client's key never goes upstream
    assert sent["body"] == {
        "model": PROVIDER_MODEL,
        "max_tokens": 64,  # the backend's default: Anthropic requires one
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "system": "Be brief.",
    }


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_stream_served_by_anthropic(gw: Gateway, include_usage: bool) -> None:
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(
        client(gw).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True, **options
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == RESPONSE_TOKENS
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    usage = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert usage and usage[-1].completion_tokens == RESPONSE_TOKENS
    else:
        assert not usage  # read for the account, cut from what the client sees
    assert last_sent(gw)["body"]["stream"] is True


def test_a_forced_tool_call(gw: Gateway) -> None:
    answer = client(gw).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
        tool_choice={"type": "function", "function": {"name": "weather"}},
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    assert choice.message.tool_calls[0].function.name == "weather"  # type: ignore[union-attr]


def test_what_anthropic_cannot_do_is_refused_before_the_call(gw: Gateway) -> None:
    before = len(gw.fake_requests(gw.fake_b))
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2
        )
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "n"
    assert len(gw.fake_requests(gw.fake_b)) == before


def test_anthropics_overloaded_answer_is_a_503_in_openais_shape(gw: Gateway) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client(gw).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-fault": "503"},  # the fake answers Anthropic's 529
        )
    assert caught.value.status_code == 503
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "overloaded_error"


# -- a model whose backends speak several APIs: Envoy chooses, each attempt is translated ------


def test_a_failover_from_an_overloaded_anthropic_to_openai(gw: Gateway) -> None:
    """Anthropic's 529 is a retriable failure: the next pool's OpenAI backend answers within
    the same request, with its own path, credential and model name, none of Anthropic's."""
    raw = client(gw).chat.completions.with_raw_response.create(
        model="claude-then-gpt", messages=[{"role": "user", "content": "hi"}]
    )
    answer = raw.parse()
    assert answer.model == OPENAI_MODEL and answer.choices[0].message.content  # its own
    assert raw.headers["x-aigw-backend"] == "fake-a"
    assert raw.headers["x-aigw-failover"] == "true" and raw.headers["x-aigw-attempts"] == "2"
    sent = gw.fake_requests(gw.fake_a)[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["authorization"] == f"Bearer {BACKEND_A_SECRET}"
    assert "x-api-key" not in sent["headers"] and "anthropic-version" not in sent["headers"]
    assert sent["body"]["model"] == OPENAI_MODEL and sent["body"]["messages"][0]["content"] == "hi"


@pytest.mark.parametrize("stream", [False, True])
def test_a_failover_from_openai_to_anthropic_is_translated(gw: Gateway, stream: bool) -> None:
    """The second attempt goes as a Messages request; its answer (or stream) comes back in
    OpenAI's shape, and the tokens counted are Anthropic's."""
    gw.clear_fakes()
    messages = [{"role": "user", "content": "hi"}]
    if stream:
        with client(gw).chat.completions.with_streaming_response.create(
            model="gpt-then-claude",
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        ) as response:
            headers = response.headers
            chunks = list(response.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = [c.usage for c in chunks if c.usage is not None]
        assert usage and usage[-1].completion_tokens == RESPONSE_TOKENS
        assert headers["content-type"].startswith("text/event-stream")
    else:
        raw = client(gw).chat.completions.with_raw_response.create(
            model="gpt-then-claude",
            messages=messages,  # type: ignore[arg-type]
        )
        headers, answer = raw.headers, raw.parse()
        text = answer.choices[0].message.content or ""
        assert answer.usage is not None and answer.usage.completion_tokens == RESPONSE_TOKENS
        assert headers["x-aigw-completion-tokens"] == str(RESPONSE_TOKENS)
    assert len(text.split()) == RESPONSE_TOKENS
    assert headers["x-aigw-backend"] == "anthropic" and headers["x-aigw-failover"] == "true"
    (sent,) = gw.fake_requests(gw.fake_b)
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == BACKEND_B_SECRET
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent["headers"]
    assert sent["body"]["model"] == PROVIDER_MODEL and sent["body"]["max_tokens"] == 64
    assert "stream_options" not in sent["body"]


def test_a_canary_split_between_anthropic_and_openai(gw: Gateway) -> None:
    """Each request is translated for the backend Envoy's split chose, and every answer is
    OpenAI's, whichever served it."""
    served: Counter[str] = Counter()
    for _ in range(24):
        raw = client(gw).chat.completions.with_raw_response.create(
            model="claude-or-gpt", messages=[{"role": "user", "content": "hi"}]
        )
        answer = raw.parse()
        assert answer.model in (PROVIDER_MODEL, OPENAI_MODEL) and answer.choices[0].message.content
        assert answer.usage is not None and answer.usage.completion_tokens == RESPONSE_TOKENS
        served[raw.headers["x-aigw-backend"]] += 1
    assert set(served) == {"anthropic", "fake-a"}, served  # 24 draws at 50/50: both, but 2^-23


def test_what_a_pools_anthropic_backend_cannot_do_is_refused_before_any_attempt(
    gw: Gateway,
) -> None:
    """Whichever backend would answer, the request must be one every backend of the model can
    serve as asked: refused before anything is reserved or sent."""
    gw.clear_fakes()
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).chat.completions.create(
            model="gpt-then-claude", messages=[{"role": "user", "content": "hi"}], seed=7
        )
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "seed"
    assert gw.fake_requests(gw.fake_a) == [] and gw.fake_requests(gw.fake_b) == []


# -- AWS Bedrock (Converse), signed by Envoy -----------------------------------------------------


def test_a_chat_completion_served_by_bedrock_signed_by_envoy(gw: Gateway) -> None:
    """Envoy's aws_request_signing signs the translated request with the AWS credentials of its
    environment; the fake checks the signature (path, headers, body) with botocore."""
    raw = client(gw).chat.completions.with_raw_response.create(
        model="claude-bedrock",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    )
    answer = raw.parse()
    assert answer.model == BEDROCK_MODEL and answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == RESPONSE_TOKENS
    assert raw.headers["x-aigw-backend"] == "bedrock"
    sent = last_sent(gw)
    assert sent["path"] == "/model/anthropic.claude-3-5-sonnet-20241022-v2:0/converse"
    authorization = sent["headers"]["authorization"]
    assert (
        authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIDGATEWAYTEST0001/")
        and "/us-east-1/bedrock/aws4_request" in authorization
    )
    assert sent["headers"]["x-amz-security-token"] == AWS_ENV["AWS_SESSION_TOKEN"]
    assert sent["body"] == {
        "messages": [{"role": "user", "content": [{"text": "hi"}]}],
        "system": [{"text": "Be brief."}],
        "inferenceConfig": {"maxTokens": 48},  # the backend's default: Bedrock requires one
    }


@pytest.mark.parametrize("split", ["1", "random"])
def test_a_bedrock_event_stream_becomes_openai_chunks(gw: Gateway, split: str) -> None:
    """The binary event stream, cut anywhere on its way, reaches the client as OpenAI's
    server-sent events, its usage read for the account."""
    with client(gw).chat.completions.with_streaming_response.create(
        model="claude-bedrock",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-fake-split": split},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == RESPONSE_TOKENS
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].completion_tokens == RESPONSE_TOKENS
    assert last_sent(gw)["path"].endswith("/converse-stream")


def test_bedrocks_throttling_is_a_429_in_openais_shape(gw: Gateway) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client(gw).chat.completions.create(
            model="claude-bedrock",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-fault": "429"},
        )
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "ThrottlingException"


def test_a_canary_split_between_bedrock_and_openai_is_signed_in_the_split(gw: Gateway) -> None:
    """The split's cluster runs the upstream stage (translation), then Envoy's signing."""
    served: Counter[str] = Counter()
    for _ in range(24):
        raw = client(gw).chat.completions.with_raw_response.create(
            model="bedrock-or-gpt", messages=[{"role": "user", "content": "hi"}]
        )
        answer = raw.parse()
        assert answer.usage is not None and answer.usage.completion_tokens == RESPONSE_TOKENS
        served[raw.headers["x-aigw-backend"]] += 1
    assert set(served) == {"bedrock", "fake-a"}, served


# -- Azure OpenAI's deployments ----------------------------------------------------------------


def test_a_chat_completion_at_an_azure_deployment(gw: Gateway) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(
        model="gpt-azure", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-aigw-completion-tokens"] == str(RESPONSE_TOKENS)
    sent = last_sent(gw)
    assert sent["path"] == "/openai/deployments/my-gpt-4o/chat/completions"
    assert sent["headers"]["api-key"] == BACKEND_B_SECRET
    assert "authorization" not in sent["headers"]


def test_embeddings_at_an_azure_deployment(gw: Gateway) -> None:
    result = client(gw).embeddings.create(model="embed-azure", input=["a", "b"])
    assert len(result.data) == 2
    assert last_sent(gw)["path"] == "/openai/deployments/my-embedder/embeddings"


def test_a_stream_from_an_azure_deployment(gw: Gateway) -> None:
    chunks = list(
        client(gw).chat.completions.create(
            model="gpt-azure", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == RESPONSE_TOKENS
    assert not [c for c in chunks if c.usage is not None]  # not asked for: cut


def test_azures_content_filter_is_a_clear_openai_error(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).chat.completions.create(
            model="gpt-azure",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-azure-filter": "prompt"},
        )
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "content_filter"
    assert body["type"] == "invalid_request_error" and body["param"] == "prompt"
    assert "content filter" in body["message"] and "violence: medium" in body["message"]


def test_an_azure_deployment_with_an_entra_id_token(gw: Gateway) -> None:
    """The sidecar's token from Entra ID (azure-identity, App Service's managed identity)
    goes as the bearer; the fake takes only tokens its identity endpoint issued."""
    raw = client(gw).chat.completions.with_raw_response.create(
        model="gpt-entra", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().choices[0].message.content
    sent = last_sent(gw)
    assert sent["path"] == "/openai/deployments/my-gpt-4o/chat/completions"
    assert sent["headers"]["authorization"].startswith("Bearer fake-azure-")
    assert "api-key" not in sent["headers"]


# -- Google: the Gemini API, Vertex AI ---------------------------------------------------------


def test_a_chat_completion_served_by_gemini_with_an_api_key(gw: Gateway) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(
        model="gemini",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    )
    answer = raw.parse()
    assert answer.model == GEMINI_MODEL and answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == RESPONSE_TOKENS
    sent = last_sent(gw)
    assert sent["path"] == f"/v1beta/models/{GEMINI_MODEL}:generateContent"
    assert sent["headers"]["x-goog-api-key"] == BACKEND_B_SECRET
    assert "authorization" not in sent["headers"]
    assert sent["body"]["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert sent["body"]["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]


def test_a_stream_served_by_vertex_with_an_adc_token(gw: Gateway) -> None:
    """google-auth's token (a service account's, from the fake's token endpoint) goes as the
    bearer; the stream's server-sent events are Gemini's, read as OpenAI's chunks."""
    chunks = list(
        client(gw).chat.completions.create(
            model="gemini-vertex",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == RESPONSE_TOKENS
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].completion_tokens == RESPONSE_TOKENS
    sent = last_sent(gw)
    assert sent["path"] == (
        "/v1/projects/gw-test/locations/us-central1/publishers/google/models/"
        f"{GEMINI_MODEL}:streamGenerateContent"
    )
    assert sent["headers"]["authorization"].startswith("Bearer fake-google-")


def test_a_gemini_function_call(gw: Gateway) -> None:
    answer = client(gw).chat.completions.create(
        model="gemini",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
        tool_choice="required",
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    assert choice.message.tool_calls[0].function.name == "weather"  # type: ignore[union-attr]


def test_a_failover_to_vertex_takes_its_token_in_the_upstream_stage(gw: Gateway) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(
        model="gpt-then-vertex", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-aigw-backend"] == "vertex" and raw.headers["x-aigw-failover"] == "true"
    sent = last_sent(gw)
    assert sent["headers"]["authorization"].startswith("Bearer fake-google-")
    assert sent["path"].endswith(f"/models/{GEMINI_MODEL}:generateContent")


def test_a_failover_to_bedrock_is_signed_by_the_sidecar(gw: Gateway) -> None:
    """A pool's attempt to Bedrock is translated and signed in the upstream stage (botocore,
    the AWS credential chain of the sidecar's environment); the fake checks the signature."""
    raw = client(gw).chat.completions.with_raw_response.create(
        model="gpt-then-bedrock", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-aigw-backend"] == "bedrock" and raw.headers["x-aigw-failover"] == "true"
    sent = last_sent(gw)
    assert sent["path"] == "/model/anthropic.claude-3-5-sonnet-20241022-v2:0/converse"
    assert sent["headers"]["authorization"].startswith(
        "AWS4-HMAC-SHA256 Credential=AKIDGATEWAYTEST0001/"
    )
    assert sent["headers"]["x-amz-security-token"] == AWS_ENV["AWS_SESSION_TOKEN"]


def test_a_failover_from_bedrock_leaves_no_signature_on_the_next_attempt(gw: Gateway) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(
        model="bedrock-then-gpt", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-aigw-backend"] == "fake-a" and raw.headers["x-aigw-failover"] == "true"
    sent = gw.fake_requests(gw.fake_a)[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["authorization"] == f"Bearer {BACKEND_A_SECRET}"
    assert not [h for h in sent["headers"] if h.startswith("x-amz-")]


def test_envoys_own_reply_is_not_taken_for_the_providers(gw: Gateway) -> None:
    """A timeout is Envoy's answer, already the gateway's OpenAI error: it reaches the client
    as it is, not read as an Anthropic error."""
    with pytest.raises(openai.APIStatusError) as caught:
        client(gw).chat.completions.create(
            model="claude-slow",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-fault": "stall"},
        )
    assert caught.value.status_code == 504
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "response_timeout", body


# -- embeddings ---------------------------------------------------------------------------------


def test_embeddings_from_gemini_in_openais_shape(gw: Gateway) -> None:
    """The openai SDK asks for base64 vectors by default: the translation encodes them as OpenAI
    does. Gemini reports no count: the gateway's own is charged."""
    raw = client(gw).embeddings.with_raw_response.create(
        model="gemini-embedding", input=["hello world", "bye"], dimensions=8
    )
    result = raw.parse()
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in result.data)
    assert raw.headers["x-aigw-token-source"] == "estimate"
    sent = last_sent(gw)
    assert sent["path"] == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert [r["content"]["parts"][0]["text"] for r in sent["body"]["requests"]] == [
        "hello world",
        "bye",
    ]


def test_embeddings_from_bedrock_titan_signed_by_envoy(gw: Gateway) -> None:
    raw = client(gw).embeddings.with_raw_response.create(
        model="titan-embedding", input="hello world", dimensions=256, encoding_format="float"
    )
    result = raw.parse()
    assert len(result.data) == 1 and len(result.data[0].embedding) == 256
    assert result.usage.prompt_tokens > 0
    assert raw.headers["x-aigw-token-source"] == "provider"
    sent = last_sent(gw)
    assert sent["path"] == "/model/amazon.titan-embed-text-v2:0/invoke"
    assert sent["headers"]["authorization"].startswith("AWS4-HMAC-SHA256 ")


def test_what_titan_cannot_embed_is_refused_before_the_call(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).embeddings.create(model="titan-embedding", input=["one", "two"])
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "input"


# -- response guards on translated answers ------------------------------------------------------


@pytest.mark.parametrize("model", ["claude-guarded", "bedrock-guarded"])
def test_a_translated_answer_that_a_guard_denies_is_the_guards_error(
    gw: Gateway, model: str
) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client(gw).chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "go"}],
            extra_headers={"x-fake-response-text": "now self-destruct please"},
        )
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "guard_blocked:deny-out"


@pytest.mark.parametrize("model", ["claude-guarded", "bedrock-guarded"])
def test_a_translated_stream_is_masked_and_cut_by_response_guards(gw: Gateway, model: str) -> None:
    """The provider's events become OpenAI's chunks first; the guards judge those."""
    masked = client(gw).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "mail?"}],
        stream=True,
        extra_headers={
            "x-fake-response-text": "write to bob@example.org today",
            "x-fake-chunk-chars": "3",
        },
    )
    text = "".join(c.choices[0].delta.content or "" for c in masked if c.choices)
    assert text == "write to [EMAIL] today"
    cut = client(gw).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "go"}],
        stream=True,
        extra_headers={
            "x-fake-response-text": "counting down, then self-destruct and more text after",
            "x-fake-chunk-chars": "5",
        },
    )
    received = ""
    with pytest.raises(openai.APIError) as caught:
        for chunk in cut:
            if chunk.choices:
                received += chunk.choices[0].delta.content or ""
    assert "guard_blocked:deny-out" in str(caught.value.body)
    assert "self-destruct" not in received
