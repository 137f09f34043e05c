"""Following a server-sent-events stream chunk by chunk, whatever the chunk boundaries.

Envoy hands us the body in the pieces the network produced: an event may be split anywhere,
including between `\r` and `\n` or inside a multi-byte character. Lines are split on bytes
(no UTF-8 sequence contains CR or LF), so decoding only ever sees whole lines.

`SSEParser` yields every event's data; `event_data` reads the data of one event's raw lines.
What an event means is the wire format's (extproc/wire/): each gives the stages a
`RelayedStream`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .guard.types import Verdict
    from .usage import Usage

_EOL = re.compile(rb"\r\n?|\n")


class SSEParser:
    """Incremental SSE framing (the WHATWG event-stream rules that matter for data)."""

    __slots__ = ("_buf", "_data", "_has_data", "_pending_cr")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._data: list[bytes] = []
        self._has_data = False
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event this chunk completes, in order."""
        if not chunk:
            return []  # an empty chunk must not separate a CR from its LF
        if self._pending_cr:
            self._pending_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buf = self._buf
        buf += chunk
        events: list[bytes] = []
        start = 0
        # One regex pass over the buffer: linear in its size, however many lines it holds.
        for match in _EOL.finditer(buf):
            if match.end() == len(buf) and match.group() == b"\r":
                # A CR at the very end: its LF may come with the next chunk.
                self._pending_cr = True
            event = self._line(bytes(buf[start : match.start()]))
            if event is not None:
                events.append(event)
            start = match.end()
        del buf[:start]
        return events

    def _line(self, line: bytes) -> bytes | None:
        if not line:
            if not self._has_data:
                return None
            data = b"\n".join(self._data)
            self._data.clear()
            self._has_data = False
            return data
        if line.startswith(b":"):
            return None  # a comment
        name, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._has_data = True
        return None

    @property
    def buffered(self) -> int:
        return len(self._buf) + sum(len(d) for d in self._data)


def event_data(raw: bytes | bytearray, partial: bool = False) -> bytes | None:
    """The data of one event's raw lines, None if it has no data field.

    With `partial`, `raw` is the start of an event: its last, unterminated line counts once its
    field name is complete, so the result is a prefix of the event's eventual data.
    """
    lines = _EOL.split(raw)
    last = lines.pop() if partial else b""
    values: list[bytes] = []
    for line in lines:
        name, _, value = line.partition(b":")
        if name == b"data":
            values.append(value[1:] if value[:1] == b" " else value)
    if last:
        name, sep, value = last.partition(b":")
        if sep and name == b"data":
            values.append(value[1:] if value[:1] == b" " else value)
    return b"\n".join(values) if values else None


class RelayedStream(Protocol):
    """What the stages read from a stream they relay, in any wire format: its usage report, or
    what they count themselves when it has none (events, text)."""

    @property
    def usage(self) -> Usage | None: ...

    @property
    def events(self) -> int: ...

    @property
    def partial_usage(self) -> Usage | None:
        """A stream that ended without its usage report: what the backend did report of it (a
        provider that gives the prompt's count first), the output estimated; None: nothing."""
        ...

    @property
    def error_code(self) -> str | None:
        """An error the backend reported inside the stream (its code); None: none."""
        ...

    def feed(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        """The bytes to send in the chunk's place; None: the chunk goes on unchanged."""
        ...

    @property
    def expects_usage(self) -> bool:
        """The backend announced a usage report (the text is then not kept)."""
        ...

    @property
    def text(self) -> str:
        """What the backend generated (capped), for the gateway's own count."""
        ...

    @property
    def blocked(self) -> Verdict | None:
        """The response guard's verdict that ended the stream (None: none did)."""
        ...

    @property
    def finished(self) -> bool:
        """The stream's last event came (OpenAI's `[DONE]`): nothing more of the answer will,
        even if the end of the stream is still to come. False for formats whose usage report
        always comes with the answer's end (Anthropic's, the Responses API's): they are settled
        by it."""
        ...
