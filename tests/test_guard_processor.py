"""Guards inside the processor and the guarded stream relay, with hand-built messages."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import orjson
import pytest
import yaml

from extproc.config import ConfigError, build_runtime, parse_config
from extproc.downstream import DownstreamStream
from extproc.guard.detectors import find_all
from extproc.guard.llm import GuardClient
from extproc.guard.pipeline import CompiledGuard, compile_guard, stream_finder
from extproc.quota.policy import window_bounds
from extproc.server import build_services
from extproc.services import Services
from extproc.wire import Endpoint
from extproc.wire.openai import CHAT, COMPLETIONS
from extproc.wire.openai.guarded_stream import GuardedStreamRelay

from .test_downstream import (
    KEY_B,
    QUICKSTART,
    request_body,
    request_headers,
    response_body,
    response_headers,
    set_headers,
)

EMAIL = "jane.doe@example.com"


def guarded_config(**guards: Any) -> dict[str, Any]:
    data = yaml.safe_load(QUICKSTART.read_text())
    data["guards"] = guards or {"pii-out": {"type": "pii", "entities": ["email"]}}
    data["guardrails"] = {"response": list(data["guards"])}
    return data


def services_for(data: dict[str, Any]) -> Services:
    return build_services(build_runtime(parse_config(data)))


def relay(endpoint: Endpoint = CHAT, **guards: Any) -> GuardedStreamRelay:
    specs = parse_config(guarded_config(**guards)).guards
    compiled = [compile_guard(name, spec, None) for name, spec in specs.items()]
    find, holdback, owners = stream_finder(compiled)
    return GuardedStreamRelay(endpoint, False, find, holdback, owners)


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def events(raw: bytes) -> list[Any]:
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            data = block[6:]
            out.append(data if data == b"[DONE]" else orjson.loads(data))
    return out


def test_tool_call_arguments_refusals_and_logprobs_are_guarded_in_streams() -> None:
    r = relay()
    chunks = [
        sse(
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [{"index": 0, "function": {"arguments": '{"to": "jane.'}}]
                        },
                        "logprobs": {"content": [{"token": "jane", "logprob": -0.1}]},
                    }
                ]
            }
        ),
        sse(
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [
                                {"index": 0, "function": {"arguments": 'doe@example.com"}'}}
                            ]
                        },
                    }
                ]
            }
        ),
        sse({"choices": [{"index": 0, "delta": {"refusal": f"no, {EMAIL}"}}]}),
        sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        b"data: [DONE]\n\n",
    ]
    out = b"".join(r.feed(c, False) for c in chunks[:-1])
    assert not r.finished
    out += r.feed(chunks[-1], False)  # [DONE], the stream's own end still to come
    assert r.finished
    out += r.feed(b"", True)
    assert EMAIL.encode() not in out and b"jane" not in out
    got = events(out)
    args = "".join(
        call["function"]["arguments"]
        for e in got
        if isinstance(e, dict)
        for ch in e["choices"]
        for call in ch.get("delta", {}).get("tool_calls") or []
    )
    refusal = "".join(
        ch["delta"].get("refusal") or "" for e in got if isinstance(e, dict) for ch in e["choices"]
    )
    assert args == '{"to": "[EMAIL]"}'
    assert refusal == "no, [EMAIL]"
    assert all(
        ch.get("logprobs") is None for e in got if isinstance(e, dict) for ch in e["choices"]
    )
    assert got[-1] == b"[DONE]"


def test_json_the_relay_cannot_read_is_judged_as_a_client_reads_it_or_left_out() -> None:
    """A chunk orjson refuses but a client's parser reads (NaN, a lone surrogate escape) is
    read the stdlib's way and masked; one nobody can read that may hold text is left out:
    never passed unjudged."""
    import json

    r = relay()
    nan = (
        b'data: {"choices":[{"index":0,"delta":{"content":"write to '
        + EMAIL.encode()
        + b' now"},"logprobs":null,"x":NaN}]}\n\n'
    )
    surrogate = b'data: {"choices":[{"index":0,"delta":{"content":"\\ud800 ok"}}]}\n\n'
    broken = b'data: {"choices":[{"delta":{"content":"' + EMAIL.encode() + b'"\n\n'
    out = b"".join(r.feed(c, False) for c in (nan, surrogate, broken))
    out += r.feed(b"data: [DONE]\n\n", True)
    assert EMAIL.encode() not in out
    texts = [
        ch["delta"].get("content") or ""
        for block in out.split(b"\n\n")
        if block.startswith(b"data: {")
        for ch in json.loads(block[6:])["choices"]
    ]
    assert "".join(texts) == "write to [EMAIL] now\ud800 ok"


def test_a_blocked_stream_still_reads_the_backends_usage() -> None:
    r = relay(deny={"type": "deny", "keywords": ["self-destruct"]})
    first = r.feed(
        sse({"choices": [{"index": 0, "delta": {"content": "self-destruct now"}}]}), False
    )
    # The deny keyword is released (and so found) once enough text follows, or at the end.
    rest = b"".join(
        r.feed(sse({"choices": [{"index": 0, "delta": {"content": "x" * 100}}]}), False)
        for _ in range(5)
    )
    usage = {"prompt_tokens": 5, "completion_tokens": 3000, "total_tokens": 3005}
    tail = r.feed(sse({"choices": [], "usage": usage}) + b"data: [DONE]\n\n", True)
    out = first + rest + tail
    assert r.blocked is not None and r.blocked.guard == "deny"
    assert r.finished  # (its [DONE] read, not relayed)
    assert b"self-destruct" not in out
    got = events(out)
    assert got[-1]["error"]["code"] == "guard_blocked:deny"
    assert r.usage is not None and r.usage.completion_tokens == 3000


def test_completions_stream_text_is_masked() -> None:
    r = relay(COMPLETIONS)
    out = r.feed(sse({"choices": [{"index": 0, "text": f"mail {EMAIL}"}]}), False)
    out += r.feed(b"data: [DONE]\n\n", True)
    text = "".join(
        ch.get("text") or "" for e in events(out) if isinstance(e, dict) for ch in e["choices"]
    )
    assert text == "mail [EMAIL]"


@pytest.fixture(scope="module")
def guarded() -> Services:
    return services_for(guarded_config())


def run(stream: DownstreamStream, *reqs: Any) -> list[Any]:
    async def go() -> list[Any]:
        return [await stream.handle(r) for r in reqs]

    return asyncio.run(go())


def test_buffered_tool_call_arguments_are_masked_and_logprobs_dropped(guarded: Services) -> None:
    stream = DownstreamStream(guarded)
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    answer = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "send", "arguments": f'{{"to": "{EMAIL}"}}'},
                        }
                    ],
                },
                "logprobs": {"content": [{"token": "jane"}]},
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
    _, _, _, resp = run(
        stream,
        request_headers(key=KEY_B),
        request_body(chat),
        response_headers(),
        response_body(answer),
    )
    body = resp.response_body.response.body_mutation.body
    got = orjson.loads(body)
    assert (
        got["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        == '{"to": "[EMAIL]"}'
    )
    assert got["choices"][0]["logprobs"] is None
    assert set_headers(resp.response_body.response.header_mutation)["content-length"] == str(
        len(body)
    )


def test_accept_encoding_is_removed_so_answers_can_be_read(guarded: Services) -> None:
    stream = DownstreamStream(guarded)
    (resp,) = run(stream, request_headers(key=KEY_B, extra={"accept-encoding": "gzip, deflate"}))
    assert "accept-encoding" in resp.request_headers.response.header_mutation.remove_headers


def test_empty_entities_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(guarded_config(p={"type": "pii", "entities": []}))
    assert "guards.p" in str(err.value) and "empty" in str(err.value)


class SlowWebhook(GuardClient):
    async def webhook(self, ep: Any, payload: dict) -> Any:
        await asyncio.sleep(30)
        raise AssertionError("not reached")


def test_a_client_gone_during_an_external_guard_leaves_no_reservation(guarded: Services) -> None:
    data = guarded_config(hook={"type": "webhook", "url": "http://127.0.0.1:9/hook"})
    data["guardrails"] = {"request": ["hook"]}
    base = services_for(data)
    services = dataclasses.replace(base, guard_client=SlowWebhook())
    chat = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
    }

    async def go() -> list[Any]:
        stream = DownstreamStream(services)
        await stream.handle(request_headers(key=KEY_B))
        task = asyncio.create_task(stream.handle(request_body(chat)))
        await asyncio.sleep(0.2)  # the reservation is made, the webhook still thinking
        task.cancel()  # the client went away: gRPC cancels the handler
        with pytest.raises(asyncio.CancelledError):
            await task
        stream.close()
        await asyncio.sleep(0.05)
        await services.quota.drain()
        specs = services.budgets.teams["team-b"]
        counters = [f"{s.name}:{window_bounds(s.window, time.time())[0]}" for s in specs]
        return list(await services.quota.store.usage("team-b", counters))

    states = asyncio.run(go())
    assert states and all(s.reserved == 0 for s in states)


def test_find_all_is_what_the_stream_finder_uses_for_pii() -> None:
    # The stream finder and the buffered path must find the same PII.
    guard: CompiledGuard = compile_guard(
        "p", parse_config(guarded_config()).guards["pii-out"], None
    )
    find, _, _ = stream_finder([guard])
    text = f"a {EMAIL} b"
    assert [(s.start, s.end) for s in find(text)] == [
        (s.start, s.end) for s in find_all(text, ["email"])
    ]


def test_a_long_prompt_is_masked_off_the_event_loop() -> None:
    data = guarded_config(pii={"type": "pii"})
    data["guardrails"] = {"request": ["pii"]}
    services = services_for(data)
    filler = "lorem ipsum dolor sit amet " * 1000  # 27,000 characters: a worker thread's job
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": filler + EMAIL}]}
    stream = DownstreamStream(services)
    _, resp = run(stream, request_headers(key=KEY_B), request_body(chat))
    sent = orjson.loads(resp.request_body.response.body_mutation.body)
    assert sent["messages"][0]["content"] == filler + "[EMAIL]"


class QuotingWebhook(GuardClient):
    """A webhook that quotes what it judged in its reason (and a category)."""

    async def webhook(self, ep: Any, payload: dict) -> Any:
        return "block", f"found {EMAIL} in the text", (f"quoted:{EMAIL}",), None


def test_a_webhooks_reason_is_masked_before_logs_spans_and_the_audit_trail() -> None:
    data = guarded_config(hook={"type": "webhook", "url": "http://127.0.0.1:9/hook"})
    data["guardrails"] = {"request": ["hook"]}
    services = dataclasses.replace(services_for(data), guard_client=QuotingWebhook())
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    stream = DownstreamStream(services)
    _, resp = run(stream, request_headers(key=KEY_B), request_body(chat))
    assert resp.immediate_response.status.code == 403
    assert stream.report is not None
    (entry,) = stream.report.guards
    assert entry["reason"] == "found [EMAIL] in the text"
    assert entry["categories"] == ["quoted:[EMAIL]"]
    assert EMAIL not in repr(stream.report.guards)


def test_a_guard_that_could_not_be_asked_is_told_apart_by_its_flag_not_its_words() -> None:
    from extproc.guard.pipeline import blocked
    from extproc.guard.types import Verdict

    down = blocked(
        Verdict("block", "g", reason="unavailable: timeout", unavailable=True), 403, "request"
    )
    assert (down.status, down.code, down.type) == (503, "guard_unavailable:g", "server_error")
    # A webhook's own reason may read the same: it is still the block it said it was.
    said = blocked(Verdict("block", "g", reason="unavailable: content"), 403, "request")
    assert (said.status, said.code) == (403, "guard_blocked:g")
