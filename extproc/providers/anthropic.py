"""Anthropic's Messages API (`POST /v1/messages`) behind OpenAI's chat completions: the
request translated to a Messages request, the answer and its event stream back to OpenAI's
shapes, Anthropic's errors to OpenAI's.

Nothing is dropped without a word: a parameter Anthropic has no equivalent for is refused
with a 400 naming it (unless it has its neutral value), and what Anthropic returns beyond
OpenAI's shape (thinking) is passed as `reasoning_content`, the field OpenAI-compatible servers
use for it. `max_completion_tokens` / `max_tokens` (the former when both are set) is
`max_tokens`, which Anthropic requires: absent, the backend's `max_tokens`; a value below 1 is
refused (400 naming it, as OpenAI refuses it), never replaced by the default. What every
translation reads the same way is read in openai_request.py, OpenAI's answers are built in
openai_answer.py. References: Anthropic's Messages API and streaming docs; OpenAI's chat
completions API.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import GatewayError, bad_request
from ..sse import SSEParser
from ..usage import Usage
from . import openai_answer, openai_request

if TYPE_CHECKING:
    from ..config import ResolvedTarget
    from .base import Embeddings

# The provider as the client's error messages name it.
PROVIDER_NAME = "Anthropic"
PATH = "/v1/messages"
API_VERSION = "2023-06-01"
# The credential header Anthropic takes (the backend's `auth_header`), and its version header.
AUTH_HEADER = "x-api-key"
VERSION_HEADER = "anthropic-version"

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
    "model_context_window_exceeded": "length",
}


# -- the request --------------------------------------------------------------------------------


def messages_request(body: dict[str, Any], model: str, default_max_tokens: int) -> dict[str, Any]:
    """A validated OpenAI chat completions body as a Messages request for `model` (the
    provider's name). Raises a 400 for what Anthropic cannot do as asked, and for a part of
    the body that does not have the shape OpenAI's API gives it."""
    with openai_request.shape_checked():
        return _messages_request(body, model, default_max_tokens)


def _messages_request(body: dict[str, Any], model: str, default_max_tokens: int) -> dict[str, Any]:
    # Anthropic takes no OpenAI parameter beyond those every translation takes
    # (openai_request.HANDLED): any other is refused unless it has its neutral value.
    openai_request.check_parameters(body, PROVIDER_NAME)
    system, messages = _messages(body["messages"])
    out: dict[str, Any] = {
        "model": model,
        "max_tokens": openai_request.max_tokens(body, default_max_tokens),
        "messages": messages,
    }
    if system:
        out["system"] = system
    temperature = body.get("temperature")
    if temperature is not None:
        if temperature > 1:
            raise bad_request(
                "`temperature` above 1 is not supported by this model's provider (Anthropic: "
                "0 to 1)",
                "unsupported_value",
                "temperature",
            )
        out["temperature"] = temperature
    top_p = body.get("top_p")
    if top_p is not None and top_p != 1:
        # Recent Claude models take one of the two; 1 is top_p's neutral value (many clients
        # send it with a temperature).
        if "temperature" in out:
            raise bad_request(
                "`temperature` and `top_p` cannot both be set for this model's provider "
                "(Anthropic)",
                "unsupported_value",
                "top_p",
            )
        out["top_p"] = top_p
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("stream"):
        out["stream"] = True
    if body.get("user"):
        out["metadata"] = {"user_id": body["user"]}
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool(t) for t in tools]
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None:
        if choice["type"] != "none" and not tools:
            raise bad_request("`tool_choice` needs `tools`", "invalid_value", "tool_choice")
        out["tool_choice"] = choice
    return out


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise openai_request.unsupported(f"tools[].type={tool.get('type')}", PROVIDER_NAME)
    function = tool["function"]
    out = {
        "name": function["name"],
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        out["description"] = function["description"]
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None and parallel is not False:
        return None
    if choice is None or choice == "auto":
        out: dict[str, Any] = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        out = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise bad_request("`tool_choice` is not one OpenAI defines", "invalid_value", "tool_choice")
    if parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


def _messages(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """(system prompt, the turns): system and developer messages become the system prompt;
    tool results go back in a user turn; consecutive turns of one role are merged, as
    Anthropic reads them."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(
                openai_request.text_only(message.get("content"), f"messages[{i}].content")
            )
            continue
        if role == "user":
            blocks = _blocks(message.get("content"), f"messages[{i}].content")
            turn_role = "user"
        elif role == "assistant":
            blocks = _assistant_blocks(message, i)
            turn_role = "assistant"
        elif role == "tool":
            blocks = [
                {
                    "type": "tool_result",
                    "tool_use_id": message["tool_call_id"],
                    "content": _blocks(message.get("content"), f"messages[{i}].content"),
                }
            ]
            turn_role = "user"
        else:
            raise openai_request.unsupported_role(role, i)
        openai_request.add_turn(turns, turn_role, blocks, "content")
    return "\n\n".join(s for s in system if s), turns


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    # Anthropic refuses a text block of whitespace only (an assistant's "\n\n" before its tool
    # calls is common): content_parts leaves it out.
    return [
        {"type": "text", "text": value} if kind == "text" else _image(value, at)
        for kind, value, at in openai_request.content_parts(content, where)
    ]


def _image(url: str, where: str) -> dict[str, Any]:
    if url.startswith("data:"):
        media_type, data = openai_request.data_url(url, where)
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    return {"type": "image", "source": {"type": "url", "url": url}}


def _assistant_blocks(message: dict[str, Any], i: int) -> list[dict[str, Any]]:
    blocks = _blocks(openai_request.assistant_content(message), f"messages[{i}].content")
    for call in message.get("tool_calls") or ():
        arguments = openai_request.tool_arguments(call, f"messages[{i}].tool_calls")
        blocks.append(
            {
                "type": "tool_use",
                "id": call["id"],
                "name": call["function"]["name"],
                "input": arguments,
            }
        )
    return blocks


# -- the answer ---------------------------------------------------------------------------------


def usage(report: Any) -> Usage | None:
    """Anthropic's usage in OpenAI's terms: the prompt counts the cached input read and the
    input written to the cache too (OpenAI's `prompt_tokens` holds the cached ones), the cached
    reads are `cached_tokens`."""
    if not isinstance(report, dict) or not isinstance(report.get("input_tokens"), int):
        return None
    read = report.get("cache_read_input_tokens") or 0
    written = report.get("cache_creation_input_tokens") or 0
    prompt = report["input_tokens"] + read + written
    completion = report.get("output_tokens") or 0
    return Usage(prompt, completion, prompt + completion, read, cache_write_tokens=written)


def chat_completion(answer: dict[str, Any], model: str) -> dict[str, Any]:
    """A Messages answer as an OpenAI chat completion for the client's `model` name."""
    text: list[str] = []
    thinking: list[str] = []
    calls = []
    for block in answer.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            text.append(block.get("text", ""))
        elif kind == "thinking":
            thinking.append(block.get("thinking", ""))
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            calls.append(openai_answer.tool_call(block["id"], block["name"], arguments))
    message = openai_answer.assistant_message(text, calls, thinking)
    finish = FINISH_REASONS.get(answer.get("stop_reason") or "", "stop")
    return openai_answer.chat_completion(
        answer.get("id", ""),
        model,
        [openai_answer.choice(message, finish)],
        usage(answer.get("usage")),
    )


# -- errors -------------------------------------------------------------------------------------

# Anthropic's error types as OpenAI's (type, status the client gets).
_ERRORS = {
    "invalid_request_error": ("invalid_request_error", None),
    "authentication_error": ("authentication_error", None),
    "permission_error": ("permission_error", None),
    "not_found_error": ("invalid_request_error", None),
    "request_too_large": ("invalid_request_error", 413),
    "rate_limit_error": ("rate_limit_error", 429),
    "billing_error": ("insufficient_quota", None),
    "timeout_error": ("timeout", None),
    "api_error": ("server_error", None),
    # 529: Anthropic is overloaded. Not a status OpenAI clients know: 503, retriable.
    "overloaded_error": ("server_error", 503),
}


def error(status: int, body: bytes) -> GatewayError:
    """An Anthropic error answer as the client's: its status (529 as 503) and message, the
    error's type as the code (rendered in the client's error shape like any refusal)."""
    try:
        parsed = orjson.loads(body)
        err = parsed.get("error") if isinstance(parsed, dict) else None
    except orjson.JSONDecodeError:
        err = None
    kind = err.get("type") if isinstance(err, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    openai_type, fixed = _ERRORS.get(kind or "", ("server_error", None))
    if status == 529:
        fixed = 503
    return GatewayError(
        fixed or status,
        str(message or f"The provider answered {status}"),
        openai_type,
        kind or f"provider_{status}",
    )


# -- the event stream ---------------------------------------------------------------------------


class StreamTranslator:
    """Anthropic's event stream, as it arrives in pieces, to OpenAI's chunk stream: each piece
    in, the OpenAI events it completes out (none is held back longer than its event takes to
    arrive). `include_usage`: end with OpenAI's usage chunk (Anthropic always reports usage;
    it is read either way)."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.parser = SSEParser()
        self.chunks = openai_answer.Chunks(model)  # its id: the message's, at message_start
        self.input: dict[str, Any] = {}
        self.output_tokens = 0
        self.finish_reason: str | None = None
        self.tool_index: dict[int, int] = {}  # Anthropic block index -> OpenAI tool call index
        self.text_parts: list[str] = []
        self.produced = 0  # characters of every delta (text, tool arguments, thinking)
        self.done = False
        self.failed: GatewayError | None = None

    @property
    def usage(self) -> Usage | None:
        if not self.input:
            return None
        return usage({**self.input, "output_tokens": self.output_tokens})

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def partial_usage(self) -> Usage | None:
        """A stream cut before its final usage: the input Anthropic reported at its start,
        the output estimated from what was produced (4 characters a token, or the count it
        reported, whichever is more: over, never under)."""
        if not self.input:
            return None
        output = max(self.output_tokens, -(-self.produced // 4))
        return usage({**self.input, "output_tokens": output})

    def finish(self) -> bytes:
        # message_delta carried the final usage: the report is whole without message_stop.
        self.done = True
        return self.chunks.end(self.usage if self.include_usage else None)

    def feed(self, piece: bytes) -> bytes:
        out = bytearray()
        for data in self.parser.feed(piece):
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue  # not an event of this API: nothing to translate
            if isinstance(event, dict):
                out += b"".join(self._event(event))
        return bytes(out)

    def _event(self, event: dict[str, Any]) -> Iterable[bytes]:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            self.chunks.id = message.get("id", "")
            self.input = {
                k: v for k, v in (message.get("usage") or {}).items() if k != "output_tokens"
            }
            self.output_tokens = (message.get("usage") or {}).get("output_tokens") or 0
            yield self.chunks.delta({"role": "assistant", "content": ""})
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self.tool_index.setdefault(event.get("index", 0), len(self.tool_index))
                call = openai_answer.tool_call(block.get("id", ""), block.get("name", ""), "")
                yield self.chunks.delta({"tool_calls": [{"index": index, **call}]})
            elif block.get("type") == "text" and block.get("text"):
                self.text_parts.append(block["text"])
                yield self.chunks.delta({"content": block["text"]})
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            dtype = delta.get("type")
            self.produced += len(
                delta.get("text") or delta.get("partial_json") or delta.get("thinking") or ""
            )
            if dtype == "text_delta":
                self.text_parts.append(delta.get("text", ""))
                yield self.chunks.delta({"content": delta.get("text", "")})
            elif dtype == "input_json_delta":
                index = self.tool_index.get(event.get("index", 0), 0)
                arguments = {"arguments": delta.get("partial_json", "")}
                yield self.chunks.delta({"tool_calls": [{"index": index, "function": arguments}]})
            elif dtype == "thinking_delta":
                yield self.chunks.delta({"reasoning_content": delta.get("thinking", "")})
        elif kind == "message_delta":
            delta = event.get("delta") or {}
            self.output_tokens = (event.get("usage") or {}).get("output_tokens", self.output_tokens)
            for key in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
                value = (event.get("usage") or {}).get(key)
                if value is not None:
                    self.input[key] = value
            self.finish_reason = FINISH_REASONS.get(delta.get("stop_reason") or "", "stop")
            yield self.chunks.delta({}, self.finish_reason)
        elif kind == "message_stop":
            yield self.finish()
        elif kind == "error":
            err = event.get("error") or {}
            self.failed = error(500, orjson.dumps({"error": err}))
            self.done = True
            yield self.chunks.error(self.failed)
        # ping, content_block_stop, and events added later: nothing to say.


# -- the provider -------------------------------------------------------------------------------


class Anthropic:
    """Anthropic's Messages API as a provider (base.Provider)."""

    name = "anthropic"
    request_headers: Mapping[str, str] = {VERSION_HEADER: API_VERSION}
    # Beta features of Anthropic's API: the OpenAI client's request did not ask for them.
    strip_headers: tuple[str, ...] = ("anthropic-beta",)
    stream_content_type = "text/event-stream"
    embeddings: Embeddings | None = None

    def path(self, target: ResolvedTarget, stream: bool) -> str:
        return f"{target.base_path}{PATH.removeprefix('/v1')}"

    def request(self, target: ResolvedTarget, body: dict[str, Any]) -> dict[str, Any]:
        return messages_request(body, target.provider_model, target.max_tokens)

    def usage(self, answer: dict[str, Any]) -> Usage | None:
        return usage(answer.get("usage"))

    def answer(self, answer: dict[str, Any], model: str) -> dict[str, Any]:
        return chat_completion(answer, model)

    def error(
        self, status: int, body: bytes, headers: Mapping[str, str] | None = None
    ) -> GatewayError:
        return error(status, body)  # Anthropic names its errors in the body only

    def stream(self, model: str) -> StreamTranslator:
        # Anthropic always reports usage; the relay cuts the chunk if not asked for.
        return StreamTranslator(model, include_usage=True)


PROVIDER = Anthropic()
