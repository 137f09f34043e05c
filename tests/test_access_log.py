"""The access log's reader: what it settles and reports for an answer the downstream stage
released, driven with hand-built Envoy access log entries (the e2e tests use a real Envoy)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from extproc import access_log
from extproc.access_log import account
from extproc.quota.policy import Amounts
from extproc.services import Services
from extproc.settlement import AnswerPath
from extproc.streams import Released
from extproc.telemetry import metrics
from extproc.telemetry.audit import AuditTrail

from .test_downstream import unpacked, with_default_max_tokens, with_sidecar
from .test_observer import MODEL, chat, recording, request_metadata
from .test_observer import released_base as base  # noqa: F401

USAGE = {"prompt_tokens": 31.0, "completion_tokens": 7.0, "total_tokens": 38.0}
RESULTS = ("accounted", "ignored", "error")


def entry(
    data: dict[str, Any],
    status: int = 200,
    usage: dict[str, float] | None = None,
    body_bytes: int = 300,
    duration_ms: int = 0,
) -> accesslog_pb2.HTTPAccessLogEntry:
    """An entry as Envoy sends it: the downstream stage's metadata, plus what json_to_metadata
    copied from the answer."""
    e = accesslog_pb2.HTTPAccessLogEntry()
    namespace = e.common_properties.metadata.filter_metadata["extproc"]
    namespace.update(data)
    if usage is not None:
        namespace.update({**usage, "token_source": "provider"})
    if status:
        e.response.response_code.value = status
    e.response.response_body_bytes = body_bytes
    if duration_ms:
        e.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(duration_ms)
    return e


def released(services: Services, **fields: Any) -> dict[str, Any]:
    stream, data = request_metadata(services, chat(stream=False, max_tokens=16, **fields))
    assert (stream.path is AnswerPath.LOGGED) and data["account"] is True
    return data


def run_account(services: Services, e: Any) -> bool:
    async def go() -> bool:  # on a loop, as in the server: settling is scheduled there
        return account(services, e)

    return asyncio.run(go())


def test_the_backends_usage_is_settled(base: Services) -> None:  # noqa: F811
    services, recorder = recording(base)
    data = released(services)
    assert run_account(services, entry(data, usage=USAGE))
    ((reservation, actual),) = recorder.settled
    assert reservation is not None and reservation.id == unpacked(data)["reservation"]
    assert actual == Amounts(31, 7)


def test_an_answer_without_usage_is_charged_the_requests_maximum(base: Services) -> None:  # noqa: F811
    services, recorder = recording(base)
    data = released(services)
    run_account(services, entry(data))
    ((_, actual),) = recorder.settled
    assert actual == Amounts(int(unpacked(data)["prompt_tokens_estimate"]), 16)  # max_tokens


@pytest.mark.parametrize(
    ("fields", "output"),
    [({"max_tokens": None}, 5), ({"max_tokens": 4, "n": 3}, 12)],
    ids=["default", "n"],
)
def test_an_answer_without_usage_is_charged_the_max_output_as_reserved(
    base: Services,  # noqa: F811
    fields: dict[str, Any],
    output: int,
) -> None:
    """The access log's reader never sees the answer: the output charged is the request's max
    output, as reserved (quota.default_max_tokens when it sets none; times n)."""
    services, recorder = recording(with_default_max_tokens(base, 5))
    body = {k: v for k, v in chat(stream=False, **fields).items() if v is not None}
    stream, data = request_metadata(services, body)
    assert (stream.path is AnswerPath.LOGGED) and unpacked(data)["output_estimate"] == output
    assert stream.reservation is not None
    assert stream.reservation.estimate == Amounts(
        int(unpacked(data)["prompt_tokens_estimate"]), output
    )
    run_account(services, entry(data))
    ((_, actual),) = recorder.settled
    assert actual == Amounts(int(unpacked(data)["prompt_tokens_estimate"]), output)


def test_an_empty_answer_is_charged_the_prompt(base: Services) -> None:  # noqa: F811
    services, recorder = recording(base)
    data = released(services)
    run_account(services, entry(data, body_bytes=0))
    ((_, actual),) = recorder.settled
    assert actual == Amounts(int(unpacked(data)["prompt_tokens_estimate"]), 0)


@pytest.mark.parametrize(
    ("status", "expected"),
    [(429, "zero"), (503, "zero"), (0, "prompt")],
    ids=["backend-429", "envoy-503", "client-left"],
)
def test_no_answer_settles_nothing_or_the_prompt(
    base: Services,  # noqa: F811
    status: int,
    expected: str,
) -> None:
    services, recorder = recording(base)
    data = released(services)
    run_account(services, entry(data, status=status))
    ((_, actual),) = recorder.settled
    prompt = int(unpacked(data)["prompt_tokens_estimate"])
    assert actual == (Amounts(0, 0) if expected == "zero" else Amounts(prompt, 0))


def test_the_request_is_counted_once_with_its_outcome(base: Services) -> None:  # noqa: F811
    services, _ = recording(base)
    data = released(services)
    labels = ("none", "team-b", MODEL, "backend_error", "503", "openai")
    before = metrics.REQUESTS.labels(*labels)._value.get()
    run_account(services, entry(data, status=503))
    assert metrics.REQUESTS.labels(*labels)._value.get() == before + 1


def test_the_audit_record_takes_envoys_latency(
    base: Services,  # noqa: F811
    tmp_path: Any,
) -> None:
    trail = AuditTrail()
    trail.configure(tmp_path / "audit.jsonl", 1 << 20, 1)
    services, _ = recording(dataclasses.replace(base, audit=trail))
    data = released(services)
    run_account(services, entry(data, usage=USAGE, duration_ms=1234))
    trail.close()
    (record,) = [json.loads(line) for line in (tmp_path / "audit.jsonl").open()]
    assert record["latency_ms"] == 1234.0
    assert (record["path"], record["stream"], record["status"]) == ("logged", False, 200)
    assert record["tokens"]["output"] == 7 and record["tokens"]["source"] == "provider"


def test_released_answers_are_waited_for_until_their_horizon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    released_now = Released()
    clock = [100.0]
    monkeypatch.setattr("extproc.streams.time.monotonic", lambda: clock[0])
    released_now.horizon_s = 30.0
    released_now.add()
    released_now.add()
    assert released_now.pending == 2
    released_now.done()  # an entry came back (oldest first)
    assert released_now.pending == 1
    clock[0] += 31  # the other one is older than any request may take: lost, not waited for
    assert released_now.pending == 0
    released_now.done()  # a late (or another worker's) entry: nothing to match, no harm
    assert released_now.pending == 0


def test_a_stream_the_observer_followed_is_only_counted(base: Services) -> None:  # noqa: F811
    services, recorder = recording(with_sidecar(base, stream_path="observe"))
    stream, data = request_metadata(
        services, chat(stream=True, stream_options={"include_usage": True})
    )
    assert (
        (stream.path is AnswerPath.LOGGED) and data["observe"] is True and data["account"] is True
    )
    labels = ("none", "team-b", MODEL, "served", "200", "openai")
    before = metrics.REQUESTS.labels(*labels)._value.get()
    followed = entry(data)
    followed.response.response_headers["content-type"] = "text/event-stream; charset=utf-8"
    assert run_account(services, followed)
    assert metrics.REQUESTS.labels(*labels)._value.get() == before + 1
    assert recorder.settled == []  # the observer settles what it followed
    # An error answer to the same kind of request is no stream: finished here.
    refused = entry(data, status=429)
    refused.response.response_headers["content-type"] = "application/json"
    run_account(services, refused)
    ((_, actual),) = recorder.settled
    assert actual == Amounts(0, 0)


def test_a_stream_whose_usage_envoy_read_is_settled_here(base: Services) -> None:  # noqa: F811
    """stream_path auto: Envoy's stream usage filter copied the report into the metadata."""
    services, recorder = recording(base)
    stream, data = request_metadata(
        services, chat(stream=True, stream_options={"include_usage": True})
    )
    assert stream.path is AnswerPath.LOGGED and "observe" not in data
    labels = ("none", "team-b", MODEL, "served", "200", "openai")
    before = metrics.REQUESTS.labels(*labels)._value.get()
    streamed = entry(data, usage=USAGE)
    streamed.response.response_headers["content-type"] = "text/event-stream"
    assert run_account(services, streamed)
    assert metrics.REQUESTS.labels(*labels)._value.get() == before + 1
    ((reservation, actual),) = recorder.settled
    assert reservation is not None and reservation.id == unpacked(data)["reservation"]
    assert actual == Amounts(31, 7)


def test_a_stream_cut_before_its_usage_report_is_charged_its_maximum(
    base: Services,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No report reached Envoy (the client left, or the backend broke off): nothing counted the
    chunks, so the most the request could have produced is charged, never less. Only a backend
    that ends a stream without the report it was asked for is worth a warning."""
    services, recorder = recording(base)
    for client_left in (True, False):
        caplog.clear()
        _, data = request_metadata(
            services, chat(stream=True, max_tokens=16, stream_options={"include_usage": True})
        )
        cut = entry(data)
        cut.response.response_headers["content-type"] = "text/event-stream"
        cut.common_properties.response_flags.downstream_connection_termination = client_left
        with caplog.at_level("WARNING", logger="extproc.access_log"):
            assert run_account(services, cut)
        *_, (_, actual) = recorder.settled
        assert actual == Amounts(int(unpacked(data)["prompt_tokens_estimate"]), 16)
        warned = [r.getMessage() for r in caplog.records if r.name == "extproc.access_log"]
        if client_left:
            assert warned == []
        else:
            assert len(warned) == 1 and "stream_path: observe" in warned[0]


def test_other_entries_are_ignored(base: Services) -> None:  # noqa: F811
    services, recorder = recording(base)
    assert not run_account(services, entry({"team": "team-b", "model": MODEL}))
    assert not run_account(services, accesslog_pb2.HTTPAccessLogEntry())
    assert recorder.settled == []


def test_the_receiver_survives_a_bad_entry_and_counts(
    base: Services,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services, recorder = recording(base)
    data = released(services)
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.extend(
        [entry({**data, "request_id": "bad"}), entry(data, usage=USAGE), entry({})]
    )
    real = access_log.account

    def failing_once(services: Services, e: Any) -> bool:
        if e.common_properties.metadata.filter_metadata["extproc"].fields.get("request_id"):
            raise RuntimeError("a bug")
        return real(services, e)

    monkeypatch.setattr(access_log, "account", failing_once)
    counts = {r: metrics.ACCESS_LOG_ENTRIES.labels(r)._value.get() for r in RESULTS}

    async def batches() -> Any:
        yield message

    receiver = access_log.AccessLogReceiver(lambda: services)
    asyncio.run(receiver.StreamAccessLogs(batches(), None))
    after = {r: metrics.ACCESS_LOG_ENTRIES.labels(r)._value.get() for r in RESULTS}
    assert {r: after[r] - counts[r] for r in RESULTS} == {"accounted": 1, "ignored": 1, "error": 1}
    assert recorder.settled[-1][1] == Amounts(31, 7)


@pytest.mark.parametrize("entry_s", [0.0, 0.0003])
def test_a_long_batch_gives_the_loop_back_a_short_one_does_not(
    base: Services,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    entry_s: float,
) -> None:
    """Requests in flight get the event loop between entries once the reader has held it for
    YIELD_AFTER_S; a batch of quick entries is read in one go (each turn of the loop costs)."""
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.extend([entry({}) for _ in range(20)])

    def account(services: Services, e: Any) -> bool:
        until = time.perf_counter() + entry_s
        while time.perf_counter() < until:
            pass
        return False

    monkeypatch.setattr(access_log, "account", account)
    receiver = access_log.AccessLogReceiver(lambda: base)

    async def batches() -> Any:
        yield message

    async def turns_while_reading() -> int:
        turns, reading = 0, True

        async def other_request() -> None:
            nonlocal turns
            while reading:
                turns += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(other_request())
        await asyncio.sleep(0)
        started = turns
        await receiver.StreamAccessLogs(batches(), None)
        reading = False
        await task
        return turns - started

    turns = asyncio.run(turns_while_reading())
    held = 20 * entry_s
    if entry_s:
        assert turns >= held / access_log.YIELD_AFTER_S / 2  # ~every 0.5 ms
    else:
        assert turns <= 2
