"""The ext_proc state machines, driven with hand-built ProcessingRequest messages."""

from __future__ import annotations

import asyncio
import hashlib
import os
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from extproc import protocol, routing
from extproc.config import build_runtime, load_runtime, parse_config
from extproc.contract import HANDOVER_KEY
from extproc.downstream import DownstreamStream
from extproc.protocol import ProcessingMode, ProcessingRequest, ProcessingResponse, pb
from extproc.server import build_services
from extproc.services import Services
from extproc.upstream import UpstreamStream

# tiktoken reads this when an encoding is first loaded; the Makefile exports it too.
os.environ.setdefault(
    "TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "tiktoken")
)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"

KEY_A = "sk-team-a"
KEY_B = "sk-team-b"
UPSTREAM_METADATA = {"x-aigw-stage": "upstream", "x-aigw-backend": "fake"}
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {
        "role": "user",
        "content": "Say hello in French, then in Japanese: こんにちは 🙂",
        "name": "ann",
    },
]


@pytest.fixture(scope="module")
def logged_services() -> Services:
    """The quickstart as shipped: JSON answers are accounted from Envoy's access log."""
    return build_services(load_runtime(QUICKSTART))


@pytest.fixture(scope="module")
def services(logged_services: Services) -> Services:
    """JSON answers pass this stage (json_path: inline), so its answer phases can be tested."""
    return with_sidecar(logged_services, json_path="inline")


def with_sidecar(services: Services, **settings: Any) -> Services:
    cfg = services.runtime.config
    cfg = cfg.model_copy(update={"sidecar": cfg.sidecar.model_copy(update=settings)})
    return build_services(build_runtime(cfg), services.tokens, services.quota)


def with_stream_path(services: Services, path: str) -> Services:
    return with_sidecar(services, stream_path=path)


# -- building requests ------------------------------------------------------------------------


def header_map(headers: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
    )


def request_headers(
    method: str = "POST",
    path: str = "/v1/chat/completions",
    key: str | None = KEY_A,
    extra: dict[str, str] | None = None,
    end_of_stream: bool = False,
) -> ProcessingRequest:
    headers = {":method": method, ":path": path, ":authority": "localhost:10000", ":scheme": "http"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    if method == "POST":
        headers["content-type"] = "application/json"
    headers.update(extra or {})
    return ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=header_map(headers), end_of_stream=end_of_stream)
    )


def request_body(body: Any) -> ProcessingRequest:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return ProcessingRequest(request_body=pb.HttpBody(body=raw, end_of_stream=True))


def response_headers(
    status: int = 200,
    content_type: str = "application/json",
    cluster: str | None = "aigw-backend-fake",
    extra: dict[str, str] | None = None,
    end_of_stream: bool = False,
) -> ProcessingRequest:
    headers = {":status": str(status), "content-type": content_type, **(extra or {})}
    req = ProcessingRequest(
        response_headers=pb.HttpHeaders(headers=header_map(headers), end_of_stream=end_of_stream)
    )
    if cluster is not None:
        req.attributes["envoy.filters.http.ext_proc"].update({"xds.cluster_name": cluster})
    return req


def response_body(body: Any, end_of_stream: bool = True) -> ProcessingRequest:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return ProcessingRequest(response_body=pb.HttpBody(body=raw, end_of_stream=end_of_stream))


def run(stream: DownstreamStream | UpstreamStream, *reqs: ProcessingRequest) -> list[Any]:
    async def go() -> list[ProcessingResponse]:
        return [await stream.handle(r) for r in reqs]

    return asyncio.run(go())


def chat(model: str = "gpt-4o", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **fields}


# -- reading responses ------------------------------------------------------------------------


def set_headers(mutation: Any) -> dict[str, str]:
    out = {}
    for option in mutation.set_headers:
        assert option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        assert option.header.value == ""
        out[option.header.key] = option.header.raw_value.decode()
    return out


def metadata(resp: ProcessingResponse) -> dict[str, Any]:
    return json_format.MessageToDict(resp.dynamic_metadata)


def unpacked(data: dict[str, Any]) -> dict[str, Any]:
    """The hand-over's keys as written, what only the sidecar reads unpacked from its one JSON
    string (contract.HANDOVER_KEY)."""
    out = dict(data)
    packed = out.pop(HANDOVER_KEY, None)
    if packed is not None:
        assert isinstance(packed, str)
        out.update(orjson.loads(packed))
    return out


def immediate(resp: ProcessingResponse) -> tuple[int, dict[str, str], Any]:
    assert resp.WhichOneof("response") == "immediate_response"
    imm = resp.immediate_response
    return imm.status.code, set_headers(imm.headers), orjson.loads(imm.body)


def assert_error(
    resp: ProcessingResponse, status: int, code: str, param: str | None = None
) -> dict[str, Any]:
    got_status, headers, body = immediate(resp)
    assert got_status == status
    assert headers["content-type"] == "application/json"
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["param"] == param
    assert resp.immediate_response.details == f"aigw_{code}"
    return body["error"]


def downstream(services: Services) -> DownstreamStream:
    return DownstreamStream(services)


def through_body(
    services: Services, body: dict[str, Any], path: str = "/v1/chat/completions"
) -> DownstreamStream:
    """A stream that has accepted the request headers and body."""
    stream = DownstreamStream(services)
    first, second = run(stream, request_headers(path=path), request_body(body))
    assert first.WhichOneof("response") == "request_headers"
    assert second.WhichOneof("response") == "request_body"
    return stream


# -- request headers: identity and endpoint ---------------------------------------------------


def test_missing_key(services: Services) -> None:
    [resp] = run(downstream(services), request_headers(key=None))
    error = assert_error(resp, 401, "missing_api_key")
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "authorization", ["Basic c2stdGVhbS1h", "Bearer", "Bearer   ", "sk-team-a"]
)
def test_unusable_authorization_is_a_missing_key(services: Services, authorization: str) -> None:
    req = request_headers(key=None, extra={"authorization": authorization})
    [resp] = run(downstream(services), req)
    assert_error(resp, 401, "missing_api_key")


def test_wrong_key(services: Services) -> None:
    wrong = "sk-team-a-but-not-really-7f3e"
    [resp] = run(downstream(services), request_headers(key=wrong))
    error = assert_error(resp, 401, "invalid_api_key")
    assert error["message"] == "Incorrect API key provided: ...7f3e."
    assert wrong.encode() not in resp.immediate_response.body
    assert wrong[:-4].encode() not in resp.immediate_response.body


def test_wrong_short_key_is_not_hinted(services: Services) -> None:
    [resp] = run(downstream(services), request_headers(key="sk-short"))
    error = assert_error(resp, 401, "invalid_api_key")
    assert error["message"] == "Incorrect API key provided: (hidden)."


def test_key_in_api_key_header(services: Services) -> None:
    req = request_headers(key=None, extra={"api-key": KEY_B})
    [resp] = run(downstream(services), req)
    assert resp.WhichOneof("response") == "request_headers"
    mutation = resp.request_headers.response.header_mutation
    assert set_headers(mutation) == {"x-aigw-team": "team-b"}
    assert list(mutation.remove_headers) == ["api-key"]


def test_value_field_is_read_when_raw_value_is_empty(services: Services) -> None:
    # Older Envoy runtimes send `value` instead of `raw_value`.
    headers = base_pb2.HeaderMap(
        headers=[
            base_pb2.HeaderValue(key=":method", value="GET"),
            base_pb2.HeaderValue(key=":path", value="/v1/models"),
            base_pb2.HeaderValue(key="authorization", value=f"Bearer {KEY_B}"),
        ]
    )
    [resp] = run(
        downstream(services), ProcessingRequest(request_headers=pb.HttpHeaders(headers=headers))
    )
    status, _, body = immediate(resp)
    assert status == 200
    assert len(body["data"]) == 2


@pytest.mark.parametrize(
    ("key", "ids"),
    [
        (KEY_A, ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]),
        (KEY_B, ["gpt-4o-mini", "text-embedding-3-small"]),
    ],
)
def test_list_models(services: Services, key: str, ids: list[str]) -> None:
    [resp] = run(downstream(services), request_headers("GET", "/v1/models", key))
    status, headers, body = immediate(resp)
    assert status == 200
    assert headers == {"content-type": "application/json"}
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ids
    for model in body["data"]:
        assert set(model) == {"id", "object", "created", "owned_by"}
        assert model["object"] == "model"
        assert model["owned_by"] == "extproc"
        assert isinstance(model["created"], int)


def test_retrieve_allowed_model(services: Services) -> None:
    [resp] = run(downstream(services), request_headers("GET", "/v1/models/gpt-4o/", KEY_A))
    status, _, body = immediate(resp)
    assert status == 200
    assert body["id"] == "gpt-4o"
    assert body["object"] == "model"
    assert body["owned_by"] == "extproc"


def test_retrieve_disallowed_model_looks_like_a_missing_one(services: Services) -> None:
    [denied] = run(downstream(services), request_headers("GET", "/v1/models/gpt-4o", KEY_B))
    error = assert_error(denied, 404, "model_not_found", "model")
    assert error["message"] == "The model `gpt-4o` does not exist or you do not have access to it."
    [missing] = run(downstream(services), request_headers("GET", "/v1/models/gpt-5", KEY_B))
    missing_error = assert_error(missing, 404, "model_not_found", "model")
    assert missing_error["message"] == error["message"].replace("gpt-4o", "gpt-5")


def test_unknown_url_and_wrong_method(services: Services) -> None:
    [resp] = run(downstream(services), request_headers("POST", "/v1/assistants"))
    assert_error(resp, 404, "unknown_url")
    [resp] = run(downstream(services), request_headers("GET", "/v1/chat/completions"))
    assert_error(resp, 405, "method_not_allowed")
    _, headers, _ = immediate(resp)
    assert headers == {"content-type": "application/json", "allow": "POST"}


def test_authentication_comes_before_routing(services: Services) -> None:
    [resp] = run(downstream(services), request_headers("POST", "/v1/assistants", key=None))
    assert_error(resp, 401, "missing_api_key")


def test_post_text_plain(services: Services) -> None:
    req = request_headers(extra={"content-type": "text/plain"})
    [resp] = run(downstream(services), req)
    assert_error(resp, 415, "unsupported_media_type")


def test_content_type_with_charset(services: Services) -> None:
    req = request_headers(extra={"content-type": "application/json; charset=utf-8"})
    [resp] = run(downstream(services), req)
    assert resp.WhichOneof("response") == "request_headers"


def test_content_length_over_the_limit(services: Services) -> None:
    limit = services.runtime.config.sidecar.max_body_bytes
    [resp] = run(downstream(services), request_headers(extra={"content-length": str(limit + 1)}))
    error = assert_error(resp, 413, "request_too_large")
    assert str(limit) in error["message"]
    [ok] = run(downstream(services), request_headers(extra={"content-length": str(limit)}))
    assert ok.WhichOneof("response") == "request_headers"


def test_post_without_body(services: Services) -> None:
    [resp] = run(downstream(services), request_headers(end_of_stream=True))
    assert_error(resp, 400, "missing_body")


def test_request_headers_strip_credentials_and_spoofed_headers(services: Services) -> None:
    spoofed = {
        "x-aigw-team": "team-b",
        "x-aigw-backend": "evil",
        "x-aigw-model": "gpt-4o",
        "api-key": "sk-something-else",
        "x-request-id": "abc",
    }
    [resp] = run(downstream(services), request_headers(extra=spoofed))
    assert resp.WhichOneof("response") == "request_headers"
    common = resp.request_headers.response
    assert not common.clear_route_cache
    assert not resp.HasField("mode_override")
    assert set_headers(common.header_mutation) == {"x-aigw-team": "team-a"}
    removed = set(common.header_mutation.remove_headers)
    # x-aigw-team may be removed too: Envoy applies removals before the set that replaces it.
    assert removed - {"x-aigw-team"} == {
        "x-aigw-backend",
        "x-aigw-model",
        "authorization",
        "api-key",
    }


# -- request body -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "path", "body", "status", "code", "param"),
    [
        (KEY_A, "/v1/chat/completions", b'{"model": "gpt-4o",', 400, "invalid_json", None),
        (KEY_A, "/v1/chat/completions", chat("gpt-5"), 404, "model_not_found", "model"),
        (KEY_B, "/v1/chat/completions", chat("gpt-4o"), 404, "model_not_found", "model"),
        (
            KEY_A,
            "/v1/chat/completions",
            chat("text-embedding-3-small"),
            400,
            "model_not_supported",
            "model",
        ),
        (
            KEY_A,
            "/v1/embeddings",
            {"model": "gpt-4o-mini", "input": "x"},
            400,
            "model_not_supported",
            "model",
        ),
        (KEY_A, "/v1/chat/completions", {"model": "gpt-4o"}, 400, "invalid_value", "messages"),
        (KEY_A, "/v1/chat/completions", chat(stream="yes"), 400, "invalid_type", "stream"),
    ],
)
def test_body_rejections(
    services: Services,
    key: str,
    path: str,
    body: Any,
    status: int,
    code: str,
    param: str | None,
) -> None:
    stream = downstream(services)
    headers_resp, body_resp = run(stream, request_headers(path=path, key=key), request_body(body))
    assert headers_resp.WhichOneof("response") == "request_headers"
    assert_error(body_resp, status, code, param)


def test_body_over_the_limit(services: Services) -> None:
    limit = services.runtime.config.sidecar.max_body_bytes
    big = b" " * (limit - 20) + orjson.dumps(chat())
    stream = downstream(services)
    _, resp = run(stream, request_headers(), request_body(big))
    assert_error(resp, 413, "request_too_large")


def test_valid_chat_body(services: Services) -> None:
    stream = downstream(services)
    body = chat("gpt-4o", temperature=0.3)
    _, resp = run(stream, request_headers(), request_body(body))
    assert resp.WhichOneof("response") == "request_body"
    common = resp.request_body.response
    # gpt-4o has one backend, which knows it as fake-gpt-4o: with no upstream stage on its
    # route, this stage renames it (and would set the backend's credential; it has none).
    sent = orjson.loads(common.body_mutation.body)
    assert sent == {**body, "model": "fake-gpt-4o"}
    assert set_headers(common.header_mutation) == {
        "x-aigw-model": "gpt-4o",
        "x-aigw-target": "fake",  # the route to fake matches it
        "content-length": str(len(common.body_mutation.body)),
    }
    assert list(common.header_mutation.remove_headers) == []
    assert common.clear_route_cache is True
    expected = services.tokens.count_chat("gpt-4o", MESSAGES).tokens
    assert expected > 20
    assert {k: unpacked(v) for k, v in metadata(resp).items()} == {
        "extproc": {
            "team": "team-a",
            "key": "team-a#0",  # the quickstart's key has no name: its place in the list
            "model": "gpt-4o",
            "endpoint": "/v1/chat/completions",
            "stream": False,
            "prompt_tokens_estimate": expected,
            # For the headers Envoy renders on the answer.
            "backend": "fake",
            "provider_model": "fake-gpt-4o",
        }
    }
    assert not stream.finished  # json_path: inline, the answer passes this stage


def test_json_answers_are_handed_to_the_access_log(logged_services: Services) -> None:
    stream = downstream(logged_services)
    body = chat("gpt-4o-mini", max_tokens=77)
    _, resp = run(stream, request_headers(key=KEY_B), request_body(body))
    data = metadata(resp)["extproc"]
    assert data["account"] is True and "observe" not in data
    assert (data["backend"], data["provider_model"]) == ("fake", "gpt-4o-mini")
    assert unpacked(data)["output_estimate"] == 77  # charged if the backend reports no usage
    assert unpacked(data)["started_at"] > 0
    # team-b has token limits in the quickstart: the reservation is handed over with them.
    assert stream.reservation is not None
    assert unpacked(data)["reservation"] == stream.reservation.id
    assert unpacked(data)["limits"] == [spec.name for spec in stream.reservation.specs]
    assert data["ratelimit"]["x-ratelimit-limit-tokens"].isdigit()
    assert stream.finished  # the server ends this stage's gRPC stream now
    stream.close()
    assert not stream.reservation.settled  # the access log's reader settles, not this stage


def test_streams_and_guarded_answers_are_not_handed_to_the_access_log(
    logged_services: Services,
) -> None:
    stream = downstream(logged_services)
    _, resp = run(stream, request_headers(), request_body(chat("gpt-4o", stream=True)))
    assert "account" not in metadata(resp)["extproc"]
    assert not stream.finished


def test_chat_with_tools_counts_the_tools(services: Services) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    stream = downstream(services)
    _, resp = run(stream, request_headers(), request_body(chat("gpt-4o-mini", tools=tools)))
    estimate = unpacked(metadata(resp)["extproc"])["prompt_tokens_estimate"]
    assert estimate == services.tokens.count_chat("gpt-4o-mini", MESSAGES, tools).tokens
    assert estimate > services.tokens.count_chat("gpt-4o-mini", MESSAGES).tokens


def test_valid_completions_and_embeddings_bodies(services: Services) -> None:
    stream = downstream(services)
    body = {"model": "gpt-4o-mini", "prompt": ["Once upon", "a time"], "stream": True}
    _, resp = run(stream, request_headers(path="/v1/completions"), request_body(body))
    assert unpacked(metadata(resp)["extproc"]) == {
        "team": "team-a",
        "key": "team-a#0",
        "model": "gpt-4o-mini",
        "backend": "fake",
        "provider_model": "gpt-4o-mini",
        "endpoint": "/v1/completions",
        "stream": True,
        "prompt_tokens_estimate": services.tokens.count_prompt(
            "gpt-4o-mini", body["prompt"]
        ).tokens,
    }
    stream = downstream(services)
    body = {"model": "text-embedding-3-small", "input": [[1, 2, 3], [4, 5]]}
    req = request_headers(path="/v1/embeddings", key=KEY_B)
    _, resp = run(stream, req, request_body(body))
    assert set_headers(resp.request_body.response.header_mutation) == {
        "x-aigw-model": "text-embedding-3-small",
        "x-aigw-target": "fake",
    }
    assert unpacked(metadata(resp)["extproc"])["prompt_tokens_estimate"] == 5
    assert metadata(resp)["extproc"]["team"] == "team-b"


# -- response ---------------------------------------------------------------------------------


def test_response_headers_of_a_one_backend_model_come_from_envoy(services: Services) -> None:
    stream = through_body(services, chat("gpt-4o"))
    [resp] = run(stream, response_headers(extra={"x-aigw-team": "forged"}))
    assert resp.WhichOneof("response") == "response_headers"
    # Team, model, backend and rate limits are rendered by Envoy from the request's metadata
    # (its header_mutation filter also removes a backend's forged ones first).
    assert not resp.response_headers.HasField("response")
    assert not resp.HasField("mode_override")
    assert metadata(resp)["extproc"] == {"backend": "fake", "status": 200}


def test_response_headers_name_the_backend_envoy_chose(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    targets = [{"backend": "openai"}, {"backend": "azure", "model": "gpt4o-deploy"}]
    canary = two_backends(services, monkeypatch, "api-key", {"gpt-4o": {"targets": targets}})
    stream = DownstreamStream(canary)
    run(stream, request_headers(key="sk-t"), request_body(chat("gpt-4o")))
    [resp] = run(stream, response_headers(cluster="aigw-split-azure"))
    assert set_headers(resp.response_headers.response.header_mutation) == {
        "x-aigw-backend": "azure",
        "x-aigw-provider-model": "gpt4o-deploy",
    }
    [resp] = run(DownstreamStream(canary), response_headers(cluster=None))
    assert not resp.response_headers.HasField("response")


def test_event_stream_response_switches_to_streamed(services: Services) -> None:
    stream = through_body(services, chat("gpt-4o", stream=True))
    [resp] = run(stream, response_headers(content_type="text/event-stream; charset=utf-8"))
    mode = resp.mode_override
    assert resp.HasField("mode_override")
    assert mode.response_body_mode == ProcessingMode.STREAMED
    assert mode.response_header_mode == ProcessingMode.SEND
    assert mode.response_trailer_mode == ProcessingMode.SKIP


def test_event_stream_without_body_stays_buffered(services: Services) -> None:
    stream = through_body(services, chat("gpt-4o", stream=True))
    [resp] = run(stream, response_headers(content_type="text/event-stream", end_of_stream=True))
    assert not resp.HasField("mode_override")


def test_event_stream_content_type_is_case_insensitive(services: Services) -> None:
    stream = through_body(services, chat("gpt-4o", stream=True))
    [resp] = run(stream, response_headers(content_type="Text/Event-Stream"))
    assert resp.mode_override.response_body_mode == ProcessingMode.STREAMED


COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "fake-gpt-4o",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Bonjour ! こんにちは。"},
            "finish_reason": "stop",
        }
    ],
}


def test_buffered_response_with_usage(services: Services) -> None:
    stream = through_body(services, chat("gpt-4o"))
    usage = {
        "prompt_tokens": 31,
        "completion_tokens": 9,
        "total_tokens": 40,
        "prompt_tokens_details": {"cached_tokens": 16},
    }
    _, resp = run(stream, response_headers(), response_body({**COMPLETION, "usage": usage}))
    assert resp.WhichOneof("response") == "response_body"
    common = resp.response_body.response
    assert set_headers(common.header_mutation) == {
        "x-aigw-prompt-tokens": "31",
        "x-aigw-completion-tokens": "9",
        "x-aigw-total-tokens": "40",
        "x-aigw-token-source": "provider",
    }
    assert not common.HasField("body_mutation")
    data = metadata(resp)["extproc"]
    duration = data.pop("duration_ms")
    assert 0 <= duration < 60_000
    assert data == {
        "backend": "fake",
        "status": 200,
        "prompt_tokens": 31,
        "completion_tokens": 9,
        "total_tokens": 40,
        "cached_tokens": 16,
        "token_source": "provider",
    }


def test_buffered_response_without_usage_is_estimated(services: Services) -> None:
    stream = through_body(services, chat("gpt-4o"))
    _, resp = run(stream, response_headers(), response_body(COMPLETION))
    prompt = services.tokens.count_chat("gpt-4o", MESSAGES).tokens
    completion = services.tokens.count_text("gpt-4o", "Bonjour ! こんにちは。").tokens
    assert completion > 0
    assert set_headers(resp.response_body.response.header_mutation) == {
        "x-aigw-prompt-tokens": str(prompt),
        "x-aigw-completion-tokens": str(completion),
        "x-aigw-total-tokens": str(prompt + completion),
        "x-aigw-token-source": "estimate",
    }
    data = metadata(resp)["extproc"]
    assert data["token_source"] == "estimate"
    assert data["prompt_tokens"] == prompt
    assert data["completion_tokens"] == completion
    assert data["total_tokens"] == prompt + completion
    assert data["cached_tokens"] == 0


def with_default_max_tokens(services: Services, tokens: int) -> Services:
    """quota.default_max_tokens changed: the max output of a request that sets none."""
    cfg = services.runtime.config
    quota = cfg.quota.model_copy(update={"default_max_tokens": tokens})
    return build_services(
        build_runtime(cfg.model_copy(update={"quota": quota})), services.tokens, services.quota
    )


LONG_ANSWER = "The answer is longer than the request allowed, " * 4


@pytest.mark.parametrize(
    ("fields", "cap"),
    [
        ({"max_tokens": 2}, 2),
        ({"max_completion_tokens": 3, "max_tokens": 50}, 3),
        # No max: the backend was told no bound, so no cap: the whole count is charged
        # (quota.default_max_tokens, 4 here, sized only the reservation).
        ({}, None),
        ({"max_tokens": 2, "n": 2}, 4),
    ],
    ids=["max_tokens", "max_completion_tokens", "default", "n"],
)
def test_buffered_response_without_usage_is_charged_at_most_the_max_output(
    services: Services, fields: dict[str, Any], cap: int | None
) -> None:
    """Our own count of an answer without usage never exceeds what the client allowed (a
    backend that ignores max_tokens, or a count that differs from the backend's)."""
    services = with_default_max_tokens(services, 4)
    stream = through_body(services, chat("gpt-4o", **fields))
    answer = {**COMPLETION, "choices": [{"index": 0, "message": {"content": LONG_ANSWER}}]}
    _, resp = run(stream, response_headers(), response_body(answer))
    counted = services.tokens.count_text("gpt-4o", LONG_ANSWER).tokens
    assert counted > 4
    cap = counted if cap is None else cap
    prompt = services.tokens.count_chat("gpt-4o", MESSAGES).tokens
    data = metadata(resp)["extproc"]
    assert data["token_source"] == "estimate"
    assert (data["prompt_tokens"], data["completion_tokens"]) == (prompt, cap)
    assert data["total_tokens"] == prompt + cap
    headers = set_headers(resp.response_body.response.header_mutation)
    assert headers["x-aigw-completion-tokens"] == str(cap)


@pytest.mark.parametrize(("fields", "cap"), [({"max_tokens": 3}, 3), ({}, None)])
def test_streamed_response_without_usage_is_charged_at_most_the_max_output(
    services: Services, fields: dict[str, Any], cap: int | None
) -> None:
    services = with_default_max_tokens(services, 4)
    stream = through_body(services, chat("gpt-4o", stream=True, **fields))
    raw = stream_bytes(LONG_ANSWER.split(" "), None)
    _, last = run(stream, response_headers(content_type="text/event-stream"), response_body(raw))
    prompt = services.tokens.count_chat("gpt-4o", MESSAGES).tokens
    data = metadata(last)["extproc"]
    assert data["token_source"] == "estimate"
    if cap is None:  # no max declared: the whole count, past the reservation's default
        assert data["prompt_tokens"] == prompt and data["completion_tokens"] > 4
        return
    assert (data["prompt_tokens"], data["completion_tokens"]) == (prompt, cap)
    assert data["total_tokens"] == prompt + cap


def test_embeddings_response_usage(services: Services) -> None:
    body = {"model": "text-embedding-3-small", "input": "hello"}
    stream = through_body(services, body, path="/v1/embeddings")
    reply = {"object": "list", "data": [], "usage": {"prompt_tokens": 1, "total_tokens": 1}}
    _, resp = run(stream, response_headers(), response_body(reply))
    data = metadata(resp)["extproc"]
    assert (data["prompt_tokens"], data["completion_tokens"], data["total_tokens"]) == (1, 0, 1)
    assert data["token_source"] == "provider"


@pytest.mark.parametrize(
    ("status", "body"), [(429, {"error": {"message": "slow down"}}), (200, b"<html>")]
)
def test_buffered_response_without_usable_body(services: Services, status: int, body: Any) -> None:
    stream = through_body(services, chat("gpt-4o"))
    _, resp = run(stream, response_headers(status=status), response_body(body))
    assert resp.WhichOneof("response") == "response_body"
    assert not resp.response_body.HasField("response")
    data = metadata(resp)["extproc"]
    assert set(data) == {"backend", "status", "duration_ms"}
    assert data["status"] == status
    assert data["backend"] == "fake"


def test_buffered_response_with_odd_choices(services: Services) -> None:
    stream = through_body(services, chat("gpt-4o"))
    _, resp = run(stream, response_headers(), response_body({"choices": 1}))
    assert metadata(resp)["extproc"]["token_source"] == "estimate"


def sse_event(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n"


def stream_bytes(texts: list[str], usage: dict[str, Any] | None) -> bytes:
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    events += [{"choices": [{"index": 0, "delta": {"content": t}}]} for t in texts]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage is not None:
        events.append({"choices": [], "usage": usage})
    return b"".join(map(sse_event, events)) + sse_event(b"[DONE]")


def relayed(chunks: list[bytes], bodies: list[Any]) -> bytes:
    """What the client receives: each chunk as it was, or its replacement."""
    out = b""
    for chunk, resp in zip(chunks, bodies, strict=True):
        assert resp.WhichOneof("response") == "response_body"
        body = resp.response_body
        out += body.response.body_mutation.body if body.HasField("response") else chunk
    return out


def _split(raw: bytes) -> list[bytes]:
    start = raw.index(b'"usage"')
    cuts = [raw.index(b"Bon"), start + 3, start + 20, len(raw) - 4]
    chunks = [raw[a:b] for a, b in pairwise([0, *cuts, len(raw)])]
    assert b"".join(chunks) == raw and len(chunks) == 5
    return chunks


USAGE = {"prompt_tokens": 123, "completion_tokens": 45, "total_tokens": 168}


def _stream_through(services: Services, request: dict[str, Any], chunks: list[bytes]) -> list:
    stream = through_body(services, request)
    reqs = [response_body(c, end_of_stream=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    first, *bodies = run(stream, response_headers(content_type="text/event-stream"), *reqs)
    assert first.mode_override.response_body_mode == ProcessingMode.STREAMED
    early = [resp for resp in bodies[:-1] if resp.HasField("dynamic_metadata")]
    # Only the answer to the chunk that completed the usage report carries it early (before
    # [DONE], which a client may close on); the last answer carries it again, with timing.
    assert len(early) <= 1
    if early:
        tokens = ("prompt_tokens", "completion_tokens", "total_tokens", "token_source")
        first_seen, last = metadata(early[0])["extproc"], metadata(bodies[-1])["extproc"]
        assert {k: first_seen[k] for k in tokens} == {k: last[k] for k in tokens}
    return bodies


def test_streamed_usage_split_across_chunks_is_read_and_cut_for_a_client_that_did_not_ask(
    services: Services,
) -> None:
    raw = stream_bytes(["Bon", "jour", " 🙂"], USAGE)
    chunks = _split(raw)
    bodies = _stream_through(services, chat("gpt-4o", stream=True), chunks)
    # The gateway asked for usage on the client's behalf: the client gets the stream it asked
    # for, byte for byte, without the usage-only event.
    assert relayed(chunks, bodies) == stream_bytes(["Bon", "jour", " 🙂"], None)
    data = metadata(bodies[-1])["extproc"]
    assert {k: data[k] for k in ("backend", "status", "token_source")} == {
        "backend": "fake",
        "status": 200,
        "token_source": "provider",
    }
    assert (data["prompt_tokens"], data["completion_tokens"], data["total_tokens"]) == (
        123,
        45,
        168,
    )
    assert data["chunks"] == len(chunks)
    assert data["ttft_ms"] >= 0


def test_streamed_usage_for_a_client_that_asked_passes_untouched(services: Services) -> None:
    raw = stream_bytes(["Bon", "jour", " 🙂"], USAGE)
    chunks = _split(raw)
    request = chat("gpt-4o", stream=True, stream_options={"include_usage": True})
    # With stream_path "inline" (by default such a stream goes to the observer instead).
    bodies = _stream_through(with_stream_path(services, "inline"), request, chunks)
    for resp in bodies:
        assert not resp.response_body.HasField("response")  # every chunk relayed untouched
    assert metadata(bodies[-1])["extproc"]["total_tokens"] == 168


def test_streaming_request_without_include_usage_asks_the_backend_for_it(
    services: Services,
) -> None:
    stream = DownstreamStream(services)
    run(stream, request_headers())
    (resp,) = run(stream, request_body(chat("gpt-4o", stream=True, temperature=0.5)))
    mutated = resp.request_body.response.body_mutation.body
    assert orjson.loads(mutated) == {
        **chat("gpt-4o", stream=True, temperature=0.5),
        "model": "fake-gpt-4o",  # renamed here: gpt-4o's one backend has no upstream stage
        "stream_options": {"include_usage": True},
    }
    headers = set_headers(resp.request_body.response.header_mutation)
    assert headers["content-length"] == str(len(mutated))


def test_streamed_response_without_usage_is_estimated(services: Services) -> None:
    stream = through_body(services, chat("gpt-4o", stream=True))
    raw = stream_bytes(["Bon", "jour", " 🙂"], None)
    half = len(raw) // 2
    _, _, _, last = run(
        stream,
        response_headers(content_type="text/event-stream"),
        response_body(raw[:half], end_of_stream=False),
        response_body(raw[half:], end_of_stream=False),
        response_body(b"", end_of_stream=True),
    )
    prompt = services.tokens.count_chat("gpt-4o", MESSAGES).tokens
    completion = services.tokens.count_text("gpt-4o", "Bonjour 🙂").tokens
    data = metadata(last)["extproc"]
    assert data["token_source"] == "estimate"
    assert (data["prompt_tokens"], data["completion_tokens"]) == (prompt, completion)
    assert data["total_tokens"] == prompt + completion


def test_trailers_pass_through(services: Services) -> None:
    stream = downstream(services)
    [resp] = run(stream, ProcessingRequest(response_trailers=pb.HttpTrailers()))
    assert resp.WhichOneof("response") == "response_trailers"


# -- upstream stage ---------------------------------------------------------------------------


def upstream_headers(model: str | None, extra: dict[str, str] | None = None) -> ProcessingRequest:
    headers = {
        ":method": "POST",
        ":path": "/v1/chat/completions",
        "content-type": "application/json",
        "content-length": "321",
        "x-aigw-team": "team-a",
    }
    if model is not None:
        headers["x-aigw-model"] = model
    headers.update(extra or {})
    return ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map(headers)))


def test_upstream_rewrites_the_model(services: Services) -> None:
    stream = UpstreamStream(services, UPSTREAM_METADATA)
    body = chat("gpt-4o", stream=True, temperature=0.25, stream_options={"include_usage": True})
    head, rewritten = run(stream, upstream_headers("gpt-4o"), request_body(body))
    assert head.WhichOneof("response") == "request_headers"
    mutation = head.request_headers.response.header_mutation
    assert set_headers(mutation) == {}  # the quickstart backend has no credential
    assert set(mutation.remove_headers) == {"x-aigw-model", "x-aigw-team", "content-length"}
    assert head.HasField("mode_override")
    assert head.mode_override == protocol.UPSTREAM_REWRITE_BODY
    assert head.mode_override.request_body_mode == ProcessingMode.BUFFERED

    assert rewritten.WhichOneof("response") == "request_body"
    new_body = orjson.loads(rewritten.request_body.response.body_mutation.body)
    assert new_body == {**body, "model": "fake-gpt-4o"}


def test_upstream_same_model_needs_no_body(services: Services) -> None:
    stream = UpstreamStream(services, UPSTREAM_METADATA)
    [head] = run(stream, upstream_headers("gpt-4o-mini", {"authorization": "Bearer sk-team-a"}))
    assert not head.HasField("mode_override")
    mutation = head.request_headers.response.header_mutation
    assert set_headers(mutation) == {}
    # No credential configured: the client's key must not reach the backend either.
    assert set(mutation.remove_headers) == {"x-aigw-model", "x-aigw-team", "authorization"}


@pytest.mark.parametrize(
    ("metadata_", "model"),
    [
        (UPSTREAM_METADATA, None),
        (UPSTREAM_METADATA, "gpt-5"),
        ({"x-aigw-stage": "upstream", "x-aigw-backend": "other"}, "gpt-4o"),
        ({"x-aigw-stage": "upstream"}, "gpt-4o"),
    ],
)
def test_upstream_cannot_route(
    services: Services, metadata_: dict[str, str], model: str | None
) -> None:
    stream = UpstreamStream(services, metadata_)
    [resp] = run(stream, upstream_headers(model))
    status, headers, body = immediate(resp)
    assert status == 502
    assert headers == {"content-type": "application/json"}
    assert body["error"]["code"] == "routing_error"
    assert body["error"]["type"] == "server_error"
    assert resp.immediate_response.details == "aigw_upstream"


def test_upstream_bad_json_body(services: Services) -> None:
    stream = UpstreamStream(services, UPSTREAM_METADATA)
    _, resp = run(stream, upstream_headers("gpt-4o"), request_body(b"{nope"))
    status, _, body = immediate(resp)
    assert status == 400
    assert body["error"]["code"] == "invalid_json"


SECRET_OPENAI = "sk-upstream-openai-SECRET"
SECRET_AZURE = "azure-upstream-SECRET"


def two_backends(
    services: Services,
    monkeypatch: pytest.MonkeyPatch,
    azure_header: str,
    models: dict[str, Any],
) -> Services:
    """Services for an openai backend (Bearer) and an azure one (its key in `azure_header`)."""
    monkeypatch.setenv("EXTPROC_TEST_OPENAI_KEY", SECRET_OPENAI)
    monkeypatch.setenv("EXTPROC_TEST_AZURE_KEY", SECRET_AZURE)
    data = {
        "teams": {"t": {"keys": [{"sha256": hashlib.sha256(b"sk-t").hexdigest()}]}},
        "backends": {
            "openai": {
                "url": "https://api.openai.example/v1",
                "api_key": {"env": "EXTPROC_TEST_OPENAI_KEY"},
            },
            "azure": {
                "url": "https://azure.example/v1",
                "auth_header": azure_header,
                "api_key": {"env": "EXTPROC_TEST_AZURE_KEY"},
            },
        },
        "models": models,
    }
    return build_services(build_runtime(parse_config(data)), services.tokens, services.quota)


@pytest.fixture
def credential_services(services: Services, monkeypatch: pytest.MonkeyPatch) -> Services:
    targets = [{"backend": "openai"}, {"backend": "azure", "model": "gpt4o-deploy"}]
    return two_backends(services, monkeypatch, "api-key", {"gpt-4o": {"targets": targets}})


def test_upstream_sets_bearer_credential(credential_services: Services) -> None:
    meta = {"x-aigw-stage": "upstream", "x-aigw-backend": "openai"}
    stream = UpstreamStream(credential_services, meta)
    extra = {"authorization": "Bearer sk-t", "api-key": "sk-t"}
    [head] = run(stream, upstream_headers("gpt-4o", extra))
    mutation = head.request_headers.response.header_mutation
    assert set_headers(mutation) == {"authorization": f"Bearer {SECRET_OPENAI}"}
    assert set(mutation.remove_headers) == {"x-aigw-model", "x-aigw-team", "api-key"}
    assert not head.HasField("mode_override")


def test_upstream_sets_api_key_credential(credential_services: Services) -> None:
    meta = {"x-aigw-stage": "upstream", "x-aigw-backend": "azure"}
    stream = UpstreamStream(credential_services, meta)
    [head, body] = run(
        stream,
        upstream_headers("gpt-4o", {"authorization": "Bearer sk-t"}),
        request_body(chat("gpt-4o")),
    )
    mutation = head.request_headers.response.header_mutation
    assert set_headers(mutation) == {"api-key": SECRET_AZURE}
    assert set(mutation.remove_headers) == {
        "x-aigw-model",
        "x-aigw-team",
        "authorization",
        "content-length",
    }
    assert head.mode_override.request_body_mode == ProcessingMode.BUFFERED
    assert orjson.loads(body.request_body.response.body_mutation.body)["model"] == "gpt4o-deploy"


@pytest.fixture
def single_services(services: Services, monkeypatch: pytest.MonkeyPatch) -> Services:
    """One model per route kind: a single target (prepared by the downstream stage), a
    canary, a failover pool whose pool 1 is one backend, a weight-0 spare."""
    models = {
        "solo": {"targets": [{"backend": "azure", "model": "solo-deploy"}]},
        "spare": {"targets": [{"backend": "openai"}, {"backend": "azure", "weight": 0}]},
        "canary": {"targets": [{"backend": "openai"}, {"backend": "azure"}]},
        "pooled": {
            "targets": [{"backend": "openai", "priority": 0}, {"backend": "azure", "priority": 1}]
        },
    }
    return two_backends(services, monkeypatch, "x-api-key", models)


def test_fixed_target_only_when_the_route_leaves_no_choice(single_services: Services) -> None:
    rt = single_services.runtime
    fixed = routing.fixed_target
    assert fixed(rt, "solo").backend == "azure"  # type: ignore[union-attr]
    assert fixed(rt, "spare").backend == "openai"  # type: ignore[union-attr]
    assert fixed(rt, "canary") is None  # Envoy splits: the upstream stage prepares
    assert fixed(rt, "pooled") is None  # Envoy retries across pools
    assert fixed(rt, "pooled", pool=1).backend == "azure"  # type: ignore[union-attr]
    assert fixed(rt, "no-such-model") is None


def test_a_single_backend_request_gets_its_credential_and_target_downstream(
    single_services: Services,
) -> None:
    stream = DownstreamStream(single_services)
    _, resp = run(stream, request_headers(key="sk-t"), request_body(chat("solo")))
    common = resp.request_body.response
    headers = set_headers(common.header_mutation)
    assert headers["x-api-key"] == SECRET_AZURE
    assert headers["x-aigw-target"] == "azure"  # Envoy's route to azure matches it
    assert orjson.loads(common.body_mutation.body)["model"] == "solo-deploy"
    # The credential is a header for the backend, never metadata for logs.
    assert SECRET_AZURE not in str(metadata(resp))


def test_the_upstream_stage_strips_every_backends_credential_header_but_its_own(
    single_services: Services,
) -> None:
    # A request prepared for azure (under a newer config) that an older Envoy route sent to
    # a canary member on openai: azure's key must not reach openai.
    meta = {"x-aigw-stage": "upstream", "x-aigw-backend": "openai"}
    stream = UpstreamStream(single_services, meta)
    extra = {"x-api-key": SECRET_AZURE, "x-aigw-target": "azure"}
    [head] = run(stream, upstream_headers("canary", extra))
    mutation = head.request_headers.response.header_mutation
    assert set_headers(mutation) == {"authorization": f"Bearer {SECRET_OPENAI}"}
    assert {"x-api-key", "x-aigw-target"} <= set(mutation.remove_headers)
