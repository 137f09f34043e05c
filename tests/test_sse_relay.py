"""StreamRelay: byte-exact relaying of an OpenAI stream, usage-only chunk cut out on demand."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import extproc.wire.openai.stream
from extproc.usage import Usage
from extproc.wire.openai.stream import StreamRelay, _not_usage_only

# -- a generated OpenAI chat stream, with the byte span of every event --------------------------

PIECES = [
    "Hello",
    " world",
    "é",
    "中文字",
    "日本語",
    "한국어",
    "🙂",
    "👍🏽",
    "👨‍👩‍👧",
    "🇫🇷",
    "𝄞",
    "\u2028",
    '"',
    '\\"',
    "\\",
    "\n",
    "\r\n",
    "\t",
    '"usage":{',
    '"usage": {"prompt_tokens": 1}',
    "data: x\n\n",
    '{"choices":[]}',
]
delta_text = st.lists(
    st.one_of(
        st.sampled_from(PIECES),
        st.text(st.characters(codec="utf-8"), max_size=4),
    ),
    max_size=6,
).map("".join)
line_ending = st.sampled_from([b"\n", b"\r\n", b"\r"])
NOISE = [b": keep-alive", b":", b"event: message", b"id: 42", b"retry: 3000"]


@dataclass
class Stream:
    raw: bytes
    spans: list[tuple[int, int]] = field(default_factory=list)  # every event, blank line too
    usage_span: tuple[int, int] | None = None  # the usage-only event
    texts: list[str] = field(default_factory=list)
    usage: Usage | None = None
    null_usage: bool = False

    @property
    def stripped(self) -> bytes:
        if self.usage_span is None:
            return self.raw
        start, end = self.usage_span
        return self.raw[:start] + self.raw[end:]

    def output_len(self, upto: int) -> int:
        """Length of the stripped output made of raw[:upto]."""
        if self.usage_span is None:
            return upto
        start, end = self.usage_span
        return upto - max(0, min(upto, end) - start)

    def must_have_relayed(self, fed: int) -> int:
        """Output due once raw[:fed] is in: all of it but an unfinished event."""
        return self.output_len(self.event_start(fed))

    def event_start(self, fed: int) -> int:
        """Where the unfinished event began, once raw[:fed] is in (`fed` if none)."""
        return next((start for start, end in self.spans if start < fed < end), fed)

    def ends_inside_event(self, offset: int) -> bool:
        return any(start < offset < end for start, end in self.spans)


def chunk_obj(delta: dict, finish: str | None = None) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o",
        "system_fingerprint": "fp_1",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


@st.composite
def chat_streams(draw: st.DrawFn) -> Stream:
    texts = draw(st.lists(delta_text, max_size=8))
    null_usage = draw(st.booleans())
    with_usage = draw(st.booleans())
    objects = [chunk_obj({"role": "assistant", "content": ""})]
    objects += [chunk_obj({"content": t}) for t in texts]
    objects.append(chunk_obj({}, "stop"))
    if null_usage:
        for obj in objects:
            obj["usage"] = None
    usage = None
    usage_index = -1
    if with_usage:
        prompt = draw(st.integers(0, 10**6))
        completion = draw(st.integers(0, 10**6))
        usage = Usage(prompt, completion, prompt + completion)
        report = {"prompt_tokens": prompt, "completion_tokens": completion}
        report["total_tokens"] = prompt + completion
        last = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000}
        if draw(st.booleans()):
            last |= {"choices": [], "usage": report}
        else:
            last |= {"usage": report, "choices": []}  # the other key order
        usage_index = len(objects)
        objects.append(last)

    stream = Stream(b"", texts=texts, usage=usage, null_usage=null_usage)
    raw = bytearray()

    def line(text: bytes) -> None:
        ending = draw(line_ending)
        if not text and ending == b"\n" and raw.endswith(b"\r"):
            ending = b"\r"  # CR then an LF-terminated blank line would be one CRLF
        raw.extend(text + ending)

    def noise() -> None:
        for _ in range(draw(st.integers(0, 2))):
            line(draw(st.sampled_from(NOISE)))

    def event(data_lines: list[bytes]) -> tuple[int, int]:
        start = len(raw)
        noise()
        for value in data_lines:
            space = value.startswith(b" ") or draw(st.booleans())
            line(b"data:" + (b" " if space else b"") + value)
        line(b"")
        stream.spans.append((start, len(raw)))
        return start, len(raw)

    for index, obj in enumerate(objects):
        if draw(st.booleans()):
            span = event(orjson.dumps(obj, option=orjson.OPT_INDENT_2).split(b"\n"))
        else:
            span = event([orjson.dumps(obj)])
        if index == usage_index:
            stream.usage_span = span
        if draw(st.booleans()):
            line(b"")  # a blank line between events belongs to none
    event([b"[DONE]"])
    stream.raw = bytes(raw)
    return stream


def split_at(data: bytes, offsets: Iterable[int]) -> list[bytes]:
    """Cut at the offsets; repeated offsets make empty chunks."""
    cuts = [0, *sorted(offsets), len(data)]
    return [data[a:b] for a, b in pairwise(cuts)]


@st.composite
def stream_and_chunks(draw: st.DrawFn) -> tuple[Stream, list[bytes]]:
    stream = draw(chat_streams())
    n = len(stream.raw)
    if draw(st.integers(0, 9)) == 0:
        chunks = [stream.raw[i : i + 1] for i in range(n)]  # byte by byte
    else:
        offsets = draw(st.lists(st.integers(0, n), max_size=min(n, 60)))
        chunks = split_at(stream.raw, offsets)
    if draw(st.booleans()):
        chunks.append(b"")  # Envoy often ends the body with an empty chunk
    return stream, chunks


def relay_all(relay: StreamRelay, chunks: list[bytes]) -> tuple[bytes, list[bytes | None]]:
    out = bytearray()
    answers = []
    for index, chunk in enumerate(chunks):
        answer = relay.feed(chunk, index == len(chunks) - 1)
        answers.append(answer)
        out += chunk if answer is None else answer
    return bytes(out), answers


def check_observations(relay: StreamRelay, stream: Stream) -> None:
    assert relay.usage == stream.usage
    assert relay.events == len(stream.spans)
    assert relay.expects_usage is stream.null_usage
    if stream.null_usage:
        assert relay.text == ""  # usage is expected: no text collected
    else:
        assert relay.text == "".join(stream.texts)
    assert relay.buffered == 0
    assert relay.held == 0
    assert relay.finished  # every generated stream ends with [DONE]


# -- properties ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(stream_and_chunks())
def test_without_strip_the_relay_only_observes(generated: tuple[Stream, list[bytes]]) -> None:
    stream, chunks = generated
    relay = StreamRelay(strip_usage_chunk=False)
    out, answers = relay_all(relay, chunks)
    assert answers == [None] * len(chunks)
    assert out == stream.raw
    assert relay.chunks == len(chunks)
    check_observations(relay, stream)


@settings(max_examples=500, deadline=None)
@given(stream_and_chunks())
def test_strip_removes_exactly_the_usage_only_event(
    generated: tuple[Stream, list[bytes]],
) -> None:
    stream, chunks = generated
    expected = stream.stripped
    relay = StreamRelay(strip_usage_chunk=True)
    out = bytearray()
    fed = 0
    for index, chunk in enumerate(chunks):
        held_before = relay.held
        last = index == len(chunks) - 1
        answer = relay.feed(chunk, last)
        start, fed = fed, fed + len(chunk)
        out += chunk if answer is None else answer
        # Never ahead of the backend, never a byte out of place ...
        assert expected.startswith(out)
        # ... and never behind it by more than the one unfinished event.
        assert len(out) >= stream.must_have_relayed(fed)
        assert relay.held <= fed - stream.event_start(fed)
        # Chunks that hold nothing, cut nothing and release nothing go through untouched.
        touches_usage = stream.usage_span is not None and (
            start < stream.usage_span[1] and stream.usage_span[0] < fed
        )
        if not held_before and not touches_usage and not stream.ends_inside_event(fed):
            assert answer is None
    assert bytes(out) == expected
    assert relay.chunks == len(chunks)
    check_observations(relay, stream)


@settings(max_examples=100, deadline=None)
@given(chat_streams(), st.integers(1, 40))
def test_text_cap(stream: Stream, cap: int) -> None:
    relay = StreamRelay(strip_usage_chunk=False, text_cap=cap)
    assert relay.feed(stream.raw, True) is None
    if not stream.null_usage:
        assert relay.text == "".join(stream.texts)[:cap]


# -- explicit cases ----------------------------------------------------------------------------

ROLE = chunk_obj({"role": "assistant", "content": ""}) | {"usage": None}
HELLO = chunk_obj({"content": "Hello"}) | {"usage": None}
STOP = chunk_obj({}, "stop") | {"usage": None}
REPORT = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
USAGE_ONLY = {"id": "chatcmpl-1", "choices": [], "usage": REPORT}


def sse(*events: bytes | dict, eol: bytes = b"\n") -> bytes:
    return b"".join(
        b"data: " + (e if isinstance(e, bytes) else orjson.dumps(e)) + eol + eol for e in events
    )


def test_ordinary_chunks_go_through_untouched() -> None:
    relay = StreamRelay(strip_usage_chunk=True)
    assert relay.feed(sse(ROLE), False) is None
    assert relay.feed(sse(HELLO, HELLO), False) is None
    assert relay.feed(sse(HELLO, eol=b"\r\n") + b": keep-alive\r\n\r\n", False) is None
    assert relay.feed(b"\n\n" + sse(HELLO, eol=b"\r") + b"\r\n", False) is None
    assert relay.feed(b"", False) is None
    assert relay.feed(sse(STOP), False) is None
    assert relay.feed(sse(b"[DONE]"), True) is None
    assert relay.events == 7
    assert relay.held == relay.buffered == 0


def test_usage_event_split_inside_the_usage_key() -> None:
    raw = sse(ROLE, HELLO, USAGE_ONLY, b"[DONE]")
    cut = raw.index(b'"usage":{') + 3  # between `"us` and `age"`
    for strip in (False, True):
        relay = StreamRelay(strip_usage_chunk=strip)
        first = relay.feed(raw[:cut], False)
        second = relay.feed(raw[cut:], True)
        if strip:
            head = sse(ROLE, HELLO)
            assert first == head  # the unfinished usage event is held back
            assert second == sse(b"[DONE]")
        else:
            assert first is None and second is None
        assert relay.usage == Usage(9, 2, 11)


def test_the_stream_is_finished_at_its_done_event_only() -> None:
    """[DONE] is the answer's end, whenever the stream's own end comes; not as text, not
    before its event is whole."""
    raw = sse(ROLE, chunk_obj({"content": "data: [DONE]"}), HELLO, b"[DONE]")
    done_at = raw.index(b"data: [DONE]\n\n")
    for strip in (False, True):
        relay = StreamRelay(strip_usage_chunk=strip)
        relay.feed(raw[: done_at + 8], False)  # the event begun, not whole
        assert not relay.finished
        relay.feed(raw[done_at + 8 :], False)
        assert relay.finished
    # After other fields, and without the space, as the SDK reads it.
    for event in (b"id: 7\ndata: [DONE]\n\n", b"data:[DONE]\r\n\r\n"):
        relay = StreamRelay(strip_usage_chunk=False)
        relay.feed(sse(ROLE) + event, False)
        assert relay.finished, event
    relay = StreamRelay(strip_usage_chunk=False)
    relay.feed(sse(ROLE) + b"data:  [DONE]\n\n", False)  # data " [DONE]": not the end
    assert not relay.finished


def test_usage_inside_a_content_string_is_not_usage() -> None:
    tricky = [
        chunk_obj({"content": '"usage":{"prompt_tokens":1}'}),
        chunk_obj({"content": 'a\\"usage": {'}),
        # A key that ends in `"usage` (escaped quote): the bytes `"usage":{` are there.
        {"choices": [], 'x"usage': {"prompt_tokens": 1}},
        # A usage object, but not at the top level.
        {"choices": [{"delta": {"content": "x"}, "usage": {"prompt_tokens": 1}}]},
        {"choices": [], "meta": {"usage": {"prompt_tokens": 1}}},
    ]
    raw = sse(*tricky, b"[DONE]")
    assert b'"usage":{' in raw
    for strip in (False, True):
        relay = StreamRelay(strip_usage_chunk=strip)
        out, _ = relay_all(relay, [raw[i : i + 7] for i in range(0, len(raw), 7)])
        assert out == raw
        assert relay.usage is None
        assert relay.text == '"usage":{"prompt_tokens":1}a\\"usage": {x'


def test_usage_key_and_object_on_different_data_lines() -> None:
    # Data lines join with LF, JSON whitespace: the object may follow on a later data line, even
    # after a line that merely reads `null` (a field of that name, ignored).
    raw = b'data: {"choices": [], "usage":\nnull\ndata: {"prompt_tokens": 9,\n' + (
        b'data: "completion_tokens": 2}}\n\n' + sse(b"[DONE]")
    )
    relay = StreamRelay(strip_usage_chunk=True)
    assert relay.feed(raw, True) == sse(b"[DONE]")
    assert relay.usage == Usage(9, 2, 11)


def test_usage_object_in_a_chunk_with_choices_is_read_not_cut() -> None:
    last = chunk_obj({"content": "!"}, "stop") | {"usage": REPORT}
    raw = sse(ROLE, last, b"[DONE]")
    relay = StreamRelay(strip_usage_chunk=True)
    assert relay.feed(raw, True) is None
    assert relay.usage == Usage(9, 2, 11)


def test_stream_cut_mid_event_flushes_what_was_held() -> None:
    partial = b'data: {"id":"chatcmpl-1","choices":[],"usage":{"prompt_tok'
    relay = StreamRelay(strip_usage_chunk=True)
    assert relay.feed(sse(ROLE), False) is None
    assert relay.feed(partial[:20], False) == b""
    assert relay.held == 20
    assert relay.feed(partial[20:], False) == b""
    assert relay.feed(b"", True) == partial  # never lose bytes
    assert relay.held == relay.buffered == 0
    assert relay.usage is None

    # The same when the last chunk is not empty and still ends mid-event.
    relay = StreamRelay(strip_usage_chunk=True)
    assert relay.feed(partial[:30], False) == b""
    assert relay.feed(partial[30:], True) == partial
    assert relay.held == relay.buffered == 0
    # A complete usage event without its blank line is not dispatched: relayed as it is.
    relay = StreamRelay(strip_usage_chunk=True)
    unterminated = b"data: " + orjson.dumps(USAGE_ONLY) + b"\n"
    assert relay.feed(unterminated, True) is None
    assert relay.usage is None


def test_held_bytes_are_only_a_possible_usage_event() -> None:
    relay = StreamRelay(strip_usage_chunk=True)
    event = sse(HELLO)
    head = event.index(b'"choices":[{') + len(b'"choices":[')
    # Up to `"choices":[` the event may still be the usage-only one: held.
    assert relay.feed(sse(ROLE) + event[:head], False) == sse(ROLE)
    assert relay.held == head
    # `{` shows a non-empty list of choices: released at once, nothing held any more.
    assert relay.feed(event[head : head + 1], False) == event[: head + 1]
    assert relay.held == 0
    assert relay.feed(event[head + 1 : head + 10], False) is None
    assert relay.feed(event[head + 10 :], False) is None
    # Data that cannot be a JSON object is not held either.
    assert relay.feed(b"data: [DO", False) is None
    assert relay.feed(b"NE]\n\n", True) is None


def test_cr_of_the_cut_event_in_one_chunk_and_its_lf_in_the_next() -> None:
    usage = b"data: " + orjson.dumps(USAGE_ONLY) + b"\r\r\n"
    after = b"data: [DONE]\r\n\r\n"
    raw = sse(ROLE, eol=b"\r") + usage + after
    cut = len(raw) - len(after) - 1  # between the CR and LF of the usage event's blank line
    relay = StreamRelay(strip_usage_chunk=True)
    assert relay.feed(raw[:cut], False) == sse(ROLE, eol=b"\r")
    assert relay.feed(b"", False) is None
    assert relay.feed(raw[cut:], True) == after  # its LF went with it
    assert relay.usage == Usage(9, 2, 11)

    # An LF after the CR ending an event that stays is relayed as it is.
    relay = StreamRelay(strip_usage_chunk=True)
    assert relay.feed(b"data: [DONE]\r\r", False) is None
    assert relay.feed(b"\n", True) is None


def test_crlf_split_inside_a_held_event() -> None:
    raw = sse(ROLE, USAGE_ONLY, b"[DONE]", eol=b"\r\n")
    start = len(sse(ROLE, eol=b"\r\n"))
    for cut in range(start + 1, len(raw)):
        relay = StreamRelay(strip_usage_chunk=True)
        out, _ = relay_all(relay, [raw[:cut], raw[cut:]])
        assert out == sse(ROLE, b"[DONE]", eol=b"\r\n"), cut
        assert relay.usage == Usage(9, 2, 11)


def test_multibyte_characters_split_anywhere() -> None:
    text = "中文🙂👨‍👩‍👧 é"
    raw = sse(chunk_obj({"content": text}), USAGE_ONLY, b"[DONE]")
    for cut in range(1, len(raw)):
        for strip in (False, True):
            relay = StreamRelay(strip_usage_chunk=strip)
            out, _ = relay_all(relay, [raw[:cut], raw[cut:]])
            assert out == (sse(chunk_obj({"content": text}), b"[DONE]") if strip else raw)
            assert relay.text == text
            assert relay.usage == Usage(9, 2, 11)


def test_only_usage_events_are_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    loads = orjson.loads

    def counting(data: bytes | bytearray | str) -> object:
        calls.append(bytes(data) if not isinstance(data, str) else data.encode())
        return loads(data)

    monkeypatch.setattr(extproc.wire.openai.stream.orjson, "loads", counting)
    raw = sse(ROLE, *[HELLO] * 50, STOP, USAGE_ONLY, b"[DONE]")
    for strip in (False, True):
        for size in (len(raw), 17, 1):
            calls.clear()
            relay = StreamRelay(strip_usage_chunk=strip)
            relay_all(relay, [raw[i : i + size] for i in range(0, len(raw), size)])
            assert relay.usage == Usage(9, 2, 11)
            assert relay.expects_usage
            assert calls == [orjson.dumps(USAGE_ONLY)]

    # Usage not expected (no "usage" key in the first chunk): the text is collected by decoding.
    calls.clear()
    plain = [chunk_obj({"content": f"{i} "}) for i in range(20)]
    relay = StreamRelay(strip_usage_chunk=False)
    assert relay.feed(sse(*plain, b"[DONE]"), True) is None
    assert not relay.expects_usage
    assert len(calls) == 20  # `[DONE]` is not JSON: not decoded
    assert relay.text == "".join(f"{i} " for i in range(20))

    # ... until the cap is reached.
    calls.clear()
    relay = StreamRelay(strip_usage_chunk=False, text_cap=6)
    assert relay.feed(sse(*plain), True) is None
    assert relay.text == "0 1 2 "
    assert len(calls) == 3


def test_memory_does_not_grow() -> None:
    event = sse(HELLO)
    for strip in (False, True):
        relay = StreamRelay(strip_usage_chunk=strip)
        assert not hasattr(relay, "__dict__")
        relay.feed(sse(ROLE), False)
        batch = event * 100
        for i in range(1000):  # 100k events, every batch split mid-event
            cut = 37 + i % 50
            relay.feed(batch[:cut], False)
            assert relay.buffered <= len(event)
            relay.feed(batch[cut:], False)
            assert relay.buffered == 0
        assert relay.events == 100_001
        assert relay.chunks == 2001
        assert relay.text == ""  # usage expected: nothing collected
        assert relay.feed(sse(USAGE_ONLY, b"[DONE]"), True) == (sse(b"[DONE]") if strip else None)
        assert relay.usage == Usage(9, 2, 11)
        assert relay.buffered == relay.held == 0

    # Collecting text is capped too.
    relay = StreamRelay(strip_usage_chunk=False, text_cap=1000)
    plain = sse(chunk_obj({"content": "abc"})) * 1000
    for _ in range(100):
        relay.feed(plain, False)
    assert len(relay.text) == 1000


def test_an_oversized_event_is_relayed_unexamined() -> None:
    big = orjson.dumps({"choices": [], "usage": REPORT, "pad": "x" * 5000})
    raw = sse(ROLE) + b"data: " + big + b"\n\n" + sse(b"[DONE]")
    relay = StreamRelay(strip_usage_chunk=True, max_event=1000)
    out, _ = relay_all(relay, [raw[i : i + 100] for i in range(0, len(raw), 100)])
    assert out == raw
    assert relay.buffered == 0
    assert relay.events == 3
    assert relay.usage is None  # too big to read: the caller counts instead


def test_completions_text_and_late_usage() -> None:
    relay = StreamRelay(strip_usage_chunk=True)
    events = [{"choices": [{"text": "Hel", "index": 0}]}, {"choices": [{"text": "lo"}]}]
    assert relay.feed(sse(*events), False) is None
    assert relay.feed(sse(USAGE_ONLY) + sse(b"[DONE]"), True) == sse(b"[DONE]")
    assert not relay.expects_usage  # the first event had no usage key ...
    assert relay.text == "Hello"  # ... so the text was collected
    assert relay.usage == Usage(9, 2, 11)  # and the report still counts


def test_comments_and_multiline_data_around_the_usage_event() -> None:
    usage = b": ping\nevent: message\n" + b"".join(
        b"data: " + line + b"\n"
        for line in orjson.dumps(USAGE_ONLY, option=orjson.OPT_INDENT_2).split(b"\n")
    )
    raw = sse(ROLE) + b":\n\n" + usage + b"\n\n" + sse(b"[DONE]")
    expected = sse(ROLE) + b":\n\n" + b"\n" + sse(b"[DONE]")
    for size in (1, 2, 5, len(raw)):
        relay = StreamRelay(strip_usage_chunk=True)
        out, _ = relay_all(relay, [raw[i : i + size] for i in range(0, len(raw), size)])
        assert out == expected
        assert relay.usage == Usage(9, 2, 11)
        assert relay.events == 3


@pytest.mark.parametrize(
    ("data", "ruled_out"),
    [
        (b"", False),
        (b"  ", False),
        (b"[DONE", True),
        (b"x", True),
        (b"{", False),
        (b'{"id":"x","choices"', False),
        (b'{"id":"x","choices":', False),
        (b'{"id":"x","choices":[', False),
        (b'{"id":"x","choices":[ ]', False),
        (b'{"id":"x","choices":[{', True),
        (b'{"id":"x","choices": \n [ 1', True),
        (b'{"id":"x","choices":null', True),
        (b'{"usage":null', True),
        (b'{"usage":{"choices":[{', False),  # nested: not the top level
        (b'{"a":{"choices":[1]},"choices":[]', False),
        (b'{"a":"\\"choices\\":[{","choices":[]', False),
        (b'{"a\\"choices":[{', False),
        (b'{"id":"choices","usage":', False),
        (b'{"choices":[],"usage":{"prompt_tokens":1}}', False),
    ],
)
def test_what_rules_out_a_usage_only_event(data: bytes, ruled_out: bool) -> None:
    assert _not_usage_only(data) is ruled_out
