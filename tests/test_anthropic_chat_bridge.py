"""Anthropic's Messages API served by an OpenAI chat completions backend
(extproc/wire/anthropic/chat_bridge.py): the request to chat completions (golden bodies, and a
400 naming the parameter for what chat cannot carry), the chat completion back to a Messages
answer, the chunk stream to Anthropic's events (their exact order, split at every byte). The
Anthropic side is checked with the official SDK: its requests are what the bridge reads, its
types and its stream accumulator read what the bridge answers."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import orjson
import pytest

from extproc.errors import GatewayError
from extproc.providers import anthropic as anthropic_provider
from extproc.usage import Usage
from extproc.wire.anthropic import chat_bridge
from extproc.wire.anthropic.chat_bridge import BRIDGE, MessagesStream, chat_request
from extproc.wire.base import ChatBridge, Endpoint, Operation

MODEL = "claude-sonnet-4-5"
ENDPOINT = Endpoint(Operation.CHAT, "/v1/messages")
# A 1x1 PNG, base64.
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
    "AAAABJRU5ErkJggg=="
)
PDF = "JVBERi0xLjQK"
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {
    "name": "weather",
    "description": "The weather in a city",
    "input_schema": CITY,
    "cache_control": {"type": "ephemeral"},
}
CHAT_WEATHER = {
    "type": "function",
    "function": {"name": "weather", "description": "The weather in a city", "parameters": CITY},
}


def body(**fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
        **fields,
    }


def refused(request: dict[str, Any]) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        chat_request(request)
    assert caught.value.status == 400
    return caught.value


def test_the_bridge_is_a_chat_bridge() -> None:
    bridge: ChatBridge = BRIDGE
    assert bridge.request(ENDPOINT, body()) == chat_request(body())
    assert isinstance(bridge.stream(MODEL, 3), MessagesStream)


# -- the request ----------------------------------------------------------------------------------


def test_a_multi_turn_conversation_with_tools() -> None:
    request = body(
        system=[
            {"type": "text", "text": "Be brief."},
            {"type": "text", "text": "Use tools.", "cache_control": {"type": "ephemeral"}},
        ],
        messages=[
            {"role": "user", "content": "The weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Two calls.", "signature": "c2ln"},
                    {"type": "redacted_thinking", "data": "c2VjcmV0"},
                    {"type": "text", "text": "Let me look."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "weather",
                        "input": {"city": "Paris"},
                    },
                    {
                        "type": "tool_use",
                        "id": "toolu_2",
                        "name": "weather",
                        "input": {"city": "Rome"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": [
                            {"type": "text", "text": "24 C"},
                            {
                                "type": "text",
                                "text": "sunny",
                                "cache_control": {"type": "ephemeral"},
                            },
                        ],
                    },
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
            {"role": "assistant", "content": "Tomorrow: rain."},
            {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
        ],
        tools=[WEATHER, {"type": "custom", "name": "clock", "input_schema": {"type": "object"}}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["END", ""],
        temperature=0.2,
        top_p=0.9,
        metadata={"user_id": "jane"},
        stream=True,
        thinking={"type": "enabled", "budget_tokens": 2048},
        service_tier="auto",
        cache_control={"type": "ephemeral"},
    )
    assert chat_request(request) == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief.\n\nUse tools."},
            {"role": "user", "content": "The weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "toolu_2",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "24 C\n\nsunny"},
            {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]},
            {"role": "assistant", "content": "Tomorrow: rain."},
            {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
        ],
        "max_completion_tokens": 100,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["END"],
        "user": "jane",
        "tools": [
            CHAT_WEATHER,
            {"type": "function", "function": {"name": "clock", "parameters": {"type": "object"}}},
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }


def test_a_plain_request_takes_only_what_it_has() -> None:
    assert chat_request(body()) == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 100,
    }
    # A parameter set to null is one not set; an empty system prompt is none.
    assert chat_request(body(stream=False, system="", top_k=None, tools=None)) == chat_request(
        body()
    )


def test_images_and_documents() -> None:
    content = [
        {"type": "text", "text": "Compare."},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
            "title": "Report",
            "cache_control": {"type": "ephemeral"},
        },
        {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": "Plain notes."},
        },
    ]
    chat = chat_request(body(messages=[{"role": "user", "content": content}]))
    assert chat["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare."},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                {
                    "type": "file",
                    "file": {
                        "filename": "document.pdf",
                        "file_data": f"data:application/pdf;base64,{PDF}",
                    },
                },
                {"type": "text", "text": "Plain notes."},
            ],
        }
    ]


def test_a_tool_results_images_follow_the_tool_messages() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    messages = [
        {"role": "user", "content": "Take two screenshots"},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "shot", "input": {}},
                {"type": "tool_use", "id": "toolu_2", "name": "shot", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Here:"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "taken"}, image],
                },
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": [image]},
            ],
        },
    ]
    chat = chat_request(body(messages=messages))
    part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    assert chat["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "shot", "arguments": "{}"}},
            {"id": "toolu_2", "type": "function", "function": {"name": "shot", "arguments": "{}"}},
        ],
    }
    # Tool messages first (straight after the calls), whatever the order of the user's blocks;
    # the images of the results, then the user's own parts, in the user message after them.
    assert chat["messages"][2:] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "taken"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": ""},
        {"role": "user", "content": [part, part, {"type": "text", "text": "Here:"}]},
    ]


def test_tool_results_errors_and_empty_ones() -> None:
    content = [
        {"type": "tool_result", "tool_use_id": "a", "content": "no such city", "is_error": True},
        {"type": "tool_result", "tool_use_id": "b", "is_error": True},
        {"type": "tool_result", "tool_use_id": "c"},
        {"type": "tool_result", "tool_use_id": "d", "content": []},
        {
            "type": "tool_result",
            "tool_use_id": "e",
            "content": [{"type": "document", "source": {"type": "text", "data": "doc"}}],
        },
    ]
    chat = chat_request(body(messages=[{"role": "user", "content": content}]))
    assert chat["messages"] == [
        {"role": "tool", "tool_call_id": "a", "content": "Error: no such city"},
        {"role": "tool", "tool_call_id": "b", "content": "Error"},
        {"role": "tool", "tool_call_id": "c", "content": ""},
        {"role": "tool", "tool_call_id": "d", "content": ""},
        {"role": "tool", "tool_call_id": "e", "content": "doc"},
    ]


def test_blank_text_and_empty_turns_are_left_out() -> None:
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "  "}, {"type": "text", "text": "hi"}],
        },
        {
            "role": "assistant",
            "content": [{"type": "thinking", "thinking": "hm", "signature": "s"}],
        },
        {"role": "user", "content": [{"type": "text", "text": ""}]},
        {"role": "user", "content": "   "},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "\n\n"},
                {"type": "tool_use", "id": "t", "name": "f", "input": {"x": 1}},
            ],
        },
        {"role": "assistant", "content": ""},
    ]
    chat = chat_request(body(system=[{"type": "text", "text": " "}], messages=messages))
    assert chat["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "t", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}
            ],
        },
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "tool", "name": "weather"},
            {"tool_choice": {"type": "function", "function": {"name": "weather"}}},
        ),
        (
            {"type": "auto", "disable_parallel_tool_use": True},
            {"tool_choice": "auto", "parallel_tool_calls": False},
        ),
        (
            {"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
            {
                "tool_choice": {"type": "function", "function": {"name": "weather"}},
                "parallel_tool_calls": False,
            },
        ),
        ({"type": "any", "disable_parallel_tool_use": False}, {"tool_choice": "required"}),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    chat = chat_request(body(tools=[WEATHER], tool_choice=choice))
    assert {
        k: v for k, v in chat.items() if k in ("tool_choice", "parallel_tool_calls")
    } == expected


def test_a_tool_choice_without_tools() -> None:
    # auto and none say what no tools say (and OpenAI refuses a tool_choice without tools).
    for kind in ("auto", "none"):
        chat = chat_request(body(tool_choice={"type": kind, "disable_parallel_tool_use": True}))
        assert "tool_choice" not in chat and "parallel_tool_calls" not in chat
    assert refused(body(tool_choice={"type": "any"})).param == "tool_choice"
    assert refused(body(tool_choice={"type": "tool", "name": "x"})).param == "tool_choice"


def test_a_strict_tool_and_the_output_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    chat = chat_request(
        body(
            tools=[
                {"name": "f", "input_schema": schema, "strict": True, "eager_input_streaming": True}
            ],
            output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "high"},
        )
    )
    assert chat["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": schema, "strict": True}}
    ]
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema, "strict": True},
    }
    assert "response_format" not in chat_request(body(output_config={"effort": "low"}))


def test_dropped_parameters() -> None:
    # What does not change what the model is asked: no 400, nothing sent.
    for key, value in [
        ("thinking", {"type": "enabled", "budget_tokens": 1024}),
        ("thinking", {"type": "disabled"}),
        ("thinking", {"type": "adaptive"}),
        ("service_tier", "standard_only"),
        ("speed", "fast"),
        ("cache_control", {"type": "ephemeral"}),
        ("diagnostics", {"previous_message_id": "msg_1"}),
        ("user_profile_id", "p"),
        ("workspace_id", "w"),
    ]:
        assert chat_request(body(**{key: value})) == chat_request(body())


IMAGE_FILE = {"type": "image", "source": {"type": "file", "file_id": "file_1"}}
UV, UP, IT, IV = "unsupported_value", "unsupported_parameter", "invalid_type", "invalid_value"
C0 = "messages[0].content[0]"  # the first block of the first (user) message
A0 = "messages[1].content[0]"  # the first block of the assistant's message after it


def user(*blocks: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": list(blocks)}]}


def assistant(*blocks: Any) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": list(blocks)},
        ]
    }


def tool(kind: str | None = None, **fields: Any) -> dict[str, Any]:
    out = {"name": "f", "input_schema": {}, **fields}
    return {"tools": [{"type": kind, **out} if kind else out]}


def result(*content: Any) -> dict[str, Any]:
    return user({"type": "tool_result", "tool_use_id": "t", "content": list(content)})


def source(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "source": fields}


REFUSALS = [
    ({"top_k": 5}, "top_k", UP),
    ({"container": "c_1"}, "container", UP),
    ({"mcp_servers": [{"type": "url", "url": "https://m", "name": "m"}]}, "mcp_servers", UP),
    ({"inference_geo": "us"}, "inference_geo", UP),
    ({"frequency_penalty": 1}, "frequency_penalty", UP),
    (tool("web_search_20250305"), "tools[0].type", UV),
    ({"tools": [WEATHER, {"type": "bash_20250124", "name": "bash"}]}, "tools[1].type", UV),
    (tool("text_editor_20250728"), "tools[0].type", UV),
    (tool("computer_20250124"), "tools[0].type", UV),
    (tool("code_execution_20250825"), "tools[0].type", UV),
    ({"tools": [{"name": "f"}]}, "tools[0].input_schema", IT),
    (tool(defer_loading=True), "tools[0].defer_loading", UP),
    (tool(input_examples=[{"a": 1}]), "tools[0].input_examples", UP),
    (tool(allowed_callers=["code_execution_20250825"]), "tools[0].allowed_callers", UP),
    ({"tools": {"name": "f"}}, "tools", IT),
    ({**tool(), "tool_choice": {"type": "some"}}, "tool_choice.type", IV),
    ({**tool(), "tool_choice": "auto"}, "tool_choice", IT),
    ({**tool(), "tool_choice": {"type": "tool"}}, "tool_choice.name", IT),
    ({"output_config": {"format": {"type": "regex"}}}, "output_config.format.type", IV),
    ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema", IT),
    ({"output_config": {"task_budget": 5}}, "output_config.task_budget", UP),
    ({"stop_sequences": "END"}, "stop_sequences", IT),
    ({"temperature": "hot"}, "temperature", IT),
    ({"stream": "yes"}, "stream", IT),
    ({"metadata": {"user_id": 7}}, "metadata.user_id", IT),
    ({"system": [{"type": "image", "source": {}}]}, "system[0].type", IV),
    ({"system": 3}, "system", IT),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role", IV),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", IT),
    ({"messages": [{"role": "user"}]}, "messages[0].content", IT),
    ({"messages": ["hi"]}, "messages[0]", IT),
    (user({"type": "text", "text": 3}), f"{C0}.text", IT),
    (
        user({"type": "text", "text": "a"}, {"type": "server_tool_use", "id": "s", "input": {}}),
        "messages[0].content[1].type",
        UV,
    ),
    (user({"type": "web_search_tool_result", "tool_use_id": "s"}), f"{C0}.type", UV),
    (user({"type": "search_result", "source": "s", "title": "t"}), f"{C0}.type", UV),
    (user({"type": "container_upload", "file_id": "f"}), f"{C0}.type", UV),
    (user({"type": "tool_use", "id": "t", "name": "f", "input": {}}), f"{C0}.type", UV),
    (user({"type": "thinking", "thinking": "x", "signature": "s"}), f"{C0}.type", UV),
    (user(IMAGE_FILE), f"{C0}.source.type", UV),
    (user(source("image", type="base64", data=PNG)), f"{C0}.source.media_type", IT),
    (user({"type": "image"}), f"{C0}.source", IT),
    (user(source("document", type="url", url="https://x/a.pdf")), f"{C0}.source.type", UV),
    (user(source("document", type="content", content=[])), f"{C0}.source.type", UV),
    (user(source("document", type="file", file_id="file_1")), f"{C0}.source.type", UV),
    (
        user(source("document", type="base64", media_type="image/png", data=PNG)),
        f"{C0}.source.type",
        UV,
    ),
    (
        user({**source("document", type="text", data="x"), "citations": {"enabled": True}}),
        f"{C0}.citations",
        UV,
    ),
    (user({"type": "tool_result", "content": "x"}), f"{C0}.tool_use_id", IT),
    (user({"type": "tool_result", "tool_use_id": "t", "content": 5}), f"{C0}.content", IT),
    (result({"type": "search_result"}), f"{C0}.content[0].type", UV),
    (result(IMAGE_FILE), f"{C0}.content[0].source.type", UV),
    (assistant({"type": "tool_use", "id": "t", "name": "f", "input": "{}"}), f"{A0}.input", IT),
    (assistant({"type": "tool_use", "name": "f", "input": {}}), f"{A0}.id", IT),
    (assistant({"type": "tool_result", "tool_use_id": "t"}), f"{A0}.type", UV),
    (assistant(source("image", type="url", url="https://x")), f"{A0}.type", UV),
    (assistant({"type": "server_tool_use", "id": "s", "input": {}}), f"{A0}.type", UV),
]


@pytest.mark.parametrize(("fields", "param", "code"), REFUSALS)
def test_what_chat_cannot_carry_is_refused(fields: dict[str, Any], param: str, code: str) -> None:
    err = refused(body(**fields))
    assert (err.param, err.code, err.type) == (param, code, "invalid_request_error")
    assert param.split("[")[0].split(".")[0] in err.message


def test_a_built_in_tool_is_refused_saying_why() -> None:
    err = refused(body(tools=[{"type": "web_search_20250305", "name": "web_search"}]))
    assert "does not run Anthropic's built-in tools" in err.message


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": [{"role": "user", "content": ["hi"]}]},  # a block that is not an object
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url"}}]}]},
        {"tools": ["weather"]},
        {"metadata": "jane"},
        {"output_config": "json"},
    ],
)
def test_a_malformed_body_is_a_400_not_a_crash(fields: dict[str, Any]) -> None:
    refused(body(**fields))


def test_what_the_sdk_sends_is_read() -> None:
    sent: list[dict[str, Any]] = []

    def backend(request: httpx2.Request) -> httpx2.Response:
        sent.append(json.loads(request.content))
        return httpx2.Response(200, json=chat_bridge.messages_answer(COMPLETION, MODEL))

    client = sdk(backend)
    client.messages.create(
        model=MODEL,
        max_tokens=1024,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "weather",
                        "input": {"city": "Paris"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"}],
            },
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "auto"},
        thinking={"type": "enabled", "budget_tokens": 1024},
        metadata={"user_id": "jane"},
        stop_sequences=["END"],
    )
    chat = chat_request(sent[0])
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant", "tool"]
    assert chat["tool_choice"] == "auto" and chat["user"] == "jane" and chat["stop"] == ["END"]


# -- the answer -----------------------------------------------------------------------------------

COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "backend-model",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Let me check.",
                "reasoning_content": "The user wants weather.",
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
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {
        "prompt_tokens": 120,
        "completion_tokens": 30,
        "total_tokens": 150,
        "prompt_tokens_details": {"cached_tokens": 100},
    },
}


def test_a_completion_as_a_messages_answer() -> None:
    assert BRIDGE.answer(COMPLETION, MODEL) == {
        "id": "msg_chatcmpl-1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [
            {"type": "thinking", "thinking": "The user wants weather.", "signature": ""},
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 20,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 100,
            "output_tokens": 30,
        },
    }


def test_the_answer_is_what_the_sdk_reads() -> None:
    message = anthropic.types.Message.model_validate(BRIDGE.answer(COMPLETION, MODEL))
    assert message.content[2].type == "tool_use" and message.content[2].input == {"city": "Paris"}
    # Through the client, as a client gets it.
    client = sdk(lambda _: httpx2.Response(200, json=BRIDGE.answer(COMPLETION, MODEL)))
    got = client.messages.create(
        model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}]
    )
    assert got.stop_reason == "tool_use" and got.usage.cache_read_input_tokens == 100


def test_the_usage_reads_back_as_the_backends() -> None:
    for report in (
        COMPLETION["usage"],
        {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        {"prompt_tokens": 7, "completion_tokens": 0, "prompt_tokens_details": {"cached_tokens": 7}},
    ):
        answer = BRIDGE.answer({**COMPLETION, "usage": report}, MODEL)
        cached = (report.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        prompt, completion = report["prompt_tokens"], report["completion_tokens"]
        assert anthropic_provider.usage(answer["usage"]) == Usage(
            prompt, completion, prompt + completion, cached
        )


def test_an_answer_without_usage_or_id() -> None:
    completion = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}
    answer = BRIDGE.answer(completion, MODEL)
    assert answer["id"].startswith("msg_") and len(answer["id"]) > 10
    assert answer["usage"] == {
        "input_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 0,
    }
    assert answer["content"] == [{"type": "text", "text": "hi"}]
    assert answer["stop_reason"] == "end_turn"


def test_reasoning_by_its_newer_name_and_an_empty_answer() -> None:
    message = {"role": "assistant", "content": "", "reasoning": "Hmm."}
    answer = BRIDGE.answer({"choices": [{"message": message, "finish_reason": "length"}]}, MODEL)
    assert answer["content"] == [{"type": "thinking", "thinking": "Hmm.", "signature": ""}]
    assert answer["stop_reason"] == "max_tokens"
    assert BRIDGE.answer({"choices": []}, MODEL)["content"] == []


@pytest.mark.parametrize(
    ("finish", "extra", "reason", "sequence"),
    [
        ("stop", {}, "end_turn", None),
        ("length", {}, "max_tokens", None),
        ("tool_calls", {}, "tool_use", None),
        ("function_call", {}, "tool_use", None),
        ("content_filter", {}, "refusal", None),
        ("something_new", {}, "end_turn", None),
        (None, {}, "end_turn", None),
        ("stop", {"stop_reason": "END"}, "stop_sequence", "END"),  # vLLM names the stop string
        ("stop", {"stop_reason": 128001}, "end_turn", None),  # ... or a stop token's id
    ],
)
def test_stop_reasons(finish: Any, extra: dict[str, Any], reason: str, sequence: Any) -> None:
    choice = {"message": {"content": "x"}, "finish_reason": finish, **extra}
    answer = BRIDGE.answer({"choices": [choice]}, MODEL)
    assert (answer["stop_reason"], answer["stop_sequence"]) == (reason, sequence)


def test_stop_reasons_read_back_as_the_finish_reasons() -> None:
    for finish, reason in chat_bridge.STOP_REASONS.items():
        back = anthropic_provider.FINISH_REASONS[reason]
        assert back == ("tool_calls" if finish == "function_call" else finish)


def test_a_refusal() -> None:
    message = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    answer = BRIDGE.answer({"choices": [{"message": message, "finish_reason": "stop"}]}, MODEL)
    assert answer["content"] == [{"type": "text", "text": "I can't help with that."}]
    assert answer["stop_reason"] == "refusal"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ("", {}),
        (None, {}),
        ("  ", {}),
        ("[1, 2]", {"_raw": "[1, 2]"}),
        ('{"a": ', {"_raw": '{"a": '}),
        ("not json", {"_raw": "not json"}),
    ],
)
def test_tool_call_arguments_as_input(arguments: Any, expected: dict[str, Any]) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    message = {"content": None, "tool_calls": [call]}
    answer = BRIDGE.answer(
        {"choices": [{"message": message, "finish_reason": "tool_calls"}]}, MODEL
    )
    assert answer["content"] == [{"type": "tool_use", "id": "c", "name": "f", "input": expected}]


# -- the stream -----------------------------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **fields: Any) -> bytes:
    choice = {"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}
    payload = {
        "id": "chatcmpl-9",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "backend-model",
        "choices": [choice],
        **fields,
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def usage_chunk(prompt: int = 50, completion: int = 12, cached: int = 0) -> bytes:
    report = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    payload = {
        "id": "chatcmpl-9",
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": report,
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def call_delta(
    index: int, call_id: str | None = None, name: str | None = None, arguments: str = ""
) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        call.update(id=call_id, type="function")
        call["function"]["name"] = name
    return {"tool_calls": [call]}


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """The events, each checked framed as Anthropic frames them."""
    out = []
    assert raw.endswith(b"\n\n") or not raw
    for frame in raw.split(b"\n\n")[:-1]:
        head, data = frame.split(b"\n")
        assert head.startswith(b"event: ") and data.startswith(b"data: ")
        payload = orjson.loads(data[6:])
        assert payload["type"] == head[7:].decode()
        out.append((payload["type"], payload))
    return out


def run(*pieces: bytes, prompt_tokens: int = 50, end: bool = True) -> bytes:
    stream = BRIDGE.stream(MODEL, prompt_tokens)
    out = b"".join(stream.feed(p) for p in pieces)
    return out + (stream.end() if end else b"")


# Reasoning, text, then two tool calls in parallel: OpenAI's pieces as vLLM sends them.
TOOL_STREAM = b"".join(
    [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "Two "}),
        chunk({"reasoning_content": "cities."}),
        chunk({"content": "Checking"}),
        chunk({"content": " both."}),
        chunk(call_delta(0, "call_1", "weather")),
        chunk(call_delta(0, arguments='{"city": ')),
        chunk(call_delta(0, arguments='"Paris"}')),
        chunk(call_delta(1, "call_2", "weather", '{"city": "Rome"}')),
        chunk({}, "tool_calls"),
        usage_chunk(50, 12, 30),
        DONE,
    ]
)


def test_a_stream_of_reasoning_text_and_parallel_tool_calls() -> None:
    got = events(run(TOOL_STREAM))
    assert [(kind, e.get("index")) for kind, e in got] == [
        ("message_start", None),
        ("ping", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("content_block_start", 3),
        ("content_block_delta", 3),
        ("content_block_stop", 3),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert got[0][1]["message"] == {
        "id": "msg_chatcmpl-9",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 50,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 0,
        },
    }
    starts = [e["content_block"] for kind, e in got if kind == "content_block_start"]
    assert starts == [
        {"type": "thinking", "thinking": "", "signature": ""},
        {"type": "text", "text": ""},
        {"type": "tool_use", "id": "call_1", "name": "weather", "input": {}},
        {"type": "tool_use", "id": "call_2", "name": "weather", "input": {}},
    ]
    deltas = [e["delta"] for kind, e in got if kind == "content_block_delta"]
    assert deltas == [
        {"type": "thinking_delta", "thinking": "Two "},
        {"type": "thinking_delta", "thinking": "cities."},
        {"type": "text_delta", "text": "Checking"},
        {"type": "text_delta", "text": " both."},
        {"type": "input_json_delta", "partial_json": '{"city": '},
        {"type": "input_json_delta", "partial_json": '"Paris"}'},
        {"type": "input_json_delta", "partial_json": '{"city": "Rome"}'},
    ]
    assert got[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {
            "output_tokens": 12,
            "input_tokens": 20,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 30,
        },
    }


def test_a_stream_split_at_every_byte_is_the_same() -> None:
    whole = run(TOOL_STREAM)
    for i in range(len(TOOL_STREAM) + 1):
        assert run(TOOL_STREAM[:i], TOOL_STREAM[i:]) == whole, i
    assert run(*(TOOL_STREAM[i : i + 1] for i in range(len(TOOL_STREAM)))) == whole


def test_crlf_framing_and_comments_are_read() -> None:
    crlf = TOOL_STREAM.replace(b"\n", b"\r\n")
    assert run(b": keep-alive\n\n" + crlf) == run(TOOL_STREAM)


def test_the_finish_waits_for_the_usage_chunk() -> None:
    stream = BRIDGE.stream(MODEL, 5)
    assert [k for k, _ in events(stream.feed(chunk({"content": "Hi"})))] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
    ]
    # The finish closes the block; the message waits for its usage.
    assert [k for k, _ in events(stream.feed(chunk({}, "stop")))] == ["content_block_stop"]
    last = events(stream.feed(usage_chunk(5, 1)))
    assert [k for k, _ in last] == ["message_delta", "message_stop"]
    assert last[0][1]["usage"]["output_tokens"] == 1
    assert stream.feed(DONE) == b"" and stream.end() == b""
    assert stream.usage == Usage(5, 1, 6, 0)
    assert stream.error_code is None and not stream.failed


def test_done_without_usage_estimates_the_output() -> None:
    text = "x" * 9  # 9 characters: 3 tokens, rounded up
    got = events(
        run(
            chunk({"content": text[:4]}),
            chunk({"content": text[4:]}),
            chunk({}, "length"),
            DONE,
            prompt_tokens=77,
        )
    )
    assert [k for k, _ in got][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert got[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
        "usage": {
            "output_tokens": 3,
            "input_tokens": 77,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def test_the_estimate_counts_reasoning_and_tool_arguments() -> None:
    got = events(
        run(
            chunk({"reasoning": "abcd"}),
            chunk(call_delta(0, "c", "f", '{"a":1}')),  # 7 characters
            chunk({}, "tool_calls"),
            DONE,
        )
    )
    assert got[-2][1]["usage"]["output_tokens"] == 3  # 11 characters


def test_usage_in_the_finish_chunk_is_the_report() -> None:
    report = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    got = events(run(chunk({"content": "Hi"}), chunk({}, "stop", usage=report), DONE))
    assert got[-2][1]["usage"]["output_tokens"] == 4
    assert got[-2][1]["usage"]["input_tokens"] == 9


def test_end_after_the_finish_closes_the_message() -> None:
    stream = BRIDGE.stream(MODEL, 5)
    stream.feed(chunk({"content": "Hi"}) + chunk({}, "stop"))
    closing = events(stream.end())
    assert [k for k, _ in closing] == ["message_delta", "message_stop"]
    assert closing[0][1]["delta"]["stop_reason"] == "end_turn"
    assert stream.end() == b""


def test_a_stream_cut_before_its_finish_is_left_cut() -> None:
    stream = BRIDGE.stream(MODEL, 5)
    out = events(stream.feed(chunk({"content": "Hi"})))
    assert [k for k, _ in out][-1] == "content_block_delta"
    assert stream.end() == b""
    assert BRIDGE.stream(MODEL, 5).end() == b""  # nothing came at all


def test_done_before_any_chunk_is_an_empty_message() -> None:
    assert [k for k, _ in events(run(DONE))] == [
        "message_start",
        "ping",
        "message_delta",
        "message_stop",
    ]


def test_a_stop_string_named_by_vllm() -> None:
    got = events(
        run(
            chunk({"content": "a"}),
            chunk(
                {},
                "stop",
            ),
            DONE,
        )
    )
    assert got[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    payload = orjson.loads(chunk({}, "stop")[6:])
    payload["choices"][0]["stop_reason"] = "END"
    vllm = b"data: " + orjson.dumps(payload) + b"\n\n"
    got = events(run(chunk({"content": "a"}), vllm, DONE))
    assert got[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


def test_a_new_kind_closes_the_open_block() -> None:
    # text, a tool call, text again: three blocks.
    got = events(
        run(
            chunk({"content": "a"}),
            chunk(call_delta(0, "c", "f", "{}")),
            chunk({"content": "b"}),
            chunk({}, "stop"),
            DONE,
        )
    )
    assert [(k, e.get("index")) for k, e in got if k.startswith("content_block_")] == [
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
    ]


def call(call_id: str | None = None, name: str = "f", arguments: str = "", **fields: Any) -> Any:
    """A tool call delta as a server that numbers no calls sends it (`index` in `fields`)."""
    out: dict[str, Any] = {"function": {"arguments": arguments}, **fields}
    if call_id:
        out.update(id=call_id, type="function")
        out["function"]["name"] = name
    return chunk({"tool_calls": [out]})


def tool_blocks(*pieces: bytes) -> list[tuple[str, int, Any]]:
    got = events(run(*pieces, chunk({}, "tool_calls"), DONE))
    return [
        (k, e["index"], e.get("delta", e.get("content_block")))
        for k, e in got
        if k.startswith("content_block_")
    ]


def start(index: int, call_id: str, name: str = "f") -> tuple[str, int, Any]:
    block = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
    return ("content_block_start", index, block)


def piece(index: int, arguments: str) -> tuple[str, int, Any]:
    return ("content_block_delta", index, {"type": "input_json_delta", "partial_json": arguments})


def stop(index: int) -> tuple[str, int, Any]:
    return ("content_block_stop", index, None)


def test_tool_calls_without_index() -> None:
    # A new id is a new call; a piece with neither id nor index continues the call under way.
    assert tool_blocks(call("a", arguments="{"), call(arguments="}"), call("b", "g", "{}")) == [
        start(0, "a"),
        piece(0, "{"),
        piece(0, "}"),
        stop(0),
        start(1, "b", "g"),
        piece(1, "{}"),
        stop(1),
    ]


def test_tool_calls_all_numbered_0() -> None:
    assert tool_blocks(call("a", index=0), call(arguments="{}", index=0), call("b", index=0)) == [
        start(0, "a"),
        piece(0, "{}"),
        stop(0),
        start(1, "b"),
        stop(1),
    ]


def test_a_late_piece_of_a_closed_tool_call() -> None:
    # A piece of call 0 after call 1 began: sent to call 0's block, where the SDKs gather it.
    assert tool_blocks(call("a", index=0), call("b", index=1), call(arguments="{}", index=0)) == [
        start(0, "a"),
        stop(0),
        start(1, "b"),
        piece(0, "{}"),
        stop(1),
    ]


def test_a_tool_call_without_id_gets_one() -> None:
    got = events(
        run(
            chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]}),
            chunk({}, "tool_calls"),
            DONE,
        )
    )
    block = next(e["content_block"] for k, e in got if k == "content_block_start")
    assert block["id"].startswith("toolu_") and block["name"] == "f"


def openai_error(message: str | None = None, kind: str | None = None, code: Any = None) -> Any:
    return {"message": message, "type": kind, "param": None, "code": code}


@pytest.mark.parametrize(
    ("error", "anthropic_type", "code"),
    [
        (openai_error("Slow", "rate_limit_error", "rate_limit_exceeded"), "rate_limit_error",
         "rate_limit_exceeded"),
        (openai_error("Boom", "server_error"), "api_error", "server_error"),
        (openai_error("Bad", "invalid_request_error"), "invalid_request_error",
         "invalid_request_error"),
        (openai_error("No credit", "insufficient_quota", "insufficient_quota"), "billing_error",
         "insufficient_quota"),
        (openai_error("Odd", "weird"), "api_error", "weird"),
        # vLLM: an exception's name as the type, the HTTP status as the code.
        (openai_error("Too long", "BadRequestError", 400), "invalid_request_error",
         "BadRequestError"),
        (openai_error("Busy", "ServiceUnavailableError", 529), "overloaded_error",
         "ServiceUnavailableError"),
        (openai_error("Later", None, 429), "rate_limit_error", "429"),
        ({}, "api_error", "error"),
    ],
)  # fmt: skip
def test_an_error_chunk_ends_the_stream(
    error: dict[str, Any], anthropic_type: str, code: str
) -> None:
    stream = BRIDGE.stream(MODEL, 5)
    before = events(stream.feed(chunk({"content": "Hi"})))
    assert [k for k, _ in before][-1] == "content_block_delta"
    got = events(stream.feed(b"data: " + orjson.dumps({"error": error}) + b"\n\n" + DONE))
    assert got == [
        (
            "error",
            {
                "type": "error",
                "error": {
                    "type": anthropic_type,
                    "message": error.get("message") or "The model's backend failed",
                },
            },
        )
    ]
    assert stream.error_code == code and stream.failed
    assert stream.feed(chunk({"content": "more"}) + usage_chunk()) == b""
    assert stream.end() == b""


def test_the_gateways_own_error_chunk() -> None:
    from extproc.providers.openai_answer import Chunks

    err = GatewayError(429, "Rate limited upstream", "rate_limit_error", "rate_limit_error")
    got = events(run(Chunks(MODEL).error(err)))
    assert got == [
        (
            "error",
            {
                "type": "error",
                "error": {"type": "rate_limit_error", "message": "Rate limited upstream"},
            },
        )
    ]


def test_vllms_older_error_chunk() -> None:
    error = {"object": "error", "message": "Overloaded", "type": "ServiceUnavailableError"}
    raw = b"data: " + orjson.dumps({**error, "param": None, "code": 503}) + b"\n\n"
    assert events(run(raw)) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "Overloaded"}})
    ]


@pytest.mark.parametrize(
    "junk",
    [
        b"data: not json\n\n",
        b"data: [1, 2]\n\n",
        b'data: "text"\n\n',
        b"data: null\n\n",
        b'data: {"choices": "none"}\n\n',
        b'data: {"choices": [1, null, {"index": 1, "delta": {"content": "other choice"}}]}\n\n',
        b'data: {"choices": [{"delta": "x", "finish_reason": 3}]}\n\n',
        b'data: {"choices": [{"delta": {"content": 5, "reasoning_content": [], "tool_calls": 1}}]}'
        b"\n\n",
        b'data: {"choices": [{"delta": {"tool_calls": [null, 1, {"index": true, "function": 5}]}}]}'
        b"\n\n",
        b'data: {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": 7, "function": '
        b'{"name": 1, "arguments": 2}}]}}]}\n\n',
        b'data: {"usage": {"prompt_tokens": "many"}, "choices": []}\n\n',
        b'data: {"error": 5}\n\n',
        b"event: x\n\n",
        b"\xff\xfe\n\n",
    ],
)
def test_junk_is_skipped_never_raised(junk: bytes) -> None:
    stream = BRIDGE.stream(MODEL, 5)
    out = stream.feed(junk) + stream.feed(chunk({"content": "ok"}) + chunk({}, "stop") + DONE)
    assert [k for k, _ in events(out)][-2:] == ["message_delta", "message_stop"]
    assert stream.end() == b""


def test_a_chunk_of_another_choice_is_ignored() -> None:
    other = b'data: {"id": "chatcmpl-9", "choices": [{"index": 1, "delta": {"content": "B"}}]}\n\n'
    got = events(run(chunk({"content": "A"}), other, chunk({}, "stop"), DONE))
    assert [e["delta"]["text"] for k, e in got if k == "content_block_delta"] == ["A"]


# -- the stream as the anthropic SDK reads it -----------------------------------------------------


def sdk(backend: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="key",
        base_url="http://gateway.test",
        http_client=httpx2.Client(transport=httpx2.MockTransport(backend)),
        max_retries=0,
    )


def sse_backend(raw: bytes) -> Any:
    def backend(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=raw)

    return backend


def test_the_sdks_accumulator_reads_the_stream() -> None:
    client = sdk(sse_backend(run(TOOL_STREAM)))
    with client.messages.stream(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "x"}]
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert texts == ["Checking", " both."]
    assert final.id == "msg_chatcmpl-9" and final.model == MODEL
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert final.content[0].thinking == "Two cities."  # type: ignore[union-attr]
    assert final.content[1].text == "Checking both."  # type: ignore[union-attr]
    assert final.content[2].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert final.content[3].input == {"city": "Rome"}  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use" and final.stop_sequence is None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (20, 12)
    assert final.usage.cache_read_input_tokens == 30
    assert anthropic_provider.usage(final.usage.model_dump()) == Usage(50, 12, 62, 30)


def test_the_sdk_raises_the_error_event() -> None:
    error = {"error": {"message": "Slow down", "type": "rate_limit_error", "code": None}}
    raw = run(chunk({"content": "Hi"}), b"data: " + orjson.dumps(error) + b"\n\n")
    client = sdk(sse_backend(raw))
    with pytest.raises(anthropic.APIStatusError) as caught:
        with client.messages.stream(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}]
        ) as stream:
            stream.get_final_message()
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Slow down"},
    }
