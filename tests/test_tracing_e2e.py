"""Traces through the real Envoy: the sidecar runs in this process with an in-memory span
exporter, so its spans can be read back; Envoy and the fake LLM are real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from extproc.server import Sidecar
from extproc.supervisor import Stack

from .conftest import BACKEND_A_SECRET, free_port, sha256_hex

# Starts a real Envoy, Redis or Prometheus: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

MODEL = "gpt-4o-mini"
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def tracing_config(ports: dict[str, int]) -> dict[str, Any]:
    fake = f"http://127.0.0.1:{ports['fake']}/v1"
    return {
        "sidecar": {"listen": f"127.0.0.1:{ports['sidecar']}", "grace_s": 2},
        "envoy": {
            "listen": f"127.0.0.1:{ports['envoy']}",
            "admin": f"127.0.0.1:{ports['admin']}",
            "access_log": False,
        },
        "teams": {
            "alpha": {
                "keys": [{"sha256": sha256_hex("sk-alpha")}],
                "limits": [{"name": "big", "window": "month", "tokens": 1_000_000}],
            }
        },
        "backends": {"fake": {"url": fake, "api_key": {"env": "TEST_BACKEND_A_KEY"}}},
        "models": {MODEL: {"targets": [{"backend": "fake"}]}},
        "guards": {
            "llama": {
                "type": "llama_guard",
                "url": fake,
                "model": "llama-guard-3-8b",
                "timeout_ms": 2000,
            }
        },
        "guardrails": {"request": ["llama"]},
        "observability": {
            "tracing": {
                "enabled": True,
                # Nobody listens there: Envoy's own export fails quietly, requests do not.
                "otlp_endpoint": f"http://127.0.0.1:{ports['collector']}",
            }
        },
        "fake_llm": {"listen": f"127.0.0.1:{ports['fake']}", "response_tokens": 8},
    }


@dataclass
class Traced:
    base_url: str
    fake: str
    exporter: InMemorySpanExporter

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="sk-alpha", max_retries=0, timeout=20)

    def backend_traceparents(self) -> list[str]:
        with urllib.request.urlopen(f"{self.fake}/_fake/requests", timeout=5) as resp:
            records = json.loads(resp.read())
        return [
            r["headers"].get("traceparent", "")
            for r in records
            if r["path"] == "/v1/chat/completions" and (r["body"] or {}).get("model") == MODEL
        ]

    def clear(self) -> None:
        self.exporter.clear()
        req = urllib.request.Request(f"{self.fake}/_fake/requests", method="DELETE")
        urllib.request.urlopen(req, timeout=5).close()

    def spans(self, *names: str, timeout: float = 10.0) -> dict[str, ReadableSpan]:
        """The finished spans by name, once those named have ended (the request's span ends
        when Envoy closes its stream, the settlement after the response)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = {s.name: s for s in self.exporter.get_finished_spans()}
            if set(names) <= spans.keys() or time.monotonic() > deadline:
                return spans
            time.sleep(0.05)


class InProcessSidecar:
    """The real Sidecar on its own event loop in a thread."""

    def __init__(self, config_path: Path, provider: TracerProvider) -> None:
        self.loop = asyncio.new_event_loop()
        self.sidecar: Sidecar | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.config_path = config_path
        self.provider = provider

    def start(self) -> None:
        self.thread.start()

        async def _start() -> None:
            self.sidecar = Sidecar(self.config_path, tracer_provider=self.provider)
            await self.sidecar.start()

        asyncio.run_coroutine_threadsafe(_start(), self.loop).result(30)

    def stop(self) -> None:
        if self.sidecar is not None:
            asyncio.run_coroutine_threadsafe(self.sidecar.stop(2), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextlib.contextmanager
def traced_stack(tmp: Path, **sidecar: Any) -> Iterator[Traced]:
    ports = {k: free_port() for k in ("sidecar", "envoy", "admin", "fake", "collector")}
    config = tracing_config(ports)
    config["sidecar"].update(sidecar)
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    os.environ["TEST_BACKEND_A_KEY"] = BACKEND_A_SECRET
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    in_process = InProcessSidecar(path, provider)
    with open(tmp / "stack.log", "ab", buffering=0) as log:
        stack = Stack(path, workdir=tmp, stdout=log, sidecar=False)
        try:
            in_process.start()
            stack.start()
            yield Traced(
                base_url=f"http://{config['envoy']['listen']}/v1",
                fake=f"http://127.0.0.1:{ports['fake']}",
                exporter=exporter,
            )
        finally:
            stack.stop(grace=10)
            in_process.stop()


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    """The default paths (stream_path auto, json_path access_log)."""
    with traced_stack(tmp_path_factory.mktemp("tracing")) as t:
        yield t


@pytest.fixture
def observing_traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    """stream_path: observe: the observer follows the streams the default releases."""
    with traced_stack(tmp_path_factory.mktemp("tracing-observe"), stream_path="observe") as t:
        yield t


def trace_id(span: ReadableSpan) -> str:
    return format(span.context.trace_id, "032x")


def test_a_request_span_continues_envoys_trace_with_genai_attributes(traced: Traced) -> None:
    traced.clear()
    reply = traced.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}]
    )
    assert reply.usage is not None
    children = ("guards local", "guard llama", "quota reserve", "route", "response")
    spans = traced.spans(f"chat {MODEL}", *children, "quota settle")
    request = spans[f"chat {MODEL}"]
    # The trace Envoy started: the backend got Envoy's traceparent, with the same trace id.
    (sent,) = traced.backend_traceparents()
    assert sent.split("-")[1] == trace_id(request)
    assert request.parent is not None and request.parent.is_remote  # Envoy's span
    attrs = request.attributes or {}
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.response.model"] == MODEL
    assert attrs["extproc.team"] == "alpha"
    assert attrs["extproc.backend"] == "fake"
    # Its children: the guard call, the quota operations, the backend choice, and the answer
    # as Envoy's access log reported it (json_path: access_log, the default).
    for name in children:
        child = spans[name]
        assert child.parent is not None and child.parent.span_id == request.context.span_id, name
        assert trace_id(child) == trace_id(request)
    assert (spans["guard llama"].attributes or {})["extproc.guard.action"] == "allow"
    assert (spans["route"].attributes or {})["extproc.backend"] == "fake"
    answer = spans["response"].attributes or {}
    assert answer["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
    assert answer["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens == 8
    assert answer["extproc.outcome"] == "served"
    assert answer["http.response.status_code"] == 200
    settle = spans["quota settle"]
    assert settle.parent is not None and settle.parent.span_id == spans["response"].context.span_id
    assert (settle.attributes or {})["extproc.output_tokens"] == 8


def test_a_client_traceparent_is_continued_through_envoy(traced: Traced) -> None:
    traced.clear()
    parent = f"00-{CLIENT_TRACE_ID}-00f067aa0ba902b7-01"
    traced.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        extra_headers={"traceparent": parent},
    )
    request = traced.spans(f"chat {MODEL}")[f"chat {MODEL}"]
    assert trace_id(request) == CLIENT_TRACE_ID
    (sent,) = traced.backend_traceparents()
    assert sent.split("-")[1] == CLIENT_TRACE_ID


def streamed_usage(traced: Traced) -> Any:
    """A stream whose client asked for usage: the backend's report, as the client got it."""
    traced.clear()
    chunks = list(
        traced.client().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None
    return usage


def test_an_observed_stream_reports_its_usage_in_the_same_trace(
    observing_traced: Traced,
) -> None:
    usage = streamed_usage(observing_traced)
    spans = observing_traced.spans(f"chat {MODEL}", "stream")
    request, stream = spans[f"chat {MODEL}"], spans["stream"]
    assert trace_id(stream) == trace_id(request)
    assert stream.parent is not None and stream.parent.span_id == request.context.span_id
    attrs = stream.attributes or {}
    assert attrs["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert (request.attributes or {})["extproc.stream"] is True


def test_a_released_stream_reports_its_usage_in_the_same_trace(traced: Traced) -> None:
    """The default path of such a stream: no stage follows it (no "stream" span); its usage
    report, read by Envoy, comes back in the access log, whose reader answers for it in the
    request's trace as for a JSON answer ("response", then "quota settle")."""
    usage = streamed_usage(traced)
    spans = traced.spans(f"chat {MODEL}", "response", "quota settle")
    request, answer = spans[f"chat {MODEL}"], spans["response"]
    assert "stream" not in spans
    assert (request.attributes or {})["extproc.stream"] is True
    assert trace_id(answer) == trace_id(request)
    assert answer.parent is not None and answer.parent.span_id == request.context.span_id
    attrs = answer.attributes or {}
    assert attrs["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == usage.completion_tokens == 8
    assert attrs["extproc.outcome"] == "served"
    settle = spans["quota settle"]
    assert settle.parent is not None and settle.parent.span_id == answer.context.span_id
    assert (settle.attributes or {})["extproc.output_tokens"] == 8
