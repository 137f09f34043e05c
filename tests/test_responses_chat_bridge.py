"""OpenAI's Responses API served by a chat completions backend
(extproc/wire/responses/chat_bridge.py): the request to chat completions, the chat completion
back to a Response object, the chunk stream back to the Responses events (split at every byte),
errors. The Responses side is checked with the official SDK's own types, and the SDK itself
reads the translated answers and streams through a mock transport."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import orjson
import pytest
from openai import OpenAI
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from extproc.errors import GatewayError
from extproc.wire.base import ChatBridge, ClientStream, Endpoint, Operation
from extproc.wire.responses import chat_bridge
from extproc.wire.responses.chat_bridge import BRIDGE, ResponsesBridge, ResponsesStream

ENDPOINT = Endpoint(Operation.CHAT, "/v1/responses")
MODEL = "qwen3"
PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAW"
    "jR9awAAAABJRU5ErkJggg=="
)
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {
    "type": "function",
    "name": "weather",
    "description": "The weather in a city",
    "parameters": CITY,
    "strict": True,
}
CHAT_WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": CITY,
        "strict": True,
    },
}
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def translate(**body: Any) -> dict[str, Any]:
    return BRIDGE.request(ENDPOINT, {"model": MODEL, "input": "hi", **body})


def refused(body: dict[str, Any]) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        BRIDGE.request(ENDPOINT, {"model": MODEL, "input": "hi", **body})
    assert caught.value.status == 400
    return caught.value


def test_it_is_a_chat_bridge() -> None:
    bridge: ChatBridge = BRIDGE
    stream: ClientStream = BRIDGE.stream(MODEL, 10)
    assert isinstance(BRIDGE, ResponsesBridge) and isinstance(stream, ResponsesStream)
    assert bridge is BRIDGE


# -- the request ----------------------------------------------------------------------------------


def test_a_string_input_with_instructions_and_the_sampling_parameters() -> None:
    chat = translate(
        instructions="Be brief.",
        max_output_tokens=300,
        temperature=0.2,
        top_p=0.9,
        user="jane",
        parallel_tool_calls=False,
        stream=True,
    )
    assert chat == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
        ],
        "max_completion_tokens": 300,
        "temperature": 0.2,
        "top_p": 0.9,
        "user": "jane",
        "parallel_tool_calls": False,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_nulls_are_unset_and_a_non_stream_asks_nothing() -> None:
    chat = translate(
        instructions=None, temperature=None, stream=False, tools=None, previous_response_id=None
    )
    assert chat == {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def test_message_items_of_every_role_and_part() -> None:
    chat = translate(
        input=[
            {"role": "system", "content": "Be brief."},
            {"type": "message", "role": "developer", "content": [
                {"type": "input_text", "text": "Use tools."},
            ]},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "What is this?"},
                {"type": "input_image", "image_url": PNG, "detail": "low"},
                {"type": "input_image", "image_url": "https://example.com/a.jpg", "detail": None},
                {"type": "input_file", "file_data": "data:application/pdf;base64,JVBE",
                 "filename": "a.pdf"},
            ]},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [
                 {"type": "output_text", "text": "A picture ", "annotations": []},
                 {"type": "output_text", "text": "and a file.", "annotations": []},
             ]},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "No more."}]},
            {"role": "user", "content": "Thanks"},
        ]
    )  # fmt: skip
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "Use tools."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                {
                    "type": "file",
                    "file": {"file_data": "data:application/pdf;base64,JVBE", "filename": "a.pdf"},
                },
            ],
        },
        {"role": "assistant", "content": "A picture and a file."},
        {"role": "assistant", "content": "No more."},
        {"role": "user", "content": "Thanks"},
    ]


def test_multi_turn_function_calling() -> None:
    """A previous answer handed back as it came (reasoning, text, two calls) with the calls'
    outputs, then a second round of calls without text."""
    chat = translate(
        instructions="Use tools.",
        tools=[WEATHER],
        tool_choice="required",
        input=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"type": "reasoning", "id": "rs_1", "summary": [
                {"type": "summary_text", "text": "Two cities."},
            ]},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "weather",
             "arguments": '{"city": "Paris"}', "status": "completed"},
            {"type": "function_call", "id": "fc_2", "call_id": "call_2", "name": "weather",
             "arguments": '{"city": "Rome"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
            {"type": "function_call_output", "call_id": "call_2",
             "output": [{"type": "input_text", "text": "24 C"}]},
            {"type": "reasoning", "id": "rs_2", "summary": []},
            {"type": "function_call", "call_id": "call_3", "name": "weather",
             "arguments": '{"city": "Oslo"}'},
            {"type": "function_call_output", "call_id": "call_3", "output": "-2 C"},
            {"role": "user", "content": "Thanks"},
        ],
    )  # fmt: skip
    assert chat["messages"] == [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "24 C"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_3",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_3", "content": "-2 C"},
        {"role": "user", "content": "Thanks"},
    ]
    assert chat["tools"] == [CHAT_WEATHER]
    assert chat["tool_choice"] == "required"


def test_calls_then_their_text_make_one_assistant_message() -> None:
    chat = translate(
        input=[
            {"role": "user", "content": "Paris?"},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
            {"role": "assistant", "content": "Looking."},
            {"role": "assistant", "content": ""},
            {"type": "function_call", "call_id": "c2", "name": "weather", "arguments": "{}"},
        ]
    )
    calls = [
        {"id": c, "type": "function", "function": {"name": "weather", "arguments": "{}"}}
        for c in ("c1", "c2")
    ]
    assert chat["messages"][1:] == [
        {"role": "assistant", "content": "Looking.", "tool_calls": calls[:1]},
        {"role": "assistant", "content": None, "tool_calls": calls[1:]},
    ]


def test_tools_tool_choice_text_format_and_reasoning() -> None:
    bare = {"type": "function", "name": "now", "parameters": None, "strict": None}
    chat = translate(
        tools=[WEATHER, bare],
        tool_choice={"type": "function", "name": "weather"},
        text={
            "format": {
                "type": "json_schema",
                "name": "city",
                "schema": CITY,
                "strict": True,
                "description": "A city",
            },
            "verbosity": "low",
        },
        reasoning={"effort": "high", "summary": "auto"},
    )
    assert chat["tools"] == [CHAT_WEATHER, {"type": "function", "function": {"name": "now"}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": CITY, "description": "A city", "strict": True},
    }
    assert chat["verbosity"] == "low"
    assert chat["reasoning_effort"] == "high"
    for choice in ("auto", "none", "required"):
        assert translate(tool_choice=choice)["tool_choice"] == choice
    assert translate(text={"format": {"type": "json_object"}})["response_format"] == {
        "type": "json_object"
    }
    assert "response_format" not in translate(text={"format": {"type": "text"}})
    assert "reasoning_effort" not in translate(reasoning={"summary": "detailed"})


def test_what_changes_nothing_is_dropped() -> None:
    chat = translate(
        metadata={"a": "b"},
        store=True,
        truncation="auto",
        include=["reasoning.encrypted_content"],
        service_tier="flex",
        stream_options={"include_obfuscation": False},
        max_tool_calls=3,
        prompt_cache_key="k",
        prompt_cache_retention="24h",
        safety_identifier="u1",
        background=False,
        top_logprobs=0,
    )
    assert chat == {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert "truncation" not in translate(truncation="disabled")


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"previous_response_id": "resp_1"}, "unsupported_parameter", "previous_response_id"),
        ({"conversation": "conv_1"}, "unsupported_parameter", "conversation"),
        ({"conversation": {"id": "conv_1"}}, "unsupported_parameter", "conversation"),
        ({"background": True}, "unsupported_parameter", "background"),
        ({"prompt": {"id": "pmpt_1"}}, "unsupported_parameter", "prompt"),
        ({"context_management": [{"type": "compaction"}]}, "unsupported_parameter",
         "context_management"),
        ({"top_logprobs": 5}, "unsupported_parameter", "top_logprobs"),
        ({"frequency_penalty": 0.5}, "unsupported_parameter", "frequency_penalty"),
        ({"messages": []}, "unsupported_parameter", "messages"),
        ({"tools": [{"type": "web_search"}]}, "unsupported_value", "tools[0].type"),
        ({"tools": [WEATHER, {"type": "file_search", "vector_store_ids": ["vs"]}]},
         "unsupported_value", "tools[1].type"),
        ({"tools": [{"type": "mcp", "server_label": "x"}]}, "unsupported_value", "tools[0].type"),
        ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]},
         "unsupported_value", "tools[0].type"),
        ({"tools": [{"type": "image_generation"}]}, "unsupported_value", "tools[0].type"),
        ({"tools": [{"type": "computer_use_preview"}]}, "unsupported_value", "tools[0].type"),
        ({"tools": [{"type": "custom", "name": "x"}]}, "unsupported_value", "tools[0].type"),
        ({"tools": [{**WEATHER, "output_schema": {}}]}, "unsupported_parameter",
         "tools[0].output_schema"),
        ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}},
         "unsupported_value", "tool_choice"),
        ({"tool_choice": {"type": "web_search_preview"}}, "unsupported_value", "tool_choice"),
        ({"tool_choice": "any"}, "invalid_value", "tool_choice"),
        ({"truncation": "sometimes"}, "invalid_value", "truncation"),
        ({"text": {"format": {"type": "yaml"}}}, "invalid_value", "text.format.type"),
        ({"reasoning": {"context": "all_turns"}}, "unsupported_parameter", "reasoning.context"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "unsupported_value",
         "input[0].type"),
        ({"input": [{"id": "msg_1"}]}, "unsupported_value", "input[0].type"),
        ({"input": [{"role": "user", "content": "a"}, {"type": "web_search_call", "id": "ws"}]},
         "unsupported_value", "input[1].type"),
        ({"input": [{"type": "computer_call_output", "call_id": "c", "output": {}}]},
         "unsupported_value", "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
         "unsupported_value", "input[0].content[0].file_id"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
         "unsupported_value", "input[0].content[0].file_id"),
        ({"input": [{"role": "user", "content": [
            {"type": "input_text", "text": "a"},
            {"type": "input_file", "file_url": "https://example.com/a.pdf"},
        ]}]}, "unsupported_value", "input[0].content[1].file_url"),
        ({"input": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         "unsupported_value", "input[0].content[0].type"),
        ({"input": [{"role": "system", "content": [{"type": "input_image", "image_url": PNG}]}]},
         "unsupported_value", "input[0].content[0].type"),
        ({"input": [{"role": "assistant", "content": [{"type": "input_image", "image_url": PNG}]}]},
         "unsupported_value", "input[0].content[0].type"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": [
            {"type": "input_image", "image_url": PNG},
        ]}]}, "unsupported_value", "input[0].output[0].type"),
        ({"input": [{"role": "tool", "content": "x"}]}, "invalid_value", "input[0].role"),
        ({"input": [{"content": "x"}]}, "missing_required_parameter", "input[0].type"),
        ({"max_output_tokens": 0}, "integer_below_min_value", "max_output_tokens"),
        ({"max_output_tokens": "9"}, "invalid_type", "max_output_tokens"),
        ({"temperature": "hot"}, "invalid_type", "temperature"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]},
         "invalid_type", "input[0].arguments"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "invalid_type",
         "input[0].call_id"),
        ({"input": [7]}, "invalid_type", "input[0]"),
        ({"input": []}, "invalid_type", "input"),
        ({"tools": [{"type": "function"}]}, "invalid_type", "tools[0].name"),
    ],
)  # fmt: skip
def test_what_chat_cannot_carry_is_refused_naming_it(
    body: dict[str, Any], code: str, param: str
) -> None:
    err = refused(body)
    assert (err.code, err.param) == (code, param), err.message


def test_the_refusals_say_why() -> None:
    assert "no conversation state" in refused({"previous_response_id": "resp_1"}).message
    assert (
        "file store"
        in refused(
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}
        ).message
    )


def _mutations(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every place in a body, and the junk to put there."""
    junk = [None, 0, -1, 1.5, True, "x", "", [], [1], {}, {"type": "x"}]
    if path:
        for j in junk:
            yield path, j
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _mutations(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _mutations(item, (*path, i))


def _mutated(body: Any, path: tuple[Any, ...], junk: Any) -> Any:
    if not path:
        return junk
    copy = body.copy()
    copy[path[0]] = _mutated(body[path[0]], path[1:], junk)
    return copy


def test_a_body_of_any_shape_is_translated_or_refused_never_a_crash() -> None:
    body = {
        "model": MODEL,
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [
                {"type": "input_text", "text": "hi"},
                {"type": "input_image", "image_url": PNG, "detail": "auto"},
                {"type": "input_file", "file_data": "data:application/pdf;base64,JVBE"},
            ]},
            {"type": "function_call", "call_id": "c", "name": "weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": [
                {"type": "input_text", "text": "18 C"},
            ]},
            {"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": "ok", "annotations": []},
            ]},
        ],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "weather"},
        "text": {"format": {"type": "json_schema", "name": "n", "schema": CITY}},
        "reasoning": {"effort": "low"},
        "max_output_tokens": 10,
        "temperature": 1,
        "stream": True,
    }  # fmt: skip
    BRIDGE.request(ENDPOINT, body)
    tried = 0
    for path, junk in _mutations(body):
        if path == ("model",):
            continue  # validated before the bridge
        tried += 1
        try:
            out = BRIDGE.request(ENDPOINT, _mutated(body, path, junk))
        except GatewayError as err:
            assert err.status == 400
        else:
            assert isinstance(out, dict) and out["messages"]
    assert tried > 300


# -- the answer -----------------------------------------------------------------------------------

USAGE = {
    "prompt_tokens": 30,
    "completion_tokens": 12,
    "total_tokens": 42,
    "prompt_tokens_details": {"cached_tokens": 8},
    "completion_tokens_details": {"reasoning_tokens": 5},
}
RESPONSES_USAGE = {
    "input_tokens": 30,
    "input_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 0},
    "output_tokens": 12,
    "output_tokens_details": {"reasoning_tokens": 5},
    "total_tokens": 42,
}


def completion(
    message: dict[str, Any], finish: str = "stop", usage: dict[str, Any] | None = USAGE
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "served-name",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", **message},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def validated(answer: dict[str, Any]) -> Response:
    response = Response.model_validate(answer)
    assert orjson.loads(orjson.dumps(answer)) == answer  # JSON as it is
    return response


def test_a_text_answer() -> None:
    answer = BRIDGE.answer(completion({"content": "Hello there."}), MODEL)
    response = validated(answer)
    assert response.output_text == "Hello there."
    assert re.fullmatch(r"resp_[0-9a-f]{32}", answer["id"])
    assert answer["object"] == "response" and answer["model"] == MODEL
    assert answer["created_at"] == 1700000000
    assert answer["status"] == "completed" and isinstance(answer["completed_at"], int)
    assert answer["error"] is None and answer["incomplete_details"] is None
    assert answer["store"] is False
    assert answer["usage"] == RESPONSES_USAGE
    [message] = answer["output"]
    assert re.fullmatch(r"msg_[0-9a-f]{32}", message.pop("id"))
    assert message == {
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [
            {"type": "output_text", "text": "Hello there.", "annotations": [], "logprobs": []}
        ],
    }
    # The request's echoes, the API's defaults without the body.
    assert {k: answer[k] for k in ("tools", "tool_choice", "parallel_tool_calls", "text")} == {
        "tools": [],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "text": {"format": {"type": "text"}},
    }
    assert answer["metadata"] == {} and answer["instructions"] is None


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_text_and_tool_calls(field: str) -> None:
    calls = [
        {"id": "call_1", "type": "function",
         "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "weather", "arguments": '{"city": "Rome"}'}},
    ]  # fmt: skip
    answer = BRIDGE.answer(
        completion(
            {field: "Two cities.", "content": "Looking.", "tool_calls": calls}, "tool_calls"
        ),
        MODEL,
    )
    response = validated(answer)
    assert [item["type"] for item in answer["output"]] == [
        "reasoning",
        "message",
        "function_call",
        "function_call",
    ]
    reasoning = answer["output"][0]
    assert re.fullmatch(r"rs_[0-9a-f]{32}", reasoning["id"])
    assert reasoning["summary"] == [{"type": "summary_text", "text": "Two cities."}]
    first = answer["output"][2]
    assert re.fullmatch(r"fc_[0-9a-f]{32}", first.pop("id"))
    assert first == {
        "type": "function_call",
        "call_id": "call_1",
        "name": "weather",
        "arguments": '{"city": "Paris"}',
        "status": "completed",
    }
    assert response.output_text == "Looking."
    assert answer["status"] == "completed"


def test_a_tool_call_alone() -> None:
    call = {"id": "call_9", "type": "function", "function": {"name": "now", "arguments": "{}"}}
    answer = BRIDGE.answer(
        completion({"content": None, "tool_calls": [call], "reasoning_content": ""}, "tool_calls"),
        MODEL,
    )
    validated(answer)
    assert [(i["type"], i.get("call_id")) for i in answer["output"]] == [
        ("function_call", "call_9")
    ]


@pytest.mark.parametrize(
    ("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")]
)
def test_a_cut_answer_is_incomplete(finish: str, reason: str) -> None:
    answer = BRIDGE.answer(completion({"content": "Once upon"}, finish), MODEL)
    validated(answer)
    assert answer["status"] == "incomplete"
    assert answer["incomplete_details"] == {"reason": reason}
    assert answer["completed_at"] is None
    assert answer["output"][0]["status"] == "incomplete"


def test_a_refusal_an_empty_answer_and_no_usage() -> None:
    answer = BRIDGE.answer(completion({"content": None, "refusal": "I can't."}, usage=None), MODEL)
    validated(answer)
    assert answer["output"][0]["content"] == [{"type": "refusal", "refusal": "I can't."}]
    assert answer["usage"] is None
    empty = BRIDGE.answer(completion({"content": ""}), MODEL)
    assert validated(empty).output_text == ""
    assert empty["output"][0]["content"][0]["text"] == ""
    # Not a chat completion's shape: still an answer, never a crash.
    validated(BRIDGE.answer({"choices": [{"message": "x", "finish_reason": {}}]}, MODEL))
    validated(BRIDGE.answer({"choices": "x", "usage": {"prompt_tokens": "1"}}, MODEL))


REQUEST: dict[str, Any] = {
    "model": MODEL,
    "instructions": "Be brief.",
    "input": "Weather in Paris?",
    "tools": [WEATHER],
    "tool_choice": {"type": "function", "name": "weather"},
    "temperature": 0.3,
    "top_p": 0.8,
    "max_output_tokens": 200,
    "parallel_tool_calls": False,
    "text": {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}},
    "reasoning": {"effort": "low", "summary": "auto"},
    "metadata": {"trace": "t1"},
    "truncation": "auto",
    "user": "jane",
    "store": True,
}


def test_answer_for_repeats_the_request() -> None:
    answer = BRIDGE.answer(completion({"content": '{"city": "Paris"}'}), MODEL, REQUEST)
    response = validated(answer)
    assert {k: answer[k] for k in (
        "instructions", "temperature", "top_p", "max_output_tokens", "parallel_tool_calls",
        "tool_choice", "metadata", "truncation", "user", "store", "reasoning",
    )} == {
        "instructions": "Be brief.",
        "temperature": 0.3,
        "top_p": 0.8,
        "max_output_tokens": 200,
        "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "name": "weather"},
        "metadata": {"trace": "t1"},
        "truncation": "auto",
        "user": "jane",
        "store": False,  # asked, but nothing keeps it
        "reasoning": {"effort": "low", "summary": "auto"},
    }  # fmt: skip
    assert answer["tools"] == [WEATHER]
    assert answer["text"] == {"format": REQUEST["text"]["format"]}
    assert response.tools[0].name == "weather"  # type: ignore[union-attr]


# -- the event stream -----------------------------------------------------------------------------


def chunk(
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "served-name",
        "choices": [] if delta is None else [
            {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        ],
    }  # fmt: skip
    if usage is not None:
        body["usage"] = usage
    return b"data: " + orjson.dumps(body) + b"\n\n"


DONE = b"data: [DONE]\n\n"
TEXT_STREAM = (
    chunk({"role": "assistant", "content": ""})
    + chunk({"content": "Hel"})
    + chunk({"content": "lo é"})
    + chunk({}, "stop")
    + chunk(usage=USAGE)
    + DONE
)
TOOLS_STREAM = (
    chunk({"role": "assistant", "content": ""})
    + chunk({"reasoning_content": "Two "})
    + chunk({"reasoning_content": "cities."})
    + chunk({"content": "Looking."})
    + chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                             "function": {"name": "weather", "arguments": ""}}]})
    + chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]})
    + chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]})
    + chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                             "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]})
    + chunk({}, "tool_calls")
    + chunk(usage=USAGE)
    + DONE
)  # fmt: skip


def events(raw: bytes) -> list[dict[str, Any]]:
    """The events of a Responses stream, each checked: framed `event: <type>` / `data:`, its
    type the data's, parsed by the SDK's ResponseStreamEvent."""
    out = []
    assert raw.endswith(b"\n\n") or not raw
    for block in raw.split(b"\n\n")[:-1]:
        name, data = block.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        event = orjson.loads(data[6:])
        assert event["type"] == name[7:].decode()
        EVENTS.validate_python(event)
        out.append(event)
    return out


def run(raw: bytes, stream: ResponsesStream | None = None) -> list[dict[str, Any]]:
    stream = stream or BRIDGE.stream(MODEL, 30)
    return events(stream.feed(raw) + stream.end())


def kinds(evs: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in evs]


_ID = re.compile(r"^(resp|msg|fc|rs|call)_[0-9a-f]{32}$")


def normalized(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events with their generated ids and times made the same for every stream."""
    ids: dict[str, str] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: 0 if k in ("created_at", "completed_at") and v else walk(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str) and _ID.match(value):
            return ids.setdefault(value, f"id{len(ids)}")
        return value

    return [walk(e) for e in evs]


def test_a_text_stream() -> None:
    evs = run(TEXT_STREAM)
    assert kinds(evs) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    created = Response.model_validate(evs[0]["response"])
    assert created.status == "in_progress" and created.output == [] and created.usage is None
    item_id = evs[2]["item"]["id"]
    assert evs[2]["item"] == {
        "type": "message",
        "id": item_id,
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    assert evs[4] == {
        "type": "response.output_text.delta",
        "sequence_number": 4,
        "item_id": item_id,
        "output_index": 0,
        "content_index": 0,
        "delta": "Hel",
        "logprobs": [],
    }
    assert evs[6]["text"] == "Hello é"
    assert evs[8]["item"]["status"] == "completed"
    final = evs[-1]["response"]
    response = Response.model_validate(final)
    assert response.output_text == "Hello é"
    assert final["id"] == evs[0]["response"]["id"]
    assert final["status"] == "completed" and final["usage"] == RESPONSES_USAGE
    assert final["output"] == [evs[8]["item"]]


def test_a_stream_split_anywhere_gives_the_same_events() -> None:
    for raw in (TEXT_STREAM, TOOLS_STREAM):
        whole = normalized(run(raw))
        for i in range(1, len(raw)):
            stream = BRIDGE.stream(MODEL, 30)
            out = stream.feed(raw[:i]) + stream.feed(raw[i:]) + stream.end()
            assert normalized(events(out)) == whole, i
        stream = BRIDGE.stream(MODEL, 30)
        out = b"".join(stream.feed(raw[i : i + 1]) for i in range(len(raw))) + stream.end()
        assert normalized(events(out)) == whole


def test_reasoning_text_and_two_calls_stream() -> None:
    evs = run(TOOLS_STREAM)
    assert kinds(evs) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",  # reasoning
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
        "response.output_item.added",  # message
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",  # call_1
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",  # call_2
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    assert [e.get("output_index") for e in evs[2:-1]] == [0] * 7 + [1] * 6 + [2] * 5 + [3] * 4
    assert evs[6]["text"] == "Two cities."
    added = evs[15]["item"]
    assert added["arguments"] == "" and added["status"] == "in_progress"
    assert (added["call_id"], added["name"]) == ("call_1", "weather")
    assert evs[18]["arguments"] == '{"city": "Paris"}'
    final = evs[-1]["response"]
    Response.model_validate(final)
    assert [i["type"] for i in final["output"]] == [
        "reasoning",
        "message",
        "function_call",
        "function_call",
    ]
    assert final["output"][0]["summary"] == [{"type": "summary_text", "text": "Two cities."}]
    assert [(i["call_id"], i["arguments"], i["status"]) for i in final["output"][2:]] == [
        ("call_1", '{"city": "Paris"}', "completed"),
        ("call_2", '{"city": "Rome"}', "completed"),
    ]
    # The stream's response is the answer's, item for item.
    answer = BRIDGE.answer(
        completion(
            {
                "reasoning_content": "Two cities.",
                "content": "Looking.",
                "tool_calls": [
                    {"id": f"call_{n}", "type": "function",
                     "function": {"name": "weather", "arguments": a}}
                    for n, a in ((1, '{"city": "Paris"}'), (2, '{"city": "Rome"}'))
                ],
            },
            "tool_calls",
        ),
        MODEL,
    )  # fmt: skip
    strip = normalized([{"o": answer["output"], "u": answer["usage"]}])
    assert strip == normalized([{"o": final["output"], "u": final["usage"]}])


def test_the_terminal_event_waits_for_the_usage_chunk() -> None:
    stream = BRIDGE.stream(MODEL, 30)
    before = events(stream.feed(chunk({"content": "Hi"}) + chunk({}, "stop")))
    assert kinds(before)[-1] == "response.output_item.done"  # closed, not yet completed
    after = stream.feed(chunk(usage=USAGE))
    [completed] = [e for e in events(after) if e["type"] == "response.completed"]
    assert completed["response"]["usage"] == RESPONSES_USAGE
    assert completed["sequence_number"] == len(before)
    assert stream.feed(DONE) == b"" and stream.end() == b""


def test_without_usage_the_end_or_done_completes_it() -> None:
    for tail in (DONE, b""):
        evs = run(chunk({"content": "Hi"}) + chunk({}, "stop") + tail)
        assert kinds(evs)[-1] == "response.completed"
        assert evs[-1]["response"]["usage"] is None
    # Usage in the finish chunk itself (some servers), then [DONE].
    evs = run(chunk({"content": "Hi"}) + chunk({}, "stop", USAGE) + DONE)
    assert evs[-1]["response"]["usage"] == RESPONSES_USAGE


def test_a_stream_cut_before_its_finish_ends_with_nothing() -> None:
    stream = BRIDGE.stream(MODEL, 30)
    assert kinds(events(stream.feed(chunk({"content": "Hi"}))))[-1] == "response.output_text.delta"
    assert stream.end() == b""
    assert BRIDGE.stream(MODEL, 30).end() == b""


@pytest.mark.parametrize(
    ("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")]
)
def test_a_cut_stream_is_incomplete(finish: str, reason: str) -> None:
    evs = run(chunk({"content": "Once upon"}) + chunk({}, finish) + chunk(usage=USAGE) + DONE)
    assert kinds(evs)[-2:] == ["response.output_item.done", "response.incomplete"]
    assert evs[-2]["item"]["status"] == "incomplete"
    final = evs[-1]["response"]
    Response.model_validate(final)
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": reason}


def test_an_empty_answer_streams_an_empty_message() -> None:
    evs = run(chunk({"role": "assistant", "content": ""}) + chunk({}, "stop") + DONE)
    assert kinds(evs) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert Response.model_validate(evs[-1]["response"]).output_text == ""


def test_a_refusal_streams_as_a_refusal_part() -> None:
    evs = run(chunk({"content": "Well. "}) + chunk({"refusal": "No."}) + chunk({}, "stop") + DONE)
    assert kinds(evs)[2:-1] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.content_part.added",
        "response.refusal.delta",
        "response.refusal.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert evs[-2]["item"]["content"] == [
        {"type": "output_text", "text": "Well. ", "annotations": [], "logprobs": []},
        {"type": "refusal", "refusal": "No."},
    ]
    assert evs[8]["content_index"] == 1


def test_a_call_named_after_its_first_delta() -> None:
    raw = (
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"arguments": ""}}]})
        + chunk({"tool_calls": [{"index": 0, "function": {"name": "weather"}}]})
        + chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})
        + chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]})  # never named
        + chunk({}, "tool_calls")
        + DONE
    )
    evs = run(raw)
    added = [e["item"] for e in evs if e["type"] == "response.output_item.added"]
    assert [(i["call_id"], i["name"]) for i in added] == [
        ("call_1", "weather"),
        (added[1]["call_id"], ""),
    ]
    assert added[1]["call_id"].startswith("call_")  # none given: one made
    final = evs[-1]["response"]["output"]
    assert [(i["name"], i["arguments"]) for i in final] == [("weather", "{}"), ("", "{}")]


def test_an_error_chunk_fails_the_response_and_ends_the_stream() -> None:
    stream = BRIDGE.stream(MODEL, 30)
    err = {"error": {"message": "The model crashed", "type": "server_error", "code": "oom"}}
    out = stream.feed(chunk({"content": "Hal"}) + b"data: " + orjson.dumps(err) + b"\n\n")
    evs = events(out)
    assert kinds(evs)[-1] == "response.failed"
    failed = evs[-1]["response"]
    Response.model_validate(failed)
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": "The model crashed"}
    # The output as far as it came.
    assert failed["output"][0]["status"] == "incomplete"
    assert failed["output"][0]["content"][0]["text"] == "Hal"
    assert stream.error_code == "oom"
    assert stream.feed(chunk({"content": "more"}) + chunk({}, "stop") + DONE) == b""
    assert stream.end() == b""


def test_error_chunks_of_every_shape() -> None:
    for err, code, error_code in (
        ({"error": {"message": "slow down", "type": "rate_limit_error"}}, "rate_limit_exceeded",
         "rate_limit_error"),
        ({"error": {"message": "x", "code": "invalid_prompt"}}, "invalid_prompt", "invalid_prompt"),
        ({"error": "plain text"}, "server_error", "server_error"),
        ({"error": 5}, "server_error", "server_error"),
    ):  # fmt: skip
        stream = BRIDGE.stream(MODEL, 30)
        evs = events(stream.feed(b"data: " + orjson.dumps(err) + b"\n\n"))
        assert kinds(evs) == ["response.created", "response.in_progress", "response.failed"]
        assert evs[-1]["response"]["error"]["code"] == code
        assert stream.error_code == error_code
    assert BRIDGE.stream(MODEL, 30).error_code is None


def test_what_is_not_a_chunk_is_skipped() -> None:
    junk = (
        b"data: not json\n\n: a comment\n\ndata: 5\n\ndata: []\n\n"
        + b'data: {"choices": "x"}\n\n'
        + b'data: {"choices": [5, {"index": 0, "delta": 7}]}\n\n'
        + b'data: {"choices": [{"index": 0, "delta": {"content": 5, "tool_calls": "x"}}]}\n\n'
        + b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [5, {"index": "a"}]}}]}\n\n'
        + b'data: {"choices": [{"index": 1, "delta": {"content": "other choice"}}]}\n\n'
        + b'data: {"choices": [], "usage": {"prompt_tokens": "x"}}\n\n'
        + b"\xff\xfe\n\ndata: \xff\xfe\n\n"
    )
    evs = run(junk + TEXT_STREAM)
    assert Response.model_validate(evs[-1]["response"]).output_text == "Hello é"
    assert all("other choice" not in orjson.dumps(e).decode() for e in evs)


def test_stream_for_repeats_the_request() -> None:
    stream = BRIDGE.stream(MODEL, 30, REQUEST)
    evs = run(TEXT_STREAM, stream)
    for event in (evs[0], evs[-1]):
        response = event["response"]
        Response.model_validate(response)
        assert response["instructions"] == "Be brief." and response["temperature"] == 0.3
        assert response["tools"] == [WEATHER] and response["store"] is False


# -- the openai SDK reads it ----------------------------------------------------------------------


def sdk(answer: Callable[[dict[str, Any]], tuple[bytes, str]]) -> OpenAI:
    """An openai client whose every request the translation answers: the SDK's request body
    goes through the bridge's request (it must translate), `answer` gives (body, media type)."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = orjson.loads(request.content)
        chat = BRIDGE.request(ENDPOINT, body)
        assert chat["model"] == MODEL
        content, media = answer(body)
        return httpx2.Response(200, content=content, headers={"content-type": media})

    client = httpx2.Client(transport=httpx2.MockTransport(handler))
    return OpenAI(api_key="test", base_url="http://gateway.test/v1", http_client=client)


def test_the_sdk_reads_an_answer() -> None:
    def answer(body: dict[str, Any]) -> tuple[bytes, str]:
        done = BRIDGE.answer(completion({"content": "Bonjour."}), MODEL, body)
        return orjson.dumps(done), "application/json"

    response = sdk(answer).responses.create(model=MODEL, input="Hello", instructions="French.")
    assert response.output_text == "Bonjour."
    assert response.instructions == "French."
    assert response.usage is not None and response.usage.input_tokens == 30


def _streamed(raw: bytes) -> Callable[[dict[str, Any]], tuple[bytes, str]]:
    def answer(body: dict[str, Any]) -> tuple[bytes, str]:
        assert body["stream"] is True
        stream = BRIDGE.stream(MODEL, 30, body)
        out = b"".join(stream.feed(raw[i : i + 7]) for i in range(0, len(raw), 7))
        return out + stream.end(), "text/event-stream"

    return answer


def test_the_sdk_reads_a_stream() -> None:
    client = sdk(_streamed(TEXT_STREAM))
    seen = list(client.responses.create(model=MODEL, input="Hello", stream=True))
    assert [e.type for e in seen][-1] == "response.completed"
    deltas = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
    assert deltas == "Hello é"
    with client.responses.stream(model=MODEL, input="Hello") as stream:
        final = stream.get_final_response()
    assert final.output_text == "Hello é"
    assert final.usage is not None and final.usage.total_tokens == 42


def test_the_sdk_reads_streamed_function_calls() -> None:
    client = sdk(_streamed(TOOLS_STREAM))
    with client.responses.stream(
        model=MODEL,
        input=[{"role": "user", "content": "Weather in Paris and Rome?"}],
        tools=[WEATHER],  # type: ignore[list-item]
    ) as stream:
        arguments = [
            e.snapshot for e in stream if e.type == "response.function_call_arguments.delta"
        ]
        final = stream.get_final_response()
    assert arguments[-1] == '{"city": "Rome"}'
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [
        ("call_1", "weather", '{"city": "Paris"}'),
        ("call_2", "weather", '{"city": "Rome"}'),
    ]
    assert final.output_text == "Looking."
    # The next turn hands the calls and their outputs back: it translates.
    chat = translate(
        input=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            *[item.model_dump(exclude_none=True) for item in final.output],
            {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
            {"type": "function_call_output", "call_id": "call_2", "output": "24 C"},
        ],
        tools=[WEATHER],
    )
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant", "tool", "tool"]
    assert chat["messages"][1]["content"] == "Looking."
    assert [c["id"] for c in chat["messages"][1]["tool_calls"]] == ["call_1", "call_2"]


def test_the_sdk_sees_a_failed_stream() -> None:
    err = b'data: {"error": {"message": "boom", "type": "server_error"}}\n\n'
    client = sdk(_streamed(chunk({"content": "Hi"}) + err))
    seen = list(client.responses.create(model=MODEL, input="Hello", stream=True))
    assert seen[-1].type == "response.failed"
    assert seen[-1].response.error is not None and seen[-1].response.error.message == "boom"


def test_module_names() -> None:
    assert chat_bridge.PATH == "/v1/responses"
    assert chat_bridge.BRIDGE is BRIDGE
