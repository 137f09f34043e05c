"""Edge cases of Anthropic's Messages API at the gateway, beyond the main path of
test_anthropic_api_e2e.py: a stream whose model has response guards (served as it is, its text
deltas judged), a bridged stream's backend error, refusals counted under the
client's API, which of the client's `anthropic-*` headers reach which backend, plain-text
documents judged and counted, Envoy's own replies in Anthropic's shape, the 429 the SDK must not
retry, and Claude Code's beta paths.

The unit tests drive DownstreamStream with hand-built ext_proc messages (test_downstream.py's
helpers); the e2e ones go through the real Envoy with the `anthropic` SDK."""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
import yaml

from extproc import routing
from extproc.config import build_runtime, parse_config
from extproc.downstream import DownstreamStream
from extproc.server import build_services
from extproc.services import Services
from extproc.supervisor import Stack
from extproc.wire.anthropic import ANTHROPIC

from .conftest import Gateway, free_port, gateway_config, running_gateway, sha256_hex
from .test_downstream import (
    request_body,
    request_headers,
    response_body,
    response_headers,
)

BACKEND_KEY = "sk-ant-BACKEND-SECRET"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def services() -> Iterator[Services]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EDGES_AN_KEY", BACKEND_KEY)
        env.setenv("EDGES_OA_KEY", "sk-oa-BACKEND-SECRET")
        data = {
            "teams": {
                "t": {
                    "keys": [{"sha256": sha256_hex("sk-t")}],
                    # A limit, so that each request holds a reservation to settle.
                    "limits": [{"window": "minute", "tokens": 10_000_000}],
                },
            },
            "backends": {
                "oa": {"url": "https://oa.example/v1", "api_key": {"env": "EDGES_OA_KEY"}},
                "an": {
                    "url": "https://an.example/v1",
                    "type": "anthropic",
                    "api_key": {"env": "EDGES_AN_KEY"},
                },
            },
            "guards": {"deny": {"type": "deny", "keywords": ["self-destruct"]}},
            "models": {
                "claude": {"targets": [{"backend": "an", "model": "claude-sonnet-4-5"}]},
                "claude-guarded": {
                    "targets": [{"backend": "an", "model": "claude-sonnet-4-5"}],
                    "guardrails": {"response": ["deny"]},
                },
                "gpt": {"targets": [{"backend": "oa"}]},
                "gpt-guarded-in": {
                    "targets": [{"backend": "oa"}],
                    "guardrails": {"request": ["deny"]},
                },
                "claude-guarded-in": {
                    "targets": [{"backend": "an"}],
                    "guardrails": {"request": ["deny"]},
                },
            },
        }
        yield build_services(build_runtime(parse_config(data)))


def headers(
    path: str = "/v1/messages", extra: dict[str, str] | None = None, method: str = "POST"
) -> Any:
    sent = {"x-api-key": "sk-t", "anthropic-version": "2023-06-01", **(extra or {})}
    return request_headers(method=method, path=path, key=None, extra=sent)


def drive(stream: DownstreamStream, *reqs: Any, close: bool = True) -> list[Any]:
    """Every message in one event loop (settling needs a running one), then the stream's end."""

    async def go() -> list[Any]:
        out = [await stream.handle(r) for r in reqs]
        if close:
            stream.close()
            await asyncio.sleep(0)
        return out

    return asyncio.run(go())


def body_of(resp: Any) -> bytes | None:
    kind = resp.WhichOneof("response")
    if kind == "immediate_response":
        return resp.immediate_response.body
    common = getattr(resp, kind).response
    return common.body_mutation.body if common.HasField("body_mutation") else None


def removed_headers(*answers: Any) -> set[str]:
    """The request headers the downstream stage removes, over its headers and body answers."""
    out: set[str] = set()
    for answer in answers:
        out |= set(
            getattr(answer, answer.WhichOneof("response")).response.header_mutation.remove_headers
        )
    return out


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events
    )


def events_of(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: ")]


# What Anthropic streams for a thinking model (a thinking_delta, then one signature_delta just
# before the thinking block's content_block_stop; a redacted_thinking block comes whole in its
# content_block_start), with prompt caching's usage and a stop sequence.
SIGNATURE = "EqQBCgIYAhIM-SIGNATURE"
THINKING_STREAM = sse(
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 10,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 1000,
                "output_tokens": 1,
            },
        },
    },
    {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
    },
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "thinking_delta", "thinking": "Let me think."},
    },
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "signature_delta", "signature": SIGNATURE},
    },
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "redacted_thinking", "data": "REDACTED-DATA"},
    },
    {"type": "content_block_stop", "index": 1},
    {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_stop", "index": 2},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"},
        "usage": {"output_tokens": 20},
    },
    {"type": "message_stop"},
)

THINKING_REQUEST = {
    "model": "claude",
    "max_tokens": 500,
    "stream": True,
    "thinking": {"type": "enabled", "budget_tokens": 100},
    "messages": HI,
}


def streamed(
    services: Services, request: dict[str, Any], extra: dict[str, str] | None = None
) -> tuple[list[Any], bytes]:
    """The downstream stage's answers to `request` streamed by the model's one Anthropic backend
    as THINKING_STREAM, and what the client gets of that stream."""
    answers = drive(
        DownstreamStream(services),
        headers(extra=extra),
        request_body(request),
        response_headers(200, "text/event-stream", cluster="aigw-backend-an"),
        response_body(THINKING_STREAM, end_of_stream=True),
    )
    relayed = body_of(answers[3])
    return answers, THINKING_STREAM if relayed is None else relayed


DELTA_FIELDS = {"thinking_delta": "thinking", "signature_delta": "signature", "text_delta": "text"}


def blocks_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The content blocks an Anthropic client builds of the events, checking their order:
    message_start, each block's start, deltas and stop by consecutive index, message_delta,
    message_stop."""
    kinds = [e["type"] for e in events if e["type"] != "ping"]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"], kinds
    blocks: list[dict[str, Any]] = []
    open_block: dict[str, Any] | None = None
    for event in events:
        kind = event["type"]
        if kind == "content_block_start":
            assert open_block is None and event["index"] == len(blocks), event
            open_block = dict(event["content_block"])
        elif kind == "content_block_delta":
            assert open_block is not None and event["index"] == len(blocks), event
            field = DELTA_FIELDS[event["delta"]["type"]]
            open_block[field] += event["delta"][field]
        elif kind == "content_block_stop":
            assert open_block is not None and event["index"] == len(blocks), event
            blocks.append(open_block)
            open_block = None
    assert open_block is None
    return blocks


# -- a stream whose model has response guards stays native: its text deltas are judged ---------


def test_a_guarded_stream_is_served_natively(services: Services) -> None:
    """Anthropic's events have a guarded relay of their own (wire/anthropic/guarded_stream.py):
    a guarded stream stays native; the Responses API's has none, so its guarded streams go as
    chat completions."""
    rt = services.runtime
    claude = routing.fixed_target(rt, "claude")
    assert routing.served_natively(rt, "claude", claude, ANTHROPIC)
    assert routing.served_natively(rt, "claude", claude, ANTHROPIC, guarded_stream=True)
    gpt = routing.fixed_target(rt, "gpt")
    assert not routing.served_natively(rt, "gpt", gpt, ANTHROPIC)


def test_an_unguarded_stream_of_an_anthropic_backend_reaches_the_client_as_it_is(
    services: Services,
) -> None:
    answers, relayed = streamed(services, THINKING_REQUEST)
    assert relayed == THINKING_STREAM  # signatures, redacted thinking, cache usage and all
    sent = orjson.loads(body_of(answers[1]) or b"{}")
    assert sent == {**THINKING_REQUEST, "model": "claude-sonnet-4-5"}


def test_a_guarded_stream_goes_to_an_anthropic_backend_as_it_is(services: Services) -> None:
    """The request keeps its thinking (the next turn can send the signed block back), and the
    client gets the backend's events, its thinking signed, its text judged."""
    request = {**THINKING_REQUEST, "model": "claude-guarded"}
    answers, relayed = streamed(services, request)
    sent = orjson.loads(body_of(answers[1]) or b"{}")
    assert sent == {**request, "model": "claude-sonnet-4-5"}
    events = events_of(relayed)
    assert "signature_delta" in {e.get("delta", {}).get("type") for e in events}
    blocks = blocks_of(events)
    assert [b["type"] for b in blocks if b["type"] in ("thinking", "text")] == ["thinking", "text"]
    text = "".join(b.get("text", "") for b in blocks if b["type"] == "text")
    assert text == "Hello"
    [delta] = [e for e in events if e["type"] == "message_delta"]
    assert delta["usage"]["output_tokens"] == 20


# -- what the gateway records and sends ---------------------------------------------------------


def test_a_bridged_streams_backend_error_is_the_requests_error_code(services: Services) -> None:
    """A chat backend's error chunk ends the client's stream with Anthropic's error event, and
    the request is recorded as the backend's error, not as served."""
    stream = DownstreamStream(services)
    first = (
        b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
        b'"delta":{"role":"assistant","content":"Hel"}}]}\n\n'
    )
    error = b'data: {"error":{"message":"boom","type":"server_error","code":"internal"}}\n\n'
    answers = drive(
        stream,
        headers(),
        request_body({"model": "gpt", "max_tokens": 50, "stream": True, "messages": HI}),
        response_headers(200, "text/event-stream", cluster="aigw-backend-oa"),
        response_body(first, end_of_stream=False),
        response_body(error, end_of_stream=True),
        close=False,
    )
    assert b"event: error" in (body_of(answers[4]) or b"")
    assert stream.report is not None
    assert stream.report.code is not None and "internal" in stream.report.code


@pytest.mark.parametrize(
    ("method", "path", "key", "status"),
    [
        ("POST", "/v1/messages", "sk-wrong", 401),
        ("GET", "/v1/messages", "sk-t", 405),
        ("POST", "/v1/messages/batches", "sk-t", 404),
    ],
)
def test_a_refusal_before_routing_is_reported_under_the_anthropic_api(
    services: Services, method: str, path: str, key: str, status: int
) -> None:
    stream = DownstreamStream(services)
    sent = request_headers(
        method=method,
        path=path,
        key=None,
        extra={"x-api-key": key, "anthropic-version": "2023-06-01"},
    )
    [answer] = drive(stream, sent, close=False)
    assert answer.immediate_response.status.code == status
    assert orjson.loads(body_of(answer) or b"{}")["type"] == "error"  # Anthropic's shape
    assert stream.report is not None and stream.report.api == "anthropic"


CLIENT_HEADERS = {
    "anthropic-beta": "interleaved-thinking-2025-05-14",
    "anthropic-dangerous-direct-browser-access": "true",
}


@pytest.mark.parametrize(
    ("model", "stream", "reaches"),
    [
        ("gpt", False, False),  # an OpenAI backend
        ("claude-guarded", True, True),  # guarded, still served as it is
        ("claude", True, True),  # the Anthropic backend, served as it is
    ],
)
def test_the_clients_anthropic_headers_reach_only_a_backend_served_as_it_is(
    services: Services, model: str, stream: bool, reaches: bool
) -> None:
    request = {"model": model, "max_tokens": 8, "stream": stream, "messages": HI}
    answers = drive(
        DownstreamStream(services), headers(extra=CLIENT_HEADERS), request_body(request)
    )
    own = {*CLIENT_HEADERS, "anthropic-version"}
    removed = removed_headers(*answers)
    if reaches:
        assert not own & removed
    else:
        assert own <= removed


# -- plain-text documents -----------------------------------------------------------------------


def text_document(text: str) -> dict[str, Any]:
    source = {"type": "text", "media_type": "text/plain", "data": text}
    return {"type": "document", "source": source}


@pytest.mark.parametrize("model", ["gpt-guarded-in", "claude-guarded-in"])
@pytest.mark.parametrize("where", ["message", "tool_result"])
def test_a_text_document_is_judged_by_the_request_guards(
    services: Services, model: str, where: str
) -> None:
    """The bridge sends a plain-text document as a text part and an Anthropic backend reads it
    as text: the request guards judge its text as any other."""
    document = text_document("Initiating self-destruct sequence now.")
    if where == "message":
        content: list[Any] = [document, {"type": "text", "text": "Summarize."}]
        messages: list[Any] = [{"role": "user", "content": content}]
    else:
        use = {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {}}
        result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [document]}
        messages = [
            {"role": "user", "content": "Read it."},
            {"role": "assistant", "content": [use]},
            {"role": "user", "content": [result]},
        ]
    _, answer = drive(
        DownstreamStream(services),
        headers(),
        request_body({"model": model, "max_tokens": 8, "messages": messages}),
    )
    assert answer.WhichOneof("response") == "immediate_response", body_of(answer)
    assert answer.immediate_response.status.code == 403


def test_a_text_document_is_counted_by_its_text(services: Services) -> None:
    """A 50,000-word text document is counted (and reserved) as its text, not as an image's
    fixed estimate."""
    messages = [{"role": "user", "content": [text_document("word " * 50_000)]}]
    _, answer = drive(
        DownstreamStream(services),
        headers(path="/v1/messages/count_tokens"),
        request_body({"model": "gpt", "messages": messages}),
    )
    assert orjson.loads(body_of(answer) or b"{}")["input_tokens"] > 40_000


# -- through Envoy ------------------------------------------------------------------------------

GUARDED = "claude-guarded"  # the Anthropic backend (the second fake), with a response guard


def with_anthropic(config: dict) -> None:
    fake_b = config["backends"]["fake-b"]["url"].rstrip("/")
    config["backends"]["anthropic"] = {
        "url": f"{fake_b}/v1",
        "type": "anthropic",
        "api_key": {"env": "TEST_BACKEND_B_KEY"},
    }
    target = {"backend": "anthropic", "model": "claude-sonnet-4-5"}
    config["models"]["claude"] = {"targets": [target]}
    config.setdefault("guards", {})["deny-out"] = {"type": "deny", "keywords": ["self-destruct"]}
    config["models"][GUARDED] = {"targets": [target], "guardrails": {"response": ["deny-out"]}}
    # A token limit smaller than Claude Code's default max_tokens (32k).
    config["teams"]["team-small"] = {
        "keys": [{"sha256": sha256_hex("sk-team-small")}],
        "limits": [{"window": "minute", "tokens": 1000}],
    }


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("anthropic-edges"), edit=with_anthropic) as g:
        yield g


def client(gw: Gateway, key: str = "sk-team-a", **options: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=gw.base_url.removesuffix("/v1"), api_key=key, **{"max_retries": 0, **options}
    )


@pytest.mark.e2e
def test_a_guarded_stream_reaches_an_anthropic_backend_as_it_is(gw: Gateway) -> None:
    """Claude Code's requests to a model with response guards keep their prompt caching,
    thinking and betas: the guards judge Anthropic's own text deltas."""
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    request: dict[str, Any] = {
        "model": GUARDED,
        "max_tokens": 64,
        "system": system,
        "messages": HI,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    beta = {"anthropic-beta": "interleaved-thinking-2025-05-14"}
    with client(gw).messages.stream(**request, extra_headers=beta) as stream:
        kinds = [event.type for event in stream]
        message = stream.get_final_message()
    sent = gw.fake_requests(gw.fake_b)[-1]
    assert sent["path"] == "/v1/messages"
    assert sent["body"] == {**request, "model": "claude-sonnet-4-5", "stream": True}
    assert sent["headers"]["anthropic-beta"] == beta["anthropic-beta"]
    core = [k for k in kinds if k not in ("text", "thinking", "ping", "signature")]
    assert core[0] == "message_start" and core[-2:] == ["message_delta", "message_stop"]
    assert message.stop_reason == "end_turn" and message.usage.output_tokens > 0
    text = [b for b in message.content if b.type == "text"]
    assert text and text[0].text


@pytest.mark.e2e
def test_a_guard_ends_an_anthropic_backends_stream_in_anthropics_shape(gw: Gateway) -> None:
    said = {"x-fake-response-text": "Initiating self-destruct sequence now."}
    texts: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as info:
        with client(gw).messages.stream(
            model=GUARDED, max_tokens=64, messages=HI, extra_headers=said
        ) as stream:
            texts.extend(stream.text_stream)
    assert "self-destruct" not in "".join(texts)
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def chunked_post(gw: Gateway, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    """A POST without a Content-Length: Envoy's buffer filter refuses an oversized body itself,
    before the sidecar sees the request."""
    host, port = gw.base_url.removeprefix("http://").removesuffix("/v1").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(
            "POST",
            path,
            body=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]),
            headers={"content-type": "application/json", **headers},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.e2e
def test_envoys_own_413_is_anthropics_request_too_large(gw: Gateway) -> None:
    big = {
        "model": "claude",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "x" * 300_000}],
    }
    status, body = chunked_post(
        gw,
        "/v1/messages",
        json.dumps(big).encode(),
        {"x-api-key": "sk-team-a", "anthropic-version": "2023-06-01"},
    )
    assert status == 413
    assert body["type"] == "error" and body["error"]["type"] == "request_too_large", body
    assert body["error"]["message"]


@pytest.mark.e2e
def test_envoys_answer_for_a_sidecar_that_is_down_is_in_the_clients_shape(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Envoy alone, its sidecar not running: Envoy answers every request itself, in Anthropic's
    shape on Anthropic's paths (a beta query included) and OpenAI's on every other."""
    names = ("sidecar", "envoy", "admin", "fake_a", "fake_b", "dead", "metrics")
    config = gateway_config({k: free_port() for k in names})
    del config["fake_llm"]  # nothing but Envoy
    for name, value in {
        "TEST_TEAM_B_KEY": "sk-team-b",
        "TEST_BACKEND_A_KEY": "a",
        "TEST_BACKEND_B_KEY": "b",
    }.items():
        monkeypatch.setenv(name, value)
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    stack = Stack(config_path, workdir=tmp_path, sidecar=False, envoy_concurrency=1)
    stack.start()
    try:
        base = f"http://{config['envoy']['listen']}"
        hi = {"model": "gpt-4o-mini", "max_tokens": 8, "messages": HI}
        auth = {"x-api-key": "sk-team-a", "authorization": "Bearer sk-team-a"}
        with httpx2.Client(base_url=base, headers=auth, timeout=10) as http:
            for path in ("/v1/messages", "/v1/messages?beta=true", "/v1/messages/count_tokens"):
                resp = http.post(path, json=hi)
                assert resp.status_code == 503, resp.text
                assert resp.json()["type"] == "error", resp.text
                assert resp.json()["error"]["type"] == "api_error"
                assert resp.headers.get("retry-after")
            for path in ("/v1/chat/completions", "/v1/responses"):
                resp = http.post(path, json=hi)
                assert resp.status_code == 503, resp.text
                assert resp.json()["error"]["code"] == "gateway_unavailable", resp.text
    finally:
        stack.stop(grace=5)


@pytest.mark.e2e
def test_a_429_no_wait_can_cure_tells_the_sdk_not_to_retry(gw: Gateway) -> None:
    """Claude Code's default max_tokens over a team's whole per-minute token limit: refused with
    no Retry-After and `x-should-retry: false`, which the SDK reads as "do not retry"."""
    sent: list[httpx2.Request] = []
    http = httpx2.Client(event_hooks={"request": [sent.append]})
    with pytest.raises(anthropic.RateLimitError) as info:
        client(gw, "sk-team-small", max_retries=2, http_client=http).messages.create(
            model="gpt-4o-mini", max_tokens=32_000, messages=HI, stream=True
        )
    assert info.value.response.headers.get("x-should-retry") == "false"
    assert "retry-after" not in info.value.response.headers
    assert info.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert len(sent) == 1  # not retried


@pytest.mark.e2e
@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude"])
def test_claude_codes_beta_paths_are_served(gw: Gateway, model: str) -> None:
    """Claude Code calls the beta client: POST /v1/messages?beta=true, streamed, with
    anthropic-beta headers; and /v1/messages/count_tokens?beta=true."""
    beta = client(gw).beta.messages
    with beta.stream(
        model=model, max_tokens=32, messages=HI, betas=["interleaved-thinking-2025-05-14"]
    ) as stream:
        message = stream.get_final_message()
    assert message.usage.output_tokens > 0 and message.stop_reason == "end_turn"
    assert beta.count_tokens(model=model, messages=HI).input_tokens > 0
