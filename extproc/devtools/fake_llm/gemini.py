"""Google's Gemini API (`POST /v1beta/models/{model}:generateContent`, and
`:streamGenerateContent?alt=sse`) as the fake speaks it, after Google's published reference;
Vertex AI's (`/v1/projects/{p}/locations/{l}/publishers/google/models/{model}:...`) is the same
bodies under another prefix. The request is checked as strictly as Google checks it (an unknown
field, a part without exactly one data field, a role other than user and model, a function
response that answers no function call of the turn before, a generation setting out of its
range, a function call of the current turn without its thought signature for a model that
validates them: 400 INVALID_ARGUMENT in Google's error shape), the answer comes as a
GenerateContentResponse or as its event stream (`data: {...}` events separated by CRLF pairs,
usageMetadata on every event: the prompt's count, and the whole report on the last).

Google's JSON parser takes a field's proto name as well as its JSON name (`system_instruction`
for `systemInstruction`); so does the fake. A credential is required: an API key
(`x-goog-api-key`, or the `key` query parameter) or a bearer token (an OAuth2 access token, as
Vertex AI takes); which one is recorded (the record's `credential`). A request that sets
`toolConfig.functionCallingConfig.mode` ANY is answered with a function call (the first
allowed function's), carrying a thought signature as Gemini's thinking models do.

Thought signatures, as Google's thought-signatures guide has Gemini 3 check them: for a model
after Gemini 2.x (`gemini-` and not `gemini-1`/`gemini-2`), the first function call of each
model turn of the current turn (from the last user turn holding more than function responses
on) must carry a `thoughtSignature`, else 400 INVALID_ARGUMENT; any base64 value is taken (the
fake cannot tell its own signatures from Google's placeholder for calls Gemini did not make,
`skip_thought_signature_validator`, or from another's). Earlier turns, and other models, are
not checked.

Embeddings (`embed`): the Gemini API's `:embedContent` and `:batchEmbedContents` (at most 100
requests, each naming the batch's model; no usage in the answer), Vertex AI's `:embedContent`
(its fields at the top or in `embedContentConfig`, `usageMetadata` in the answer) and
`:predict` (`instances` of `{content, task_type, title}`, at most 250, one for
gemini-embedding-001; each prediction's `statistics.token_count`). Vectors are the OpenAI
endpoint's deterministic unit vectors, of the model's size (3072 for Gemini's embedding models,
768 for the others) or the `outputDimensionality` asked; on Vertex AI a text over 2048 tokens
is cut (`truncated`), or refused when `autoTruncate` is false.

Faults (`x-fake-fault`, `--fault`) answer in Google's shape: 429 RESOURCE_EXHAUSTED, 500
INTERNAL, 503 UNAVAILABLE; resets and stalls as on the OpenAI endpoints (`reset-after:N`: a
stream cut midway).
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections import Counter
from typing import Any

import orjson
from aiohttp import web

from .faults import (
    Fault,
    non_stream_fault,
    open_event_stream,
    pause,
    reset_connection,
    sleep_until,
)
from .identity import Issuer
from .settings import RequestSettings
from .wire import (
    MALFORMED,
    embedding,
    estimate_tokens,
    is_int,
    json_response,
    text_pieces,
    word_pieces,
)

_GEMINI_PREFIX = re.compile(r"^(v1|v1beta|v1alpha)$")
# A project's location, or none (Vertex AI's express mode, with an API key).
_VERTEX_PREFIX = re.compile(r"^(v1|v1beta1)(/projects/[^/]+/locations/[^/]+)?/publishers/google$")
_METHODS = {"generateContent": False, "streamGenerateContent": True}

_TOP_LEVEL = frozenset(
    {
        "contents", "tools", "toolConfig", "safetySettings", "systemInstruction",
        "generationConfig", "cachedContent",
    }
)  # fmt: skip
_VERTEX_TOP_LEVEL = _TOP_LEVEL | {"labels"}
_DATA_FIELDS = (
    "text", "inlineData", "functionCall", "functionResponse", "fileData", "executableCode",
    "codeExecutionResult",
)  # fmt: skip
_PART_FIELDS = frozenset(
    {*_DATA_FIELDS, "thought", "thoughtSignature", "videoMetadata", "partMetadata",
     "mediaResolution"}
)  # fmt: skip
_GENERATION_CONFIG = frozenset(
    {
        "stopSequences", "responseMimeType", "responseSchema", "responseJsonSchema",
        "responseModalities", "candidateCount", "maxOutputTokens", "temperature", "topP", "topK",
        "seed", "presencePenalty", "frequencyPenalty", "responseLogprobs", "logprobs",
        "enableEnhancedCivicAnswers", "speechConfig", "thinkingConfig", "imageConfig",
        "mediaResolution",
    }
)  # fmt: skip
_TOOL_FIELDS = frozenset(
    {
        "functionDeclarations", "googleSearchRetrieval", "codeExecution", "googleSearch",
        "urlContext", "computerUse", "fileSearch", "googleMaps",
    }
)  # fmt: skip
_DECLARATION_FIELDS = frozenset(
    {"name", "description", "behavior", "parameters", "parametersJsonSchema", "response",
     "responseJsonSchema"}
)  # fmt: skip
# The OpenAPI 3.0 subset `Schema` is (`parameters`, `responseSchema`).
_SCHEMA_FIELDS = frozenset(
    {
        "type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems",
        "properties", "required", "minProperties", "maxProperties", "minLength", "maxLength",
        "pattern", "example", "anyOf", "propertyOrdering", "default", "items", "minimum",
        "maximum",
    }
)  # fmt: skip
_SCHEMA_TYPES = frozenset(
    {"TYPE_UNSPECIFIED", "STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "NULL"}
)
_MODES = frozenset({"MODE_UNSPECIFIED", "AUTO", "ANY", "NONE", "VALIDATED"})
_MIME_TYPES = frozenset({"text/plain", "application/json", "text/x.enum"})
_INLINE_TYPES = re.compile(
    r"^(image/(png|jpeg|webp|heic|heif)|application/pdf|text/[\w.+-]+|audio/[\w.+-]+"
    r"|video/[\w.+-]+)$"
)
_FUNCTION_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_.:-]{0,63}$")
# Models before Gemini 3, which do not validate thought signatures.
_UNSIGNED_MODELS = re.compile(r"^gemini-[12](?:[.-]|$)")
# What the fake's function calls carry as their thought signature (base64, as Gemini's).
SIGNATURE = base64.b64encode(b"fake-llm thought signature").decode()


class GeminiError(Exception):
    def __init__(self, message: str, status: str = "INVALID_ARGUMENT", code: int = 400):
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


def error_response(err: GeminiError, details: list[Any] | None = None) -> web.Response:
    body: dict[str, Any] = {
        "error": {"code": err.code, "message": err.message, "status": err.status}
    }
    if details:
        body["error"]["details"] = details
    return json_response(body, status=err.code)


# -- the request --------------------------------------------------------------------------------


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word[:1].upper() + word[1:] for word in rest)


def _fields(obj: Any, allowed: frozenset[str], where: str) -> dict[str, Any]:
    """A message's fields by their JSON names (Google's parser takes the proto names too);
    an unknown one is refused as Google refuses it."""
    if not isinstance(obj, dict):
        raise GeminiError(
            f"Invalid value at '{where}', expected an object: {orjson.dumps(obj).decode()[:80]}"
        )
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = key if key in allowed else _camel(key)
        if name not in allowed:
            at = f" at '{where}'" if where else ""
            raise GeminiError(
                f'Invalid JSON payload received. Unknown name "{key}"{at}: Cannot find field.'
            )
        if name in out:
            raise GeminiError(
                f'Invalid JSON payload received. Duplicate field "{name}"'
                + (f" at '{where}'" if where else "")
            )
        out[name] = value
    return out


def _at(where: str, name: str) -> str:
    """A field's path as Google's messages give it (proto names)."""
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    return f"{where}.{snake}" if where else snake


def _number(obj: dict[str, Any], name: str, where: str, low: float, high: float) -> None:
    value = obj.get(name)
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise GeminiError(f"Invalid value at '{_at(where, name)}' (TYPE_FLOAT), {value!r}")
    if not low <= value <= high:
        raise GeminiError(
            f"* GenerateContentRequest.{_at(where, name)}: must be in the range [{low}, {high}]"
        )


def _integer(obj: dict[str, Any], name: str, where: str, low: int, high: int | None = None) -> None:
    value = obj.get(name)
    if value is None:
        return
    if not is_int(value):
        raise GeminiError(f"Invalid value at '{_at(where, name)}' (TYPE_INT32), {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise GeminiError(f"* GenerateContentRequest.{_at(where, name)}: must be {bound}")


def _base64(value: Any, where: str) -> None:
    if not isinstance(value, str) or not value:
        raise GeminiError(f"* GenerateContentRequest.{where}: bytes required")
    try:
        base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise GeminiError(
            f"Invalid value at '{where}' (TYPE_BYTES), Base64 decoding failed"
        ) from None


def check_request(raw: Any, vertex: bool) -> dict[str, Any]:
    """The request by its JSON field names; raises the 400 Google would answer with."""
    if raw is MALFORMED or raw is None:
        raise GeminiError("Invalid JSON payload received. Unexpected token.")
    body = _fields(raw, _VERTEX_TOP_LEVEL if vertex else _TOP_LEVEL, "")
    names = _check_tools(body)
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise GeminiError("* GenerateContentRequest.contents: contents is not specified")
    body["contents"] = [_content(c, f"contents[{i}]") for i, c in enumerate(contents)]
    _check_turns(body["contents"])
    if body.get("systemInstruction") is not None:
        system = _content(body["systemInstruction"], "system_instruction")
        if any("text" not in part for part in system["parts"]):
            raise GeminiError("* GenerateContentRequest.system_instruction: only text is allowed")
        body["systemInstruction"] = system
    if body.get("generationConfig") is not None:
        body["generationConfig"] = _generation_config(body["generationConfig"])
    _check_tool_config(body, names)
    for k, setting in enumerate(body.get("safetySettings") or ()):
        _fields(setting, frozenset({"category", "threshold", "method"}), f"safety_settings[{k}]")
    cached = body.get("cachedContent")
    if cached is not None and not (
        isinstance(cached, str) and cached.startswith("cachedContents/")
    ):
        raise GeminiError("* GenerateContentRequest.cached_content: invalid resource name")
    return body


def _content(raw: Any, where: str) -> dict[str, Any]:
    turn = _fields(raw, frozenset({"parts", "role"}), where)
    role = turn.get("role", "")
    if role not in ("", "user", "model"):
        raise GeminiError("Please use a valid role: user, model.")
    parts = turn.get("parts")
    if not isinstance(parts, list) or not parts:
        raise GeminiError(
            f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty."
        )
    turn["parts"] = [_part(p, f"{where}.parts[{j}]") for j, p in enumerate(parts)]
    return turn


def _part(raw: Any, where: str) -> dict[str, Any]:
    part = _fields(raw, _PART_FIELDS, where)
    # proto3: an empty string is no value, so an empty text sets no data field.
    present = [f for f in _DATA_FIELDS if part.get(f) not in (None, "")]
    if not present:
        raise GeminiError(
            f"* GenerateContentRequest.{where}.data: required oneof field 'data' must have one "
            "initialized field"
        )
    if len(present) > 1:
        raise GeminiError(
            f"Invalid value at '{where}' (oneof), oneof field 'data' is already set. Cannot set "
            f"'{present[1]}'"
        )
    if "text" in part and not isinstance(part["text"], str):
        raise GeminiError(f"Invalid value at '{where}.text' (TYPE_STRING), {part['text']!r}")
    if part.get("thought") is not None and not isinstance(part["thought"], bool):
        raise GeminiError(f"Invalid value at '{where}.thought' (TYPE_BOOL), {part['thought']!r}")
    if part.get("thoughtSignature") is not None:
        _base64(part["thoughtSignature"], f"{where}.thought_signature")
    kind = present[0]
    if kind == "inlineData":
        blob = _fields(
            part[kind], frozenset({"mimeType", "data", "displayName"}), f"{where}.inline_data"
        )
        _base64(blob.get("data"), f"{where}.inline_data.data")
        mime = blob.get("mimeType")
        if not isinstance(mime, str) or not _INLINE_TYPES.match(mime):
            raise GeminiError(f"Unsupported MIME type: {mime}")
        part[kind] = blob
    elif kind == "fileData":
        data = _fields(
            part[kind], frozenset({"mimeType", "fileUri", "displayName"}), f"{where}.file_data"
        )
        if not isinstance(data.get("fileUri"), str) or not data["fileUri"]:
            raise GeminiError(f"* GenerateContentRequest.{where}.file_data.file_uri: required")
        part[kind] = data
    elif kind == "functionCall":
        call = _fields(part[kind], frozenset({"id", "name", "args"}), f"{where}.function_call")
        _function_name(call.get("name"), f"{where}.function_call.name")
        if call.get("args") is not None and not isinstance(call["args"], dict):
            raise GeminiError(
                f"Invalid value at '{where}.function_call.args' "
                "(type.googleapis.com/google.protobuf.Struct)"
            )
        part[kind] = call
    elif kind == "functionResponse":
        allowed = frozenset({"id", "name", "response", "parts", "willContinue", "scheduling"})
        response = _fields(part[kind], allowed, f"{where}.function_response")
        _function_name(response.get("name"), f"{where}.function_response.name")
        if not isinstance(response.get("response"), dict):
            raise GeminiError(
                f"* GenerateContentRequest.{where}.function_response.response: a JSON object is "
                "required"
            )
        part[kind] = response
    return part


def _function_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
        raise GeminiError(
            f"* GenerateContentRequest.{where}: Invalid function name. Must start with a letter "
            "or an underscore. Must be alphameric (a-z, A-Z, 0-9), underscores (_), dots (.), "
            "colons (:), or dashes (-), with a maximum length of 64."
        )


def _check_turns(contents: list[dict[str, Any]]) -> None:
    """Function calls in model turns, and their responses in the user turn right after, one
    for each call (Gemini's own rules for a function calling conversation)."""
    previous: list[str] = []  # the function calls of the turn before
    for i, turn in enumerate(contents):
        calls = [p["functionCall"]["name"] for p in turn["parts"] if "functionCall" in p]
        answers = [p["functionResponse"]["name"] for p in turn["parts"] if "functionResponse" in p]
        if calls and turn.get("role") != "model":
            raise GeminiError(
                f"* GenerateContentRequest.contents[{i}]: a function call must be in a model turn"
            )
        if answers:
            if turn.get("role") == "model":
                raise GeminiError(
                    f"* GenerateContentRequest.contents[{i}]: a function response must be in a "
                    "user turn"
                )
            if not previous:
                raise GeminiError(
                    "Please ensure that function response turn comes immediately after a "
                    "function call turn."
                )
            if len(answers) != len(previous):
                raise GeminiError(
                    "Please ensure that the number of function response parts is equal to the "
                    "number of function call parts of the function call turn."
                )
            if Counter(answers) != Counter(previous):
                unknown = sorted((Counter(answers) - Counter(previous)).elements())[0]
                raise GeminiError(
                    f"* GenerateContentRequest.contents[{i}]: function response {unknown!r} "
                    "answers no function call of the function call turn"
                )
        if calls and i and contents[i - 1].get("role") == "model":
            raise GeminiError(
                "Please ensure that function call turn comes immediately after a user turn or "
                "after a function response turn."
            )
        previous = calls


def validates_signatures(model: str) -> bool:
    """The model refuses a function call of the current turn without its thought signature
    (Gemini 3 and later)."""
    return model.startswith("gemini-") and not _UNSIGNED_MODELS.match(model)


def check_signatures(contents: list[dict[str, Any]], model: str) -> None:
    """The first function call of each model turn of the current turn (from the last user turn
    holding more than function responses on; none: from the first) carries a thought
    signature, for a model that validates them."""
    if not validates_signatures(model):
        return
    start = next(
        (
            i
            for i in range(len(contents) - 1, -1, -1)
            if contents[i].get("role") != "model"
            and any("functionResponse" not in p for p in contents[i]["parts"])
        ),
        0,
    )
    for i in range(start, len(contents)):
        turn = contents[i]
        if turn.get("role") != "model":
            continue
        first = next((p for p in turn["parts"] if "functionCall" in p), None)
        if first is not None and not first.get("thoughtSignature"):
            raise GeminiError(
                "Function call is missing a thought_signature in functionCall parts. This is "
                "required for tools to work correctly, and missing thought_signature may lead "
                "to degraded model performance. Additional data, function call "
                f"`{first['functionCall']['name']}` , position {i + 1}. Please refer to "
                "https://ai.google.dev/gemini-api/docs/thought-signatures for more details."
            )


def _generation_config(raw: Any) -> dict[str, Any]:
    where = "generation_config"
    config = _fields(raw, _GENERATION_CONFIG, where)
    _number(config, "temperature", where, 0.0, 2.0)
    _number(config, "topP", where, 0.0, 1.0)
    _number(config, "presencePenalty", where, -2.0, 2.0)
    _number(config, "frequencyPenalty", where, -2.0, 2.0)
    _integer(config, "topK", where, 1)
    _integer(config, "candidateCount", where, 1, 8)
    _integer(config, "maxOutputTokens", where, 1)
    _integer(config, "seed", where, -(2**31), 2**31 - 1)
    _integer(config, "logprobs", where, 0, 20)
    stops = config.get("stopSequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise GeminiError(f"Invalid value at '{where}.stop_sequences' (TYPE_STRING)")
        if len(stops) > 5:
            raise GeminiError(
                f"* GenerateContentRequest.{where}.stop_sequences: at most 5 stop sequences "
                "are allowed"
            )
    mime = config.get("responseMimeType")
    if mime is not None and mime not in _MIME_TYPES:
        raise GeminiError(
            f"* GenerateContentRequest.{where}.response_mime_type: allowed mimetypes are "
            f"{', '.join(sorted(_MIME_TYPES))}"
        )
    if config.get("responseSchema") is not None and config.get("responseJsonSchema") is not None:
        raise GeminiError(
            f"* GenerateContentRequest.{where}: response_schema and response_json_schema are "
            "mutually exclusive"
        )
    if config.get("responseSchema") is not None:
        _schema(config["responseSchema"], f"{where}.response_schema")
    for name in ("responseSchema", "responseJsonSchema"):
        if config.get(name) is not None and mime not in ("application/json", "text/x.enum"):
            raise GeminiError(
                f"* GenerateContentRequest.{where}.response_mime_type: a response schema "
                "requires the response_mime_type application/json"
            )
    if config.get("responseJsonSchema") is not None and not isinstance(
        config["responseJsonSchema"], dict
    ):
        raise GeminiError(f"Invalid value at '{where}.response_json_schema'")
    if config.get("logprobs") is not None and config.get("responseLogprobs") is not True:
        raise GeminiError(f"* GenerateContentRequest.{where}.logprobs: requires response_logprobs")
    if config.get("thinkingConfig") is not None:
        config["thinkingConfig"] = _fields(
            config["thinkingConfig"],
            frozenset({"includeThoughts", "thinkingBudget", "thinkingLevel"}),
            f"{where}.thinking_config",
        )
    return config


def _schema(raw: Any, where: str) -> None:
    schema = _fields(raw, _SCHEMA_FIELDS, where)
    kind = schema.get("type")
    if kind is not None and (not isinstance(kind, str) or kind.upper() not in _SCHEMA_TYPES):
        raise GeminiError(
            f"Invalid value at '{where}.type' "
            f"(type.googleapis.com/google.ai.generativelanguage.v1beta.Type), {kind!r}"
        )
    for name, sub in (schema.get("properties") or {}).items():
        _schema(sub, f'{where}.properties["{name}"]')
    if schema.get("items") is not None:
        _schema(schema["items"], f"{where}.items")
    for k, sub in enumerate(schema.get("anyOf") or ()):
        _schema(sub, f"{where}.any_of[{k}]")


def _check_tools(body: dict[str, Any]) -> list[str]:
    """The functions the request declares (their names); raises for a malformed tool."""
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise GeminiError("Invalid value at 'tools', expected a list")
    names: list[str] = []
    for k, raw in enumerate(tools):
        tool = _fields(raw, _TOOL_FIELDS, f"tools[{k}]")
        for d, raw_declaration in enumerate(tool.get("functionDeclarations") or ()):
            where = f"tools[{k}].function_declarations[{d}]"
            declaration = _fields(raw_declaration, _DECLARATION_FIELDS, where)
            _function_name(declaration.get("name"), f"{where}.name")
            if declaration["name"] in names:
                raise GeminiError(f"Duplicate function declaration found: {declaration['name']}")
            names.append(declaration["name"])
            if (
                declaration.get("parameters") is not None
                and declaration.get("parametersJsonSchema") is not None
            ):
                raise GeminiError(
                    f"* GenerateContentRequest.{where}: parameters and parameters_json_schema "
                    "are mutually exclusive"
                )
            if declaration.get("parameters") is not None:
                _schema(declaration["parameters"], f"{where}.parameters")
            schema = declaration.get("parametersJsonSchema")
            if schema is not None and not (
                isinstance(schema, dict) and schema.get("type", "object") == "object"
            ):
                raise GeminiError(
                    f"* GenerateContentRequest.{where}.parameters_json_schema: the schema must "
                    "describe an object"
                )
    return names


def _check_tool_config(body: dict[str, Any], names: list[str]) -> None:
    raw = body.get("toolConfig")
    if raw is None:
        return
    config = _fields(
        raw,
        frozenset({"functionCallingConfig", "retrievalConfig", "includeServerSideToolInvocations"}),
        "tool_config",
    )
    if config.get("functionCallingConfig") is None:
        body["toolConfig"] = config
        return
    where = "tool_config.function_calling_config"
    calling = _fields(
        config["functionCallingConfig"], frozenset({"mode", "allowedFunctionNames"}), where
    )
    mode = calling.get("mode", "MODE_UNSPECIFIED")
    if mode not in _MODES:
        raise GeminiError(
            f"Invalid value at '{where}.mode' (type.googleapis.com/google.ai.generativelanguage"
            f".v1beta.FunctionCallingConfig.Mode), {mode!r}"
        )
    allowed = calling.get("allowedFunctionNames")
    if allowed:
        if mode not in ("ANY", "VALIDATED"):
            raise GeminiError(
                f"* GenerateContentRequest.{where}.allowed_function_names: only allowed when "
                "the mode is ANY or VALIDATED"
            )
        for name in allowed:
            if name not in names:
                raise GeminiError(
                    f"* GenerateContentRequest.{where}.allowed_function_names: {name!r} is not "
                    "a declared function"
                )
    if mode in ("ANY", "VALIDATED") and not names:
        raise GeminiError(
            f"* GenerateContentRequest.{where}.mode: function calling mode {mode} needs "
            "function declarations"
        )
    config["functionCallingConfig"] = calling
    body["toolConfig"] = config


def credential(request: web.Request, vertex: bool, issuer: Issuer | None = None) -> str:
    """Which credential the request carries (an API key, or a bearer token: with `issuer`, one
    the fake's identity endpoint issued); raises Google's answer to none, or to a bad token."""
    if request.headers.get("x-goog-api-key"):
        return "x-goog-api-key"
    if request.query.get("key"):
        return "key"
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        if issuer is not None and not issuer.accepts(authorization, "google"):
            raise GeminiError(
                "Request had invalid authentication credentials. Expected OAuth 2 access "
                "token, login cookie or other valid authentication credential.",
                "UNAUTHENTICATED",
                401,
            )
        return "bearer"
    if vertex:
        raise GeminiError(
            "Request is missing required authentication credential. Expected OAuth 2 access "
            "token, login cookie or other valid authentication credential.",
            "UNAUTHENTICATED",
            401,
        )
    raise GeminiError(
        "Method doesn't allow unregistered callers (callers without established identity). "
        "Please use API Key or other form of API consumer identity to call this API.",
        "PERMISSION_DENIED",
        403,
    )


# -- the answer ---------------------------------------------------------------------------------


def _forced_call(body: dict[str, Any]) -> str | None:
    """The function the request makes the model call (mode ANY), if any."""
    calling = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    if calling.get("mode") != "ANY":
        return None
    allowed = calling.get("allowedFunctionNames")
    if allowed:
        return str(allowed[0])
    for tool in body.get("tools") or ():
        for declaration in tool.get("functionDeclarations") or ():
            return str(declaration["name"])
    return None


def _usage(prompt: int, output: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"promptTokenCount": prompt}
    if output is not None:
        out["candidatesTokenCount"] = output
    out["totalTokenCount"] = prompt + (output or 0)
    out["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    return out


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\r\n\r\n"


async def generate_content(
    request: web.Request,
    ctx: RequestSettings,
    raw: Any,
    stall_seconds: float,
    record: dict[str, Any] | None,
    issuer: Issuer | None = None,
) -> web.StreamResponse:
    prefix = request.match_info.get("prefix", "")
    method = request.match_info.get("method", "")
    vertex = bool(_VERTEX_PREFIX.match(prefix))
    if method in (_VERTEX_EMBED_METHODS if vertex else _EMBED_METHODS) and (
        vertex or _GEMINI_PREFIX.match(prefix)
    ):
        return await embed(request, ctx, raw, stall_seconds, record, issuer)
    if method not in _METHODS or not (vertex or _GEMINI_PREFIX.match(prefix)):
        return error_response(
            GeminiError(f"The requested URL {request.path} was not found.", "NOT_FOUND", 404)
        )
    stream = _METHODS[method]
    try:
        kind = credential(request, vertex, issuer)
        if record is not None:
            record["credential"] = kind
        if stream and request.query.get("alt") != "sse":
            # Without it, the stream is a JSON array arriving in pieces, which the SDKs do not
            # ask for.
            raise GeminiError(
                "streamGenerateContent: the fake streams server-sent events only (alt=sse)"
            )
        body = check_request(raw, vertex)
        model = request.match_info["model"]
        check_signatures(body["contents"], model)
    except GeminiError as err:
        return error_response(err)
    early = await _fault_before(request, ctx.fault, stall_seconds)
    if early is not None:
        return early
    config = body.get("generationConfig") or {}
    cap = config.get("maxOutputTokens")
    count = ctx.tokens if cap is None else min(ctx.tokens, cap)
    finish = "MAX_TOKENS" if count < ctx.tokens else "STOP"
    prompt = max(
        1,
        estimate_tokens(
            len(orjson.dumps([body.get("systemInstruction"), body["contents"], body.get("tools")]))
        ),
    )
    candidates = config.get("candidateCount") or 1
    call = _forced_call(body)
    common = {"modelVersion": model, "responseId": uuid.uuid4().hex[:22]}
    if call is not None:
        part: dict[str, Any] = {
            "functionCall": {"name": call, "args": {"fake": "input"}},
            "thoughtSignature": SIGNATURE,
        }
        parts_by_event = [[part]]
        finish, count = "STOP", 1
    elif ctx.text is not None:
        pieces = text_pieces(ctx.text, ctx.chunk_chars)
        parts_by_event = [[{"text": piece}] for piece in pieces]
        count, finish = len(pieces), "STOP"
    else:
        # (Without the leading space the other fakes stream as a piece of its own.)
        pieces = [p for i, p in enumerate(word_pieces(count)) if i or p != " "]
        parts_by_event = [[{"text": piece}] for piece in pieces or [""]]
    usage = None if ctx.no_usage else _usage(prompt, count * candidates)
    if not stream:
        await pause(request, ctx.ttft)
        await non_stream_fault(request, ctx.fault, stall_seconds)
        whole = (
            parts_by_event[0]
            if call is not None
            else [{"text": "".join(p[0]["text"] for p in parts_by_event)}]
        )
        answer: dict[str, Any] = {
            "candidates": [
                {
                    "content": {"parts": whole, "role": "model"},
                    "finishReason": finish,
                    "index": i,
                }
                for i in range(candidates)
            ]
        }
        if usage is not None:
            answer["usageMetadata"] = usage
        return json_response({**answer, **common})
    response, out, first_at = await open_event_stream(request, ctx.ttft, ctx.fault, stall_seconds)
    last = len(parts_by_event) - 1
    for i, parts in enumerate(parts_by_event):
        if ctx.tokens_per_second > 0 and i:
            await sleep_until(request, first_at + out.stalled + i / ctx.tokens_per_second)
        event: dict[str, Any] = {
            "candidates": [
                {"content": {"parts": parts, "role": "model"}, "index": c}
                | ({"finishReason": finish} if i == last else {})
                for c in range(candidates)
            ]
        }
        if not ctx.no_usage:
            event["usageMetadata"] = usage if i == last else _usage(prompt, None)
        await out.send(_event({**event, **common}), last=i == last)
    await response.write_eof()
    return response


async def _fault_before(
    request: web.Request, fault: Fault | None, stall_seconds: float
) -> web.Response | None:
    if fault is None or fault.after is not None:
        return None
    if fault.kind == "429":
        retry = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}
        err = GeminiError(
            "Resource has been exhausted (e.g. check quota). (injected by fake-llm)",
            "RESOURCE_EXHAUSTED",
            429,
        )
        return error_response(err, [retry])
    if fault.kind == "500":
        return error_response(
            GeminiError("An internal error has occurred. (injected by fake-llm)", "INTERNAL", 500)
        )
    if fault.kind == "503":
        return error_response(
            GeminiError(
                "The model is overloaded. Please try again later. (injected by fake-llm)",
                "UNAVAILABLE",
                503,
            )
        )
    if fault.kind == "reset":
        reset_connection(request)
    await pause(request, stall_seconds)
    return None


# -- embeddings ---------------------------------------------------------------------------------

# The Gemini API's `models/{model}:embedContent` and `:batchEmbedContents`; Vertex AI's
# `:embedContent` and `:predict` (its text embedding models' instances).
_EMBED_METHODS = frozenset({"embedContent", "batchEmbedContents"})
_VERTEX_EMBED_METHODS = frozenset({"embedContent", "predict"})
_TASK_TYPES = frozenset(
    {
        "TASK_TYPE_UNSPECIFIED", "RETRIEVAL_QUERY", "RETRIEVAL_DOCUMENT", "SEMANTIC_SIMILARITY",
        "CLASSIFICATION", "CLUSTERING", "QUESTION_ANSWERING", "FACT_VERIFICATION",
        "CODE_RETRIEVAL_QUERY",
    }
)  # fmt: skip
_EMBED_FIELDS = frozenset({"model", "content", "taskType", "title", "outputDimensionality"})
_VERTEX_EMBED_CONFIG = frozenset(
    {"taskType", "title", "outputDimensionality", "autoTruncate", "documentOcr",
     "audioTrackExtraction"}
)  # fmt: skip
_VERTEX_EMBED_FIELDS = frozenset(
    {"model", "content", "taskType", "title", "outputDimensionality", "autoTruncate",
     "embedContentConfig"}
)  # fmt: skip
GEMINI_API_BATCH = 100  # batchEmbedContents: requests in one batch
VERTEX_INSTANCES = 250  # predict: instances in one request (one for gemini-embedding-001)
VERTEX_MAX_INPUT_TOKENS = 2048  # a text's tokens on Vertex AI (longer: cut, or refused)


def embedding_size(model: str) -> int:
    """A model's own vector size: 3072 for Gemini's embedding models, 768 for the others
    (text-embedding-004/005, text-multilingual-embedding-002)."""
    return 3072 if "gemini-embedding" in model else 768


def _embed_options(config: dict[str, Any], where: str, model: str) -> int:
    """Checks a request's task type, title and output size; the vector size it asks."""
    task = config.get("taskType")
    if task is not None and task not in _TASK_TYPES:
        raise GeminiError(f"Invalid value at '{_at(where, 'taskType')}' (TYPE_ENUM), {task!r}")
    title = config.get("title")
    if title is not None and not isinstance(title, str):
        raise GeminiError(f"Invalid value at '{_at(where, 'title')}' (TYPE_STRING), {title!r}")
    size = embedding_size(model)
    wanted = config.get("outputDimensionality")
    if wanted is None:
        return size
    if not is_int(wanted):
        raise GeminiError(
            f"Invalid value at '{_at(where, 'outputDimensionality')}' (TYPE_INT32), {wanted!r}"
        )
    if not 1 <= wanted <= size:
        raise GeminiError(
            f"* EmbedContentRequest.{_at(where, 'outputDimensionality')}: must be in [1, {size}] "
            f"for {model}"
        )
    return int(wanted)


def _embedded(turn: dict[str, Any]) -> tuple[bytes, int]:
    """A content's identity (its vector's seed: a text's as the OpenAI endpoint's) and tokens."""
    texts = [p["text"] for p in turn["parts"] if "text" in p]
    if len(texts) == len(turn["parts"]) == 1:
        identity = b"s" + texts[0].encode()
    else:
        identity = b"c" + orjson.dumps(turn["parts"])
    return identity, estimate_tokens(len("".join(texts).encode()) or len(identity))


def _embedding_request(raw: Any, where: str, model: str, vertex: bool) -> tuple[bytes, int, int]:
    """An EmbedContentRequest checked: (identity, tokens, vector size)."""
    if vertex:
        body = _fields(raw, _VERTEX_EMBED_FIELDS, where)
        config = body.get("embedContentConfig")
        if config is not None:
            config = _fields(config, _VERTEX_EMBED_CONFIG, _at(where, "embedContentConfig"))
            doubled = sorted(set(config) & set(body))
            if doubled:
                raise GeminiError(
                    f"* EmbedContentRequest.{_at(where, doubled[0])}: set both at the top and "
                    "in embed_content_config"
                )
            body |= config
        auto = body.get("autoTruncate")
        if auto is not None and not isinstance(auto, bool):
            raise GeminiError(f"Invalid value at '{_at(where, 'autoTruncate')}' (TYPE_BOOL)")
    else:
        body = _fields(raw, _EMBED_FIELDS, where)
    if body.get("content") is None:
        raise GeminiError(f"* EmbedContentRequest.{_at(where, 'content')}: content is required")
    turn = _content(body["content"], _at(where, "content"))
    identity, tokens = _embedded(turn)
    if vertex and tokens > VERTEX_MAX_INPUT_TOKENS and body.get("autoTruncate") is False:
        raise GeminiError(_too_long(tokens))
    return identity, tokens, _embed_options(body, where, model)


def _too_long(tokens: int) -> str:
    return (
        f"Unable to submit request because the input token count is {tokens} but the model "
        f"supports up to {VERTEX_MAX_INPUT_TOKENS}. Reduce the input token count and try again."
    )


def _batch(raw: Any, model: str) -> list[tuple[bytes, int, int]]:
    if raw is MALFORMED or raw is None:
        raise GeminiError("Invalid JSON payload received. Unexpected token.")
    body = _fields(raw, frozenset({"requests"}), "")
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
        raise GeminiError("* BatchEmbedContentsRequest.requests: requests is not specified")
    if len(requests) > GEMINI_API_BATCH:
        raise GeminiError(
            "* BatchEmbedContentsRequest.requests: at most 100 requests can be in one batch"
        )
    out = []
    for k, item in enumerate(requests):
        where = f"requests[{k}]"
        checked = _embedding_request(item, where, model, False)
        named = item.get("model")
        if named != f"models/{model}":
            raise GeminiError(
                f"* BatchEmbedContentsRequest.{where}.model: the model of each request must be "
                f"the batch's (models/{model}), got {named!r}"
            )
        out.append(checked)
    return out


def _instances(raw: Any, model: str) -> tuple[list[tuple[bytes, int]], int]:
    """Vertex AI's predict body for a text embedding model: ((identity, tokens) of each
    instance, vector size). A text too long is refused when `autoTruncate` is false."""
    if raw is MALFORMED or raw is None:
        raise GeminiError("Invalid JSON payload received. Unexpected token.")
    body = _fields(raw, frozenset({"instances", "parameters"}), "")
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise GeminiError("* PredictRequest.instances: instances is not specified")
    most = 1 if "gemini-embedding" in model else VERTEX_INSTANCES
    if len(instances) > most:
        raise GeminiError(
            f"Unable to submit request because {model} supports at most {most} instance"
            f"{'s' if most > 1 else ''} per request, got {len(instances)}."
        )
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict) or set(parameters) - {
        "autoTruncate", "outputDimensionality"
    }:  # fmt: skip
        raise GeminiError(
            "* PredictRequest.parameters: only autoTruncate and outputDimensionality are taken"
        )
    auto = parameters.get("autoTruncate", True)
    if not isinstance(auto, bool):
        raise GeminiError("* PredictRequest.parameters.autoTruncate: a boolean is required")
    size = _embed_options(parameters, "parameters", model)
    out = []
    for k, instance in enumerate(instances):
        if not isinstance(instance, dict) or set(instance) - {"content", "task_type", "title"}:
            raise GeminiError(
                f"* PredictRequest.instances[{k}]: an instance takes content, task_type and title"
            )
        text = instance.get("content")
        if not isinstance(text, str) or not text:
            raise GeminiError(f"* PredictRequest.instances[{k}].content: a text is required")
        task = instance.get("task_type")
        if task is not None and task not in _TASK_TYPES:
            raise GeminiError(f"* PredictRequest.instances[{k}].task_type: {task!r} is unknown")
        tokens = estimate_tokens(len(text.encode()))
        if tokens > VERTEX_MAX_INPUT_TOKENS and not auto:
            raise GeminiError(_too_long(tokens))
        out.append((b"s" + text.encode(), tokens))
    return out, size


async def embed(
    request: web.Request,
    ctx: RequestSettings,
    raw: Any,
    stall_seconds: float,
    record: dict[str, Any] | None,
    issuer: Issuer | None = None,
) -> web.StreamResponse:
    """The embedding methods: checked as strictly as Google checks them, answered with
    deterministic unit vectors of the size asked (the model's own by default), each text's as
    the OpenAI endpoint gives it. Usage: none from the Gemini API; Vertex AI's predict gives
    each text's `statistics.token_count`, its embedContent `usageMetadata`."""
    vertex = bool(_VERTEX_PREFIX.match(request.match_info.get("prefix", "")))
    method = request.match_info["method"]
    model = request.match_info["model"]
    try:
        kind = credential(request, vertex, issuer)
        if record is not None:
            record["credential"] = kind
        if method == "predict":
            instances, size = _instances(raw, model)
        elif method == "batchEmbedContents":
            requests = _batch(raw, model)
        else:
            if raw is MALFORMED or raw is None:
                raise GeminiError("Invalid JSON payload received. Unexpected token.")
            single = _embedding_request(raw, "", model, vertex)
    except GeminiError as err:
        return error_response(err)
    early = await _fault_before(request, ctx.fault, stall_seconds)
    if early is not None:
        return early
    await pause(request, ctx.ttft)
    await non_stream_fault(request, ctx.fault, stall_seconds)
    if method == "predict":
        predictions = []
        for identity, tokens in instances:
            statistics = {"truncated": tokens > VERTEX_MAX_INPUT_TOKENS,
                          "token_count": min(tokens, VERTEX_MAX_INPUT_TOKENS)}  # fmt: skip
            values = list(embedding(identity, size)[0])
            predictions.append({"embeddings": {"values": values, "statistics": statistics}})
        characters = sum(len(identity) - 1 for identity, _ in instances)
        return json_response(
            {"predictions": predictions, "metadata": {"billableCharacterCount": characters}}
        )
    if method == "batchEmbedContents":
        return json_response(
            {"embeddings": [{"values": list(embedding(i, n)[0])} for i, _, n in requests]}
        )
    identity, tokens, size = single
    answer: dict[str, Any] = {"embedding": {"values": list(embedding(identity, size)[0])}}
    if vertex:
        counted = min(tokens, VERTEX_MAX_INPUT_TOKENS)
        answer["usageMetadata"] = {"promptTokenCount": counted, "totalTokenCount": counted}
        answer["truncated"] = tokens > VERTEX_MAX_INPUT_TOKENS
    return json_response(answer)
