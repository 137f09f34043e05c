"""OpenAI Responses API requests: the endpoints, body validation, where the text is, the
prompt's count. Reference: OpenAI's Responses API (create a response, count input tokens)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from ...errors import bad_request
from ...guard.texts import Slot
from ..base import (
    RESPONSE_OBJECT,
    Endpoint,
    Operation,
    ParsedRequest,
    json_object,
    post_route,
    stored_route,
)

if TYPE_CHECKING:
    from ...tokens import TokenCount, TokenCounter

RESPONSES = Endpoint(Operation.CHAT, "/v1/responses")
INPUT_TOKENS = Endpoint(Operation.COUNT_TOKENS, "/v1/responses/input_tokens")
# The calls on a stored Response, by what follows its id, and the methods each takes.
RESPONSE = Endpoint(Operation.STORED, "/v1/responses/{response_id}", kind=RESPONSE_OBJECT)
INPUT_ITEMS = Endpoint(
    Operation.STORED, "/v1/responses/{response_id}/input_items", kind=RESPONSE_OBJECT
)
CANCEL = Endpoint(Operation.STORED, "/v1/responses/{response_id}/cancel", kind=RESPONSE_OBJECT)
_STORED = {"": (RESPONSE, ("GET", "DELETE")), "/input_items": (INPUT_ITEMS, ("GET",)),
           "/cancel": (CANCEL, ("POST",))}  # fmt: skip

_ENDPOINTS = {e.path: e for e in (RESPONSES, INPUT_TOKENS)}
# A conversation object (whose items any team could add to: the gateway does not track it yet)
# and a background response (which would run past the request's settlement): refused.
_STATEFUL = ("conversation", "background")
_PREFIX = RESPONSES.path + "/"


def owns(path: str) -> bool:
    return path == RESPONSES.path or path.startswith(_PREFIX)


def route(method: str, path: str) -> tuple[Endpoint, str | None] | None:
    """The endpoint and, for a call on a stored Response, its id."""
    if path in _ENDPOINTS:
        return post_route(_ENDPOINTS, method, path)
    return stored_route(_PREFIX, _STORED, method, path)


def parse(endpoint: Endpoint, raw: bytes) -> ParsedRequest:
    """The body checked as far as the gateway reads it (model, input, instructions, stream,
    max_output_tokens); the rest is the backend's to judge, or the translation's."""
    body = json_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter", "missing_model", "model")
    value = body.get("input")
    if value is not None and not (isinstance(value, str) or _items(value)):
        raise bad_request(
            "'input' must be a string or an array of input items", "invalid_value", "input"
        )
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise bad_request("'instructions' must be a string", "invalid_type", "instructions")
    for param in _STATEFUL:
        if body.get(param) not in (None, False):
            raise bad_request(
                f"'{param}' is not supported by this gateway: "
                + (
                    "it does not keep track of which team a conversation is; send the whole "
                    "input or a previous_response_id instead"
                    if param == "conversation"
                    else "a background response would run past the request's accounting"
                ),
                "unsupported_parameter",
                param,
            )
    for i, item in enumerate(value if isinstance(value, list) else ()):
        if item.get("type") == "item_reference" or (item.keys() == {"id"}):
            # An item of a stored Response, by id: the gateway records whose Responses are
            # whose, not their items (send the item itself, or a previous_response_id).
            raise bad_request(
                "Item references are not supported by this gateway: send the item itself, or "
                "a previous_response_id",
                "unsupported_parameter",
                f"input[{i}]",
            )
    if endpoint is INPUT_TOKENS:
        return ParsedRequest(endpoint, body, model, False, False, 0)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "invalid_type", "stream")
    cap = body.get("max_output_tokens")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise bad_request(
            "'max_output_tokens' must be a positive integer", "invalid_value", "max_output_tokens"
        )
    # A Responses stream always ends with the whole response, its usage included.
    return ParsedRequest(endpoint, body, model, stream, True, cap)


def _items(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


# -- counting -----------------------------------------------------------------------------------


async def count_prompt(
    tokens: TokenCounter,
    parsed: ParsedRequest,
    *,
    team: str | None,
    budget: float | None,
) -> TokenCount:
    """The prompt counted as the chat turns it reads as: instructions, every message, function
    call and its output, earlier reasoning's summary; images at the tokenizer's estimate. (A
    request that continues a stored response is counted without what the backend stored.)"""
    body = parsed.body
    turns: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        turns.append({"role": "system", "content": body["instructions"]})
    value = body.get("input")
    if isinstance(value, str):
        turns.append({"role": "user", "content": value})
    for item in value if isinstance(value, list) else ():
        turns.append(_turn(item))
    tools = body.get("tools") if isinstance(body.get("tools"), list) else None
    return await tokens.count_chat_async(parsed.model, turns, tools, team=team, budget=budget)


def _turn(item: dict[str, Any]) -> dict[str, Any]:
    kind = _kind(item)
    if kind == "message":
        return {"role": "user", "content": _parts(item.get("content"))}
    if kind == "function_call":
        return {
            "role": "assistant",
            "content": [_text(item.get("name")), _text(item.get("arguments"))],
        }
    if kind in ("function_call_output", "custom_tool_call_output"):
        return {"role": "tool", "content": _parts(item.get("output"))}
    if kind == "reasoning":
        summary = item.get("summary")
        texts = (
            [s.get("text") for s in summary if isinstance(s, dict)]
            if isinstance(summary, list)
            else []
        )
        return {"role": "assistant", "content": [_text(t) for t in texts]}
    # Other items (built-in tools' calls and results): counted as their JSON, over not under.
    return {"role": "user", "content": [{"type": "other", "text": orjson.dumps(item).decode()}]}


def _parts(content: Any) -> Any:
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text", "refusal"):
            parts.append(_text(part.get("text") or part.get("refusal")))
        elif kind == "input_image":
            parts.append({"type": "image_url"})
        elif kind == "input_file":
            # As chat's file part: no basis for a count (never its base64 as text).
            parts.append({"type": "file"})
        else:
            parts.append({"type": "other", "text": orjson.dumps(part).decode()})
    return parts


def _text(value: Any) -> dict[str, Any]:
    return {"type": "text", "text": value if isinstance(value, str) else ""}


def span_attributes(body: dict[str, Any]) -> dict[str, Any]:
    value = body.get("max_output_tokens")
    max_tokens = value if isinstance(value, int) and not isinstance(value, bool) else None
    return {"gen_ai.request.max_tokens": max_tokens}


# -- the texts guards read ----------------------------------------------------------------------


def request_slots(endpoint: Endpoint, body: dict[str, Any]) -> list[Slot]:
    """Instructions, the input's text (messages' text parts, function outputs), in order."""
    out: list[Slot] = []
    if isinstance(body.get("instructions"), str):
        out.append(Slot(body, "instructions", "system"))
    value = body.get("input")
    if isinstance(value, str):
        out.append(Slot(body, "input", "user"))
    for item in value if isinstance(value, list) else ():
        if not isinstance(item, dict):
            continue
        kind = _kind(item)
        if kind == "message":
            role = item.get("role")
            role = (
                role
                if role in ("system", "assistant")
                else "system"
                if role == "developer"
                else "user"
            )
            content = item.get("content")
            if isinstance(content, str):
                out.append(Slot(item, "content", role))
            for part in content if isinstance(content, list) else ():
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append(Slot(part, "text", role))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            output = item.get("output")
            if isinstance(output, str):
                out.append(Slot(item, "output", "user"))
            for part in output if isinstance(output, list) else ():
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append(Slot(part, "text", "user"))
    return out


def _kind(item: dict[str, Any]) -> Any:
    """An input item's type: a message's may be left out (or null), as the SDK's types allow."""
    kind = item.get("type")
    return "message" if kind is None and "role" in item else kind
