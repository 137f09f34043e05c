"""Tool calling on the fake's OpenAI chat completions (extproc/devtools/fake_llm/chat_tools.py),
driven through the official `openai` SDK: forced and required calls, parallel calls, a whole
two-turn conversation, streamed and not, and each 400 OpenAI answers a tool mistake with."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletion
from pydantic import BaseModel

from extproc.devtools.fake_llm import FakeLLMSettings

from .test_fake_llm import _http, _running

MODEL = "gpt-test"
HELLO: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "celsius": {"type": "boolean"},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}}},
        "unit": {"type": "string", "enum": ["metric", "imperial"]},
        "note": {"type": "string"},  # not required: left out
    },
    "required": ["city", "days", "celsius", "where", "unit"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "A city's weather",
        "parameters": WEATHER_SCHEMA,
    },
}
TIME = {"type": "function", "function": {"name": "local-time"}}  # no parameters
WEATHER_ARGS = {"city": "fake", "days": 1, "celsius": True, "where": {}, "unit": "metric"}


class Weather(BaseModel):
    city: str
    days: int
    celsius: bool


class Clock(BaseModel):
    zone: str


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with _running(FakeLLMSettings(name="fake-tools")) as bound:
        yield bound


@pytest.fixture
def client(port: int) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=5
    )


def create(client: openai.OpenAI, **body: Any) -> ChatCompletion:
    result: ChatCompletion = client.chat.completions.create(
        **{"model": MODEL, "messages": HELLO, **body}
    )
    return result


def raw_stream(port: int, body: dict[str, Any], **headers: str) -> list[dict[str, Any]]:
    """The JSON of each data event of a streamed answer ([DONE] checked and left out)."""
    status, _, payload = _http(
        port,
        "/v1/chat/completions",
        method="POST",
        body=orjson.dumps({"model": MODEL, "messages": HELLO, "stream": True, **body}),
        headers={"content-type": "application/json", **headers},
    )
    assert status == 200
    events = payload.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    return [json.loads(event.removeprefix(b"data: ")) for event in events[:-2]]


def estimate(arguments: list[str]) -> int:
    return max(1, (sum(len(a.encode()) for a in arguments) + 3) // 4)


# -- answers -------------------------------------------------------------------------------------


def test_a_forced_call(client: openai.OpenAI) -> None:
    completion = create(
        client,
        tools=[TIME, WEATHER],
        tool_choice={"type": "function", "function": {"name": "weather"}},
    )
    assert completion.object == "chat.completion" and completion.model == MODEL
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.role == "assistant" and choice.message.content is None
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > 10
    assert call.function.name == "weather"
    arguments = call.function.arguments
    assert json.loads(arguments) == WEATHER_ARGS
    assert completion.usage is not None
    assert completion.usage.completion_tokens == estimate([arguments])
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + estimate([arguments])


def test_required_calls_the_first_tool(client: openai.OpenAI) -> None:
    completion = create(client, tools=[TIME, WEATHER], tool_choice="required")
    [call] = completion.choices[0].message.tool_calls or []
    assert call.function.name == "local-time"  # type: ignore[union-attr]
    assert call.function.arguments == "{}"  # type: ignore[union-attr]
    assert completion.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("choice", [None, "auto", "none"])
def test_a_choice_that_forces_nothing_is_answered_with_text(
    client: openai.OpenAI, choice: str | None
) -> None:
    extra = {} if choice is None else {"tool_choice": choice}
    completion = create(client, tools=[WEATHER], **extra)
    message = completion.choices[0].message
    assert message.tool_calls is None and message.content
    assert completion.choices[0].finish_reason == "stop"


def test_a_streamed_call_as_openai_streams_it(port: int) -> None:
    body = {
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "stream_options": {"include_usage": True},
    }
    *chunks, finish, usage = raw_stream(port, body)
    assert all(c["object"] == "chat.completion.chunk" for c in [*chunks, finish, usage])
    assert len({c["id"] for c in [*chunks, finish, usage]}) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks]
    # The first: the role and the call's id and name, its arguments empty.
    first = deltas[0]
    assert first["role"] == "assistant" and first["content"] is None
    [start] = first["tool_calls"]
    assert start["index"] == 0 and start["type"] == "function"
    assert start["id"].startswith("call_")
    assert start["function"] == {"name": "weather", "arguments": ""}
    # Then the arguments, in about three pieces.
    pieces = deltas[1:]
    assert len(pieces) == 3
    assert all(set(d) == {"tool_calls"} for d in pieces)
    assert all(d["tool_calls"][0].keys() == {"index", "function"} for d in pieces)
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in pieces)
    assert json.loads(arguments) == WEATHER_ARGS
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert all(c["usage"] is None for c in [*chunks, finish])
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == estimate([arguments])


def test_a_streamed_call_without_usage(port: int) -> None:
    chunks = raw_stream(port, {"tools": [TIME], "tool_choice": "required"})
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all("usage" not in chunk for chunk in chunks)
    # "{}" in two pieces.
    assert len(chunks) == 1 + 2 + 1


def test_the_sdks_stream_accumulates_a_forced_call(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model=MODEL,
        messages=HELLO,
        tools=[openai.pydantic_function_tool(Weather, name="weather")],
        tool_choice={"type": "function", "function": {"name": "weather"}},
        stream_options={"include_usage": True},
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.delta" in kinds
    assert "tool_calls.function.arguments.done" in kinds
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.function.name == "weather"
    assert call.function.parsed_arguments == Weather(city="fake", days=1, celsius=True)
    assert final.usage is not None
    assert final.usage.completion_tokens == estimate([call.function.arguments])


def test_a_stream_of_required_call(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model=MODEL,
        messages=HELLO,
        tools=[openai.pydantic_function_tool(Clock), openai.pydantic_function_tool(Weather)],
        tool_choice="required",
    ) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls or []
    assert call.function.name == "Clock"
    assert call.function.parsed_arguments == Clock(zone="fake")


# -- parallel calls ------------------------------------------------------------------------------

PARALLEL = {"x-fake-parallel-tools": "3"}


def test_parallel_calls_cycle_through_the_tools(client: openai.OpenAI) -> None:
    completion = create(
        client, tools=[WEATHER, TIME], tool_choice="required", extra_headers=PARALLEL
    )
    calls = completion.choices[0].message.tool_calls or []
    names = [call.function.name for call in calls]  # type: ignore[union-attr]
    assert names == ["weather", "local-time", "weather"]
    assert len({call.id for call in calls}) == 3
    arguments = [call.function.arguments for call in calls]  # type: ignore[union-attr]
    assert [json.loads(a) for a in arguments] == [WEATHER_ARGS, {}, WEATHER_ARGS]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == estimate(arguments)


def test_parallel_calls_of_a_named_function(client: openai.OpenAI) -> None:
    completion = create(
        client,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "local-time"}},
        extra_headers={"x-fake-parallel-tools": "2"},
    )
    calls = completion.choices[0].message.tool_calls or []
    assert [call.function.name for call in calls] == ["local-time"] * 2  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "headers"),
    [
        ({"parallel_tool_calls": False}, PARALLEL),
        ({}, {"x-fake-parallel-tools": "1"}),
        ({}, {"x-fake-parallel-tools": "0"}),
    ],
    ids=["parallel-tool-calls-false", "one", "zero"],
)
def test_one_call_unless_parallel(
    client: openai.OpenAI, extra: dict[str, Any], headers: dict[str, str]
) -> None:
    completion = create(
        client, tools=[WEATHER, TIME], tool_choice="required", extra_headers=headers, **extra
    )
    assert len(completion.choices[0].message.tool_calls or []) == 1


def test_the_sdks_stream_accumulates_parallel_calls(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model=MODEL,
        messages=HELLO,
        tools=[openai.pydantic_function_tool(Weather), openai.pydantic_function_tool(Clock)],
        tool_choice="required",
        parallel_tool_calls=True,
        extra_headers=PARALLEL,
    ) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert [call.function.name for call in calls] == ["Weather", "Clock", "Weather"]
    assert [call.function.parsed_arguments for call in calls] == [
        Weather(city="fake", days=1, celsius=True),
        Clock(zone="fake"),
        Weather(city="fake", days=1, celsius=True),
    ]
    assert final.choices[0].finish_reason == "tool_calls"


def test_parallel_calls_streamed_each_from_its_own_start(port: int) -> None:
    chunks = raw_stream(
        port,
        {"tools": [WEATHER, TIME], "tool_choice": "required"},
        **{"x-fake-parallel-tools": "2"},
    )
    calls = [d for c in chunks[:-1] for d in c["choices"][0]["delta"]["tool_calls"]]
    starts = [d for d in calls if "id" in d]
    assert [(d["index"], d["function"]["name"]) for d in starts] == [
        (0, "weather"),
        (1, "local-time"),
    ]
    assert "role" not in chunks[1 + 3]["choices"][0]["delta"]  # the second call's start
    assert chunks[1 + 3]["choices"][0]["delta"]["tool_calls"][0]["id"] == starts[1]["id"]
    by_index = [
        "".join(d["function"]["arguments"] for d in calls if d["index"] == i) for i in (0, 1)
    ]
    assert [json.loads(a) for a in by_index] == [WEATHER_ARGS, {}]


def test_an_invalid_parallel_header_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        create(client, extra_headers={"x-fake-parallel-tools": "many"})
    assert caught.value.code == "invalid_fake_header"


# -- a conversation ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "streamed"])
def test_a_two_turn_conversation(client: openai.OpenAI, stream: bool) -> None:
    forced: Any = {"type": "function", "function": {"name": "weather"}}
    tools = [openai.pydantic_function_tool(Weather, name="weather")]
    messages: list[Any] = list(HELLO)

    def turn() -> Any:
        if not stream:
            return client.chat.completions.create(
                model=MODEL, messages=messages, tools=tools, tool_choice=forced
            )
        with client.chat.completions.stream(
            model=MODEL, messages=messages, tools=tools, tool_choice=forced
        ) as events:
            return events.get_final_completion()

    first = turn()
    assert first.choices[0].finish_reason == "tool_calls"
    [call] = first.choices[0].message.tool_calls
    # The assistant's message and the tool's result.
    function = {"name": call.function.name, "arguments": call.function.arguments}
    messages.append(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call.id, "type": "function", "function": function}],
        }
    )
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "18 C"})
    second = turn()
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content and second.choices[0].message.tool_calls in (None, [])
    # And the conversation goes on.
    messages.append({"role": "assistant", "content": second.choices[0].message.content})
    messages.append({"role": "user", "content": "And tomorrow?"})
    third = turn()
    assert third.choices[0].finish_reason == "tool_calls"


def test_a_turn_of_parallel_calls_answered_in_any_order(client: openai.OpenAI) -> None:
    calls = [
        {"id": f"call_{n}", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
        for n in "abc"
    ]
    messages = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_c", "content": "1"},
        {"role": "tool", "tool_call_id": "call_a", "content": "2"},
        {"role": "tool", "tool_call_id": "call_b", "content": "3"},
    ]
    completion = create(client, messages=messages, tools=[WEATHER], tool_choice="required")
    assert completion.choices[0].finish_reason == "stop"


# -- what OpenAI refuses -------------------------------------------------------------------------


def call(call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "weather", "arguments": "{}"}}


def assistant(*ids: str) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [call(i) for i in ids]}


def result(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "18 C"}


USER: Any = HELLO[0]
NAMED = {"type": "function", "function": {"name": "weather"}}
ANSWERED_BY_NONE = "must be a response to a preceeding message with 'tool_calls'"
UNANSWERED = "must be followed by tool messages responding to each 'tool_call_id'"


def with_call(**changes: Any) -> list[dict[str, Any]]:
    return [USER, {**assistant("call_1"), "tool_calls": [{**call("call_1"), **changes}]}]


def with_function(**changes: Any) -> list[dict[str, Any]]:
    return with_call(function={"name": "weather", "arguments": "{}", **changes})


def function(**fields: Any) -> dict[str, Any]:
    return {"tools": [{"type": "function", "function": fields}]}


REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    # tools
    ("tools-not-a-list", {"tools": WEATHER}, "tools", "expected an array"),
    ("tools-empty", {"tools": []}, "tools", "empty array"),
    ("tool-not-an-object", {"tools": ["weather"]}, "tools[0]", "expected an object"),
    ("tool-type", {"tools": [{**WEATHER, "type": "custom"}]}, "tools[0].type", "'function'"),
    ("tool-no-function", {"tools": [{"type": "function"}]}, "tools[0].function", "Missing"),
    ("tool-extra-field", {"tools": [{**WEATHER, "name": "x"}]}, "tools[0].name", "Unknown"),
    ("name-missing", function(description="x"), "tools[0].function.name", "Missing"),
    ("name-pattern", function(name="get weather"), "tools[0].function.name", "pattern"),
    ("name-empty", function(name=""), "tools[0].function.name", "pattern"),
    ("name-too-long", function(name="w" * 65), "tools[0].function.name", "maximum length 64"),
    ("name-not-a-string", function(name=5), "tools[0].function.name", "a string"),
    (
        "description",
        {"tools": [{"type": "function", "function": {"name": "w", "description": 1}}]},
        "tools[0].function.description",
        "a string",
    ),
    (
        "parameters",
        {"tools": [{"type": "function", "function": {"name": "w", "parameters": "{}"}}]},
        "tools[0].function.parameters",
        "an object",
    ),
    (
        "strict",
        {"tools": [{"type": "function", "function": {"name": "w", "strict": "yes"}}]},
        "tools[0].function.strict",
        "a boolean",
    ),
    (
        "function-extra-field",
        {"tools": [{"type": "function", "function": {"name": "w", "input_schema": {}}}]},
        "tools[0].function.input_schema",
        "Unknown",
    ),
    # tool_choice
    ("choice-without-tools", {"tool_choice": "auto"}, "tool_choice", "only allowed when"),
    ("choice-unknown", {"tools": [WEATHER], "tool_choice": "any"}, "tool_choice", "'required'"),
    ("choice-number", {"tools": [WEATHER], "tool_choice": 1}, "tool_choice", "expected"),
    (
        "choice-no-such-tool",
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
        "tool_choice",
        "'x'",
    ),
    (
        "choice-type",
        {"tools": [WEATHER], "tool_choice": {"type": "tool", "function": {"name": "weather"}}},
        "tool_choice.type",
        "'function'",
    ),
    (
        "choice-no-name",
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {}}},
        "tool_choice.function.name",
        "Missing",
    ),
    (
        "choice-anthropic-shape",
        {"tools": [WEATHER], "tool_choice": {"type": "function", "name": "weather"}},
        "tool_choice.name",
        "Unknown",
    ),
    (
        "parallel-not-a-boolean",
        {"tools": [WEATHER], "parallel_tool_calls": "yes"},
        "parallel_tool_calls",
        "a boolean",
    ),
    # tool turns
    ("tool-first", {"messages": [result("call_1")]}, "messages.[0].role", ANSWERED_BY_NONE),
    (
        "tool-after-user",
        {"messages": [USER, result("call_1")]},
        "messages.[1].role",
        ANSWERED_BY_NONE,
    ),
    (
        "tool-answers-another-call",
        {"messages": [USER, assistant("call_1"), result("call_1"), result("call_2")]},
        "messages.[3].role",
        ANSWERED_BY_NONE,
    ),
    (
        "tool-answers-an-earlier-turn",
        {
            "messages": [
                USER,
                assistant("call_1"),
                result("call_1"),
                USER,
                assistant("call_2"),
                result("call_1"),
            ]
        },
        "messages.[5].role",
        ANSWERED_BY_NONE,
    ),
    (
        "tool-no-call-id",
        {"messages": [USER, assistant("call_1"), {"role": "tool", "content": "x"}]},
        "messages.[2].tool_call_id",
        "Missing",
    ),
    (
        "call-unanswered",
        {"messages": [USER, assistant("call_1", "call_2"), result("call_1"), USER]},
        "messages.[1].role",
        f"{UNANSWERED}. The following tool_call_ids did not have response messages: call_2",
    ),
    (
        "call-unanswered-at-the-end",
        {"messages": [USER, assistant("call_1")]},
        "messages.[1].role",
        "call_1",
    ),
    (
        "call-answered-after-a-user-message",
        {"messages": [USER, assistant("call_1"), USER, result("call_1")]},
        "messages.[1].role",
        UNANSWERED,
    ),
    (
        "call-no-id",
        {"messages": [USER, {**assistant(), "tool_calls": [{"type": "function"}]}]},
        "messages.[1].tool_calls.[0].id",
        "Missing",
    ),
    (
        "call-type",
        {"messages": with_call(type="custom")},
        "messages.[1].tool_calls.[0].type",
        "'function'",
    ),
    (
        "call-no-name",
        {"messages": with_call(function={"arguments": "{}"})},
        "messages.[1].tool_calls.[0].function.name",
        "Missing",
    ),
    (
        "call-arguments-an-object",
        {"messages": with_function(arguments={"city": "Paris"})},
        "messages.[1].tool_calls.[0].function.arguments",
        "expected a string, but got an object",
    ),
    (
        "call-no-arguments",
        {"messages": with_call(function={"name": "weather"})},
        "messages.[1].tool_calls.[0].function.arguments",
        "Missing",
    ),
    (
        "tool-calls-empty",
        {"messages": [USER, {"role": "assistant", "tool_calls": []}]},
        "messages.[1].tool_calls",
        "empty array",
    ),
]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
def test_what_openai_refuses_the_fake_refuses(
    client: openai.OpenAI, body: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": MODEL, "messages": HELLO, **body})
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    assert words in caught.value.message
    error = caught.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}


def test_refused_streams_are_refused_before_streaming(client: openai.OpenAI) -> None:
    messages: list[Any] = [USER, assistant("call_1")]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=messages, stream=True)
    assert caught.value.param == "messages.[1].role"


# -- the rest of the fake, unchanged -------------------------------------------------------------


def test_faults_and_pacing_apply_to_calls(client: openai.OpenAI) -> None:
    forced: Any = {"tools": [WEATHER], "tool_choice": NAMED}
    with pytest.raises(openai.RateLimitError):
        create(client, **forced, extra_headers={"x-fake-fault": "429"})
    received = []
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        stream=True,
        **forced,
        extra_headers={"x-fake-fault": "reset-after:2"},
    )
    with pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            received.append(chunk)
    assert 1 <= len(received) <= 2 and received[0].choices[0].delta.tool_calls
    # Four chunks of calls (the start and three pieces), 20 a second: ~150 ms after the first.
    started = time.monotonic()
    create(client, **forced, extra_headers={"x-fake-tokens-per-second": "20"})
    assert time.monotonic() - started >= 0.14


def test_no_usage_and_reasoning_headers_apply_to_calls(client: openai.OpenAI) -> None:
    forced: Any = {"tools": [WEATHER], "tool_choice": NAMED}
    assert create(client, **forced, extra_headers={"x-fake-no-usage": "1"}).usage is None
    usage = create(client, **forced, extra_headers={"x-fake-reasoning-tokens": "2"}).usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 2


def test_a_safety_model_answers_its_verdict(client: openai.OpenAI) -> None:
    completion = create(
        client, model="meta-llama/Llama-Guard-3-8B", tools=[WEATHER], tool_choice=NAMED
    )
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].message.content == "\n\nsafe"
