"""The non-blocking stream path: which streams the downstream stage hands to the observer, and
what the observer settles, driven with hand-built ProcessingRequest messages."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from extproc.contract import Handover
from extproc.downstream import DownstreamStream
from extproc.observer import ObservedStream
from extproc.protocol import ProcessingMode, ProcessingRequest
from extproc.quota.budgets import Budgets
from extproc.quota.policy import Amounts, LimitSpec
from extproc.quota.service import QuotaService, Reservation
from extproc.services import Services
from extproc.settlement import AnswerPath, answer_path, handed_back
from extproc.streams import ACTIVE
from extproc.telemetry.audit import AuditTrail
from extproc.telemetry.tracing import NO_TRACE

from .test_downstream import (
    KEY_B,
    LONG_ANSWER,
    MESSAGES,
    USAGE,
    build_services,
    load_runtime,
    metadata,
    request_body,
    request_headers,
    response_body,
    response_headers,
    stream_bytes,
    unpacked,
    with_default_max_tokens,
    with_sidecar,
    with_stream_path,
)
from .test_downstream import QUICKSTART as QUICKSTART_PATH

MODEL = "gpt-4o-mini"  # team-b (KEY_B) has token and request limits on it in the quickstart


@dataclass
class Recorder:
    settled: list[tuple[Reservation | None, Amounts]] = field(default_factory=list)


class RecordingQuota(QuotaService):
    """The real service and store; settlements are also written down."""

    __slots__ = ("recorder",)

    def settle_soon(
        self, reservation: Reservation | None, actual: Amounts, trace: Any = NO_TRACE
    ) -> None:
        self.recorder.settled.append((reservation, actual))
        super().settle_soon(reservation, actual, trace)


def recording(services: Services) -> tuple[Services, Recorder]:
    quota = RecordingQuota(services.quota.store, services.quota.settings)
    quota.recorder = Recorder()
    fresh = dataclasses.replace(services, quota=quota)
    return fresh, quota.recorder


@pytest.fixture(scope="module")
def released_base() -> Services:
    """The quickstart as shipped: observed streams of its one-backend models are released with
    the request body (json_path: access_log)."""
    return build_services(load_runtime(QUICKSTART_PATH))


@pytest.fixture(scope="module")
def base(released_base: Services) -> Services:
    """Observed streams handed over at their response headers, as for pooled and canary
    models (json_path: inline keeps every request on the downstream stage until then)."""
    return with_sidecar(released_base, json_path="inline")


def chat(**fields: Any) -> dict[str, Any]:
    # A small max_tokens: the reservations of these tests share team-b's 20,000 tokens/minute.
    return {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 16, **fields}


def run(stream: Any, *reqs: ProcessingRequest) -> list[Any]:
    async def go() -> list[Any]:
        return [await stream.handle(r) for r in reqs]

    return asyncio.run(go())


def close(stream: Any) -> None:
    async def go() -> None:  # as in the server: on the event loop, where settling is scheduled
        stream.close()

    asyncio.run(go())


def request_metadata(services: Services, body: dict[str, Any]) -> tuple[DownstreamStream, dict]:
    stream = DownstreamStream(services)
    _, resp = run(stream, request_headers(key=KEY_B), request_body(body))
    assert resp.WhichOneof("response") == "request_body"
    return stream, metadata(resp)["extproc"]


def forwarded(req: ProcessingRequest, data: dict[str, Any]) -> ProcessingRequest:
    """A message as the observer receives it: with the downstream stage's metadata."""
    req.metadata_context.filter_metadata["extproc"].update(data)
    return req


# -- which path a stream takes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "include_usage", "observed", "injected"),
    [
        ("auto", True, True, False),
        ("auto", False, False, True),  # the usage chunk must be cut: inline
        ("observe", True, True, False),
        ("observe", False, True, False),  # nothing injected, nothing to cut: own count
        ("inline", True, False, False),
        ("inline", False, False, True),
    ],
)
def test_stream_path_choice(
    base: Services, path: str, include_usage: bool, observed: bool, injected: bool
) -> None:
    services = with_stream_path(base, path)
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = DownstreamStream(services)
    _, resp = run(stream, request_headers(key=KEY_B), request_body(chat(**options)))
    data = metadata(resp)["extproc"]
    assert data.get("observe", False) is observed
    assert resp.request_body.response.HasField("body_mutation") is injected
    (headers_resp,) = run(stream, response_headers(content_type="text/event-stream"))
    body_mode = headers_resp.mode_override.response_body_mode
    assert body_mode == (ProcessingMode.NONE if observed else ProcessingMode.STREAMED)
    if observed:
        assert unpacked(data)["reservation"] == stream.reservation.id
        assert unpacked(data)["limits"] == [s.name for s in stream.reservation.specs]
        assert unpacked(data)["started_at"] > 0
        assert metadata(headers_resp)["extproc"] == {"backend": "fake", "status": 200.0}


def test_an_observed_stream_of_a_one_backend_model_is_released_with_its_body(
    released_base: Services,
) -> None:
    services = with_sidecar(released_base, stream_path="observe")
    stream, data = request_metadata(services, chat(stream_options={"include_usage": True}))
    assert data["observe"] is True and data["account"] is True
    # Envoy's access log counts it, the observer settles it.
    assert stream.path is AnswerPath.LOGGED and stream.finished
    assert unpacked(data)["reservation"] == stream.reservation.id
    # The access log's reader leaves a successful stream to the observer, on the same test.
    handover = Handover.from_metadata(data)

    def path(h: Handover, status: int, content_type: str) -> AnswerPath:
        return answer_path(
            h.observe, h.account, {":status": str(status), "content-type": content_type}
        )

    assert path(handover, 200, "text/event-stream; charset=utf-8") is AnswerPath.OBSERVED
    assert path(handover, 429, "application/json") is AnswerPath.LOGGED
    not_observed = Handover.from_metadata({**data, "observe": False})
    assert path(not_observed, 200, "text/event-stream") is AnswerPath.LOGGED


def test_a_stream_with_its_own_usage_report_is_left_to_envoy(released_base: Services) -> None:
    """stream_path auto, one backend: no observer; Envoy reads the usage report the client asked
    for, and the access log's reader settles the stream like a JSON answer."""
    stream, data = request_metadata(released_base, chat(stream_options={"include_usage": True}))
    assert "observe" not in data and data["account"] is True
    assert stream.path is AnswerPath.LOGGED and stream.finished
    handover = Handover.from_metadata(data)
    headers = {":status": "200", "content-type": "text/event-stream"}
    assert answer_path(handover.observe, handover.account, headers) is AnswerPath.LOGGED
    # A client that did not ask for usage: inline, its usage is asked for and cut out again.
    stream, data = request_metadata(released_base, chat())
    assert "account" not in data and "observe" not in data and stream.strip_usage
    # Pooled and canary models (Envoy chooses the backend): the observer follows it still.
    inline_json = with_sidecar(released_base, json_path="inline")
    stream, data = request_metadata(inline_json, chat(stream_options={"include_usage": True}))
    assert data["observe"] is True and "account" not in data


def test_a_quota_failover_reservation_is_handed_back_with_its_limits(
    released_base: Services,
) -> None:
    """A quota failover reserves against the team-wide limits only: those are rebuilt."""
    specs = (
        LimitSpec("scoped", "tokens", "minute", 10, frozenset({MODEL}), scoped=True),
        LimitSpec("team-wide", "tokens", "minute", 99, frozenset({MODEL})),
    )
    services = dataclasses.replace(released_base, budgets=Budgets(teams={"team-b": specs}))
    info = {"team": "team-b", "model": MODEL, "reservation": "r1", "limits": ["team-wide"]}
    reservation = handed_back(services, Handover.from_metadata({**info, "pool": 1}))
    assert reservation is not None and [s.name for s in reservation.specs] == ["team-wide"]
    # Without the pool, the names differ.
    assert handed_back(services, Handover.from_metadata(info)) is None


def test_non_streaming_request_is_never_observed(base: Services) -> None:
    _, data = request_metadata(with_stream_path(base, "observe"), chat(stream=False))
    assert "observe" not in data


@pytest.mark.parametrize(
    ("status", "content_type"), [(429, "application/json"), (200, "application/json")]
)
def test_an_observed_request_answered_without_a_stream_stays_with_the_downstream_stage(
    base: Services, status: int, content_type: str
) -> None:
    services, recorder = recording(base)
    stream, _ = request_metadata(services, chat(stream_options={"include_usage": True}))
    body = {"error": {"message": "slow down"}} if status != 200 else {"usage": USAGE}
    headers_resp, body_resp = run(
        stream, response_headers(status, content_type), response_body(body)
    )
    assert not headers_resp.HasField("mode_override")
    assert body_resp.WhichOneof("response") == "response_body"
    ((reservation, actual),) = recorder.settled
    assert reservation is stream.reservation
    expected = Amounts(123, 45) if status == 200 else Amounts(0, 0)
    assert actual == expected
    observer = ObservedStream(services)
    run(observer, response_headers(status, content_type), response_body(body))
    assert observer.done and observer.relay is None
    assert len(recorder.settled) == 1


def test_a_handed_off_stream_is_not_settled_by_the_downstream_stage(base: Services) -> None:
    services, recorder = recording(base)
    stream, _ = request_metadata(services, chat(stream_options={"include_usage": True}))
    run(stream, response_headers(content_type="text/event-stream"))
    close(stream)  # Envoy ends this stage's gRPC stream while the observer still follows
    assert recorder.settled == []


# -- the observer -----------------------------------------------------------------------------


def observe(
    services: Services, data: dict[str, Any], chunks: list[bytes], end: bool = True
) -> ObservedStream:
    observer = ObservedStream(services)
    reqs = [forwarded(response_headers(content_type="text/event-stream"), data)]
    reqs += [
        forwarded(response_body(c, end_of_stream=end and i == len(chunks) - 1), data)
        for i, c in enumerate(chunks)
    ]
    answers = run(observer, *reqs)
    assert answers == [None] * len(reqs)  # Envoy reads no answer from an observer
    return observer


def test_observer_settles_the_reported_usage_exactly(base: Services) -> None:
    services, recorder = recording(base)
    stream, data = request_metadata(services, chat(stream_options={"include_usage": True}))
    raw = stream_bytes(["Bon", "jour"], USAGE)
    cut = raw.index(b'"usage"') + 5  # the usage event split across two chunks
    before = ACTIVE.current
    observer = observe(services, data, [raw[:10], raw[10:cut], raw[cut:]])
    assert observer.done and ACTIVE.current == before
    ((reservation, actual),) = recorder.settled
    assert reservation is not None and reservation is not stream.reservation
    assert (reservation.scope, reservation.id, reservation.model) == (
        "team-b",
        unpacked(data)["reservation"],
        MODEL,
    )
    assert reservation.specs == stream.reservation.specs
    assert actual == Amounts(123, 45)


def test_a_stream_whose_headers_end_it_is_finished_at_once(base: Services) -> None:
    services, recorder = recording(base)
    _, data = request_metadata(services, chat(stream_options={"include_usage": True}))
    observer = ObservedStream(services)
    headers = response_headers(content_type="text/event-stream", end_of_stream=True)
    run(observer, forwarded(headers, data))
    assert observer.done
    ((_, actual),) = recorder.settled
    assert actual == Amounts(int(unpacked(data)["prompt_tokens_estimate"]), 0)


def test_observer_counts_a_stream_without_usage_itself(base: Services) -> None:
    services, recorder = recording(with_stream_path(base, "observe"))
    _, data = request_metadata(services, chat())
    observe(services, data, [stream_bytes(["Bon", "jour", " 🙂"], None)])
    ((_, actual),) = recorder.settled
    prompt = int(unpacked(data)["prompt_tokens_estimate"])
    completion = services.tokens.count_text(MODEL, "Bonjour 🙂").tokens
    assert actual == Amounts(prompt, completion)


@pytest.mark.parametrize(
    ("fields", "cap"), [({"max_tokens": 3}, 3), ({"max_tokens": None}, None)], ids=["max", "none"]
)
@pytest.mark.parametrize("handover", ["released", "at-headers"])
def test_observer_charges_a_stream_without_usage_at_most_the_max_output(
    released_base: Services, handover: str, fields: dict[str, Any], cap: int | None
) -> None:
    """The most output the client allowed comes with the hand-over metadata and caps the
    observer's own count; a request that set none is charged its whole count (what was
    reserved, quota.default_max_tokens, only sized the reservation)."""
    base = (
        released_base if handover == "released" else with_sidecar(released_base, json_path="inline")
    )
    services, recorder = recording(with_default_max_tokens(with_stream_path(base, "observe"), 5))
    body = {k: v for k, v in chat(**fields).items() if v is not None}
    stream, data = request_metadata(services, body)
    assert (stream.path is AnswerPath.LOGGED) is (handover == "released")
    assert data["observe"] is True and unpacked(data)["output_estimate"] == (cap or 5)
    assert unpacked(data).get("output_cap") == cap
    observe(services, data, [stream_bytes(LONG_ANSWER.split(" "), None)])
    ((_, actual),) = recorder.settled
    counted = services.tokens.count_text(MODEL, LONG_ANSWER.replace(" ", "")).tokens
    assert counted > 5
    assert actual == Amounts(int(unpacked(data)["prompt_tokens_estimate"]), cap or counted)


def test_observer_without_the_max_output_counts_without_a_cap(base: Services) -> None:
    """Metadata from a downstream stage that did not hand the cap over."""
    services, recorder = recording(with_stream_path(base, "observe"))
    _, data = request_metadata(services, chat(max_tokens=3))
    inner = json.loads(data["handover"])
    del inner["output_cap"]
    data = {**data, "handover": json.dumps(inner)}
    observe(services, data, [stream_bytes(LONG_ANSWER.split(" "), None)])
    ((_, actual),) = recorder.settled
    counted = services.tokens.count_text(MODEL, LONG_ANSWER.replace(" ", "")).tokens
    assert actual == Amounts(int(unpacked(data)["prompt_tokens_estimate"]), counted)


@pytest.mark.parametrize("cut", [False, True], ids=["ended", "cut"])
def test_an_inline_stream_without_usage_is_settled_at_most_the_max_output(
    base: Services, cut: bool
) -> None:
    """The downstream stage follows the stream (inline): the same rule as the observer's, for
    a stream that ended without a usage report and one cut before its report came."""
    services, recorder = recording(with_stream_path(base, "inline"))
    stream, _ = request_metadata(services, chat(max_tokens=3))
    assert stream.strip_usage  # usage was asked for on the client's behalf
    if cut:
        # A backend that would report usage ("usage": null in each chunk); the report never came.
        events = b"".join(
            b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],"usage":null}\n\n'
            for _ in range(9)
        )
    else:
        events = stream_bytes(LONG_ANSWER.split(" "), None)
    run(
        stream,
        response_headers(content_type="text/event-stream"),
        response_body(events, end_of_stream=not cut),
    )
    close(stream)
    ((reservation, actual),) = recorder.settled
    assert reservation is stream.reservation
    assert actual == Amounts(stream.admission.prompt_tokens, 3)


def test_observer_settles_what_was_delivered_when_the_stream_is_cut(base: Services) -> None:
    services, recorder = recording(base)
    _, data = request_metadata(services, chat(stream_options={"include_usage": True}))
    # Backends that will report usage say "usage": null in every chunk; the report never comes.
    events = b"".join(
        b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],"usage":null}\n\n'
        for _ in range(6)
    )
    before = ACTIVE.current
    observer = observe(services, data, [events], end=False)
    assert ACTIVE.current == before + 1
    assert recorder.settled == []
    close(observer)  # the client went away: Envoy ends the observer's gRPC stream
    assert ACTIVE.current == before
    ((_, actual),) = recorder.settled
    assert actual == Amounts(
        int(unpacked(data)["prompt_tokens_estimate"]), 5
    )  # events minus the first
    close(observer)
    assert len(recorder.settled) == 1


def test_observer_leaves_the_reservation_to_expire_when_the_limits_changed(
    base: Services, caplog: pytest.LogCaptureFixture
) -> None:
    services, recorder = recording(base)
    _, data = request_metadata(services, chat(stream_options={"include_usage": True}))
    data = {**data, "handover": json.dumps({**unpacked(data), "limits": ["some-other-limit"]})}
    with caplog.at_level(logging.WARNING, logger="extproc.quota"):
        observe(services, data, [stream_bytes(["Bon"], USAGE)])
    assert recorder.settled == []  # nothing settled: it is charged at its estimate on expiry
    assert "limits changed" in caplog.text


def test_observer_without_a_reservation_settles_nothing(base: Services) -> None:
    services, recorder = recording(base)
    data = {"team": "team-a", "model": MODEL, "observe": True, "reservation": "", "limits": []}
    observer = observe(services, data, [stream_bytes(["Bon"], USAGE)])
    assert observer.done and recorder.settled == []


def test_the_observer_reads_the_handed_over_report_from_the_forwarded_struct(
    base: Services, tmp_path: Path
) -> None:
    trail = AuditTrail()
    trail.configure(tmp_path / "audit.jsonl", 1 << 20, 1)
    services = dataclasses.replace(base, audit=trail)
    _, data = request_metadata(services, chat(stream_options={"include_usage": True}))
    assert len(unpacked(data)["prompt_sha256"]) == 64  # the first half of the report, handed over
    # As Envoy forwards it: lists and objects inside a protobuf Struct.
    guards = [{"stage": "request", "guard": "pii", "action": "rewrite", "counts": {"email": 1}}]
    data = {**data, "guards": guards, "prompt": ["hello [EMAIL]"]}
    observer = observe(services, data, [stream_bytes(["Bon", "jour"], USAGE)])
    assert observer.report is not None
    assert observer.report.guards == guards
    assert observer.report.prompt["prompt"] == ["hello [EMAIL]"]
    assert trail.log is not None and trail.log.flush()
    (record,) = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert record["guards"] == guards and record["path"] == "observed"
    assert record["tokens"]["input"] == 123 and record["prompt"] == ["hello [EMAIL]"]
    trail.close()
