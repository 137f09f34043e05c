"""Following a server-sent-events stream chunk by chunk, whatever the chunk boundaries.

Envoy hands us the body in the pieces the network produced: an event may be split anywhere,
including between `\r` and `\n` or inside a multi-byte character. Lines are split on bytes
(no UTF-8 sequence contains CR or LF), so decoding only ever sees whole lines.
"""

from __future__ import annotations

import re

import orjson

from .usage import Usage, from_openai

DONE = b"[DONE]"


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


class StreamObserver:
    """Watches an OpenAI-style stream for its usage and, failing that, collects the text."""

    __slots__ = ("_parser", "_text", "_text_len", "done", "events", "text_cap", "usage")

    def __init__(self, text_cap: int = 1 << 20) -> None:
        self._parser = SSEParser()
        self._text: list[str] = []
        self._text_len = 0
        self.text_cap = text_cap
        self.usage: Usage | None = None
        self.events = 0
        self.done = False

    def feed(self, chunk: bytes) -> None:
        for data in self._parser.feed(chunk):
            self.events += 1
            if data == DONE:
                self.done = True
                continue
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(event, dict):
                continue
            usage = from_openai(event.get("usage"))
            if usage is not None:
                self.usage = usage
            choices = event.get("choices")
            for choice in choices if isinstance(choices, list) else ():
                if isinstance(choice, dict):
                    self._collect(choice)

    def _collect(self, choice: dict) -> None:
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(text, str) and text and self._text_len < self.text_cap:
            self._text.append(text)
            self._text_len += len(text)

    @property
    def text(self) -> str:
        return "".join(self._text)
