"""Anthropic Messages answers: the usage report, the text produced, where guards find it, the
error shape (`{"type": "error", "error": {"type", "message"}}`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from ...guard.texts import Slot
from ...providers.anthropic import usage as anthropic_usage

if TYPE_CHECKING:
    from ...errors import GatewayError
    from ...usage import Usage
    from ..base import Endpoint

# Anthropic's error type for each status its API answers with (its errors reference); the
# anthropic SDK picks its exception class by status, and clients read the type.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's error type for a status: its own where it has one, else by class."""
    return _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def error_body(err: GatewayError) -> bytes:
    """A refusal in Anthropic's shape. The gateway's own code (quota_exceeded:..., guard
    names) stays in Envoy's response details and the audit record: Anthropic's shape has no
    place for it, and its SDK reads the status and type."""
    return orjson.dumps(
        {"type": "error", "error": {"type": error_type(err.status), "message": err.message}}
    )


def answer_usage(answer: Any) -> Usage | None:
    return anthropic_usage(answer.get("usage")) if isinstance(answer, dict) else None


def answer_text(answer: Any) -> str:
    """What a Messages answer produced, for the gateway's own count: text, thinking, tool
    calls' input."""
    parts: list[str] = []
    for block in _blocks(answer):
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            parts.append(block["thinking"])
        elif kind == "tool_use":
            parts.append(str(block.get("name", "")))
            parts.append(orjson.dumps(block.get("input")).decode())
    return "".join(parts)


def answer_slots(endpoint: Endpoint, answer: Any) -> list[Slot]:
    return [
        Slot(block, "text", "assistant")
        for block in _blocks(answer)
        if block.get("type") == "text" and isinstance(block.get("text"), str)
    ]


def _blocks(answer: Any) -> list[dict[str, Any]]:
    content = answer.get("content") if isinstance(answer, dict) else None
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
