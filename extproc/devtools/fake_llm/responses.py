"""OpenAI's Responses API (`POST /v1/responses` and its stored-response calls) as the fake
speaks it, after OpenAI's published API reference and the official SDK's types, and written
apart from the gateway's own translation (extproc/wire) so the gateway's tests of it are not
circular.

The request is checked as strictly as OpenAI checks it: an unknown parameter (at the top, in an
input item, a content part or a tool), a value of the wrong type or out of range, a role or an
item type OpenAI does not take, a `function_call_output` whose `call_id` answers no earlier
`function_call` (of the input, or of the stored conversation `previous_response_id` continues),
a `function_call` left without its output: 400 in OpenAI's error shape; an unknown
`previous_response_id`: 404 `previous_response_not_found`. Items and tools the fake cannot play
(hosted tools, computer use, conversations, prompt templates, background mode) are refused with a
400 naming the fake.

The answer is a Response: one assistant `message` with one `output_text` part (the canned
`tok0 tok1 ...` words, or `x-fake-response-text`), or, when `tool_choice` forces a function
(`{"type": "function", "name"}`, `"required"`, `allowed_tools` in mode `required`) and the
input does not end with a `function_call_output`, one `function_call` whose arguments fill the
tool's required properties (strings with "fake"). `max_output_tokens` below the canned length
cuts the text there: status `incomplete`, `incomplete_details.reason` `max_output_tokens`.
Usage counts the whole context (instructions, the stored conversation, the input) at 4 bytes a
token. With `store` (the default) the response and its input items are kept in memory for
`GET /v1/responses/{id}`, `DELETE` and `GET .../input_items`, and for `previous_response_id`.
`POST /v1/responses/input_tokens` counts a request's input the same way.

`stream: true`: server-sent events (`event: TYPE`, `data: JSON`, numbered by
`sequence_number` from 0) in the reference's order, `response.created`, `response.in_progress`,
`response.output_item.added`, `response.content_part.added`, a `response.output_text.delta`
per piece (paced as the chat stream is), `response.output_text.done`,
`response.content_part.done`, `response.output_item.done`, then `response.completed` (or
`response.incomplete`) with the whole response; a function call streams its arguments as
`response.function_call_arguments.delta`s and `.done`. There is no `data: [DONE]`. Delta events
carry the `obfuscation` padding unless `stream_options.include_obfuscation` is false.

Knobs: the fake's common ones (`x-fake-fault`, `x-fake-ttft-ms`, `x-fake-tokens-per-second`,
`x-fake-response-tokens`, `x-fake-response-text`, `x-fake-chunk-chars` (also the size of the
argument pieces of a streamed function call), `x-fake-no-usage`, `x-fake-reasoning-tokens`),
and ``x-fake-response-failed: CODE[:N]``: the generation fails with CODE (``server_error`` or
``rate_limit_exceeded``): a stream ends, after N events (default 5, just after the first delta),
with `response.failed` (the response with `status: failed` and its `error`); a non-streaming
request is answered with the matching 500 or 429 error.

Faults (`x-fake-fault`, `--fault`) as on the chat endpoint, in OpenAI's shape (the endpoints are
wrapped by `FakeLLM.v1`): 429, 500, 503, reset and stall before the answer; `reset-after:N` and
`stall-after:N` counting the stream's events.
"""

from __future__ import annotations

import random
import re
import string
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from .faults import EventWriter, non_stream_fault, open_event_stream, sleep_until
from .settings import RequestSettings
from .wire import (
    VOCAB,
    RequestError,
    content,
    error_response,
    estimate_tokens,
    is_int,
    json_response,
    missing_parameter,
    require_object,
    text_pieces,
)

if TYPE_CHECKING:
    from .endpoints import FakeLLM

FAILED_HEADER = "x-fake-response-failed"
_FAILURE_CODES = {
    "server_error": (500, "server_error", "The server had an error while processing your request"),
    "rate_limit_exceeded": (429, "requests", "Rate limit reached for requests"),
}
_DEFAULT_FAILED_AFTER = 5
# Bounds memory when a benchmark stores many responses: the oldest are forgotten first.
_MAX_STORED = 4096

# The create call's body (the published reference, and the fields the installed SDK sends).
_CREATE_FIELDS = frozenset(
    {
        "model", "input", "instructions", "previous_response_id", "store", "stream",
        "stream_options", "tools", "tool_choice", "parallel_tool_calls", "max_output_tokens",
        "max_tool_calls", "temperature", "top_p", "top_logprobs", "metadata", "include",
        "reasoning", "text", "truncation", "service_tier", "user", "safety_identifier",
        "prompt_cache_key", "prompt_cache_retention", "background", "conversation", "prompt",
        "context_management", "access_programs", "background_options", "image", "moderation",
        "prompt_cache_options",
    }
)  # fmt: skip
_COUNT_FIELDS = frozenset(
    {
        "model", "input", "instructions", "previous_response_id", "tools", "tool_choice",
        "parallel_tool_calls", "reasoning", "text", "truncation", "conversation", "personality",
    }
)  # fmt: skip
# What the fake cannot play: refused (naming the fake) rather than silently ignored.
_UNSERVED = ("conversation", "prompt")

_ROLES = ("user", "assistant", "system", "developer")
_STATUSES = ("in_progress", "completed", "incomplete")
_SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority", "fast", "ultrafast")
_IMAGE_DETAILS = ("low", "high", "auto", "original")
_INPUT_PARTS = {
    "input_text": frozenset({"type", "text", "prompt_cache_breakpoint"}),
    "input_image": frozenset({"type", "image_url", "file_id", "detail", "prompt_cache_breakpoint"}),
    "input_file": frozenset(
        {
            "type",
            "file_id",
            "file_data",
            "file_url",
            "filename",
            "detail",
            "prompt_cache_breakpoint",
        }
    ),
}
_OUTPUT_PARTS = {
    "output_text": frozenset({"type", "text", "annotations", "logprobs"}),
    "refusal": frozenset({"type", "refusal"}),
}
_MESSAGE_FIELDS = frozenset({"type", "role", "content", "status", "phase"})
_FUNCTION_CALL_FIELDS = frozenset({"type", "call_id", "name", "arguments", "id", "status"})
_FUNCTION_OUTPUT_FIELDS = frozenset({"type", "call_id", "output", "id", "status"})
_REASONING_FIELDS = frozenset({"type", "id", "summary", "content", "encrypted_content", "status"})
_TOOL_FIELDS = frozenset({"type", "name", "description", "parameters", "strict"})
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_OBFUSCATION_CHARS = string.ascii_letters + string.digits


# -- errors ---------------------------------------------------------------------------------------


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _unknown(param: str) -> RequestError:
    return RequestError(f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")


def _bad_type(param: str, expected: str, value: Any) -> RequestError:
    return RequestError(
        f"Invalid type for '{param}': expected {expected}, but got {_json_kind(value)} instead.",
        param=param,
        code="invalid_type",
    )


def _bad_value(param: str, value: Any, supported: Iterable[str]) -> RequestError:
    names = [f"'{s}'" for s in supported]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])}, and {names[-1]}"
    return RequestError(
        f"Invalid value: '{value}'. Supported values are: {listed}.",
        param=param,
        code="invalid_value",
    )


def _unserved(param: str, what: str) -> RequestError:
    return RequestError(
        f"{what} is not served by fake-llm (it plays OpenAI's Responses API for messages and "
        "function tools only).",
        param=param,
        code="unsupported_parameter",
    )


def _not_found(response_id: str) -> RequestError:
    return RequestError(f"Response with id '{response_id}' not found.", status=404)


# -- checking the request -------------------------------------------------------------------------


def _extra_keys(obj: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise _unknown(f"{where}.{key}" if where else key)


def _optional(body: Mapping[str, Any], name: str, kind: type, expected: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise _bad_type(name, expected, value)
    return value


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad_type(name, "a decimal", value)
    if value < low:
        raise RequestError(
            f"Invalid '{name}': decimal below minimum value. Expected a value >= {low:g}, but "
            f"got {value} instead.",
            param=name,
            code="decimal_below_min_value",
        )
    if value > high:
        raise RequestError(
            f"Invalid '{name}': decimal above maximum value. Expected a value <= {high:g}, but "
            f"got {value} instead.",
            param=name,
            code="decimal_above_max_value",
        )
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value):
        raise _bad_type(name, "an integer", value)
    if value < low:
        raise RequestError(
            f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, but got "
            f"{value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    if high is not None and value > high:
        raise RequestError(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, but got "
            f"{value} instead.",
            param=name,
            code="integer_above_max_value",
        )
    return int(value)


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise _bad_type("metadata", "an object", metadata)
    if len(metadata) > 16:
        raise RequestError(
            f"Invalid 'metadata': too many properties. Expected an object with at most 16 "
            f"properties, but got an object with {len(metadata)} properties instead.",
            param="metadata",
            code="object_above_max_properties",
        )
    for key, value in metadata.items():
        if len(key) > 64:
            raise RequestError(
                f"Invalid 'metadata': key '{key[:64]}...' is longer than 64 characters.",
                param="metadata",
                code="invalid_value",
            )
        if not isinstance(value, str):
            raise _bad_type(f"metadata.{key}", "a string", value)
        if len(value) > 512:
            raise RequestError(
                f"Invalid 'metadata.{key}': string too long. Expected a string with maximum "
                f"length 512, but got a string with length {len(value)} instead.",
                param=f"metadata.{key}",
                code="string_above_max_length",
            )


def _check_tools(tools: Any) -> list[dict[str, Any]]:
    """The function tools, as the Response echoes them."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _bad_type("tools", "an array", tools)
    echoed = []
    for k, tool in enumerate(tools):
        where = f"tools[{k}]"
        if not isinstance(tool, dict):
            raise _bad_type(where, "an object", tool)
        kind = tool.get("type")
        if kind is None:
            raise missing_parameter(f"{where}.type")
        if kind != "function":
            raise _unserved(f"{where}.type", f"The tool type {kind!r}")
        _extra_keys(tool, _TOOL_FIELDS, where)
        name = tool.get("name")
        if name is None:
            raise missing_parameter(f"{where}.name")
        if not isinstance(name, str):
            raise _bad_type(f"{where}.name", "a string", name)
        if not _TOOL_NAME.match(name):
            raise RequestError(
                f"Invalid '{where}.name': string does not match pattern. Expected a string that "
                f"matches the pattern '{_TOOL_NAME.pattern}'.",
                param=f"{where}.name",
                code="invalid_value",
            )
        parameters = tool.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise _bad_type(f"{where}.parameters", "an object", parameters)
            if parameters and parameters.get("type") != "object":
                raise RequestError(
                    f"Invalid schema for function '{name}': schema must be a JSON Schema of "
                    f"'type: \"object\"', got 'type: \"{parameters.get('type')}\"'.",
                    param=f"{where}.parameters",
                    code="invalid_function_parameters",
                )
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise _bad_type(f"{where}.description", "a string", description)
        strict = tool.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _bad_type(f"{where}.strict", "a boolean", strict)
        echoed.append(
            {
                "type": "function",
                "name": name,
                "description": description,
                "parameters": parameters,
                # Function tools of the Responses API are strict unless told otherwise.
                "strict": True if strict is None else strict,
            }
        )
    return echoed


def _forced_function(choice: Any, tools: list[dict[str, Any]]) -> str | None:
    """Checks `tool_choice`; the function it makes the model call, if any."""
    names = [tool["name"] for tool in tools]
    if choice is None or choice in ("auto", "none"):
        return None
    if choice == "required":
        if not names:
            raise RequestError(
                "Tool choice 'required' must be specified with 'tools' parameter.",
                param="tool_choice",
            )
        return names[0]
    if isinstance(choice, str):
        raise _bad_value("tool_choice", choice, ("none", "auto", "required"))
    if not isinstance(choice, dict):
        raise _bad_type("tool_choice", "a string or an object", choice)
    kind = choice.get("type")
    if kind == "function":
        _extra_keys(choice, frozenset({"type", "name"}), "tool_choice")
        name = choice.get("name")
        if name is None:
            raise missing_parameter("tool_choice.name")
        if not isinstance(name, str):
            raise _bad_type("tool_choice.name", "a string", name)
        if name not in names:
            raise RequestError(
                f"Tool choice 'function' not found in 'tools' parameter: no function named "
                f"'{name}'.",
                param="tool_choice",
            )
        return name
    if kind == "allowed_tools":
        _extra_keys(choice, frozenset({"type", "mode", "tools"}), "tool_choice")
        mode = choice.get("mode")
        if mode not in ("auto", "required"):
            raise _bad_value("tool_choice.mode", mode, ("auto", "required"))
        allowed = choice.get("tools")
        if not isinstance(allowed, list) or not allowed:
            raise _bad_type("tool_choice.tools", "a non-empty array", allowed)
        listed = []
        for k, tool in enumerate(allowed):
            where = f"tool_choice.tools[{k}]"
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise _unserved(f"{where}.type", "An allowed tool other than a function")
            if tool.get("name") not in names:
                raise RequestError(
                    f"Invalid '{where}': no function named '{tool.get('name')}' in 'tools'.",
                    param=where,
                )
            listed.append(str(tool["name"]))
        return listed[0] if mode == "required" else None
    if kind is None:
        raise missing_parameter("tool_choice.type")
    raise _unserved("tool_choice.type", f"The tool choice type {kind!r}")


def _check_parts(parts: Any, where: str, allowed: Mapping[str, frozenset[str]]) -> list[Any]:
    if not isinstance(parts, list):
        raise _bad_type(where, "a string or an array of content parts", parts)
    normalized = []
    for j, part in enumerate(parts):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _bad_type(at, "an object", part)
        kind = part.get("type")
        if kind is None:
            raise missing_parameter(f"{at}.type")
        if kind not in allowed:
            raise _bad_value(f"{at}.type", kind, allowed)
        _extra_keys(part, allowed[kind], at)
        if kind in ("input_text", "output_text"):
            _required_string(part, "text", at)
        if kind == "refusal":
            _required_string(part, "refusal", at)
        if kind == "input_image":
            _check_image(part, at)
        if kind == "input_file" and not any(
            isinstance(part.get(k), str) for k in ("file_id", "file_data", "file_url")
        ):
            raise RequestError(
                f"Invalid '{at}': one of 'file_id', 'file_data' or 'file_url' must be provided.",
                param=at,
                code="invalid_value",
            )
        if kind == "output_text":
            annotations = part.get("annotations", [])
            if not isinstance(annotations, list):
                raise _bad_type(f"{at}.annotations", "an array", annotations)
            part = {**part, "annotations": annotations}
        if kind == "input_image":
            detail = part.get("detail") or "auto"
            part = {"file_id": None, "image_url": None, **part, "detail": detail}
        normalized.append(part)
    return normalized


def _check_image(part: Mapping[str, Any], at: str) -> None:
    url, file_id = part.get("image_url"), part.get("file_id")
    if url is None and file_id is None:
        raise RequestError(
            f"Invalid '{at}': one of 'image_url' or 'file_id' must be provided.",
            param=at,
            code="invalid_value",
        )
    if url is not None:
        if not isinstance(url, str):
            raise _bad_type(f"{at}.image_url", "a string", url)
        if not url.startswith(("http://", "https://", "data:image/")):
            raise RequestError(
                f"Invalid '{at}.image_url'. Expected a valid URL, but got a value with an invalid "
                "format.",
                param=f"{at}.image_url",
                code="invalid_value",
            )
    if file_id is not None and not isinstance(file_id, str):
        raise _bad_type(f"{at}.file_id", "a string", file_id)
    detail = part.get("detail")
    if detail is not None and detail not in _IMAGE_DETAILS:
        raise _bad_value(f"{at}.detail", detail, _IMAGE_DETAILS)


def _required_string(item: Mapping[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if value is None:
        raise missing_parameter(f"{where}.{name}")
    if not isinstance(value, str):
        raise _bad_type(f"{where}.{name}", "a string", value)
    return value


def _check_status(item: Mapping[str, Any], where: str) -> None:
    status = item.get("status")
    if status is not None and status not in _STATUSES:
        raise _bad_value(f"{where}.status", status, _STATUSES)


def _message(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role is None:
        raise missing_parameter(f"{where}.role")
    if role not in _ROLES:
        raise _bad_value(f"{where}.role", role, ("assistant", "system", "developer", "user"))
    # An assistant message may be an output message given back (with its id).
    _extra_keys(item, (_MESSAGE_FIELDS | {"id"}) if role == "assistant" else _MESSAGE_FIELDS, where)
    _check_status(item, where)
    phase = item.get("phase")
    if phase is not None and phase not in ("commentary", "final_answer"):
        raise _bad_value(f"{where}.phase", phase, ("commentary", "final_answer"))
    if "content" not in item:
        raise missing_parameter(f"{where}.content")
    body = item["content"]
    if role == "assistant":
        if isinstance(body, str):
            parts = [{"type": "output_text", "text": body, "annotations": []}]
        else:
            parts = _check_parts(body, f"{where}.content", _OUTPUT_PARTS)
        message_id = item.get("id")
        if message_id is not None and not isinstance(message_id, str):
            raise _bad_type(f"{where}.id", "a string", message_id)
        return {
            "id": message_id or _new_id("msg"),
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": parts,
        }
    if isinstance(body, str):
        parts = [{"type": "input_text", "text": body}]
    else:
        parts = _check_parts(body, f"{where}.content", _INPUT_PARTS)
    return {
        "id": _new_id("msg"),
        "type": "message",
        "role": role,
        "status": "completed",
        "content": parts,
    }


def _function_output(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    _extra_keys(item, _FUNCTION_OUTPUT_FIELDS, where)
    _check_status(item, where)
    call_id = _required_string(item, "call_id", where)
    if "output" not in item:
        raise missing_parameter(f"{where}.output")
    output = item["output"]
    if not isinstance(output, str):
        output = _check_parts(output, f"{where}.output", _INPUT_PARTS)
    return {
        "id": item.get("id") or _new_id("fco"),
        "type": "function_call_output",
        "call_id": call_id,
        "output": output,
        "status": "completed",
    }


def _function_call(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    _extra_keys(item, _FUNCTION_CALL_FIELDS, where)
    _check_status(item, where)
    return {
        "id": item.get("id") or _new_id("fc"),
        "type": "function_call",
        "call_id": _required_string(item, "call_id", where),
        "name": _required_string(item, "name", where),
        "arguments": _required_string(item, "arguments", where),
        "status": "completed",
    }


def _reasoning(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    _extra_keys(item, _REASONING_FIELDS, where)
    _check_status(item, where)
    _required_string(item, "id", where)
    for name, kind in (("summary", "summary_text"), ("content", "reasoning_text")):
        entries = item.get(name)
        if entries is None:
            if name == "summary":
                raise missing_parameter(f"{where}.summary")
            continue
        if not isinstance(entries, list):
            raise _bad_type(f"{where}.{name}", "an array", entries)
        for j, entry in enumerate(entries):
            at = f"{where}.{name}[{j}]"
            if not isinstance(entry, dict):
                raise _bad_type(at, "an object", entry)
            _extra_keys(entry, frozenset({"type", "text"}), at)
            if entry.get("type") != kind:
                raise _bad_value(f"{at}.type", entry.get("type"), (kind,))
            _required_string(entry, "text", at)
    encrypted = item.get("encrypted_content")
    if encrypted is not None and not isinstance(encrypted, str):
        raise _bad_type(f"{where}.encrypted_content", "a string", encrypted)
    return {**item}


def _check_input(
    value: Any, earlier: list[dict[str, Any]], pending: Iterable[str], *, answered: bool
) -> list[dict[str, Any]]:
    """The input as stored items (with ids). `earlier`: the stored conversation it continues;
    `pending`: the call ids the previous response left open; `answered`: whether every function
    call must have its output (a create call) or not (counting tokens)."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise _bad_type("input", "a string or an array of input items", value)
    if not value:
        raise RequestError(
            "Invalid 'input': empty array. Expected an array with minimum length 1, but got an "
            "empty array instead.",
            param="input",
            code="empty_array",
        )
    calls = {item["call_id"] for item in earlier if item.get("type") == "function_call"}
    open_calls = dict.fromkeys(pending)
    items = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad_type(where, "an object", item)
        kind = item.get("type", "message")
        if kind == "message":
            items.append(_message(item, where))
        elif kind == "function_call":
            call = _function_call(item, where)
            calls.add(call["call_id"])
            open_calls[call["call_id"]] = None
            items.append(call)
        elif kind == "function_call_output":
            out = _function_output(item, where)
            if out["call_id"] not in calls:
                raise RequestError(
                    f"No tool call found for function call output with call_id {out['call_id']}.",
                    param="input",
                )
            open_calls.pop(out["call_id"], None)
            items.append(out)
        elif kind == "reasoning":
            items.append(_reasoning(item, where))
        elif isinstance(kind, str):
            raise _unserved(f"{where}.type", f"The input item type {kind!r}")
        else:
            raise _bad_type(f"{where}.type", "a string", kind)
    if answered and open_calls:
        raise RequestError(
            f"No tool output found for function call {next(iter(open_calls))}.", param="input"
        )
    return items


def _context_bytes(instructions: str | None, items: Iterable[Mapping[str, Any]]) -> int:
    """The text the model reads, in UTF-8 bytes (what the usage estimate counts)."""
    texts: list[str] = [instructions] if instructions else []
    for item in items:
        kind = item.get("type")
        if kind == "message":
            for part in item["content"]:
                text = part.get("text", part.get("refusal"))
                if isinstance(text, str):
                    texts.append(text)
        elif kind == "function_call":
            texts += (item["name"], item["arguments"])
        elif kind == "function_call_output":
            output = item["output"]
            if isinstance(output, str):
                texts.append(output)
            else:
                texts += (p["text"] for p in output if isinstance(p.get("text"), str))
        elif kind == "reasoning":
            texts += (s["text"] for s in item.get("summary") or ())
    return sum(len(text.encode()) for text in texts)


# -- the answer -----------------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}{uuid.uuid4().hex[:16]}"


def _fake_value(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return "fake"
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    defaults: dict[str, Any] = {
        "integer": 0,
        "number": 0,
        "boolean": False,
        "array": [],
        "object": {},
    }
    return defaults.get(str(kind), "fake")


def fake_arguments(tool: Mapping[str, Any]) -> str:
    """The call's arguments: the tool's required properties filled ("fake" for strings)."""
    parameters = tool.get("parameters") or {}
    properties = parameters.get("properties") or {}
    required = parameters.get("required") or []
    args = {name: _fake_value(properties.get(name)) for name in required if isinstance(name, str)}
    return orjson.dumps(args).decode()


def _usage(input_tokens: int, output_tokens: int, reasoning: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        # The SDK's model requires cache_write_tokens next to cached_tokens.
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": min(reasoning, output_tokens)},
        "total_tokens": input_tokens + output_tokens,
    }


def _failure(headers: Mapping[str, str]) -> tuple[str, int] | None:
    raw = headers.get(FAILED_HEADER)
    if raw is None:
        return None
    code, _, after = raw.strip().partition(":")
    if code not in _FAILURE_CODES or (after and not after.isdigit()):
        raise RequestError(
            f"invalid {FAILED_HEADER} header {raw!r}: expected CODE[:N], CODE one of "
            f"{sorted(_FAILURE_CODES)}",
            code="invalid_fake_header",
        )
    return code, int(after) if after else _DEFAULT_FAILED_AFTER


def _event(payload: dict[str, Any]) -> bytes:
    return b"event: " + payload["type"].encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _obfuscation(delta: str) -> str:
    # Padding the reference adds to delta events so their sizes do not give their text away.
    return "".join(random.choices(_OBFUSCATION_CHARS, k=max(1, 16 - len(delta) % 16)))


@dataclass
class _Stored:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    # The conversation up to and including this response's output (for previous_response_id).
    context: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Plan:
    """What a create call answers, decided before any waiting."""

    response: dict[str, Any]  # the final response
    stream: bool
    pieces: list[str]  # the streamed text or argument pieces
    count: int  # output tokens (pacing)
    stored: _Stored | None
    failure: tuple[str, int] | None
    obfuscate: bool


class _StreamEnded(Exception):
    """The stream ended early (x-fake-response-failed); its last event is sent."""


class _Events:
    """One answer's event stream: numbers the events, fails it where asked, paces the pieces."""

    def __init__(
        self,
        request: web.Request,
        ctx: RequestSettings,
        out: EventWriter,
        first_at: float,
        failure: tuple[str, int] | None,
        on_failed: Callable[[dict[str, Any]], None],
    ) -> None:
        self.request, self.ctx, self.out, self.first_at = request, ctx, out, first_at
        self.failure, self.on_failed = failure, on_failed
        self.sequence = 0
        self.shell: dict[str, Any] = {}

    async def emit(self, payload: dict[str, Any], *, last: bool = False) -> None:
        if self.failure is not None and self.sequence == self.failure[1]:
            await self._fail(self.failure[0])
        payload["sequence_number"] = self.sequence
        self.sequence += 1
        await self.out.send(_event(payload), last=last)

    async def _fail(self, code: str) -> None:
        error = {"code": code, "message": f"{_FAILURE_CODES[code][2]} (injected by fake-llm)."}
        failed = {**self.shell, "status": "failed", "error": error}
        self.on_failed(failed)
        payload = {"type": "response.failed", "response": failed, "sequence_number": self.sequence}
        await self.out.send(_event(payload), last=True)
        raise _StreamEnded

    async def pace(self, index: int) -> None:
        tps = self.ctx.tokens_per_second
        if tps > 0 and index:
            await sleep_until(self.request, self.first_at + self.out.stalled + index / tps)


class ResponsesAPI:
    """The Responses endpoints of one fake instance, with the responses it stored."""

    def __init__(self, fake: FakeLLM) -> None:
        self.fake = fake
        self.stored: OrderedDict[str, _Stored] = OrderedDict()

    def _store(self, entry: _Stored) -> None:
        self.stored[entry.response["id"]] = entry
        self.stored.move_to_end(entry.response["id"])
        while len(self.stored) > _MAX_STORED:
            self.stored.popitem(last=False)

    def _previous(self, body: Mapping[str, Any]) -> _Stored | None:
        previous_id = body.get("previous_response_id")
        if previous_id is None:
            return None
        if not isinstance(previous_id, str):
            raise _bad_type("previous_response_id", "a string", previous_id)
        found = self.stored.get(previous_id)
        if found is None:
            raise RequestError(
                f"Previous response with id '{previous_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
                status=404,
            )
        return found

    # ----- POST /v1/responses

    async def create(
        self, request: web.Request, ctx: RequestSettings, raw_body: Any
    ) -> web.StreamResponse:
        plan = self._plan(require_object(raw_body), ctx, request.headers)
        if plan.stream:
            return await self._stream(request, ctx, plan)
        await self.fake.wait_generation(request, ctx, plan.count)
        await non_stream_fault(request, ctx.fault, self.fake.settings.stall_seconds)
        if plan.failure is not None:
            status, kind, message = _FAILURE_CODES[plan.failure[0]]
            return error_response(
                status, f"{message} (injected by fake-llm).", type_=kind, code=plan.failure[0]
            )
        if plan.stored is not None:
            self._store(plan.stored)
        return json_response(plan.response)

    def _plan(
        self, body: dict[str, Any], ctx: RequestSettings, headers: Mapping[str, str]
    ) -> _Plan:
        _extra_keys(body, _CREATE_FIELDS, "")
        if body.get("model") is None:
            raise missing_parameter("model")
        model = body["model"]
        if not isinstance(model, str) or not model:
            raise _bad_type("model", "a string", model)
        for name in _UNSERVED:
            if body.get(name) is not None:
                raise _unserved(name, f"'{name}'")
        if _optional(body, "background", bool, "a boolean"):
            raise _unserved("background", "Background mode")
        stream = bool(_optional(body, "stream", bool, "a boolean"))
        store = _optional(body, "store", bool, "a boolean") is not False
        parallel = _optional(body, "parallel_tool_calls", bool, "a boolean")
        instructions = _optional(body, "instructions", str, "a string")
        for name in ("user", "safety_identifier", "prompt_cache_key"):
            _optional(body, name, str, "a string")
        options = _optional(body, "stream_options", dict, "an object") or {}
        if options and not stream:
            raise RequestError(
                "Invalid 'stream_options': only allowed when 'stream' is true.",
                param="stream_options",
                code="invalid_value",
            )
        _extra_keys(options, frozenset({"include_obfuscation"}), "stream_options")
        include = _optional(body, "include", list, "an array")
        if include is not None and not all(isinstance(i, str) for i in include):
            raise _bad_type("include", "an array of strings", include)
        _optional(body, "reasoning", dict, "an object")
        _optional(body, "text", dict, "an object")
        _optional(body, "context_management", list, "an array")
        temperature = _number(body, "temperature", 0.0, 2.0)
        top_p = _number(body, "top_p", 0.0, 1.0)
        _integer(body, "top_logprobs", 0, 20)
        _integer(body, "max_tool_calls", 1)
        cap = _integer(body, "max_output_tokens", 16)
        truncation = body.get("truncation")
        if truncation is not None and truncation not in ("auto", "disabled"):
            raise _bad_value("truncation", truncation, ("auto", "disabled"))
        tier = body.get("service_tier")
        if tier is not None and tier not in _SERVICE_TIERS:
            raise _bad_value("service_tier", tier, _SERVICE_TIERS)
        _check_metadata(body.get("metadata"))
        tools = _check_tools(body.get("tools"))
        forced = _forced_function(body.get("tool_choice"), tools)
        previous = self._previous(body)
        earlier = previous.context if previous is not None else []
        pending = (
            [i["call_id"] for i in previous.response["output"] if i["type"] == "function_call"]
            if previous is not None
            else []
        )
        if body.get("input") is None:
            raise missing_parameter("input")
        items = _check_input(body["input"], earlier, pending, answered=True)
        failure = _failure(headers)

        input_tokens = estimate_tokens(_context_bytes(instructions, [*earlier, *items]))
        if items[-1]["type"] == "function_call_output":
            forced = None  # the model answers the function's output
        status, incomplete = "completed", None
        if forced is not None:
            tool = next(t for t in tools if t["name"] == forced)
            arguments = fake_arguments(tool)
            output_item: dict[str, Any] = {
                "id": _new_id("fc"),
                "type": "function_call",
                "status": "completed",
                "arguments": arguments,
                "call_id": f"call_{uuid.uuid4().hex[:24]}",
                "name": forced,
            }
            pieces = text_pieces(arguments, ctx.chunk_chars)
            count = output_tokens = estimate_tokens(len(arguments.encode()))
        else:
            if ctx.text is not None:
                # As the chat endpoint: the text asked for, whole, whatever the cap.
                pieces = text_pieces(ctx.text, ctx.chunk_chars)
                text, count = ctx.text, len(pieces)
            else:
                count = ctx.tokens
                if cap is not None and cap < count:
                    count, status = cap, "incomplete"
                    incomplete = {"reason": "max_output_tokens"}
                VOCAB.ensure(count)
                pieces, text = VOCAB.words[:count], content(count)
            output_tokens = count
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            output_item = {
                "id": _new_id("msg"),
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": [part],
            }
        now = int(time.time())
        usage = _usage(input_tokens, output_tokens, ctx.reasoning_tokens)
        response: dict[str, Any] = {
            "id": _new_id("resp"),
            "object": "response",
            "created_at": now,
            "status": status,
            "background": False,
            "completed_at": now if status == "completed" else None,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": instructions,
            "max_output_tokens": cap,
            "max_tool_calls": body.get("max_tool_calls"),
            "model": model,
            "output": [output_item],
            "parallel_tool_calls": parallel is not False,
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": body.get("prompt_cache_key"),
            "prompt_cache_retention": body.get("prompt_cache_retention"),
            "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
            "safety_identifier": body.get("safety_identifier"),
            "service_tier": "default" if tier in (None, "auto") else tier,
            "store": store,
            "temperature": 1.0 if temperature is None else temperature,
            "text": body.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": tools,
            "top_logprobs": body.get("top_logprobs") or 0,
            "top_p": 1.0 if top_p is None else top_p,
            "truncation": truncation or "disabled",
            "usage": None if ctx.no_usage else usage,
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }
        stored = _Stored(response, items, [*earlier, *items, output_item]) if store else None
        obfuscate = options.get("include_obfuscation") is not False
        return _Plan(response, stream, pieces, count, stored, failure, obfuscate)

    async def _stream(
        self, request: web.Request, ctx: RequestSettings, plan: _Plan
    ) -> web.StreamResponse:
        final, stored = plan.response, plan.stored
        shell = {
            **final,
            "status": "in_progress",
            "completed_at": None,
            "incomplete_details": None,
            "output": [],
            "usage": None,
        }
        settled = False

        def on_failed(failed: dict[str, Any]) -> None:
            nonlocal settled
            settled = True
            if stored is not None:
                self._store(_Stored(failed, stored.input_items, stored.context[:-1]))

        response, out, first_at = await open_event_stream(
            request, ctx.ttft, ctx.fault, self.fake.settings.stall_seconds
        )
        events = _Events(request, ctx, out, first_at, plan.failure, on_failed)
        events.shell = shell
        if stored is not None:
            # Kept from the start, as OpenAI keeps it (a GET meanwhile shows it in progress).
            self._store(_Stored(shell, stored.input_items, stored.context))
        try:
            await events.emit({"type": "response.created", "response": shell})
            await events.emit({"type": "response.in_progress", "response": shell})
            item = final["output"][0]
            if item["type"] == "message":
                await _stream_message(events, plan, item)
            else:
                await _stream_call(events, plan, item)
            done = "response.completed" if final["status"] == "completed" else "response.incomplete"
            await events.emit({"type": done, "response": final}, last=True)
        except _StreamEnded:
            pass
        finally:
            # A client gone midway does not stop OpenAI's generation: the response completes.
            if stored is not None and not settled:
                self._store(stored)
        await response.write_eof()
        return response

    # ----- the stored responses

    def _find(self, request: web.Request) -> _Stored:
        response_id = request.match_info["response_id"]
        found = self.stored.get(response_id)
        if found is None:
            raise _not_found(response_id)
        return found

    async def retrieve(
        self, request: web.Request, _ctx: RequestSettings, _body: Any
    ) -> web.Response:
        return json_response(self._find(request).response)

    async def delete(self, request: web.Request, _ctx: RequestSettings, _body: Any) -> web.Response:
        found = self._find(request)
        response_id = found.response["id"]
        del self.stored[response_id]
        return json_response({"id": response_id, "object": "response.deleted", "deleted": True})

    async def input_items(
        self, request: web.Request, _ctx: RequestSettings, _body: Any
    ) -> web.Response:
        found = self._find(request)
        query = request.query
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise _bad_value("order", order, ("asc", "desc"))
        raw_limit = query.get("limit", "20")
        limit = int(raw_limit) if raw_limit.isdigit() else -1
        if not 1 <= limit <= 100:
            raise RequestError(
                f"Invalid 'limit': expected an integer between 1 and 100, got {raw_limit!r}.",
                param="limit",
                code="invalid_value",
            )
        items = found.input_items if order == "asc" else found.input_items[::-1]
        after = query.get("after")
        if after is not None:
            at = next((i for i, item in enumerate(items) if item.get("id") == after), None)
            if at is None:
                raise RequestError(
                    f"Invalid 'after': no input item with id '{after}'.", param="after"
                )
            items = items[at + 1 :]
        page = items[:limit]
        return json_response(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(items) > limit,
            }
        )

    async def input_tokens(
        self, _request: web.Request, _ctx: RequestSettings, raw_body: Any
    ) -> web.Response:
        body = require_object(raw_body)
        _extra_keys(body, _COUNT_FIELDS, "")
        _optional(body, "model", str, "a string")
        if body.get("conversation") is not None:
            raise _unserved("conversation", "'conversation'")
        instructions = _optional(body, "instructions", str, "a string")
        _forced_function(body.get("tool_choice"), _check_tools(body.get("tools")))
        previous = self._previous(body)
        earlier = previous.context if previous is not None else []
        items = (
            _check_input(body["input"], earlier, (), answered=False)
            if body.get("input") is not None
            else []
        )
        tokens = estimate_tokens(_context_bytes(instructions, [*earlier, *items]))
        return json_response({"object": "response.input_tokens", "input_tokens": tokens})


async def _stream_message(events: _Events, plan: _Plan, item: dict[str, Any]) -> None:
    ids = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    added = {**item, "status": "in_progress", "content": []}
    await events.emit({"type": "response.output_item.added", "output_index": 0, "item": added})
    empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    await events.emit({"type": "response.content_part.added", **ids, "part": empty})
    for i, piece in enumerate(plan.pieces):
        await events.pace(i)
        delta = {"type": "response.output_text.delta", **ids, "delta": piece, "logprobs": []}
        if plan.obfuscate:
            delta["obfuscation"] = _obfuscation(piece)
        await events.emit(delta)
    part = item["content"][0]
    await events.emit(
        {"type": "response.output_text.done", **ids, "text": part["text"], "logprobs": []}
    )
    await events.emit({"type": "response.content_part.done", **ids, "part": part})
    await events.emit({"type": "response.output_item.done", "output_index": 0, "item": item})


async def _stream_call(events: _Events, plan: _Plan, item: dict[str, Any]) -> None:
    ids = {"item_id": item["id"], "output_index": 0}
    added = {**item, "status": "in_progress", "arguments": ""}
    await events.emit({"type": "response.output_item.added", "output_index": 0, "item": added})
    for i, piece in enumerate(plan.pieces):
        await events.pace(i)
        delta = {"type": "response.function_call_arguments.delta", **ids, "delta": piece}
        if plan.obfuscate:
            delta["obfuscation"] = _obfuscation(piece)
        await events.emit(delta)
    done = {"type": "response.function_call_arguments.done", **ids, "arguments": item["arguments"]}
    await events.emit(done)
    await events.emit({"type": "response.output_item.done", "output_index": 0, "item": item})
