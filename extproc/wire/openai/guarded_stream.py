"""Response guards on an OpenAI stream: mask across chunk boundaries, or end the stream cleanly.

The guarded relay replaces the fast relay when a stream has response guards: every event is
decoded, each choice's text goes through a StreamMasker (which holds back just enough text to
see a match split across deltas), and the event is re-encoded with the text that is safe to
release. A guard that blocks ends the stream with an error event, which the OpenAI SDK raises
as an APIError; whatever the backend sends after it is swallowed. The masked or blocked text
itself is never released.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from ...guard.stream_mask import StreamMasker, stream_block
from ...guard.types import Span, Verdict
from ...sse import SSEParser
from ...usage import Usage
from ..base import Endpoint
from .answer import error_body
from .answer import usage as usage_of
from .request import CHAT

if TYPE_CHECKING:
    from ...guard.pipeline import CompiledGuard

_DONE = b"[DONE]"
# Event data that may carry text a guard must judge.
_MAY_HOLD_TEXT = re.compile(rb"content|refusal|reasoning|arguments|text")
# Text fields of a chat delta besides tool-call arguments (`reasoning`: vLLM's newer name).
_DELTA_TEXT = ("content", "refusal", "reasoning_content", "reasoning")


class GuardedStreamRelay:
    """A RelayedStream (extproc/sse.py) whose `feed` answers the bytes to send in place of
    each chunk."""

    # OpenAI reports nothing before its usage chunk, and no error event the relay reads.
    partial_usage: Usage | None = None
    error_code: str | None = None

    __slots__ = (
        "_active",
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
        "finished",
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
        self._active: dict[Any, tuple[Any, ...]] = {}  # choice index -> the field it writes
        self._last: dict[str, Any] | None = None  # the last chunk: a template for a flush
        self._text = io.StringIO()
        self._text_len = 0
        self.text_cap = text_cap
        self.usage: Usage | None = None
        self.expects_usage = False
        self.events = 0
        self.finished = False
        self.blocked: Verdict | None = None

    @property
    def text(self) -> str:
        """What the backend generated (capped), for our own count when it reports no usage."""
        return self._text.getvalue()

    def feed(self, chunk: bytes, end: bool) -> bytes:
        out = bytearray()
        for data in self._parser.feed(chunk):
            if self.blocked is not None:
                # Nothing more reaches the client, but the backend goes on generating (Envoy
                # cannot cut the upstream here): keep reading its usage, so it is charged.
                self._account(data)
                continue
            out += self._event(data)
        if end and self._maskers and self.blocked is None:
            out += self._flush_event()
        return bytes(out)

    def _account(self, data: bytes) -> None:
        self.events += 1
        if data.strip() == _DONE:
            self.finished = True
            return
        if b'"usage"' not in data:
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(obj, dict) and "usage" in obj:
            self.expects_usage = True
            usage = usage_of(obj.get("usage"))
            if usage is not None:
                self.usage = usage

    def _event(self, data: bytes) -> bytes:
        self.events += 1
        if data.strip() == _DONE:
            self.finished = True
            flushed = self._flush_event()
            return flushed if self.blocked is not None else flushed + b"data: [DONE]\n\n"
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            # JSON a client's parser may still read (NaN, a lone surrogate escape): read as it
            # does and judged; what nobody can read but may hold text is left out, never passed
            # unjudged.
            try:
                obj = json.loads(data)
            except ValueError:
                return b"" if _MAY_HOLD_TEXT.search(data) else _frame(data)
        if not isinstance(obj, dict):
            return _frame(data)
        if "usage" in obj:
            self.expects_usage = True
            usage = usage_of(obj.get("usage"))
            if usage is not None:
                self.usage = usage
        choices = obj.get("choices")
        if choices == [] and isinstance(obj.get("usage"), dict) and self._strip:
            return b""  # the usage report the client did not ask for
        if not isinstance(choices, list) or not choices:
            return _frame(_dumps(obj))
        self._last = obj
        superseded: dict[tuple[Any, ...], str] = {}
        for choice in choices:
            if isinstance(choice, dict):
                superseded.update(self._superseded(choice))
                if self.blocked is None:
                    self._choice(choice)
                if self.blocked is not None:
                    return self._error()
        return self._chunk(superseded) + _frame(_dumps(obj))

    def _superseded(self, choice: dict[str, Any]) -> dict[tuple[Any, ...], str]:
        """What the fields a delta moves on from still hold (text before a tool call, one call's
        arguments before the next's): released ahead of the delta, in its own chunk, so the
        client reads each field whole and in order. No more text comes to such a field, so
        holding it back would only reorder the stream."""
        index = choice.get("index", 0)
        starting = [
            slot
            for holder, key, slot in self._text_slots(choice, index)
            if holder.get(key) or (slot[1] == "tool" and _starts_call(choice, slot[2]))
        ]
        if not starting or self._active.get(index) in starting:
            if starting:
                self._active[index] = starting[-1]
            return {}
        self._active[index] = starting[-1]
        out = {}
        for slot, masker in self._maskers.items():
            if slot[0] == index and slot not in starting and masker.held:
                out[slot] = masker.flush()
                self._check(masker)
                if self.blocked is not None:
                    return {}
        return out

    def _chunk(self, texts: dict[tuple[Any, ...], str]) -> bytes:
        """A chunk that carries these fields' texts (b"" when there is none)."""
        choices: dict[Any, dict[str, Any]] = {}
        for slot, text in texts.items():
            if text:
                index = slot[0]
                choice = choices.setdefault(index, {"index": index, "finish_reason": None})
                _put(choice, slot, text, self._endpoint)
        if not choices:
            return b""
        template = self._last or {}
        obj = {k: v for k, v in template.items() if k not in ("choices", "usage")}
        obj["choices"] = list(choices.values())
        return _frame(_dumps(obj))

    def _choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        if choice.get("logprobs") is not None:
            # Token-by-token copies of the text would go around the masks.
            choice["logprobs"] = None
        finish = bool(choice.get("finish_reason"))
        seen: set[tuple[Any, ...]] = set()
        for holder, key, slot in self._text_slots(choice, index):
            seen.add(slot)
            text = holder.get(key)
            masker = self._masker(slot)
            released = ""
            if isinstance(text, str):
                if key in ("content", "text"):
                    self._keep(text)
                released = masker.feed(text)
            if finish:
                released += masker.flush()
            self._check(masker)
            if self.blocked is not None:
                return
            if isinstance(text, str) or released:
                holder[key] = released
        if finish:
            # Text other fields of this choice still hold goes out with its last event.
            for slot, masker in self._maskers.items():
                if slot[0] == index and slot not in seen:
                    rest = masker.flush()
                    self._check(masker)
                    if self.blocked is not None:
                        return
                    if rest:
                        _put(choice, slot, rest, self._endpoint)

    def _masker(self, slot: tuple[Any, ...]) -> StreamMasker:
        masker = self._maskers.get(slot)
        if masker is None:
            masker = self._maskers[slot] = StreamMasker(self._find, self._holdback)
        return masker

    def _text_slots(
        self, choice: dict[str, Any], index: Any
    ) -> list[tuple[dict[str, Any], str, tuple[Any, ...]]]:
        """Every text field of a choice: (holder, key, masker id). A stream's text may be in
        the content, a refusal, reasoning, or a tool call's arguments."""
        if self._endpoint is not CHAT:
            return [(choice, "text", (index, "text"))]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = choice["delta"] = {}
        out: list[tuple[dict[str, Any], str, tuple[Any, ...]]] = [
            (delta, key, (index, key)) for key in _DELTA_TEXT if key in delta
        ]
        if "content" not in delta:
            out.insert(0, (delta, "content", (index, "content")))
        calls = delta.get("tool_calls")
        for position, call in enumerate(calls if isinstance(calls, list) else ()):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and "arguments" in function:
                tool = call.get("index", position)
                out.append((function, "arguments", (index, "tool", tool)))
        return out

    def _check(self, masker: StreamMasker) -> None:
        self.blocked = self.blocked or stream_block(masker, self._owners)

    def _flush_event(self) -> bytes:
        """What every masker still holds, as one last chunk, before the stream ends."""
        pending = {slot: m.flush() for slot, m in self._maskers.items()}
        for masker in self._maskers.values():
            self._check(masker)
            if self.blocked is not None:
                return self._error()
        return self._chunk(pending)

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


def _dumps(obj: Any) -> bytes:
    """The event's JSON; what orjson cannot write (a lone surrogate a backend sent, NaN) as the
    stdlib writes it, every non-ASCII character escaped."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()


def _starts_call(choice: dict[str, Any], tool: Any) -> bool:
    """The delta opens tool call `tool` (its id or name comes with it)."""
    calls = choice.get("delta", {}).get("tool_calls")
    for position, call in enumerate(calls if isinstance(calls, list) else ()):
        if isinstance(call, dict) and call.get("index", position) == tool:
            function = call.get("function")
            named = isinstance(function, dict) and function.get("name")
            return bool(call.get("id") or named)
    return False


def _frame(data: bytes) -> bytes:
    # Data of several lines (joined by the parser with LF) goes out as several data fields.
    return b"".join(b"data: " + line + b"\n" for line in data.split(b"\n")) + b"\n"


def _put(choice: dict[str, Any], slot: tuple[Any, ...], text: str, endpoint: Endpoint) -> None:
    """Add released text to a choice, in the field its masker follows."""
    if endpoint is not CHAT:
        choice["text"] = (choice.get("text") or "") + text
        return
    delta = choice.setdefault("delta", {})
    if slot[1] == "tool":
        calls = delta.setdefault("tool_calls", [])
        calls.append({"index": slot[2], "function": {"arguments": text}})
    else:
        key = slot[1]
        delta[key] = (delta.get(key) or "") + text
