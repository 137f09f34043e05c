"""Response guards on a native Messages stream (extproc/wire/anthropic/guarded_stream.py): text
masked across deltas and released in order, other events byte for byte, a block ends the stream
with Anthropic's error event while the usage is still read, and the official SDK's accumulator
reads what comes out."""

from __future__ import annotations

import functools
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
import yaml

from extproc.config import parse_config
from extproc.guard.pipeline import compile_guard, stream_finder
from extproc.wire.anthropic.guarded_stream import AnthropicGuardedRelay
from extproc.wire.anthropic.stream import MessagesRelay

from .test_downstream import QUICKSTART

MODEL = "claude-sonnet-4-5"
EMAIL = "jane.doe@example.com"
SIGNATURE = "EqQBCkgIARABGAIiQL+sig/=="
PII = {"pii-out": {"type": "pii", "action": "mask", "entities": ["email"]}}
DENY = {"deny": {"type": "deny", "keywords": ["self-destruct"]}}


@functools.cache
def finder(guards: str) -> tuple[Any, int, dict[str, Any]]:
    """stream_finder over these guards (JSON), as the downstream stage builds it."""
    data = yaml.safe_load(QUICKSTART.read_text())
    data["guards"] = orjson.loads(guards)
    data["guardrails"] = {"response": list(data["guards"])}
    specs = parse_config(data).guards
    return stream_finder([compile_guard(n, s, None) for n, s in specs.items()])


def relay(guards: dict[str, Any] | None = None) -> AnthropicGuardedRelay:
    return AnthropicGuardedRelay(*finder(orjson.dumps(guards or PII).decode()))


def ev(kind: str, **fields: Any) -> bytes:
    return (
        b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"
    )


def text(index: int, piece: str) -> bytes:
    return ev("content_block_delta", index=index, delta={"type": "text_delta", "text": piece})


MESSAGE_START = ev(
    "message_start",
    message={
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 20, "output_tokens": 1, "cache_read_input_tokens": 30},
    },
)
THINKING = [
    ev("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
    ev(
        "content_block_delta",
        index=0,
        delta={"type": "thinking_delta", "thinking": f"Mail {EMAIL}?"},
    ),
    ev("content_block_delta", index=0, delta={"type": "signature_delta", "signature": SIGNATURE}),
    ev("content_block_stop", index=0),
]
TEXT_START = ev("content_block_start", index=1, content_block={"type": "text", "text": ""})
PING = b'event: ping\ndata: {"type": "ping"}\n\n'
MESSAGE_END = [
    ev(
        "message_delta",
        delta={"stop_reason": "end_turn", "stop_sequence": None},
        usage={"output_tokens": 12},
    ),
    ev("message_stop"),
]
# Thinking, then a text whose email straddles three deltas and ends the block.
STREAM = [
    MESSAGE_START,
    *THINKING,
    TEXT_START,
    PING,
    text(1, "Write to jane."),
    text(1, "doe@exam"),
    text(1, "ple.com"),
    ev("content_block_stop", index=1),
    *MESSAGE_END,
]


def run(r: AnthropicGuardedRelay, chunks: list[bytes]) -> bytes:
    out = b"".join(r.feed(c, False) for c in chunks)
    return out + r.feed(b"", True)


def events(raw: bytes) -> list[tuple[str, Any]]:
    out = []
    for block in raw.split(b"\n\n"):
        if block:
            name, data = block.split(b"\n")
            assert name.startswith(b"event: ") and data.startswith(b"data: ")
            out.append((name[7:].decode(), orjson.loads(data[6:])))
    return out


def texts(raw: bytes) -> list[str]:
    return [
        e["delta"]["text"]
        for kind, e in events(raw)
        if kind == "content_block_delta" and e["delta"]["type"] == "text_delta"
    ]


def test_an_email_split_across_deltas_is_masked() -> None:
    out = run(relay(), STREAM)
    assert "".join(texts(out)) == "Write to [EMAIL]"
    assert EMAIL.encode() not in out.replace(THINKING[1], b"")
    assert "jane" not in "".join(texts(out))


def test_held_text_goes_out_before_its_block_stops_and_in_order() -> None:
    out = run(relay(), STREAM)
    kinds = [(k, e.get("delta", {}).get("type")) for k, e in events(out)]
    stop = len(kinds) - 1 - kinds[::-1].index(("content_block_stop", None))  # the text block's
    assert kinds[stop - 1] == ("content_block_delta", "text_delta")
    assert [k for k, _ in kinds[stop:]] == ["content_block_stop", "message_delta", "message_stop"]
    # Every released piece is at the text block's index, and no piece is empty.
    deltas = [e for k, e in events(out) if k == "content_block_delta" and e["index"] == 1]
    assert deltas and all(e["delta"]["text"] for e in deltas)


def test_text_still_held_goes_out_before_message_delta_and_at_the_end() -> None:
    # No content_block_stop: the held text goes out before message_delta.
    out = run(relay(), [MESSAGE_START, TEXT_START, text(0, f"Hi {EMAIL}"), *MESSAGE_END])
    got = events(out)
    assert "".join(texts(out)) == "Hi [EMAIL]"
    assert [k for k, _ in got][-2:] == ["message_delta", "message_stop"]
    # A stream cut short: the held text goes out at its end, masked.
    out = run(relay(), [MESSAGE_START, TEXT_START, text(0, f"Hi {EMAIL}")])
    assert "".join(texts(out)) == "Hi [EMAIL]"


def test_other_events_pass_byte_for_byte_and_in_order() -> None:
    unknown = b'event: future_event\ndata: {"type":"future_event","x":1}\n\n'
    tool = [
        ev(
            "content_block_start",
            index=2,
            content_block={"type": "tool_use", "id": "toolu_1", "name": "mail", "input": {}},
        ),
        ev(
            "content_block_delta",
            index=2,
            delta={"type": "input_json_delta", "partial_json": '{"to": "x"}'},
        ),
        ev("content_block_stop", index=2),
    ]
    comment = b": keep-alive\n\n"
    chunks = [MESSAGE_START, *THINKING, comment, unknown, *tool, PING, *MESSAGE_END]
    assert run(relay(), chunks) == b"".join(chunks)
    out = run(relay(), STREAM)
    for passed in [MESSAGE_START, *THINKING, TEXT_START, PING, *MESSAGE_END]:
        assert passed in out
    # The thinking (not masked in this version) and its signature are untouched.
    assert out.startswith(MESSAGE_START + b"".join(THINKING) + TEXT_START + PING)


def test_a_deny_keyword_ends_the_stream_and_the_usage_is_still_read() -> None:
    r = relay(DENY)
    before = [MESSAGE_START, TEXT_START, text(0, "Start the "), text(0, "self-des")]
    after = [text(0, "truct now, then more text follows."), ev("content_block_stop", index=0)]
    out = run(r, [*before, *after, *MESSAGE_END])
    got = events(out)
    assert got[-1] == (
        "error",
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "The response was stopped by the gateway's content policy "
                "(guard 'deny').",
            },
        },
    )
    assert [k for k, _ in got].count("error") == 1
    assert b"self-des" not in out and b"destruct" not in out
    assert not any(k in ("content_block_stop", "message_delta", "message_stop") for k, _ in got)
    assert r.blocked is not None and r.blocked.guard == "deny"
    # The usage is read from what the backend sent after the block, as MessagesRelay reads it.
    plain = MessagesRelay()
    for chunk in [*before, *after, *MESSAGE_END]:
        plain.feed(chunk, False)
    assert r.usage is not None and r.usage == plain.usage
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (50, 12)
    assert r.usage.cached_tokens == 30
    assert r.error_code is None and r.expects_usage is False


def test_a_deny_keyword_held_until_the_block_stops_is_caught_there() -> None:
    r = relay(DENY)
    out = run(r, [MESSAGE_START, TEXT_START, text(0, "self-destruct"), *MESSAGE_END])
    assert events(out)[-1][0] == "error"
    assert b"self-destruct" not in out and r.blocked is not None


def test_a_cut_stream_is_charged_like_the_native_relay() -> None:
    chunks = [MESSAGE_START, TEXT_START, text(0, "Hello there, how are you")]
    r, plain = relay(), MessagesRelay()
    for chunk in chunks:
        r.feed(chunk, False)
        plain.feed(chunk, False)
    assert r.usage is None and r.partial_usage == plain.partial_usage
    assert r.partial_usage is not None and r.text == plain.text == "Hello there, how are you"


@pytest.mark.parametrize("guards", [PII, DENY], ids=["mask", "deny"])
@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_pieces_split_at_every_byte_give_the_same_output(guards: Any, eol: bytes) -> None:
    stream = [*STREAM[:-3], text(1, " Now self-destruct."), *STREAM[-3:]]
    raw = b"".join(stream).replace(b"\n", eol)
    whole = run(relay(guards), [raw])
    assert whole == run(relay(guards), [raw[i : i + 1] for i in range(len(raw))])
    for cut in range(1, len(raw)):
        assert run(relay(guards), [raw[:cut], raw[cut:]]) == whole
    if guards is DENY:
        assert whole.endswith(b"(guard 'deny').\"}}\n\n")
    else:
        assert b"[EMAIL]" in whole and b"jane." not in whole.replace(
            THINKING[1].replace(b"\n", eol), b""
        )


def test_text_in_a_content_block_start_is_masked() -> None:
    start = ev("content_block_start", index=0, content_block={"type": "text", "text": EMAIL})
    out = run(relay(), [MESSAGE_START, start, ev("content_block_stop", index=0), *MESSAGE_END])
    assert EMAIL.encode() not in out
    got = events(out)
    first = next(e for k, e in got if k == "content_block_start")
    assert first["content_block"]["text"] + "".join(texts(out)) == "[EMAIL]"


# -- the stream as the anthropic SDK reads it -----------------------------------------------------


def sdk(raw: bytes) -> anthropic.Anthropic:
    def backend(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=raw)

    return anthropic.Anthropic(
        api_key="key",
        base_url="http://gateway.test",
        http_client=httpx2.Client(transport=httpx2.MockTransport(backend)),
        max_retries=0,
    )


def test_the_sdks_accumulator_reads_the_masked_stream() -> None:
    r = relay()
    client = sdk(run(r, [bytes([b]) for b in b"".join(STREAM)]))
    with client.messages.stream(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "x"}]
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == "Write to [EMAIL]" and all(pieces)
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].signature == SIGNATURE  # type: ignore[union-attr]
    assert final.content[0].thinking == f"Mail {EMAIL}?"  # type: ignore[union-attr]
    assert final.content[1].text == "Write to [EMAIL]"  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (20, 12)
    assert final.usage.cache_read_input_tokens == 30


def test_the_sdk_raises_the_block() -> None:
    stream_in = [MESSAGE_START, TEXT_START, text(0, "Now self-destruct, please."), *MESSAGE_END]
    client = sdk(run(relay(DENY), stream_in))
    with pytest.raises(anthropic.APIStatusError) as caught:
        with client.messages.stream(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}]
        ) as stream:
            stream.get_final_message()
    assert caught.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "The response was stopped by the gateway's content policy (guard 'deny').",
        },
    }


# -- what the relay cannot read or judge is left out, never passed unjudged ----------------------

START0 = TEXT_START.replace(b'"index":1', b'"index":0')
ERROR_DENY = (
    "error",
    {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "The response was stopped by the gateway's content policy (guard 'deny').",
        },
    },
)


def unparseable(piece: str, extra: bytes) -> bytes:
    """A text delta whose JSON orjson refuses but the SDK's json.loads reads."""
    return (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"' + piece.encode() + b'"}' + extra + b"}\n\n"
    )


@pytest.mark.parametrize("extra", [b',"x":NaN', b',"x":"\\ud800"'], ids=["nan", "lone-surrogate"])
def test_an_unparseable_text_delta_is_left_out(extra: bytes) -> None:
    bad = unparseable(f"Mail {EMAIL}", extra)
    stop = ev("content_block_stop", index=0)
    out = run(relay(), [MESSAGE_START, START0, bad, stop, *MESSAGE_END])
    assert EMAIL.encode() not in out
    assert out == MESSAGE_START + START0 + stop + b"".join(MESSAGE_END)
    with sdk(out).messages.stream(
        model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}]
    ) as stream:
        pieces = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert EMAIL not in pieces and pieces == ""
    assert final.stop_reason == "end_turn"


def test_an_unparseable_deny_keyword_is_left_out() -> None:
    bad = unparseable("now self-destruct", b',"x":NaN')
    out = run(relay(DENY), [MESSAGE_START, START0, bad, *MESSAGE_END])
    assert b"self-destruct" not in out
    assert out == MESSAGE_START + START0 + b"".join(MESSAGE_END)


def test_an_unfinished_last_event_with_data_is_left_out() -> None:
    tail = text(0, f"Mail {EMAIL}")[:-1]  # the data line whole, the blank line missing
    out = run(relay(), [MESSAGE_START, START0, tail])
    assert EMAIL.encode() not in out and out == MESSAGE_START + START0
    # Cut inside the data line too.
    out = run(relay(), [MESSAGE_START, START0, tail[:-10]])
    assert b"jane" not in out and out == MESSAGE_START + START0


def test_an_unfinished_last_event_with_a_deny_keyword_is_left_out() -> None:
    r = relay(DENY)
    out = run(r, [MESSAGE_START, START0, text(0, "now self-destruct")[:-1]])
    assert b"self-destruct" not in out and out == MESSAGE_START + START0


@pytest.mark.parametrize("index", [[0], {"i": 0}, "0", 1.5], ids=["list", "dict", "str", "float"])
def test_an_event_with_an_odd_index_is_left_out_without_raising(index: Any) -> None:
    bad = ev("content_block_delta", index=index, delta={"type": "text_delta", "text": EMAIL})
    out = run(relay(), [MESSAGE_START, START0, bad, *MESSAGE_END])
    assert EMAIL.encode() not in out
    assert out == MESSAGE_START + START0 + b"".join(MESSAGE_END)


def test_an_event_too_deep_to_reencode_is_left_out_without_raising() -> None:
    # orjson.loads takes 1024 levels, orjson.dumps only 254.
    delta = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "x"},
    }
    bad = (
        b"event: content_block_delta\ndata: "
        + orjson.dumps(delta)[:-1]
        + b',"x":'
        + b"[" * 300
        + b"]" * 300
        + b"}\n\n"
    )
    out = run(relay(), [MESSAGE_START, START0, bad, text(0, "Hello"), *MESSAGE_END])
    assert b"[[[" not in out
    assert out.startswith(MESSAGE_START + START0) and out.endswith(b"".join(MESSAGE_END))
    assert "".join(texts(out)) in ("Hello", "xHello")  # (the masker may have held the "x")


# -- tool inputs are masked like text; thinking is judged but not masked --------------------------


def tool_use(index: int, *pieces: str) -> list[bytes]:
    block = {"type": "tool_use", "id": "toolu_1", "name": "mail", "input": {}}
    return [
        ev("content_block_start", index=index, content_block=block),
        *(
            ev(
                "content_block_delta",
                index=index,
                delta={"type": "input_json_delta", "partial_json": p},
            )
            for p in pieces
        ),
        ev("content_block_stop", index=index),
    ]


def test_a_deny_keyword_in_a_tool_input_ends_the_stream_as_the_chat_relay_does() -> None:
    from extproc.wire.openai import CHAT
    from extproc.wire.openai.guarded_stream import GuardedStreamRelay

    r = relay(DENY)
    out = run(r, [MESSAGE_START, *tool_use(0, '{"cmd": "self-', 'destruct"}'), *MESSAGE_END])
    got = events(out)
    assert got[-1] == ERROR_DENY and [k for k, _ in got].count("error") == 1
    assert b"self-" not in out and b"destruct" not in out
    assert r.blocked is not None and r.blocked.guard == "deny"
    assert not any(k in ("content_block_stop", "message_delta", "message_stop") for k, _ in got)
    # The chat relay blocks the same call.
    call = {"name": "bash", "arguments": '{"cmd": "self-destruct"}'}
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "finish_reason": None,
                "delta": {
                    "tool_calls": [{"index": 0, "id": "t", "type": "function", "function": call}]
                },
            }
        ],
    }
    g = GuardedStreamRelay(CHAT, False, *finder(orjson.dumps(DENY).decode()))
    g.feed(b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n", True)
    assert g.blocked is not None


def test_a_pii_value_in_a_tool_input_is_masked_and_the_input_still_parses() -> None:
    tool = tool_use(0, '{"to": "jane.', "doe@exam", 'ple.com", "n": 1}')
    out = run(relay(), [MESSAGE_START, *tool, *MESSAGE_END])
    assert b"jane" not in out and b"example" not in out
    partial = "".join(
        e["delta"]["partial_json"]
        for k, e in events(out)
        if k == "content_block_delta" and e["delta"]["type"] == "input_json_delta"
    )
    assert orjson.loads(partial) == {"to": "[EMAIL]", "n": 1}
    with sdk(out).messages.stream(
        model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}]
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["tool_use"]
    assert final.content[0].input == {"to": "[EMAIL]", "n": 1}  # type: ignore[union-attr]


def test_thinking_is_judged_for_blocks_but_not_masked() -> None:
    both = {**PII, **DENY}
    # A PII value in thinking passes unchanged, with its signature.
    out = run(relay(both), STREAM)
    assert out.startswith(MESSAGE_START + b"".join(THINKING))
    with sdk(out).messages.stream(
        model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}]
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].thinking == f"Mail {EMAIL}?"  # type: ignore[union-attr]
    assert final.content[0].signature == SIGNATURE  # type: ignore[union-attr]
    assert final.content[1].text == "Write to [EMAIL]"  # type: ignore[union-attr]
    # A deny keyword in thinking (split across deltas) ends the stream.
    thinking = [
        ev("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
        ev(
            "content_block_delta",
            index=0,
            delta={"type": "thinking_delta", "thinking": "I will self-"},
        ),
        ev(
            "content_block_delta",
            index=0,
            delta={"type": "thinking_delta", "thinking": "destruct."},
        ),
        ev(
            "content_block_delta",
            index=0,
            delta={"type": "signature_delta", "signature": SIGNATURE},
        ),
        ev("content_block_stop", index=0),
    ]
    r = relay(both)
    out = run(r, [MESSAGE_START, *thinking, TEXT_START, text(1, "Done."), *MESSAGE_END])
    got = events(out)
    assert got[-1] == ERROR_DENY and r.blocked is not None and r.blocked.guard == "deny"
    assert [k for k, _ in got].count("error") == 1
    # Nothing after the block reaches the client (the thinking itself, not held back so that it
    # passes unchanged, has gone out before it).
    assert b"Done." not in out and TEXT_START not in out and b"message_stop" not in out
