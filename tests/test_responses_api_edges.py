"""Edge cases of OpenAI's Responses API at the gateway, beyond the main path of
test_responses_api_e2e.py: the guards reading every text of a request and an answer (function
outputs given as parts, messages with no type, function-call arguments, refusals, reasoning),
a guarded stream bridged from chat chunks keeping each call's arguments and masking vLLM's
reasoning, a stream whose model has response guards sent as chat completions even to a backend
that serves the Responses API, the stateful parameters refused on every path, the counting of
files and of a cut stream's reasoning, and the accounting in the audit record.

The unit tests drive the Responses wire format, the chat bridge and the stream relays; the e2e
ones go through the real Envoy with the `openai` SDK."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import yaml

from extproc import routing, settlement
from extproc.config import build_runtime, parse_config
from extproc.errors import GatewayError
from extproc.guard.pipeline import compile_guard, stream_finder
from extproc.tokens import TokenCounter
from extproc.wire.bridge import BridgedStream
from extproc.wire.openai import OPENAI
from extproc.wire.openai.request import CHAT as CHAT_ENDPOINT
from extproc.wire.responses import INPUT_TOKENS, RESPONSES, RESPONSES_API
from extproc.wire.responses.chat_bridge import BRIDGE
from extproc.wire.responses.stream import ResponsesRelay

from .conftest import Gateway, running_gateway, sha256_hex
from .test_downstream import QUICKSTART

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return sse({"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def completed_response(out: bytes) -> dict[str, Any]:
    """The Response of a translated stream's response.completed event."""
    [done] = [
        orjson.loads(line[6:])
        for line in out.split(b"\n")
        if line.startswith(b"data: ") and b'"response.completed"' in line
    ]
    return done["response"]


def guarded_bridge() -> BridgedStream:
    """A Responses stream translated from chat chunks a PII response guard (email, masked)
    judges, as the downstream stage makes it for a bridged guarded stream."""
    data = yaml.safe_load(QUICKSTART.read_text())
    data["guards"] = {"pii-out": {"type": "pii", "action": "mask", "entities": ["email"]}}
    data["guardrails"] = {"response": ["pii-out"]}
    specs = parse_config(data).guards
    find, holdback, owners = stream_finder([compile_guard(n, s, None) for n, s in specs.items()])
    inner = OPENAI.guarded_stream_relay(CHAT_ENDPOINT, False, find, holdback, owners)
    return BridgedStream(inner, BRIDGE.stream("m", 3, {"input": "x"}))


# -- what the guards read -----------------------------------------------------------------------


def test_response_guards_read_function_call_arguments_refusals_and_reasoning() -> None:
    answer = {
        "output": [
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "r"}]},
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "content": [{"type": "refusal", "refusal": "no"}],
            },
            {
                "type": "function_call",
                "id": "fc_1",
                "call_id": "c",
                "name": "f",
                "arguments": '{"a": "x"}',
            },
        ]
    }
    texts = sorted(s.get() for s in RESPONSES_API.answer_slots(RESPONSES, answer))
    assert texts == sorted(["r", "no", '{"a": "x"}'])


@pytest.mark.parametrize(
    "item",
    [
        # A function output given as parts: the bridge sends them as the tool message's text.
        {
            "type": "function_call_output",
            "call_id": "c1",
            "output": [{"type": "input_text", "text": "SECRET-TEXT"}],
        },
        # A message whose type is null (the SDK's types allow it): the bridge reads it by role.
        {"type": None, "role": "user", "content": "SECRET-TEXT"},
    ],
    ids=["function-output-parts", "message-of-null-type"],
)
def test_request_guards_read_every_text_the_backend_gets(item: dict[str, Any]) -> None:
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    body = {"model": "m", "input": [call, item]}
    assert b"SECRET-TEXT" in orjson.dumps(BRIDGE.request(RESPONSES, body))
    assert "SECRET-TEXT" in [s.get() for s in RESPONSES_API.request_slots(RESPONSES, body)]


def test_a_malformed_native_answer_is_read_without_raising() -> None:
    """A backend's 2xx answer of an odd shape: reading its text or judging it must not raise (a
    raise is the sidecar's internal error for the request)."""
    odd = {"output": [{"type": "message", "content": 1}, {"type": "reasoning", "summary": 1}]}
    RESPONSES_API.answer_text(odd)
    RESPONSES_API.answer_slots(RESPONSES, odd)
    RESPONSES_API.drop_logprobs({"output": 5})


# -- a guarded stream bridged from chat chunks --------------------------------------------------


def test_a_guarded_bridged_stream_keeps_each_parallel_calls_arguments() -> None:
    """The guard holds each call's text back and releases the tails with the finish chunk, after
    the second call started: the first call's arguments still reach its item."""

    def call(index: int, **fn: Any) -> bytes:
        return chunk({"tool_calls": [{"index": index, **fn}]})

    out = guarded_bridge().feed(
        call(0, id="call_a", type="function", function={"name": "f", "arguments": ""})
        + call(0, function={"arguments": '{"city": "Paris"}'})
        + call(1, id="call_b", type="function", function={"name": "f", "arguments": ""})
        + call(1, function={"arguments": '{"city": "Rome"}'})
        + chunk({}, "tool_calls")
        + sse({"id": "c", "choices": [],
               "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
        + b"data: [DONE]\n\n",
        True,
    )  # fmt: skip
    arguments = [i["arguments"] for i in completed_response(out)["output"]]
    assert arguments == ['{"city": "Paris"}', '{"city": "Rome"}']


def test_a_guarded_bridged_stream_keeps_a_call_after_text() -> None:
    """Text then one call (the usual agent turn): the message's tail and the call's arguments
    both come with the finish chunk; neither closes the other's item empty."""
    call = {"index": 0, "id": "call_a", "type": "function",
            "function": {"name": "f", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    out = guarded_bridge().feed(
        chunk({"role": "assistant", "content": "Let me check."})
        + chunk({"tool_calls": [call]})
        + chunk({}, "tool_calls")
        + b"data: [DONE]\n\n",
        True,
    )
    output = completed_response(out)["output"]
    assert [(i["type"], i.get("arguments")) for i in output] == [
        ("message", None),
        ("function_call", '{"city": "Paris"}'),
    ]
    assert output[0]["content"][0]["text"] == "Let me check."


def test_a_guarded_bridged_stream_masks_vllms_reasoning() -> None:
    """vLLM names a chat delta's reasoning `reasoning`; the bridge shows it as the reasoning
    summary, so the guard masks it as it masks `reasoning_content`."""
    out = guarded_bridge().feed(
        chunk({"reasoning": "mail jane.doe@example.com now"})
        + chunk({"content": "ok"})
        + chunk({}, "stop")
        + b"data: [DONE]\n\n",
        True,
    )
    assert b"jane.doe@example.com" not in out
    assert b"mail " in out  # the reasoning is there, masked


def test_a_bridged_streams_backend_error_is_the_requests_error_code() -> None:
    """A chat error chunk mid-stream ends the Responses stream with response.failed, and the
    downstream stage records the backend's error (BridgedStream.error_code)."""
    stream = BridgedStream(OPENAI.stream_relay(False), BRIDGE.stream("m", 3, {"input": "x"}))
    out = stream.feed(
        chunk({"content": "hi"}) + sse({"error": {"message": "boom", "code": "server_error"}}),
        False,
    )
    assert b"response.failed" in out
    assert stream.error_code is not None


# -- a stream whose model has response guards goes as chat completions --------------------------


def test_only_an_unguarded_stream_is_served_natively() -> None:
    runtime = build_runtime(
        parse_config(
            {
                "teams": {"t": {"keys": [{"sha256": sha256_hex("sk-t")}]}},
                "backends": {
                    "responses": {"url": "https://oa.example/v1", "responses_api": True},
                    "responses-2": {"url": "https://oa2.example/v1", "responses_api": True},
                    "chat": {"url": "https://vllm.example/v1"},
                },
                "models": {
                    "native": {"targets": [{"backend": "responses"}]},
                    "chat": {"targets": [{"backend": "chat"}]},
                    # Envoy chooses: natively only when every backend serves the API.
                    "split": {
                        "targets": [
                            {"backend": "responses", "weight": 50},
                            {"backend": "responses-2", "weight": 50},
                        ]
                    },
                    "mixed": {
                        "targets": [
                            {"backend": "responses", "weight": 50},
                            {"backend": "chat", "weight": 50},
                        ]
                    },
                },
            }
        )
    )
    native = routing.fixed_target(runtime, "native")
    assert routing.served_natively(runtime, "native", native, RESPONSES_API)
    assert not routing.served_natively(
        runtime, "native", native, RESPONSES_API, guarded_stream=True
    )
    chat = routing.fixed_target(runtime, "chat")
    assert not routing.served_natively(runtime, "chat", chat, RESPONSES_API)
    assert routing.served_natively(runtime, "split", None, RESPONSES_API)
    assert not routing.served_natively(runtime, "mixed", None, RESPONSES_API)


# -- stored state --------------------------------------------------------------------------------

# (A previous_response_id is the team's own stored Response, or a 404: test_responses_api_e2e.)
STATEFUL = [
    ("conversation", "conv_1"),
    ("conversation", {"id": "conv_1"}),
    ("background", True),
]


@pytest.mark.parametrize("endpoint", [RESPONSES, INPUT_TOKENS], ids=["responses", "input_tokens"])
@pytest.mark.parametrize(("param", "value"), STATEFUL)
def test_stored_state_is_refused_before_any_backend_is_chosen(
    endpoint: Any, param: str, value: Any
) -> None:
    """Refused on parsing, whatever the backend speaks: the gateway does not know which team
    a conversation is, and a background response would run past its settlement."""
    body = {"model": "m", "input": "hi", param: value}
    with pytest.raises(GatewayError) as info:
        RESPONSES_API.parse(endpoint, orjson.dumps(body))
    err = info.value
    assert (err.status, err.code, err.param) == (400, "unsupported_parameter", param)


def test_stored_state_left_unset_is_accepted() -> None:
    body = {"model": "m", "input": "hi", "previous_response_id": None, "background": False}
    assert RESPONSES_API.parse(RESPONSES, orjson.dumps(body)).model == "m"


# -- counting -----------------------------------------------------------------------------------


def test_a_native_stream_cut_in_its_reasoning_counts_the_delivered_reasoning() -> None:
    """A stream cut before its response.completed is counted from what reached the client, its
    reasoning summary's deltas included."""
    relay = ResponsesRelay()
    delta = {"type": "response.reasoning_summary_text.delta", "delta": "step " * 400}
    relay.feed(b"event: response.reasoning_summary_text.delta\n" + sse(delta), False)
    usage = settlement.stream_usage(relay, 10, TokenCounter(), "gpt-4o", None)
    assert usage.completion_tokens >= 400


def test_an_input_file_is_counted_as_chats_file_part() -> None:
    """A PDF by data is counted as the chat `file` part it is sent as, never as its base64
    text: the same request reserves (and is checked against limits) alike on both paths."""
    data = "data:application/pdf;base64," + "QUJD" * 25_000  # ~100 KB
    content = [
        {"type": "input_text", "text": "Summarize"},
        {"type": "input_file", "filename": "a.pdf", "file_data": data},
    ]
    body = {"model": "gpt-4o", "input": [{"role": "user", "content": content}]}
    counter = TokenCounter()
    parsed = RESPONSES_API.parse(RESPONSES, orjson.dumps(body))
    counted = asyncio.run(RESPONSES_API.count_prompt(counter, parsed, team=None, budget=None))
    as_chat = counter.count_chat("gpt-4o", BRIDGE.request(RESPONSES, body)["messages"]).tokens
    assert counted.tokens < as_chat + 1000, (counted.tokens, as_chat)


# -- through Envoy ------------------------------------------------------------------------------

BRIDGED = "gpt-4o-mini"  # the first fake, chat completions; no response guard
GUARDED = "guarded"  # the first fake, chat completions; response guard deny-out
MASKED = "gpt-4o"  # the first fake, chat completions; response guard pii-out (email, masked)
NATIVE = "gpt-native"  # the second fake's Responses API; no response guard
NATIVE_GUARDED = "gpt-native-guarded"  # the second fake's Responses API; deny-out
AUDIT = "audit.jsonl"


def edit(config: dict) -> None:
    fake_b = config["backends"]["fake-b"]["url"].rstrip("/")
    config["backends"]["responses"] = {
        "url": f"{fake_b}/v1",
        "api_key": {"env": "TEST_BACKEND_B_KEY"},
        "responses_api": True,
    }
    native = {"backend": "responses", "model": "fake-gpt-5"}
    config["models"][NATIVE] = {"targets": [native]}
    config["models"][NATIVE_GUARDED] = {
        "targets": [native],
        "guardrails": {"response": ["deny-out"]},
    }
    config["models"][GUARDED] = {
        "targets": [{"backend": "fake-a"}],
        "guardrails": {"response": ["deny-out"]},
    }
    config["models"][MASKED]["guardrails"] = {"response": ["pii-out"]}
    config["guards"] = {
        "deny-in": {"type": "deny", "keywords": ["forbidden"]},
        "deny-out": {"type": "deny", "keywords": ["fake"]},  # the fake's tool arguments
        "pii-out": {"type": "pii", "action": "mask", "entities": ["email"]},
    }
    config["guardrails"] = {"request": ["deny-in"], "response": []}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("responses-edges")

    def with_audit(config: dict) -> None:
        edit(config)
        config["observability"]["audit"] = {"path": str(tmp / AUDIT)}

    with running_gateway(tmp, edit=with_audit) as g:
        yield g


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="sk-team-a", max_retries=0)


def audit_lines(gw: Gateway) -> list[str]:
    path = Path(gw.config["observability"]["audit"]["path"])
    return path.read_text().splitlines() if path.exists() else []


def new_records(gw: Gateway, before: int, count: int, **fields: Any) -> list[dict[str, Any]]:
    """The records after the first `before` that have `fields`, once there are `count`. Chosen
    by their fields, not their place: a record is written when its request settles, which may
    be after the client has its answer, so the previous test's last one can land after
    `before` was counted (seen in CI)."""
    for _ in range(100):
        records = [json.loads(line) for line in audit_lines(gw)[before:]]
        found = [r for r in records if all(r.get(k) == v for k, v in fields.items())]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{count} audit records with {fields} expected: {records}")


def turns(output: Any) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": output},
    ]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "input_",
    [
        turns("forbidden"),
        turns([{"type": "input_text", "text": "forbidden"}]),
        [{"type": None, "role": "user", "content": "forbidden"}],
    ],
    ids=["function-output", "function-output-parts", "message-of-null-type"],
)
def test_a_denied_word_anywhere_in_the_input_is_blocked(gw: Gateway, input_: Any) -> None:
    before = len(gw.fake_requests(gw.fake_a))
    with pytest.raises(openai.PermissionDeniedError):
        client(gw).responses.create(model=MASKED, input=input_)
    assert len(gw.fake_requests(gw.fake_a)) == before  # nothing went upstream


@pytest.mark.e2e
@pytest.mark.parametrize("model", [GUARDED, NATIVE_GUARDED])
def test_a_denied_word_in_function_call_arguments_is_blocked(gw: Gateway, model: str) -> None:
    """The fakes call the tool with {"city": "fake"}, a word the response guard denies: in the
    chat answer translated for the client and in the Responses backend's own answer alike."""
    with pytest.raises(openai.PermissionDeniedError):
        client(gw).responses.create(
            model=model,
            input="weather?",
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "name": "get_weather"},
        )


@pytest.mark.e2e
def test_a_guarded_stream_with_parallel_calls_keeps_their_arguments(gw: Gateway) -> None:
    with client(gw).responses.stream(
        model=MASKED,
        input="weather?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        extra_headers={"x-fake-parallel-tools": "2"},
    ) as stream:
        for _ in stream:
            pass
        response = stream.get_final_response()
    calls = [i for i in response.output if i.type == "function_call"]
    assert [json.loads(c.arguments) for c in calls] == [{"city": "fake"}] * 2


@pytest.mark.e2e
def test_a_guarded_stream_to_a_responses_backend_goes_as_chat_completions(gw: Gateway) -> None:
    """The response guards judge chat chunks: the stream goes to the backend as chat completions,
    and the client's events are rebuilt from them, whole and in order. The same request
    unstreamed goes as it is."""
    with client(gw).responses.stream(model=NATIVE_GUARDED, input="hi") as stream:
        events = list(stream)
        response = stream.get_final_response()
    sent = gw.fake_requests(gw.fake_b)[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["model"] == "fake-gpt-5"
    assert sent["body"]["messages"] == [{"role": "user", "content": "hi"}]
    assert sent["body"]["stream"] is True
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == response.output_text
    assert response.status == "completed" and response.usage is not None
    assert response.usage.output_tokens > 0

    client(gw).responses.create(model=NATIVE_GUARDED, input="hi")
    sent = gw.fake_requests(gw.fake_b)[-1]
    assert sent["path"] == "/v1/responses"
    assert sent["body"] == {"model": "fake-gpt-5", "input": "hi"}


@pytest.mark.e2e
@pytest.mark.parametrize(("param", "value"), STATEFUL)
def test_stored_state_is_refused_for_a_backend_that_keeps_it(
    gw: Gateway, param: str, value: Any
) -> None:
    """A backend that serves the Responses API would add to any conversation under the
    gateway's one key, or run a response past its settlement: refused, naming the parameter,
    before it is asked anything."""
    before = len(gw.fake_requests(gw.fake_b))
    for call in (client(gw).responses.create, client(gw).responses.input_tokens.count):
        with pytest.raises(openai.BadRequestError) as info:
            call(model=NATIVE, input="hi", extra_body={param: value})
        assert info.value.body["code"] == "unsupported_parameter"  # type: ignore[index]
        assert info.value.body["param"] == param  # type: ignore[index]
    assert len(gw.fake_requests(gw.fake_b)) == before


@pytest.mark.e2e
@pytest.mark.parametrize(("model", "stream"), [(NATIVE, False), (NATIVE, True),
                                               (BRIDGED, False), (BRIDGED, True)])  # fmt: skip
def test_the_audit_record_has_the_usage_the_client_got(
    gw: Gateway, model: str, stream: bool
) -> None:
    before = len(audit_lines(gw))
    reasoning = {"x-fake-reasoning-tokens": "3"}
    if stream:
        with client(gw).responses.stream(model=model, input="hi", extra_headers=reasoning) as s:
            response = s.get_final_response()
    else:
        response = client(gw).responses.create(model=model, input="hi", extra_headers=reasoning)
    [record] = new_records(gw, before, 1, model=model, stream=stream, status=200)
    usage = response.usage
    assert usage is not None and record["api"] == "responses"
    assert record["tokens"]["input"] == usage.input_tokens
    assert record["tokens"]["reasoning_output"] == usage.output_tokens_details.reasoning_tokens
    assert record["tokens"]["output"] == usage.output_tokens
    assert record["tokens"]["total"] == usage.total_tokens


@pytest.mark.e2e
def test_a_failed_native_stream_is_recorded_as_the_backends_error(gw: Gateway) -> None:
    before = len(audit_lines(gw))
    failed = {"x-fake-response-failed": "server_error:5"}
    with client(gw).responses.stream(model=NATIVE, input="hi", extra_headers=failed) as stream:
        kinds = [e.type for e in stream]
    assert kinds[-1] == "response.failed"
    [record] = new_records(gw, before, 1, model=NATIVE, stream=True)
    assert record["error_code"] and record["error_code"].startswith("provider_error"), record
    assert record["tokens"] is not None, record


@pytest.mark.e2e
def test_a_canary_split_is_settled_from_the_chat_usage(gw: Gateway) -> None:
    """A canary split is bridged per attempt (each backend gets chat completions)."""
    before = len(audit_lines(gw))
    answered = client(gw).responses.create(model="canary", input="hi")
    with client(gw).responses.stream(model="canary", input="hi") as stream:
        streamed = stream.get_final_response()
    records = new_records(gw, before, 2, model="canary")
    for response, record in zip((answered, streamed), records, strict=True):
        assert response.usage is not None and response.output_text
        assert record["tokens"]["output"] == response.usage.output_tokens
        assert record["tokens"]["input"] == response.usage.input_tokens


@pytest.mark.e2e
def test_envoys_own_replies_to_a_responses_client_are_openais(gw: Gateway) -> None:
    """A dead backend (Envoy's 503) and a chunked body over the limit (Envoy's 413, before the
    sidecar sees it) are in OpenAI's error shape on the Responses API's path."""
    with pytest.raises(openai.APIStatusError) as info:
        client(gw).responses.create(model="dead-model", input="hi")
    assert info.value.status_code == 503
    assert set(info.value.response.json()) == {"error"}

    host, port = gw.base_url.removeprefix("http://").removesuffix("/v1").split(":")
    big = json.dumps({"model": BRIDGED, "input": "x" * 300_000}).encode()
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(
            "POST",
            "/v1/responses",
            body=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
            headers={"authorization": "Bearer sk-team-a", "content-type": "application/json"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 413
    assert body["error"]["code"] == "request_too_large", body
