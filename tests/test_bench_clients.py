"""The chat benchmark's `--client`: the request each client API sends, the check that an answer
is of that API (the Python client's and the Lua script's), which target is sent what, and the
command line's refusals. No Envoy, no network."""

from __future__ import annotations

import json

import orjson
import pytest

from benchmarks import run, suite
from benchmarks.lib.chat_client import check_answer, request_for
from benchmarks.lib.chat_scenario import requests_of
from benchmarks.lib.configs import CLIENTS, Scenario
from benchmarks.lib.wrk import lua_pattern, script_text

MODEL = "gpt-4o-mini"
# One answer of each API, as the fake (chat) and the gateway's translations write them.
ANSWERS = {
    "openai": {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16},
    },
    "anthropic": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "max_tokens",
        "stop_sequence": None,
        "usage": {"input_tokens": 8, "output_tokens": 8},
    },
    "responses": {
        "id": "resp_1",
        "object": "response",
        "status": "incomplete",
        "model": MODEL,
        "output": [
            {
                "type": "message",
                "role": "assistant",
                "status": "incomplete",
                "content": [{"type": "output_text", "text": "hi", "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 8, "output_tokens": 8, "total_tokens": 16},
    },
}


@pytest.mark.parametrize("api", CLIENTS)
def test_every_client_api_asks_the_same_thing(api: str) -> None:
    request = request_for(api, "sk-x")
    body = json.loads(request.body)
    assert body["model"] == MODEL
    assert body.get("max_tokens", body.get("max_output_tokens")) == 8
    prompt = body.get("input") or body["messages"][0]["content"]
    assert prompt == "hello"
    key = {"anthropic": ("x-api-key", "sk-x")}.get(api, ("Authorization", "Bearer sk-x"))
    assert request.headers[key[0]] == key[1]
    assert (
        request.path
        == {
            "openai": "/v1/chat/completions",
            "anthropic": "/v1/messages",
            "responses": "/v1/responses",
        }[api]
    )


@pytest.mark.parametrize("api", CLIENTS)
@pytest.mark.parametrize("spaced", [False, True])
def test_an_answer_is_right_only_for_its_own_api(api: str, spaced: bool) -> None:
    request = request_for(api)
    for other, doc in ANSWERS.items():
        raw = json.dumps(doc).encode() if spaced else orjson.dumps(doc)
        assert request.answer_ok(raw) is (other == api), (api, other)
        assert (check_answer(api, doc) is None) is (other == api), (api, other)
    assert not request.answer_ok(b'{"error": {"message": "no"}}')


def test_the_lua_script_sends_the_request_and_searches_for_its_markers() -> None:
    text = script_text(request_for("anthropic", "sk-x"))
    assert "wrk.path = [==[/v1/messages]==]" in text
    assert 'wrk.headers["x-api-key"] = [==[sk-x]==]' in text
    assert "Authorization" not in text
    assert '[==["type"%s*:%s*"message"]==], [==["stop_reason"%s*:]==]' in text
    assert lua_pattern("object", "chat.completion") == '"object"%s*:%s*"chat%.completion"'
    assert '"wrong_answers": %d' in text


def test_envoy_alone_is_always_sent_the_openai_chat_request() -> None:
    requests = requests_of(Scenario(client="responses"))
    assert requests["baseline"].api == "openai"
    assert requests["gateway"].api == "responses"
    assert {r.api for r in requests_of(Scenario()).values()} == {"openai"}


def test_the_client_scenario_is_named_and_says_what_the_baseline_gets() -> None:
    scenario = Scenario(client="anthropic")
    assert scenario.name == "chat+quota-memory+client-anthropic"
    assert "Anthropic's Messages API" in scenario.label
    assert "Envoy alone is sent the equivalent OpenAI chat completions" in scenario.label
    assert not scenario.is_headline
    assert run.scenario_of(run.parse_args(["--client", "responses"])).client == "responses"


@pytest.mark.parametrize(
    "argv",
    [
        ["--client", "anthropic", "--native"],
        ["--client", "responses", "--provider", "anthropic"],
        ["--client", "anthropic", "--suite", "full"],
    ],
)
def test_combinations_that_make_no_sense_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        run.parse_args(argv)


def test_the_full_suite_measures_both_client_apis() -> None:
    args = run.parse_args(["--suite", "full", "--quick"])
    clients = [s.client for _, s, _ in suite.plan(args, [])]
    assert clients.count("anthropic") == clients.count("responses") == 1
