"""Tool calling on the fake's OpenAI chat completions (`endpoints.FakeLLM.chat_completions`),
after OpenAI's API reference.

The request is checked as OpenAI checks it (a 400 in OpenAI's error shape, with `param`):
`tools` a non-empty list of function tools, `tool_choice` one of ``none``, ``auto``,
``required`` or a named function among the tools (and only with `tools`), a ``tool`` message
answering a call of the assistant message before it (after that turn's other tool messages),
and every call of an assistant message answered before the next message that is not a tool
message.

A forced tool choice (a named function, or ``required``: then the first tool) is answered with
a call, unless the last message is a tool message (so a conversation ends: after the result
the fake answers with text). Its arguments fill the function's required properties: strings
with ``"fake"``, numbers with 1, booleans with true, arrays with ``[]``, objects with their own
required properties (an enum or a const: its first value). ``x-fake-parallel-tools: N``
(N >= 2, and `parallel_tool_calls` not false) makes it N calls: of the named function, or, for
``required``, of the first N tools (cycling through them). Streamed as OpenAI streams calls:
the first chunk holds the role and the first call's id and name, the arguments follow in about
three pieces, each further call starts with its own chunk, and the finish reason is
``tool_calls``.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .wire import RequestError, estimate_tokens, is_int

PARALLEL_HEADER = "x-fake-parallel-tools"
_NAME = re.compile(r"^[a-zA-Z0-9_-]+$")
_MAX_NAME = 64
_CHOICES = ("none", "auto", "required")
_TOOL_KEYS = frozenset({"type", "function"})
_FUNCTION_KEYS = frozenset({"name", "description", "parameters", "strict"})
# How many pieces a call's arguments are streamed in.
_ARGUMENT_PIECES = 3
# Deep enough for any schema a test writes; stops a self-referencing $ref.
_MAX_DEPTH = 16


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object


# -- the request --------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if is_int(value):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _missing(path: str, param: str) -> RequestError:
    return RequestError(
        f"Missing required parameter: '{path}'.", param=param, code="missing_required_parameter"
    )


def _wrong_type(path: str, param: str, expected: str, value: Any) -> RequestError:
    return RequestError(
        f"Invalid type for '{path}': expected {expected}, but got {_a(_json_type(value))} instead.",
        param=param,
        code="invalid_type",
    )


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _unknown(path: str, param: str) -> RequestError:
    return RequestError(f"Unknown parameter: '{path}'.", param=param, code="unknown_parameter")


def check_request(body: Mapping[str, Any], messages: list[Any]) -> None:
    """Raises the 400 OpenAI answers a request's tools, tool choice or tool turns with."""
    names = _check_tools(body.get("tools"))
    _check_choice(body.get("tool_choice"), names)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _wrong_type("parallel_tool_calls", "parallel_tool_calls", "a boolean", parallel)
    _check_turns(messages)


def _check_tools(tools: Any) -> list[str] | None:
    """The tools' names (None: no tools)."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _wrong_type("tools", "tools", "an array of objects", tools)
    if not tools:
        raise RequestError(
            "Invalid 'tools': empty array. Expected an array with minimum length 1, but got an "
            "empty array instead.",
            param="tools",
            code="empty_array",
        )
    names = []
    for k, tool in enumerate(tools):
        at = f"tools[{k}]"
        if not isinstance(tool, dict):
            raise _wrong_type(at, at, "an object", tool)
        for key in tool:
            if key not in _TOOL_KEYS:
                raise _unknown(f"{at}.{key}", f"{at}.{key}")
        if "type" not in tool:
            raise _missing(f"{at}.type", f"{at}.type")
        if tool["type"] != "function":
            raise RequestError(
                f"Invalid value: {orjson.dumps(tool['type']).decode()}. Supported values are: "
                "'function'.",
                param=f"{at}.type",
                code="invalid_value",
            )
        function = tool.get("function")
        if function is None:
            raise _missing(f"{at}.function", f"{at}.function")
        names.append(_check_function(function, f"{at}.function"))
    return names


def _check_function(function: Any, at: str) -> str:
    if not isinstance(function, dict):
        raise _wrong_type(at, at, "an object", function)
    for key in function:
        if key not in _FUNCTION_KEYS:
            raise _unknown(f"{at}.{key}", f"{at}.{key}")
    name = function.get("name")
    if name is None:
        raise _missing(f"{at}.name", f"{at}.name")
    if not isinstance(name, str):
        raise _wrong_type(f"{at}.name", f"{at}.name", "a string", name)
    if len(name) > _MAX_NAME:
        raise RequestError(
            f"Invalid '{at}.name': string too long. Expected a string with maximum length "
            f"{_MAX_NAME}, but got a string with length {len(name)} instead.",
            param=f"{at}.name",
            code="string_above_max_length",
        )
    if not _NAME.match(name):
        raise RequestError(
            f"Invalid '{at}.name': string does not match pattern. Expected a string that "
            f"matches the pattern '{_NAME.pattern}'.",
            param=f"{at}.name",
            code="invalid_value",
        )
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise _wrong_type(f"{at}.description", f"{at}.description", "a string", description)
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise _wrong_type(f"{at}.parameters", f"{at}.parameters", "an object", parameters)
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _wrong_type(f"{at}.strict", f"{at}.strict", "a boolean", strict)
    return name


def _check_choice(choice: Any, names: list[str] | None) -> None:
    if choice is None:
        return
    if names is None:
        raise RequestError(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
            "specified.",
            param="tool_choice",
        )
    if isinstance(choice, str):
        if choice not in _CHOICES:
            raise RequestError(
                f"Invalid value: {orjson.dumps(choice).decode()}. Supported values are: "
                "'none', 'auto', and 'required'.",
                param="tool_choice",
                code="invalid_value",
            )
        return
    if not isinstance(choice, dict):
        raise _wrong_type("tool_choice", "tool_choice", "a string or an object", choice)
    for key in choice:
        if key not in _TOOL_KEYS:
            raise _unknown(f"tool_choice.{key}", f"tool_choice.{key}")
    if "type" not in choice:
        raise _missing("tool_choice.type", "tool_choice.type")
    if choice["type"] != "function":
        raise RequestError(
            f"Invalid value: {orjson.dumps(choice['type']).decode()}. Supported values are: "
            "'function'.",
            param="tool_choice.type",
            code="invalid_value",
        )
    function = choice.get("function")
    if function is None:
        raise _missing("tool_choice.function", "tool_choice.function")
    if not isinstance(function, dict):
        raise _wrong_type("tool_choice.function", "tool_choice.function", "an object", function)
    for key in function:
        if key != "name":
            raise _unknown(f"tool_choice.function.{key}", f"tool_choice.function.{key}")
    name = function.get("name")
    if name is None:
        raise _missing("tool_choice.function.name", "tool_choice.function.name")
    if not isinstance(name, str):
        param = "tool_choice.function.name"
        raise _wrong_type(param, param, "a string", name)
    if name not in names:
        raise RequestError(
            f"Invalid value for 'tool_choice': function {name!r} is not one of the 'tools'.",
            param="tool_choice",
            code="invalid_value",
        )


def _check_turns(messages: list[Any]) -> None:
    """The tool calls of each assistant message, and the tool messages answering them."""
    turn: set[str] | None = None  # the ids the current turn's tool messages may answer
    pending: list[str] = []  # of those, the ids not answered yet
    turn_at = 0  # the assistant message of the current turn
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue  # refused before this (wire.chat_prompt_bytes)
        if message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            if call_id is None:
                raise _missing(f"messages[{i}].tool_call_id", f"messages.[{i}].tool_call_id")
            if not isinstance(call_id, str):
                param = f"messages.[{i}].tool_call_id"
                raise _wrong_type(f"messages[{i}].tool_call_id", param, "a string", call_id)
            if turn is None or call_id not in turn:
                raise RequestError(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    param=f"messages.[{i}].role",
                )
            if call_id in pending:
                pending.remove(call_id)
            continue
        _unanswered(pending, turn_at)
        turn, pending = None, []
        if message.get("role") == "assistant" and message.get("tool_calls") is not None:
            pending = _call_ids(message["tool_calls"], i)
            turn, turn_at = set(pending), i
    _unanswered(pending, turn_at)


def _unanswered(pending: list[str], at: int) -> None:
    if pending:
        raise RequestError(
            "An assistant message with 'tool_calls' must be followed by tool messages "
            "responding to each 'tool_call_id'. The following tool_call_ids did not have "
            f"response messages: {', '.join(pending)}",
            param=f"messages.[{at}].role",
        )


def _call_ids(calls: Any, i: int) -> list[str]:
    """The ids of an assistant message's tool calls, each call checked."""
    at, param = f"messages[{i}].tool_calls", f"messages.[{i}].tool_calls"
    if not isinstance(calls, list):
        raise _wrong_type(at, param, "an array of objects", calls)
    if not calls:
        raise RequestError(
            f"Invalid '{at}': empty array. Expected an array with minimum length 1, but got an "
            "empty array instead.",
            param=param,
            code="empty_array",
        )
    ids = []
    for k, call in enumerate(calls):
        where, where_param = f"{at}[{k}]", f"{param}.[{k}]"
        if not isinstance(call, dict):
            raise _wrong_type(where, where_param, "an object", call)
        for key in ("id", "type", "function"):
            if key not in call:
                raise _missing(f"{where}.{key}", f"{where_param}.{key}")
        if not isinstance(call["id"], str):
            raise _wrong_type(f"{where}.id", f"{where_param}.id", "a string", call["id"])
        if call["type"] != "function":
            raise RequestError(
                f"Invalid value: {orjson.dumps(call['type']).decode()}. Supported values are: "
                "'function'.",
                param=f"{where_param}.type",
                code="invalid_value",
            )
        function = call["function"]
        if not isinstance(function, dict):
            raise _wrong_type(f"{where}.function", f"{where_param}.function", "an object", function)
        for key in ("name", "arguments"):
            if key not in function:
                raise _missing(f"{where}.function.{key}", f"{where_param}.function.{key}")
            if not isinstance(function[key], str):
                path, param = f"{where}.function.{key}", f"{where_param}.function.{key}"
                raise _wrong_type(path, param, "a string", function[key])
        ids.append(call["id"])
    return ids


# -- the answer ---------------------------------------------------------------------------------


def parallel_count(headers: Mapping[str, str]) -> int:
    """How many calls a forced tool choice is answered with (x-fake-parallel-tools)."""
    raw = headers.get(PARALLEL_HEADER)
    if raw is None:
        return 1
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise RequestError(
            f"invalid {PARALLEL_HEADER} header {raw!r}: expected an integer >= 0",
            code="invalid_fake_header",
        )
    return max(1, value)


def forced_calls(body: Mapping[str, Any], headers: Mapping[str, str]) -> list[ToolCall] | None:
    """The calls a checked request is answered with: None unless its tool choice forces a call
    and its last message is not a tool message (a result is answered with text)."""
    count = parallel_count(headers)
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools or choice is None or choice in ("none", "auto"):
        return None
    if body["messages"][-1].get("role") == "tool":
        return None
    if body.get("parallel_tool_calls") is False:
        count = 1
    functions = [tool["function"] for tool in tools]
    if isinstance(choice, dict):
        named = next(f for f in functions if f["name"] == choice["function"]["name"])
        chosen = [named] * count
    else:  # required
        chosen = [functions[k % len(functions)] for k in range(count)]
    return [
        ToolCall(f"call_{uuid.uuid4().hex[:24]}", f["name"], fake_arguments(f.get("parameters")))
        for f in chosen
    ]


def fake_arguments(parameters: Any) -> str:
    """JSON text of an object for a function's parameters (a JSON schema): its required
    properties filled in."""
    if not isinstance(parameters, dict):
        return "{}"
    value = _fill(parameters, parameters, 0)
    return orjson.dumps(value if isinstance(value, dict) else {}).decode()


def _fill(schema: Any, root: dict[str, Any], depth: int) -> Any:
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return _fill(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            usable = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            return _fill((usable or options)[0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "string":
        return "fake"
    if kind in ("number", "integer"):
        return 1
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "null":
        return None
    properties = schema.get("properties")
    required = schema.get("required")
    if not isinstance(properties, dict):
        properties = {}
    if not isinstance(required, list):
        return {}
    return {
        name: _fill(properties.get(name), root, depth + 1)
        for name in required
        if isinstance(name, str)
    }


def completion_tokens(calls: list[ToolCall]) -> int:
    return estimate_tokens(sum(len(call.arguments.encode()) for call in calls))


def message(calls: list[ToolCall]) -> dict[str, Any]:
    """The assistant message of a non-streamed answer."""
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in calls
        ],
        "refusal": None,
    }


def _pieces(text: str) -> list[str]:
    size = max(1, math.ceil(len(text) / _ARGUMENT_PIECES))
    return [text[i : i + size] for i in range(0, len(text), size)]


def stream_deltas(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """The deltas of a streamed answer, in order: the first holds the role and the first
    call's start (as OpenAI's do), then each call's arguments in pieces, each further call
    starting with a delta of its own."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(calls):
        start = {
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        if index == 0:
            deltas.append(
                {"role": "assistant", "content": None, "tool_calls": [start], "refusal": None}
            )
        else:
            deltas.append({"tool_calls": [start]})
        for piece in _pieces(call.arguments):
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    return deltas
