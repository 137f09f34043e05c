"""A backend that speaks Anthropic's Messages API behind the one OpenAI endpoint, through the
real Envoy, with the openai SDK as the client and the fake LLM speaking Anthropic's API (it
refuses what Anthropic would)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from functools import partial

import openai
import pytest

from .conftest import (
    BACKEND_A_SECRET,
    BACKEND_B_SECRET,
    Gateway,
    free_port,
    running_gateway,
    wait_http,
)

pytestmark = pytest.mark.e2e

MODEL = "claude"
PROVIDER_MODEL = "claude-sonnet-4-5"
RESPONSE_TOKENS = 8  # the second fake's
OPENAI_MODEL = "fake-gpt-4o"  # the first fake's name for it


def with_anthropic(config: dict, overloaded: str) -> None:
    fake_b = config["backends"]["fake-b"]["url"].rstrip("/")
    config["backends"]["anthropic"] = {
        "url": f"{fake_b}/v1",
        "type": "anthropic",
        "api_key": {"env": "TEST_BACKEND_B_KEY"},
        "max_tokens": 64,
    }
    config["models"][MODEL] = {"targets": [{"backend": "anthropic", "model": PROVIDER_MODEL}]}
    # A fake that answers every request 503 (529 on Anthropic's API), never ejected, so that
    # every request tries it first.
    for name, kind in (("anthropic-overloaded", "anthropic"), ("openai-overloaded", "openai")):
        config["backends"][name] = {
            "url": f"{overloaded}/v1",
            "type": kind,
            "api_key": {"env": "TEST_BACKEND_B_KEY"},
            "eject_after_failures": 1000,
        }
    config["models"]["claude-then-gpt"] = {
        "targets": [
            {"backend": "anthropic-overloaded", "model": PROVIDER_MODEL, "priority": 0},
            {"backend": "fake-a", "model": OPENAI_MODEL, "priority": 1},
        ]
    }
    config["models"]["gpt-then-claude"] = {
        "targets": [
            {"backend": "openai-overloaded", "model": OPENAI_MODEL, "priority": 0},
            {"backend": "anthropic", "model": PROVIDER_MODEL, "priority": 1},
        ]
    }
    config["models"]["claude-or-gpt"] = {
        "targets": [
            {"backend": "anthropic", "model": PROVIDER_MODEL, "weight": 50},
            {"backend": "fake-a", "model": OPENAI_MODEL, "weight": 50},
        ]
    }


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("provider")
    port = free_port()
    with (tmp / "overloaded.log").open("wb") as log:
        overloaded = subprocess.Popen(
            [sys.executable, "-m", "extproc", "fake-llm", "--name", "overloaded",
             "--listen", f"127.0.0.1:{port}", "--fault", "503"],
            stdout=log, stderr=log,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz")
        with running_gateway(tmp, edit=partial(with_anthropic, overloaded=url)) as gateway:
            yield gateway
    finally:
        overloaded.terminate()
        overloaded.wait(10)


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
    # The model that served it, as an OpenAI backend's answer names its own.
    assert answer.model == PROVIDER_MODEL and answer.choices[0].finish_reason == "stop"
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


# -- a model whose backends speak several APIs: Envoy chooses, each attempt is translated ------


def test_a_failover_from_an_overloaded_anthropic_to_openai(gw: Gateway) -> None:
    """Anthropic's 529 is a retriable failure: the next pool's OpenAI backend answers within
    the same request, with its own path, credential and model name, none of Anthropic's."""
    raw = client(gw).chat.completions.with_raw_response.create(
        model="claude-then-gpt", messages=[{"role": "user", "content": "hi"}]
    )
    answer = raw.parse()
    assert answer.model == OPENAI_MODEL and answer.choices[0].message.content  # its own
    assert raw.headers["x-aigw-backend"] == "fake-a"
    assert raw.headers["x-aigw-failover"] == "true" and raw.headers["x-aigw-attempts"] == "2"
    sent = gw.fake_requests(gw.fake_a)[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["authorization"] == f"Bearer {BACKEND_A_SECRET}"
    assert "x-api-key" not in sent["headers"] and "anthropic-version" not in sent["headers"]
    assert sent["body"]["model"] == OPENAI_MODEL and sent["body"]["messages"][0]["content"] == "hi"


@pytest.mark.parametrize("stream", [False, True])
def test_a_failover_from_openai_to_anthropic_is_translated(gw: Gateway, stream: bool) -> None:
    """The second attempt goes as a Messages request; its answer (or stream) comes back in
    OpenAI's shape, and the tokens counted are Anthropic's."""
    gw.clear_fakes()
    messages = [{"role": "user", "content": "hi"}]
    if stream:
        with client(gw).chat.completions.with_streaming_response.create(
            model="gpt-then-claude",
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        ) as response:
            headers = response.headers
            chunks = list(response.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = [c.usage for c in chunks if c.usage is not None]
        assert usage and usage[-1].completion_tokens == RESPONSE_TOKENS
        assert headers["content-type"].startswith("text/event-stream")
    else:
        raw = client(gw).chat.completions.with_raw_response.create(
            model="gpt-then-claude",
            messages=messages,  # type: ignore[arg-type]
        )
        headers, answer = raw.headers, raw.parse()
        text = answer.choices[0].message.content or ""
        assert answer.usage is not None and answer.usage.completion_tokens == RESPONSE_TOKENS
        assert headers["x-aigw-completion-tokens"] == str(RESPONSE_TOKENS)
    assert len(text.split()) == RESPONSE_TOKENS
    assert headers["x-aigw-backend"] == "anthropic" and headers["x-aigw-failover"] == "true"
    (sent,) = gw.fake_requests(gw.fake_b)
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == BACKEND_B_SECRET
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent["headers"]
    assert sent["body"]["model"] == PROVIDER_MODEL and sent["body"]["max_tokens"] == 64
    assert "stream_options" not in sent["body"]


def test_a_canary_split_between_anthropic_and_openai(gw: Gateway) -> None:
    """Each request is translated for the backend Envoy's split chose, and every answer is
    OpenAI's, whichever served it."""
    served: Counter[str] = Counter()
    for _ in range(24):
        raw = client(gw).chat.completions.with_raw_response.create(
            model="claude-or-gpt", messages=[{"role": "user", "content": "hi"}]
        )
        answer = raw.parse()
        assert answer.model in (PROVIDER_MODEL, OPENAI_MODEL) and answer.choices[0].message.content
        assert answer.usage is not None and answer.usage.completion_tokens == RESPONSE_TOKENS
        served[raw.headers["x-aigw-backend"]] += 1
    assert set(served) == {"anthropic", "fake-a"}, served  # 24 draws at 50/50: both, but 2^-23


def test_what_a_pools_anthropic_backend_cannot_do_is_refused_before_any_attempt(
    gw: Gateway,
) -> None:
    """Whichever backend would answer, the request must be one every backend of the model can
    serve as asked: refused before anything is reserved or sent."""
    gw.clear_fakes()
    with pytest.raises(openai.BadRequestError) as caught:
        client(gw).chat.completions.create(
            model="gpt-then-claude", messages=[{"role": "user", "content": "hi"}], seed=7
        )
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "seed"
    assert gw.fake_requests(gw.fake_a) == [] and gw.fake_requests(gw.fake_b) == []
