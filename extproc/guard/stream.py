"""Response guards on a stream: mask across chunk boundaries, or end the stream cleanly.

The guarded relay replaces the fast relay when a stream has response guards: every event is
decoded, each choice's text goes through a StreamMasker (which holds back just enough text to
see a match split across deltas), and the event is re-encoded with the text that is safe to
release. A guard that blocks ends the stream with an error event, which the OpenAI SDK raises
as an APIError; whatever the backend sends after it is swallowed. The masked or blocked text
itself is never released.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import orjson

from ..errors import error_body
from ..parsing import Endpoint
from ..sse import SSEParser
from ..usage import Usage, from_openai
from .pipeline import CompiledGuard
from .stream_mask import StreamMasker
from .types import Span, Verdict

_DONE = b"[DONE]"


class GuardedStreamRelay:
    """Same reading interface as sse.StreamRelay (usage, expects_usage, events, text), and
    `feed` answers the bytes to send in place of each chunk."""

    __slots__ = (
        "_endpoint",
        "_find",
        "_holdback",
        "_last",
        "_maskers",
        "_owners",
        "_parser",
        "_strip",
        "_text",
        "_text_len",
        "blocked",
        "events",
        "expects_usage",
        "text_cap",
        "usage",
    )

    def __init__(
        self,
        endpoint: Endpoint,
        strip_usage_chunk: bool,
        find: Callable[[str], list[Span]],
        holdback: int,
        owners: dict[str, CompiledGuard],
        text_cap: int = 64 * 1024,
    ) -> None:
        self._endpoint = endpoint
        self._strip = strip_usage_chunk
        self._find = find
        self._holdback = holdback
        self._owners = owners
        self._parser = SSEParser()
        self._maskers: dict[Any, StreamMasker] = {}
        self._last: dict[str, Any] | None = None  # the last chunk: a template for a flush
        self._text = io.StringIO()
        self._text_len = 0
        self.text_cap = text_cap
        self.usage: Usage | None = None
        self.expects_usage = False
        self.events = 0
        self.blocked: Verdict | None = None

    @property
    def text(self) -> str:
        """What the backend generated (capped), for our own count when it reports no usage."""
        return self._text.getvalue()

    def feed(self, chunk: bytes, end: bool) -> bytes:
        if self.blocked is not None:
            return b""
        out = bytearray()
        for data in self._parser.feed(chunk):
            out += self._event(data)
            if self.blocked is not None:
                return bytes(out)
        if end and self._maskers:
            out += self._flush_event()
        return bytes(out)

    def _event(self, data: bytes) -> bytes:
        self.events += 1
        if data.strip() == _DONE:
            return self._flush_event() + b"data: [DONE]\n\n"
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return _frame(data)
        if not isinstance(obj, dict):
            return _frame(data)
        if "usage" in obj:
            self.expects_usage = True
            usage = from_openai(obj.get("usage"))
            if usage is not None:
                self.usage = usage
        choices = obj.get("choices")
        if choices == [] and isinstance(obj.get("usage"), dict) and self._strip:
            return b""  # the usage report the client did not ask for
        if not isinstance(choices, list) or not choices:
            return _frame(orjson.dumps(obj))
        self._last = obj
        for choice in choices:
            if isinstance(choice, dict):
                self._choice(choice)
                if self.blocked is not None:
                    return self._error()
        return _frame(orjson.dumps(obj))

    def _choice(self, choice: dict[str, Any]) -> None:
        holder, key = self._text_slot(choice)
        text = holder.get(key) if holder is not None else None
        index = choice.get("index", 0)
        masker = self._maskers.get(index)
        if masker is None:
            masker = self._maskers[index] = StreamMasker(self._find, self._holdback)
        released = ""
        if isinstance(text, str):
            self._keep(text)
            released = masker.feed(text)
        if choice.get("finish_reason"):
            released += masker.flush()
        self._check(masker)
        if holder is not None and (isinstance(text, str) or released):
            holder[key] = released

    def _text_slot(self, choice: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        if self._endpoint is Endpoint.CHAT:
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice["delta"] = {}
            return delta, "content"
        return choice, "text"

    def _check(self, masker: StreamMasker) -> None:
        for kind in masker.counts:
            guard = self._owners.get(kind)
            if guard is None:
                continue
            if guard.deny is not None:
                self.blocked = Verdict("block", guard.name, reason=f"matched {kind}")
            elif guard.spec.action == "block":
                self.blocked = Verdict("block", guard.name, reason="sensitive data")
            else:
                continue
            return

    def _flush_event(self) -> bytes:
        """What every masker still holds, as one last chunk, before the stream ends."""
        pending = {index: m.flush() for index, m in self._maskers.items()}
        for masker in self._maskers.values():
            self._check(masker)
            if self.blocked is not None:
                return self._error()
        pending = {index: text for index, text in pending.items() if text}
        if not pending:
            return b""
        template = self._last or {}
        obj = {k: v for k, v in template.items() if k not in ("choices", "usage")}
        obj["choices"] = [
            {"index": index, "delta": {"content": text}, "finish_reason": None}
            if self._endpoint is Endpoint.CHAT
            else {"index": index, "text": text, "finish_reason": None}
            for index, text in pending.items()
        ]
        return _frame(orjson.dumps(obj))

    def _error(self) -> bytes:
        verdict = self.blocked
        assert verdict is not None
        body = error_body(
            f"The response was stopped by the gateway's content policy (guard '{verdict.guard}').",
            "invalid_request_error",
            f"guard_blocked:{verdict.guard}",
        )
        return _frame(body)

    def _keep(self, text: str) -> None:
        if self._text_len < self.text_cap:
            piece = text[: self.text_cap - self._text_len]
            self._text.write(piece)
            self._text_len += len(piece)


def _frame(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"
