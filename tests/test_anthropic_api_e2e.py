"""Anthropic's Messages API at the gateway, through the real Envoy, with the official
`anthropic` SDK as the client: served by an OpenAI-compatible backend (translated to chat
completions and back) and by an Anthropic backend (as it is), streamed and not, with tools,
images, token counts, and every refusal in Anthropic's error shape."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from .conftest import BACKEND_A_SECRET, BACKEND_B_SECRET, Gateway, running_gateway, sha256_hex

pytestmark = pytest.mark.e2e

BRIDGED = "gpt-4o-mini"  # an OpenAI backend (the first fake)
NATIVE = "claude"  # an Anthropic backend (the second fake)
PROVIDER_MODEL = "claude-sonnet-4-5"
RESPONSE_TOKENS = 8  # the fakes' answer length
PNG = base64.b64encode(bytes.fromhex("89504e470d0a1a0a")).decode()  # a PNG's signature


def with_anthropic(config: dict) -> None:
    fake_b = config["backends"]["fake-b"]["url"].rstrip("/")
    config["backends"]["anthropic"] = {
        "url": f"{fake_b}/v1",
        "type": "anthropic",
        "api_key": {"env": "TEST_BACKEND_B_KEY"},
    }
    config["models"][NATIVE] = {"targets": [{"backend": "anthropic", "model": PROVIDER_MODEL}]}
    # A canary split between two Anthropic backends: Envoy chooses, each attempt goes as the
    # client sent it (the upstream stage sets its credential and model name).
    config["backends"]["anthropic-next"] = {**config["backends"]["anthropic"]}
    config["models"]["claude-canary"] = {
        "targets": [
            {"backend": "anthropic", "model": PROVIDER_MODEL, "weight": 50},
            {"backend": "anthropic-next", "model": "claude-next", "weight": 50},
        ]
    }
    # One request a minute: the second gets Anthropic's 429.
    config["teams"]["team-q"] = {
        "keys": [{"sha256": sha256_hex("sk-team-q")}],
        "limits": [{"window": "minute", "requests": 1}],
    }
    config.setdefault("guards", {})["deny-out"] = {"type": "deny", "keywords": ["self-destruct"]}
    config["models"]["guarded"] = {
        "targets": [{"backend": "fake-a"}],
        "guardrails": {"response": ["deny-out"]},
    }


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("anthropic-api"), edit=with_anthropic) as g:
        yield g


def client(gw: Gateway, key: str = "sk-team-a") -> anthropic.Anthropic:
    # The gateway's base URL without OpenAI's /v1: the SDK adds its own paths.
    base = gw.base_url.removesuffix("/v1")
    return anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)


def last_sent(gw: Gateway, fake: str) -> dict:
    return gw.fake_requests(fake)[-1]


HI = [{"role": "user", "content": "hi"}]


# -- served by an OpenAI backend ----------------------------------------------------------------


def test_a_message_served_by_an_openai_backend(gw: Gateway) -> None:
    raw = client(gw).messages.with_raw_response.create(
        model=BRIDGED, max_tokens=64, system="Be brief.", messages=HI
    )
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.stop_reason == "end_turn"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.usage.output_tokens == RESPONSE_TOKENS and message.usage.input_tokens > 0
    assert raw.headers["x-aigw-completion-tokens"] == str(RESPONSE_TOKENS)
    sent = last_sent(gw, gw.fake_a)
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert sent["body"]["max_completion_tokens"] == 64
    assert sent["headers"]["authorization"] == f"Bearer {BACKEND_A_SECRET}"
    # The client's key and its API's own headers never go to a backend of another API.
    assert "x-api-key" not in sent["headers"]
    assert "anthropic-version" not in sent["headers"]


def test_a_stream_served_by_an_openai_backend(gw: Gateway) -> None:
    with client(gw).messages.stream(model=BRIDGED, max_tokens=64, messages=HI) as stream:
        events = [event.type for event in stream]
        message = stream.get_final_message()
    assert message.usage.output_tokens == RESPONSE_TOKENS and message.usage.input_tokens > 0
    assert message.stop_reason == "end_turn" and message.content[0].type == "text"
    # Anthropic's order: the message, its one block, the message's end.
    core = [e for e in events if e not in ("text", "ping")]
    assert core[:2] == ["message_start", "content_block_start"]
    assert core[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(core[2:-3]) == {"content_block_delta"}
    sent = last_sent(gw, gw.fake_a)
    assert sent["body"]["stream"] is True
    assert sent["body"]["stream_options"] == {"include_usage": True}


READ_FILE = {
    "name": "read_file",
    "description": "Read a file of the repository",
    "input_schema": {
        "type": "object",
        "properties": {"path": {"type": "string"}},
        "required": ["path"],
    },
}


@pytest.mark.parametrize("model", [BRIDGED, NATIVE])
def test_a_coding_agents_tool_use_over_turns(gw: Gateway, model: str) -> None:
    """A coding agent's loop: the model calls a tool (streamed, as Claude Code asks), the
    client runs it and sends the result, the model answers."""
    agent = client(gw)
    turns: list = [{"role": "user", "content": "What does README.md say?"}]
    with agent.messages.stream(
        model=model,
        max_tokens=256,
        system="You are a coding agent.",
        tools=[READ_FILE],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "read_file"},
        messages=turns,
    ) as stream:
        first = stream.get_final_message()
    assert first.stop_reason == "tool_use"
    [use] = [block for block in first.content if block.type == "tool_use"]
    assert use.name == "read_file" and isinstance(use.input, dict)
    turns += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "# extproc"},
                {"type": "text", "text": "Summarize it."},
            ],
        },
    ]
    second = agent.messages.create(
        model=model,
        max_tokens=256,
        tools=[READ_FILE],
        messages=turns,  # type: ignore[list-item]
    )
    assert second.stop_reason == "end_turn" and second.content[0].type == "text"
    sent = last_sent(gw, gw.fake_a if model == BRIDGED else gw.fake_b)["body"]
    if model == BRIDGED:
        # The tool result answers the call right after it, as chat completions want it.
        assert sent["messages"][1]["tool_calls"][0]["id"] == use.id
        assert sent["messages"][2] == {
            "role": "tool",
            "tool_call_id": use.id,
            "content": "# extproc",
        }
        assert sent["messages"][3] == {
            "role": "user",
            "content": [{"type": "text", "text": "Summarize it."}],
        }
    else:
        assert sent["messages"] == turns


def test_an_image_reaches_an_openai_backend_as_a_data_url(gw: Gateway) -> None:
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "text", "text": "What is this?"},
    ]
    client(gw).messages.create(
        model=BRIDGED, max_tokens=16, messages=[{"role": "user", "content": content}]
    )
    parts = last_sent(gw, gw.fake_a)["body"]["messages"][0]["content"]
    assert parts[0] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    assert parts[1] == {"type": "text", "text": "What is this?"}


def test_a_guard_ends_a_translated_stream_with_an_error_event(gw: Gateway) -> None:
    said = {"x-fake-response-text": "Initiating self-destruct sequence now."}
    stream = client(gw).messages.create(
        model="guarded", max_tokens=64, messages=HI, stream=True, extra_headers=said
    )
    texts: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as info:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                texts.append(event.delta.text)
    assert "self-destruct" not in "".join(texts)
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_a_guard_blocks_a_translated_answer_in_anthropics_shape(gw: Gateway) -> None:
    said = {"x-fake-response-text": "Initiating self-destruct sequence now."}
    with pytest.raises(anthropic.APIStatusError) as info:
        client(gw).messages.create(model="guarded", max_tokens=64, messages=HI, extra_headers=said)
    assert info.value.status_code == 403 and error_of(info.value)["type"] == "permission_error"


# -- served by an Anthropic backend -------------------------------------------------------------


def test_an_anthropic_backend_gets_the_request_as_it_is(gw: Gateway) -> None:
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    request = {
        "model": NATIVE,
        "max_tokens": 64,
        "system": system,
        "messages": HI,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    raw = client(gw).messages.with_raw_response.create(
        **request, extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"}
    )
    message = raw.parse()
    assert message.model == PROVIDER_MODEL and message.content
    assert raw.headers["x-aigw-backend"] == "anthropic"
    assert raw.headers["x-aigw-completion-tokens"] == str(message.usage.output_tokens)
    sent = last_sent(gw, gw.fake_b)
    assert sent["path"] == "/v1/messages"
    # cache_control and thinking kept, only the model renamed.
    assert sent["body"] == {**request, "model": PROVIDER_MODEL}
    assert sent["headers"]["x-api-key"] == BACKEND_B_SECRET
    assert sent["headers"]["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert "authorization" not in sent["headers"]


def test_a_canary_of_anthropic_backends_gets_the_request_as_it_is(gw: Gateway) -> None:
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    served = set()
    for _ in range(8):
        with client(gw).messages.stream(
            model="claude-canary",
            max_tokens=64,
            system=system,  # type: ignore[arg-type]
            messages=HI,
            extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"},
        ) as stream:
            message = stream.get_final_message()
        served.add(message.model)
        sent = last_sent(gw, gw.fake_b)
        assert sent["path"] == "/v1/messages"
        assert sent["body"]["system"] == system  # prompt caching kept
        assert sent["body"]["model"] == message.model
        assert sent["headers"]["anthropic-beta"] == "interleaved-thinking-2025-05-14"
        assert sent["headers"]["x-api-key"] == BACKEND_B_SECRET
    assert served <= {PROVIDER_MODEL, "claude-next"} and served


def test_an_anthropic_backends_stream_goes_as_it_is(gw: Gateway) -> None:
    with client(gw).messages.stream(model=NATIVE, max_tokens=64, messages=HI) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text and message.usage.output_tokens > 0
    assert message.model == PROVIDER_MODEL


# -- counting, identity, refusals ---------------------------------------------------------------


def test_count_tokens_is_answered_by_the_gateway(gw: Gateway) -> None:
    before = len(gw.fake_requests(gw.fake_a))
    short = client(gw).messages.count_tokens(model=BRIDGED, messages=HI)
    long = client(gw).messages.count_tokens(
        model=BRIDGED, messages=[{"role": "user", "content": "hi " * 100}]
    )
    assert 0 < short.input_tokens < long.input_tokens
    assert len(gw.fake_requests(gw.fake_a)) == before  # no model was asked


def error_of(exc: anthropic.APIStatusError) -> dict:
    body = exc.response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return body["error"]


def test_a_wrong_key_is_anthropics_authentication_error(gw: Gateway) -> None:
    with pytest.raises(anthropic.AuthenticationError) as info:
        client(gw, key="sk-wrong-key-1234").messages.create(
            model=BRIDGED, max_tokens=8, messages=HI
        )
    assert error_of(info.value)["type"] == "authentication_error"


def test_an_unknown_model_is_anthropics_not_found_error(gw: Gateway) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client(gw).messages.create(model="no-such-model", max_tokens=8, messages=HI)
    assert error_of(info.value)["type"] == "not_found_error"


def test_a_malformed_request_is_anthropics_invalid_request_error(gw: Gateway) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client(gw).messages.create(
            model=BRIDGED, max_tokens=8, messages=[{"role": "system", "content": "x"}]
        )
    assert error_of(info.value)["type"] == "invalid_request_error"


def test_quota_is_anthropics_rate_limit_error_with_retry_after(gw: Gateway) -> None:
    quota = client(gw, key="sk-team-q")
    quota.messages.create(model=BRIDGED, max_tokens=8, messages=HI)
    with pytest.raises(anthropic.RateLimitError) as info:
        quota.messages.create(model=BRIDGED, max_tokens=8, messages=HI)
    assert error_of(info.value)["type"] == "rate_limit_error"
    assert int(info.value.response.headers["retry-after"]) > 0


def test_envoys_own_reply_is_in_anthropics_shape(gw: Gateway) -> None:
    # The dead backend refuses connections: Envoy answers 503 itself.
    with pytest.raises(anthropic.APIStatusError) as info:
        client(gw).messages.create(model="dead-model", max_tokens=8, messages=HI)
    assert info.value.status_code == 503
    assert error_of(info.value)["type"] == "api_error"


def test_a_wrong_method_is_anthropics_error(gw: Gateway) -> None:
    url = f"{gw.base_url.removesuffix('/v1')}/v1/messages"
    request = urllib.request.Request(url, headers={"x-api-key": "sk-team-a"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request)
    assert info.value.code == 405
    assert json.loads(info.value.read())["error"]["type"] == "invalid_request_error"


def test_requests_are_counted_by_api(gw: Gateway) -> None:
    client(gw).messages.create(model=BRIDGED, max_tokens=8, messages=HI)
    port = gw.config["observability"]["metrics"]["listen"].rsplit(":", 1)[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
        text = resp.read().decode()
    lines = [
        line
        for line in text.splitlines()
        if line.startswith("extproc_requests_total{") and 'api="anthropic"' in line
    ]
    assert lines and any(f'model="{BRIDGED}"' in line for line in lines)


def test_a_file_by_id_is_refused_in_anthropics_shape(gw: Gateway) -> None:
    # Anthropic's Files API is not passed: no team's file is recorded, so none is resolved
    # with the gateway's key.
    document: Any = {"type": "document", "source": {"type": "file", "file_id": "file_011abc"}}
    messages: Any = [{"role": "user", "content": [document, {"type": "text", "text": "Sum up."}]}]
    before = len(gw.fake_requests(gw.fake_b))
    with pytest.raises(anthropic.NotFoundError) as raised:
        client(gw).messages.create(model=NATIVE, max_tokens=16, messages=messages)
    assert raised.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert len(gw.fake_requests(gw.fake_b)) == before
