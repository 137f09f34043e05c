"""A backend that speaks Anthropic's Messages API behind the one OpenAI endpoint, through the
real Envoy, with the openai SDK as the client and the fake LLM speaking Anthropic's API (it
refuses what Anthropic would)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from .conftest import BACKEND_B_SECRET, Gateway, running_gateway

pytestmark = pytest.mark.e2e

MODEL = "claude"
PROVIDER_MODEL = "claude-sonnet-4-5"
RESPONSE_TOKENS = 8  # the second fake's


def with_anthropic(config: dict) -> None:
    fake_b = config["backends"]["fake-b"]["url"].rstrip("/")
    config["backends"]["anthropic"] = {
        "url": f"{fake_b}/v1",
        "type": "anthropic",
        "api_key": {"env": "TEST_BACKEND_B_KEY"},
        "max_tokens": 64,
    }
    config["models"][MODEL] = {"targets": [{"backend": "anthropic", "model": PROVIDER_MODEL}]}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("provider"), edit=with_anthropic) as gateway:
        yield gateway


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="sk-team-a", max_retries=0)


def last_sent(gw: Gateway) -> dict:
    return gw.fake_requests(gw.fake_b)[-1]


def test_a_chat_completion_served_by_anthropic(gw: Gateway) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    )
    answer = raw.parse()
    assert answer.model == MODEL and answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens == RESPONSE_TOKENS
    assert raw.headers["x-aigw-backend"] == "anthropic"
    assert raw.headers["x-aigw-completion-tokens"] == str(RESPONSE_TOKENS)
    sent = last_sent(gw)
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == BACKEND_B_SECRET
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent["headers"]  # the client's key never goes upstream
    assert sent["body"] == {
        "model": PROVIDER_MODEL,
        "max_tokens": 64,  # the backend's default: Anthropic requires one
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "system": "Be brief.",
    }


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_stream_served_by_anthropic(gw: Gateway, include_usage: bool) -> None:
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(
        client(gw).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True, **options
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == RESPONSE_TOKENS
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    usage = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert usage and usage[-1].completion_tokens == RESPONSE_TOKENS
    else:
        assert not usage  # read for the account, cut from what the client sees
    assert last_sent(gw)["body"]["stream"] is True


def test_a_forced_tool_call(gw: Gateway) -> None:
    answer = client(gw).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
        tool_choice={"type": "function", "function": {"name": "weather"}},
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    assert choice.message.tool_calls[0].function.name == "weather"  # type: ignore[union-attr]


def test_what_anthropic_cannot_do_is_refused_before_the_call(gw: Gateway) -> None:
    before = len(gw.fake_requests(gw.fake_b))
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2
        )
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "n"
    assert len(gw.fake_requests(gw.fake_b)) == before


def test_anthropics_overloaded_answer_is_a_503_in_openais_shape(gw: Gateway) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client(gw).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-fault": "503"},  # the fake answers Anthropic's 529
        )
    assert caught.value.status_code == 503
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "overloaded_error"
