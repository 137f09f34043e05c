"""The fake's embedding endpoints, driven through the official SDKs: AWS Bedrock's InvokeModel
for Amazon Titan Text Embeddings and Cohere Embed (boto3's `bedrock-runtime`, which signs with
SigV4), Google's `embedContent` / `batchEmbedContents` (Gemini API) and `predict` /
`embedContent` (Vertex AI) through `google-genai`; and the gateway's translations
(extproc/providers/bedrock.py, gemini.py: their `embeddings`) checked against them: a
translated request the fake (after the providers' references) would refuse fails here, and
its answer comes back as OpenAI's, usage and base64 included."""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from botocore.exceptions import ClientError
from google import genai
from google.genai import errors, types
from google.oauth2.credentials import Credentials as GoogleCredentials
from openai.types import CreateEmbeddingResponse

from extproc.devtools.fake_llm import FakeLLMSettings
from extproc.devtools.fake_llm.wire import embedding
from extproc.errors import GatewayError
from extproc.providers import bedrock, gemini
from extproc.providers.openai_answer import encode

from .provider_cases import AWS_CREDENTIALS, bedrock_client, signed_headers
from .provider_cases import embeddings_target as target
from .test_fake_gemini import _options, google_token
from .test_fake_llm import _http, _running

TITAN = "amazon.titan-embed-text-v2:0"
COHERE_V3 = "cohere.embed-english-v3"
COHERE_V4 = "us.cohere.embed-v4:0"
VERTEX = "/v1/projects/p/locations/us-central1/publishers/google"
GOOGLE_HEADERS = {"x-goog-api-key": "test-key", "content-type": "application/json"}


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with _running(FakeLLMSettings(name="fake-embeddings", **AWS_CREDENTIALS)) as bound:
        yield bound


@pytest.fixture
def client(port: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    # A Bedrock API key in the environment would make the SDK send it instead of signing.
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK", raising=False)
    return bedrock_client(port)


def invoke(client: Any, model: str, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    answer = client.invoke_model(
        modelId=model, body=orjson.dumps(body), contentType="application/json"
    )
    return json.loads(answer["body"].read()), answer["ResponseMetadata"]["HTTPHeaders"]


def refused_by_bedrock(client: Any, model: str, body: dict[str, Any]) -> str:
    with pytest.raises(ClientError) as caught:
        invoke(client, model, body)
    response = caught.value.response
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert response["Error"]["Code"] == "ValidationException"
    return str(response["Error"]["Message"])


def signed_post(port: int, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """A POST signed by botocore's SigV4 signer (as Envoy signs the gateway's), sent by urllib."""
    return _http(port, path, method="POST", body=body, headers=signed_headers(port, path, body))


def norm(values: list[float]) -> float:
    return math.sqrt(math.fsum(v * v for v in values))


def records(port: int) -> list[dict[str, Any]]:
    return json.loads(_http(port, "/_fake/requests")[2])


# -- Bedrock through boto3 ------------------------------------------------------------------------


def test_titan_v2_through_the_sdk(client: Any) -> None:
    answer, headers = invoke(client, TITAN, {"inputText": "hello world", "dimensions": 256})
    assert len(answer["embedding"]) == 256 and abs(norm(answer["embedding"]) - 1) < 1e-5
    assert answer["inputTextTokenCount"] == 3
    assert headers["x-amzn-bedrock-input-token-count"] == "3"
    assert answer["embeddingsByType"] == {"float": answer["embedding"]}
    # The same text's vector as the fake's OpenAI endpoint gives it.
    assert answer["embedding"] == list(embedding(b"shello world", 256)[0])
    both = {"normalize": True, "embeddingTypes": ["float", "binary"]}
    default, _ = invoke(client, TITAN, {"inputText": "hi", **both})
    assert len(default["embedding"]) == 1024
    assert set(default["embeddingsByType"]["binary"]) <= {0, 1}
    v1, _ = invoke(client, "amazon.titan-embed-text-v1", {"inputText": "hi"})
    assert len(v1["embedding"]) == 1536 and set(v1) == {"embedding", "inputTextTokenCount"}


def test_cohere_through_the_sdk(client: Any) -> None:
    texts = ["first text", "second"]
    answer, headers = invoke(client, COHERE_V3, {"texts": texts, "input_type": "search_query"})
    assert answer["response_type"] == "embeddings_floats" and answer["texts"] == texts
    assert [len(v) for v in answer["embeddings"]] == [1024, 1024] and answer["id"]
    assert headers["x-amzn-bedrock-input-token-count"] == "5"  # 3 + 2
    options = {"embedding_types": ["float", "int8"], "truncate": "END"}
    typed, _ = invoke(client, COHERE_V3, {"texts": texts, "input_type": "clustering", **options})
    assert typed["response_type"] == "embeddings_by_type"
    assert typed["embeddings"]["float"] == answer["embeddings"]
    assert all(-128 <= x <= 127 for v in typed["embeddings"]["int8"] for x in v)
    options = {"output_dimension": 256, "embedding_types": ["ubinary"]}
    v4, _ = invoke(client, COHERE_V4, {"texts": texts, "input_type": "search_document", **options})
    assert v4["response_type"] == "embeddings_by_type"
    assert [len(v) for v in v4["embeddings"]["ubinary"]] == [32, 32]  # 8 dimensions a byte


@pytest.mark.parametrize(
    ("model", "body", "said"),
    [
        (TITAN, {"inputText": "a", "dimensions": 300}, "#/dimensions: 300 is not a valid enum"),
        (TITAN, {"inputText": "a", "normalise": True}, "extraneous key [normalise]"),
        (TITAN, {"inputText": ""}, "#/inputText"),
        (TITAN, {"texts": ["a"]}, "required key [inputText] not found"),
        ("amazon.titan-embed-text-v1", {"inputText": "a", "dimensions": 256}, "extraneous key"),
        (COHERE_V3, {"texts": ["a"]}, "required key [input_type] not found"),
        (COHERE_V3, {"texts": ["a"] * 97, "input_type": "search_document"}, "maximum item count"),
        (COHERE_V3, {"texts": ["x" * 2049], "input_type": "search_document"}, "maxLength: 2048"),
        (COHERE_V3, {"texts": ["a"], "input_type": "clustering", "truncate": "LEFT"}, "truncate"),
        (COHERE_V3, {"texts": ["a"], "input_type": "search_document", "output_dimension": 256},
         "extraneous key [output_dimension]"),
        (COHERE_V4, {"texts": ["a"], "input_type": "search_document", "output_dimension": 300},
         "output_dimension"),
        (COHERE_V4, {"texts": ["a"], "input_type": "query"}, "input_type"),
        (COHERE_V4, {"input_type": "search_document"}, "exactly one of texts"),
        ("anthropic.claude-3-haiku-20240307-v1:0", {"inputText": "a"}, "identifier is invalid"),
    ],
)  # fmt: skip
def test_what_bedrock_refuses_the_fake_refuses(
    client: Any, model: str, body: dict[str, Any], said: str
) -> None:
    assert said in refused_by_bedrock(client, model, body)


def test_a_wrong_signature_is_refused(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK", raising=False)
    with pytest.raises(ClientError) as caught:
        invoke(bedrock_client(port, secret="not-the-secret"), TITAN, {"inputText": "a"})
    assert caught.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    # A body changed after it was signed.
    path = bedrock.EMBEDDINGS.path(target("bedrock", TITAN))
    headers = signed_headers(port, path, b'{"inputText": "a"}')
    assert _http(port, path, method="POST", body=b'{"inputText": "a"}', headers=headers)[0] == 200
    assert _http(port, path, method="POST", body=b'{"inputText": "b"}', headers=headers)[0] == 403


@pytest.mark.parametrize(
    ("fault", "code", "status"),
    [("429", "ThrottlingException", 429), ("503", "ServiceUnavailableException", 503)],
)
def test_faults_in_bedrocks_shape(client: Any, fault: str, code: str, status: int) -> None:
    def add(request: Any, **_: Any) -> None:
        request.headers["x-fake-fault"] = fault

    client.meta.events.register("before-send.bedrock-runtime.*", add)
    with pytest.raises(ClientError) as caught:
        invoke(client, TITAN, {"inputText": "a"})
    assert caught.value.response["Error"]["Code"] == code
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == status


# -- Bedrock: the gateway's translation against the fake ------------------------------------------


@pytest.mark.parametrize(
    ("model", "body", "size", "tokens"),
    [
        (TITAN, {"input": "hello world", "dimensions": 512}, 512, 3),
        (TITAN, {"input": "hello world"}, 1024, 3),
        ("amazon.titan-embed-text-v1", {"input": ["hello world"]}, 1536, 3),
        (COHERE_V3, {"input": ["hello world", "again"]}, 1024, 5),
        (COHERE_V4, {"input": ["hello world", "again"], "dimensions": 256}, 256, 5),
        (COHERE_V4, {"input": "hello world"}, 1536, 3),
        (f"arn:aws:bedrock:us-east-1::foundation-model/{COHERE_V3}", {"input": "x"}, 1024, 1),
    ],
)  # fmt: skip
def test_translated_requests_pass_the_fake_and_come_back_as_openai(
    port: int, model: str, body: dict[str, Any], size: int, tokens: int
) -> None:
    where = target("bedrock", model)
    request = bedrock.EMBEDDINGS.request(where, {"model": "emb", **body})
    status, headers, raw = signed_post(port, bedrock.EMBEDDINGS.path(where), orjson.dumps(request))
    assert status == 200, raw
    lowered = {k.lower(): v for k, v in headers.items()}
    out = bedrock.EMBEDDINGS.answer(orjson.loads(raw), "emb", lowered)
    parsed = CreateEmbeddingResponse.model_validate(out)
    texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
    assert [d.index for d in parsed.data] == list(range(len(texts)))
    for item, text in zip(parsed.data, texts, strict=True):
        assert item.embedding == list(embedding(b"s" + text.encode(), size)[0])
    assert parsed.model == "emb"
    assert parsed.usage is not None and parsed.usage.prompt_tokens == tokens
    # As the openai SDK asks by default: base64 float32, the same numbers (float32 already).
    encoded = encode(out, "base64")
    first = base64.b64decode(encoded["data"][0]["embedding"])
    assert list(struct.unpack(f"<{size}f", first)) == parsed.data[0].embedding


def test_a_refusal_of_the_fake_reads_as_an_openai_error(port: int) -> None:
    path = bedrock.EMBEDDINGS.path(target("bedrock", TITAN))
    status, _, raw = signed_post(port, path, b'{"inputText": "a", "dimensions": 100}')
    err = bedrock.PROVIDER.error(status, raw)
    assert (err.status, err.type, err.code) == (400, "invalid_request_error", "ValidationException")
    assert "Malformed input request" in err.message


# -- Google through google-genai ------------------------------------------------------------------


def test_gemini_api_through_the_sdk(port: int) -> None:
    client = genai.Client(api_key="test-key", http_options=_options(port, "v1beta"))
    answer = client.models.embed_content(
        model="gemini-embedding-001",
        contents=["hello world", "again"],
        config=types.EmbedContentConfig(output_dimensionality=64, task_type="RETRIEVAL_QUERY"),
    )
    assert answer.embeddings is not None
    assert [e.values for e in answer.embeddings] == [
        list(embedding(b"shello world", 64)[0]),
        list(embedding(b"sagain", 64)[0]),
    ]
    record = records(port)[-1]
    assert record["path"] == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert record["credential"] == "x-goog-api-key"
    full = client.models.embed_content(model="text-embedding-004", contents="x")
    assert full.embeddings is not None and len(full.embeddings[0].values or ()) == 768


def test_vertex_ai_through_the_sdk(port: int) -> None:
    client = genai.Client(
        vertexai=True,
        project="p",
        location="us-central1",
        credentials=GoogleCredentials(google_token(port)),
        http_options=_options(port, "v1"),
    )
    # A text embedding model: predict, each text's token count in its statistics.
    answer = client.models.embed_content(
        model="text-embedding-005",
        contents=["hello world", "again"],
        config=types.EmbedContentConfig(output_dimensionality=32),
    )
    assert answer.embeddings is not None
    assert [len(e.values or ()) for e in answer.embeddings] == [32, 32]
    assert [e.statistics.token_count for e in answer.embeddings if e.statistics] == [3, 2]
    assert records(port)[-1]["path"] == f"{VERTEX}/models/text-embedding-005:predict"
    # Gemini Embedding 2: embedContent (the SDK sends its options in embedContentConfig).
    single = client.models.embed_content(
        model="gemini-embedding-2",
        contents="hello world",
        config=types.EmbedContentConfig(output_dimensionality=16),
    )
    assert single.embeddings is not None
    assert single.embeddings[0].values == list(embedding(b"shello world", 16)[0])
    assert records(port)[-1]["body"]["embedContentConfig"] == {"outputDimensionality": 16}


def test_what_google_refuses_the_fake_refuses(port: int) -> None:
    client = genai.Client(api_key="test-key", http_options=_options(port, "v1beta"))
    with pytest.raises(errors.ClientError) as caught:
        client.models.embed_content(
            model="gemini-embedding-001",
            contents="x",
            config=types.EmbedContentConfig(output_dimensionality=4000),
        )
    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")
    path = "/v1beta/models/gemini-embedding-001:batchEmbedContents"

    def batch(*requests: dict[str, Any]) -> tuple[int, Any]:
        status, _, raw = _http(port, path, method="POST", headers=GOOGLE_HEADERS,
                               body=orjson.dumps({"requests": list(requests)}))  # fmt: skip
        return status, json.loads(raw)

    one = {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "x"}]}}
    assert batch(one)[0] == 200
    status, answer = batch(*[one] * 101)
    assert status == 400 and "at most 100 requests" in answer["error"]["message"]
    assert batch({**one, "model": "models/other"})[0] == 400
    assert batch({**one, "taskType": "SEARCH"})[0] == 400
    status, answer = batch({**one, "dimensions": 8})
    assert status == 400 and 'Unknown name "dimensions"' in answer["error"]["message"]
    assert batch({**one, "content": {"parts": [{"text": ""}]}})[0] == 400
    # Vertex AI: gemini-embedding-001 takes one instance; autoTruncate false refuses a long text.
    token = {"authorization": f"Bearer {google_token(port)}", "content-type": "application/json"}
    predict = f"{VERTEX}/models/gemini-embedding-001:predict"
    two = {"instances": [{"content": "a"}, {"content": "b"}]}
    assert _http(port, predict, method="POST", headers=token, body=orjson.dumps(two))[0] == 400
    long = {"instances": [{"content": "x" * 9000}], "parameters": {"autoTruncate": False}}
    status, _, raw = _http(port, predict, method="POST", headers=token, body=orjson.dumps(long))
    assert status == 400 and b"input token count" in raw
    del long["parameters"]
    status, _, raw = _http(port, predict, method="POST", headers=token, body=orjson.dumps(long))
    statistics = json.loads(raw)["predictions"][0]["embeddings"]["statistics"]
    assert status == 200 and statistics == {"truncated": True, "token_count": 2048}
    # The Gemini API has no predict.
    status, _, _ = _http(port, "/v1beta/models/gemini-embedding-001:predict", method="POST",
                         headers=GOOGLE_HEADERS, body=orjson.dumps(two))  # fmt: skip
    assert status == 404


# -- Google: the gateway's translation against the fake -------------------------------------------


@pytest.mark.parametrize(
    ("model", "url_path", "texts", "size", "tokens"),
    [
        ("gemini-embedding-001", "/v1beta", ["hello world", "again"], 3072, None),
        ("text-embedding-004", "/v1beta", ["hello world"], 768, None),
        ("text-embedding-005", VERTEX, ["hello world", "again"], 768, 5),
        ("gemini-embedding-001", VERTEX, ["hello world"], 3072, 3),
        ("gemini-embedding-2", VERTEX, ["hello world"], 3072, 3),
        ("gemini-embedding-2", "/v1/publishers/google", ["hello world"], 3072, 3),
    ],
)
def test_translated_google_requests_pass_the_fake_and_come_back_as_openai(
    port: int, model: str, url_path: str, texts: list[str], size: int, tokens: int | None
) -> None:
    where = target("gemini", model, url_path)
    for dimensions in (None, 64):
        body: dict[str, Any] = {"model": "emb", "input": texts}
        if dimensions is not None:
            body["dimensions"] = dimensions
        request = gemini.EMBEDDINGS.request(where, body)
        headers = GOOGLE_HEADERS
        if "/publishers/" in url_path:
            headers = {"authorization": f"Bearer {google_token(port)}", **GOOGLE_HEADERS}
        path = gemini.EMBEDDINGS.path(where)
        status, _, raw = _http(
            port, path, method="POST", headers=headers, body=orjson.dumps(request)
        )
        assert status == 200, raw
        out = gemini.EMBEDDINGS.answer(orjson.loads(raw), "emb", {})
        if tokens is None:  # the gateway settles it at its own count (and says it)
            assert "usage" not in out
            out = {**out, "usage": {"prompt_tokens": 0, "total_tokens": 0}}
        parsed = CreateEmbeddingResponse.model_validate(out)
        assert [d.embedding for d in parsed.data] == [
            list(embedding(b"s" + t.encode(), dimensions or size)[0]) for t in texts
        ]
        if tokens is not None:
            assert parsed.usage.prompt_tokens == parsed.usage.total_tokens == tokens


def test_a_google_refusal_reads_as_an_openai_error(port: int) -> None:
    where = target("gemini", "gemini-embedding-001", "/v1beta")
    request = gemini.EMBEDDINGS.request(where, {"model": "emb", "input": "x", "dimensions": 5000})
    status, _, raw = _http(port, gemini.EMBEDDINGS.path(where), method="POST",
                           headers=GOOGLE_HEADERS, body=orjson.dumps(request))  # fmt: skip
    err = gemini.PROVIDER.error(status, raw)
    assert (err.status, err.code) == (400, "INVALID_ARGUMENT")
    with pytest.raises(GatewayError):  # what the gateway refuses never reaches the provider
        gemini.EMBEDDINGS.request(where, {"model": "emb", "input": ["x"] * 101})
