"""The fake's OpenAI Responses API (extproc/devtools/fake_llm/responses.py), driven through the
official `openai` SDK and checked against the SDK's own types: answers, streams, function calls,
stored responses and the conversations `previous_response_id` continues, the refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from openai.types.responses import (
    InputTokenCountResponse,
    Response,
    ResponseItemList,
    ResponseStreamEvent,
)
from pydantic import TypeAdapter

from extproc.devtools.fake_llm import FakeLLMSettings

from .test_fake_llm import _http, _running

MODEL = "gpt-test"
CANNED = "".join(f" tok{i}" for i in range(6))  # the fake's answer at response_tokens=6
WEATHER = {
    "type": "function",
    "name": "weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
        "additionalProperties": False,
    },
    "strict": True,
}
FORCE_WEATHER = {"type": "function", "name": "weather"}
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with _running(FakeLLMSettings(name="fake-responses", response_tokens=6)) as bound:
        yield bound


@pytest.fixture
def client(port: int) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0, timeout=5
    )


def post(port: int, body: Any, path: str = "/v1/responses", **headers: str) -> tuple[int, Any]:
    status, _, raw = _http(
        port,
        path,
        method="POST",
        body=orjson.dumps(body),
        headers={"authorization": "Bearer sk-test", "content-type": "application/json", **headers},
    )
    return status, json.loads(raw)


def sse_events(port: int, body: dict[str, Any], **headers: str) -> tuple[bytes, list[Any]]:
    """A stream's raw bytes and its events, each checked with the SDK's event type (and against
    its `event:` line)."""
    status, _, raw = _http(
        port,
        "/v1/responses",
        method="POST",
        body=orjson.dumps({**body, "stream": True}),
        headers={"content-type": "application/json", **headers},
    )
    assert status == 200, raw
    events = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        name, data = block.split(b"\n")
        payload = json.loads(data.removeprefix(b"data: "))
        assert name == b"event: " + payload["type"].encode()
        events.append(EVENTS.validate_python(payload))
    return raw, events


# -- answers --------------------------------------------------------------------------------------


def test_a_response(client: openai.OpenAI, port: int) -> None:
    raw = client.responses.with_raw_response.create(
        model=MODEL,
        input="hello world!",
        instructions="Be brief.",
        temperature=0.5,
        metadata={"case": "plain"},
    )
    assert raw.headers["x-fake-llm-instance"] == "fake-responses"
    body = json.loads(raw.content)
    response = Response.model_validate(body)  # every field the SDK requires
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.error is None
    assert response.output_text == CANNED
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.status == "completed"
    assert (response.model, response.instructions, response.temperature) == (
        MODEL,
        "Be brief.",
        0.5,
    )
    assert (response.top_p, response.tool_choice, response.tools) == (1.0, "auto", [])
    assert response.metadata == {"case": "plain"} and response.parallel_tool_calls is True
    assert body["store"] is True and response.previous_response_id is None
    usage = response.usage
    assert usage is not None and usage.output_tokens == 6
    # "Be brief." + "hello world!": 21 bytes, 6 tokens at the fake's 4 bytes a token.
    assert usage.input_tokens == 6 and usage.total_tokens == 12
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0
    records = json.loads(_http(port, "/_fake/requests")[2])
    record = next(r for r in reversed(records) if r["path"] == "/v1/responses")
    assert record["method"] == "POST" and record["headers"]["authorization"] == "Bearer sk-test"
    assert record["body"]["input"] == "hello world!"


def test_the_text_asked_for_and_the_cap(client: openai.OpenAI) -> None:
    asked = client.responses.create(
        model=MODEL, input="x", extra_headers={"x-fake-response-text": "Paris is the capital."}
    )
    assert asked.output_text == "Paris is the capital." and asked.status == "completed"
    capped = client.responses.create(
        model=MODEL,
        input="x",
        max_output_tokens=16,
        extra_headers={"x-fake-response-tokens": "40", "x-fake-reasoning-tokens": "3"},
    )
    assert capped.status == "incomplete" and capped.incomplete_details is not None
    assert capped.incomplete_details.reason == "max_output_tokens"
    assert capped.output_text == "".join(f" tok{i}" for i in range(16))
    assert capped.output[0].status == "incomplete"
    assert capped.usage is not None and capped.usage.output_tokens == 16
    assert capped.usage.output_tokens_details.reasoning_tokens == 3
    bare = client.responses.create(model=MODEL, input="x", extra_headers={"x-fake-no-usage": "1"})
    assert bare.usage is None


def test_a_stream(client: openai.OpenAI, port: int) -> None:
    with client.responses.stream(model=MODEL, input=[{"role": "user", "content": "hi"}]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == CANNED
    assert final.status == "completed" and final.usage is not None
    assert final.usage.output_tokens == 6

    raw, checked = sse_events(port, {"model": MODEL, "input": "hi"})
    assert b"[DONE]" not in raw
    assert [e.sequence_number for e in checked] == list(range(len(checked)))
    kinds = [e.type for e in checked]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 6,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert checked[0].response.status == "in_progress" and checked[0].response.output == []
    assert checked[-1].response.usage.output_tokens == 6
    assert all(e.obfuscation for e in checked if e.type == "response.output_text.delta")
    # The completed response is the one stored.
    stored = client.responses.retrieve(checked[-1].response.id)
    assert stored.output_text == CANNED


def test_a_stream_in_pieces_and_cut_short(port: int) -> None:
    _, events = sse_events(
        port,
        {"model": MODEL, "input": "x", "stream_options": {"include_obfuscation": False}},
        **{"x-fake-response-text": "abcdefgh", "x-fake-chunk-chars": "3"},
    )
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [e.delta for e in deltas] == ["abc", "def", "gh"]
    assert not any(e.model_extra.get("obfuscation") for e in deltas)
    _, events = sse_events(
        port,
        {"model": MODEL, "input": "x", "max_output_tokens": 16},
        **{"x-fake-response-tokens": "20"},
    )
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


# -- function calls -------------------------------------------------------------------------------


def test_a_forced_function_call_then_its_output(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=MODEL, input="Weather in Paris?", tools=[WEATHER], tool_choice=FORCE_WEATHER
    )
    [call] = first.output
    assert call.type == "function_call" and call.name == "weather"
    assert call.call_id.startswith("call_") and call.id is not None and call.id.startswith("fc_")
    assert json.loads(call.arguments) == {"city": "fake", "days": 0}
    assert first.tools[0].type == "function" and first.tool_choice.type == "function"

    # The whole conversation given back: the call, then its output.
    second = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": "weather",
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
        tools=[WEATHER],
        tool_choice=FORCE_WEATHER,
        store=False,
    )
    assert second.output[0].type == "message" and second.output_text == CANNED

    # Or continued from the stored response: the output alone.
    third = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[WEATHER],
        tool_choice="required",
    )
    assert third.output_text == CANNED and third.previous_response_id == first.id


def test_required_calls_the_first_function(client: openai.OpenAI) -> None:
    other = {"type": "function", "name": "clock", "parameters": {"type": "object"}}
    response = client.responses.create(
        model=MODEL, input="x", tools=[other, WEATHER], tool_choice="required"
    )
    assert response.output[0].type == "function_call" and response.output[0].name == "clock"
    assert response.output[0].arguments == "{}"
    free = client.responses.create(model=MODEL, input="x", tools=[WEATHER])
    assert free.output[0].type == "message"  # tool_choice auto: the fake answers in words


def test_a_streamed_function_call(client: openai.OpenAI, port: int) -> None:
    with client.responses.stream(
        model=MODEL, input="x", tools=[WEATHER], tool_choice=FORCE_WEATHER
    ) as stream:
        final = stream.get_final_response()
    assert final.output[0].type == "function_call"
    _, events = sse_events(
        port, {"model": MODEL, "input": "x", "tools": [WEATHER], "tool_choice": "required"}
    )
    kinds = [e.type for e in events]
    pieces = kinds.count("response.function_call_arguments.delta")
    assert pieces > 1
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * pieces,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[2].item.arguments == "" and events[2].item.status == "in_progress"
    arguments = "".join(e.delta for e in events if e.type.endswith("arguments.delta"))
    assert arguments == events[-3].arguments == events[-2].item.arguments
    assert json.loads(arguments) == {"city": "fake", "days": 0}


# -- stored responses -----------------------------------------------------------------------------


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="My name is Ada.")
    second = client.responses.create(
        model=MODEL, input="What is my name?", previous_response_id=first.id
    )
    assert second.previous_response_id == first.id
    assert first.usage is not None and second.usage is not None
    # The second reads the first's input and answer too.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert client.responses.retrieve(first.id).output_text == first.output_text

    items = client.responses.input_items.list(second.id)
    [item] = items.data
    assert item.type == "message" and item.role == "user" and item.id.startswith("msg_")
    assert item.content[0].type == "input_text" and item.content[0].text == "What is my name?"

    count = client.responses.input_tokens.count(
        model=MODEL, input="What is my name?", previous_response_id=first.id
    )
    assert isinstance(count, InputTokenCountResponse)
    assert count.input_tokens == second.usage.input_tokens


def test_input_items_page_and_order(client: openai.OpenAI, port: int) -> None:
    response = client.responses.create(
        model=MODEL,
        input=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "one"},
                    {"type": "input_image", "image_url": "https://x.test/a.png"},
                ],
            },
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"},
        ],
    )
    status, _, raw = _http(port, f"/v1/responses/{response.id}/input_items")
    listed = ResponseItemList.model_validate_json(raw)
    assert status == 200 and listed.has_more is False and len(listed.data) == 4
    assert listed.data[0].content[0].text == "three"  # newest first
    assert (listed.first_id, listed.last_id) == (listed.data[0].id, listed.data[-1].id)
    assert listed.data[2].type == "message" and listed.data[2].content[1].detail == "auto"
    page = client.responses.input_items.list(response.id, order="asc", limit=2)
    assert [i.role for i in page.data] == ["developer", "user"]
    assert page.has_more is True
    rest = client.responses.input_items.list(response.id, order="asc", after=page.data[-1].id)
    assert [i.role for i in rest.data] == ["assistant", "user"]


def test_unstored_and_deleted_responses_are_gone(client: openai.OpenAI, port: int) -> None:
    unstored = client.responses.create(model=MODEL, input="x", store=False)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve(unstored.id)
    assert caught.value.body["message"] == f"Response with id '{unstored.id}' not found."
    status, answer = post(port, {"model": MODEL, "input": "y", "previous_response_id": unstored.id})
    assert status == 404
    assert answer == {
        "error": {
            "message": f"Previous response with id '{unstored.id}' not found.",
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": "previous_response_not_found",
        }
    }

    stored = client.responses.create(model=MODEL, input="x")
    status, _, raw = _http(port, f"/v1/responses/{stored.id}", method="DELETE")
    assert status == 200
    assert json.loads(raw) == {"id": stored.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(stored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(stored.id)
    kept = client.responses.create(model=MODEL, input="x")
    client.responses.delete(kept.id)  # through the SDK
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": "x"}, "model", "missing_required_parameter"),
        ({"model": 5, "input": "x"}, "model", "invalid_type"),
        ({"model": MODEL}, "input", "missing_required_parameter"),
        ({"model": MODEL, "input": "x", "messages": []}, "messages", "unknown_parameter"),
        ({"model": MODEL, "input": {"role": "user"}}, "input", "invalid_type"),
        ({"model": MODEL, "input": []}, "input", "empty_array"),
        (
            {"model": MODEL, "input": [{"role": "tool", "content": "x"}]},
            "input[0].role",
            "invalid_value",
        ),
        (
            {"model": MODEL, "input": [{"role": "user", "content": "x", "name": "a"}]},
            "input[0].name",
            "unknown_parameter",
        ),
        (
            {
                "model": MODEL,
                "input": [{"role": "assistant", "content": [{"type": "input_text", "text": "x"}]}],
            },
            "input[0].content[0].type",
            "invalid_value",
        ),
        (
            {
                "model": MODEL,
                "input": [{"type": "function_call_output", "call_id": "call_x", "output": "sunny"}],
            },
            "input",
            None,
        ),
        (
            {
                "model": MODEL,
                "input": [
                    {
                        "type": "function_call",
                        "call_id": "call_x",
                        "name": "weather",
                        "arguments": "{}",
                    }
                ],
            },
            "input",
            None,
        ),
        (
            {"model": MODEL, "input": [{"type": "function_call_output", "output": "x"}]},
            "input[0].call_id",
            "missing_required_parameter",
        ),
        (
            {"model": MODEL, "input": "x", "max_output_tokens": 5},
            "max_output_tokens",
            "integer_below_min_value",
        ),
        (
            {"model": MODEL, "input": "x", "temperature": 3},
            "temperature",
            "decimal_above_max_value",
        ),
        ({"model": MODEL, "input": "x", "stream": "yes"}, "stream", "invalid_type"),
        (
            {
                "model": MODEL,
                "input": "x",
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "name": "clock"},
            },
            "tool_choice",
            None,
        ),
        ({"model": MODEL, "input": "x", "tool_choice": "required"}, "tool_choice", None),
        (
            {
                "model": MODEL,
                "input": "x",
                "tools": [{"type": "function", "function": {"name": "weather"}}],
            },
            "tools[0].function",
            "unknown_parameter",
        ),
        (
            {"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]},
            "tools[0].type",
            "unsupported_parameter",
        ),
        ({"model": MODEL, "input": "x", "metadata": {"a": 1}}, "metadata.a", "invalid_type"),
    ],
    ids=[
        "no-model",
        "model-type",
        "no-input",
        "chat-field",
        "input-object",
        "input-empty",
        "tool-role",
        "message-name",
        "assistant-input-text",
        "orphan-output",
        "call-without-output",
        "output-without-call-id",
        "cap-below-16",
        "temperature",
        "stream-type",
        "unknown-forced-function",
        "required-without-tools",
        "chat-tool-shape",
        "hosted-tool",
        "metadata-value",
    ],
)
def test_what_openai_refuses_the_fake_refuses(
    port: int, body: dict[str, Any], param: str, code: str | None
) -> None:
    status, answer = post(port, body)
    assert status == 400, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error"
    assert (answer["error"]["param"], answer["error"]["code"]) == (param, code)


def test_the_sdk_raises_the_refusal(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model=MODEL,
            input=[{"type": "function_call_output", "call_id": "call_nope", "output": "x"}],
        )
    assert caught.value.body == {  # the SDK hands over the error's inside
        "message": "No tool call found for function call output with call_id call_nope.",
        "type": "invalid_request_error",
        "param": "input",
        "code": None,
    }


def test_a_pending_call_must_be_answered(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=MODEL, input="x", tools=[WEATHER], tool_choice=FORCE_WEATHER
    )
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="go on", previous_response_id=first.id)
    assert "No tool output found for function call" in caught.value.message


def test_input_tokens_counts_and_checks(client: openai.OpenAI, port: int) -> None:
    created = client.responses.create(model=MODEL, input="count me please", instructions="Be kind")
    counted = client.responses.input_tokens.count(
        model=MODEL, input="count me please", instructions="Be kind"
    )
    assert created.usage is not None and counted.input_tokens == created.usage.input_tokens
    assert counted.object == "response.input_tokens"
    status, answer = post(port, {"input": "x", "stream": True}, "/v1/responses/input_tokens")
    assert status == 400 and answer["error"]["param"] == "stream"


# -- faults ---------------------------------------------------------------------------------------


def test_faults_as_on_the_chat_endpoint(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model=MODEL, input="x", extra_headers={"x-fake-fault": "429"})
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model=MODEL, input="x", extra_headers={"x-fake-fault": "503"})
    received = []
    with (
        pytest.raises(openai.APIConnectionError),
        client.responses.stream(
            model=MODEL, input="x", extra_headers={"x-fake-fault": "reset-after:4"}
        ) as stream,
    ):
        for event in stream:
            received.append(event.type)
    assert received[:2] == ["response.created", "response.in_progress"]
    assert len(received) <= 4


def test_a_failed_generation(client: openai.OpenAI, port: int) -> None:
    _, events = sse_events(
        port, {"model": MODEL, "input": "x"}, **{"x-fake-response-failed": "server_error:6"}
    )
    assert len(events) == 7 and events[-1].type == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert [e.sequence_number for e in events] == list(range(7))
    assert client.responses.retrieve(failed.id).status == "failed"
    with pytest.raises(openai.RateLimitError):
        client.responses.create(
            model=MODEL, input="x", extra_headers={"x-fake-response-failed": "rate_limit_exceeded"}
        )
    with pytest.raises(openai.BadRequestError):
        client.responses.create(
            model=MODEL, input="x", extra_headers={"x-fake-response-failed": "boom"}
        )
