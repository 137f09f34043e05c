"""OpenAI chat completions to Anthropic's Messages API and back (extproc/providers/anthropic.py):
golden request/answer pairs (text, images, tools, multi-turn), the event stream split at every
byte, errors. The OpenAI side is checked with the official SDK's own types."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletionChunk

from extproc.errors import GatewayError
from extproc.providers import anthropic, registry

from .provider_cases import (
    PNG,
    WEATHER,
    check_golden_answer,
    chunks,
    golden_conversation,
    tool_call,
)

MODEL = "claude-sonnet-4-5"


def translate(**body: Any) -> dict[str, Any]:
    return anthropic.messages_request(
        {"model": "claude", "messages": [{"role": "user", "content": "hi"}], **body}, MODEL, 4096
    )


# -- the request ----------------------------------------------------------------------------------


def test_a_multi_turn_conversation_with_tools_and_images() -> None:
    body = {
        "model": "claude",
        "messages": golden_conversation(
            "https://example.com/a.jpg", tool_call("call_2", arguments='{"city": "Rome"}'), "24 C"
        ),
        "max_completion_tokens": 300,
        "temperature": 0.2,
        "top_p": 1,  # neutral: left out (recent Claude models take one of the two)
        "stop": "END",
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "jane",
        "tools": [WEATHER],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "n": 1,
        "presence_penalty": 0,
    }
    assert anthropic.messages_request(body, MODEL, 4096) == {
        "model": MODEL,
        "max_tokens": 300,
        "system": "Be brief.\n\nUse tools.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture, and the weather?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/a.jpg"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me look."},
                    {
                        "type": "tool_use",
                        "id": "call_1",
                        "name": "weather",
                        "input": {"city": "Paris"},
                    },
                    {
                        "type": "tool_use",
                        "id": "call_2",
                        "name": "weather",
                        "input": {"city": "Rome"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "call_1",
                        "content": [{"type": "text", "text": "18 C"}],
                    },
                    {
                        "type": "tool_result",
                        "tool_use_id": "call_2",
                        "content": [{"type": "text", "text": "24 C"}],
                    },
                    {"type": "text", "text": "Thanks."},
                ],
            },
        ],
        "temperature": 0.2,
        "stop_sequences": ["END"],
        "stream": True,
        "metadata": {"user_id": "jane"},
        "tools": [
            {
                "name": "weather",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                "description": "The weather in a city",
            }
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }


def test_whitespace_only_text_is_left_out() -> None:
    """Anthropic refuses a text block of whitespace only; an assistant's "\n\n" before its
    tool calls is common."""
    out = translate(
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": "\n\n",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": " "}]},
        ]
    )
    assert out["messages"][1]["content"] == [
        {"type": "tool_use", "id": "c", "name": "f", "input": {}}
    ]
    assert out["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "c", "content": []}
    ]


def test_max_tokens_defaults_because_anthropic_requires_it() -> None:
    assert translate()["max_tokens"] == 4096
    assert translate(max_tokens=12)["max_tokens"] == 12


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ({"type": "function", "function": {"name": "f"}}, {"type": "tool", "name": "f"}),
    ],
)
def test_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    out = translate(tools=tools, tool_choice=choice)
    assert out["tool_choice"] == expected
    assert out["tools"] == [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"seed": 7}, "seed"),
        ({"temperature": 1.5}, "temperature"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"temperature": 0.5, "top_p": 0.9}, "top_p"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, None),  # not OpenAI's shape
        ({"messages": [{"role": "tool", "content": "x"}]}, None),  # no tool_call_id
        ({"temperature": "hot"}, None),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, None),
    ],
)
def test_what_anthropic_cannot_do_as_asked_is_refused(
    fields: dict[str, Any], param: str | None
) -> None:
    with pytest.raises(GatewayError) as caught:
        translate(**fields)
    assert caught.value.status == 400
    if param is not None:
        assert caught.value.param == param


# -- the answer -----------------------------------------------------------------------------------

ANSWER = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": MODEL,
    "content": [
        {"type": "thinking", "thinking": "The user wants weather.", "signature": "sig"},
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 20,
        "output_tokens": 9,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 5,
    },
}


def test_an_answer_with_tools_thinking_and_cached_input() -> None:
    check_golden_answer(anthropic.chat_completion(ANSWER, "claude"), "toolu_1")


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("end_turn", "stop"),
        ("max_tokens", "length"),
        ("stop_sequence", "stop"),
        ("refusal", "content_filter"),
    ],
)
def test_stop_reasons(reason: str, finish: str) -> None:
    answer = {**ANSWER, "content": [{"type": "text", "text": "x"}], "stop_reason": reason}
    assert anthropic.chat_completion(answer, "claude")["choices"][0]["finish_reason"] == finish


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "client_status", "openai_type"),
    [
        (529, "overloaded_error", 503, "server_error"),
        (429, "rate_limit_error", 429, "rate_limit_error"),
        (400, "invalid_request_error", 400, "invalid_request_error"),
        (401, "authentication_error", 401, "authentication_error"),
        (413, "request_too_large", 413, "invalid_request_error"),
    ],
)
def test_errors_in_openais_shape(
    status: int, kind: str, client_status: int, openai_type: str
) -> None:
    body = orjson.dumps({"type": "error", "error": {"type": kind, "message": "why"}})
    err = anthropic.error(status, body)
    assert (err.status, err.type, err.code, err.message) == (
        client_status,
        openai_type,
        kind,
        "why",
    )
    rendered_status, rendered, _ = registry.answer_and_usage("anthropic", "claude", status, body)
    assert rendered_status == client_status
    assert orjson.loads(rendered)["error"]["code"] == kind


def test_an_error_that_is_not_anthropics_json() -> None:
    err = anthropic.error(502, b"<html>bad gateway</html>")
    assert (err.status, err.code) == (502, "provider_502")


# -- the stream -----------------------------------------------------------------------------------


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events
    )


STREAM = sse(
    {
        "type": "message_start",
        "message": {
            "id": "msg_02",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 10},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ", wörld"}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "toolu_9", "name": "weather", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '{"city": '},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'},
    },
    {"type": "content_block_stop", "index": 1},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 15},
    },
    {"type": "message_stop"},
)


def test_a_stream_becomes_openai_chunks_the_sdk_reads() -> None:
    translator = anthropic.StreamTranslator("claude", include_usage=True)
    raw = translator.feed(STREAM)
    assert raw.endswith(b"data: [DONE]\n\n") and translator.done
    events = chunks(raw)
    parsed = [ChatCompletionChunk.model_validate(e) for e in events]
    assert parsed[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
    assert text == "Hello, wörld" == translator.text
    calls = [tc for c in parsed if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert calls[0].id == "toolu_9" and calls[0].function is not None
    assert calls[0].function.name == "weather"
    arguments = "".join(tc.function.arguments or "" for tc in calls if tc.function is not None)
    assert orjson.loads(arguments) == {"city": "Paris"} and {tc.index for tc in calls} == {0}
    finish = [
        c.choices[0].finish_reason for c in parsed if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["tool_calls"]
    assert parsed[-1].choices == [] and parsed[-1].usage is not None
    assert parsed[-1].usage.prompt_tokens == 35 and parsed[-1].usage.completion_tokens == 15
    assert translator.usage == anthropic.usage(
        {"input_tokens": 25, "cache_read_input_tokens": 10, "output_tokens": 15}
    )


def test_the_stream_split_anywhere_translates_the_same() -> None:
    whole = chunks(anthropic.StreamTranslator("claude", include_usage=False).feed(STREAM))
    for size in (1, 2, 3, 7, 64):
        translator = anthropic.StreamTranslator("claude", include_usage=False)
        raw = b"".join(translator.feed(STREAM[i : i + size]) for i in range(0, len(STREAM), size))
        got = chunks(raw)
        for chunk in (*whole, *got):
            chunk.pop("created", None)
        assert got == whole, size
        assert not any("usage" in c for c in got)  # the client did not ask for it
        assert translator.usage is not None  # read all the same, for the account


def test_an_error_event_ends_the_stream_with_an_openai_error() -> None:
    translator = anthropic.StreamTranslator("claude", include_usage=False)
    raw = translator.feed(
        STREAM[: STREAM.index(b"event: content_block_stop")]
        + sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    )
    *_, last = chunks(raw)
    assert last == {
        "error": {
            "message": "Overloaded",
            "type": "server_error",
            "param": None,
            "code": "overloaded_error",
        }
    }
    assert raw.endswith(b"data: [DONE]\n\n") and translator.failed is not None


# -- the config -----------------------------------------------------------------------------------


def provider_config(**model: Any) -> dict[str, Any]:
    return {
        "teams": {"t": {"keys": [{"sha256": "0" * 64}]}},
        "backends": {
            "claude-api": {"url": "https://api.anthropic.com/v1", "type": "anthropic"},
            "openai": {"url": "https://api.openai.com/v1"},
        },
        "models": {"claude": {"targets": [{"backend": "claude-api", "model": MODEL}], **model}},
    }


def test_an_anthropic_backend_takes_its_key_in_x_api_key() -> None:
    from extproc.config import parse_config

    cfg = parse_config(provider_config())
    assert cfg.backends["claude-api"].auth_header == "x-api-key"
    data = provider_config()
    data["backends"]["claude-api"]["auth_header"] = "authorization"  # said: kept
    assert parse_config(data).backends["claude-api"].auth_header == "authorization"


def test_a_translated_backend_serves_chat_models_only_for_now() -> None:
    from extproc.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config(provider_config(type="embedding"))
    (where, problem), *_ = caught.value.problems
    assert where == "models.claude.targets" and "cannot serve /v1/embeddings" in problem


def test_a_canary_or_pool_may_mix_apis_and_their_urls_paths() -> None:
    """The sidecar sets each request's path for such a model, so the backends' URL paths need
    not agree (they must for a model of OpenAI backends alone: one route rewrites them)."""
    from extproc.config import build_runtime, parse_config

    canary = {
        "targets": [{"backend": "claude-api", "weight": 5}, {"backend": "openai", "weight": 5}]
    }
    data = provider_config(**canary)
    data["backends"]["openai"]["url"] = "http://127.0.0.1:1/openai/v1"
    rt = build_runtime(parse_config(data))
    assert [t.backend for t in rt.adapted["claude"]] == ["claude-api"]


def test_envoy_never_serves_a_translated_model_alone() -> None:
    """Its answer must be rewritten: no native route (test_request_plan: no release either)."""
    from extproc import native
    from extproc.config import parse_config

    cfg = parse_config(provider_config())
    assert native.why_not(cfg, "t", "claude") is not None


def test_a_cut_stream_is_counted_from_what_anthropic_reported_first() -> None:
    """The input Anthropic counted (images, cache) is known at message_start; a stream cut
    before message_delta is charged it, and its output estimated from every delta, tool
    arguments included."""
    translator = anthropic.StreamTranslator("claude", include_usage=False)
    translator.feed(STREAM[: STREAM.index(b"event: message_delta")])
    partial = translator.partial_usage
    assert partial is not None and partial.prompt_tokens == 35  # 25 + 10 read from the cache
    produced = len("Hello") + len(", wörld") + len('{"city": ') + len('"Paris"}')
    assert partial.completion_tokens == -(-produced // 4)
    assert translator.usage is not None  # (the report so far, not final: the relay waits)


def test_an_error_event_marks_the_relay_failed() -> None:
    from extproc.wire.openai import OPENAI

    relay = registry.stream_relay("anthropic", "claude", OPENAI.stream_relay(False))
    cut = STREAM[: STREAM.index(b"event: content_block_stop")]
    error = sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    relay.feed(cut + error, True)
    assert relay.error_code == "overloaded_error" and relay.usage is None
    assert relay.partial_usage is not None and relay.partial_usage.prompt_tokens == 35


def test_cached_and_written_input_are_priced_apart() -> None:
    """A cached token is not charged as a full input token: the cost metric, the audit record
    and USD budgets share Price.micro_usd."""
    from extproc.config import Price
    from extproc.quota.policy import Amounts, LimitSpec, amount
    from extproc.settlement import charge

    report = anthropic.usage(ANSWER["usage"])  # 20 plain, 100 read, 5 written, 9 out
    assert report is not None and report.cache_write_tokens == 5
    price = Price(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75)
    expected = 20 * 3.0 + 100 * 0.3 + 5 * 3.75 + 9 * 15.0
    assert price.micro_usd(125, 9, 100, 5) == pytest.approx(expected)
    assert Price(input=3.0, output=15.0).micro_usd(125, 9, 100, 5) == pytest.approx(
        125 * 3.0 + 9 * 15.0
    )  # no cache prices: the input price
    amounts = charge(report, 200, True, 0)
    assert amounts == Amounts(125, 9, cached_input_tokens=100, cache_write_tokens=5)

    class Cfg:
        prices = {"claude": price}

    spec = LimitSpec("budget", "usd", "day", 10**9, frozenset({"claude"}), False)
    assert amount(spec, amounts, Cfg(), "claude") == math.ceil(expected)  # type: ignore[arg-type]


def test_reasoning_output_is_priced_apart_when_a_price_says_so() -> None:
    from extproc.config import Price
    from extproc.settlement import charge
    from extproc.usage import Usage
    from extproc.wire.openai.answer import usage

    report = usage(
        {"prompt_tokens": 10, "completion_tokens": 50, "total_tokens": 60,
         "completion_tokens_details": {"reasoning_tokens": 30}}
    )  # fmt: skip
    assert report == Usage(10, 50, 60, reasoning_tokens=30)
    assert charge(report, 200, True, 0).reasoning_tokens == 30
    priced = Price(input=1.0, output=4.0, reasoning=8.0)
    assert priced.micro_usd(10, 50, reasoning=30) == pytest.approx(10 + 20 * 4.0 + 30 * 8.0)
    assert Price(input=1.0, output=4.0).micro_usd(10, 50, reasoning=30) == pytest.approx(210)


def test_a_parked_target_neither_adapts_the_model_nor_names_its_route_headers() -> None:
    """Weight 0 serves nothing: the route of the one active (Anthropic) backend adds its
    version header; a parked Anthropic beside an active OpenAI backend changes nothing."""
    from extproc.config import build_runtime, parse_config
    from extproc.envoy_config import routes, to_dict

    parked_openai = {
        "targets": [
            {"backend": "openai", "weight": 0},
            {"backend": "claude-api", "model": MODEL, "weight": 1},
        ]
    }
    cfg = parse_config(provider_config(**parked_openai))
    (route,) = [
        r for r in to_dict(routes(cfg))["virtualHosts"][0]["routes"] if r["name"] == "model:claude"
    ]
    assert route["requestHeadersToAdd"][0]["header"] == {
        "key": "anthropic-version",
        "value": "2023-06-01",
    }
    parked_claude = {
        "targets": [
            {"backend": "openai", "weight": 1},
            {"backend": "claude-api", "model": MODEL, "weight": 0},
        ]
    }
    assert "claude" not in build_runtime(parse_config(provider_config(**parked_claude))).adapted


def test_the_providers_own_report_is_what_is_charged_cache_writes_included() -> None:
    """OpenAI's usage has no place for the input Anthropic wrote to its prompt cache: the
    gateway charges the provider's own report, of a whole answer and of a stream alike."""
    from extproc.wire.openai import OPENAI

    _, body, reported = registry.answer_and_usage("anthropic", "claude", 200, orjson.dumps(ANSWER))
    assert body is not None and orjson.loads(body)["usage"]["prompt_tokens"] == 125
    assert reported is not None
    assert (reported.prompt_tokens, reported.cached_tokens, reported.cache_write_tokens) == (
        125,
        100,
        5,
    )
    written = STREAM.replace(
        b'"cache_read_input_tokens":10}',
        b'"cache_read_input_tokens":10,"cache_creation_input_tokens":7}',
    )
    assert written != STREAM
    relay = registry.stream_relay("anthropic", "claude", OPENAI.stream_relay(True))
    relay.feed(written, True)
    assert relay.usage is not None
    assert (relay.usage.prompt_tokens, relay.usage.cache_write_tokens) == (42, 7)


def test_a_stream_finished_without_message_stop_still_reports_its_usage() -> None:
    """message_delta brought the final usage: the client that asked for it gets it, then
    [DONE], though message_stop never came."""
    from extproc.wire.openai import OPENAI

    relay = registry.stream_relay("anthropic", "claude", OPENAI.stream_relay(False))
    out = relay.feed(STREAM[: STREAM.index(b"event: message_stop")], True)
    assert out is not None and out.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' in out and relay.usage is not None


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "message_start", "message": {"id": "m", "usage": [1]}},
        {"type": "message_delta", "delta": "x", "usage": {"output_tokens": "1"}},
    ],
)
def test_events_a_translator_cannot_read_end_the_stream_with_an_error(bad: dict) -> None:
    """Never the gRPC stream torn down: the client's stream ends with OpenAI's error chunk."""
    from extproc.wire.openai import OPENAI

    relay = registry.stream_relay("anthropic", "claude", OPENAI.stream_relay(False))
    out = relay.feed(STREAM[: STREAM.index(b"event: content_block_stop")] + sse(bad), False)
    assert out is not None and b"bad_event_stream" in out and out.endswith(b"data: [DONE]\n\n")
    assert relay.error_code == "bad_event_stream"
    assert relay.feed(STREAM, True) in (b"", None)  # nothing more of the provider's


def test_a_cut_streams_charge_keeps_what_came_from_and_went_to_the_prompt_cache() -> None:
    from extproc.settlement import stream_usage
    from extproc.usage import Usage

    class Cut:
        usage = None
        partial_usage = Usage(6010, 7, 6017, cached_tokens=1000, cache_write_tokens=5000)
        expects_usage = True
        events = 3
        text = ""

    charged = stream_usage(Cut(), 0, None, "claude", None)  # type: ignore[arg-type]
    assert (charged.prompt_tokens, charged.cached_tokens, charged.cache_write_tokens) == (
        6010,
        1000,
        5000,
    )
