"""Anthropic's Messages API (`POST /v1/messages`: the `anthropic` SDKs, Claude Code) served by a
backend that speaks OpenAI's chat completions: the request translated to a chat completions
body, the chat completion and its chunk stream back to Anthropic's message and event stream.
The other direction, an OpenAI client served by Anthropic, is providers/anthropic.py.

The request. A shape chat completions cannot carry is refused with a 400 naming the parameter
(`messages[2].content[0].type`, `tools[1].type`, `top_k`), never served differently than asked;
a body part that does not have the shape Anthropic's API gives it is refused whole.
- `model` is kept, `max_tokens` is `max_completion_tokens`; a stream asks for its usage report
  (`stream_options.include_usage`). `stop_sequences` is `stop`, `metadata.user_id` is `user`,
  `temperature` and `top_p` go as they are. `output_config.format` (a JSON schema) is OpenAI's
  `response_format` `json_schema`, strict, as Anthropic's structured outputs are. A parameter
  set to null is one not set.
- `system` (a string or text blocks) is one leading system message, its texts joined by a
  blank line.
- A user turn: text blocks are text parts, images (base64 or URL) are `image_url` parts (a
  base64 one as a `data:` URL), a base64 PDF document is OpenAI's `file` part, a plain-text
  document a text part. Its `tool_result` blocks are `tool` messages, one each, in order, ahead
  of the rest of the turn (OpenAI wants them straight after the assistant's tool calls); a
  tool message holds text only, so a tool result's images (and PDFs) follow in the turn's user
  message, ahead of the turn's own parts.
- An assistant turn: its texts are the content, its `tool_use` blocks the tool calls (content
  None when it only calls tools).
- A custom tool is a function (`input_schema` its parameters, `strict` kept); `tool_choice`
  auto, any, tool, none is "auto", "required", the function, "none", and
  `disable_parallel_tool_use` is `parallel_tool_calls: false` (without tools, auto and none
  are left out: OpenAI refuses a tool_choice without tools).
- Blank text is left out (servers refuse empty parts, Anthropic itself refuses blank text
  blocks); a turn left with nothing is not sent.
- Dropped, as they do not change what the model is asked: `cache_control` (anywhere: chat
  backends have no prompt-cache control; they cache what they cache), earlier turns'
  `thinking` and `redacted_thinking` blocks (chat completions has no place for a turn's
  reasoning, and their signatures mean nothing to another model), the request's `thinking` and
  `output_config.effort` (the chat backend reasons as it is configured to), `service_tier`,
  `speed`, `diagnostics`, `user_profile_id`, `workspace_id` (Anthropic's account and serving
  options), `context_management` (Anthropic's clearing of old tool results from a long
  context: the chat backend gets the context whole, as coding agents send it; one too long
  for it is its 400), a text block's `citations` (what an earlier answer cited), a document's
  `title` and `context`.
- Refused: `top_k` (OpenAI's API has none); `container`, `mcp_servers`, `inference_geo`
  (Anthropic's platform does these); Anthropic's built-in tools (web search, bash, text editor,
  computer use, code execution, ...: the backend does not run them); a tool's `defer_loading`,
  `input_examples` and callers other than `direct` (Anthropic's tool
  search, the examples it shows the model, its programmatic calling); content blocks of
  Anthropic's server tools, search results, container uploads, files by id, PDFs by URL;
  documents with `citations` enabled; any parameter the Messages API reference does not list.
- An assistant turn that ends the conversation (Anthropic's prefill) goes as an assistant
  message: what a chat backend makes of it (a continuation, or an answer after it) is its own.

The answer: only the first choice. Its reasoning (`reasoning_content`, or `reasoning`, vLLM's
newer name) is a `thinking` block with an empty signature (there is none to give), then its
text (and an OpenAI `refusal`'s text) a `text` block, then each tool call a `tool_use` block.
A tool call's arguments are its `input`: an empty text is `{}`, a JSON object is itself, and
anything else (JSON that is not an object, text that is not JSON) is `{"_raw": the text}`, so
the client sees what the model produced and its tool's schema check refuses it (the model then
hears why), rather than getting an invented `{}`. The finish reason is the stop reason
(STOP_REASONS), a stop string the server names (vLLM's `stop_reason`) is `stop_sequence`, a
refusal's plain stop is `refusal`. The usage: `input_tokens` the prompt less its cached part,
`cache_read_input_tokens` the cached part, `cache_creation_input_tokens` 0 (OpenAI reports no
cache writes), so that providers/anthropic.py's `usage` reads back the backend's prompt and
cached counts; a completion without usage reports zeros (Anthropic's shape needs the object;
the gateway counts such an answer itself).

The stream: OpenAI's chunks to Anthropic's events, `event: <type>` and its `data:`, in the
order Anthropic's streaming reference gives: `message_start` (usage: the gateway's prompt
count) and a `ping` at the first chunk; each content block as `content_block_start`, its deltas
(`thinking_delta`, `text_delta`, `input_json_delta` with the tool arguments' pieces as they
come) and `content_block_stop`, a new block whenever the kind changes (reasoning, text, one
tool call, another); at the finish the open block closes, but `message_delta` (stop reason,
usage) and `message_stop` wait for the usage chunk, or `[DONE]`, or the end of the body
(`end`). Without the backend's usage, the output is estimated from what was produced (4
characters a token, rounded up) and the input is the gateway's count; `[DONE]` or the usage
chunk before any finish ends the message as `end_turn`. An OpenAI error chunk is Anthropic's
`error` event, and the last (its type from the OpenAI error's type, else from the HTTP status
vLLM gives as its code). Tool arguments go as they come, unchecked: arguments that are not JSON
reach the SDK as Claude's malformed ones would, and it says so. The piece of a tool call whose
block was closed already (a server interleaving its calls) goes to that block's index, where
the SDKs gather it.

References: Anthropic's Messages API, streaming and errors reference; OpenAI's chat completions
API (messages, content parts, tool calls, the chunk stream).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import orjson

from ...errors import GatewayError, bad_request
from ...sse import SSEParser
from ...usage import Usage
from ..base import Endpoint
from ..openai.answer import usage as chat_usage
from .answer import error_type

# OpenAI's finish reasons as Anthropic's stop reasons: for each, the stop reason that
# providers/anthropic.py's FINISH_REASONS reads back as it (that map is many to one: it cannot
# be inverted, the tests hold the two together). Any other: end_turn.
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",  # OpenAI's deprecated single function call
    "content_filter": "refusal",
}
# The input of a tool call whose arguments are not a JSON object.
RAW_ARGUMENTS = "_raw"
# A PDF document as OpenAI's file part: it needs a name, which Anthropic's document has not.
PDF_FILENAME = "document.pdf"
# The JSON schema of `output_config.format`, as OpenAI's response_format names it.
OUTPUT_FORMAT_NAME = "output"

# The Messages API's parameters (its reference) that are translated.
_TAKEN = frozenset(
    {
        "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
        "temperature", "top_p", "tools", "tool_choice", "output_config",
    }
)  # fmt: skip
# Those that do not change what the model is asked (the module's docstring says why).
_DROPPED = frozenset(
    {
        "thinking", "service_tier", "speed", "cache_control", "diagnostics", "user_profile_id",
        "workspace_id", "context_management",
    }
)  # fmt: skip
# Those the chat backend has no counterpart for: why, for the refusal.
_REFUSED = {
    "top_k": "OpenAI's chat completions have no top_k",
    "container": "containers are Anthropic's code execution",
    "mcp_servers": "Anthropic's API calls the MCP servers itself; the model's backend does not",
    "inference_geo": "the backend's region is the gateway's configuration",
}
_BACKEND = "this model's backend (OpenAI chat completions)"


# -- the request ----------------------------------------------------------------------------------


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """A validated Messages body (`model`, a non-empty `messages`, `max_tokens` of at least 1) as
    an OpenAI chat completions body. Raises a 400 for what chat completions cannot carry, and
    for a part of the body that does not have the shape Anthropic's API gives it."""
    with _shape_checked():
        return _chat_request(body)


@contextmanager
def _shape_checked() -> Iterator[None]:
    # providers/openai_request.shape_checked, in the client's API's words.
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise bad_request(
            "The request does not have the shape Anthropic's Messages API defines "
            f"({type(exc).__name__}: {str(exc)[:200]})",
            "invalid_request",
        ) from None


def _chat_request(body: dict[str, Any]) -> dict[str, Any]:
    for key, value in body.items():
        if value is None or key in _TAKEN or key in _DROPPED:
            continue
        why = _REFUSED.get(key, "it is not a Messages API parameter this gateway carries")
        raise bad_request(
            f"`{key}` is not supported by {_BACKEND}: {why}", "unsupported_parameter", key
        )
    out: dict[str, Any] = {"model": body["model"], "messages": _messages(body)}
    out["max_completion_tokens"] = body["max_tokens"]
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("`stream` must be a boolean", "invalid_type", "stream")
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise bad_request(f"`{key}` must be a number", "invalid_type", key)
            out[key] = value
    stops = _stop_sequences(body.get("stop_sequences"))
    if stops:
        out["stop"] = stops
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise bad_request("`metadata` must be an object", "invalid_type", "metadata")
        user = metadata.get("user_id")
        if user is not None and not isinstance(user, str):
            raise bad_request(
                "`metadata.user_id` must be a string", "invalid_type", "metadata.user_id"
            )
        if user:
            out["user"] = user
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], bool(tools), out)
    if body.get("output_config") is not None:
        _output_config(body["output_config"], out)
    return out


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    """A string the API requires at `where.key`."""
    value = obj.get(key)
    if not isinstance(value, str):
        raise bad_request(f"`{where}.{key}` must be a string", "invalid_type", f"{where}.{key}")
    return value


def _stop_sequences(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad_request(
            "`stop_sequences` must be an array of strings", "invalid_type", "stop_sequences"
        )
    return [s for s in value if s]  # an empty stop sequence stops nothing


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    system = _system(body.get("system"))
    if system:
        out.append({"role": "system", "content": system})
    messages = body["messages"]
    if not isinstance(messages, list):
        raise bad_request("`messages` must be an array", "invalid_type", "messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"`{where}` must be an object", "invalid_type", where)
        role = message.get("role")
        content = message.get("content")
        if not isinstance(content, str | list):
            raise bad_request(
                f"`{where}.content` must be a string or an array of content blocks",
                "invalid_type",
                f"{where}.content",
            )
        if role == "user":
            out += _user_turn(content, where)
        elif role == "assistant":
            out += _assistant_turn(content, where)
        else:
            raise bad_request(
                f"`{where}.role` must be 'user' or 'assistant', not {role!r}",
                "invalid_value",
                f"{where}.role",
            )
    return out


def _system(system: Any) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    if not isinstance(system, list):
        raise bad_request(
            "`system` must be a string or an array of text blocks", "invalid_type", "system"
        )
    texts = []
    for j, block in enumerate(system):
        if block.get("type") != "text":
            raise bad_request(
                f"`system[{j}]`: the system prompt takes text blocks only",
                "invalid_value",
                f"system[{j}].type",
            )
        texts.append(_string(block, "text", f"system[{j}]"))
    return "\n\n".join(t for t in texts if t.strip())


def _unsupported_block(kind: Any, where: str) -> GatewayError:
    return bad_request(
        f"`{where}`: content blocks of type {kind!r} are not supported here by {_BACKEND}",
        "unsupported_value",
        f"{where}.type",
    )


def _user_turn(content: str | list[Any], where: str) -> list[dict[str, Any]]:
    """A user turn's messages: its tool results' tool messages, then the rest as one user
    message (none when nothing is left)."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}] if content.strip() else []
    tool_messages: list[dict[str, Any]] = []
    carried: list[dict[str, Any]] = []  # what of the tool results a tool message cannot take
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type")
        if kind == "tool_result":
            message, extra = _tool_result(block, at)
            tool_messages.append(message)
            carried += extra
        elif kind == "text":
            text = _string(block, "text", at)
            if text.strip():
                parts.append({"type": "text", "text": text})
        elif kind in ("image", "document"):
            parts.append(_media(block, at))
        else:
            raise _unsupported_block(kind, at)
    parts = carried + parts
    return tool_messages + ([{"role": "user", "content": parts}] if parts else [])


def _tool_result(block: dict[str, Any], where: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A tool_result as a tool message, and its parts that are not text."""
    call_id = _string(block, "tool_use_id", where)
    content = block.get("content")
    texts: list[str] = []
    carried: list[dict[str, Any]] = []
    if isinstance(content, str):
        texts.append(content)
    elif content is not None:
        if not isinstance(content, list):
            raise bad_request(
                f"`{where}.content` must be a string or an array of content blocks",
                "invalid_type",
                f"{where}.content",
            )
        for k, part in enumerate(content):
            at = f"{where}.content[{k}]"
            kind = part.get("type")
            if kind == "text":
                texts.append(_string(part, "text", at))
            elif kind in ("image", "document"):
                media = _media(part, at)
                if media["type"] == "text":
                    texts.append(media["text"])
                else:
                    carried.append(media)
            else:
                raise _unsupported_block(kind, at)
    text = "\n\n".join(t for t in texts if t.strip())
    if block.get("is_error") is True:
        # A tool message has no error flag: the model reads that the call failed in its text,
        # as it reads it in Anthropic's rendering of an error result.
        text = f"Error: {text}" if text else "Error"
    return {"role": "tool", "tool_call_id": call_id, "content": text}, carried


def _media(block: dict[str, Any], where: str) -> dict[str, Any]:
    """An image or document block as OpenAI's content part."""
    source = block.get("source")
    if not isinstance(source, dict):
        raise bad_request(f"`{where}.source` must be an object", "invalid_type", f"{where}.source")
    kind = source.get("type")
    at = f"{where}.source"
    if block["type"] == "image":
        if kind == "base64":
            media_type = _string(source, "media_type", at)
            url = f"data:{media_type};base64,{_string(source, 'data', at)}"
        elif kind == "url":
            url = _string(source, "url", at)
        else:
            raise _unsupported_source(kind, at, "images as base64 data or a URL")
        return {"type": "image_url", "image_url": {"url": url}}
    citations = block.get("citations")
    if isinstance(citations, dict) and citations.get("enabled"):
        raise bad_request(
            f"`{where}.citations`: citations are not supported by {_BACKEND}",
            "unsupported_value",
            f"{where}.citations",
        )
    if kind == "base64" and source.get("media_type") == "application/pdf":
        data = f"data:application/pdf;base64,{_string(source, 'data', at)}"
        return {"type": "file", "file": {"filename": PDF_FILENAME, "file_data": data}}
    if kind == "text":
        return {"type": "text", "text": _string(source, "data", at)}
    raise _unsupported_source(kind, at, "documents as base64 PDF data or plain text")


def _unsupported_source(kind: Any, where: str, takes: str) -> GatewayError:
    return bad_request(
        f"`{where}.type` {kind!r} is not supported by {_BACKEND}: it takes {takes}",
        "unsupported_value",
        f"{where}.type",
    )


def _assistant_turn(content: str | list[Any], where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "assistant", "content": content}] if content.strip() else []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type")
        if kind == "text":
            texts.append(_string(block, "text", at))
        elif kind == "tool_use":
            arguments = block.get("input")
            if not isinstance(arguments, dict):
                raise bad_request(f"`{at}.input` must be an object", "invalid_type", f"{at}.input")
            calls.append(
                {
                    "id": _string(block, "id", at),
                    "type": "function",
                    "function": {
                        "name": _string(block, "name", at),
                        "arguments": orjson.dumps(arguments).decode(),
                    },
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # chat completions has no place for an earlier turn's reasoning
        else:
            raise _unsupported_block(kind, at)
    text = "".join(texts)
    if not text.strip():
        if not calls:
            return []
        text = ""
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message]


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_request("`tools` must be an array", "invalid_type", "tools")
    out = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise bad_request(
                f"`{at}.type` {kind!r}: {_BACKEND} does not run Anthropic's built-in tools "
                "(web search, web fetch, bash, text editor, computer use, code execution, "
                "memory, tool search); declare the tool with a name and an input_schema",
                "unsupported_value",
                f"{at}.type",
            )
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise bad_request(
                f"`{at}.input_schema` must be an object", "invalid_type", f"{at}.input_schema"
            )
        # What only Anthropic's tool search and programmatic tool calling do, and examples
        # Anthropic shows the model (a chat backend would not see them).
        callers = tool.get("allowed_callers")
        for key, used in (
            ("defer_loading", bool(tool.get("defer_loading"))),
            ("allowed_callers", callers is not None and callers != ["direct"]),
            ("input_examples", bool(tool.get("input_examples"))),
        ):
            if used:
                raise bad_request(
                    f"`{at}.{key}` is not supported by {_BACKEND}",
                    "unsupported_parameter",
                    f"{at}.{key}",
                )
        function: dict[str, Any] = {"name": _string(tool, "name", at)}
        description = tool.get("description")
        if description is not None:
            function["description"] = _string(tool, "description", at)
        function["parameters"] = schema
        if tool.get("strict") is True:
            function["strict"] = True
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, has_tools: bool, out: dict[str, Any]) -> None:
    if not isinstance(choice, dict):
        raise bad_request("`tool_choice` must be an object", "invalid_type", "tool_choice")
    kind = choice.get("type")
    value: Any
    if kind == "auto":
        value = "auto"
    elif kind == "any":
        value = "required"
    elif kind == "tool":
        value = {"type": "function", "function": {"name": _string(choice, "name", "tool_choice")}}
    elif kind == "none":
        value = "none"
    else:
        raise bad_request(
            f"`tool_choice.type` {kind!r} is not one of auto, any, tool, none",
            "invalid_value",
            "tool_choice.type",
        )
    if not has_tools:
        if kind in ("any", "tool"):
            raise bad_request(
                f"`tool_choice` {kind!r} needs `tools`", "invalid_value", "tool_choice"
            )
        # auto and none mean what no tools mean; OpenAI refuses a tool_choice without tools.
        return
    out["tool_choice"] = value
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        out["parallel_tool_calls"] = False


def _output_config(config: Any, out: dict[str, Any]) -> None:
    if not isinstance(config, dict):
        raise bad_request("`output_config` must be an object", "invalid_type", "output_config")
    for key, value in config.items():
        if value is None or key == "effort":
            continue  # effort: the chat backend reasons as it is configured to (as `thinking`)
        if key != "format":
            raise bad_request(
                f"`output_config.{key}` is not supported by {_BACKEND}",
                "unsupported_parameter",
                f"output_config.{key}",
            )
        if not isinstance(value, dict) or value.get("type") != "json_schema":
            raise bad_request(
                "`output_config.format.type` must be 'json_schema'",
                "invalid_value",
                "output_config.format.type",
            )
        schema = value.get("schema")
        if not isinstance(schema, dict):
            raise bad_request(
                "`output_config.format.schema` must be an object",
                "invalid_type",
                "output_config.format.schema",
            )
        # Strict: Anthropic's structured outputs hold the answer to the schema; a backend that
        # cannot do so refuses rather than answers outside it.
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": OUTPUT_FORMAT_NAME, "schema": schema, "strict": True},
        }


# -- the answer -----------------------------------------------------------------------------------


def message_id(completion_id: Any) -> str:
    """The answer's id: the completion's, as Anthropic's ids start (a new one without)."""
    if isinstance(completion_id, str) and completion_id:
        return f"msg_{completion_id}"
    return f"msg_{uuid.uuid4().hex}"


def tool_input(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments (JSON text) as a tool_use block's `input` (module docstring)."""
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {RAW_ARGUMENTS: arguments}


def usage_object(report: Usage | None) -> dict[str, int]:
    """Anthropic's usage of the backend's report: the cached part of the prompt apart (none:
    zeros)."""
    if report is None:
        return {
            "input_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 0,
        }
    cached = min(report.cached_tokens, report.prompt_tokens)
    return {
        "input_tokens": report.prompt_tokens - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": report.completion_tokens,
    }


def stop_reason(choice: dict[str, Any], refused: bool) -> tuple[str, str | None]:
    """A choice's (stop_reason, stop_sequence)."""
    finish = choice.get("finish_reason")
    reason = STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"
    # vLLM names the stop string that ended a choice (an int there is a stop token's id).
    matched = choice.get("stop_reason")
    if finish == "stop" and isinstance(matched, str) and matched:
        return "stop_sequence", matched
    if refused and reason == "end_turn":
        return "refusal", None
    return reason, None


def _reasoning(source: dict[str, Any]) -> str:
    for key in ("reasoning_content", "reasoning"):
        value = source.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # parts, as some servers answer
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def messages_answer(completion: dict[str, Any], model: str) -> dict[str, Any]:
    """A 2xx chat completion as a Messages answer naming `model`."""
    choices = completion.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    choice = choice if isinstance(choice, dict) else {}
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    content: list[dict[str, Any]] = []
    reasoning = _reasoning(message)
    if reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    refusal = message.get("refusal")
    refusal = refusal if isinstance(refusal, str) else ""
    text = _text(message.get("content")) + refusal
    if text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        if not isinstance(call, dict):
            continue
        call_id = call.get("id")
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        name = function.get("name")
        content.append(
            {
                "type": "tool_use",
                "id": call_id if isinstance(call_id, str) and call_id else _tool_use_id(),
                "name": name if isinstance(name, str) else "",
                "input": tool_input(function.get("arguments")),
            }
        )
    reason, sequence = stop_reason(choice, bool(refusal))
    return {
        "id": message_id(completion.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage_object(chat_usage(completion.get("usage"))),
    }


def _tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex}"


# -- errors ---------------------------------------------------------------------------------------

# An OpenAI error's type as Anthropic's (the types OpenAI and providers/anthropic.py give).
_OPENAI_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "rate_limit_error": "rate_limit_error",
    "insufficient_quota": "billing_error",
    "timeout": "timeout_error",
    "server_error": "api_error",
}


def chunk_error_type(err: dict[str, Any]) -> str:
    """Anthropic's error type for the error object of an OpenAI error chunk: by its type, else
    by the HTTP status in its code, else api_error (the backend failed: Anthropic's 500)."""
    kind = err.get("type")
    known = _OPENAI_TYPES.get(kind) if isinstance(kind, str) else None
    if known:
        return known
    # vLLM's error chunk has the HTTP status as its code (and a Python exception's name as its
    # type).
    code = err.get("code")
    if isinstance(code, str) and code.isdigit():
        code = int(code)
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600:
        return error_type(code)
    return "api_error"


# -- the event stream -----------------------------------------------------------------------------


def sse_event(kind: str, payload: dict[str, Any]) -> bytes:
    """One event of Anthropic's stream."""
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class MessagesStream:
    """OpenAI's chunk stream, in pieces split anywhere, to Anthropic's events (base.ClientStream;
    the rules: the module's docstring). `usage`: the backend's report, once it came;
    `error_code`: the code (else the type) of the error chunk the backend ended with."""

    def __init__(self, model: str, prompt_tokens: int) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.parser = SSEParser()
        self.started = False  # message_start sent
        self.done = False  # message_stop or an error sent: nothing more
        self.blocks = 0  # content blocks opened
        self.index = -1  # the last one's index
        self.open: tuple[str, int] | None = None  # the open block's kind (a tool: its number)
        self.tool_blocks: list[int] = []  # each tool call's block index, in the calls' order
        self.tool_ids: dict[str, int] = {}  # tool call id -> its number in tool_blocks
        self.numbers: dict[int, int] = {}  # OpenAI's tool call index -> the latest such call
        self.finish: tuple[str, str | None] | None = None  # (stop reason, sequence) at finish
        self.refused = False
        self.produced = 0  # characters of reasoning, text and tool arguments
        self.usage: Usage | None = None
        self.error_code: str | None = None

    @property
    def failed(self) -> bool:
        return self.error_code is not None

    def feed(self, piece: bytes) -> bytes:
        if self.done:
            return b""  # what follows the message's end or an error is not the client's
        out = bytearray()
        for data in self.parser.feed(piece):
            if self.done:
                break
            out += self._data(data)
        return bytes(out)

    def end(self) -> bytes:
        if self.done or self.finish is None:
            return b""  # closed already, or cut before its finish: the client sees it cut
        return self._stop()

    def _data(self, data: bytes) -> bytes:
        if data.strip() == b"[DONE]":
            return self._stop()
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return b""  # not a chunk: nothing to translate
        if not isinstance(chunk, dict):
            return b""
        err = chunk.get("error")
        if isinstance(err, dict | str):
            return self._error(err)
        if chunk.get("object") == "error":  # vLLM's older error chunk: the error object itself
            return self._error(chunk)
        out = self._start(chunk.get("id"))
        report = chat_usage(chunk.get("usage"))
        if report is not None:
            self.usage = report  # cumulative where a server reports it in every chunk
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    out += self._choice(choice)
            if not choices and report is not None:
                out += self._stop()  # the usage chunk: the chat stream's last word
        return out

    def _start(self, chunk_id: Any) -> bytes:
        if self.started:
            return b""
        self.started = True
        message: dict[str, Any] = {
            "id": message_id(chunk_id),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self.prompt_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 0,
            },
        }
        return sse_event("message_start", {"type": "message_start", "message": message}) + (
            sse_event("ping", {"type": "ping"})
        )

    def _choice(self, choice: dict[str, Any]) -> bytes:
        out = bytearray()
        delta = choice.get("delta")
        if isinstance(delta, dict):
            reasoning = _reasoning(delta)
            if reasoning:
                out += self._text(("thinking", 0), reasoning)
            for key in ("content", "refusal"):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    self.refused |= key == "refusal"
                    out += self._text(("text", 0), text)
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    out += self._tool(call)
        if isinstance(choice.get("finish_reason"), str) and choice["finish_reason"]:
            out += self._close()
            self.finish = stop_reason(choice, self.refused)
        return bytes(out)

    def _open(self, kind: tuple[str, int], block: dict[str, Any]) -> bytes:
        out = self._close()
        self.open = kind
        self.index = self.blocks
        self.blocks += 1
        return out + sse_event(
            "content_block_start",
            {"type": "content_block_start", "index": self.index, "content_block": block},
        )

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return sse_event("content_block_stop", {"type": "content_block_stop", "index": self.index})

    @staticmethod
    def _delta(index: int, delta: dict[str, Any]) -> bytes:
        return sse_event(
            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        )

    def _text(self, kind: tuple[str, int], text: str) -> bytes:
        self.produced += len(text)
        out = b""
        if kind[0] == "thinking":
            if self.open != kind:
                out = self._open(kind, {"type": "thinking", "thinking": "", "signature": ""})
            return out + self._delta(self.index, {"type": "thinking_delta", "thinking": text})
        if self.open != kind:
            out = self._open(kind, {"type": "text", "text": ""})
        return out + self._delta(self.index, {"type": "text_delta", "text": text})

    def _call(self, call_id: str | None, index: Any) -> tuple[int, bool]:
        """The tool call a delta continues (its number in the stream), or a new one (True)."""
        if call_id is not None and call_id in self.tool_ids:
            return self.tool_ids[call_id], False
        numbered = isinstance(index, int) and not isinstance(index, bool)
        # A new id is a new call (a server may number each call 0, or not at all), as is a
        # call number not seen yet.
        if call_id is not None or not self.tool_blocks or (numbered and index not in self.numbers):
            return len(self.tool_blocks), True
        if numbered:
            return self.numbers[index], False
        # Neither id nor number: the call under way.
        if self.open is not None and self.open[0] == "tool":
            return self.open[1], False
        return len(self.tool_blocks) - 1, False

    def _tool(self, call: dict[str, Any]) -> bytes:
        call_id = call.get("id") if isinstance(call.get("id"), str) and call["id"] else None
        index = call.get("index")
        number, new = self._call(call_id, index)
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        out = b""
        if new:
            name = function.get("name")
            call_id = call_id or _tool_use_id()
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": call_id,
                "name": name if isinstance(name, str) else "",
                "input": {},
            }
            out = self._open(("tool", number), block)
            self.tool_blocks.append(self.index)
            self.tool_ids[call_id] = number
            if isinstance(index, int) and not isinstance(index, bool):
                self.numbers[index] = number
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            self.produced += len(arguments)
            delta = {"type": "input_json_delta", "partial_json": arguments}
            out += self._delta(self.tool_blocks[number], delta)
        return out

    def _stop(self) -> bytes:
        """message_delta and message_stop: the message is whole."""
        if self.done:
            return b""
        out = self._start(None) + self._close()
        self.done = True
        reason, sequence = self.finish or ("end_turn", None)
        if self.usage is not None:
            report = usage_object(self.usage)
        else:  # the backend reported none: the gateway's prompt count, the output estimated
            report = {
                "input_tokens": self.prompt_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": -(-self.produced // 4),
            }
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            # The totals: the SDKs take each as the message's (message_start's are overwritten).
            "usage": {"output_tokens": report.pop("output_tokens"), **report},
        }
        return (
            out
            + sse_event("message_delta", delta)
            + sse_event("message_stop", {"type": "message_stop"})
        )

    def _error(self, err: dict[str, Any] | str) -> bytes:
        self.done = True
        if isinstance(err, str):
            err = {"message": err}
        message = err.get("message")
        if not isinstance(message, str) or not message:
            message = "The model's backend failed"
        # Its code, else its type (vLLM's code is the HTTP status: its type says more).
        code, kind = err.get("code"), err.get("type")
        self.error_code = next(
            (v for v in (code, kind) if isinstance(v, str) and v),
            str(code) if isinstance(code, int) else "error",
        )
        error = {"type": chunk_error_type(err), "message": message}
        return sse_event("error", {"type": "error", "error": error})


# -- the bridge -----------------------------------------------------------------------------------


class MessagesBridge:
    """Anthropic's Messages API over chat completions (base.ChatBridge)."""

    def request(self, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        return chat_request(body)  # the Messages API's one chat endpoint: /v1/messages

    def answer(
        self, completion: dict[str, Any], model: str, request: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        return messages_answer(completion, model)  # a Message repeats nothing of the request

    def stream(
        self, model: str, prompt_tokens: int, request: Mapping[str, Any] | None = None
    ) -> MessagesStream:
        return MessagesStream(model, prompt_tokens)


BRIDGE = MessagesBridge()
