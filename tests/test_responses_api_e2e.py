"""OpenAI's Responses API at the gateway, through the real Envoy, with the `openai` SDK's
`client.responses` as the client: translated to chat completions for a backend that does not
serve it, passed as it is to one that does, streamed and not, with function calling, token
counts, and the gateway's refusals in OpenAI's error shape."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from .conftest import BACKEND_B_SECRET, Gateway, running_gateway

pytestmark = pytest.mark.e2e

BRIDGED = "gpt-4o-mini"  # an OpenAI chat backend (the first fake)
NATIVE = "gpt-native"  # a backend that serves the Responses API (the second fake)
RESPONSE_TOKENS = 8  # the fakes' answer length
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


def with_responses(config: dict) -> None:
    fake_b = config["backends"]["fake-b"]["url"].rstrip("/")
    config["backends"]["responses"] = {
        "url": f"{fake_b}/v1",
        "api_key": {"env": "TEST_BACKEND_B_KEY"},
        "responses_api": True,
    }
    config["models"][NATIVE] = {"targets": [{"backend": "responses", "model": "fake-gpt-5"}]}
    config["teams"]["team-b"]["models"].append(NATIVE)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("responses-api"), edit=with_responses) as g:
        yield g


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="sk-team-a", max_retries=0)


def last_sent(gw: Gateway, fake: str) -> dict:
    return gw.fake_requests(fake)[-1]


# -- translated to chat completions -------------------------------------------------------------


def test_a_response_from_a_chat_backend(gw: Gateway) -> None:
    raw = client(gw).responses.with_raw_response.create(
        model=BRIDGED, instructions="Be brief.", input="hi", max_output_tokens=64
    )
    response = raw.parse()
    assert response.object == "response" and response.status == "completed"
    assert response.output_text and response.instructions == "Be brief."
    assert response.usage is not None and response.usage.output_tokens == RESPONSE_TOKENS
    assert raw.headers["x-aigw-completion-tokens"] == str(RESPONSE_TOKENS)
    sent = last_sent(gw, gw.fake_a)
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert sent["body"]["max_completion_tokens"] == 64


def test_a_streamed_response_from_a_chat_backend(gw: Gateway) -> None:
    with client(gw).responses.stream(model=BRIDGED, input="hi") as stream:
        kinds = [event.type for event in stream]
        response = stream.get_final_response()
    assert response.output_text and response.usage is not None
    assert response.usage.output_tokens == RESPONSE_TOKENS
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert last_sent(gw, gw.fake_a)["body"]["stream_options"] == {"include_usage": True}


def test_function_calling_over_two_turns(gw: Gateway) -> None:
    openai_client = client(gw)
    first = openai_client.responses.create(
        model=BRIDGED,
        input="What is the weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"]
    second = openai_client.responses.create(
        model=BRIDGED,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            *[item.model_dump(exclude_none=True) for item in first.output],  # type: ignore[misc]
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21C"},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert second.output_text
    sent = last_sent(gw, gw.fake_a)["body"]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.call_id
    assert sent[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 21C"}


def test_input_tokens_are_counted_by_the_gateway(gw: Gateway) -> None:
    short = client(gw).responses.input_tokens.count(model=BRIDGED, input="hi")
    long = client(gw).responses.input_tokens.count(model=BRIDGED, input="hi " * 100)
    assert 0 < short.input_tokens < long.input_tokens


def test_stored_state_is_refused_by_a_chat_backend(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(gw).responses.create(model=BRIDGED, input="hi", previous_response_id="resp_1")
    assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_an_unknown_model_is_openais_404(gw: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(gw).responses.create(model="no-such-model", input="hi")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


# -- served by a backend that speaks it ---------------------------------------------------------


def test_a_backend_that_serves_responses_gets_the_request_as_it_is(gw: Gateway) -> None:
    request = {"model": NATIVE, "input": "hi", "store": False, "reasoning": {"effort": "low"}}
    raw = client(gw).responses.with_raw_response.create(**request)  # type: ignore[arg-type]
    response = raw.parse()
    assert response.output_text and response.model == "fake-gpt-5"
    assert response.usage is not None
    assert raw.headers["x-aigw-completion-tokens"] == str(response.usage.output_tokens)
    sent = last_sent(gw, gw.fake_b)
    assert sent["path"] == "/v1/responses"
    assert sent["body"] == {**request, "model": "fake-gpt-5"}
    assert sent["headers"]["authorization"] == f"Bearer {BACKEND_B_SECRET}"


def test_a_stream_from_a_backend_that_serves_responses(gw: Gateway) -> None:
    with client(gw).responses.stream(model=NATIVE, input="hi") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        response = stream.get_final_response()
    assert text == response.output_text and response.usage is not None


# -- stored Responses: reached by the team that stored them, and only by it ---------------------


def test_a_stored_response_is_reached_by_its_team(gw: Gateway) -> None:
    team_a = client(gw)
    first = team_a.responses.create(model=NATIVE, input="Remember: the code is 42.")
    assert team_a.responses.retrieve(first.id).output_text == first.output_text
    items = team_a.responses.input_items.list(first.id)
    assert items.data
    # The next turn builds on it, at the backend that stores it.
    second = team_a.responses.create(
        model=NATIVE, input="What is the code?", previous_response_id=first.id
    )
    assert second.previous_response_id == first.id
    assert last_sent(gw, gw.fake_b)["body"]["previous_response_id"] == first.id
    team_a.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        team_a.responses.retrieve(second.id)


def test_another_teams_stored_response_does_not_exist(gw: Gateway) -> None:
    stored = client(gw).responses.create(model=NATIVE, input="A secret of team-a.")
    team_b = openai.OpenAI(base_url=gw.base_url, api_key="sk-team-b", max_retries=0)
    before = len(gw.fake_requests(gw.fake_b))
    for call in (
        lambda: team_b.responses.retrieve(stored.id),
        lambda: team_b.responses.delete(stored.id),
        lambda: team_b.responses.input_items.list(stored.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError) as info:
        team_b.responses.create(model=NATIVE, input="And?", previous_response_id=stored.id)
    assert info.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
    assert len(gw.fake_requests(gw.fake_b)) == before  # nothing reached the backend
    # It is still there for its team.
    assert client(gw).responses.retrieve(stored.id).id == stored.id


def test_a_response_not_stored_is_not_recorded(gw: Gateway) -> None:
    response = client(gw).responses.create(model=NATIVE, input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        client(gw).responses.retrieve(response.id)


def test_a_streamed_response_is_stored_for_its_team(gw: Gateway) -> None:
    with client(gw).responses.stream(model=NATIVE, input="hi") as stream:
        response = stream.get_final_response()
    # (Recorded as the stream ends, in the background: it is there by the next call.)
    assert client(gw).responses.retrieve(response.id).id == response.id
