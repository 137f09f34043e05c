"""OpenAI Responses API answers: the usage report, the text produced, where guards find it.
Errors are OpenAI's shape (wire/openai)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from ...guard.texts import Slot
from ...usage import Usage

if TYPE_CHECKING:
    from ..base import Endpoint


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def usage(report: Any) -> Usage | None:
    """A Response's `usage`: input (cached input among it), output (reasoning among it)."""
    if not isinstance(report, dict):
        return None
    prompt = _int(report.get("input_tokens"))
    if prompt is None:
        return None
    completion = _int(report.get("output_tokens")) or 0
    total = _int(report.get("total_tokens"))
    details = report.get("input_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
    out_details = report.get("output_tokens_details")
    reasoning = _int(out_details.get("reasoning_tokens")) if isinstance(out_details, dict) else None
    return Usage(
        prompt,
        completion,
        total if total is not None else prompt + completion,
        cached or 0,
        reasoning_tokens=reasoning or 0,
    )


def answer_usage(answer: Any) -> Usage | None:
    return usage(answer.get("usage")) if isinstance(answer, dict) else None


def answer_text(answer: Any) -> str:
    """What a Response produced, for the gateway's own count: output text, function calls,
    reasoning summaries."""
    parts: list[str] = []
    for item in _output(answer):
        kind = item.get("type")
        if kind == "message":
            for part in item.get("content") or ():
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    parts.append(part["text"])
        elif kind == "function_call":
            parts.append(str(item.get("name", "")))
            parts.append(str(item.get("arguments", "")))
        elif kind == "reasoning":
            for summary in item.get("summary") or ():
                if isinstance(summary, dict) and isinstance(summary.get("text"), str):
                    parts.append(summary["text"])
        else:
            parts.append(orjson.dumps(item).decode())
    return "".join(parts)


def answer_slots(endpoint: Endpoint, answer: Any) -> list[Slot]:
    return [
        Slot(part, "text", "assistant")
        for item in _output(answer)
        if item.get("type") == "message"
        for part in item.get("content") or ()
        if isinstance(part, dict)
        and part.get("type") == "output_text"
        and isinstance(part.get("text"), str)
    ]


def _output(answer: Any) -> list[dict[str, Any]]:
    output = answer.get("output") if isinstance(answer, dict) else None
    return [i for i in output if isinstance(i, dict)] if isinstance(output, list) else []
