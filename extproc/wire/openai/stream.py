"""The fast relay of an OpenAI stream.

Event boundaries are found on bytes, and an event is decoded only when it may carry a usage
object or while the completion text is collected; the usage-only chunk the gateway asked for on
the client's behalf can be cut out of what the client receives.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING

import orjson

from ...sse import event_data
from .answer import usage as usage_of

if TYPE_CHECKING:
    from ...guard.types import Verdict
    from ...usage import Usage

_LF = 0x0A
_CR = 0x0D
_LBRACE = 0x7B
_LBRACKET = 0x5B
_RBRACKET = 0x5D
_EOL_BYTES = b"\r\n"

# A blank line: a line terminator straight after another. A CR followed by LF is one
# terminator (CRLF), never a line and a blank line.
_BLANK = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
# Blank lines between events: any run of CR and LF is a run of terminators.
# (_EOLS and _WS match everywhere, if only the empty string: their .match() is never None.)
_EOLS = re.compile(rb"[\r\n]*")
_DATA_FIELD = (b"data:", b"data\r", b"data\n")
_DONE_EVENT = (b"data: [DONE]", b"data:[DONE]")
_DONE_MAX = 64  # bytes of a [DONE] event, comments and other fields included
_WS = re.compile(rb"[ \t\r\n]*")
# The raw bytes of an event that may carry a usage object: `"usage"` unless `: null` follows
# on the same line (a line break may separate key, colon and value once data lines are joined).
_USAGE_HINT = re.compile(rb'"usage"(?![ \t]*:[ \t]*null)')
# In an event's data: a usage object, and the usage key at all.
_USAGE_OBJECT = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*\{')
_USAGE_KEY = re.compile(rb'"usage"[ \t\r\n]*:')
# A top-level key of a usage-only chunk, with its colon; and whole JSON strings, to tell
# whether a key is at the top level (brackets outside strings) or inside a string.
_KEY = re.compile(rb'"(choices|usage)"[ \t\r\n]*:[ \t\r\n]*')
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# How far into a held event we look for proof that it is an ordinary one.
_PROBE = 4096
_UNDECODED = object()


def _not_usage_only(data: bytes) -> bool:
    """Whether the start of an event's data already rules out a usage-only chunk.

    That chunk is a JSON object whose top-level `choices` is an empty list and whose `usage` is
    an object: data that does not open an object, a top-level `choices` that is not `[]` or a
    top-level `usage` that is not an object rule it out. Undecided means False.
    """
    n = len(data)
    j = _WS.match(data).end()  # type: ignore[union-attr]
    if j == n:
        return False
    if data[j] != _LBRACE:
        return True
    for key in _KEY.finditer(data, j):
        before = _STRING.sub(b"", data[j : key.start()])
        if b'"' in before:
            continue  # inside a string
        depth = before.count(b"{") + before.count(b"[") - before.count(b"}") - before.count(b"]")
        if depth != 1:
            continue  # nested
        k = key.end()
        if k == n:
            return False  # the value is yet to come
        if key.group(1) == b"usage":
            if data[k] != _LBRACE:
                return True
        elif data[k] != _LBRACKET:
            return True
        else:
            k = _WS.match(data, k + 1).end()  # type: ignore[union-attr]
            if k < n and data[k] != _RBRACKET:
                return True
    return False


def _loads(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


class StreamRelay:
    """Relays an OpenAI stream chunk by chunk, reading its usage on the way.

    `feed` answers None when the chunk goes on unchanged (the usual case), or the bytes to send
    in its place. Event boundaries are found on bytes; an event is decoded only when its data
    shows a usage object (`"usage": {`), or while the completion text is being collected.

    With `strip_usage_chunk`, the usage-only chunk the gateway asked for on the client's behalf
    (`"choices": []` and a `usage` object) is cut out, blank line included; every other byte
    goes through unchanged and in order. Only an unfinished event that may still turn out to be
    that chunk is held back, and never past the end of the stream. Without it, `feed` always
    answers None.

    If the first JSON event has a `usage` key (`"usage": null` in every chunk when the backend
    will report usage), the text is not collected; otherwise it is, up to `text_cap` characters,
    for the caller's own count. Memory per stream: one unfinished event (at most `max_event`
    bytes, beyond which it is relayed unexamined) and the capped text.
    """

    __slots__ = (
        "_block",
        "_drop_lf",
        "_expects",
        "_held",
        "_in_block",
        "_line_start",
        "_overflow",
        "_pending_cr",
        "_strip",
        "_text",
        "_text_len",
        "chunks",
        "events",
        "finished",
        "max_event",
        "text_cap",
        "usage",
    )

    # No guards here: this relay never ends a stream. A class attribute, not a property: the
    # downstream stage reads it for every chunk.
    blocked: Verdict | None = None
    # OpenAI reports nothing before its usage chunk, and no error event the relay reads.
    partial_usage: Usage | None = None
    error_code: str | None = None

    def __init__(
        self, strip_usage_chunk: bool, text_cap: int = 64 * 1024, *, max_event: int = 1 << 20
    ) -> None:
        self._strip = strip_usage_chunk
        self.text_cap = text_cap
        self.max_event = max_event
        self.usage: Usage | None = None
        self.events = 0
        self.chunks = 0
        self.finished = False
        # The unfinished event (from its first line on; blank lines between events belong to
        # none), copied from earlier chunks; withheld from the client while `_held`.
        self._block = bytearray()
        self._held = False
        self._in_block = False
        self._overflow = False  # the unfinished event outgrew max_event: relayed unexamined
        self._line_start = True
        self._pending_cr = False  # the last byte was a CR: an LF next completes its CRLF
        self._drop_lf = False  # ... and that CR ended an event that was cut out
        self._expects: bool | None = None
        self._text = io.StringIO()
        self._text_len = 0

    @property
    def expects_usage(self) -> bool:
        return self._expects is True

    @property
    def text(self) -> str:
        return self._text.getvalue()

    @property
    def held(self) -> int:
        """Bytes received but not yet relayed."""
        return len(self._block) if self._held else 0

    @property
    def buffered(self) -> int:
        """Bytes kept of the unfinished event (held or not)."""
        return len(self._block)

    def feed(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        self.chunks += 1
        n = len(chunk)
        if not n:  # must not separate a CR from its LF, nor flush anything but at the end
            return self._end() if end_of_stream else None
        prefix: bytearray | None = None  # held bytes released, to go before the chunk
        cuts: list[tuple[int, int]] | None = None  # ranges of the chunk not relayed (now)
        cut_end = -1  # end of the last event cut out
        i = 0
        if self._pending_cr:
            self._pending_cr = False
            if chunk[0] == _LF:  # the second half of a CRLF split between chunks
                i = 1
                if self._drop_lf:
                    cuts = [(0, 1)]
            self._drop_lf = False

        start = -1  # where the unfinished event began in this chunk
        if self._in_block:
            start = 0
            if i < n and self._line_start and chunk[i] in _EOL_BYTES:
                end = i + 2 if chunk[i] == _CR and chunk[i + 1 : i + 2] == b"\n" else i + 1
            else:
                match = _BLANK.search(chunk, i)
                end = match.end() if match else -1
            if end >= 0:
                held = self._held
                block = self._block
                prior = len(block)
                cut = False
                if self._overflow:
                    self.events += 1
                else:
                    block += chunk[:end]
                    cut = self._complete(block, 0, len(block)) and held
                if cut:
                    cuts = [(0, end)]
                    cut_end = end
                elif held:
                    prefix = block[:prior]
                self._reset_block()
                start = -1
                i = end

        if start < 0:
            while True:
                i = _EOLS.match(chunk, i).end()  # type: ignore[union-attr]
                if i == n:
                    break
                match = _BLANK.search(chunk, i)
                if match is None:
                    start = i
                    break
                end = match.end()
                if self._complete(chunk, i, end):
                    if cuts is None:
                        cuts = []
                    cuts.append((i, end))
                    cut_end = end
                i = end

        if start >= 0 and not self._overflow:  # the chunk ends inside an event
            held = self._in_block and self._held
            block = self._block
            prior = len(block)
            block += chunk[start:]
            self._in_block = True
            hold = False
            if len(block) > self.max_event:
                self._overflow = True
            elif self._strip and not end_of_stream and (held or prior == 0):
                hold = prior >= _PROBE or not self._shown_ordinary()
            if hold:
                if cuts is None:
                    cuts = []
                cuts.append((start, n))
            elif held:
                prefix = block[:prior]
            self._held = hold
            if self._overflow:
                block.clear()
        self._in_block = start >= 0

        last = chunk[-1]
        self._line_start = last == _LF or last == _CR
        self._pending_cr = last == _CR
        self._drop_lf = cut_end == n and last == _CR
        if end_of_stream:
            self._reset_block()
        if prefix is None and cuts is None:
            return None
        out = prefix if prefix is not None else bytearray()
        view = memoryview(chunk)
        done = 0
        for a, b in cuts or ():
            out += view[done:a]
            done = b
        out += view[done:]
        return bytes(out)

    def _end(self) -> bytes | None:
        out = bytes(self._block) if self._held else None
        self._reset_block()
        return out

    def _reset_block(self) -> None:
        self._block.clear()
        self._held = False
        self._in_block = False
        self._overflow = False

    def _shown_ordinary(self) -> bool:
        probe = bytes(self._block[:_PROBE])
        if probe.startswith(b"data:") and b"\n" not in probe and b"\r" not in probe:
            data: bytes | None = probe[6:] if probe[5:6] == b" " else probe[5:]  # one line
        else:
            data = event_data(probe, partial=True)
        return data is not None and _not_usage_only(data)

    def _complete(self, buf: bytes | bytearray, start: int, end: int) -> bool:
        """Account for one complete event, buf[start:end]; whether to cut it out."""
        data = None
        if not buf.startswith(_DATA_FIELD, start):
            data = event_data(buf[start:end])
            if data is None:
                return False  # comments and other fields: nothing is dispatched
        self.events += 1
        # (As the openai SDK reads it: data that starts with [DONE]. Only a short event can
        # be one: the length, compared first, spares the others any more work.)
        if end - start < _DONE_MAX and (
            buf.startswith(_DONE_EVENT, start) if data is None else data.startswith(b"[DONE]")
        ):
            self.finished = True
            return False
        hint = _USAGE_HINT.search(buf, start, end) is not None
        expects = self._expects
        collect = expects is False and self._text_len < self.text_cap
        if not (hint or collect or expects is None):
            return False  # the fast path: nothing to learn from this event
        if data is None:
            data = event_data(buf[start:end]) or b""
        first = _WS.match(data).end()  # type: ignore[union-attr]
        is_object = data[first : first + 1] == b"{"
        if expects is None and is_object:
            self._expects = expects = _USAGE_KEY.search(data) is not None
            collect = not expects and self._text_len < self.text_cap
        obj: object = _UNDECODED
        if hint and _USAGE_OBJECT.search(data):
            obj = _loads(data)
            if isinstance(obj, dict):
                usage = usage_of(obj.get("usage"))
                if usage is not None:
                    self.usage = usage
        if collect and is_object:
            if obj is _UNDECODED:
                obj = _loads(data)
            if isinstance(obj, dict):
                choices = obj.get("choices")
                for choice in choices if isinstance(choices, list) else ():
                    if isinstance(choice, dict):
                        self._collect(choice)
        return (
            self._strip
            and isinstance(obj, dict)
            and obj.get("choices") == []
            and isinstance(obj.get("usage"), dict)
        )

    def _collect(self, choice: dict) -> None:
        room = self.text_cap - self._text_len
        if room <= 0:
            return
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(text, str) and text:
            if len(text) > room:
                text = text[:room]
            self._text.write(text)
            self._text_len += len(text)
