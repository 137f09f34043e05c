"""The benchmarks' floor server (benchmarks/lib/floor.py) and the streaming benchmark's floor
figures: the floor decides each request's path as the sidecar's plan does, answers an event
stream it keeps as the sidecar's stage does, and the summary, report and budget show the
gateway against Envoy alone and against the floor. No Envoy, no network."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from benchmarks import streaming
from benchmarks.lib import budget
from benchmarks.lib.configs import (
    STREAM_VARIANTS,
    Scenario,
    floor_settings,
    gateway_config,
    stream_label,
)
from benchmarks.lib.floor import FloorProcessor, parse_args
from benchmarks.lib.report import streaming_markdown
from benchmarks.lib.stats import summarize_stream_latency
from extproc.config import ResolvedTarget, SidecarSettings, load_config
from extproc.contract import (
    METADATA_NAMESPACE,
    OBSERVE_STAGE,
    ROUTE_HEADER,
    STAGE_METADATA,
    TARGET_HEADER,
    UPSTREAM_STAGE,
)
from extproc.identity import Identity
from extproc.protocol import OBSERVED_RESPONSE, STREAMED_RESPONSE, common
from extproc.request_plan import Admitted, plan
from extproc.wire.openai import CHAT, OPENAI

MODEL = "gpt-4o-mini"
TARGET = ResolvedTarget(MODEL, "fake", MODEL, 1, "authorization", None)


def body(stream: bool = False, include_usage: bool = False) -> bytes:
    doc: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
    if stream:
        doc["stream"] = True
        if include_usage:
            doc["stream_options"] = {"include_usage": True}
    return orjson.dumps(doc)


# -- the per-request decision -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "include_usage", "stream_path", "json_path", "one_backend", "guards"),
    [
        case
        for case in itertools.product(
            (False, True),
            (False, True),
            ("auto", "inline", "observe"),
            ("access_log", "inline"),
            (True, False),
            (False, True),
        )
        if case[0] or not case[1]  # include_usage only means something for a stream
    ],
)
def test_the_floor_decides_as_the_sidecars_plan(
    stream: bool,
    include_usage: bool,
    stream_path: str,
    json_path: str,
    one_backend: bool,
    guards: bool,
) -> None:
    raw = body(stream, include_usage)
    admitted = Admitted(
        who=Identity("bench"),
        request=OPENAI.parse(CHAT, raw),
        wire=OPENAI,
        prompt_tokens=1,
        max_output=10,
        response_guards=guards,
    )
    sidecar = SidecarSettings.model_validate({"stream_path": stream_path, "json_path": json_path})
    expected = plan(admitted, TARGET if one_backend else None, sidecar)
    # What the stack tells the floor server (configs.floor_releases / floor_settings).
    releasable = one_backend and json_path == "access_log" and not guards
    floor = FloorProcessor(MODEL, "fake", releasable, stream_path, guards)
    assert floor.plan(raw) == (expected.release, expected.observe)


def test_the_marks_read_the_raw_body_whatever_its_spacing() -> None:
    floor = FloorProcessor(MODEL, "fake", release=True)
    spaced = b'{"model": "m", "stream" :  true, "stream_options": {"include_usage" : true}}'
    assert floor.plan(spaced) == (True, False)  # auto: released, Envoy reads the usage
    assert floor.plan(b'{"model":"m","stream":true}') == (False, False)  # inline
    assert floor.plan(b'{"model":"m","stream":false}') == (True, False)  # a JSON answer
    no_usage = b'{"stream":true,"stream_options":{"include_usage":false}}'
    assert floor.plan(no_usage) == (False, False)
    # A quote inside a JSON string is escaped: the mark matches keys only.
    assert floor.plan(b'{"messages":[{"content":"\\"stream\\": true"}]}') == (True, False)


def test_an_unknown_stream_path_is_refused() -> None:
    with pytest.raises(ValueError, match="stream_path"):
        FloorProcessor(MODEL, None, False, "sometimes")
    with pytest.raises(SystemExit):
        parse_args(["--listen", "127.0.0.1:1", "--model", MODEL, "--stream-path", "sometimes"])


def test_the_command_line_takes_the_gateways_stream_settings() -> None:
    args = parse_args(["--listen", "127.0.0.1:1", "--model", MODEL])
    assert (args.release, args.stream_path, args.response_guards) == (False, "auto", False)
    args = parse_args(
        ["--listen", "127.0.0.1:1", "--model", MODEL, "--release", "--stream-path", "observe",
         "--response-guards"]
    )  # fmt: skip
    assert (args.release, args.stream_path, args.response_guards) == (True, "observe", True)


# -- the exchange ------------------------------------------------------------------------------


class Context:
    def __init__(self, stage: str | None = None) -> None:
        self.stage = stage

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [(STAGE_METADATA, self.stage)] if self.stage else []


def headers_msg(**headers: str) -> pb.HttpHeaders:
    values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values))


def sse_headers(status: str = "200", end_of_stream: bool = False) -> pb.ProcessingRequest:
    msg = headers_msg(**{":status": status, "content-type": "text/event-stream"})
    msg.end_of_stream = end_of_stream
    return pb.ProcessingRequest(response_headers=msg)


def exchange(
    floor: FloorProcessor,
    raw: bytes,
    response: list[pb.ProcessingRequest],
    stage: str | None = None,
) -> list[pb.ProcessingResponse]:
    """Every answer the floor gives to a request with body `raw` and then `response`."""
    messages = [
        pb.ProcessingRequest(request_headers=headers_msg(**{":path": "/v1/chat/completions"})),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=raw, end_of_stream=True)),
        *response,
    ]

    async def requests() -> AsyncIterator[pb.ProcessingRequest]:
        for message in messages:
            yield message

    async def run() -> list[pb.ProcessingResponse]:
        return [answer async for answer in floor.Process(requests(), Context(stage))]

    return asyncio.run(run())


def chunk(text: bytes, end: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=text, end_of_stream=end))


def metadata(answer: pb.ProcessingResponse) -> dict[str, Any]:
    if not answer.HasField("dynamic_metadata"):
        return {}
    return dict(answer.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value)


def test_a_chat_request_gets_the_answers_it_always_got() -> None:
    routing = {ROUTE_HEADER: MODEL, TARGET_HEADER: "fake"}
    # The answer to a released request's body before the floor decided per request.
    before = pb.ProcessingResponse(
        request_body=pb.BodyResponse(response=common(routing, clear_route_cache=True))
    )
    marked = struct_pb2.Struct()
    marked.update({METADATA_NAMESPACE: {"account": True}})
    before.dynamic_metadata.CopyFrom(marked)
    answers = exchange(FloorProcessor(MODEL, "fake", True), body(), [chunk(b"{}", True)])
    assert len(answers) == 2  # released: the stream ends after the body
    assert answers[0] == pb.ProcessingResponse(request_headers=pb.HeadersResponse())
    assert answers[1] == before
    # Kept (no --release): empty answers to everything, the JSON answer stays BUFFERED.
    json_headers = pb.ProcessingRequest(
        response_headers=headers_msg(**{":status": "200", "content-type": "application/json"})
    )
    answers = exchange(FloorProcessor(MODEL, None, False), body(), [json_headers, chunk(b"{}")])
    assert [a.WhichOneof("response") for a in answers] == [
        "request_headers",
        "request_body",
        "response_headers",
        "response_body",
    ]
    assert not any(a.HasField("mode_override") or a.HasField("dynamic_metadata") for a in answers)
    assert answers[1].request_body.response.header_mutation.set_headers[0].header.key == (
        ROUTE_HEADER
    )


def test_an_inline_stream_switches_to_streamed_and_every_chunk_passes_unchanged() -> None:
    floor = FloorProcessor(MODEL, "fake", True)  # auto, the client did not ask for usage
    chunks = [chunk(b'data: {"choices":[]}\n\n'), chunk(b"data: [DONE]\n\n", True)]
    answers = exchange(floor, body(stream=True), [sse_headers(), *chunks])
    assert len(answers) == 5
    assert not answers[1].HasField("dynamic_metadata")  # kept: no account, no observer
    assert answers[2].HasField("response_headers")
    assert answers[2].mode_override == STREAMED_RESPONSE
    for answer in answers[3:]:
        assert answer == pb.ProcessingResponse(response_body=pb.BodyResponse())


def test_a_stream_with_usage_asked_is_released_under_auto() -> None:
    floor = FloorProcessor(MODEL, "fake", True, "auto")
    answers = exchange(floor, body(stream=True, include_usage=True), [sse_headers()])
    assert len(answers) == 2  # released with its body: nothing of the answer comes here
    assert metadata(answers[1]) == {"account": True}


def test_observe_releases_every_stream_and_instantiates_the_observer() -> None:
    floor = FloorProcessor(MODEL, "fake", True, "observe")
    for usage in (False, True):
        answers = exchange(floor, body(stream=True, include_usage=usage), [sse_headers()])
        assert len(answers) == 2
        assert metadata(answers[1]) == {"account": True, "observe": True}


def test_an_observed_stream_that_is_kept_lets_the_observer_follow_the_body() -> None:
    floor = FloorProcessor(MODEL, None, False, "observe")  # Envoy chooses the backend
    answers = exchange(floor, body(stream=True), [sse_headers(), chunk(b"data: x\n\n")])
    assert metadata(answers[1]) == {"observe": True}
    assert answers[2].mode_override == OBSERVED_RESPONSE
    # A failed stream is not followed by the observer: it goes inline.
    answers = exchange(floor, body(stream=True), [sse_headers("500")])
    assert answers[2].mode_override == STREAMED_RESPONSE


def test_a_stream_ended_by_its_headers_changes_no_mode() -> None:
    answers = exchange(
        FloorProcessor(MODEL, "fake", True), body(stream=True), [sse_headers(end_of_stream=True)]
    )
    assert not answers[2].HasField("mode_override")


def test_the_observer_and_the_upstream_stage() -> None:
    floor = FloorProcessor(MODEL, "fake", True)
    assert exchange(floor, body(stream=True), [chunk(b"x")], OBSERVE_STAGE) == []
    answers = exchange(floor, body(), [], UPSTREAM_STAGE)
    assert answers == [pb.ProcessingResponse(request_headers=pb.HeadersResponse())]


# -- configs and the stack's floor settings -----------------------------------------------------


def test_the_stream_path_is_written_only_when_not_the_default(tmp_path: Path) -> None:
    assert "stream_path" not in gateway_config(1)["sidecar"]
    observe = Scenario(stream_path="observe")
    config = gateway_config(1, observe)
    assert config["sidecar"]["stream_path"] == "observe"
    assert observe.name.endswith("+stream-path-observe") and not observe.is_headline
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = floor_settings(load_config(path), {ROUTE_HEADER: MODEL, TARGET_HEADER: "fake"})
    assert settings == {
        "headers": {ROUTE_HEADER: MODEL, TARGET_HEADER: "fake"},
        "release": True,
        "stream_path": "observe",
        "response_guards": False,
    }


def test_the_streaming_command_line_takes_the_stream_path() -> None:
    assert streaming.parse_args(["--quick"]).stream_path == "auto"
    assert streaming.parse_args(["--stream-path", "observe"]).stream_path == "observe"
    with pytest.raises(SystemExit):
        streaming.parse_args(["--stream-path", "sometimes"])


# -- summary, report, budget --------------------------------------------------------------------

# Each variant's median time to first token (ms); the rest follows from it.
TTFT = {
    "baseline": 1.0,
    "floor_inline": 1.5,
    "inline": 2.25,
    "floor_observed": 1.25,
    "observed": 1.5,
}


def sample(variant: str, run: int) -> dict[str, Any]:
    ttft = TTFT[variant] + (run - 1) / 50  # medians over the two runs: +0.01
    return {
        "run": run,
        "target": variant,
        "streams": 10,
        "errors": 0,
        "streams_with_missing_deltas": 0,
        "ttft_p50_ms": ttft,
        "ttft_p99_ms": 2 * ttft,
        "gap_p50_ms": 10.0,
        "gap_p99_ms": 10.5,
        "headers_p50_ms": ttft / 2,
        "first_after_headers_p50_ms": ttft / 2,
        "first_after_headers_p99_ms": ttft,
        "cpu_ms_per_stream": {"envoy": 0.5},
        **(
            {"ext_proc_per_stream": {"streams": 1.0, "messages_sent": 2.0}}
            if variant != "baseline"
            else {}
        ),
    }


def result(stream_path: str = "auto") -> dict[str, Any]:
    samples = [sample(v, run) for run in (1, 2) for v in STREAM_VARIANTS]
    return {
        "settings": {
            "runs": 2,
            "latency_streams": 10,
            "tokens": 20,
            "tokens_per_second": 100.0,
            "envoy_concurrency": 1,
            "slow_tokens": 15,
            "slow_tokens_per_second": 1.0,
            "settle_s": 1.0,
            "quota": "memory",
            "stream_path": stream_path,
        },
        "machine": {"cpus": 2},
        "latency": summarize_stream_latency(samples, 10.0),
        "memory": [],
        "notes": [],
        "latency_samples": samples,
    }


def test_the_summary_compares_each_gateway_path_with_envoy_alone_and_its_floor() -> None:
    latency = result()["latency"]
    assert latency["added_ms"]["inline"]["ttft_p50"] == pytest.approx(1.25)
    assert latency["added_ms"]["floor_inline"]["ttft_p50"] == pytest.approx(0.5)
    assert latency["added_vs_floor_ms"]["inline"]["ttft_p50"] == pytest.approx(0.75)
    assert latency["added_vs_floor_ms"]["observed"]["ttft_p99"] == pytest.approx(0.5)
    assert [r["ttft_p50_ms"] for r in latency["per_run_added_vs_floor_ms"]["observed"]] == [
        pytest.approx(0.25),
        pytest.approx(0.25),
    ]
    assert latency["floor_inline"]["ext_proc_per_stream"] == {"streams": 1.0, "messages_sent": 2.0}


def test_the_report_names_the_path_each_request_took() -> None:
    text = streaming_markdown(result())
    assert "`sidecar.stream_path: auto`" in text
    assert "no sidecar stage follows the stream" in text
    assert "| gateway vs floor |" in text
    assert "| time to first token p50 (ms) | 1.01 | 1.51 | 2.26 | +0.50 ms" in text
    observe = streaming_markdown(result("observe"))
    assert "`sidecar.stream_path: observe`" in observe
    assert "counts the completion itself" in observe
    assert stream_label("observed", "auto") == "gateway, usage asked (released)"
    assert stream_label("floor_inline", "observe") == "floor, no usage asked (observer)"


def test_the_budget_reports_the_floor_rows_for_information() -> None:
    res = result()
    rows = budget.streaming_rows(res)
    info = [r for r in rows if r["verdict"] == budget.INFO]
    assert [r["key"] for r in info] == [
        "stream_added_ttft_p50_vs_floor_ms.inline",
        "stream_added_ttft_p50_vs_floor_ms.observed",
    ]
    assert info[0]["measured"] == pytest.approx(0.75)
    assert "(usage asked: released)" in info[1]["figure"]
    ttft = next(r for r in rows if r["key"] == "stream_added_ttft_p50_ms.observed")
    assert ttft["verdict"] == "pass" and "released" in ttft["figure"]
    text = budget.markdown(rows)
    assert "2 row(s) for information, with no budget" in text
    assert "not measured" in text  # the memory rows: no memory part in this result
