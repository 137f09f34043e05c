"""OpenAI chat completions to AWS Bedrock's Converse API and back
(extproc/providers/bedrock.py): golden request/answer pairs (text, system, multi-turn, tools and
their results, images), refusals naming the parameter, errors by status and by exception name,
and ConverseStream's binary event stream (frames made by the fake's encoder) split at every
byte. The OpenAI side is checked with the official SDK's own types."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletionChunk

from extproc.config import ResolvedTarget
from extproc.devtools.fake_llm.bedrock import event_frame, exception_frame, frame
from extproc.errors import GatewayError
from extproc.providers import bedrock

from .provider_cases import PNG, WEATHER, check_golden_answer, golden_conversation, tool_call

MODEL_ID = "us.anthropic.claude-3-5-sonnet-20241022-v2:0"


def target(**fields: Any) -> ResolvedTarget:
    base: dict[str, Any] = {
        "model": "claude",
        "backend": "bedrock-us",
        "provider_model": MODEL_ID,
        "weight": 1,
        "auth_header": "authorization",
        "credential": None,
        "provider": "bedrock",
        "max_tokens": 4096,
    }
    return ResolvedTarget(**{**base, **fields})


def translate(**body: Any) -> dict[str, Any]:
    request = {"model": "claude", "messages": [{"role": "user", "content": "hi"}], **body}
    return bedrock.PROVIDER.request(target(), request)


def refused(**body: Any) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        translate(**body)
    assert caught.value.status == 400
    return caught.value


# -- the provider ---------------------------------------------------------------------------------


def test_the_provider_and_its_paths() -> None:
    provider = bedrock.PROVIDER
    assert provider.name == "bedrock" and provider.request_headers == {}
    assert provider.strip_headers == ()
    assert provider.stream_content_type == "application/vnd.amazon.eventstream"
    assert provider.path(target(), False) == (
        "/model/us.anthropic.claude-3-5-sonnet-20241022-v2%3A0/converse"
    )
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.meta.llama3-2-1b-v1:0"
    assert provider.path(target(provider_model=arn, url_path="/proxy"), True) == (
        "/proxy/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile"
        "%2Fus.meta.llama3-2-1b-v1%3A0/converse-stream"
    )


# -- the request ----------------------------------------------------------------------------------


def test_a_multi_turn_conversation_with_tools_and_images() -> None:
    body = {
        "model": "claude",
        "messages": golden_conversation(
            "data:image/jpeg;base64,/9j/", tool_call("call_2", arguments='{"city": "Rome"}'), "24 C"
        ),
        "max_completion_tokens": 300,
        "temperature": 0.2,
        "top_p": 1,  # neutral: left out
        "stop": "END",
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "jane",
        "tools": [WEATHER],
        "tool_choice": "required",
        "parallel_tool_calls": True,
        "n": 1,
        "presence_penalty": 0,
    }
    assert bedrock.PROVIDER.request(target(), body) == {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"text": "What is in this picture, and the weather?"},
                    {"image": {"format": "png", "source": {"bytes": PNG}}},
                    {"image": {"format": "jpeg", "source": {"bytes": "/9j/"}}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"text": "Let me look."},
                    {"toolUse": {"toolUseId": "call_1", "name": "weather",
                                 "input": {"city": "Paris"}}},
                    {"toolUse": {"toolUseId": "call_2", "name": "weather",
                                 "input": {"city": "Rome"}}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"toolResult": {"toolUseId": "call_1", "content": [{"text": "18 C"}]}},
                    {"toolResult": {"toolUseId": "call_2", "content": [{"text": "24 C"}]}},
                    {"text": "Thanks."},
                ],
            },
        ],
        "system": [{"text": "Be brief."}, {"text": "Use tools."}],
        "inferenceConfig": {"maxTokens": 300, "temperature": 0.2, "stopSequences": ["END"]},
        "toolConfig": {
            "tools": [
                {
                    "toolSpec": {
                        "name": "weather",
                        "inputSchema": {
                            "json": {"type": "object", "properties": {"city": {"type": "string"}}}
                        },
                        "description": "The weather in a city",
                    }
                }
            ],
            "toolChoice": {"any": {}},
        },
    }  # fmt: skip


def test_a_plain_request() -> None:
    assert translate(max_tokens=12, top_p=0.5, stop=["a", "", "b"]) == {
        "messages": [{"role": "user", "content": [{"text": "hi"}]}],
        "inferenceConfig": {"maxTokens": 12, "topP": 0.5, "stopSequences": ["a", "b"]},
    }
    assert translate()["inferenceConfig"] == {"maxTokens": 4096}  # the backend's default


def test_consecutive_turns_merge_and_blank_text_is_left_out() -> None:
    """Converse wants turns alternating, and refuses a blank text block (an assistant's "\\n\\n"
    before its tool calls is common)."""
    out = translate(
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "user", "content": [{"type": "text", "text": "in Paris"}]},
            {
                "role": "assistant",
                "content": "\n\n",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}
                ],
            },
            {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": " "}]},
            {"role": "system", "content": "  "},
        ],
        tools=[{"type": "function", "function": {"name": "f"}}],
    )
    assert out["messages"] == [
        {"role": "user", "content": [{"text": "weather?"}, {"text": "in Paris"}]},
        {"role": "assistant", "content": [{"toolUse": {"toolUseId": "c", "name": "f",
                                                       "input": {}}}]},
        {"role": "user", "content": [{"toolResult": {"toolUseId": "c", "content": []}}]},
    ]  # fmt: skip
    assert "system" not in out
    assert out["toolConfig"]["tools"] == [
        {"toolSpec": {"name": "f", "inputSchema": {"json": {"type": "object", "properties": {}}}}}
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"auto": {}}),
        ("required", {"any": {}}),
        ({"type": "function", "function": {"name": "weather"}}, {"tool": {"name": "weather"}}),
    ],
)
def test_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    out = translate(tools=[WEATHER], tool_choice=choice)
    assert out["toolConfig"]["toolChoice"] == expected
    assert out["toolConfig"]["tools"][0]["toolSpec"]["name"] == "weather"


def test_tool_choice_none_leaves_the_tools_out() -> None:
    """Converse has no `none`: a model not told of the tools calls none. With no tool to call,
    parallel_tool_calls: false is neutral too."""
    out = translate(tools=[WEATHER], tool_choice="none", parallel_tool_calls=False)
    assert "toolConfig" not in out
    assert "toolConfig" not in translate(parallel_tool_calls=False)


def test_tool_choice_none_in_a_conversation_with_tool_calls_is_refused() -> None:
    """Converse refuses tool blocks without a toolConfig; sending the tools would let the model
    call them."""
    history = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c", "content": "18 C"},
    ]
    assert refused(messages=history, tools=[WEATHER], tool_choice="none").param == "tool_choice"
    assert refused(messages=history).param == "tools"
    assert translate(messages=history, tools=[WEATHER])["toolConfig"]["tools"]


def test_an_image_url_and_odd_formats_are_refused() -> None:
    def image(url: str) -> list[dict[str, Any]]:
        part = {"type": "image_url", "image_url": {"url": url}}
        return [{"role": "user", "content": [{"type": "text", "text": "see"}, part]}]

    err = refused(messages=image("https://example.com/a.png"))
    assert err.param == "messages[0].content[1].image_url" and "data: URL" in err.message
    assert refused(messages=image("data:image/bmp;base64,Qk0=")).param == (
        "messages[0].content[1].image_url"
    )
    assert refused(messages=image("data:image/png,raw")).code == "invalid_value"
    webp = translate(messages=image("data:image/webp;base64,UklG"))["messages"][0]["content"][1]
    assert webp == {"image": {"format": "webp", "source": {"bytes": "UklG"}}}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 0.1}, "frequency_penalty"),
        ({"logit_bias": {"1": 2}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"seed": 7}, "seed"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"temperature": 1.5}, "temperature"),
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": [WEATHER], "parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[].type=custom"),
        ({"messages": [{"role": "assistant", "content": "hello"}]}, "messages"),
        ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages"),
        ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
         "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, None),  # not OpenAI's shape
        ({"messages": [{"role": "tool", "content": "x"}]}, None),  # no tool_call_id
        ({"temperature": "hot"}, None),
        # 0 is below OpenAI's (and Converse's) minimum, never taken as "unset".
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0, "max_tokens": 10}, "max_completion_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_completion_tokens": True}, "max_completion_tokens"),
    ],
)  # fmt: skip
def test_what_bedrock_cannot_do_as_asked_is_refused(
    fields: dict[str, Any], param: str | None
) -> None:
    err = refused(**fields)
    assert err.param == param
    if param is None:
        assert err.code == "invalid_request"


def test_max_completion_tokens_wins_and_a_zero_is_named() -> None:
    config = translate(max_completion_tokens=7, max_tokens=99)["inferenceConfig"]
    assert config == {"maxTokens": 7}
    err = refused(max_tokens=0)
    assert err.code == "integer_below_min_value" and "got 0" in err.message


@pytest.mark.parametrize(
    "call_id",
    [
        "call_" + "a" * 24 + "~sig~" + "Q2lnbmF0dXJl" * 40,  # a Gemini id, signature and all
        "x" * 65,
        "call with spaces",
        "",
    ],
)
def test_a_tool_call_id_converse_would_refuse_is_replaced_the_same_in_use_and_result(
    call_id: str,
) -> None:
    out = translate(
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [tool_call(call_id)]},
            {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
        ],
    )
    use = out["messages"][1]["content"][0]["toolUse"]["toolUseId"]
    result = out["messages"][2]["content"][0]["toolResult"]["toolUseId"]
    assert use == result == bedrock.tool_use_id(call_id)
    assert bedrock.TOOL_USE_ID.match(use) and use.startswith("t_") and len(use) == 42


def test_a_tool_call_id_converse_takes_is_kept() -> None:
    for call_id in ("call_abc", "tooluse_x.y:z-1", "a" * 64):
        assert bedrock.tool_use_id(call_id) == call_id
    assert bedrock.tool_use_id("a" * 65) != bedrock.tool_use_id("a" * 66)


def test_arguments_that_are_not_json_are_refused() -> None:
    err = refused(
        messages=[
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}
                ],
            },
        ]
    )
    assert err.param == "messages[1].tool_calls"


# -- the answer -----------------------------------------------------------------------------------

ANSWER = {
    "output": {
        "message": {
            "role": "assistant",
            "content": [
                {"reasoningContent": {"reasoningText": {"text": "The user wants weather.",
                                                        "signature": "sig"}}},
                {"text": "Checking."},
                {"toolUse": {"toolUseId": "tooluse_1", "name": "weather",
                             "input": {"city": "Paris"}}},
            ],
        }
    },
    "stopReason": "tool_use",
    "usage": {
        "inputTokens": 20,
        "outputTokens": 9,
        "totalTokens": 134,
        "cacheReadInputTokens": 100,
        "cacheWriteInputTokens": 5,
    },
    "metrics": {"latencyMs": 321},
}  # fmt: skip


def test_an_answer_with_tools_reasoning_and_cached_input() -> None:
    # Bedrock's inputTokens holds neither the cache reads nor the writes; OpenAI's
    # prompt_tokens holds both (125), the reads as cached_tokens.
    parsed = check_golden_answer(bedrock.PROVIDER.answer(ANSWER, "claude"), "tooluse_1")
    assert parsed.id.startswith("chatcmpl-")  # Converse gives none: one of OpenAI's shape
    report = bedrock.usage(ANSWER["usage"])
    assert report is not None and (report.cached_tokens, report.cache_write_tokens) == (100, 5)


def test_an_answer_without_cache_fields_or_text() -> None:
    answer = {
        "output": {"message": {"role": "assistant", "content": [
            {"toolUse": {"toolUseId": "t", "name": "f", "input": {}}}]}},
        "stopReason": "tool_use",
        "usage": {"inputTokens": 7, "outputTokens": 2, "totalTokens": 9},
        "metrics": {"latencyMs": 1},
    }  # fmt: skip
    out = bedrock.chat_completion(answer, "claude")
    message = out["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["function"]["arguments"] == "{}"
    assert out["usage"]["prompt_tokens"] == 7 and out["usage"]["total_tokens"] == 9
    assert out["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert "usage" not in bedrock.chat_completion({**answer, "usage": None}, "claude")


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("guardrail_intervened", "content_filter"),
        ("content_filtered", "content_filter"),
        ("tool_use", "tool_calls"),
    ],
)
def test_stop_reasons(reason: str, finish: str) -> None:
    answer = {**ANSWER, "stopReason": reason}
    assert bedrock.chat_completion(answer, "claude")["choices"][0]["finish_reason"] == finish


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "client_status", "openai_type", "code"),
    [
        (400, {"message": "bad"}, 400, "invalid_request_error", "ValidationException"),
        (403, {"message": "no"}, 403, "permission_error", "AccessDeniedException"),
        (404, {"message": "no model"}, 404, "invalid_request_error", "ResourceNotFoundException"),
        (408, {"message": "slow"}, 504, "timeout", "ModelTimeoutException"),
        (424, {"message": "model"}, 502, "server_error", "ModelErrorException"),
        (429, {"message": "slow down"}, 429, "rate_limit_error", "ThrottlingException"),
        (500, {"message": "oops"}, 500, "server_error", "InternalServerException"),
        (503, {"message": "down"}, 503, "server_error", "ServiceUnavailableException"),
        # The exception named in a body (some answers, and older services) wins over the status.
        (429, {"__type": "com.amazon.bedrock#ModelNotReadyException", "message": "wait"}, 503,
         "server_error", "ModelNotReadyException"),
        (503, {"__type": "ServiceUnavailableException", "Message": "down"}, 503, "server_error",
         "ServiceUnavailableException"),
        (403, {"__type": "UnrecognizedClientException:http://internal.amazon.com/coral/",
               "message": "bad key"}, 403, "authentication_error", "UnrecognizedClientException"),
        (418, {"message": "teapot"}, 418, "invalid_request_error", "provider_418"),
    ],
)  # fmt: skip
def test_errors_in_openais_shape(
    status: int, body: dict[str, Any], client_status: int, openai_type: str, code: str
) -> None:
    err = bedrock.PROVIDER.error(status, orjson.dumps(body), {})
    assert (err.status, err.type, err.code) == (client_status, openai_type, code)
    assert err.message == body.get("message", body.get("Message"))


# The exceptions whose status (botocore's service model for bedrock-runtime) would read as
# another: only their name, in the `x-amzn-errortype` header of a `{"message"}` body, tells.
@pytest.mark.parametrize(
    ("status", "errortype", "client_status", "openai_type", "code"),
    [
        (429, "ModelNotReadyException:http://internal.amazon.com/coral/com.amazon.bedrock/", 503,
         "server_error", "ModelNotReadyException"),
        (400, "ServiceQuotaExceededException:http://internal.amazon.com/coral/com.amazon.bedrock/",
         429, "rate_limit_error", "ServiceQuotaExceededException"),
        (403, "UnrecognizedClientException:http://internal.amazon.com/coral/com.amazon.coral.service/",
         403, "authentication_error", "UnrecognizedClientException"),
        (403, "com.amazon.coral.service#ExpiredTokenException", 403, "authentication_error",
         "ExpiredTokenException"),
        (400, "ValidationException:http://internal.amazon.com/coral/com.amazon.bedrock/", 400,
         "invalid_request_error", "ValidationException"),
        (424, "ModelErrorException:http://internal.amazon.com/coral/com.amazon.bedrock/", 502,
         "server_error", "ModelErrorException"),
        (400, "ConflictException", 400, "invalid_request_error", "ConflictException"),
    ],
)  # fmt: skip
def test_the_exception_named_in_the_errortype_header(
    status: int, errortype: str, client_status: int, openai_type: str, code: str
) -> None:
    body = orjson.dumps({"message": "why"})
    err = bedrock.PROVIDER.error(status, body, {"x-amzn-errortype": errortype})
    assert (err.status, err.type, err.code, err.message) == (
        client_status, openai_type, code, "why"
    )  # fmt: skip
    # What the client gets through the registry, which passes the answer's headers on.
    from extproc.providers import registry

    rendered_status, rendered, _ = registry.answer_and_usage(
        "bedrock", "claude", status, body, headers={"x-amzn-errortype": errortype}
    )
    assert rendered_status == client_status
    assert orjson.loads(rendered)["error"]["code"] == code


def test_the_header_wins_over_a_body_naming_another_exception() -> None:
    body = orjson.dumps({"__type": "ValidationException", "message": "m"})
    err = bedrock.error(429, body, {"x-amzn-errortype": "ModelNotReadyException:http://x/"})
    assert (err.status, err.code) == (503, "ModelNotReadyException")
    err = bedrock.error(429, body, {"x-amzn-errortype": ""})  # an empty header names nothing
    assert (err.status, err.code) == (400, "ValidationException")


def test_an_error_that_is_not_bedrocks_json() -> None:
    err = bedrock.error(502, b"<html>bad gateway</html>", {})
    assert (err.status, err.type, err.code) == (502, "server_error", "provider_502")
    assert "502" in err.message


# -- the event stream -----------------------------------------------------------------------------


def events(*pairs: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(event_frame(kind, payload) for kind, payload in pairs)


BODY = (
    ("messageStart", {"role": "assistant"}),
    ("contentBlockDelta", {"contentBlockIndex": 0,
                           "delta": {"reasoningContent": {"text": "Weather, then."}}}),
    ("contentBlockDelta", {"contentBlockIndex": 0,
                           "delta": {"reasoningContent": {"signature": "sig"}}}),
    ("contentBlockStop", {"contentBlockIndex": 0}),
    ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": "Hello"}}),
    ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": ", wörld"}}),
    ("contentBlockStop", {"contentBlockIndex": 1}),
    ("contentBlockStart", {"contentBlockIndex": 2,
                           "start": {"toolUse": {"toolUseId": "tooluse_9", "name": "weather"}}}),
    ("contentBlockDelta", {"contentBlockIndex": 2, "delta": {"toolUse": {"input": '{"city": '}}}),
    ("contentBlockDelta", {"contentBlockIndex": 2, "delta": {"toolUse": {"input": '"Paris"}'}}}),
    ("contentBlockStop", {"contentBlockIndex": 2}),
    ("contentBlockStart", {"contentBlockIndex": 3,
                           "start": {"toolUse": {"toolUseId": "tooluse_10", "name": "time"}}}),
    ("contentBlockDelta", {"contentBlockIndex": 3, "delta": {"toolUse": {"input": "{}"}}}),
    ("contentBlockStop", {"contentBlockIndex": 3}),
    ("messageStop", {"stopReason": "tool_use"}),
)  # fmt: skip
METADATA = (
    "metadata",
    {
        "usage": {"inputTokens": 25, "outputTokens": 15, "totalTokens": 50,
                  "cacheReadInputTokens": 10, "cacheWriteInputTokens": 0},
        "metrics": {"latencyMs": 400},
    },
)  # fmt: skip
STREAM = events(*BODY, METADATA)


def chunks(raw: bytes) -> list[dict[str, Any]]:
    """The data events, `id` and `created` left out (a translator's own)."""
    out = []
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: {"):
            chunk = orjson.loads(event[6:])
            chunk.pop("id", None)
            chunk.pop("created", None)
            out.append(chunk)
        elif event:
            assert event == b"data: [DONE]", event
    return out


def test_a_stream_becomes_openai_chunks_the_sdk_reads() -> None:
    translator = bedrock.PROVIDER.stream("claude")
    raw = translator.feed(STREAM)
    assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b"[DONE]") == 1
    parsed = [ChatCompletionChunk.model_validate(orjson.loads(e[6:]))
              for e in raw.split(b"\n\n") if e.startswith(b"data: {")]  # fmt: skip
    assert len({c.id for c in parsed}) == 1
    assert parsed[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
    assert text == "Hello, wörld" == translator.text
    reasoning = [c.choices[0].delta.model_extra for c in parsed if c.choices]
    assert [r["reasoning_content"] for r in reasoning if r and "reasoning_content" in r] == [
        "Weather, then."
    ]
    calls = [tc for c in parsed if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert [(tc.index, tc.id) for tc in calls if tc.id] == [(0, "tooluse_9"), (1, "tooluse_10")]
    assert calls[0].function is not None and calls[0].function.name == "weather"
    first = "".join(tc.function.arguments or "" for tc in calls if tc.index == 0 and tc.function)
    assert orjson.loads(first) == {"city": "Paris"}
    finish = [
        c.choices[0].finish_reason for c in parsed if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["tool_calls"]
    assert parsed[-1].choices == [] and parsed[-1].usage is not None
    assert parsed[-1].usage.prompt_tokens == 35 and parsed[-1].usage.completion_tokens == 15
    assert parsed[-1].usage.prompt_tokens_details is not None
    assert parsed[-1].usage.prompt_tokens_details.cached_tokens == 10
    assert translator.usage == bedrock.usage(METADATA[1]["usage"])
    assert translator.failed is None


def test_the_stream_split_at_every_byte_translates_the_same() -> None:
    whole = chunks(bedrock.StreamTranslator("claude").feed(STREAM))
    assert len(whole) == 11  # role, reasoning, 2 texts, 2 calls and 3 argument pieces, end, usage
    for cut in range(1, len(STREAM)):
        translator = bedrock.StreamTranslator("claude")
        first = translator.feed(STREAM[:cut])
        got = chunks(first + translator.feed(STREAM[cut:]))
        assert got == whole, cut
    translator = bedrock.StreamTranslator("claude")
    byte_by_byte = b"".join(translator.feed(STREAM[i : i + 1]) for i in range(len(STREAM)))
    assert chunks(byte_by_byte) == whole and translator.usage is not None


def test_the_stream_in_random_pieces_translates_the_same() -> None:
    whole = chunks(bedrock.StreamTranslator("claude").feed(STREAM))
    rng = random.Random(7)
    for _ in range(50):
        translator = bedrock.StreamTranslator("claude")
        out, i = bytearray(), 0
        while i < len(STREAM):
            n = rng.randint(1, 200)
            out += translator.feed(STREAM[i : i + n])
            i += n
        assert chunks(bytes(out)) == whole


def test_nothing_comes_out_before_a_frame_is_whole() -> None:
    frame_end = len(event_frame(*BODY[0]))
    translator = bedrock.StreamTranslator("claude")
    assert translator.feed(STREAM[: frame_end - 1]) == b""
    assert b'"role":"assistant"' in translator.feed(STREAM[frame_end - 1 : frame_end])


@pytest.mark.parametrize(
    ("kind", "status", "openai_type", "code"),
    [
        ("throttlingException", 429, "rate_limit_error", "ThrottlingException"),
        ("modelStreamErrorException", 502, "server_error", "ModelStreamErrorException"),
        ("validationException", 400, "invalid_request_error", "ValidationException"),
        ("internalServerException", 500, "server_error", "InternalServerException"),
        ("serviceUnavailableException", 503, "server_error", "ServiceUnavailableException"),
    ],
)
def test_an_exception_frame_ends_the_stream_with_an_openai_error(
    kind: str, status: int, openai_type: str, code: str
) -> None:
    translator = bedrock.StreamTranslator("claude")
    raw = translator.feed(events(*BODY[:5]) + exception_frame(kind, "It broke."))
    *_, last = chunks(raw)
    assert last == {"error": {"message": "It broke.", "type": openai_type, "param": None,
                              "code": code}}  # fmt: skip
    assert raw.endswith(b"data: [DONE]\n\n")
    assert translator.failed is not None and translator.failed.status == status
    assert translator.usage is None and translator.partial_usage is None
    assert translator.feed(events(METADATA)) == b""  # the stream is over


def test_an_event_streams_error_frame_fails_the_stream() -> None:
    error = frame(
        ((":message-type", "error"), (":error-code", "InternalFailure"),
         (":error-message", "Something went wrong")),
        b"",
    )  # fmt: skip
    translator = bedrock.StreamTranslator("claude")
    *_, last = chunks(translator.feed(events(BODY[0]) + error))
    assert last["error"]["code"] == "InternalFailure"
    assert last["error"]["message"] == "Something went wrong"
    assert translator.failed is not None and translator.failed.status == 500


@pytest.mark.parametrize("where", ["prelude", "payload", "message crc"])
def test_a_corrupt_frame_ends_the_stream_without_raising(where: str) -> None:
    good = events(*BODY[:2])
    bad = bytearray(event_frame(*BODY[4]))
    index = {"prelude": 2, "payload": len(bad) - 10, "message crc": len(bad) - 1}[where]
    bad[index] ^= 0x01
    translator = bedrock.StreamTranslator("claude")
    raw = b"".join(translator.feed(bytes([b])) for b in good + bytes(bad) + events(METADATA))
    out = chunks(raw)
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert out[-1]["error"]["code"] == "bad_event_stream"
    assert "Hello" not in raw.decode() and raw.endswith(b"data: [DONE]\n\n")
    assert translator.failed is not None and translator.failed.code == "bad_event_stream"
    assert translator.usage is None


def test_a_payload_that_is_not_json_and_unknown_events_are_passed_over() -> None:
    odd = frame(
        ((":event-type", "contentBlockDelta"), (":content-type", "application/json"),
         (":message-type", "event")),
        b"not json",
    )  # fmt: skip
    translator = bedrock.StreamTranslator("claude")
    raw = translator.feed(
        events(BODY[0]) + odd + events(("newEvent", {"x": 1})) + events(*BODY[4:6])
    )
    assert [c["choices"][0]["delta"].get("content") for c in chunks(raw)] == ["", "Hello",
                                                                             ", wörld"]  # fmt: skip
    assert translator.failed is None


def test_a_cut_stream_reports_no_usage() -> None:
    """ConverseStream reports usage, the input's count included, at its end only: a stream cut
    before it leaves the gateway to its own count (settlement.stream_usage)."""
    translator = bedrock.StreamTranslator("claude")
    translator.feed(events(*BODY))
    assert translator.usage is None and translator.partial_usage is None
    assert translator.failed is None and translator.text == "Hello, wörld"


def test_a_relay_of_a_failed_stream_reports_its_code() -> None:
    from extproc.providers import registry
    from extproc.wire.openai import OPENAI

    relay = registry.TranslatedStream(bedrock.PROVIDER.stream("claude"), OPENAI.stream_relay(False))
    relay.feed(events(*BODY[:6]) + exception_frame("throttlingException", "Slow down."), True)
    assert relay.error_code == "ThrottlingException" and relay.usage is None
    assert relay.partial_usage is None


def test_a_stream_that_finished_without_its_usage_still_ends_with_done() -> None:
    """Bedrock ended after messageStop, without its metadata event: the client's stream ends as
    OpenAI's do; one cut before its finish does not."""
    from extproc.providers import registry
    from extproc.wire.openai import OPENAI

    finished = registry.TranslatedStream(
        bedrock.PROVIDER.stream("claude"), OPENAI.stream_relay(False)
    )
    out = finished.feed(events(*BODY), True)
    assert out is not None and out.endswith(b"data: [DONE]\n\n") and finished.usage is None
    cut = registry.TranslatedStream(bedrock.PROVIDER.stream("claude"), OPENAI.stream_relay(False))
    out = cut.feed(events(*BODY[:6]), True)
    assert out is not None and b"[DONE]" not in out
