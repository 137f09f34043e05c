"""Streams through the real Envoy: usage always known, the client sees what it asked for."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator

import grpc
import openai
import pytest
import tiktoken

from extproc.admin.v1 import quota_pb2, quota_pb2_grpc

from .conftest import Gateway, running_gateway

# Starts a real Envoy, Redis or Prometheus: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "Stream to me."}]
EXPECTED_TEXT = " tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"


def raw_stream(gw: Gateway, body: dict, headers: dict[str, str] | None = None) -> list[bytes]:
    """The SSE events' data exactly as the client receives them."""
    req = urllib.request.Request(
        f"{gw.base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={
            "authorization": "Bearer sk-team-a",
            "content-type": "application/json",
            **(headers or {}),
        },
    )
    with urllib.request.urlopen(req, timeout=20) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    return [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]


@pytest.fixture(scope="module")
def observing_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The shared gateway's config on a stack of its own, with `sidecar.stream_path: observe`:
    the observer follows every stream that needs no change, a client that asked for usage too
    (`auto`, the shared gateway's, lets Envoy read such a stream's usage report instead)."""
    with running_gateway(tmp_path_factory.mktemp("observing"), stream_path="observe") as gw:
        yield gw


def gateway_for(request: pytest.FixtureRequest, path: str) -> Gateway:
    """released: the shared gateway (`stream_path: auto`); observed: `stream_path: observe`."""
    return request.getfixturevalue({"released": "gateway", "observed": "observing_gateway"}[path])


def stats(gw: Gateway) -> quota_pb2.GetStatsResponse:
    with grpc.insecure_channel(gw.sidecar_listen) as channel:
        stub = quota_pb2_grpc.QuotaAdminStub(channel)
        return stub.GetStats(quota_pb2.GetStatsRequest(), timeout=5)


def log_entry(gw: Gateway, request_id: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for entry in gw.access_log():
            if entry.get("request_id") == request_id:
                return entry
        time.sleep(0.1)
    raise AssertionError(f"no access log line for {request_id}")


def test_usage_is_requested_upstream_and_hidden_from_a_client_that_did_not_ask(gateway):
    gateway.clear_fakes()
    marker = f"hidden-usage-{time.monotonic_ns()}"
    events = raw_stream(
        gateway,
        {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
        {"x-request-id": marker},
    )
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == b"[DONE]"
    assert all(c["choices"] for c in chunks), "the usage-only chunk reached the client"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == EXPECTED_TEXT
    # The backend was asked for usage, and the gateway settled from its report.
    seen = gateway.fake_requests(gateway.fake_a)[-1]
    assert seen["body"]["stream_options"] == {"include_usage": True}
    entry = log_entry(gateway, marker)
    assert entry["token_source"] == "provider"
    assert entry["completion_tokens"] == 8


@pytest.mark.parametrize("path", ["released", "observed"])
def test_a_client_that_asked_for_usage_gets_the_stream_untouched(
    request: pytest.FixtureRequest, path: str
):
    gw = gateway_for(request, path)
    marker = f"{path}-{time.monotonic_ns()}"
    before = stats(gw)
    events = raw_stream(
        gw,
        {
            "model": "gpt-4o-mini",
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        {"x-request-id": marker},
    )
    chunks = [json.loads(e) for e in events[:-1]]
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 8
    assert all(c["choices"] and c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert text == EXPECTED_TEXT
    # The backend got the client's own request for usage, nothing added.
    seen = gw.fake_requests(gw.fake_a)[-1]
    assert seen["body"]["stream_options"] == {"include_usage": True}
    entry = log_entry(gw, marker)
    assert (entry["team"], entry["model"], entry["backend"]) == ("team-a", "gpt-4o-mini", "fake-a")
    assert entry["status"] == 200
    if path == "released":
        # No stage of the sidecar followed it: Envoy's extproc.stream_usage filter read the
        # stream's usage report into the request's metadata, where its access log finds it.
        usage = last["usage"]
        assert entry["prompt_tokens"] == usage["prompt_tokens"]
        assert entry["completion_tokens"] == 8
        assert entry["total_tokens"] == usage["total_tokens"]
        assert entry["token_source"] == "provider"
        # No chunk timings: nothing timed its chunks.
        assert entry["ttft_ms"] is None and entry["chunks"] is None
        assert stats(gw).sse_streams_total == before.sse_streams_total  # followed by none
    else:
        # Followed by the observer, which Envoy does not wait for and whose answers it
        # ignores: the access log knows who and where, the observer settles the usage (quota
        # tests).
        deadline = time.monotonic() + 5
        while stats(gw).sse_streams_total == before.sse_streams_total:
            assert time.monotonic() < deadline, "the observer never followed the stream"
            time.sleep(0.05)


def test_a_backend_without_usage_is_counted_by_the_gateway(gateway):
    """Counted at [DONE], and the access log told with that event: the openai SDK closes the
    connection at [DONE], and this backend ends its stream only later (CI once saw the
    gateway's count miss the access log when the SDK closed first)."""
    marker = f"own-count-{time.monotonic_ns()}"
    client = openai.OpenAI(base_url=gateway.base_url, api_key="sk-team-a", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-fake-no-usage": "1", "x-fake-linger-ms": "500", "x-request-id": marker},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == EXPECTED_TEXT
    entry = log_entry(gateway, marker)
    assert entry["token_source"] == "estimate"
    # gpt-4o counts with o200k_base, as the sidecar does.
    assert entry["completion_tokens"] == len(tiktoken.get_encoding("o200k_base").encode(text))


def test_stream_timing_reaches_the_access_log(gateway):
    marker = f"timing-{time.monotonic_ns()}"
    client = openai.OpenAI(base_url=gateway.base_url, api_key="sk-team-a", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-fake-tokens-per-second": "50", "x-request-id": marker},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    entry = log_entry(gateway, marker)
    assert entry["ttft_ms"] >= 0
    assert entry["chunks"] >= 2
    # Paced at 50 tokens/s, consecutive chunks cannot be closer than the pacing on average.
    assert entry["mean_gap_ms"] >= 10
    assert 0 < entry["output_tokens_per_s"] < 200


@pytest.mark.parametrize("path", ["inline", "observed"])
def test_active_streams_are_visible(request: pytest.FixtureRequest, path: str):
    # inline: the client did not ask for usage (the shared gateway relays the stream); observed:
    # it asked, and the observer follows (stream_path: observe).
    asked = path == "observed"
    gw = request.getfixturevalue("observing_gateway" if asked else "gateway")
    client = openai.OpenAI(base_url=gw.base_url, api_key="sk-team-a", max_retries=0)
    started = threading.Event()

    def slow_stream() -> None:
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-fake-tokens-per-second": "10", "x-fake-response-tokens": "15"},
            **({"stream_options": {"include_usage": True}} if asked else {}),
        )
        for _ in stream:
            started.set()

    before = stats(gw)
    worker = threading.Thread(target=slow_stream)
    worker.start()
    assert started.wait(10)
    during = stats(gw)
    worker.join(20)
    assert during.active_sse_streams >= 1
    assert during.sse_streams_total > before.sse_streams_total
    deadline = time.monotonic() + 5
    while stats(gw).active_sse_streams != 0:
        assert time.monotonic() < deadline, "a finished stream is still counted as active"
        time.sleep(0.05)


def test_a_released_stream_is_followed_by_no_stage(gateway: Gateway):
    """stream_path: auto, one backend, the client asked for usage: no stage of the sidecar
    follows the stream (Envoy reads its usage report), so it is no active stream, and its
    access log line has the usage but no chunk timings."""
    client = openai.OpenAI(base_url=gateway.base_url, api_key="sk-team-a", max_retries=0)
    marker = f"released-{time.monotonic_ns()}"
    started = threading.Event()
    chunks: list = []

    def slow_stream() -> None:
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={
                "x-fake-tokens-per-second": "10",
                "x-fake-response-tokens": "15",
                "x-request-id": marker,
            },
        )
        for chunk in stream:
            chunks.append(chunk)
            started.set()

    before = stats(gateway)
    worker = threading.Thread(target=slow_stream)
    worker.start()
    assert started.wait(10)
    during = stats(gateway)
    worker.join(20)
    assert not worker.is_alive()
    # Nothing else runs on the gateway meanwhile: no stream opened, none followed.
    assert during.sse_streams_total == before.sse_streams_total
    assert during.active_sse_streams <= before.active_sse_streams
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 15
    entry = log_entry(gateway, marker)
    assert entry["completion_tokens"] == 15 and entry["token_source"] == "provider"
    for key in ("ttft_ms", "chunks", "max_gap_ms", "mean_gap_ms", "output_tokens_per_s"):
        assert entry[key] is None, (key, entry)
    assert stats(gateway).sse_streams_total == before.sse_streams_total
