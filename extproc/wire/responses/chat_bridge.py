"""OpenAI's Responses API (`POST /v1/responses`, the openai SDK's `client.responses.create`)
served by a backend that speaks chat completions only (vLLM, NIM, most self-hosted servers):
the request translated to a chat completions request, the chat completion back to a Response
object, the chunk stream back to the Responses event stream.

Nothing silently changes what the client asked for. A parameter chat completions cannot carry
is refused with a 400 naming it (`unsupported_parameter`, or `unsupported_value` for a value
of it), unless it has no effect on what the model produces:
- refused: `previous_response_id`, `conversation` (the backend keeps no conversation state),
  `background: true` (nothing keeps the response to poll), `prompt` (no stored prompt
  templates), `context_management`, `moderation`, `top_logprobs` above 0 (the events carry no
  log-probabilities), built-in tools (web search, file search, computer use, code
  interpreter, MCP, image generation, custom tools...) and a `tool_choice` naming one or
  limiting the tools (`allowed_tools`), input items other than messages, function calls and
  their outputs (`item_reference`, tool calls of the built-in tools...), files by id
  (`file_id`: the backend has no file store) or URL, and any key the reference does not define;
- dropped: `metadata` (echoed in the answer), `store` (there is no state: the answer says
  `"store": false`), `include` (extra data in the answer: what a chat backend cannot give is
  simply absent), `service_tier`, `stream_options` (obfuscation padding), `max_tool_calls`
  (it counts built-in tool calls, which are refused), the prompt cache's and safety
  identifier's keys (none changes the output), `reasoning.summary` (the backend's reasoning is
  given as it comes), and `truncation` — "disabled" is what a chat backend does anyway, and
  "auto" is taken too: while the input fits, the answer is the same; when it does not, the
  backend refuses it (a 400 the client sees) where OpenAI would drop the earliest items, so
  nothing changes without a word;
- `reasoning` input items (a previous answer's reasoning handed back) are dropped: chat
  completions have no place for earlier reasoning, and the models do not read it back;
- a `developer` message is a `system` message (chat templates of self-hosted models know no
  developer role; OpenAI reads one as the other);
- a function tool's `strict` goes as the client set it. Left out, OpenAI's Responses make the
  function strict (and normalize its schema), chat completions do not: the backend calls it
  best-effort, as most self-hosted backends do whatever is said.

The answer: `answer_for(completion, model, body)` is the Response object with the fields that
repeat the request (tools, tool_choice, temperature, instructions, text, reasoning...) filled
from the client's body — what the caller should use, as it has the body; `answer(completion,
model)` (the ChatBridge protocol's) fills them with the API's defaults. The same holds for
`stream_for` / `stream`. A chat message's reasoning (`reasoning_content`, or `reasoning` as
recent vLLM names it) is a `reasoning` item with the text as its summary (`summary_text`), its
text an `output_text` part of a `message` item (a refusal a `refusal` part), each tool call a
`function_call` item, in that order. finish_reason `length` makes the response `incomplete`
(reason `max_output_tokens`), `content_filter` too (reason `content_filter`), with the last
item `incomplete`; any other is `completed`.

The stream: `response.created`, `response.in_progress`, then each output item as the chat
stream produces it — `response.output_item.added`, its parts and deltas, their `.done`
events, `response.output_item.done` — and at the end `response.completed` (or
`response.incomplete`) with the whole response and its usage, every event numbered
(`sequence_number` 0, 1, 2...) and framed `event: <type>` / `data: <json>`. Reasoning is
streamed as a summary (`response.reasoning_summary_part.added`,
`response.reasoning_summary_text.delta`...), as the answer gives it: the events OpenAI's own
reasoning models stream and the clients show (the raw `response.reasoning_text.*` events are
hidden by default in Codex and unknown to many UIs). The terminal event waits for the usage
chunk that follows the finish in a chat stream that asked for it (`[DONE]`, or the end of the
stream, when none comes). A chat error chunk ends the stream with `response.failed` (the
response, `status: failed`, its `error` and the output so far): the lifecycle event OpenAI
sends for a response that fails once created — the top-level `error` event is for a request
that never became a response. A second call's arguments interleaved with the next one's
(which no chat server does: each call's deltas come before the next call's) cannot be shown
once its item is done, and are dropped.

References: OpenAI's Responses API reference (create, the Response object, streaming events),
and the openai SDK's types (openai/types/responses/), which the tests validate against.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeGuard

import orjson

from ...errors import GatewayError, bad_request
from ...providers.openai_request import shape_checked
from ...sse import SSEParser
from ..openai.answer import usage as chat_usage

if TYPE_CHECKING:
    from ..base import Endpoint

log = logging.getLogger("extproc.wire")

PATH = "/v1/responses"


# -- the request --------------------------------------------------------------------------------

# Taken and translated below.
_TRANSLATED = frozenset(
    {
        "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "user",
        "parallel_tool_calls", "stream", "tools", "tool_choice", "text", "reasoning",
        "truncation", "background", "top_logprobs",
    }
)  # fmt: skip
# Without effect on what the model produces: left out (see the module's docstring).
_DROPPED = frozenset(
    {
        "metadata", "store", "include", "service_tier", "stream_options", "max_tool_calls",
        "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
        "safety_identifier",
    }
)  # fmt: skip
# The API's, but nothing a chat completions backend can do: refused when set (not null).
_REFUSED = {
    "previous_response_id": (
        "the backend keeps no conversation state: send the whole conversation in `input`"
    ),
    "conversation": (
        "the backend keeps no conversation state: send the whole conversation in `input`"
    ),
    "prompt": "stored prompt templates are not available: send the prompt in `input`",
    "context_management": "the backend keeps no context to manage",
    "moderation": "the backend does not moderate",
    "background_options": "background responses are not available",
    "access_programs": "OpenAI's access programs are not available",
    "image": "image input options are not available",
}
_SERVED = "this model is served through chat completions"
_TOOL_CHOICES = ("auto", "none", "required")
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
# A function tool's keys beyond those translated, and the values that change nothing.
_TOOL_NEUTRAL: Mapping[str, tuple[Any, ...]] = {"defer_loading": (False,), "async": (False,)}


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _unsupported(param: str, why: str) -> GatewayError:
    return bad_request(
        f"`{param}` is not supported: {_SERVED}; {why}", "unsupported_parameter", param
    )


def _unsupported_value(param: str, what: str) -> GatewayError:
    return bad_request(f"{what} is not supported: {_SERVED}", "unsupported_value", param)


def _invalid_type(param: str, expected: str) -> GatewayError:
    return bad_request(f"Invalid type for `{param}`: expected {expected}", "invalid_type", param)


def _dict(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid_type(param, "an object")
    return value


def _str(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise _invalid_type(param, "a string")
    return value


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request body as a chat completions body, `model` unchanged. Raises a 400
    naming the parameter for what chat completions cannot carry, and for a body part that
    does not have the shape the Responses API gives it."""
    with shape_checked():
        return _chat_request(body)


def _chat_request(body: dict[str, Any]) -> dict[str, Any]:
    for key, value in body.items():
        if key in _TRANSLATED or key in _DROPPED:
            continue
        if key in _REFUSED:
            if value is not None:
                raise _unsupported(key, _REFUSED[key])
            continue
        raise bad_request(f"Unknown parameter: `{key}`", "unsupported_parameter", key)
    if body.get("background"):
        raise _unsupported("background", "nothing keeps the response to poll")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and top_logprobs != 0:
        raise _unsupported("top_logprobs", "the answer carries no log-probabilities")
    truncation = body.get("truncation")
    if truncation not in (None, "auto", "disabled"):
        raise bad_request(
            "`truncation` must be 'auto' or 'disabled'", "invalid_value", "truncation"
        )

    out: dict[str, Any] = {"model": body["model"], "messages": _messages(body)}
    cap = body.get("max_output_tokens")
    if cap is not None:
        if not _is_int(cap):
            raise _invalid_type("max_output_tokens", "an integer")
        if cap < 1:
            raise bad_request(
                f"Invalid 'max_output_tokens': integer below minimum value. Expected a value "
                f">= 1, but got {cap} instead.",
                "integer_below_min_value",
                "max_output_tokens",
            )
        out["max_completion_tokens"] = cap
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            if not _is_number(value):
                raise _invalid_type(name, "a number")
            out[name] = value
    user = body.get("user")
    if user is not None:
        out["user"] = _str(user, "user")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise _invalid_type("parallel_tool_calls", "a boolean")
        out["parallel_tool_calls"] = parallel
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid_type("stream", "a boolean")
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _invalid_type("tools", "an array")
        if tools:
            out["tools"] = [_tool(tool, i) for i, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if choice is not None:
        out["tool_choice"] = _tool_choice(choice)
    text = body.get("text")
    if text is not None:
        out.update(_text(_dict(text, "text")))
    reasoning = body.get("reasoning")
    if reasoning is not None:
        out.update(_reasoning(_dict(reasoning, "reasoning")))
    return out


def _tool(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools[{i}]"
    tool = _dict(tool, where)
    kind = tool.get("type")
    if kind != "function":
        raise _unsupported_value(
            f"{where}.type",
            f"`{where}.type` {kind!r} (a tool OpenAI runs itself, or not a function)",
        )
    function: dict[str, Any] = {"name": _str(tool.get("name"), f"{where}.name")}
    description = tool.get("description")
    if description is not None:
        function["description"] = _str(description, f"{where}.description")
    parameters = tool.get("parameters")
    if parameters is not None:
        function["parameters"] = _dict(parameters, f"{where}.parameters")
    strict = tool.get("strict")
    if strict is not None:
        if not isinstance(strict, bool):
            raise _invalid_type(f"{where}.strict", "a boolean")
        function["strict"] = strict
    for key, value in tool.items():
        if key in ("type", "name", "description", "parameters", "strict") or value is None:
            continue
        if value not in _TOOL_NEUTRAL.get(key, ()):
            raise bad_request(
                f"`{where}.{key}` is not supported: {_SERVED}",
                "unsupported_parameter",
                f"{where}.{key}",
            )
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICES:
            raise bad_request(
                "`tool_choice` must be 'auto', 'none', 'required' or a function",
                "invalid_value",
                "tool_choice",
            )
        return choice
    choice = _dict(choice, "tool_choice")
    if choice.get("type") == "function":
        return {
            "type": "function",
            "function": {"name": _str(choice.get("name"), "tool_choice.name")},
        }
    raise _unsupported_value(
        "tool_choice", f"`tool_choice` of type {choice.get('type')!r} (only a function's)"
    )


def _text(text: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fmt = text.get("format")
    if fmt is not None:
        fmt = _dict(fmt, "text.format")
        kind = fmt.get("type")
        if kind == "json_schema":
            schema: dict[str, Any] = {
                "name": _str(fmt.get("name"), "text.format.name"),
                "schema": _dict(fmt.get("schema"), "text.format.schema"),
            }
            if fmt.get("description") is not None:
                schema["description"] = _str(fmt["description"], "text.format.description")
            if fmt.get("strict") is not None:
                if not isinstance(fmt["strict"], bool):
                    raise _invalid_type("text.format.strict", "a boolean")
                schema["strict"] = fmt["strict"]
            out["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif kind == "json_object":
            out["response_format"] = {"type": "json_object"}
        elif kind != "text":  # text: chat's default, nothing to say
            raise bad_request(
                "`text.format.type` must be 'text', 'json_schema' or 'json_object'",
                "invalid_value",
                "text.format.type",
            )
    verbosity = text.get("verbosity")
    if verbosity is not None:
        out["verbosity"] = _str(verbosity, "text.verbosity")  # chat completions' own name
    for key, value in text.items():
        if key not in ("format", "verbosity") and value is not None:
            raise bad_request(
                f"Unknown parameter: `text.{key}`", "unsupported_parameter", f"text.{key}"
            )
    return out


def _reasoning(reasoning: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    effort = reasoning.get("effort")
    if effort is not None:
        out["reasoning_effort"] = _str(effort, "reasoning.effort")
    for key, value in reasoning.items():
        if key in ("effort", "summary", "generate_summary") or value is None:
            continue
        if key == "mode" and value == "standard":
            continue
        raise bad_request(
            f"`reasoning.{key}` is not supported: {_SERVED}",
            "unsupported_parameter",
            f"reasoning.{key}",
        )
    return out


# -- the conversation ---------------------------------------------------------------------------


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None and _str(instructions, "instructions"):
        out.append({"role": "system", "content": instructions})
    value = body.get("input")
    if isinstance(value, str):
        out.append({"role": "user", "content": value})
        return out
    if not isinstance(value, list) or not value:
        raise bad_request(
            "`input` must be a string or a non-empty array of input items", "invalid_type", "input"
        )
    for i, item in enumerate(value):
        _item(out, item, f"input[{i}]")
    return out


def _item(out: list[dict[str, Any]], item: Any, where: str) -> None:
    item = _dict(item, where)
    kind = item.get("type")
    if kind == "message" or (kind is None and "role" in item):
        _message(out, item, where)
    elif kind == "function_call":
        _function_call(out, item, where)
    elif kind == "function_call_output":
        out.append(
            {
                "role": "tool",
                "tool_call_id": _str(item.get("call_id"), f"{where}.call_id"),
                "content": _tool_output(item.get("output"), f"{where}.output"),
            }
        )
    elif kind == "reasoning":
        return  # chat completions have no place for earlier reasoning (see the docstring)
    elif kind is None and "id" in item:
        # An item reference: its `type` may be left out.
        raise _unsupported_value(
            f"{where}.type", f"`{where}`: an item reference (the backend stores no items)"
        )
    elif kind is None:
        raise bad_request(f"`{where}` has no `type`", "missing_required_parameter", f"{where}.type")
    else:
        raise _unsupported_value(f"{where}.type", f"`{where}.type` {kind!r}")


def _message(out: list[dict[str, Any]], item: dict[str, Any], where: str) -> None:
    said = item.get("role")
    role = _ROLES.get(said) if isinstance(said, str) else None
    if role is None or not isinstance(said, str):
        raise bad_request(
            f"`{where}.role` must be 'user', 'assistant', 'system' or 'developer'",
            "invalid_value",
            f"{where}.role",
        )
    content = item.get("content")
    where = f"{where}.content"
    if role == "assistant":
        text = _assistant_text(content, where)
        last = out[-1] if out else None
        if last is not None and last["role"] == "assistant" and last.get("content") is None:
            last["content"] = text  # the text of the turn whose calls came first
        else:
            out.append({"role": "assistant", "content": text})
        return
    if isinstance(content, str):
        out.append({"role": role, "content": content})
        return
    if not isinstance(content, list):
        raise _invalid_type(where, "a string or an array of content parts")
    parts = [_part(part, f"{where}[{j}]", role, said) for j, part in enumerate(content)]
    out.append({"role": role, "content": parts})


def _text_of(part: dict[str, Any], where: str, key: str = "text") -> str:
    return _str(part.get(key), f"{where}.{key}")


def _part(part: Any, where: str, role: str, said: str) -> dict[str, Any]:
    part = _dict(part, where)
    kind = part.get("type")
    if kind in ("input_text", "output_text"):
        return {"type": "text", "text": _text_of(part, where)}
    if role == "system":  # chat's system (and developer) messages hold text only
        raise _unsupported_value(f"{where}.type", f"`{where}.type` {kind!r} in a {said} message")
    if kind == "input_image":
        if part.get("file_id") is not None:
            raise _unsupported_value(
                f"{where}.file_id", f"`{where}.file_id` (the backend has no file store)"
            )
        image: dict[str, Any] = {"url": _str(part.get("image_url"), f"{where}.image_url")}
        if part.get("detail") is not None:
            image["detail"] = _str(part["detail"], f"{where}.detail")
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        for key, why in (("file_id", "the backend has no file store"), ("file_url", "a URL")):
            if part.get(key) is not None:
                raise _unsupported_value(f"{where}.{key}", f"`{where}.{key}` ({why})")
        file: dict[str, Any] = {"file_data": _str(part.get("file_data"), f"{where}.file_data")}
        if part.get("filename") is not None:
            file["filename"] = _str(part["filename"], f"{where}.filename")
        return {"type": "file", "file": file}
    raise _unsupported_value(f"{where}.type", f"`{where}.type` {kind!r}")


def _assistant_text(content: Any, where: str) -> str:
    """An assistant message's content as one text: its text parts, and refusals (text the
    model said)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid_type(where, "a string or an array of content parts")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        part = _dict(part, at)
        kind = part.get("type")
        if kind in ("output_text", "input_text"):
            texts.append(_text_of(part, at))
        elif kind == "refusal":
            texts.append(_text_of(part, at, "refusal"))
        else:
            raise _unsupported_value(f"{at}.type", f"`{at}.type` {kind!r} in an assistant message")
    return "".join(texts)


def _function_call(out: list[dict[str, Any]], item: dict[str, Any], where: str) -> None:
    call = {
        "id": _str(item.get("call_id"), f"{where}.call_id"),
        "type": "function",
        "function": {
            "name": _str(item.get("name"), f"{where}.name"),
            "arguments": _str(item.get("arguments"), f"{where}.arguments"),
        },
    }
    # The calls of one turn are one assistant message, with the turn's text if it came first.
    last = out[-1] if out else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
        if last.get("content") == "":
            last["content"] = None  # as chat gives a message that only calls
    else:
        out.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _tool_output(output: Any, where: str) -> Any:
    """A function call's output: a string, or text parts (a chat tool message holds text)."""
    if isinstance(output, str):
        return output
    if not isinstance(output, list):
        raise _invalid_type(where, "a string or an array of content parts")
    parts = []
    for j, part in enumerate(output):
        at = f"{where}[{j}]"
        part = _dict(part, at)
        if part.get("type") != "input_text":
            raise _unsupported_value(
                f"{at}.type", f"`{at}.type` {part.get('type')!r} in a function call's output"
            )
        parts.append({"type": "text", "text": _text_of(part, at)})
    return parts


# -- the answer ---------------------------------------------------------------------------------

# finish_reason -> the reason a response is incomplete; any other finish completes it.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
# ResponseError's codes (the SDK's literal); a chat error's other codes are a server_error.
_ERROR_CODES = frozenset(
    {
        "server_error", "rate_limit_exceeded", "invalid_prompt", "data_residency_mismatch",
        "bio_policy", "misalignment_policy_violation", "vector_store_timeout",
        "invalid_image", "invalid_image_format", "invalid_base64_image", "invalid_image_url",
        "image_too_large", "image_too_small", "image_parse_error",
        "image_content_policy_violation", "invalid_image_mode", "image_file_too_large",
        "unsupported_image_media_type", "empty_image_file", "failed_to_download_image",
        "image_file_not_found",
    }
)  # fmt: skip


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _echo(body: Mapping[str, Any] | None) -> dict[str, Any]:
    """The Response's fields that repeat the request: the client's values where its body
    (validated by chat_request) has them, the API's defaults otherwise."""
    body = body or {}

    def pick(key: str, ok: Any, default: Any) -> Any:
        value = body.get(key)
        return value if value is not None and ok(value) else default

    tools = []
    for tool in pick("tools", lambda v: isinstance(v, list), []):
        if isinstance(tool, dict) and tool.get("type") == "function":
            tools.append(
                {
                    "type": "function",
                    "name": tool.get("name"),
                    "description": tool.get("description"),
                    "parameters": tool.get("parameters"),
                    "strict": tool.get("strict"),
                }
            )
    text = pick("text", lambda v: isinstance(v, dict), {})
    reasoning = pick("reasoning", lambda v: isinstance(v, dict), {})
    return {
        "instructions": pick("instructions", lambda v: isinstance(v, str), None),
        "max_output_tokens": pick("max_output_tokens", _is_int, None),
        "parallel_tool_calls": pick("parallel_tool_calls", lambda v: isinstance(v, bool), True),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "temperature": pick("temperature", _is_number, None),
        "text": {
            "format": text.get("format")
            if isinstance(text.get("format"), dict)
            else {"type": "text"},
            **({"verbosity": text["verbosity"]} if text.get("verbosity") is not None else {}),
        },
        "tool_choice": pick(
            "tool_choice", lambda v: v in _TOOL_CHOICES or isinstance(v, dict), "auto"
        ),
        "tools": tools,
        "top_p": pick("top_p", _is_number, None),
        "truncation": pick("truncation", lambda v: v in ("auto", "disabled"), "disabled"),
        "user": pick("user", lambda v: isinstance(v, str), None),
        "metadata": pick("metadata", lambda v: isinstance(v, dict), {}),
    }


def _response(
    response_id: str,
    created_at: int,
    model: str,
    echo: dict[str, Any],
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    incomplete: str | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": echo["instructions"],
        "max_output_tokens": echo["max_output_tokens"],
        "model": model,
        "output": output,
        "parallel_tool_calls": echo["parallel_tool_calls"],
        "previous_response_id": None,
        "reasoning": echo["reasoning"],
        "store": False,  # the backend keeps nothing: the response cannot be retrieved
        "temperature": echo["temperature"],
        "text": echo["text"],
        "tool_choice": echo["tool_choice"],
        "tools": echo["tools"],
        "top_p": echo["top_p"],
        "truncation": echo["truncation"],
        "usage": usage,
        "user": echo["user"],
        "metadata": echo["metadata"],
    }


def usage_object(report: Any) -> dict[str, Any] | None:
    """A chat completions `usage` as the Response's, None when it is not well formed."""
    counted = chat_usage(report)
    if counted is None:
        return None
    details = report.get("prompt_tokens_details")
    written = details.get("cache_write_tokens") if isinstance(details, dict) else None
    return {
        "input_tokens": counted.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": counted.cached_tokens,
            "cache_write_tokens": written if _is_int(written) and written >= 0 else 0,
        },
        "output_tokens": counted.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": counted.reasoning_tokens},
        "total_tokens": counted.total_tokens,
    }


def _reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [_summary_part(text)]}


def _summary_part(text: str) -> dict[str, Any]:
    return {"type": "summary_text", "text": text}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _refusal_part(text: str) -> dict[str, Any]:
    return {"type": "refusal", "refusal": text}


def _message_item(item_id: str, content: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _call_item(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": _new_id("fc"),
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _reasoning_text(message: Mapping[str, Any]) -> str:
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def _content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # some servers give text parts
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return None


def response_for(
    completion: dict[str, Any], model: str, body: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A chat completion (choice 0: the request asks for one) as a Response object naming
    `model`, the request's echoes from `body` (None: the API's defaults)."""
    choices = completion.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    choice = choice if isinstance(choice, dict) else {}
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    finish = choice.get("finish_reason")
    incomplete = _INCOMPLETE.get(finish) if isinstance(finish, str) else None
    output: list[dict[str, Any]] = []
    reasoning = _reasoning_text(message)
    if reasoning:
        output.append(_reasoning_item(_new_id("rs"), reasoning))
    parts = []
    text = _content_text(message.get("content"))
    if text:
        parts.append(_text_part(text))
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        parts.append(_refusal_part(refusal))
    if parts:
        output.append(_message_item(_new_id("msg"), parts, "completed"))
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        call_id = call.get("id")
        output.append(
            _call_item(
                call_id if isinstance(call_id, str) and call_id else _new_id("call"),
                str(function.get("name") or ""),
                str(function.get("arguments") or ""),
                "completed",
            )
        )
    if not output:
        # Nothing said: an empty message, where a client looks for the text (the stream too).
        output.append(_message_item(_new_id("msg"), [_text_part("")], "completed"))
    if incomplete and output[-1]["type"] != "reasoning":
        output[-1]["status"] = "incomplete"  # the item the answer was cut in
    created = completion.get("created")
    return _response(
        _new_id("resp"),
        created if _is_int(created) else int(time.time()),
        model,
        _echo(body),
        "incomplete" if incomplete else "completed",
        output,
        usage_object(completion.get("usage")),
        incomplete,
    )


# -- the event stream ---------------------------------------------------------------------------


class _Item:
    """The output item being streamed: its snapshot (`item`, what output_item.done gives),
    its output index, and the text of its open part."""

    __slots__ = ("chat_index", "index", "item", "part", "pieces")

    def __init__(self, item: dict[str, Any], index: int, chat_index: int = -1) -> None:
        self.item = item
        self.index = index
        self.chat_index = chat_index  # a function call's index in the chat stream
        self.part: str | None = None  # a message's open part: "text" or "refusal"
        self.pieces: list[str] = []

    @property
    def id(self) -> str:
        return str(self.item["id"])

    @property
    def kind(self) -> str:
        return str(self.item["type"])


class _Pending:
    """A chat tool call seen before its name (which output_item.added must carry)."""

    __slots__ = ("arguments", "call_id", "name")

    def __init__(self) -> None:
        self.call_id = ""
        self.name = ""
        self.arguments: list[str] = []


class ResponsesStream:
    """A chat completions chunk stream, as it arrives in pieces split anywhere, to the
    Responses event stream (base.ClientStream): each piece in, the events it completes out.
    Never raises: a chunk that is not JSON, or not a chunk's shape, is skipped.

    `error_code`: the code (else type) of the chat stream's error chunk, None while there was
    none."""

    def __init__(
        self, model: str, prompt_tokens: int, body: Mapping[str, Any] | None = None
    ) -> None:
        self.model = model
        # The gateway's count of the prompt: the Responses stream reports usage in its
        # terminal event only (response.created has none), where the backend's report is.
        self.prompt_tokens = prompt_tokens
        self.parser = SSEParser()
        self.echo = _echo(body)
        self.id = _new_id("resp")
        self.created_at = int(time.time())
        self.sequence = 0
        self.started = False
        self.output: list[dict[str, Any]] = []  # the items done, in order
        self.open: _Item | None = None
        self.pending: dict[int, _Pending] = {}
        self.closed_calls: set[int] = set()
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.error_code: str | None = None
        self._out = bytearray()

    # -- framing

    def _emit(self, kind: str, **fields: Any) -> None:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        self._out += b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def _snapshot(self, status: str, **more: Any) -> dict[str, Any]:
        return _response(
            self.id, self.created_at, self.model, self.echo, status, list(self.output), **more
        )

    def _take(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- ClientStream

    def feed(self, piece: bytes) -> bytes:
        try:
            events = self.parser.feed(piece)
        except Exception:  # the parser does not raise; nothing to translate if it did
            log.exception("a chat stream could not be read")
            return self._take()
        for data in events:
            if self.done:
                break
            try:
                self._data(data)
            except Exception:  # a chunk of no chunk's shape: what it completed stays out
                log.exception("a chat stream chunk could not be translated")
        return self._take()

    def end(self) -> bytes:
        if self.finish is not None and not self.done:
            try:
                self._terminal()
            except Exception:
                log.exception("a chat stream's end could not be translated")
        return self._take()

    # -- the chat stream

    def _data(self, data: bytes) -> None:
        if data.strip() == b"[DONE]":
            if self.finish is None:
                self._start()
                self._finished("stop")  # said done without a finish: it finished
            self._terminal()
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return  # not a chunk: nothing to translate
        if not isinstance(chunk, dict):
            return
        if "error" in chunk and chunk["error"] is not None:
            self._failed(chunk["error"])
            return
        self._start()
        choices = chunk.get("choices")
        if self.finish is None and isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    self._choice(choice)
        report = usage_object(chunk.get("usage"))
        if report is not None:
            self.usage = report
            # The usage chunk follows the finish (no choices); a server that reports usage
            # in the finish chunk itself ends with [DONE].
            if self.finish is not None and not choices:
                self._terminal()

    def _start(self) -> None:
        if self.started:
            return
        self.started = True
        response = self._snapshot("in_progress")
        self._emit("response.created", response=response)
        self._emit("response.in_progress", response=response)

    def _choice(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            reasoning = _reasoning_text(delta)
            if reasoning:
                self._reasoning(reasoning)
            content = _content_text(delta.get("content"))
            if content:
                self._message_text("text", content)
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                self._message_text("refusal", refusal)
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    self._call(call)
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            self._finished(finish)

    # -- items

    def _add(self, item: dict[str, Any], chat_index: int = -1) -> _Item:
        index = len(self.output)
        self._emit("response.output_item.added", output_index=index, item=item)
        self.open = _Item(item, index, chat_index)
        return self.open

    def _reasoning(self, text: str) -> None:
        item = self.open
        if item is None or item.kind != "reasoning":
            self._close()
            item = self._add({"type": "reasoning", "id": _new_id("rs"), "summary": []})
            self._emit(
                "response.reasoning_summary_part.added",
                item_id=item.id,
                output_index=item.index,
                summary_index=0,
                part=_summary_part(""),
            )
        item.pieces.append(text)
        self._emit(
            "response.reasoning_summary_text.delta",
            item_id=item.id,
            output_index=item.index,
            summary_index=0,
            delta=text,
        )

    def _message_text(self, part: str, text: str) -> None:
        item = self.open
        if item is None or item.kind != "message":
            self._close()
            item = self._add(_message_item(_new_id("msg"), [], "in_progress"))
        if item.part != part:
            self._close_part(item)
            item.part = part
            self._emit(
                "response.content_part.added",
                item_id=item.id,
                output_index=item.index,
                content_index=len(item.item["content"]),
                part=_text_part("") if part == "text" else _refusal_part(""),
            )
        if not text:
            return  # an empty message's part (_finished): opened, nothing to add
        item.pieces.append(text)
        where = {
            "item_id": item.id,
            "output_index": item.index,
            "content_index": len(item.item["content"]),
        }
        if part == "text":
            self._emit("response.output_text.delta", **where, delta=text, logprobs=[])
        else:
            self._emit("response.refusal.delta", **where, delta=text)

    def _call(self, call: dict[str, Any]) -> None:
        index = call.get("index", 0)
        index = index if _is_int(index) else 0
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        arguments = function.get("arguments")
        arguments = arguments if isinstance(arguments, str) else ""
        item = self.open
        if item is not None and item.kind == "function_call" and item.chat_index == index:
            self._arguments(item, arguments)
            return
        if index in self.closed_calls:
            return  # interleaved with a later call: its item is done (see the docstring)
        pending = self.pending.setdefault(index, _Pending())
        if isinstance(call.get("id"), str) and call["id"]:
            pending.call_id = call["id"]
        if isinstance(function.get("name"), str) and function["name"]:
            pending.name = function["name"]
        if arguments:
            pending.arguments.append(arguments)
        if pending.name:
            self._open_call(index)

    def _open_call(self, index: int) -> None:
        pending = self.pending.pop(index)
        call_id = pending.call_id or _new_id("call")
        self._close_open()
        item = self._add(_call_item(call_id, pending.name, "", "in_progress"), index)
        self.closed_calls.add(index)  # once this item is done, nothing more goes to it
        if pending.arguments:
            self._arguments(item, "".join(pending.arguments))

    def _arguments(self, item: _Item, arguments: str) -> None:
        if not arguments:
            return
        item.pieces.append(arguments)
        self._emit(
            "response.function_call_arguments.delta",
            item_id=item.id,
            output_index=item.index,
            delta=arguments,
        )

    def _close_part(self, item: _Item) -> None:
        if item.part is None:
            return
        text = "".join(item.pieces)
        content_index = len(item.item["content"])
        where = {"item_id": item.id, "output_index": item.index, "content_index": content_index}
        if item.part == "text":
            part = _text_part(text)
            self._emit("response.output_text.done", **where, text=text, logprobs=[])
        else:
            part = _refusal_part(text)
            self._emit("response.refusal.done", **where, refusal=text)
        self._emit("response.content_part.done", **where, part=part)
        item.item["content"].append(part)
        item.part = None
        item.pieces = []

    def _close(self, status: str = "completed") -> None:
        """The open item done, and the calls still waiting for their names opened and done."""
        self._close_open(status)
        while self.pending:
            self._open_call(min(self.pending))
            self._close_open(status)

    def _close_open(self, status: str = "completed") -> None:
        item = self.open
        if item is None:
            return
        self.open = None
        where = {"item_id": item.id, "output_index": item.index}
        if item.kind == "reasoning":
            text = "".join(item.pieces)
            self._emit("response.reasoning_summary_text.done", **where, summary_index=0, text=text)
            self._emit(
                "response.reasoning_summary_part.done",
                **where,
                summary_index=0,
                part=_summary_part(text),
            )
            item.item["summary"] = [_summary_part(text)]
        elif item.kind == "message":
            self._close_part(item)
            item.item["status"] = status
        else:
            arguments = "".join(item.pieces)
            self._emit("response.function_call_arguments.done", **where, arguments=arguments)
            item.item["arguments"] = arguments
            item.item["status"] = status
        self._emit("response.output_item.done", output_index=item.index, item=item.item)
        self.output.append(item.item)

    def _finished(self, finish: str) -> None:
        self.finish = finish
        status = "incomplete" if finish in _INCOMPLETE else "completed"
        self._close(status)
        if not self.output:
            # Nothing said: an empty message, as the JSON answer gives (response_for).
            self._message_text("text", "")
            self._close(status)

    def _terminal(self) -> None:
        self.done = True
        incomplete = _INCOMPLETE.get(self.finish or "")
        if incomplete:
            response = self._snapshot("incomplete", usage=self.usage, incomplete=incomplete)
            self._emit("response.incomplete", response=response)
        else:
            self._emit("response.completed", response=self._snapshot("completed", usage=self.usage))

    def _failed(self, err: Any) -> None:
        if isinstance(err, str):  # some servers say {"error": "text"}
            err = {"message": err}
        err = err if isinstance(err, dict) else {}
        code = err.get("code") or err.get("type")
        self.error_code = str(code) if code else "server_error"
        self._start()
        self.done = True
        if self.open is not None:  # cut in the middle: the item as far as it came
            item, self.open = self.open, None
            if item.kind == "reasoning":
                item.item["summary"] = [_summary_part("".join(item.pieces))]
            elif item.kind == "message":
                if item.part is not None:
                    text = "".join(item.pieces)
                    part = _text_part(text) if item.part == "text" else _refusal_part(text)
                    item.item["content"].append(part)
                item.item["status"] = "incomplete"
            else:
                item.item["arguments"] = "".join(item.pieces)
                item.item["status"] = "incomplete"
            self.output.append(item.item)
        error = {
            "code": self.error_code if self.error_code in _ERROR_CODES else _error_code(err),
            "message": str(err.get("message") or "The backend failed while answering"),
        }
        self._emit("response.failed", response=self._snapshot("failed", error=error))


def _error_code(err: dict[str, Any]) -> str:
    said = f"{err.get('code') or ''} {err.get('type') or ''}".lower()
    return "rate_limit_exceeded" if "rate_limit" in said else "server_error"


# -- the bridge ---------------------------------------------------------------------------------


class ResponsesBridge:
    """base.ChatBridge for the Responses API: a Response repeats the request's settings
    (tools, instructions, temperature, ...) as OpenAI's does, from the client's body."""

    def request(self, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        return chat_request(body)

    def answer(
        self, completion: dict[str, Any], model: str, request: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        return response_for(completion, model, request)

    def stream(
        self, model: str, prompt_tokens: int, request: Mapping[str, Any] | None = None
    ) -> ResponsesStream:
        return ResponsesStream(model, prompt_tokens, request)


BRIDGE = ResponsesBridge()
