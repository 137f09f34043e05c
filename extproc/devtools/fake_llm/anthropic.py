"""Anthropic's Messages API (`POST /v1/messages`) as the fake speaks it, after Anthropic's
published API reference: the request checked as strictly as Anthropic checks it (an unknown
field, a block of the wrong shape, a tool result that answers no tool use: 400 in Anthropic's
error shape), the answer as a message or as its event stream, usage with the cache fields.

Faults (`x-fake-fault`, `--fault`) answer in Anthropic's shape: 429 `rate_limit_error`, 500
`api_error`, 503 as Anthropic's overloaded answer (529 `overloaded_error`); resets and stalls
as on the OpenAI endpoints.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import orjson
from aiohttp import web

from .faults import Fault, open_event_stream, pause, reset_connection, sleep_until
from .settings import RequestSettings
from .wire import (
    MALFORMED,
    content,
    estimate_tokens,
    is_int,
    json_response,
    text_pieces,
    word_pieces,
)

VERSION = "2023-06-01"
_TOP_LEVEL = frozenset(
    {
        "model", "messages", "max_tokens", "system", "temperature", "top_p", "top_k",
        "stop_sequences", "stream", "tools", "tool_choice", "metadata", "thinking",
        "service_tier",
    }
)  # fmt: skip
_BLOCK_FIELDS = {
    "text": ({"text"}, {"cache_control", "citations"}),
    "image": ({"source"}, {"cache_control"}),
    "tool_use": ({"id", "name", "input"}, {"cache_control"}),
    "tool_result": ({"tool_use_id"}, {"content", "is_error", "cache_control"}),
    "thinking": ({"thinking", "signature"}, set()),
    "redacted_thinking": ({"data"}, set()),
}
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class AnthropicError(Exception):
    def __init__(self, message: str, kind: str = "invalid_request_error", status: int = 400):
        super().__init__(message)
        self.message, self.kind, self.status = message, kind, status


def error_response(err: AnthropicError, headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": "error", "error": {"type": err.kind, "message": err.message}}
    return json_response(body, status=err.status, headers=headers)


# -- the request --------------------------------------------------------------------------------


def check_headers(headers: Any) -> None:
    """The key in `x-api-key` (the API reference) or as a bearer token (what the official SDK
    sends since its 2.x), and a dated `anthropic-version` from 2023-06-01 on (the answers here
    have that version's shape, which later versions keep for what the fake answers)."""
    bearer = headers.get("authorization", "")
    if not headers.get("x-api-key") and not bearer.lower().startswith("bearer "):
        raise AnthropicError("x-api-key header is required", "authentication_error", 401)
    version = headers.get("anthropic-version", "")
    if not _VERSION.match(version) or version < VERSION:
        raise AnthropicError(f"anthropic-version: {version!r} is not a supported version")


def check_request(body: Any) -> None:
    """Raises the 400 Anthropic would answer with."""
    if body is MALFORMED or not isinstance(body, dict):
        raise AnthropicError("The request body is not valid JSON")
    for key in body:
        if key not in _TOP_LEVEL:
            raise AnthropicError(f"{key}: Extra inputs are not permitted")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise AnthropicError("model: Field required")
    if not is_int(body.get("max_tokens")) or body["max_tokens"] < 1:
        raise AnthropicError("max_tokens: Field required (an integer >= 1)")
    for name, top in (("temperature", 1.0), ("top_p", 1.0)):
        value = body.get(name)
        if value is not None and not (isinstance(value, int | float) and 0 <= value <= top):
            raise AnthropicError(f"{name}: Input should be between 0 and {top}")
    if body.get("temperature") is not None and body.get("top_p") is not None:
        # As the recent Claude models answer.
        raise AnthropicError("`temperature` and `top_p` cannot both be specified for this model")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise AnthropicError("stream: Input should be a valid boolean")
    stops = body.get("stop_sequences")
    if stops is not None and not (
        isinstance(stops, list) and all(isinstance(s, str) for s in stops)
    ):
        raise AnthropicError("stop_sequences: Input should be a valid list of strings")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        _blocks(system, "system", allowed={"text"})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise AnthropicError("messages: Field required (a non-empty list)")
    tool_uses: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise AnthropicError(f"{where}: Extra inputs are not permitted")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise AnthropicError(f"{where}.role: Input should be 'user' or 'assistant'")
        blocks: Any = message.get("content")
        if isinstance(blocks, str):
            if tool_uses:
                raise AnthropicError(
                    f"{where}: `tool_use` ids were found without `tool_result` blocks "
                    "immediately after"
                )
            continue
        allowed = (
            {"text", "image", "tool_result"}
            if role == "user"
            else {"text", "tool_use", "thinking", "redacted_thinking"}
        )
        _blocks(blocks, f"{where}.content", allowed)
        results = {b["tool_use_id"] for b in blocks if b["type"] == "tool_result"}
        for j, block in enumerate(blocks):
            if block["type"] == "tool_result" and block["tool_use_id"] not in tool_uses:
                raise AnthropicError(
                    f"{where}.content.{j}: unexpected `tool_use_id` found in `tool_result` "
                    "blocks: each `tool_result` block must have a corresponding `tool_use` "
                    "block in the previous message"
                )
        if tool_uses - results:
            raise AnthropicError(
                f"{where}: `tool_use` ids were found without `tool_result` blocks immediately "
                f"after: {sorted(tool_uses - results)[0]}"
            )
        tool_uses = {b["id"] for b in blocks if b["type"] == "tool_use"}
    _check_tools(body.get("tools"), body.get("tool_choice"))


def _blocks(blocks: Any, where: str, allowed: set[str]) -> None:
    if not isinstance(blocks, list):
        raise AnthropicError(f"{where}: Input should be a valid list")
    for j, block in enumerate(blocks):
        at = f"{where}.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in allowed:
            raise AnthropicError(f"{at}.type: Input tag {kind!r} is not allowed here")
        required, optional = _BLOCK_FIELDS[kind]
        fields = set(block) - {"type"}
        if required - fields:
            raise AnthropicError(f"{at}.{sorted(required - fields)[0]}: Field required")
        if fields - required - optional:
            raise AnthropicError(f"{at}.{sorted(fields - required - optional)[0]}: Extra inputs")
        if kind == "text" and (not isinstance(block["text"], str) or not block["text"].strip()):
            raise AnthropicError(f"{at}.text: text content blocks must contain non-whitespace text")
        if kind == "image":
            _image(block["source"], f"{at}.source")
        if kind == "tool_use" and not isinstance(block["input"], dict):
            raise AnthropicError(f"{at}.input: Input should be a valid dictionary")
        if kind == "tool_result" and isinstance(block.get("content"), list):
            _blocks(block["content"], f"{at}.content", {"text", "image"})


def _image(source: Any, where: str) -> None:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        if set(source) != {"type", "media_type", "data"}:
            raise AnthropicError(f"{where}: base64 needs exactly media_type and data")
        if source["media_type"] not in _IMAGE_TYPES:
            raise AnthropicError(
                f"{where}.media_type: Input should be one of {sorted(_IMAGE_TYPES)}"
            )
    elif kind == "url":
        if set(source) != {"type", "url"}:
            raise AnthropicError(f"{where}: url needs exactly url")
    else:
        raise AnthropicError(f"{where}.type: Input tag {kind!r} is not allowed here")


def _check_tools(tools: Any, choice: Any) -> None:
    names = []
    if tools is not None:
        if not isinstance(tools, list):
            raise AnthropicError("tools: Input should be a valid list")
        for k, tool in enumerate(tools):
            if not isinstance(tool, dict) or set(tool) - {
                "name", "description", "input_schema", "cache_control", "type",
            }:  # fmt: skip
                raise AnthropicError(f"tools.{k}: Extra inputs are not permitted")
            if not isinstance(tool.get("name"), str) or not _TOOL_NAME.match(tool["name"]):
                raise AnthropicError(f"tools.{k}.name: String should match {_TOOL_NAME.pattern}")
            schema = tool.get("input_schema")
            if not isinstance(schema, dict) or schema.get("type") != "object":
                raise AnthropicError(f"tools.{k}.input_schema: type must be object")
            names.append(tool["name"])
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise AnthropicError("tool_choice.type: Input tag is not allowed")
    if kind == "tool" and choice.get("name") not in names:
        raise AnthropicError(f"tool_choice.name: no tool named {choice.get('name')!r}")
    if set(choice) - {"type", "name", "disable_parallel_tool_use"}:
        raise AnthropicError("tool_choice: Extra inputs are not permitted")


# -- the answer ---------------------------------------------------------------------------------


def _prompt_tokens(body: dict[str, Any]) -> int:
    return max(1, estimate_tokens(len(orjson.dumps([body.get("system"), body["messages"]]))))


def _forced_tool(body: dict[str, Any]) -> str | None:
    """The tool the request makes the model call (tool_choice any or tool), if any."""
    choice, tools = body.get("tool_choice") or {}, body.get("tools") or []
    if choice.get("type") == "tool":
        return str(choice["name"])
    if choice.get("type") == "any" and tools:
        return str(tools[0]["name"])
    return None


def _usage(prompt: int, output: int) -> dict[str, int]:
    return {
        "input_tokens": prompt,
        "output_tokens": output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _event(payload: dict[str, Any]) -> bytes:
    return b"event: " + payload["type"].encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


async def messages(
    request: web.Request, ctx: RequestSettings, body: Any, stall_seconds: float
) -> web.StreamResponse:
    try:
        check_headers(request.headers)
        check_request(body)
    except AnthropicError as err:
        return error_response(err)
    early = await _fault_before(request, ctx.fault, stall_seconds)
    if early is not None:
        return early
    model = body["model"]
    count = min(ctx.tokens, body["max_tokens"])
    stop = "max_tokens" if count < ctx.tokens else "end_turn"
    prompt = _prompt_tokens(body)
    tool = _forced_tool(body)
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    if not body.get("stream"):
        await pause(request, ctx.ttft)
        if tool is not None:
            blocks = [{"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": tool,
                       "input": {}}]  # fmt: skip
            stop, count = "tool_use", 1
        else:
            blocks = [{"type": "text", "text": ctx.text or content(count)}]
        return json_response(
            {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": blocks,
                "stop_reason": stop,
                "stop_sequence": None,
                "usage": _usage(prompt, count),
            }
        )
    return await _stream(request, ctx, stall_seconds, model, message_id, prompt, count, stop, tool)


async def _stream(
    request: web.Request,
    ctx: RequestSettings,
    stall_seconds: float,
    model: str,
    message_id: str,
    prompt: int,
    count: int,
    stop: str,
    tool: str | None,
) -> web.StreamResponse:
    response, out, first_at = await open_event_stream(request, ctx.ttft, ctx.fault, stall_seconds)
    start: dict[str, Any] = {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": _usage(prompt, 1),
    }  # fmt: skip
    await out.send(_event({"type": "message_start", "message": start}))
    if tool is None:
        await out.send(_event({"type": "content_block_start", "index": 0,
                               "content_block": {"type": "text", "text": ""}}))  # fmt: skip
        await out.send(_event({"type": "ping"}))
        if ctx.text is not None:
            pieces = text_pieces(ctx.text, ctx.chunk_chars)
        else:
            pieces = word_pieces(count)
        for i, piece in enumerate(pieces or [""]):
            if ctx.tokens_per_second > 0 and i:
                await sleep_until(request, first_at + out.stalled + i / ctx.tokens_per_second)
            delta = {"type": "text_delta", "text": piece}
            await out.send(_event({"type": "content_block_delta", "index": 0, "delta": delta}))
        await out.send(_event({"type": "content_block_stop", "index": 0}))
    else:
        # A forced tool choice: the model answers with the call alone (as Anthropic's do),
        # its input in two JSON pieces.
        block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": tool,
                 "input": {}}  # fmt: skip
        await out.send(_event({"type": "content_block_start", "index": 0, "content_block": block}))
        for piece in ('{"fake": ', '"input"}'):
            delta = {"type": "input_json_delta", "partial_json": piece}
            await out.send(_event({"type": "content_block_delta", "index": 0, "delta": delta}))
        await out.send(_event({"type": "content_block_stop", "index": 0}))
        stop, count = "tool_use", 1
    usage = {"output_tokens": count} if not ctx.no_usage else {}
    await out.send(_event({"type": "message_delta", "usage": usage,
                           "delta": {"stop_reason": stop, "stop_sequence": None}}))  # fmt: skip
    await out.send(_event({"type": "message_stop"}), last=True)
    await response.write_eof()
    return response


async def _fault_before(
    request: web.Request, fault: Fault | None, stall_seconds: float
) -> web.Response | None:
    if fault is None or fault.after is not None:
        return None
    if fault.kind == "429":
        err = AnthropicError("Rate limited (injected by fake-llm)", "rate_limit_error", 429)
        return error_response(err, {"retry-after": "1"})
    if fault.kind == "500":
        return error_response(AnthropicError("Internal error (injected)", "api_error", 500))
    if fault.kind == "503":
        return error_response(AnthropicError("Overloaded (injected)", "overloaded_error", 529))
    if fault.kind == "reset":
        reset_connection(request)
    await pause(request, stall_seconds)
    return None
