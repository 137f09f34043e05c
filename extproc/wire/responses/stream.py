"""The relay of a Responses event stream from a backend that serves the Responses API itself:
every chunk goes on untouched; the usage is read from the terminal event (`response.completed`,
`response.incomplete` or `response.failed`, each carrying the whole response), and the text
produced is kept for a stream cut short."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from ...sse import SSEParser
from ..openai.answer import io_usage as usage_of

if TYPE_CHECKING:
    from ...guard.types import Verdict
    from ...usage import Usage

_TERMINAL = ("response.completed", "response.incomplete", "response.failed")
# Every event that delivers produced text (a cut stream is counted from them).
_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
    }
)
# The text kept for the gateway's own count of a cut stream, at most.
TEXT_CAP = 1 << 20


class ResponsesRelay:
    """sse.RelayedStream for a native Responses stream."""

    __slots__ = (
        "_chars", "_parser", "_text", "error_code", "events", "partial_usage", "response_id",
        "usage",
    )  # fmt: skip

    # Settled by its usage report, which comes with the answer's end (sse.RelayedStream).
    finished = False

    def __init__(self) -> None:
        self._parser = SSEParser()
        self._text: list[str] = []
        self._chars = 0
        self.usage: Usage | None = None
        self.partial_usage: Usage | None = None
        self.error_code: str | None = None
        self.events = 0
        self.response_id: str | None = None  # the Response's, from its first event

    def feed(self, chunk: bytes, end_of_stream: bool) -> None:
        for data in self._parser.feed(chunk):
            self.events += 1
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                self._read(event)
        return None

    def _read(self, event: dict) -> None:
        kind = event.get("type")
        if kind in _DELTAS:
            delta = event.get("delta")
            if isinstance(delta, str) and self._chars < TEXT_CAP:
                self._text.append(delta)
                self._chars += len(delta)
        elif kind == "response.created":
            response = event.get("response")
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                self.response_id = response["id"]
        elif kind in _TERMINAL:
            response = event.get("response")
            if isinstance(response, dict):
                self.usage = usage_of(response.get("usage"))
                error = response.get("error")
                if kind == "response.failed" and isinstance(error, dict):
                    self.error_code = str(error.get("code") or "response_failed")
        elif kind == "error":
            self.error_code = str(event.get("code") or "error")

    @property
    def expects_usage(self) -> bool:
        return False  # the text is kept: a cut stream is counted from it

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def blocked(self) -> Verdict | None:
        return None  # a guarded stream is translated from chat chunks (never native)
