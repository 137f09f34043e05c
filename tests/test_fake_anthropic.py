"""The fake's Anthropic Messages API, driven through the official `anthropic` SDK, and the
gateway's translation (extproc/providers/anthropic.py) checked against it: a translated
request the fake (after Anthropic's reference) would refuse fails here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc.devtools.fake_llm import FakeLLMSettings
from extproc.providers import anthropic as translation
from extproc.providers import registry

from .provider_cases import CONVERSATION, TOOLS, fed_in_pieces
from .test_fake_llm import _http, _running

MODEL = "claude-sonnet-4-5"
HEADERS = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with _running(FakeLLMSettings(name="fake-anthropic", response_tokens=6)) as bound:
        yield bound


@pytest.fixture
def client(port: int) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{port}", api_key="sk-ant-test", max_retries=0, timeout=5
    )


def post(port: int, body: dict[str, Any], **headers: str) -> tuple[int, dict[str, Any]]:
    status, _, raw = _http(
        port,
        "/v1/messages",
        method="POST",
        body=orjson.dumps(body),
        headers={**HEADERS, "content-type": "application/json", **headers},
    )
    return status, json.loads(raw)


def test_a_message_through_the_sdk(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=100,
        system="Be brief.",
        messages=[{"role": "user", "content": "hello"}],
    )
    assert message.type == "message" and message.stop_reason == "end_turn"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.usage.output_tokens == 6 and message.usage.input_tokens > 0


def test_a_stream_through_the_sdk(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hello"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 3


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"max_tokens": 5, "n": 2, "messages": [{"role": "user", "content": "x"}]}, "Extra"),
        ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "role"),
        (
            {
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "toolu_x"}],
                    }
                ],
            },
            "tool_use",
        ),
        (
            {"max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]},
            "temperature",
        ),
    ],
    ids=["no-max-tokens", "openai-field", "system-role", "orphan-tool-result", "temperature"],
)
def test_what_anthropic_refuses_the_fake_refuses(
    port: int, body: dict[str, Any], words: str
) -> None:
    status, answer = post(port, {"model": MODEL, **body})
    assert status == 400
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    assert words in answer["error"]["message"]


def test_headers_are_required(port: int) -> None:
    status, answer = post(
        port, {"model": MODEL, "max_tokens": 5, "messages": []}, **{"x-api-key": ""}
    )
    assert status == 401 and answer["error"]["type"] == "authentication_error"


def test_faults_in_anthropics_shape(client: anthropic.Anthropic) -> None:
    request = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(anthropic.InternalServerError) as caught:
        client.messages.create(**request, extra_headers={"x-fake-fault": "503"})  # type: ignore[call-overload]
    assert caught.value.status_code == 529
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(**request, extra_headers={"x-fake-fault": "429"})  # type: ignore[call-overload]


# -- the gateway's translation against the fake ---------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"tools": TOOLS, "tool_choice": "auto", "temperature": 0.5, "stop": ["END"]},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "weather"}}},
        {"user": "jane", "parallel_tool_calls": False, "tools": TOOLS},
    ],
    ids=["plain", "tools-auto", "tools-forced", "user-no-parallel"],
)
def test_translated_requests_pass_the_fake_and_come_back_as_openai(
    port: int, extra: dict[str, Any]
) -> None:
    body = {"model": "claude", "messages": CONVERSATION, **extra}
    status, answer = post(port, translation.messages_request(body, MODEL, 64))
    assert status == 200, answer
    out = ChatCompletion.model_validate(translation.chat_completion(answer, "claude"))
    if extra.get("tool_choice", {}) == TOOLS[0] or isinstance(extra.get("tool_choice"), dict):
        assert out.choices[0].finish_reason == "tool_calls"
        assert out.choices[0].message.tool_calls is not None
    else:
        assert out.choices[0].finish_reason == "stop" and out.choices[0].message.content
    assert out.usage is not None and out.usage.completion_tokens >= 1


def translated_stream(
    port: int, body: dict[str, Any], include_usage: bool
) -> tuple[translation.StreamTranslator, bytes, list[ChatCompletionChunk]]:
    """The OpenAI `body` translated, streamed by the fake, its events translated back (fed in
    pieces of 5 bytes) and read with the openai SDK's chunk type."""
    status, _, raw = _http(
        port,
        "/v1/messages",
        method="POST",
        body=orjson.dumps(translation.messages_request(body, MODEL, 64)),
        headers={**HEADERS, "content-type": "application/json"},
    )
    assert status == 200, raw
    translator = translation.StreamTranslator("claude", include_usage=include_usage)
    out, chunks = fed_in_pieces(translator, raw)
    return translator, out, chunks


def test_a_translated_stream_from_the_fake_reads_as_openai_chunks(port: int) -> None:
    body = {"model": "claude", "messages": CONVERSATION, "stream": True}
    translator, out, chunks = translated_stream(port, body, include_usage=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == translator.text and len(text.split()) == 6
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert out.endswith(b"data: [DONE]\n\n")


def test_the_openai_sdk_reads_a_translated_error(port: int) -> None:
    """A provider error becomes the OpenAI error the openai SDK raises by status."""
    status, answer = post(port, {"model": MODEL, "max_tokens": 5, "messages": []})
    client_status, body, _ = registry.answer_and_usage(
        "anthropic", "claude", status, orjson.dumps(answer)
    )
    assert client_status == 400 and orjson.loads(body)["error"]["type"] == "invalid_request_error"
    assert issubclass(openai.BadRequestError, openai.APIStatusError)


def test_a_streamed_forced_tool_call_translated(port: int) -> None:
    body = {"model": "claude", "messages": CONVERSATION, "stream": True, "tools": TOOLS,
            "tool_choice": "required"}  # fmt: skip
    _, _, chunks = translated_stream(port, body, include_usage=False)
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert calls[0].function is not None and calls[0].function.name == "weather"
    arguments = "".join(tc.function.arguments or "" for tc in calls if tc.function is not None)
    assert orjson.loads(arguments) == {"fake": "input"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
