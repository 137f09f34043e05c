"""SSE framing across arbitrary chunk boundaries, and usage/text extraction from a stream."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.sse import SSEParser
from extproc.usage import Usage
from extproc.wire.openai.stream import StreamRelay


def parse(chunks: Iterable[bytes]) -> list[bytes]:
    parser = SSEParser()
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    return out


def split_at(data: bytes, offsets: Iterable[int]) -> list[bytes]:
    cuts = [0, *sorted(set(offsets)), len(data)]
    return [data[a:b] for a, b in pairwise(cuts) if b > a]


# -- a generated OpenAI chat stream -----------------------------------------------------------

MULTIBYTE = [
    "é",
    "ß",
    "中",
    "文",
    "字",
    "日本語",
    "한",
    "🙂",
    "👍🏽",
    "👨‍👩‍👧",
    "🇫🇷",
    "\u2028",
    "𝄞",
]
# Pieces, not characters: some are grapheme clusters of several code points.
delta_text = st.lists(
    st.one_of(
        st.sampled_from(MULTIBYTE),
        st.sampled_from(list(' ab\n\r\t"\\:{}')),
        st.characters(codec="utf-8"),
    ),
    max_size=12,
).map("".join)
line_ending = st.sampled_from([b"\n", b"\r\n", b"\r"])


@dataclass
class GeneratedStream:
    raw: bytes
    events: list[bytes]  # the data of every event, as the parser must report them
    texts: list[str]
    usage: Usage | None


def chunk_obj(delta: dict, finish: str | None = None, with_null_usage: bool = False) -> dict:
    obj: dict = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if with_null_usage:
        obj["usage"] = None
    return obj


@st.composite
def chat_streams(draw: st.DrawFn) -> GeneratedStream:
    texts = draw(st.lists(delta_text, max_size=8))
    include_usage = draw(st.booleans())
    objects = [chunk_obj({"role": "assistant", "content": ""}, with_null_usage=include_usage)]
    objects += [chunk_obj({"content": t}, with_null_usage=include_usage) for t in texts]
    objects.append(chunk_obj({}, "stop", with_null_usage=include_usage))
    usage = None
    if include_usage:
        prompt = draw(st.integers(0, 100_000))
        completion = draw(st.integers(0, 100_000))
        cached = draw(st.integers(0, prompt))
        usage = Usage(prompt, completion, prompt + completion, cached)
        last = chunk_obj({})
        last["choices"] = []
        last["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        objects.append(last)

    raw = bytearray()
    events: list[bytes] = []

    def line(text: bytes) -> None:
        ending = draw(line_ending)
        if not text and ending == b"\n" and raw.endswith(b"\r"):
            ending = b"\r"  # CR then an LF-terminated blank line would be one CRLF
        raw.extend(text + ending)

    def noise() -> None:
        # Comments and fields other than data are skipped wherever they appear.
        for _ in range(draw(st.integers(0, 2))):
            line(
                draw(
                    st.sampled_from(
                        [b": keep-alive", b":", b"event: message", b"id: 42", b"retry: 3000"]
                    )
                )
            )

    def event(data_lines: list[bytes]) -> None:
        noise()
        for value in data_lines:
            # One space after the colon is dropped; a value that starts with a space needs it.
            space = value.startswith(b" ") or draw(st.booleans())
            line(b"data:" + (b" " if space else b"") + value)
            noise()
        line(b"")
        events.append(b"\n".join(data_lines))

    for obj in objects:
        if draw(st.booleans()):
            # Multi-line data: the event's data is the lines joined with LF, still valid JSON.
            event(orjson.dumps(obj, option=orjson.OPT_INDENT_2).split(b"\n"))
        else:
            event([orjson.dumps(obj)])
        if draw(st.booleans()):
            line(b"")  # extra blank lines dispatch nothing
    event([b"[DONE]"])
    return GeneratedStream(bytes(raw), events, texts, usage)


@st.composite
def stream_and_chunks(draw: st.DrawFn) -> tuple[GeneratedStream, list[bytes]]:
    stream = draw(chat_streams())
    n = len(stream.raw)
    offsets = draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=min(n, 40)))
    return stream, split_at(stream.raw, offsets)


@settings(max_examples=100, deadline=None)
@given(stream_and_chunks())
def test_parser_is_independent_of_chunk_boundaries(
    generated: tuple[GeneratedStream, list[bytes]],
) -> None:
    stream, chunks = generated
    assert b"".join(chunks) == stream.raw
    whole = parse([stream.raw])
    assert whole == stream.events
    assert parse(chunks) == whole


@settings(max_examples=30, deadline=None)
@given(stream_and_chunks())
def test_byte_by_byte(generated: tuple[GeneratedStream, list[bytes]]) -> None:
    stream, _ = generated
    parser = SSEParser()
    out: list[bytes] = []
    for i in range(len(stream.raw)):
        out.extend(parser.feed(stream.raw[i : i + 1]))
    assert out == stream.events
    assert parser.buffered == 0


@settings(max_examples=60, deadline=None)
@given(stream_and_chunks())
def test_relay_extracts_usage_and_text(generated: tuple[GeneratedStream, list[bytes]]) -> None:
    stream, chunks = generated
    relay = observe(*chunks)
    assert relay.usage == stream.usage
    if not relay.expects_usage:
        assert relay.text == "".join(stream.texts)
    assert relay.events == len(stream.events)


# -- explicit edge cases ----------------------------------------------------------------------


def test_cr_at_the_end_of_a_chunk_and_lf_at_the_start_of_the_next() -> None:
    assert parse([b"data: a\r", b"\n\r\n"]) == [b"a"]
    assert parse([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]) == [b"a\nb"]
    # The LF after a split CR must not count as a second (blank) line.
    assert parse([b"data: a\r", b"\ndata: b\r\n\r\n"]) == [b"a\nb"]


def test_cr_at_the_end_of_a_chunk_followed_by_something_else() -> None:
    assert parse([b"data: a\r", b"\r"]) == [b"a"]
    assert parse([b"data: a\r", b"data: b\r\r"]) == [b"a\nb"]
    assert parse([b"data: a\r", b"\r", b"\n"]) == [b"a"]


def test_empty_chunk_between_cr_and_lf() -> None:
    assert parse([b"data: a\r", b"", b"\ndata: b\r\n\r\n"]) == [b"a\nb"]


def test_empty_chunks_elsewhere_change_nothing() -> None:
    assert parse([b"", b"data: a\n", b"", b"\n", b""]) == [b"a"]


def test_line_endings() -> None:
    assert parse([b"data: a\rdata: b\r\r"]) == [b"a\nb"]
    assert parse([b"data: a\r\ndata: b\r\n\r\n"]) == [b"a\nb"]
    assert parse([b"data: a\ndata: b\n\n"]) == [b"a\nb"]
    assert parse([b"data: a\n\rdata: b\r\n\n"]) == [b"a", b"b"]


def test_event_without_trailing_blank_line_is_not_emitted() -> None:
    parser = SSEParser()
    assert list(parser.feed(b"data: a\n")) == []
    assert list(parser.feed(b"data: b")) == []
    assert parse([b"data: [DONE]"]) == []
    assert parse([b"data: x\n\ndata: [DONE]\n"]) == [b"x"]
    # ... until the blank line comes.
    assert list(parser.feed(b"\n\n")) == [b"a\nb"]


def test_data_with_and_without_the_space() -> None:
    assert parse([b"data:x\n\n"]) == [b"x"]
    assert parse([b"data: x\n\n"]) == [b"x"]
    assert parse([b"data:  x\n\n"]) == [b" x"]  # only one space is dropped
    assert parse([b"data:x \n\n"]) == [b"x "]
    assert parse([b"data:\tx\n\n"]) == [b"\tx"]
    assert parse([b'data:{"a": 1}\n\ndata: {"a": 2}\n\n']) == [b'{"a": 1}', b'{"a": 2}']


def test_empty_data_lines() -> None:
    assert parse([b"data:\ndata: x\ndata:\n\n"]) == [b"\nx\n"]
    assert parse([b"data: \ndata\ndata: y\n\n"]) == [b"\n\ny"]


def test_comments_and_other_fields_are_skipped() -> None:
    assert parse([b": ping\n\n"]) == []
    assert parse([b":\n\n"]) == []
    assert parse([b": c1\ndata: a\n: data: not data\ndata: b\n\n"]) == [b"a\nb"]
    assert parse([b"event: delta\nid: 7\nretry: 10\ndata: a\n\n"]) == [b"a"]
    # Field names are case-sensitive, and "data" must be the whole name.
    assert parse([b"Data: a\ndatum: b\ndata : c\n\n"]) == []


def test_blank_lines_without_data_dispatch_nothing() -> None:
    assert parse([b"\n\n\r\n\r\r"]) == []
    assert parse([b"event: x\n\n"]) == []


def test_several_events_in_one_chunk_and_one_event_over_many() -> None:
    assert parse([b"data: 1\n\ndata: 2\n\ndata: 3\n"]) == [b"1", b"2"]
    assert parse([b"da", b"ta", b": ", b"1", b"\n", b"\n"]) == [b"1"]


def test_multibyte_character_split_across_chunks() -> None:
    raw = "data: 中文🙂\n\n".encode()
    for i in range(1, len(raw)):
        assert parse([raw[:i], raw[i:]]) == ["中文🙂".encode()]


def test_buffered() -> None:
    parser = SSEParser()
    assert parser.buffered == 0
    assert list(parser.feed(b"data: abc")) == []
    assert parser.buffered == len(b"data: abc")  # the unfinished line
    assert list(parser.feed(b"\ndata: de")) == []
    assert parser.buffered == len(b"abc") + len(b"data: de")  # a finished data line + a partial
    assert list(parser.feed(b"\r")) == []
    assert parser.buffered == len(b"abc") + len(b"de")
    assert list(parser.feed(b"\n\n")) == [b"abc\nde"]
    assert parser.buffered == 0
    assert list(parser.feed(b": a comment with no end")) == []
    assert parser.buffered == len(b": a comment with no end")


# -- StreamRelay as an observer: odd events ----------------------------------------------------


def observe(*chunks: bytes, text_cap: int = 64 * 1024) -> StreamRelay:
    """Feed a stream through a relay that only observes (nothing to cut): it must never
    replace a chunk."""
    relay = StreamRelay(strip_usage_chunk=False, text_cap=text_cap)
    for chunk in chunks:
        assert relay.feed(chunk, False) is None
    assert relay.feed(b"", True) is None
    return relay


def sse(*events: bytes | dict) -> bytes:
    return b"".join(
        b"data: " + (e if isinstance(e, bytes) else orjson.dumps(e)) + b"\n\n" for e in events
    )


def test_relay_keeps_the_last_well_formed_usage() -> None:
    relay = observe(
        sse(
            {"choices": [{"delta": {"content": "a"}}], "usage": None},
            {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
            {"choices": [], "usage": {"prompt_tokens": "x"}},
            {"choices": [], "usage": {"completion_tokens": 9}},
            b"[DONE]",
        )
    )
    assert relay.usage == Usage(5, 2, 7, 0)
    assert relay.usage.source == "provider"
    # "usage": null in the first chunk announces a report, so no text is collected.
    assert relay.expects_usage
    assert relay.events == 5


def test_relay_completions_text_and_odd_events() -> None:
    relay = observe(
        sse(
            {"choices": [{"text": "Hello"}]},
            b"not json",
            b"[1, 2]",
            b'"just a string"',
            {"choices": ["x", None, {"delta": None, "text": ", "}]},
            {"choices": None},
            {"choices": [{"delta": {"content": None}}, {"delta": {"content": "world"}}]},
            {"choices": [{"delta": {"tool_calls": [{"function": {"arguments": "{}"}}]}}]},
        )
    )
    assert relay.text == "Hello, world"
    assert relay.usage is None
    assert relay.events == 8


def test_relay_text_cap() -> None:
    relay = observe(
        sse(*({"choices": [{"delta": {"content": "abc"}}]} for _ in range(4))), text_cap=5
    )
    assert relay.text == "abcab"


def test_relay_survives_non_iterable_choices() -> None:
    relay = observe(sse({"choices": 1}, {"choices": [{"delta": {"content": "ok"}}]}))
    assert relay.text == "ok"
