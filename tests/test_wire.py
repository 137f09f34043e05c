"""The wire-format seam: the registry, OpenAI as its first format, and a second format that the
stages use with no change of theirs (one class, one `register`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from extproc import wire
from extproc.contract import Handover
from extproc.downstream import DownstreamStream
from extproc.errors import GatewayError, bad_request
from extproc.guard.texts import Slot
from extproc.guard.types import Verdict
from extproc.observer import ObservedStream
from extproc.protocol import ProcessingRequest
from extproc.services import Services
from extproc.sse import RelayedStream, SSEParser
from extproc.tokens import TokenCount, TokenCounter
from extproc.usage import Usage
from extproc.wire import Endpoint, Operation, ParsedRequest, WireFormat
from extproc.wire.base import GuardedRelay, Stateless
from extproc.wire.openai import CHAT, COMPLETIONS, EMBEDDINGS, MODEL, MODELS, OPENAI

from .test_downstream import (
    QUICKSTART,
    build_services,
    load_runtime,
    metadata,
    request_body,
    request_headers,
    response_body,
    response_headers,
    set_headers,
    unpacked,
    with_sidecar,
)

# -- the registry and OpenAI ------------------------------------------------------------------


def test_openai_is_registered_and_the_default() -> None:
    assert wire.get("openai") is OPENAI
    assert wire.DEFAULT is OPENAI
    with pytest.raises(KeyError):
        wire.get("no-such-format")


@pytest.mark.parametrize(
    ("method", "path", "endpoint"),
    [
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/completions", COMPLETIONS),
        ("POST", "/v1/embeddings/", EMBEDDINGS),
        ("GET", "/v1/models", MODELS),
        ("GET", "/v1/models/gpt-4o", MODEL),
    ],
)
def test_openai_paths_route_to_openai(method: str, path: str, endpoint: Endpoint) -> None:
    found = wire.route(method, path)
    assert found.wire is OPENAI and found.endpoint is endpoint


def test_openai_implements_every_member_of_the_interface() -> None:
    members = {n for n in vars(WireFormat) if not n.startswith("_")} | set(
        WireFormat.__annotations__
    )
    assert members >= {"name", "route", "parse", "answer_usage", "stream_relay", "error_body"}
    attributes = {"name", "bridge", "own_header_prefix", "own_guarded_relay"}
    assert members >= {"owns", *attributes}
    assert all(callable(getattr(OPENAI, n)) for n in members - attributes)


def test_a_format_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        wire.register(OPENAI)


def test_the_hand_over_names_the_format_when_it_is_not_openai() -> None:
    plain = Handover(team="t", model="m")
    assert plain.wire == "openai" and "wire" not in unpacked(plain.to_metadata())
    assert Handover.from_metadata(plain.to_metadata()).wire == "openai"
    other = Handover(team="t", model="m", wire="fake")
    assert unpacked(other.to_metadata())["wire"] == "fake"
    assert Handover.from_metadata(other.to_metadata()).wire == "fake"


# -- a second format --------------------------------------------------------------------------

FAKE_CHAT = Endpoint(Operation.CHAT, "/fake/chat")


class FakeRelay:
    """Events `{"said": text}` and `{"used": [prompt, output]}`."""

    blocked: Verdict | None = None

    def __init__(self) -> None:
        self._parser = SSEParser()
        self._text: list[str] = []
        self.usage: Usage | None = None
        self.events = 0
        self.expects_usage = False

    @property
    def text(self) -> str:
        return "".join(self._text)

    def feed(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        for data in self._parser.feed(chunk):
            self.events += 1
            event = orjson.loads(data)
            if "used" in event:
                prompt, output = event["used"]
                self.usage = Usage(prompt, output, prompt + output)
            self._text.append(event.get("said", ""))
        return None


class Fake(Stateless):
    """A minimal API: `{"model", "say", "stream"}` in, `{"said", "used"}` out."""

    name = "fake"
    bridge = None  # its answers are read as they are
    own_header_prefix = ""
    own_guarded_relay: GuardedRelay | None = None

    def __init__(self) -> None:
        self.parsed: list[ParsedRequest] = []

    def owns(self, path: str) -> bool:
        return path.startswith("/fake/")

    def route(self, method: str, path: str) -> tuple[Endpoint, str | None] | None:
        return (FAKE_CHAT, None) if path == FAKE_CHAT.path else None

    def parse(self, endpoint: Endpoint, raw: bytes) -> ParsedRequest:
        body = orjson.loads(raw)
        if not isinstance(body.get("say"), str):
            raise bad_request("say something", "nothing_said", "say")
        parsed = ParsedRequest(endpoint, body, body["model"], body.get("stream") is True, True)
        self.parsed.append(parsed)
        return parsed

    async def count_prompt(
        self,
        tokens: TokenCounter,
        parsed: ParsedRequest,
        *,
        team: str | None,
        budget: float | None,
    ) -> TokenCount:
        return tokens.count_text(parsed.model, parsed.body["say"])

    def token_count_body(self, tokens: int) -> bytes:
        return orjson.dumps({"tokens": tokens})

    def request_slots(self, endpoint: Endpoint, body: dict[str, Any]) -> list[Slot]:
        return [Slot(body, "say")]

    def span_attributes(self, body: dict[str, Any]) -> dict[str, Any]:
        return {}

    def with_usage_requested(self, body: dict[str, Any]) -> bytes:
        return orjson.dumps(body)

    def answer_usage(self, answer: Any) -> Usage | None:
        used = answer.get("used")
        return Usage(used[0], used[1], sum(used)) if used else None

    def answer_text(self, answer: Any) -> str:
        return answer.get("said", "")

    def answer_slots(self, endpoint: Endpoint, answer: Any) -> list[Slot]:
        return [Slot(answer, "said", "assistant")]

    def drop_logprobs(self, answer: Any) -> bool:
        return False

    def stream_relay(self, strip_usage_chunk: bool) -> RelayedStream:
        return FakeRelay()

    def error_body(self, err: GatewayError) -> bytes:
        return orjson.dumps({"fault": err.code, "detail": err.message})


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fake]:
    monkeypatch.setattr(wire, "_FORMATS", dict(wire._FORMATS))
    fmt = Fake()
    wire.register(fmt)
    yield fmt


@pytest.fixture(scope="module")
def services() -> Services:
    """JSON answers pass the downstream stage (json_path: inline)."""
    return with_sidecar(build_services(load_runtime(QUICKSTART)), json_path="inline")


def run(stream: Any, *reqs: ProcessingRequest) -> list[Any]:
    async def go() -> list[Any]:
        return [await stream.handle(r) for r in reqs]

    return asyncio.run(go())


def test_a_registered_format_routes_its_paths(fake: Fake) -> None:
    found = wire.route("POST", "/fake/chat/?x=1")
    assert found.wire is fake and found.endpoint is FAKE_CHAT
    assert wire.route("POST", "/v1/chat/completions").wire is OPENAI
    with pytest.raises(GatewayError) as info:
        wire.route("POST", "/fake/other")
    assert info.value.status == 404


def test_the_downstream_stage_speaks_the_format_the_request_routed_to(
    fake: Fake, services: Services
) -> None:
    stream = DownstreamStream(services)
    body = {"model": "gpt-4o", "say": "Hello there, general Kenobi"}
    _, sent = run(stream, request_headers(path="/fake/chat"), request_body(body))
    assert sent.WhichOneof("response") == "request_body"
    assert [(p.model, p.body["say"]) for p in fake.parsed] == [("gpt-4o", body["say"])]
    data = metadata(sent)["extproc"]
    assert (unpacked(data)["endpoint"], unpacked(data)["wire"]) == ("/fake/chat", "fake")
    prompt = services.tokens.count_text("gpt-4o", body["say"]).tokens
    assert unpacked(data)["prompt_tokens_estimate"] == prompt

    _, answered = run(stream, response_headers(), response_body({"said": "hi", "used": [7, 2]}))
    headers = set_headers(answered.response_body.response.header_mutation)
    assert headers["x-aigw-total-tokens"] == "9"
    assert headers["x-aigw-token-source"] == "provider"


def test_an_answer_without_usage_is_counted_from_the_formats_text(
    fake: Fake, services: Services
) -> None:
    stream = DownstreamStream(services)
    run(stream, request_headers(path="/fake/chat"), request_body({"model": "gpt-4o", "say": "x"}))
    _, answered = run(stream, response_headers(), response_body({"said": "Bonjour tout le monde"}))
    headers = set_headers(answered.response_body.response.header_mutation)
    output = services.tokens.count_text("gpt-4o", "Bonjour tout le monde").tokens
    assert headers["x-aigw-completion-tokens"] == str(output)
    assert headers["x-aigw-token-source"] == "estimate"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"model": "gpt-4o"}, "nothing_said"),
        ({"model": "no-such-model", "say": "x"}, "model_not_found"),
    ],
)
def test_refusals_take_the_formats_error_shape(
    fake: Fake, services: Services, body: dict[str, Any], code: str
) -> None:
    stream = DownstreamStream(services)
    _, refused = run(stream, request_headers(path="/fake/chat"), request_body(body))
    assert refused.WhichOneof("response") == "immediate_response"
    assert set(orjson.loads(refused.immediate_response.body)) == {"fault", "detail"}
    assert orjson.loads(refused.immediate_response.body)["fault"] == code


def test_the_observer_reads_a_stream_with_the_handed_over_format(
    fake: Fake, services: Services
) -> None:
    observed = with_sidecar(services, stream_path="observe")
    stream = DownstreamStream(observed)
    body = {"model": "gpt-4o", "say": "x", "stream": True}
    _, sent = run(stream, request_headers(path="/fake/chat"), request_body(body))
    data = metadata(sent)["extproc"]
    assert data["observe"] is True and unpacked(data)["wire"] == "fake"

    def forwarded(req: ProcessingRequest) -> ProcessingRequest:
        req.metadata_context.filter_metadata["extproc"].update(data)
        return req

    observer = ObservedStream(observed)
    events = b'data: {"said": "hi"}\n\ndata: {"used": [3, 4]}\n\n'
    run(
        observer,
        forwarded(response_headers(content_type="text/event-stream")),
        forwarded(response_body(events)),
    )
    assert observer.done and isinstance(observer.relay, FakeRelay)
    assert observer.relay.usage == Usage(3, 4, 7)


def test_a_usage_of_only_its_total_is_a_reranks_input() -> None:
    from extproc.wire.openai.answer import usage

    read = usage({"total_tokens": 42})
    assert read is not None
    assert (read.prompt_tokens, read.completion_tokens, read.total_tokens) == (42, 0, 42)
    assert usage({"total_tokens": 42, "other": 1}) is None  # not a shape the gateway knows
    assert usage({"total_tokens": "42"}) is None
