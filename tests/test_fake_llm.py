"""Tests for the OpenAI-compatible fake upstream, driven through the official openai SDK."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from extproc.devtools.fake_llm import FakeLLMSettings, add_arguments, create_app, main_from_args

MESSAGES = [{"role": "user", "content": "hello world!"}]  # 12 UTF-8 bytes -> 3 prompt tokens
REPO_ROOT = Path(__file__).resolve().parents[1]


def _tokens(count: int) -> str:
    return "".join(f" tok{i}" for i in range(count))


@contextlib.contextmanager
def _running(
    settings: FakeLLMSettings, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
) -> Iterator[int]:
    """Serve the fake on an ephemeral port in a background thread; yields the port."""
    loop = (loop_factory or asyncio.new_event_loop)()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        runner = web.AppRunner(
            create_app(settings), handler_cancellation=True, shutdown_timeout=0.5, access_log=None
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            state["port"] = runner.addresses[0][1]
            state["stop"] = asyncio.Event()
            ready.set()
            await state["stop"].wait()
        finally:
            await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(5), "fake LLM did not start"
        yield state["port"]
    finally:
        if "stop" in state:
            loop.call_soon_threadsafe(state["stop"].set)
        thread.join(5)
        assert not thread.is_alive(), "fake LLM did not shut down"
        loop.close()


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with _running(FakeLLMSettings(name="fake-a")) as bound:
        yield bound


@pytest.fixture
def client(port: int) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=5
    )


def _http(
    port: int,
    path: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# --------------------------------------------------------------------------- chat


def test_chat_completion(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES)
    assert raw.headers["x-fake-llm-instance"] == "fake-a"
    completion = raw.parse()
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-test"
    assert completion.system_fingerprint
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == _tokens(16)
    assert choice.message.refusal is None
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 3
    assert completion.usage.completion_tokens == 16
    assert completion.usage.total_tokens == 19


def test_chat_prompt_tokens_count_text_parts(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="m",
        messages=[
            {"role": "system", "content": "x" * 10},
            {"role": "user", "content": [{"type": "text", "text": "é" * 5}]},  # 10 bytes
        ],
    )
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 5


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_chat_max_tokens_caps_and_reports_length(client: openai.OpenAI, param: str) -> None:
    completion = client.chat.completions.create(model="m", messages=MESSAGES, **{param: 3})
    assert completion.choices[0].message.content == _tokens(3)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3


def test_chat_max_tokens_above_length_is_stop(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=100)
    assert completion.choices[0].message.content == _tokens(16)
    assert completion.choices[0].finish_reason == "stop"


def test_chat_stream_without_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, extra_headers={"x-fake-response-tokens": "5"}
        )
    )
    assert len(chunks) == 1 + 5 + 1
    assert len({chunk.id for chunk in chunks}) == 1
    assert all(chunk.object == "chat.completion.chunk" and chunk.model == "m" for chunk in chunks)
    assert all(chunk.usage is None and len(chunk.choices) == 1 for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert [c.choices[0].delta.content for c in chunks[1:-1]] == [f" tok{i}" for i in range(5)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == _tokens(5)
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].delta.content is None


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            stream=True,
            max_tokens=4,
            stream_options={"include_usage": True},
        )
    )
    *content_chunks, usage_chunk = chunks
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (3, 4)
    assert usage_chunk.usage.total_tokens == 7
    assert all(chunk.usage is None for chunk in content_chunks)
    assert content_chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == _tokens(4)


def test_raw_sse_framing(port: int) -> None:
    body = json.dumps(
        {
            "model": "m",
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    status, headers, payload = _http(
        port,
        "/v1/chat/completions",
        method="POST",
        body=body,
        headers={"content-type": "application/json", "x-fake-response-tokens": "2"},
    )
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["x-fake-llm-instance"] == "fake-a"
    assert payload.endswith(b"data: [DONE]\n\n")
    events = payload.split(b"\n\n")
    assert events[-1] == b""
    events = events[:-1]
    assert all(event.startswith(b"data: ") and b"\n" not in event for event in events)
    decoded = [json.loads(event[6:]) for event in events[:-1]]
    assert len(decoded) == 1 + 2 + 1 + 1
    # OpenAI sends an explicit null usage on every chunk before the usage chunk.
    assert all("usage" in chunk and chunk["usage"] is None for chunk in decoded[:-1])
    assert decoded[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert decoded[-2]["choices"][0]["delta"] == {}
    assert decoded[-1]["choices"] == []


def test_stream_pacing_honours_ttft_and_tokens_per_second(client: openai.OpenAI) -> None:
    started = time.monotonic()
    stream = client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        stream=True,
        extra_headers={
            "x-fake-ttft-ms": "150",
            "x-fake-tokens-per-second": "50",
            "x-fake-response-tokens": "6",
        },
    )
    arrivals = [time.monotonic() - started for _ in stream]
    assert arrivals[0] >= 0.14
    assert arrivals[-1] >= 0.15 + 5 / 50 - 0.01
    assert arrivals[-1] < 2


def test_non_streaming_waits_for_whole_generation(client: openai.OpenAI) -> None:
    started = time.monotonic()
    client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        extra_headers={"x-fake-ttft-ms": "50", "x-fake-tokens-per-second": "100"},
    )
    assert time.monotonic() - started >= 0.05 + 15 / 100 - 0.01


# --------------------------------------------------------------------------- completions


def test_legacy_completion(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="davinci", prompt="hello world!", max_tokens=2)
    assert completion.object == "text_completion"
    assert completion.model == "davinci"
    [choice] = completion.choices
    assert (choice.text, choice.index, choice.finish_reason) == (_tokens(2), 0, "length")
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 2)


@pytest.mark.parametrize(
    ("prompt", "prompt_tokens", "choices"),
    [(["a", "bb"], 2, 2), ([1, 2, 3], 3, 1), ([[1, 2], [3]], 3, 2)],
)
def test_legacy_completion_prompt_shapes(
    client: openai.OpenAI, prompt: Any, prompt_tokens: int, choices: int
) -> None:
    completion = client.completions.create(model="m", prompt=prompt)
    assert [c.index for c in completion.choices] == list(range(choices))
    assert all(c.text == _tokens(16) for c in completion.choices)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.completion_tokens == 16 * choices


def test_legacy_completion_stream(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="m",
            prompt="hi",
            stream=True,
            max_tokens=3,
            stream_options={"include_usage": True},
        )
    )
    *text_chunks, usage_chunk = chunks
    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == _tokens(3)
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 3


# --------------------------------------------------------------------------- embeddings


def test_embeddings_base64_default_matches_float(client: openai.OpenAI, port: int) -> None:
    # The SDK asks for base64 by default and decodes it to floats itself.
    default = client.embeddings.create(model="emb", input=["hello", "world"])
    floats = client.embeddings.create(
        model="emb", input=["hello", "world"], encoding_format="float"
    )
    assert default.model == "emb"
    assert [d.index for d in default.data] == [0, 1]
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    first, second = (d.embedding for d in default.data)
    assert len(first) == 8
    assert first != second
    assert math.isclose(math.fsum(x * x for x in first), 1.0, rel_tol=1e-5)
    assert default.usage.prompt_tokens == 4  # ceil(5 bytes / 4) per input
    assert default.usage.total_tokens == 4

    # And the wire format really is base64 little-endian float32.
    body = json.dumps({"model": "emb", "input": "hello", "encoding_format": "base64"}).encode()
    status, _, payload = _http(port, "/v1/embeddings", method="POST", body=body)
    assert status == 200
    encoded = json.loads(payload)["data"][0]["embedding"]
    assert isinstance(encoded, str)
    assert list(struct.unpack("<8f", base64.b64decode(encoded))) == first


def test_embeddings_dimensions_and_token_input(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="emb", input=[[1, 2, 3], [4]], dimensions=32)
    assert [len(d.embedding) for d in result.data] == [32, 32]
    assert result.usage.prompt_tokens == 4
    again = client.embeddings.create(model="emb", input=[[1, 2, 3]], dimensions=32)
    assert again.data[0].embedding == result.data[0].embedding


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("fault", "error", "status"),
    [
        ("429", openai.RateLimitError, 429),
        ("500", openai.InternalServerError, 500),
        ("503", openai.InternalServerError, 503),
    ],
)
def test_status_faults(
    client: openai.OpenAI, fault: str, error: type[openai.APIStatusError], status: int
) -> None:
    with pytest.raises(error) as excinfo:
        client.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"x-fake-fault": fault}
        )
    assert excinfo.value.status_code == status
    assert excinfo.value.response.headers["x-fake-llm-instance"] == "fake-a"
    body = excinfo.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if status == 429:
        assert excinfo.value.response.headers["retry-after"] == "1"


def test_reset_fault(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"x-fake-fault": "reset"}
        )


def test_stall_fault_times_out(client: openai.OpenAI) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.3).chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"x-fake-fault": "stall"}
        )
    assert time.monotonic() - started < 2


def test_reset_after_breaks_stream_mid_iteration(client: openai.OpenAI) -> None:
    received = []
    stream = client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, extra_headers={"x-fake-fault": "reset-after:2"}
    )
    with pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            received.append(chunk)
    assert 1 <= len(received) <= 2
    assert received[0].choices[0].delta.role == "assistant"


def test_reset_after_past_the_end_fires_before_done(client: openai.OpenAI) -> None:
    received = []
    stream = client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-fake-fault": "reset-after:99", "x-fake-response-tokens": "2"},
    )
    with pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 1 + 2 + 1  # everything but [DONE]


def test_mid_stream_fault_on_non_streaming_request_degrades_to_reset(
    client: openai.OpenAI,
) -> None:
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"x-fake-fault": "reset-after:1"}
        )


def test_connection_faults_under_uvloop() -> None:
    # The CLI runs on uvloop, whose transports expose sockets differently from asyncio's.
    uvloop = pytest.importorskip("uvloop")
    with _running(FakeLLMSettings(), uvloop.new_event_loop) as bound:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{bound}/v1", api_key="x", max_retries=0, timeout=5
        )
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"x-fake-fault": "reset"}
            )
        received = []
        with pytest.raises(openai.APIConnectionError):
            for chunk in client.chat.completions.create(
                model="m",
                messages=MESSAGES,
                stream=True,
                extra_headers={"x-fake-fault": "reset-after:3"},
            ):
                received.append(chunk)
        assert 1 <= len(received) <= 3
        with pytest.raises(openai.APITimeoutError):
            client.with_options(timeout=0.2).chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"x-fake-fault": "stall"}
            )


def test_configured_fault_stall_after_and_overrides() -> None:
    settings = FakeLLMSettings(fault="503", stall_seconds=0.2, name="fake-b", response_tokens=3)
    with _running(settings) as bound:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{bound}/v1", api_key="x", max_retries=0, timeout=5
        )
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=MESSAGES)
        # The header wins over the configured fault; "none" switches it off.
        ok = client.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"x-fake-fault": "none"}
        )
        assert ok.choices[0].message.content == _tokens(3)

        started = time.monotonic()
        chunks = list(
            client.chat.completions.create(
                model="m",
                messages=MESSAGES,
                stream=True,
                extra_headers={"x-fake-fault": "stall-after:2"},
            )
        )
        assert time.monotonic() - started >= 0.19
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == _tokens(3)

        settings.fault_rate = 0.0  # settings are read per request
        assert client.models.list().data[0].id == "fake-model"


# --------------------------------------------------------------------------- validation


def test_malformed_json_is_400(port: int) -> None:
    status, headers, payload = _http(
        port,
        "/v1/chat/completions",
        method="POST",
        body=b'{"model": ',
        headers={"content-type": "application/json"},
    )
    assert status == 400
    assert headers["x-fake-llm-instance"] == "fake-a"
    error = json.loads(payload)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert {"message", "code"} <= set(error)


def test_missing_model_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.post("/chat/completions", body={"messages": MESSAGES}, cast_to=dict[str, Any])
    error = excinfo.value.response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "model" in error["message"]


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-fake-fault", "explode"),
        ("x-fake-fault", "reset-after:x"),
        ("x-fake-ttft-ms", "-1"),
        ("x-fake-tokens-per-second", "fast"),
        ("x-fake-response-tokens", "1.5"),
    ],
)
def test_invalid_override_headers_are_400(client: openai.OpenAI, header: str, value: str) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model="m", messages=MESSAGES, extra_headers={header: value})
    assert header in excinfo.value.response.json()["error"]["message"]


def test_invalid_settings_rejected() -> None:
    with pytest.raises(ValueError, match="fault"):
        create_app(FakeLLMSettings(fault="boom"))
    with pytest.raises(ValueError, match="fault_rate"):
        create_app(FakeLLMSettings(fault_rate=2.0))


# --------------------------------------------------------------------------- helpers endpoints


def test_recorder_and_clear(client: openai.OpenAI, port: int) -> None:
    assert _http(port, "/_fake/requests", method="DELETE")[0] == 200
    client.chat.completions.create(
        model="recorded", messages=MESSAGES, extra_headers={"X-Trace": "abc"}
    )
    _http(port, "/v1/unknown", method="POST", body=b"not json")
    status, _, payload = _http(port, "/_fake/requests")
    assert status == 200
    first, second = json.loads(payload)
    assert first["path"] == "/v1/chat/completions"
    assert first["method"] == "POST"
    assert first["headers"]["x-trace"] == "abc"
    assert first["headers"]["authorization"] == "Bearer x"
    assert first["body"] == {"model": "recorded", "messages": MESSAGES}
    assert first["instance"] == "fake-a"
    assert (second["path"], second["body"]) == ("/v1/unknown", None)

    assert _http(port, "/_fake/requests", method="DELETE")[0] == 200
    assert json.loads(_http(port, "/_fake/requests")[2]) == []


def test_record_limit_keeps_most_recent() -> None:
    with _running(FakeLLMSettings(record_limit=2)) as bound:
        for i in range(3):
            _http(bound, f"/v1/models?i={i}")
        records = json.loads(_http(bound, "/_fake/requests")[2])
    assert len(records) == 2


def test_models_lists_requested_models(client: openai.OpenAI) -> None:
    client.chat.completions.create(model="listed-model", messages=MESSAGES)
    ids = [model.id for model in client.models.list().data]
    assert ids[0] == "fake-model"
    assert "listed-model" in ids


def test_healthz(port: int) -> None:
    status, headers, payload = _http(port, "/healthz")
    assert (status, payload) == (200, b"ok")
    assert headers["x-fake-llm-instance"] == "fake-a"


# --------------------------------------------------------------------------- CLI


def test_add_arguments_defaults_and_validation() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert args.listen == ("127.0.0.1", 8081)
    assert (args.ttft_ms, args.tokens_per_second, args.response_tokens) == (0.0, 0.0, 16)
    assert (args.fault, args.fault_rate, args.name) == (None, 1.0, "fake-llm")
    args = parser.parse_args(["--listen", "[::1]:0", "--fault", "reset-after:3"])
    assert args.listen == ("::1", 0)
    assert args.fault == "reset-after:3"
    for bad in (["--fault", "nope"], ["--fault-rate", "1.5"], ["--listen", "nohost"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_main_from_args_serves_and_exits_cleanly_on_sigterm() -> None:
    script = (
        "import argparse, sys\n"
        "from extproc.devtools.fake_llm import add_arguments, main_from_args\n"
        "parser = argparse.ArgumentParser()\n"
        "add_arguments(parser)\n"
        "sys.exit(main_from_args(parser.parse_args(sys.argv[1:])))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, "--listen", "127.0.0.1:0", "--name", "cli-fake"],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        bound = None
        deadline = time.monotonic() + 10
        while bound is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            if match := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
                bound = int(match.group(1))
        assert bound, "fake-llm CLI did not log its address"
        status, headers, _ = _http(bound, "/healthz")
        assert status == 200
        assert headers["x-fake-llm-instance"] == "cli-fake"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_main_from_args_rejects_bad_settings() -> None:
    args = argparse.Namespace(listen=("127.0.0.1", 0), fault="nope")
    assert main_from_args(args) == 2


# --------------------------------------------------------------------------- safety models


LLAMA_GUARD = "meta-llama/Llama-Guard-3-8B"
NEMOGUARD = "nvidia/llama-3.1-nemoguard-8b-content-safety"


def _post_json(port: int, path: str, payload: Any) -> tuple[int, Any]:
    status, _, body = _http(
        port,
        path,
        method="POST",
        body=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    return status, json.loads(body)


@pytest.mark.parametrize(
    ("content", "verdict"),
    [
        ("how do I bake bread?", "\n\nsafe"),
        ("[[unsafe]] how do I hurt someone?", "\n\nunsafe\nS1"),
        ("[[unsafe:S10,S11]] text", "\n\nunsafe\nS10,S11"),
        ("[[UNSAFE]] directives are case-sensitive", "\n\nsafe"),
    ],
)
def test_llama_guard_chat_verdicts(client: openai.OpenAI, content: str, verdict: str) -> None:
    completion = client.chat.completions.create(
        model=LLAMA_GUARD, messages=[{"role": "user", "content": content}], max_tokens=20
    )
    [choice] = completion.choices
    assert choice.message.content == verdict
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens >= 1


def test_llama_guard_judges_every_turn_and_any_case_of_the_name(client: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "[[unsafe:S9]] here is how"},
    ]
    completion = client.chat.completions.create(model="LLAMA-GUARD3:1b", messages=messages)
    assert completion.choices[0].message.content == "\n\nunsafe\nS9"


def test_llama_guard_chat_stream(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=LLAMA_GUARD,
            messages=[{"role": "user", "content": "[[unsafe]]"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "\n\nunsafe\nS1"
    )
    assert chunks[-1].usage is not None


def test_llama_guard_completion_judges_our_prompt(client: openai.OpenAI) -> None:
    from extproc.guard.llm import llama_guard_prompt

    unsafe = llama_guard_prompt(
        [{"role": "user", "content": "[[unsafe:S2]] steal a llama"}], "user"
    )
    safe = llama_guard_prompt([{"role": "user", "content": "adopt a llama"}], "user")
    completion = client.completions.create(model=LLAMA_GUARD, prompt=[unsafe, safe])
    assert [c.text for c in completion.choices] == ["\n\nunsafe\nS2", "\n\nsafe"]
    assert {c.finish_reason for c in completion.choices} == {"stop"}
    streamed = list(client.completions.create(model=LLAMA_GUARD, prompt=unsafe, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == "\n\nunsafe\nS2"


def test_nemoguard_rates_user_and_response_separately(client: openai.OpenAI) -> None:
    from extproc.guard.llm import nemoguard_prompt

    def rate(conversation: list[dict[str, str]], response: str | None) -> dict[str, str]:
        completion = client.chat.completions.create(
            model=NEMOGUARD,
            messages=[{"role": "user", "content": nemoguard_prompt(conversation, response)}],
        )
        content = completion.choices[0].message.content
        assert content is not None
        return json.loads(content)

    user = [{"role": "user", "content": "hello"}]
    bad_user = [{"role": "user", "content": "[[unsafe]] hello"}]
    assert rate(user, None) == {"User Safety": "safe"}
    assert rate(bad_user, None) == {"User Safety": "unsafe", "Safety Categories": "Violence"}
    assert rate(user, "fine") == {"User Safety": "safe", "Response Safety": "safe"}
    assert rate(user, "[[unsafe:Threat,Harassment]] no") == {
        "User Safety": "safe",
        "Response Safety": "unsafe",
        "Safety Categories": "Threat, Harassment",
    }


def test_nemoguard_without_its_prompt_rates_messages_by_role(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="Llama-3.1-Nemotron-Content-Safety",
        messages=[
            {"role": "user", "content": "[[unsafe:Malware]] write a worm"},
            {"role": "assistant", "content": "no"},
        ],
    )
    assert json.loads(completion.choices[0].message.content or "") == {
        "User Safety": "unsafe",
        "Response Safety": "safe",
        "Safety Categories": "Malware",
    }


def test_ordinary_models_ignore_directives(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "[[unsafe]] [[slow:5000]]"}]
    )
    assert completion.choices[0].message.content == _tokens(16)


def test_slow_directive_delays_safety_answers(client: openai.OpenAI, port: int) -> None:
    started = time.monotonic()
    client.chat.completions.create(
        model=LLAMA_GUARD, messages=[{"role": "user", "content": "[[slow:300]] hi"}]
    )
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    client.moderations.create(input="[[slow:200]] hi")
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    _post_json(port, "/_fake/guard-webhook", {"texts": ["[[slow:200]] hi"]})
    assert time.monotonic() - started >= 0.2


def test_moderations_through_the_sdk(client: openai.OpenAI) -> None:
    response = client.moderations.create(
        model="omni-moderation-latest", input=["a kind word", "[[unsafe]] a threat"]
    )
    assert response.id.startswith("modr-")
    assert response.model == "omni-moderation-latest"
    ok, bad = response.results
    assert not ok.flagged
    assert not any(ok.categories.model_dump().values())
    assert bad.flagged
    assert bad.categories.violence and not bad.categories.hate
    assert bad.category_scores.violence > 0.5 > bad.category_scores.hate
    assert bad.category_applied_input_types.violence == ["text"]


def test_moderations_input_shapes(port: int) -> None:
    status, body = _post_json(port, "/v1/moderations", {"input": "[[unsafe:hate,violence]]"})
    assert status == 200
    assert body["model"] == "omni-moderation-latest"
    [result] = body["results"]
    assert [k for k, v in result["categories"].items() if v] == ["hate", "violence"]
    multimodal = [
        {"type": "text", "text": "fine"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
        {"type": "text", "text": "[[unsafe]]"},
    ]
    status, body = _post_json(port, "/v1/moderations", {"input": multimodal})
    assert status == 200
    assert [r["flagged"] for r in body["results"]] == [True]
    for bad in ({}, {"input": []}, {"input": 3}, {"input": "x", "model": 1}):
        status, body = _post_json(port, "/v1/moderations", bad)
        assert status == 400
        assert body["error"]["type"] == "invalid_request_error"


def test_guard_webhook_contract(port: int) -> None:
    def call(*texts: str) -> dict[str, Any]:
        payload = {"stage": "request", "team": "t", "model": "m", "texts": list(texts)}
        status, body = _post_json(port, "/_fake/guard-webhook", payload)
        assert status == 200
        return body

    assert call("hello", "world") == {"action": "allow"}
    assert call("hello", "[[unsafe]] world") == {
        "action": "block",
        "reason": "fake policy",
        "categories": ["violence"],
    }
    assert call("[[unsafe:self-harm]]")["categories"] == ["self-harm"]
    assert call("say cat [[rewrite:cat=>dog]]", "a cat, two cats") == {
        "action": "rewrite",
        "reason": "fake rewrite",
        "texts": ["say dog ", "a dog, two dogs"],
    }
    assert call("[[rewrite:x=>y]] [[unsafe]]")["action"] == "block"
    status, body = _post_json(port, "/_fake/guard-webhook", {"texts": "not a list"})
    assert status == 400
    assert body["error"]["param"] == "texts"


def test_guard_calls_are_recorded(client: openai.OpenAI, port: int) -> None:
    assert _http(port, "/_fake/requests", method="DELETE")[0] == 200
    client.moderations.create(input="judge me", extra_headers={"Authorization": "Bearer k"})
    _post_json(port, "/_fake/guard-webhook", {"texts": ["judge me too"]})
    client.chat.completions.create(model=LLAMA_GUARD, messages=MESSAGES)
    records = json.loads(_http(port, "/_fake/requests")[2])
    assert [r["path"] for r in records] == [
        "/v1/moderations",
        "/_fake/guard-webhook",
        "/v1/chat/completions",
    ]
    assert records[0]["body"]["input"] == "judge me"
    assert records[0]["headers"]["authorization"] == "Bearer k"
    assert records[1]["body"] == {"texts": ["judge me too"]}


def test_guard_endpoints_honour_faults(client: openai.OpenAI, port: int) -> None:
    with pytest.raises(openai.InternalServerError):
        client.moderations.create(input="x", extra_headers={"x-fake-fault": "503"})
    status, _, _ = _http(
        port,
        "/_fake/guard-webhook",
        method="POST",
        body=b'{"texts": []}',
        headers={"x-fake-fault": "500"},
    )
    assert status == 500
