"""Response guards on a native Messages stream: mask text across deltas, or end the stream
cleanly, on Anthropic's own events (so thinking signatures and prompt caching survive).

The OpenAI counterpart is wire/openai/guarded_stream.py (GuardedStreamRelay); this relay keeps
its rules on Anthropic's events:
- a `text_delta`'s text goes through a StreamMasker per content block index (held back just
  enough to see a match split across deltas) and the event is re-emitted with the released
  text; an event that releases nothing is dropped (the SDK's accumulator only appends text,
  and a client reading `text_stream` sees no empty pieces);
- what a block's masker holds goes out as one more `text_delta` before the block's
  `content_block_stop` (or the next `content_block_start`), and whatever any masker holds
  before `message_delta`, `message_stop`, an `error` event and the end of the stream;
- a tool input's `input_json_delta` is masked the same way (its JSON text: a mask has no quote
  to break its strings); a `thinking_delta` is judged but passes as it is (masking it would
  void its signature): only a block stops it;
- every other event (message_start, content_block_start, signature_delta, citations_delta,
  message_delta, ping, error, comments, unknown events) passes byte for byte, in order;
- what the relay cannot read or judge (JSON it cannot parse that may carry text, an event it
  fails on, an unfinished event at the end of the stream) is left out, never passed unjudged;
- a guard that blocks (a deny keyword, a PII guard whose action is block) ends the stream with
  Anthropic's error event (the SDK raises it as an APIStatusError); nothing after it reaches
  the client, and the masked or blocked text itself is never released.

The usage is read from the backend's bytes, untouched, by a MessagesRelay inside: exactly what a
non-guarded native stream reads, including after a block (the backend goes on generating, and
is charged for it).

Limits: thinking is neither masked nor held back (its signature covers it as sent): a PII value
in it passes, and a deny keyword in it ends the stream, but after the thinking that said it has
reached the client (the masked or blocked text that is never released is the answer's text
and tool inputs); a `text` a `content_block_start` carries (Anthropic sends it empty) is masked
like a delta. Citations'
quoted text (`citations_delta`) is not judged. A re-emitted event is
written `event: <its type>` + one data line: any `id:`/comment lines it had are dropped
(Anthropic sends none).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from ...guard.stream_mask import StreamMasker, stream_block
from ...guard.types import Span, Verdict
from .stream import MessagesRelay

if TYPE_CHECKING:
    from ...guard.pipeline import CompiledGuard
    from ...usage import Usage

log = logging.getLogger("extproc.wire.anthropic")

_EOL = re.compile(rb"\r\n|\r|\n")
# The deltas whose text is masked, and the key of their text.
_MASKED = {"text_delta": "text", "input_json_delta": "partial_json"}
# Event data that may carry text a guard must judge.
_MAY_HOLD_TEXT = re.compile(rb"text|partial_json|thinking")
# Events before which every masker's held text goes out (the message or the stream ends).
_ENDING = ("message_delta", "message_stop", "error")


class AnthropicGuardedRelay:
    """sse.RelayedStream for a native Messages stream with response guards: `feed` answers the
    bytes to send in place of each chunk."""

    __slots__ = (
        "_buf",
        "_data",
        "_find",
        "_has_data",
        "_holdback",
        "_kinds",
        "_maskers",
        "_owners",
        "_raw",
        "_reader",
        "blocked",
    )

    # Settled by its usage report, which comes with the answer's end (sse.RelayedStream).
    finished = False

    def __init__(
        self,
        find: Callable[[str], list[Span]],
        holdback: int,
        owners: dict[str, CompiledGuard],
    ) -> None:
        self._find = find
        self._holdback = holdback
        self._owners = owners
        self._reader = MessagesRelay()  # the usage, read from the backend's own bytes
        self._buf = bytearray()  # bytes of lines not yet complete
        self._raw = bytearray()  # the current event's lines, as they came
        self._data: list[bytes] = []
        self._has_data = False
        # content block index -> its text's masker (("thinking", index): a thinking detector)
        self._maskers: dict[Any, StreamMasker] = {}
        self._kinds: dict[int, str] = {}  # content block index -> the kind of delta it masks
        self.blocked: Verdict | None = None

    # -- what the stages read (MessagesRelay's reading) -----------------------------------------

    @property
    def usage(self) -> Usage | None:
        return self._reader.usage

    @property
    def partial_usage(self) -> Usage | None:
        return self._reader.partial_usage

    @property
    def error_code(self) -> str | None:
        return self._reader.error_code

    @property
    def events(self) -> int:
        return self._reader.events

    @property
    def expects_usage(self) -> bool:
        return self._reader.expects_usage

    @property
    def text(self) -> str:
        """What the backend generated (before masking), for our own count of a cut stream."""
        return self._reader.text

    # -- the relay ------------------------------------------------------------------------------

    def feed(self, chunk: bytes, end_of_stream: bool) -> bytes:
        self._reader.feed(chunk, end_of_stream)
        if self.blocked is not None:
            return b""  # nothing more reaches the client; the usage was read above
        out = bytearray()
        buf = self._buf
        buf += chunk
        start = 0
        for match in _EOL.finditer(buf):
            if match.group() == b"\r" and match.end() == len(buf) and not end_of_stream:
                break  # a CR at the very end: its LF may come with the next chunk
            out += self._line(bytes(buf[start : match.start()]), match.group())
            start = match.end()
            if self.blocked is not None:
                break
        if self.blocked is not None:
            buf.clear()  # nothing after the error event
            return bytes(out)
        del buf[:start]
        if end_of_stream:
            out += self._end()
        return bytes(out)

    def _line(self, line: bytes, eol: bytes) -> bytes:
        """One whole line: b"" until it ends an event, then what goes out for the event."""
        if line:
            self._raw += line + eol
            name, _, value = line.partition(b":")
            if name == b"data":
                self._data.append(value[1:] if value[:1] == b" " else value)
                self._has_data = True
            return b""
        raw = bytes(self._raw) + eol
        data = b"\n".join(self._data) if self._has_data else None
        self._raw.clear()
        self._data.clear()
        self._has_data = False
        if data is None:
            return raw  # a blank line, comments, fields without data: as they came
        return self._event(raw, data)

    def _event(self, raw: bytes, data: bytes) -> bytes:
        try:
            return self._judged(raw, data)
        except Exception:
            # (It should not raise.) An event the relay could not judge may hold text: it is
            # left out, never passed unjudged, and the gRPC stream is not torn down.
            log.exception("an Anthropic event could not be judged; left out")
            return b""

    def _judged(self, raw: bytes, data: bytes) -> bytes:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            # JSON the relay cannot read may still be read by a client (NaN, a lone surrogate
            # escape): one that may carry text is left out rather than passed unjudged.
            return b"" if _MAY_HOLD_TEXT.search(data) else raw
        if not isinstance(event, dict):
            return raw
        kind = event.get("type")
        index = event.get("index", 0)
        if not isinstance(index, int):
            return b""  # not an event of this API a client could place
        if kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and delta.get("type") in _MASKED:
                return self._delta(event, delta, index)
            if isinstance(delta, dict) and delta.get("type") == "thinking_delta":
                return self._thinking(raw, delta, index)
            return raw
        if kind == "content_block_start":
            flushed = self._flush(lambda key: True)
            if self.blocked is not None:
                return flushed
            block = event.get("content_block")
            if isinstance(block, dict) and block.get("type") == "text" and block.get("text"):
                text = block["text"]
                if isinstance(text, str):
                    block["text"] = self._masker(index).feed(text)
                    if self._blocks(index):
                        return flushed + self._error()
                    return flushed + _encode("content_block_start", event)
            return flushed + raw
        if kind == "content_block_stop":
            flushed = self._flush(lambda key: key == index)
            return flushed if self.blocked is not None else flushed + raw
        if kind in _ENDING:
            flushed = self._flush(lambda key: True)
            return flushed if self.blocked is not None else flushed + raw
        return raw

    def _delta(self, event: dict[str, Any], delta: dict[str, Any], index: int) -> bytes:
        """A text or tool input delta: masked (a tool input's JSON text too: a mask has no
        quote to break its strings)."""
        kind = delta["type"]
        key = _MASKED[kind]
        text = delta.get(key)
        if not isinstance(text, str):
            return _encode("content_block_delta", event)
        self._kinds[index] = kind
        released = self._masker(index).feed(text)
        if self._blocks(index):
            return self._error()
        if not released:
            return b""  # all of it held back: it goes out with a later event
        delta[key] = released
        return _encode("content_block_delta", event)

    def _thinking(self, raw: bytes, delta: dict[str, Any], index: int) -> bytes:
        """Thinking is judged, not masked (its signature must stay valid): it passes as it is
        unless what it says blocks the stream."""
        text = delta.get("thinking")
        if isinstance(text, str):
            key = ("thinking", index)
            masker = self._maskers.get(key)
            if masker is None:
                masker = self._maskers[key] = StreamMasker(self._find, self._holdback)
            masker.feed(text)
            if self._blocks(key):
                return self._error()
        return raw

    def _flush(self, which: Callable[[Any], bool]) -> bytes:
        """The held text of the blocks `which` picks, one text_delta each (the error event
        instead, if what they held blocks the stream). Their maskers are done with."""
        out = bytearray()
        for index in [key for key in self._maskers if which(key)]:
            masker = self._maskers[index]
            rest = masker.flush()
            if self._blocks(index):
                return bytes(out) + self._error()
            del self._maskers[index]
            if rest and isinstance(index, int):  # (a thinking detector releases nothing)
                kind = self._kinds.pop(index, "text_delta")
                event = {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": kind, _MASKED[kind]: rest},
                }
                out += _encode("content_block_delta", event)
        return bytes(out)

    def _end(self) -> bytes:
        """End of stream: any held text goes out; an unfinished event is left out when it
        has data (it may hold text no guard judged), else it goes on as it came."""
        flushed = self._flush(lambda key: True)
        if self.blocked is not None:
            return flushed
        tail = bytes(self._raw) + bytes(self._buf)
        if self._has_data or b"data" in tail:
            tail = b""
        self._raw.clear()
        self._buf.clear()
        self._data.clear()
        self._has_data = False
        return flushed + tail

    def _masker(self, index: Any) -> StreamMasker:
        masker = self._maskers.get(index)
        if masker is None:
            masker = self._maskers[index] = StreamMasker(self._find, self._holdback)
        return masker

    def _blocks(self, index: Any) -> bool:
        """Whether what this block's masker found blocks the stream (as the chat relay's
        `_check` decides: a deny guard's match, or a guard whose action is block)."""
        masker = self._maskers.get(index)
        if masker is None:
            return False
        verdict = stream_block(masker, self._owners)
        if verdict is not None:
            self.blocked = verdict
        return verdict is not None

    def _error(self) -> bytes:
        verdict = self.blocked
        assert verdict is not None
        message = (
            f"The response was stopped by the gateway's content policy (guard '{verdict.guard}')."
        )
        body = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
        return _encode("error", body)


def _encode(kind: str, event: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
