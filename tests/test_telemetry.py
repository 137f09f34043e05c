"""Unit tests of the telemetry modules: outcomes, bounded labels, the audit record's prompt
fields, tracing off and on, and the metrics endpoint."""

from __future__ import annotations

import asyncio
import logging
import urllib.request

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from extproc.config import TracingSettings, parse_config
from extproc.contract import Handover
from extproc.guard.types import Verdict
from extproc.telemetry import metrics, tracing
from extproc.telemetry.audit import AuditTrail
from extproc.telemetry.exposition import MetricsServer
from extproc.telemetry.report import (
    RequestReport,
    backend_label,
    model_label,
    prompt_fields,
    team_label,
    verdict_entries,
)
from extproc.usage import Usage

from .conftest import REPO, free_port, sha256_hex

CONFIG = parse_config(
    {
        "teams": {"a": {"keys": [{"sha256": sha256_hex("k")}]}},
        "backends": {"b": {"url": "http://127.0.0.1:1/v1"}},
        "models": {"m": {"targets": [{"backend": "b"}]}},
        "prices": {"m": {"input": 2.0, "output": 10.0}},
    }
)


@pytest.mark.parametrize(
    ("status", "code", "failed_over", "outcome"),
    [
        (200, None, False, "served"),
        (200, None, True, "failed_over"),
        (429, "quota_exceeded:monthly", False, "quota_rejected"),
        (403, "guard_blocked:deny", False, "guard_blocked"),
        (200, "guard_blocked:pii-out", False, "guard_blocked"),  # a stream cut by a guard
        (401, "invalid_api_key", False, "rejected"),
        (400, "invalid_json", False, "rejected"),
        (503, "quota_store_unavailable", False, "error"),
        (503, None, False, "backend_error"),
        (400, None, False, "backend_error"),  # the backend's own 4xx
        (0, None, False, "cancelled"),
    ],
)
def test_outcome(status: int, code: str | None, failed_over: bool, outcome: str) -> None:
    assert metrics.outcome_of(status, code, failed_over) == outcome
    assert outcome in metrics.OUTCOMES


def test_labels_are_config_names_or_a_fixed_word() -> None:
    assert team_label(CONFIG, "a") == "a"
    assert team_label(CONFIG, None) == "none"
    assert model_label(CONFIG, "m") == "m"
    # Whatever a client sends as its model never becomes a label value.
    assert model_label(CONFIG, "m' OR 1=1; " + "x" * 500) == "unknown"
    assert model_label(CONFIG, "") == "none"
    assert backend_label(CONFIG, "b") == "b"
    assert backend_label(CONFIG, "elsewhere") == "unknown"


def test_prompt_fields_hash_always_text_only_when_enabled_and_masked() -> None:
    texts = ["mail jane@example.com", "key sk-proj-Abc123Def456Ghi789Jkl012Mno345 now"]
    hashed = prompt_fields(texts, include_prompt=False)
    assert set(hashed) == {"prompt_sha256"} and len(hashed["prompt_sha256"]) == 64
    assert prompt_fields(list(texts), include_prompt=False) == hashed  # deterministic
    full = prompt_fields(texts, include_prompt=True)
    assert full["prompt_sha256"] == hashed["prompt_sha256"]
    assert full["prompt"] == ["mail [EMAIL]", "key [SECRET] now"]


def test_each_token_is_counted_once_by_what_it_is_priced_as() -> None:
    """extproc_tokens: plain, cached and cache-written input, plain and reasoning output."""
    report = RequestReport(started_at=0.0, team="a", model="m", endpoint="/v1/chat/completions")
    report.status, report.backend = 200, "b"
    kinds = ("input", "cached_input", "cache_write_input", "output", "reasoning_output")

    def counts() -> list[float]:
        return [
            metrics.TOKENS.labels("none", "a", "m", "b", k, "provider")._value.get() for k in kinds
        ]

    before = counts()
    report.count_usage(CONFIG, Usage(1000, 100, 1100, 400, cache_write_tokens=50,
                                     reasoning_tokens=60))  # fmt: skip
    assert [a - b for a, b in zip(counts(), before, strict=True)] == [550, 400, 50, 40, 60]


def test_audit_record_and_usage_counts() -> None:
    report = RequestReport(started_at=0.0, team="a", model="m", endpoint="/v1/chat/completions")
    report.status, report.backend = 200, "b"
    report.guards = verdict_entries(
        "request", [Verdict("rewrite", "pii", reason="masked", counts={"email": 1})]
    )
    usage = Usage(1000, 100, 1100, cached_tokens=400)
    before = metrics.TOKENS.labels("none", "a", "m", "b", "cached_input", "provider")._value.get()
    cost = report.count_usage(CONFIG, usage)
    assert cost == pytest.approx((1000 * 2.0 + 100 * 10.0) / 1e6)
    after = metrics.TOKENS.labels("none", "a", "m", "b", "cached_input", "provider")._value.get()
    assert after - before == 400
    record = report.audit_record(usage, cost, 0.0123)
    assert record["time"] == "1970-01-01T00:00:00.000+00:00"
    assert record["outcome"] == "served" and record["decision"] == "allowed"
    assert record["tokens"] == {
        "input": 1000,
        "output": 100,
        "cached_input": 400,
        "cache_write_input": 0,
        "reasoning_output": 0,
        "total": 1100,
        "source": "provider",
    }
    assert record["latency_ms"] == 12.3
    assert record["guards"] == [
        {
            "stage": "request",
            "guard": "pii",
            "action": "rewrite",
            "reason": "masked",
            "counts": {"email": 1},
        }
    ]


def test_the_observer_rebuilds_the_report_from_the_handover() -> None:
    report = RequestReport(started_at=12.5, request_id="r1", team="a", model="m")
    report.endpoint = "/v1/chat/completions"
    report.guards = [{"stage": "request", "guard": "pii", "action": "rewrite"}]
    report.prompt = prompt_fields(["hello"], include_prompt=True)
    info = {"team": "a", "model": "m", "started_at": 12.5, "pool": 1, **report.handover()}
    again = RequestReport.from_handover(Handover.from_metadata(info))
    assert (again.request_id, again.team, again.model, again.started_at) == ("r1", "a", "m", 12.5)
    assert again.guards == report.guards and again.prompt == report.prompt
    assert again.failover == "quota" and again.path == "observed" and again.stream


def test_tracing_off_builds_nothing() -> None:
    off = tracing.from_settings(TracingSettings())
    assert not off.enabled
    trace = off.request({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    assert trace is tracing.NO_TRACE
    with trace.child("x") as span:
        span.set_attribute("k", 1)
    assert trace.traceparent() == "" and trace.trace_id() == ""


def test_tracing_without_the_sdk_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def missing(_settings: TracingSettings) -> TracerProvider:
        raise ImportError("No module named 'opentelemetry.sdk'")

    monkeypatch.setattr(tracing, "_otlp_provider", missing)
    with caplog.at_level(logging.ERROR, "extproc.tracing"):
        result = tracing.from_settings(TracingSettings(enabled=True))
    assert not result.enabled
    assert "pip install 'extproc[tracing]'" in caplog.text


def test_tracing_on_continues_a_traceparent_and_nests_children() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    on = tracing.from_settings(TracingSettings(enabled=True), provider)
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    # gRPC metadata first; the request headers' traceparent only when the metadata has none.
    trace = on.request({}, {"traceparent": parent})
    assert trace.trace_id() == "4bf92f3577b34da6a3ce929d0e0e4736"
    with pytest.raises(RuntimeError), trace.child("failing"):
        raise RuntimeError("boom")
    trace.set({"a": 1, "skipped": None})
    trace.end()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["failing"].parent.span_id == spans["ext_proc"].context.span_id
    assert not spans["failing"].status.is_ok
    assert dict(spans["ext_proc"].attributes or {}) == {"a": 1}
    assert spans["ext_proc"].parent.span_id == 0x00F067AA0BA902B7
    assert trace.traceparent().split("-")[2] == format(spans["ext_proc"].context.span_id, "016x")


def test_the_metrics_endpoint_serves_the_catalogue() -> None:
    async def scrape() -> tuple[str, str]:
        server = MetricsServer(f"127.0.0.1:{free_port()}")
        await server.start()
        try:
            url = f"http://127.0.0.1:{server.port}/metrics"
            return await asyncio.to_thread(
                lambda: urllib.request.urlopen(url, timeout=5).read().decode()
            ), url
        finally:
            await server.stop()

    text, _ = asyncio.run(scrape())
    for name in ("extproc_requests_total", "extproc_ext_proc_phase_seconds_bucket"):
        assert f"# TYPE {name.removesuffix('_total').removesuffix('_bucket')}" in text


# That docs/observability.md's metrics table, audit example and config block match the code is
# checked in tests/test_docs.py.


def test_audit_trail_follows_reloads_without_two_writers(tmp_path) -> None:
    trail = AuditTrail()
    assert trail.configure(tmp_path / "a.jsonl", 4096, 1) is None
    first = trail.log
    assert first is not None
    # The same file with other rotation settings: the same writer, its settings updated.
    assert trail.configure(tmp_path / "a.jsonl", 8192, 3) is None
    assert trail.log is first and (first.max_bytes, first.backups) == (8192, 3)
    # Another file: the old log is handed back to be closed; writes go to the new one.
    retired = trail.configure(tmp_path / "b.jsonl", 4096, 1)
    assert retired is first
    retired.close()
    trail.write({"n": 1})
    # Off: a stream that started with the trail on writes nothing, and nothing fails.
    second = trail.configure(None, 4096, 1)
    assert second is not None
    second.close()
    trail.write({"n": 2})
    assert (tmp_path / "b.jsonl").read_text() == '{"n":1}\n'
    assert (tmp_path / "a.jsonl").read_text() == ""


def test_a_stream_the_sidecar_failed_is_an_error_not_a_cancellation() -> None:
    from extproc.config import load_runtime
    from extproc.downstream import DownstreamStream
    from extproc.server import build_services

    services = build_services(load_runtime(REPO / "examples" / "quickstart.yaml"))
    stream = DownstreamStream(services)
    stream.failed()
    report = stream.report
    assert report is not None
    assert (report.status, report.code, report.outcome) == (503, "internal_error", "error")
