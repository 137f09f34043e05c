"""OpenAI Responses API answers: the usage report, the text produced, where guards find it.
Errors are OpenAI's shape (wire/openai)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from ...guard.texts import Slot
from ..openai.answer import io_usage

if TYPE_CHECKING:
    from ...usage import Usage
    from ..base import Endpoint


def answer_usage(answer: Any) -> Usage | None:
    return io_usage(answer.get("usage")) if isinstance(answer, dict) else None


def answer_text(answer: Any) -> str:
    """What a Response produced, for the gateway's own count: its texts (answer_slots) and
    whatever else its output holds, as JSON."""
    parts = [slot.get() for slot in answer_slots(None, answer)]
    parts += [
        orjson.dumps(item).decode() for item in _output(answer) if item.get("type") not in _READ
    ]
    return "".join(parts)


# The output items answer_slots reads.
_READ = frozenset({"message", "function_call", "reasoning"})


def answer_slots(endpoint: Endpoint | None, answer: Any) -> list[Slot]:
    """Every text a Response produced: messages' output text and refusals, function calls'
    arguments, reasoning's summary and text."""
    out: list[Slot] = []
    for item in _output(answer):
        kind = item.get("type")
        if kind == "function_call":
            if isinstance(item.get("arguments"), str):
                out.append(Slot(item, "arguments", "assistant"))
            continue
        parts: list[Any] = []
        if kind == "message":
            parts = _list(item.get("content"))
        elif kind == "reasoning":
            parts = _list(item.get("summary")) + _list(item.get("content"))
        for part in parts:
            if isinstance(part, dict):
                key = "refusal" if part.get("type") == "refusal" else "text"
                if isinstance(part.get(key), str):
                    out.append(Slot(part, key, "assistant"))
    return out


def stored_id(raw: bytes) -> str | None:
    """The id of a Response the backend stored (`store` left true), for later calls on it."""
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(answer, dict) or answer.get("store") is False:
        return None
    response_id = answer.get("id")
    return response_id if isinstance(response_id, str) and response_id else None


def drop_logprobs(answer: Any) -> bool:
    """Remove the output text's token log-probabilities (they repeat the text around a mask);
    True when there were some."""
    dropped = False
    for item in _output(answer):
        for part in _list(item.get("content")):
            if isinstance(part, dict) and part.get("logprobs"):
                part["logprobs"] = []
                dropped = True
    return dropped


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _output(answer: Any) -> list[dict[str, Any]]:
    output = answer.get("output") if isinstance(answer, dict) else None
    return [i for i in output if isinstance(i, dict)] if isinstance(output, list) else []
