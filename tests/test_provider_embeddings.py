"""OpenAI embeddings to Google's (Gemini API, Vertex AI) and AWS Bedrock's (Titan, Cohere)
embedding APIs and back (extproc/providers/gemini.py, bedrock.py; openai_request.py reads the
inputs, openai_answer.py builds the answer): golden request/answer pairs per format, refusals
naming the parameter, usage from the body, a header or none, and `encode` (base64 float32)
decoded by the openai SDK's own decoder."""

from __future__ import annotations

import array
import base64
import math
import struct
from typing import Any

import httpx2  # the openai SDK's HTTP client library
import openai
import orjson
import pytest

from extproc.config import ResolvedTarget
from extproc.errors import GatewayError
from extproc.providers import anthropic, bedrock, gemini
from extproc.providers.openai_answer import encode

from .provider_cases import embeddings_target as target

VERTEX = "/v1/projects/p/locations/us-central1/publishers/google"


def gem(model: str = "gemini-embedding-001", url_path: str = "/v1beta") -> ResolvedTarget:
    return target("gemini", model, url_path)


def aws(model: str) -> ResolvedTarget:
    return target("bedrock", model)


def refused(embeddings: Any, where: ResolvedTarget, **body: Any) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        embeddings.request(where, {"model": "emb", **body})
    assert caught.value.status == 400
    return caught.value


def test_the_providers_have_their_embeddings() -> None:
    assert gemini.PROVIDER.embeddings is gemini.EMBEDDINGS
    assert bedrock.PROVIDER.embeddings is bedrock.EMBEDDINGS
    assert anthropic.PROVIDER.embeddings is None


# -- Gemini API -----------------------------------------------------------------------------------


def test_gemini_api_batch_embed_contents() -> None:
    where = gem()
    assert gemini.EMBEDDINGS.path(where) == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    body = {"model": "emb", "input": ["a", "b"], "dimensions": 64, "user": "u-1"}
    assert gemini.EMBEDDINGS.request(where, body) == {
        "requests": [
            {
                "model": "models/gemini-embedding-001",
                "content": {"parts": [{"text": "a"}]},
                "outputDimensionality": 64,
            },
            {
                "model": "models/gemini-embedding-001",
                "content": {"parts": [{"text": "b"}]},
                "outputDimensionality": 64,
            },
        ]
    }
    # A string is one text; `encoding_format` is not the provider's business.
    assert gemini.EMBEDDINGS.request(
        where, {"model": "emb", "input": "hi", "encoding_format": "base64"}
    ) == {
        "requests": [
            {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "hi"}]}}
        ]
    }
    answer = {"embeddings": [{"values": [0.5, -0.5]}, {"values": [1, 0]}]}
    assert gemini.EMBEDDINGS.answer(answer, "emb", {}) == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.5, -0.5]},
            {"object": "embedding", "index": 1, "embedding": [1.0, 0.0]},
        ],
        "model": "emb",
    }  # no usage: the Gemini API reports none


def test_a_model_id_is_percent_encoded_in_the_path() -> None:
    assert (
        gemini.EMBEDDINGS.path(gem("tuned/x:y"))
        == "/v1beta/models/tuned%2Fx%3Ay:batchEmbedContents"
    )
    assert bedrock.EMBEDDINGS.path(aws("amazon.titan-embed-text-v2:0")) == (
        "/model/amazon.titan-embed-text-v2%3A0/invoke"
    )


def test_gemini_api_takes_at_most_100_texts() -> None:
    assert len(gemini.EMBEDDINGS.request(gem(), {"input": ["x"] * 100})["requests"]) == 100
    err = refused(gemini.EMBEDDINGS, gem(), input=["x"] * 101)
    assert (err.param, err.code) == ("input", "unsupported_value")
    assert "at most 100" in err.message


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": [1, 2, 3]}, "input", "unsupported_value"),  # token ids
        ({"input": [[1, 2], [3]]}, "input", "unsupported_value"),
        ({"input": ""}, "input", "invalid_value"),
        ({"input": ["a", ""]}, "input", "invalid_value"),
        ({"input": []}, "input", "invalid_type"),
        ({"input": None}, "input", "invalid_type"),
        ({"input": ["a", 1]}, "input", "invalid_type"),
        ({"input": "a", "dimensions": 0}, "dimensions", "invalid_value"),
        ({"input": "a", "dimensions": "64"}, "dimensions", "invalid_value"),
        ({"input": "a", "dimensions": True}, "dimensions", "invalid_value"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
        ({"input": "a", "user": 7}, "user", "invalid_type"),
        ({"input": "a", "task_type": "RETRIEVAL_QUERY"}, "task_type", "unsupported_parameter"),
    ],
)
def test_refusals_name_the_parameter(body: dict[str, Any], param: str, code: str) -> None:
    for embeddings, where in (
        (gemini.EMBEDDINGS, gem()),
        (gemini.EMBEDDINGS, gem("text-embedding-005", VERTEX)),
        (bedrock.EMBEDDINGS, aws("cohere.embed-v4:0")),
    ):
        err = refused(embeddings, where, **body)
        assert (err.param, err.code) == (param, code), (where.provider_model, err)
    assert "token ids" in refused(gemini.EMBEDDINGS, gem(), input=[1, 2]).message


def test_an_unknown_parameter_set_to_null_is_no_parameter() -> None:
    body = {"model": "emb", "input": "a", "dimensions": None, "encoding_format": None, "x": None}
    assert gemini.EMBEDDINGS.request(gem(), body)["requests"][0].keys() == {"model", "content"}


# -- Vertex AI ------------------------------------------------------------------------------------


def test_vertex_predict_for_its_text_embedding_models() -> None:
    where = gem("text-embedding-005", VERTEX)
    assert gemini.EMBEDDINGS.path(where) == f"{VERTEX}/models/text-embedding-005:predict"
    body = {"model": "emb", "input": ["a", "b"], "dimensions": 256}
    assert gemini.EMBEDDINGS.request(where, body) == {
        "instances": [{"content": "a"}, {"content": "b"}],
        "parameters": {"autoTruncate": False, "outputDimensionality": 256},
    }
    assert gemini.EMBEDDINGS.request(where, {"input": "a"})["parameters"] == {"autoTruncate": False}
    answer = {
        "predictions": [
            {
                "embeddings": {
                    "values": [0.1, 0.2],
                    "statistics": {"truncated": False, "token_count": 3},
                }
            },
            # protobuf Values: a count may come as a float
            {"embeddings": {"values": [0.3, 0.4], "statistics": {"token_count": 4.0}}},
        ],
        "metadata": {"billableCharacterCount": 2},
    }
    out = gemini.EMBEDDINGS.answer(answer, "emb", {})
    assert [d["embedding"] for d in out["data"]] == [[0.1, 0.2], [0.3, 0.4]]
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert out["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    # A prediction without its count: no usage (the gateway counts the input).
    del answer["predictions"][1]["embeddings"]["statistics"]
    assert "usage" not in gemini.EMBEDDINGS.answer(answer, "emb", {})


def test_vertex_limits_the_texts_of_a_request() -> None:
    where = gem("text-embedding-005", VERTEX)
    assert len(gemini.EMBEDDINGS.request(where, {"input": ["x"] * 250})["instances"]) == 250
    assert refused(gemini.EMBEDDINGS, where, input=["x"] * 251).param == "input"
    # gemini-embedding-001: predict, one instance a request.
    one = gem("gemini-embedding-001", VERTEX)
    assert gemini.EMBEDDINGS.path(one).endswith("/models/gemini-embedding-001:predict")
    assert gemini.EMBEDDINGS.request(one, {"input": ["x"]})["instances"] == [{"content": "x"}]
    err = refused(gemini.EMBEDDINGS, one, input=["x", "y"])
    assert (err.param, err.code) == ("input", "unsupported_value")
    assert "one text" in err.message


def test_vertex_embed_content_for_gemini_embedding_2() -> None:
    for url_path in (VERTEX, "/v1/publishers/google"):  # with a project, or express mode
        where = gem("gemini-embedding-2", url_path)
        assert gemini.EMBEDDINGS.path(where) == f"{url_path}/models/gemini-embedding-2:embedContent"
        assert gemini.EMBEDDINGS.request(where, {"input": ["hi"], "dimensions": 128}) == {
            "content": {"role": "user", "parts": [{"text": "hi"}]},
            "autoTruncate": False,
            "outputDimensionality": 128,
        }
        assert refused(gemini.EMBEDDINGS, where, input=["a", "b"]).param == "input"
    answer = {
        "embedding": {"values": [0.6, 0.8]},
        "usageMetadata": {"promptTokenCount": 2, "totalTokenCount": 2},
        "truncated": False,
    }
    assert gemini.EMBEDDINGS.answer(answer, "emb", {}) == {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}],
        "model": "emb",
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }
    # The Gemini API's own embedContent: no usage.
    assert "usage" not in gemini.EMBEDDINGS.answer({"embedding": {"values": [1]}}, "emb", {})


@pytest.mark.parametrize(
    "answer",
    [
        {},
        {"embeddings": []},
        {"embeddings": [{"values": []}]},
        {"embeddings": [{"values": ["x"]}]},
        {"embeddings": [{"values": [True]}]},
        {"embeddings": [{}]},
        {"predictions": [{}]},
        {"predictions": [{"embeddings": {"values": None}}]},
        {"embedding": {"values": "AAAA"}},
    ],
)
def test_an_answer_without_its_vectors_cannot_be_read(answer: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        gemini.EMBEDDINGS.answer(answer, "emb", {})


# -- Bedrock --------------------------------------------------------------------------------------


def test_titan_text_embeddings_v2() -> None:
    where = aws("amazon.titan-embed-text-v2:0")
    assert bedrock.EMBEDDINGS.request(where, {"input": "hello", "dimensions": 256}) == {
        "inputText": "hello",
        "normalize": True,
        "dimensions": 256,
    }
    assert bedrock.EMBEDDINGS.request(where, {"input": ["hello"]}) == {
        "inputText": "hello",
        "normalize": True,
    }
    err = refused(bedrock.EMBEDDINGS, where, input=["a", "b"])
    assert (err.param, err.code) == ("input", "unsupported_value")
    err = refused(bedrock.EMBEDDINGS, where, input="a", dimensions=300)
    assert (err.param, err.code) == ("dimensions", "unsupported_value")
    assert "1024, 512, 256" in err.message
    answer = {
        "embedding": [0.6, 0.8],
        "inputTextTokenCount": 3,
        "embeddingsByType": {"float": [0.6, 0.8]},
    }
    assert bedrock.EMBEDDINGS.answer(answer, "emb", {}) == {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}],
        "model": "emb",
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    # The body's count first; the header's when the body has none.
    headers = {"x-amzn-bedrock-input-token-count": "5"}
    assert bedrock.EMBEDDINGS.answer(answer, "emb", headers)["usage"]["prompt_tokens"] == 3
    del answer["inputTextTokenCount"]
    assert bedrock.EMBEDDINGS.answer(answer, "emb", headers)["usage"]["prompt_tokens"] == 5
    assert "usage" not in bedrock.EMBEDDINGS.answer(answer, "emb", {})


def test_titan_text_embeddings_v1_has_one_size() -> None:
    for model in ("amazon.titan-embed-text-v1", "amazon.titan-embed-text-v1:2:8k"):
        where = aws(model)
        assert bedrock.EMBEDDINGS.request(where, {"input": "hi"}) == {"inputText": "hi"}
        assert bedrock.EMBEDDINGS.request(where, {"input": "hi", "dimensions": 1536}) == {
            "inputText": "hi"
        }
        err = refused(bedrock.EMBEDDINGS, where, input="hi", dimensions=512)
        assert err.param == "dimensions" and "1536" in err.message


def test_cohere_embed_v3() -> None:
    for model in ("cohere.embed-english-v3", "cohere.embed-multilingual-v3"):
        where = aws(model)
        assert bedrock.EMBEDDINGS.request(where, {"input": ["a", "b"], "dimensions": 1024}) == {
            "texts": ["a", "b"],
            "input_type": "search_document",
            "embedding_types": ["float"],
        }
        assert refused(bedrock.EMBEDDINGS, where, input="a", dimensions=256).param == "dimensions"
        assert len(bedrock.EMBEDDINGS.request(where, {"input": ["x"] * 96})["texts"]) == 96
        err = refused(bedrock.EMBEDDINGS, where, input=["x"] * 97)
        assert err.param == "input" and "at most 96" in err.message
        bedrock.EMBEDDINGS.request(where, {"input": "x" * 2048})
        err = refused(bedrock.EMBEDDINGS, where, input=["a", "x" * 2049])
        assert err.param == "input" and "input[1]" in err.message


def test_cohere_embed_v4_and_inference_profiles() -> None:
    for model in (
        "cohere.embed-v4:0",
        "us.cohere.embed-v4:0",
        "eu.cohere.embed-v4:0",
        "global.cohere.embed-v4:0",
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.cohere.embed-v4:0",
        "arn:aws:bedrock:us-east-1::foundation-model/cohere.embed-v4:0",
    ):
        where = aws(model)
        assert bedrock.EMBEDDINGS.request(where, {"input": ["a"], "dimensions": 512}) == {
            "texts": ["a"],
            "input_type": "search_document",
            "embedding_types": ["float"],
            "output_dimension": 512,
        }, model
        assert "output_dimension" not in bedrock.EMBEDDINGS.request(where, {"input": "a"})
        assert refused(bedrock.EMBEDDINGS, where, input="a", dimensions=768).param == "dimensions"
        # v4 takes long texts (128k tokens).
        bedrock.EMBEDDINGS.request(where, {"input": "x" * 5000})


@pytest.mark.parametrize(
    "model",
    [
        "anthropic.claude-3-5-sonnet-20241022-v2:0",
        "amazon.titan-embed-image-v1",
        "amazon.titan-embed-text-v2x",
        "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3",
        "arn:aws:bedrock:us-east-1:123456789012:provisioned-model/abc",
    ],
)
def test_a_model_whose_format_is_unknown_is_refused(model: str) -> None:
    err = refused(bedrock.EMBEDDINGS, aws(model), input="a")
    assert (err.param, err.code) == ("model", "model_not_supported")


def test_cohere_answers_and_the_token_count_header() -> None:
    floats = {
        "embeddings": [[0.1], [0.2]],
        "id": "x",
        "response_type": "embeddings_floats",
        "texts": ["a", "b"],
    }
    by_type = {**floats, "embeddings": {"float": [[0.1], [0.2]], "int8": [[12], [25]]},
               "response_type": "embeddings_by_type"}  # fmt: skip
    for answer in (floats, by_type):
        for headers in (
            {"x-amzn-bedrock-input-token-count": "4"},
            {"X-Amzn-Bedrock-Input-Token-Count": "4"},
        ):
            out = bedrock.EMBEDDINGS.answer(answer, "emb", headers)
            assert [d["embedding"] for d in out["data"]] == [[0.1], [0.2]]
            assert out["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
        assert "usage" not in bedrock.EMBEDDINGS.answer(answer, "emb", {})
        bad = {"x-amzn-bedrock-input-token-count": "n/a"}
        assert "usage" not in bedrock.EMBEDDINGS.answer(answer, "emb", bad)
    for broken in ({"embeddings": {"int8": [[1]]}}, {"embeddings": []}, {"id": "x"}):
        with pytest.raises(ValueError):
            bedrock.EMBEDDINGS.answer(broken, "emb", {})


def test_errors_are_the_providers_own() -> None:
    err = bedrock.PROVIDER.error(400, b'{"message": "Malformed input request: #: bad"}')
    assert (err.status, err.code) == (400, "ValidationException")
    err = gemini.PROVIDER.error(
        400, b'{"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT"}}'
    )
    assert (err.status, err.code) == (400, "INVALID_ARGUMENT")


# -- encode ---------------------------------------------------------------------------------------


def answer_of(*vectors: list[float]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
        ],
        "model": "emb",
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }


def as_float32(values: list[float]) -> list[float]:
    return list(struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values)))


def test_float_answers_are_left_as_they_are() -> None:
    answer = answer_of([0.1, 0.2])
    assert encode(answer, None) is answer
    assert encode(answer, "float") is answer


def test_base64_round_trips_through_the_openai_sdk() -> None:
    vectors = [[0.1, -0.25, 1 / 3, 1e-8, -0.0, 0.9999999], [math.pi, -math.e, 0.0]]
    answer = answer_of(*vectors)
    encoded = encode(answer, "base64")
    assert answer["data"][0]["embedding"] == vectors[0]  # not changed in place
    assert encoded["usage"] == answer["usage"] and encoded["model"] == "emb"
    assert [d["index"] for d in encoded["data"]] == [0, 1]
    for item, values in zip(encoded["data"], vectors, strict=True):
        raw = base64.b64decode(item["embedding"])
        assert len(raw) == 4 * len(values)
        assert list(struct.unpack(f"<{len(values)}f", raw)) == as_float32(values)  # little-endian
    # The openai SDK, asked for embeddings without an encoding_format: it asks base64 (a body
    # the gateway encodes as the client asked) and decodes it.
    asked: list[Any] = []

    def backend(request: httpx2.Request) -> httpx2.Response:
        body = orjson.loads(request.content)
        asked.append(body.get("encoding_format"))
        return httpx2.Response(200, json=encode(answer, body.get("encoding_format")))

    client = openai.OpenAI(
        api_key="k",
        base_url="http://gateway.test/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(backend)),
    )
    got = client.embeddings.create(model="emb", input=["a", "b"])
    assert asked == ["base64"]
    assert [d.embedding for d in got.data] == [as_float32(v) for v in vectors]
    assert got.usage.prompt_tokens == 2
    explicit = client.embeddings.create(model="emb", input=["a", "b"], encoding_format="float")
    assert asked[-1] == "float"
    assert [d.embedding for d in explicit.data] == vectors
    # ...and its decoder without numpy, as it is here.
    first = encoded["data"][0]["embedding"]
    assert array.array("f", base64.b64decode(first)).tolist() == as_float32(vectors[0])


def test_a_vector_float32_cannot_hold_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        encode(answer_of([1e39]), "base64")


def test_encode_takes_a_translation_answer_whole() -> None:
    out = bedrock.EMBEDDINGS.answer({"embedding": [0.5, 0.25]}, "emb", {})
    encoded = encode(out, "base64")
    assert (
        encoded["data"][0]["embedding"] == base64.b64encode(struct.pack("<2f", 0.5, 0.25)).decode()
    )
    assert "usage" not in encoded
