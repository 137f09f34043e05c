"""Anthropic Messages requests: the endpoints, body validation, where the text is, the prompt's
count. References: Anthropic's Messages API and token counting API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from ...errors import bad_request
from ...guard.texts import Slot
from ..base import Endpoint, Operation, ParsedRequest, json_object, post_route

if TYPE_CHECKING:
    from ...tokens import TokenCount, TokenCounter

MESSAGES = Endpoint(Operation.CHAT, "/v1/messages")
COUNT_TOKENS = Endpoint(Operation.COUNT_TOKENS, "/v1/messages/count_tokens")

_ENDPOINTS = {e.path: e for e in (MESSAGES, COUNT_TOKENS)}


def owns(path: str) -> bool:
    return path == MESSAGES.path or path.startswith("/v1/messages/")


def route(method: str, path: str) -> tuple[Endpoint, str | None] | None:
    return post_route(_ENDPOINTS, method, path)


def parse(endpoint: Endpoint, raw: bytes) -> ParsedRequest:
    """The body checked as far as the gateway reads it (model, messages, max_tokens, stream,
    system); the rest is the backend's to judge, or the translation's (chat_bridge.py)."""
    body = json_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model: Field required", "missing_model", "model")
    _check_messages(body.get("messages"))
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise bad_request("system: Input should be a string or a list of text blocks",
                          "invalid_type", "system")  # fmt: skip
    if endpoint is COUNT_TOKENS:
        return ParsedRequest(endpoint, body, model, False, False, 0)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise bad_request("max_tokens: Field required", "missing_max_tokens", "max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise bad_request("max_tokens: Input should be an integer of at least 1",
                          "invalid_value", "max_tokens")  # fmt: skip
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream: Input should be a valid boolean", "invalid_type", "stream")
    # A Messages stream always reports its usage (message_start, message_delta).
    return ParsedRequest(endpoint, body, model, stream, True, max_tokens)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: Input should be a non-empty list", "invalid_value",
                          "messages")  # fmt: skip
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise bad_request(
                f"messages.{i}.role: Input should be 'user' or 'assistant'",
                "invalid_value",
                f"messages[{i}].role",
            )
        content = message.get("content")
        if not isinstance(content, str | list):
            raise bad_request(
                f"messages.{i}.content: Input should be a string or a list of content blocks",
                "invalid_type",
                f"messages[{i}].content",
            )
        if isinstance(content, list) and not all(
            isinstance(b, dict) and isinstance(b.get("type"), str) for b in content
        ):
            raise bad_request(
                f"messages.{i}.content: each content block must be an object with a 'type'",
                "invalid_type",
                f"messages[{i}].content",
            )


# -- counting -----------------------------------------------------------------------------------


async def count_prompt(
    tokens: TokenCounter,
    parsed: ParsedRequest,
    *,
    team: str | None,
    budget: float | None,
) -> TokenCount:
    """The prompt counted as the chat turns it reads as: every text, tool call and tool result,
    the thinking kept in the turns, images at the tokenizer's fixed estimate."""
    body = parsed.body
    turns: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        turns.append({"role": "system", "content": _countable(system)})
    for message in body["messages"]:
        turns.append({"role": message["role"], "content": _countable(message.get("content"))})
    tools = body.get("tools") if isinstance(body.get("tools"), list) else None
    return await tokens.count_chat_async(parsed.model, turns, tools, team=team, budget=budget)


def _countable(content: Any) -> Any:
    """Anthropic content as chat content parts the tokenizer's walker reads (tokens.py)."""
    if isinstance(content, str):
        return content
    parts: list[Any] = []
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text")})
        elif kind == "thinking":
            parts.append({"type": "text", "text": block.get("thinking")})
        elif kind == "document" and _text_source(block) is not None:
            parts.append({"type": "text", "text": _text_source(block)})
        elif kind in ("image", "document"):
            parts.append({"type": "image_url"})
        elif kind in ("tool_use", "server_tool_use"):
            parts.append({"type": "text", "text": str(block.get("name", ""))})
            parts.append({"type": "text", "text": _json(block.get("input"))})
        elif kind == "tool_result":
            inner = _countable(block.get("content"))
            parts.extend([{"type": "text", "text": inner}] if isinstance(inner, str) else inner)
        else:
            # Unknown blocks (redacted thinking, search results): counted as their JSON, over
            # rather than under.
            parts.append({"type": "other", "text": _json(block)})
    return parts


def _json(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return ""


def span_attributes(body: dict[str, Any]) -> dict[str, Any]:
    value = body.get("max_tokens")
    max_tokens = value if isinstance(value, int) and not isinstance(value, bool) else None
    return {"gen_ai.request.max_tokens": max_tokens}


# -- the texts guards read ----------------------------------------------------------------------


def request_slots(endpoint: Endpoint, body: dict[str, Any]) -> list[Slot]:
    """The system prompt, every text block and tool result's text, in order. Thinking blocks are
    left out: Anthropic checks their signature, and a changed one is refused."""
    out: list[Slot] = []
    system = body.get("system")
    if isinstance(system, str):
        out.append(Slot(body, "system", "system"))
    else:
        _text_blocks(out, system, "system")
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        role = "assistant" if message.get("role") == "assistant" else "user"
        content = message.get("content")
        if isinstance(content, str):
            out.append(Slot(message, "content", role))
            continue
        for block in content if isinstance(content, list) else ():
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_result":
                inner = block.get("content")
                if isinstance(inner, str):
                    out.append(Slot(block, "content", "user"))
                else:
                    _text_blocks(out, inner, "user")
            else:
                _text_blocks(out, [block], role)
    return out


def _text_blocks(out: list[Slot], blocks: Any, role: str) -> None:
    """The texts of text blocks, and of documents and search results given as text."""
    for block in blocks if isinstance(blocks, list) else ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            out.append(Slot(block, "text", role))
        elif block.get("type") in ("document", "search_result"):
            source = block.get("source")
            if isinstance(source, dict) and source.get("type") == "text":
                if isinstance(source.get("data"), str):
                    out.append(Slot(source, "data", role))
            elif isinstance(source, dict) and source.get("type") == "content":
                _text_blocks(out, source.get("content"), role)
            if block.get("type") == "search_result":
                _text_blocks(out, block.get("content"), role)


def _text_source(block: dict[str, Any]) -> str | None:
    """A document's text, when it is given as text."""
    source = block.get("source")
    if not isinstance(source, dict):
        return None
    if source.get("type") == "text" and isinstance(source.get("data"), str):
        return str(source["data"])
    if source.get("type") == "content" and isinstance(source.get("content"), list):
        texts = [b.get("text") for b in source["content"] if isinstance(b, dict)]
        return "".join(t for t in texts if isinstance(t, str))
    return None
