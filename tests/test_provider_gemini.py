"""OpenAI chat completions to Google's Gemini API and back (extproc/providers/gemini.py): golden
request/answer pairs (text, system, multi-turn, tools and their results, images), refusals
naming the parameter, the event stream split at every byte and in random pieces, errors. The
OpenAI side is checked with the official SDK's own types."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc.config import ResolvedTarget
from extproc.errors import GatewayError
from extproc.providers import gemini

from .provider_cases import PNG, chunks, golden_conversation, tool_call
from .provider_cases import STRICT_WEATHER as WEATHER

MODEL = "gemini-2.5-flash"


def translate(provider_model: str | None = None, **body: Any) -> dict[str, Any]:
    return gemini.generate_content_request(
        {"model": "gem", "messages": [{"role": "user", "content": "hi"}], **body},
        4096,
        provider_model,
    )


def target(url_path: str, model: str = MODEL) -> ResolvedTarget:
    return ResolvedTarget(
        model="gem",
        backend="google",
        provider_model=model,
        weight=1,
        auth_header="x-goog-api-key",
        credential="k",
        provider="gemini",
        url_path=url_path,
    )


# -- the request ----------------------------------------------------------------------------------


def test_a_multi_turn_conversation_with_tools_and_images() -> None:
    body = {
        "model": "gem",
        "messages": [
            *golden_conversation(
                "data:image/jpg;base64,/9j/", tool_call("call_2", "clock", ""), '{"time": "12:00"}'
            ),
            {"role": "assistant", "content": [{"type": "text", "text": "You're welcome."}]},
            {"role": "user", "content": "\n"},  # blank: nothing to say
            {"role": "user", "content": "Bye."},
        ],
        "max_completion_tokens": 300,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["END", ""],
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "jane",
        "tools": [WEATHER, {"type": "function", "function": {"name": "clock"}}],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "n": 1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0,
        "seed": 7,
        "logprobs": False,
    }
    assert gemini.generate_content_request(body, 4096) == {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "What is in this picture, and the weather?"},
                    {"inlineData": {"mimeType": "image/png", "data": PNG}},
                    {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/"}},
                ],
            },
            {
                "role": "model",
                "parts": [
                    {"text": "Let me look."},
                    {"functionCall": {"name": "weather", "args": {"city": "Paris"}}},
                    {"functionCall": {"name": "clock", "args": {}}},
                ],
            },
            {
                "role": "user",
                "parts": [
                    {"functionResponse": {"name": "weather", "response": {"output": "18 C"}}},
                    {"functionResponse": {"name": "clock", "response": {"time": "12:00"}}},
                    {"text": "Thanks."},
                ],
            },
            {"role": "model", "parts": [{"text": "You're welcome."}]},
            {"role": "user", "parts": [{"text": "Bye."}]},
        ],
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Use tools."}]},
        "generationConfig": {
            "maxOutputTokens": 300,
            "temperature": 0.2,
            "topP": 0.9,
            "stopSequences": ["END"],
            "presencePenalty": 0.5,
            "seed": 7,
        },
        "tools": [
            {
                "functionDeclarations": [
                    {
                        "name": "weather",
                        "description": "The weather in a city",
                        # JSON Schema as the client gave it, but for the dialect's name.
                        "parametersJsonSchema": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}},
                            "required": ["city"],
                            "additionalProperties": False,
                        },
                    },
                    {"name": "clock"},
                ]
            }
        ],
        "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}},
    }


def test_a_plain_request_and_the_default_max_tokens() -> None:
    assert translate() == {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "generationConfig": {"maxOutputTokens": 4096},
    }
    assert translate(max_tokens=12)["generationConfig"] == {"maxOutputTokens": 12}
    assert translate(top_p=1, n=1, presence_penalty=0.0)["generationConfig"] == {
        "maxOutputTokens": 4096
    }


def test_the_path_at_the_gemini_api_and_at_vertex() -> None:
    provider = gemini.PROVIDER
    assert provider.path(target("/v1beta"), False) == (
        "/v1beta/models/gemini-2.5-flash:generateContent"
    )
    vertex = "/v1/projects/p/locations/us-central1/publishers/google"
    assert provider.path(target(vertex), True) == (
        f"{vertex}/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    )
    # A `/` or `:` in the id would change what the path names.
    assert (
        provider.path(target("/v1beta", "a/b:c"), False)
        == "/v1beta/models/a%2Fb%3Ac:generateContent"
    )
    assert provider.name == "gemini" and provider.request_headers == {}
    assert provider.stream_content_type == "text/event-stream"
    assert provider.request(target("/v1beta"), {"model": "gem", "messages": [
        {"role": "user", "content": "hi"}]}) == {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "generationConfig": {"maxOutputTokens": 4096},
    }  # fmt: skip


def test_the_client_cannot_choose_the_google_project_billed() -> None:
    """`x-goog-user-project` would bill another project's quota than the credential's: every
    backend's request loses it (a failover attempt starts from the last one's headers)."""
    from extproc.providers import registry

    assert gemini.PROVIDER.strip_headers == ("x-goog-user-project",)
    for provider_type in ("gemini", "openai", "anthropic", "bedrock", "azure"):
        own, removed = registry.request_headers(provider_type)
        assert "x-goog-user-project" in removed and "x-goog-user-project" not in own


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"mode": "AUTO"}),
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "weather"}},
            {"mode": "ANY", "allowedFunctionNames": ["weather"]},
        ),
    ],
)
def test_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    out = translate(tools=[WEATHER], tool_choice=choice)
    assert out["toolConfig"] == {"functionCallingConfig": expected}


def test_parallel_tool_calls_false_is_neutral_when_no_tool_can_be_called() -> None:
    assert "tools" not in translate(parallel_tool_calls=False)
    out = translate(tools=[WEATHER], tool_choice="none", parallel_tool_calls=False)
    assert out["toolConfig"] == {"functionCallingConfig": {"mode": "NONE"}}


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "text"}, {}),
        ({"type": "json_object"}, {"responseMimeType": "application/json"}),
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "answer",
                    "strict": True,
                    "schema": {
                        "$schema": "https://json-schema.org/draft/2020-12/schema",
                        "type": "object",
                        "properties": {"a": {"type": ["string", "null"]}},
                    },
                },
            },
            {
                "responseMimeType": "application/json",
                "responseJsonSchema": {
                    "type": "object",
                    "properties": {"a": {"type": ["string", "null"]}},
                },
            },
        ),
    ],
)
def test_response_format(response_format: dict[str, Any], expected: dict[str, Any]) -> None:
    config = translate(response_format=response_format)["generationConfig"]
    assert config == {"maxOutputTokens": 4096, **expected}


def test_n_is_gemini_candidate_count_but_not_for_a_stream() -> None:
    assert translate(n=3)["generationConfig"]["candidateCount"] == 3
    assert translate(n=8)["generationConfig"]["candidateCount"] == 8
    with pytest.raises(GatewayError) as caught:
        translate(n=3, stream=True)
    assert (caught.value.status, caught.value.param) == (400, "n")


def test_max_completion_tokens_wins_and_a_zero_is_named() -> None:
    config = translate(max_completion_tokens=7, max_tokens=99)["generationConfig"]
    assert config == {"maxOutputTokens": 7}
    for name in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(GatewayError) as caught:
            translate(**{name: 0})
        err = caught.value
        assert (err.status, err.code, err.param) == (400, "integer_below_min_value", name)


def test_tool_results_name_the_function_of_the_call_they_answer() -> None:
    calls = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "[1]"}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    out = translate(
        messages=[
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": "\n\n", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "b", "content": "[1, 2]"},
            {"role": "tool", "tool_call_id": "a", "content": ""},
        ]
    )
    assert out["contents"][1:] == [
        {
            "role": "model",
            "parts": [
                # Arguments that are not an object are wrapped (Gemini's args are an object).
                # Calls Gemini did not make have no signature: the first gets Google's
                # placeholder, for a model that may validate signatures (not known here).
                {
                    "functionCall": {"name": "f", "args": {"value": [1]}},
                    "thoughtSignature": "skip_thought_signature_validator",
                },
                {"functionCall": {"name": "g", "args": {}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                # Not an object: the text as the function's output.
                {"functionResponse": {"name": "g", "response": {"output": "[1, 2]"}}},
                {"functionResponse": {"name": "f", "response": {"output": ""}}},
            ],
        },
    ]


def foreign_call(call_id: str, name: str = "weather") -> dict[str, Any]:
    """A tool call another backend made (an id without a Gemini thought signature)."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}


def conversation_of_steps() -> list[dict[str, Any]]:
    """An earlier turn with a call, then the current turn: two steps of calls, their results."""
    return [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "tool_calls": [foreign_call("toolu_1")]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "cold"},
        {"role": "assistant", "content": "Cold."},
        {"role": "user", "content": "and in Paris and Rome, and the time?"},
        {"role": "assistant", "tool_calls": [foreign_call("toolu_2"), foreign_call("toolu_3")]},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "mild"},
        {"role": "tool", "tool_call_id": "toolu_3", "content": "warm"},
        {"role": "assistant", "tool_calls": [foreign_call("toolu_4", "clock")]},
        {"role": "tool", "tool_call_id": "toolu_4", "content": "noon"},
    ]


@pytest.mark.parametrize("model", ["gemini-3-pro-preview", "gemini-3.1-flash", None,
                                   "publishers/google/models/gemini-3-flash-preview"])  # fmt: skip
def test_calls_another_backend_made_get_the_placeholder_signature_in_the_current_turn(
    model: str | None,
) -> None:
    contents = translate(model, tools=[WEATHER], messages=conversation_of_steps())["contents"]
    signatures = [
        [p.get("thoughtSignature") for p in turn["parts"] if "functionCall" in p]
        for turn in contents
        if turn["role"] == "model"
    ]
    placeholder = gemini.PLACEHOLDER_SIGNATURE
    assert placeholder == "skip_thought_signature_validator"
    # The earlier turn is left as it was; in the current one, the first call of each step.
    assert signatures == [[None], [], [placeholder, None], [placeholder]]


@pytest.mark.parametrize("model", ["gemini-2.5-flash", "gemini-2.0-flash-001", "gemini-1.5-pro",
                                   "gemma-3-27b-it", "tunedModels/mine"])  # fmt: skip
def test_models_that_do_not_validate_signatures_get_no_placeholder(model: str) -> None:
    contents = translate(model, tools=[WEATHER], messages=conversation_of_steps())["contents"]
    assert not any("thoughtSignature" in p for turn in contents for p in turn["parts"])


def test_a_real_signature_is_never_replaced() -> None:
    signed = foreign_call("call_1~sig~c2lnbmF0dXJl")
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [signed, foreign_call("call_2")]},
        {"role": "tool", "tool_call_id": signed["id"], "content": "x"},
        {"role": "tool", "tool_call_id": "call_2", "content": "y"},
    ]
    parts = translate("gemini-3-pro-preview", messages=messages)["contents"][1]["parts"]
    assert [p.get("thoughtSignature") for p in parts] == ["c2lnbmF0dXJl", None]


def test_a_tool_result_for_no_known_call_is_refused() -> None:
    with pytest.raises(GatewayError) as caught:
        translate(messages=[{"role": "tool", "tool_call_id": "call_9", "content": "x"}])
    assert caught.value.status == 400
    assert caught.value.param == "messages[0].tool_call_id"


def test_a_thought_signature_rides_in_the_tool_call_id() -> None:
    """Gemini 3 wants a call's thought signature back with it: the client echoes the id."""
    answer = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {
                            "functionCall": {"name": "weather", "args": {"city": "Oslo"}},
                            "thoughtSignature": "c2lnbmF0dXJl",
                        }
                    ],
                },
                "finishReason": "STOP",
            }
        ]
    }
    (call,) = gemini.chat_completion(answer, "gem")["choices"][0]["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["id"].endswith("~sig~c2lnbmF0dXJl")
    out = translate(
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": '{"c": 5}'},
        ]
    )
    assert out["contents"][1]["parts"] == [
        {
            "functionCall": {"name": "weather", "args": {"city": "Oslo"}},
            "thoughtSignature": "c2lnbmF0dXJl",
        }
    ]
    assert out["contents"][2]["parts"] == [
        {"functionResponse": {"name": "weather", "response": {"c": 5}}}
    ]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"1": 2}}, "logit_bias"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"audio": {"voice": "x"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"function_call": "auto"}, "function_call"),
        ({"tools": [WEATHER], "parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto"}},
            },
            "tool_choice",
        ),
        ({"response_format": {"type": "grammar"}}, "response_format"),
        ({"stop": ["a", "b", "c", "d", "e", "f"]}, "stop"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[].type=custom"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0].type",
        ),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].tool_calls",
        ),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, None),  # not OpenAI's shape
        ({"messages": [{"role": "tool", "content": "x"}]}, None),  # no tool_call_id
        ({"temperature": "hot"}, None),
        ({"seed": 1.5}, None),
        # What Gemini would refuse, refused before any quota is reserved for it.
        ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages"),
        ({"seed": 2**31}, "seed"),
        ({"seed": -(2**31) - 1}, "seed"),
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/bmp;base64,Qk"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url",
        ),
    ],
)
def test_what_gemini_cannot_do_as_asked_is_refused(
    fields: dict[str, Any], param: str | None
) -> None:
    with pytest.raises(GatewayError) as caught:
        translate(**fields)
    assert caught.value.status == 400
    assert caught.value.param == param


# -- the answer -----------------------------------------------------------------------------------

ANSWER = {
    "candidates": [
        {
            "content": {
                "role": "model",
                "parts": [
                    {"text": "The user wants weather.", "thought": True},
                    {"text": "Checking"},
                    {"text": " now."},
                    {"functionCall": {"name": "weather", "args": {"city": "Paris"}}},
                    {"functionCall": {"id": "fc_7", "name": "clock"}},
                ],
            },
            "finishReason": "STOP",
            "index": 0,
        }
    ],
    "usageMetadata": {
        "promptTokenCount": 120,
        "cachedContentTokenCount": 100,
        "candidatesTokenCount": 9,
        "thoughtsTokenCount": 30,
        "totalTokenCount": 159,
    },
    "modelVersion": MODEL,
    "responseId": "resp-1",
}


def test_an_answer_with_calls_thoughts_and_cached_input() -> None:
    out = gemini.chat_completion(ANSWER, "gem")
    parsed = ChatCompletion.model_validate(out)  # the openai SDK reads it
    assert parsed.id == "chatcmpl-resp-1" and parsed.model == "gem"
    choice = parsed.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking now."
    assert out["choices"][0]["message"]["reasoning_content"] == "The user wants weather."
    assert choice.message.tool_calls is not None
    first, second = choice.message.tool_calls
    assert first.id.startswith("call_") and first.function.name == "weather"
    assert orjson.loads(first.function.arguments) == {"city": "Paris"}
    # Gemini's own id when it gives one; no args: no arguments.
    assert (second.id, second.function.name, second.function.arguments) == ("fc_7", "clock", "{}")
    # Gemini's prompt count holds the cached input; the thoughts are output.
    assert out["usage"] == {
        "prompt_tokens": 120,
        "completion_tokens": 39,
        "total_tokens": 159,
        "prompt_tokens_details": {"cached_tokens": 100},
        "completion_tokens_details": {"reasoning_tokens": 30},
    }


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("LANGUAGE", "content_filter"),
        ("IMAGE_SAFETY", "content_filter"),
        ("MODEL_ARMOR", "content_filter"),
        ("ESCALATION", "content_filter"),
        ("PUP_LIMITED_DISABLED", "content_filter"),
        ("CONTINUATION", "length"),
        ("OTHER", "stop"),
        ("FINISH_REASON_UNSPECIFIED", "stop"),
        (None, "stop"),
    ],
)
def test_finish_reasons(reason: str | None, finish: str) -> None:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": "x"}]}}
    if reason is not None:
        candidate["finishReason"] = reason
    out = gemini.chat_completion({"candidates": [candidate]}, "gem")
    assert out["choices"][0]["finish_reason"] == finish
    assert "usage" not in out


@pytest.mark.parametrize("reason", sorted(gemini.FAILED))
def test_a_generation_gemini_ended_as_failed_is_a_502_not_an_answer(reason: str) -> None:
    from extproc.providers import registry

    candidate = {"content": {"parts": [{"text": "x"}]}, "finishReason": reason,
                 "finishMessage": "Malformed function call: print(x"}  # fmt: skip
    answer = {"candidates": [candidate], "usageMetadata": {"promptTokenCount": 3}}
    with pytest.raises(GatewayError) as caught:
        gemini.chat_completion(answer, "gem")
    err = caught.value
    assert (err.status, err.type, err.code) == (502, "server_error", reason)
    assert reason in err.message and "print(x" in err.message
    # What the client gets: the error, not the answer.
    status, body, _ = registry.answer_and_usage("gemini", "gem", 200, orjson.dumps(answer))
    assert status == 502 and body is not None
    assert orjson.loads(body)["error"]["code"] == reason


def test_one_failed_candidate_fails_the_answer() -> None:
    ok = {"content": {"parts": [{"text": "fine"}]}, "finishReason": "STOP", "index": 0}
    bad = {"finishReason": "MALFORMED_RESPONSE", "index": 1}
    with pytest.raises(GatewayError) as caught:
        gemini.chat_completion({"candidates": [ok, bad]}, "gem")
    assert caught.value.code == "MALFORMED_RESPONSE"


def test_every_finish_reason_of_google_genai_is_known() -> None:
    """Each FinishReason google-genai knows is one of: filtered, cut, failed, or `stop`."""
    from google.genai import types

    for reason in types.FinishReason:
        name = reason.value
        if name in gemini.FAILED:
            continue
        expected = (
            "content_filter" if name in gemini._FILTERED
            else "length" if name in gemini._CUT
            else "stop"
        )  # fmt: skip
        assert gemini.finish_reason(name, False) == expected
    assert {"MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "MISSING_THOUGHT_SIGNATURE",
            "MALFORMED_RESPONSE"} <= gemini.FAILED  # fmt: skip


def test_a_call_cut_by_the_token_limit_is_length() -> None:
    candidate = {
        "content": {"parts": [{"functionCall": {"name": "f", "args": {}}}]},
        "finishReason": "MAX_TOKENS",
    }
    assert (
        gemini.chat_completion({"candidates": [candidate]}, "gem")["choices"][0]["finish_reason"]
        == "length"
    )


def test_a_filtered_candidate_without_content() -> None:
    out = gemini.chat_completion({"candidates": [{"finishReason": "SAFETY", "index": 0}]}, "gem")
    choice = ChatCompletion.model_validate(out).choices[0]
    assert (choice.message.content, choice.finish_reason) == ("", "content_filter")


def test_a_blocked_prompt_is_an_empty_answer_filtered() -> None:
    answer = {
        "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
        "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
    }
    out = gemini.chat_completion(answer, "gem")
    parsed = ChatCompletion.model_validate(out)
    assert parsed.choices[0].finish_reason == "content_filter"
    assert parsed.choices[0].message.content == ""
    assert parsed.usage is not None and parsed.usage.prompt_tokens == 8
    assert parsed.usage.completion_tokens == 0


def test_candidates_are_choices() -> None:
    answer = {
        "candidates": [
            {"content": {"parts": [{"text": "a"}]}, "finishReason": "STOP"},
            {"content": {"parts": [{"text": "b"}]}, "finishReason": "MAX_TOKENS", "index": 1},
        ]
    }
    parsed = ChatCompletion.model_validate(gemini.chat_completion(answer, "gem"))
    assert [(c.index, c.message.content, c.finish_reason) for c in parsed.choices] == [
        (0, "a", "stop"),
        (1, "b", "length"),
    ]


def test_usage_that_is_not_a_report_is_left_out() -> None:
    for report in (
        {"promptTokenCount": -1},
        {"candidatesTokenCount": 3},
        {"promptTokenCount": "1"},
    ):
        assert "usage" not in gemini.chat_completion({"usageMetadata": report}, "gem")
    # The input of Google's own tools is input too.
    report = gemini.usage({"promptTokenCount": 10, "toolUsePromptTokenCount": 5})
    assert report is not None and (report.prompt_tokens, report.total_tokens) == (15, 15)


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "name", "client_status", "openai_type"),
    [
        (400, "INVALID_ARGUMENT", 400, "invalid_request_error"),
        (400, "FAILED_PRECONDITION", 400, "invalid_request_error"),
        (401, "UNAUTHENTICATED", 401, "authentication_error"),
        (403, "PERMISSION_DENIED", 403, "permission_error"),
        (404, "NOT_FOUND", 404, "invalid_request_error"),
        (429, "RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
        (499, "CANCELLED", 500, "server_error"),
        (500, "INTERNAL", 500, "server_error"),
        (503, "UNAVAILABLE", 503, "server_error"),
        (504, "DEADLINE_EXCEEDED", 504, "timeout"),
    ],
)
def test_errors_in_openais_shape(
    status: int, name: str, client_status: int, openai_type: str
) -> None:
    body = orjson.dumps(
        {"error": {"code": status, "message": "why", "status": name, "details": [{"@type": "x"}]}}
    )
    err = gemini.PROVIDER.error(status, body, {})
    assert (err.status, err.type, err.code, err.message) == (
        client_status,
        openai_type,
        name,
        "why",
    )


def test_errors_google_leaves_unnamed_or_not_json() -> None:
    listed = orjson.dumps([{"error": {"code": 429, "message": "slow down"}}])
    err = gemini.error(429, listed)  # a streamed answer's JSON array form
    assert (err.status, err.type, err.code, err.message) == (
        429,
        "rate_limit_error",
        "RESOURCE_EXHAUSTED",
        "slow down",
    )
    err = gemini.error(502, b"<html>bad gateway</html>")
    assert (err.status, err.type, err.code) == (502, "server_error", "provider_502")
    err = gemini.error(418, b"{}")
    assert (err.status, err.type, err.code) == (418, "invalid_request_error", "provider_418")


# -- the stream -----------------------------------------------------------------------------------


def events(*payloads: dict[str, Any]) -> bytes:
    """Gemini's event stream: CRLF line endings."""
    return b"".join(b"data: " + orjson.dumps(p) + b"\r\n\r\n" for p in payloads)


def _prompt_only(n: int) -> dict[str, Any]:
    return {"promptTokenCount": n, "totalTokenCount": n}


STREAM = events(
    {
        "candidates": [
            {"content": {"role": "model", "parts": [{"text": "Hmm.", "thought": True}]}}
        ],
        "usageMetadata": _prompt_only(25),
        "responseId": "r9",
    },
    {
        "candidates": [{"content": {"role": "model", "parts": [{"text": "Hello"}]}, "index": 0}],
        "usageMetadata": _prompt_only(25),
        "responseId": "r9",
    },
    {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {"text": ", wörld"},
                        {
                            "functionCall": {"name": "weather", "args": {"city": "Paris"}},
                            "thoughtSignature": "c2ln",
                        },
                        {"functionCall": {"id": "fc_2", "name": "clock", "args": {}}},
                    ],
                },
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 25,
            "cachedContentTokenCount": 10,
            "candidatesTokenCount": 15,
            "thoughtsTokenCount": 4,
            "totalTokenCount": 44,
        },
        "responseId": "r9",
    },
)


def _normalized(raw: bytes) -> list[dict[str, Any]]:
    """The chunks without what differs from one translator to the next (generated call ids,
    and the second each was created in: a run may cross a second's boundary)."""
    out = chunks(raw)
    for chunk in out:
        chunk.pop("created", None)
        for choice in chunk.get("choices", ()):
            for call in choice["delta"].get("tool_calls", ()):
                if call["id"].startswith("call_"):
                    call["id"] = "call_" + call["id"].partition("~sig~")[2]
    return out


def test_a_stream_becomes_openai_chunks_the_sdk_reads() -> None:
    translator = gemini.StreamTranslator("gem")
    raw = translator.feed(STREAM)
    assert raw.endswith(b"data: [DONE]\n\n") and translator.done
    parsed = [ChatCompletionChunk.model_validate(e) for e in chunks(raw)]
    assert {c.id for c in parsed} == {"chatcmpl-r9"} and {c.model for c in parsed} == {"gem"}
    assert parsed[0].choices[0].delta.role == "assistant"
    assert chunks(raw)[1]["choices"][0]["delta"] == {"reasoning_content": "Hmm."}
    text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
    assert text == "Hello, wörld" == translator.text
    calls = [tc for c in parsed if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert [tc.index for tc in calls] == [0, 1]
    assert calls[0].function is not None and calls[0].function.name == "weather"
    assert calls[0].id is not None and calls[0].id.endswith("~sig~c2ln")
    assert orjson.loads(calls[0].function.arguments or "") == {"city": "Paris"}
    assert calls[1].id == "fc_2"
    finish = [
        c.choices[0].finish_reason for c in parsed if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["tool_calls"]
    assert parsed[-1].choices == [] and parsed[-1].usage is not None
    assert chunks(raw)[-1]["usage"] == {
        "prompt_tokens": 25,
        "completion_tokens": 19,
        "total_tokens": 44,
        "prompt_tokens_details": {"cached_tokens": 10},
        "completion_tokens_details": {"reasoning_tokens": 4},
    }
    report = translator.usage
    assert report is not None and (report.prompt_tokens, report.completion_tokens) == (25, 19)
    assert translator.failed is None
    assert translator.feed(b"data: {}\r\n\r\n") == b""  # nothing after the end


def test_the_stream_split_at_every_byte_gives_the_same_chunks() -> None:
    whole = _normalized(gemini.StreamTranslator("gem").feed(STREAM))
    translator = gemini.StreamTranslator("gem")
    out = b"".join(translator.feed(STREAM[i : i + 1]) for i in range(len(STREAM)))
    assert _normalized(out) == whole
    rng = random.Random(7)
    for _ in range(20):
        translator = gemini.StreamTranslator("gem")
        pieces, i = [], 0
        while i < len(STREAM):
            size = rng.randint(1, 40)
            pieces.append(translator.feed(STREAM[i : i + size]))
            i += size
        assert _normalized(b"".join(pieces)) == whole
        assert translator.done


def test_nothing_is_held_back_once_an_event_is_whole() -> None:
    translator = gemini.StreamTranslator("gem")
    # The event is whole at its blank line's CR (a CR alone ends a line).
    end = STREAM.index(b"\r\n\r\n") + 2
    assert translator.feed(STREAM[:end]) == b""
    assert b"reasoning_content" in translator.feed(STREAM[end : end + 1])
    assert translator.feed(STREAM[end + 1 : end + 2]) == b""


def test_usage_after_the_finish_comes_in_a_later_event() -> None:
    stream = events(
        {
            "candidates": [{"content": {"parts": [{"text": "Hi"}]}}],
            "usageMetadata": _prompt_only(7),
        },
        {"candidates": [{"content": {"parts": [{"text": "!"}]}, "finishReason": "MAX_TOKENS"}]},
        {"usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 2}},
    )
    translator = gemini.StreamTranslator("gem")
    cut = stream.rindex(b"data: ")
    head = chunks(translator.feed(stream[:cut]))
    assert head[-1]["choices"][0]["finish_reason"] == "length" and not translator.done
    partial = translator.partial_usage  # the prompt reported, the output estimated
    assert partial is not None and (partial.prompt_tokens, partial.completion_tokens) == (7, 1)
    tail = translator.feed(stream[cut:])
    assert chunks(tail)[-1]["usage"]["completion_tokens"] == 2
    assert tail.endswith(b"data: [DONE]\n\n") and translator.done


def test_a_stream_without_usage_ends_at_its_finish() -> None:
    stream = events(
        {"candidates": [{"content": {"parts": [{"text": "Hi"}]}, "finishReason": "STOP"}]}
    )
    translator = gemini.StreamTranslator("gem")
    out = translator.feed(stream)
    assert out.endswith(b"data: [DONE]\n\n") and translator.usage is None
    assert translator.partial_usage is None
    assert chunks(out)[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_stream_of_a_blocked_prompt_ends_filtered() -> None:
    stream = events({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                     "usageMetadata": _prompt_only(6)})  # fmt: skip
    translator = gemini.StreamTranslator("gem")
    out = chunks(translator.feed(stream))
    assert out[1]["choices"][0]["finish_reason"] == "content_filter"
    assert out[-1]["usage"]["prompt_tokens"] == 6 and translator.done


def test_an_error_in_the_stream_ends_it_as_openais_error_chunk() -> None:
    stream = events(
        {
            "candidates": [{"content": {"parts": [{"text": "Hel"}]}}],
            "usageMetadata": _prompt_only(30),
        },
        {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}},
    )
    translator = gemini.StreamTranslator("gem")
    out = translator.feed(stream)
    assert out.endswith(b"data: [DONE]\n\n") and translator.done
    assert chunks(out)[-1] == {
        "error": {
            "message": "The model is overloaded.",
            "type": "server_error",
            "param": None,
            "code": "UNAVAILABLE",
        }
    }
    failed = translator.failed
    assert failed is not None and (failed.status, failed.code) == (503, "UNAVAILABLE")
    assert translator.usage is None
    partial = translator.partial_usage
    assert partial is not None and (partial.prompt_tokens, partial.completion_tokens) == (30, 1)


@pytest.mark.parametrize("reason", ["MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL"])
def test_a_failed_generation_ends_the_stream_as_openais_error_chunk(reason: str) -> None:
    from extproc.providers import registry
    from extproc.wire.openai import OPENAI

    stream = events(
        {
            "candidates": [{"content": {"parts": [{"text": "Let me call"}]}}],
            "usageMetadata": _prompt_only(30),
        },
        {
            "candidates": [{"finishReason": reason, "finishMessage": "bad call"}],
            "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 9},
        },
    )
    translator = gemini.StreamTranslator("gem")
    out = translator.feed(stream)
    assert out.endswith(b"data: [DONE]\n\n") and translator.done
    last = chunks(out)[-1]
    assert last["error"]["code"] == reason and last["error"]["type"] == "server_error"
    assert not any(c.get("choices") and c["choices"][0]["finish_reason"] for c in chunks(out))
    failed = translator.failed
    assert failed is not None and (failed.status, failed.code) == (502, reason)
    # No usage chunk: what Gemini reported is charged as the stream's partial usage.
    assert translator.usage is None
    partial = translator.partial_usage
    assert partial is not None and (partial.prompt_tokens, partial.completion_tokens) == (30, 9)
    relay = registry.TranslatedStream(gemini.PROVIDER.stream("gem"), OPENAI.stream_relay(False))
    relay.feed(stream, True)
    assert relay.error_code == reason and relay.usage is None


def test_a_finish_reason_that_is_not_a_string_does_not_raise() -> None:
    for reason in ([], {"a": 1}, 3):
        stream = events({"candidates": [{"content": {"parts": [{"text": "x"}]},
                                         "finishReason": reason}]})  # fmt: skip
        translator = gemini.StreamTranslator("gem")
        translator.feed(stream)
        assert translator.failed is None
        answer = {"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": reason}]}
        assert gemini.chat_completion(answer, "gem")["choices"][0]["finish_reason"] == "stop"


def test_what_is_not_gemini_json_is_skipped() -> None:
    translator = gemini.StreamTranslator("gem")
    assert translator.feed(b": keep-alive\r\n\r\ndata: not json\r\n\r\ndata: [1]\r\n\r\n") == b""
    assert translator.partial_usage is None and translator.usage is None


def test_a_failed_generations_spend_is_reported_with_its_error() -> None:
    """A JSON answer Gemini ended as failed is the client's 502, and what Google billed for it
    is what the gateway charges (as for the same failure in a stream)."""
    from extproc.providers import registry

    answer = {
        "candidates": [{"finishReason": "MALFORMED_FUNCTION_CALL", "content": {"parts": []}}],
        "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 9},
    }
    status, body, reported = registry.answer_and_usage("gemini", "gem", 200, orjson.dumps(answer))
    assert status == 502 and body is not None and b"MALFORMED_FUNCTION_CALL" in body
    assert reported is not None and (reported.prompt_tokens, reported.completion_tokens) == (30, 9)
