"""Google's Gemini API (`POST .../models/{model}:generateContent`, and
`:streamGenerateContent?alt=sse` for its event stream) behind OpenAI's chat completions: the
request translated to a GenerateContentRequest, the answer, its errors and its event stream
back to OpenAI's shapes. Vertex AI serves the same bodies under another URL
(`/v1/projects/{p}/locations/{l}/publishers/google/models/{model}:generateContent`): the
backend URL's path is the prefix, so one translation serves both.

Nothing is dropped without a word: a parameter Gemini has no equivalent for is refused with a
400 naming it (unless it has its neutral value), and what Gemini returns beyond OpenAI's shape
(thoughts) is passed as `reasoning_content`, as in anthropic.py. Where the reference leaves a
choice:

- Images: a `data:` URL becomes `inlineData` (the bytes), of the image types Gemini's image
  understanding takes (png, jpeg, webp, heic, heif: not gif; `image/jpg` is sent as jpeg); any
  other type is refused (400 naming the part). Any other URL is refused too: `fileData` takes
  the Gemini API's own uploaded-file URIs (Cloud Storage on Vertex), not an arbitrary web URL,
  and the gateway does not fetch images.
- What Gemini itself would refuse is refused before the request is sent (and before quota is
  reserved for it), each a 400 naming the parameter: a conversation with no user or assistant
  message left (system messages only: Gemini needs `contents`), a `seed` outside a 32-bit
  integer (Gemini's is an int32), `n` above 8 (`candidateCount`'s most), and `n`,
  `max_completion_tokens` or `max_tokens` below 1 (OpenAI refuses them too; a 0 is never
  taken as "unset" and replaced by the default). `max_completion_tokens` wins over `max_tokens`;
  neither set: the backend's `max_tokens`.
- Tool results: Gemini's `functionResponse` needs the function's name and takes a JSON object.
  The name is the one of the assistant's tool call the result's `tool_call_id` answers (an id
  no earlier assistant message holds: 400 naming the message). A result's text that is a JSON
  object is that object (the function's structured output); any other text is wrapped as
  `{"output": text}`, the key Gemini's reference gives a function's output.
- Tool call ids: Gemini's `functionCall.id` is optional (the Gemini API mostly leaves it out);
  the client's id is Gemini's when it gave one, else one of OpenAI's shape (`call_...`). Ids are
  not sent back (optional again): a result is matched to its call by name and order, as
  Gemini's reference does. A call's `thoughtSignature` (which Gemini 3 requires back with the
  call in later turns) rides in the client's tool call id, after `~sig~`, and is restored from
  it: an OpenAI client echoes ids as it got them. A call another backend made (a failover pool
  moving the conversation) has none: Gemini 3 refuses the current turn's steps without one
  (the first call of each model turn from the last user message on), so that call is sent with
  `skip_thought_signature_validator`, the placeholder Google gives for function calls Gemini
  did not make (Google's own gemini-cli sends it the same way, SYNTHETIC_THOUGHT_SIGNATURE),
  for every model but Gemini 1.x and 2.x (which do not validate signatures).
- `n` > 1: `candidateCount`, each candidate a choice; refused (400 naming `n`) for a stream,
  whose end the translator could not tell before every candidate had finished.
- `response_format`: `json_object` is `responseMimeType: application/json`; `json_schema` adds
  its schema as `responseJsonSchema` (JSON Schema, as OpenAI's). Its `name` has no counterpart.
- Tool parameters: sent as `parametersJsonSchema` (JSON Schema, as OpenAI's) rather than
  `parameters` (an OpenAPI 3.0 subset that refuses `additionalProperties`, `$ref`, type
  lists...): nothing to strip but `$schema` (which only names the dialect). A function's
  `strict` has no counterpart and is not sent.
- `tool_choice`: auto, none, required are AUTO, NONE, ANY; a named function is ANY limited to it
  (`allowedFunctionNames`). `parallel_tool_calls: false` has no counterpart: refused when tools
  can be called, neutral otherwise.
- A prompt Gemini blocks (`promptFeedback.blockReason`, no candidates) is an answer with an
  empty content and `finish_reason: content_filter` (a 200, as Gemini's), in a stream too.
- Finish reasons (google-genai's FinishReason): STOP is `stop` (`tool_calls` when the
  candidate called functions); MAX_TOKENS and CONTINUATION (the per-request token limit) are
  `length`; the filters (SAFETY, RECITATION, LANGUAGE, BLOCKLIST, PROHIBITED_CONTENT, SPII,
  the IMAGE_ ones, MODEL_ARMOR, ESCALATION, PUP_LIMITED_DISABLED) are `content_filter`. A
  generation Gemini ended as failed (MALFORMED_FUNCTION_CALL, UNEXPECTED_TOOL_CALL,
  TOO_MANY_TOOL_CALLS, MISSING_THOUGHT_SIGNATURE, MALFORMED_RESPONSE, NO_IMAGE) is not an
  answer: a JSON answer holding one is a 502 `server_error` whose code is the reason, a stream
  ends with OpenAI's error chunk of that error. OTHER, IMAGE_OTHER and reasons added later say
  nothing more: `stop`.
- Headers: a client's `x-goog-user-project` (which would bill another Google Cloud project's
  quota than the backend's credential's) is removed from the request.
- `reasoning_effort` is refused: Gemini's thinking budgets and levels differ by model.
- `user`, `metadata`, `store`, `service_tier`, `stream_options`: without effect on what the
  model produces; not sent (Gemini reports usage on its stream either way).

Usage: Gemini's `promptTokenCount` holds the cached input (`cachedContentTokenCount`), as
OpenAI's `prompt_tokens` does (plus `toolUsePromptTokenCount`, input from Google's own tools);
the output is `candidatesTokenCount` and `thoughtsTokenCount` (thinking is billed as output),
the thoughts also as `reasoning_tokens`.

What every translation reads the same way is read in openai_request.py, OpenAI's answers are
built in openai_answer.py.

References: Google's Gemini API reference (models.generateContent, streamGenerateContent,
Content, Part, Tool, ToolConfig, GenerationConfig, UsageMetadata, FinishReason, BlockReason),
Vertex AI's GenerateContent reference, Google's API error model (google.rpc.Status); OpenAI's
chat completions API.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from ..errors import GatewayError, bad_request
from ..sse import SSEParser
from ..usage import Usage
from ..wire.openai.answer import count_of
from . import openai_answer, openai_request

if TYPE_CHECKING:
    from ..config import ResolvedTarget
    from .base import Embeddings, Provider

# The provider as the client's error messages name it.
PROVIDER_NAME = "Google Gemini"

# Where a call's thought signature rides in the client's tool call id (not a base64 character).
SIGNATURE_MARK = "~sig~"

# Where a function call another backend made (no signature of Gemini's) gets the placeholder
# Google gives for calls Gemini did not make, which its signature validation lets through.
PLACEHOLDER_SIGNATURE = "skip_thought_signature_validator"
# Models before Gemini 3, which do not validate thought signatures: no placeholder is sent.
_UNVALIDATED = re.compile(r"^gemini-[12](?:[.-]|$)")

# google-genai's FinishReason values by what they mean to an OpenAI client.
_FILTERED = frozenset(
    {
        "SAFETY", "RECITATION", "LANGUAGE", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
        "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "MODEL_ARMOR",
        "ESCALATION", "PUP_LIMITED_DISABLED",
    }
)  # fmt: skip
_CUT = frozenset({"MAX_TOKENS", "CONTINUATION"})
# The generation failed: what the candidate holds is not an answer.
FAILED = frozenset(
    {
        "MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "TOO_MANY_TOOL_CALLS",
        "MISSING_THOUGHT_SIGNATURE", "MALFORMED_RESPONSE", "NO_IMAGE",
    }
)  # fmt: skip


def finish_reason(reason: Any, calls: bool) -> str:
    """Gemini's finishReason in OpenAI's terms (`calls`: the candidate called functions), for
    a reason not in FAILED."""
    if not isinstance(reason, str):
        return "tool_calls" if calls else "stop"
    if reason in _FILTERED:
        return "content_filter"
    if reason in _CUT:
        return "length"
    return "tool_calls" if calls else "stop"


def is_failed(reason: Any) -> bool:
    """The finishReason of a generation Gemini ended as failed."""
    return isinstance(reason, str) and reason in FAILED


def failed(reason: str, candidate: dict[str, Any]) -> GatewayError:
    """A candidate Gemini ended as failed (its finishReason in FAILED) as the client's error: a
    502, the reason as the code."""
    detail = candidate.get("finishMessage")
    return GatewayError(
        502,
        f"The provider ended the generation as failed (Google Gemini: {reason})"
        + (f": {detail}" if isinstance(detail, str) and detail else ""),
        "server_error",
        reason,
    )


# What Gemini takes: the parameters every translation takes, and those it has a counterpart for
# that Anthropic and Converse lack; any other is refused unless it has its neutral value
# (openai_request.NEUTRAL).
_HANDLED = openai_request.HANDLED | frozenset(
    {"n", "presence_penalty", "frequency_penalty", "seed", "response_format"}
)


# Gemini's image understanding: its inline image types.
# The image types Gemini takes inline, by media type (image/jpg, a common misspelling Gemini
# does not take, as image/jpeg).
IMAGE_TYPES = {
    "image/png": "image/png",
    "image/jpeg": "image/jpeg",
    "image/jpg": "image/jpeg",
    "image/webp": "image/webp",
    "image/heic": "image/heic",
    "image/heif": "image/heif",
}
# `candidateCount` takes at most 8; `seed` is an int32.
MOST_CANDIDATES = 8
SEED_RANGE = (-(2**31), 2**31 - 1)


def validates_signatures(model: str | None) -> bool:
    """The model (its id, or a resource path ending in it; None: not known) may refuse a
    function call of the current turn without a thought signature: every Gemini model but
    1.x and 2.x (Gemini 3 and later do)."""
    if model is None:
        return True
    name = model.rsplit("/", 1)[-1]
    return name.startswith("gemini-") and not _UNVALIDATED.match(name)


def model_path(url_path: str, model: str, stream: bool) -> str:
    """The request's path: the model id percent-encoded (a `/` or `:` in it would change the
    method the path names)."""
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    return f"{url_path}/models/{quote(model, safe='')}:{method}"


# -- the request --------------------------------------------------------------------------------


def generate_content_request(
    body: dict[str, Any], default_max_tokens: int, model: str | None = None
) -> dict[str, Any]:
    """A validated OpenAI chat completions body as a GenerateContentRequest for `model` (the
    model is in the path, streaming is the path's choice; None: not known, taken as one that
    validates thought signatures). Raises a 400 for what Gemini cannot do as asked or would
    refuse, and for a part of the body that does not have the shape OpenAI's API gives it."""
    with openai_request.shape_checked():
        return _request(body, default_max_tokens, model)


def _number(value: Any, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name} is not a number")
    return value


def _request(body: dict[str, Any], default_max_tokens: int, model: str | None) -> dict[str, Any]:
    openai_request.check_parameters(body, PROVIDER_NAME, _HANDLED)
    system, contents = _contents(body["messages"])
    if not contents:
        raise bad_request(
            "This model's provider (Google Gemini) needs at least one user or assistant message "
            "with content (system messages alone are not a conversation)",
            "invalid_value",
            "messages",
        )
    if validates_signatures(model):
        _sign_foreign_calls(contents)
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    config: dict[str, Any] = {
        "maxOutputTokens": openai_request.max_tokens(body, default_max_tokens)
    }
    if body.get("temperature") is not None:
        config["temperature"] = _number(body["temperature"], "temperature")
    top_p = body.get("top_p")
    if top_p is not None and top_p != 1:
        config["topP"] = _number(top_p, "top_p")
    stops = openai_request.stop_sequences(body)
    if len(stops) > 5:
        raise bad_request(
            "`stop` takes at most 5 sequences with this model's provider (Google Gemini)",
            "unsupported_value",
            "stop",
        )
    if stops:
        config["stopSequences"] = stops
    n = body.get("n")
    if n is not None and n != 1:
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError("n is not an integer")
        if n < 1:
            raise openai_request.below_minimum("n", n)
        if n > MOST_CANDIDATES:
            raise bad_request(
                f"`n` above {MOST_CANDIDATES} is not supported by this model's provider (Google "
                "Gemini)",
                "unsupported_value",
                "n",
            )
        if body.get("stream"):
            raise bad_request(
                "`n` above 1 is not supported for a stream by this model's provider (Google "
                "Gemini)",
                "unsupported_value",
                "n",
            )
        config["candidateCount"] = n
    for name, field in (("presence_penalty", "presencePenalty"),
                        ("frequency_penalty", "frequencyPenalty")):  # fmt: skip
        value = body.get(name)
        if value is not None and value != 0:
            config[field] = _number(value, name)
    seed = body.get("seed")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError("seed is not an integer")
        if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise bad_request(
                "`seed` must be a 32-bit integer for this model's provider (Google Gemini: "
                f"{SEED_RANGE[0]} to {SEED_RANGE[1]})",
                "unsupported_value",
                "seed",
            )
        config["seed"] = seed
    config.update(_response_format(body.get("response_format")))
    out["generationConfig"] = config
    tools, tool_config = _tools(
        body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    )
    if tools:
        out["tools"] = tools
    if tool_config:
        out["toolConfig"] = tool_config
    return out


def _response_format(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    kind = value.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"responseMimeType": "application/json"}
    if kind == "json_schema":
        schema = value["json_schema"].get("schema")
        out: dict[str, Any] = {"responseMimeType": "application/json"}
        if schema is not None:
            out["responseJsonSchema"] = _json_schema(schema)
        return out
    raise bad_request(
        f"`response_format` of type {kind!r} is not supported by this model's provider "
        "(Google Gemini)",
        "unsupported_value",
        "response_format",
    )


def _json_schema(schema: Any) -> Any:
    if not isinstance(schema, dict):
        raise TypeError("a JSON schema is not an object")
    return {k: v for k, v in schema.items() if k != "$schema"}


def _tools(
    tools: Any, choice: Any, parallel: Any
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    if choice is not None and choice != "none" and not tools:
        raise bad_request("`tool_choice` needs `tools`", "invalid_value", "tool_choice")
    if not tools:
        return [], None
    declarations = [_declaration(t) for t in tools]
    if parallel is False and choice != "none":
        raise bad_request(
            "`parallel_tool_calls: false` is not supported by this model's provider (Google "
            "Gemini has no such option)",
            "unsupported_value",
            "parallel_tool_calls",
        )
    out = [{"functionDeclarations": declarations}]
    if choice is None:
        return out, None
    if choice == "auto":
        calling: dict[str, Any] = {"mode": "AUTO"}
    elif choice == "none":
        calling = {"mode": "NONE"}
    elif choice == "required":
        calling = {"mode": "ANY"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        calling = {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}
    else:
        raise bad_request(
            "`tool_choice` is not one this model's provider (Google Gemini) supports",
            "unsupported_value",
            "tool_choice",
        )
    return out, {"functionCallingConfig": calling}


def _declaration(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise openai_request.unsupported(f"tools[].type={tool.get('type')}", PROVIDER_NAME)
    function = tool["function"]
    out: dict[str, Any] = {"name": function["name"]}
    if function.get("description"):
        out["description"] = function["description"]
    if function.get("parameters") is not None:
        out["parametersJsonSchema"] = _json_schema(function["parameters"])
    return out


def _contents(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the system instruction's parts, the turns): system and developer messages become the
    system instruction; tool results go back in a user turn; consecutive turns of one role are
    merged, as Gemini wants them alternating."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    calls: dict[str, str] = {}  # the tool call ids of the assistant's messages -> their names
    for i, message in enumerate(messages):
        role = message.get("role")
        if role in ("system", "developer"):
            text = _text_only(message.get("content"), f"messages[{i}].content")
            if text.strip():
                system.append({"text": text})
            continue
        if role == "user":
            parts = _parts(message.get("content"), f"messages[{i}].content")
            turn_role = "user"
        elif role == "assistant":
            parts = _assistant_parts(message, i, calls)
            turn_role = "model"
        elif role == "tool":
            name = calls.get(message["tool_call_id"])
            if name is None:
                raise bad_request(
                    f"messages[{i}].tool_call_id answers no tool call of an earlier assistant "
                    "message (Google Gemini needs the function's name)",
                    "invalid_value",
                    f"messages[{i}].tool_call_id",
                )
            text = _text_only(message.get("content"), f"messages[{i}].content")
            parts = [{"functionResponse": {"name": name, "response": _tool_response(text)}}]
            turn_role = "user"
        else:
            raise openai_request.unsupported_role(role, i)
        openai_request.add_turn(turns, turn_role, parts, "parts")
    return system, turns


def _sign_foreign_calls(turns: list[dict[str, Any]]) -> None:
    """The placeholder signature on the first function call of each model turn of the current
    turn (from the last user turn holding more than function responses on; none: from the
    first), where that call has none (another backend made it): what Gemini 3 validates, as
    Google's gemini-cli does it."""
    start = next(
        (
            i
            for i in range(len(turns) - 1, -1, -1)
            if turns[i]["role"] == "user"
            and any("functionResponse" not in p for p in turns[i]["parts"])
        ),
        0,
    )
    for turn in turns[start:]:
        if turn["role"] != "model":
            continue
        first = next((p for p in turn["parts"] if "functionCall" in p), None)
        if first is not None and not first.get("thoughtSignature"):
            first["thoughtSignature"] = PLACEHOLDER_SIGNATURE


def _tool_response(text: str) -> dict[str, Any]:
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {"output": text}


def _text_only(content: Any, where: str) -> str:
    return "\n".join(openai_request.text_parts(content, where))


def _parts(content: Any, where: str) -> list[dict[str, Any]]:
    # Gemini refuses an empty text part, and a blank one says nothing: content_parts leaves
    # both out.
    return [
        {"text": value} if kind == "text" else _image(value, at)
        for kind, value, at in openai_request.content_parts(content, where)
    ]


def _image(url: str, where: str) -> dict[str, Any]:
    media_type, data = openai_request.inline_image(
        url, where, PROVIDER_NAME, IMAGE_TYPES, typed=True
    )
    # Bytes in Gemini's JSON are their base64 text: the data URL's as it is.
    return {"inlineData": {"mimeType": media_type, "data": data}}


def _assistant_parts(
    message: dict[str, Any], i: int, calls: dict[str, str]
) -> list[dict[str, Any]]:
    parts = _parts(openai_request.assistant_content(message), f"messages[{i}].content")
    for call in message.get("tool_calls") or ():
        if call.get("type", "function") != "function":
            kind = f"messages[{i}].tool_calls[].type={call.get('type')}"
            raise openai_request.unsupported(kind, PROVIDER_NAME)
        name = call["function"]["name"]
        arguments = openai_request.tool_arguments(call, f"messages[{i}].tool_calls")
        part: dict[str, Any] = {"functionCall": {"name": name, "args": arguments}}
        call_id = call["id"]
        if not isinstance(call_id, str):
            raise TypeError(f"messages[{i}].tool_calls[].id is not a string")
        signature = call_id.partition(SIGNATURE_MARK)[2]
        if signature:
            part["thoughtSignature"] = signature
        calls[call_id] = name
        parts.append(part)
    return parts


# -- the answer ---------------------------------------------------------------------------------


def _count(value: Any) -> int | None:
    """A count of Gemini's JSON: absent is 0 (proto3 leaves zeros out); None: not a count."""
    return 0 if value is None else count_of(value)


def usage(report: Any) -> Usage | None:
    """Gemini's usageMetadata in OpenAI's terms: the prompt (which holds the cached input,
    `cached_tokens`) and the input of Google's own tools; the output and the thoughts."""
    if not isinstance(report, dict):
        return None
    counts = [
        _count(report.get(key))
        for key in (
            "promptTokenCount",
            "toolUsePromptTokenCount",
            "cachedContentTokenCount",
            "candidatesTokenCount",
            "thoughtsTokenCount",
        )
    ]
    if any(c is None for c in counts) or "promptTokenCount" not in report:
        return None
    prompt, tool_use, cached, candidates, thoughts = (c or 0 for c in counts)
    prompt += tool_use
    completion = candidates + thoughts
    return Usage(
        prompt, completion, prompt + completion, min(cached, prompt), reasoning_tokens=thoughts
    )


def _thoughts(report: Any) -> int:
    value = report.get("thoughtsTokenCount") if isinstance(report, dict) else None
    return _count(value) or 0


def _completion_id(answer: dict[str, Any]) -> str:
    response_id = answer.get("responseId")
    if isinstance(response_id, str) and response_id:
        return f"chatcmpl-{response_id}"
    return openai_answer.completion_id()


def tool_call(call: Any, signature: Any) -> dict[str, Any]:
    """A functionCall (and the thought signature of its part) as an OpenAI tool call."""
    given = call.get("id")
    call_id = given if isinstance(given, str) and given else f"call_{uuid.uuid4().hex[:24]}"
    if isinstance(signature, str) and signature:
        call_id += SIGNATURE_MARK + signature
    args = call.get("args")
    arguments = orjson.dumps(args if isinstance(args, dict) else {}).decode()
    return openai_answer.tool_call(call_id, str(call.get("name", "")), arguments)


def _choice(candidate: dict[str, Any], position: int) -> dict[str, Any]:
    text: list[str] = []
    thoughts: list[str] = []
    calls = []
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    for part in parts if isinstance(parts, list) else ():
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str):
            (thoughts if part.get("thought") is True else text).append(part["text"])
        elif isinstance(part.get("functionCall"), dict):
            calls.append(tool_call(part["functionCall"], part.get("thoughtSignature")))
    message = openai_answer.assistant_message(text, calls, thoughts)
    index = candidate.get("index", position)
    return openai_answer.choice(
        message,
        finish_reason(candidate.get("finishReason"), bool(calls)),
        index if isinstance(index, int) else position,
    )


def chat_completion(answer: dict[str, Any], model: str) -> dict[str, Any]:
    """A GenerateContentResponse as an OpenAI chat completion for the client's `model` name; a
    prompt Gemini blocked (no candidates) as an empty answer filtered. Raises the 502
    GatewayError of a candidate Gemini ended as failed (its finishReason in FAILED)."""
    candidates = answer.get("candidates")
    for candidate in candidates if isinstance(candidates, list) else ():
        if isinstance(candidate, dict) and is_failed(candidate.get("finishReason")):
            raise failed(str(candidate["finishReason"]), candidate)
    choices = [
        _choice(c, i)
        for i, c in enumerate(candidates if isinstance(candidates, list) else ())
        if isinstance(c, dict)
    ]
    if not choices:
        empty = openai_answer.assistant_message([], [], [])
        choices = [openai_answer.choice(empty, "content_filter" if _blocked(answer) else "stop")]
    metadata = answer.get("usageMetadata")
    return openai_answer.chat_completion(
        _completion_id(answer), model, choices, usage(metadata), _thoughts(metadata)
    )


def _blocked(answer: dict[str, Any]) -> bool:
    feedback = answer.get("promptFeedback")
    return isinstance(feedback, dict) and bool(feedback.get("blockReason"))


# -- errors -------------------------------------------------------------------------------------

# Google's canonical error codes (google.rpc.Code) as OpenAI's (type, status the client gets).
_ERRORS: dict[str, tuple[str, int]] = {
    "INVALID_ARGUMENT": ("invalid_request_error", 400),
    "FAILED_PRECONDITION": ("invalid_request_error", 400),
    "OUT_OF_RANGE": ("invalid_request_error", 400),
    "UNAUTHENTICATED": ("authentication_error", 401),
    "PERMISSION_DENIED": ("permission_error", 403),
    "NOT_FOUND": ("invalid_request_error", 404),
    "ALREADY_EXISTS": ("invalid_request_error", 409),
    "ABORTED": ("server_error", 409),
    "RESOURCE_EXHAUSTED": ("rate_limit_error", 429),
    # 499, the request was cancelled (not by this client): a status OpenAI clients know.
    "CANCELLED": ("server_error", 500),
    "UNKNOWN": ("server_error", 500),
    "INTERNAL": ("server_error", 500),
    "DATA_LOSS": ("server_error", 500),
    "UNIMPLEMENTED": ("invalid_request_error", 501),
    "UNAVAILABLE": ("server_error", 503),
    "DEADLINE_EXCEEDED": ("timeout", 504),
}
# The status a code means when the answer does not name it.
_BY_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _error_object(parsed: Any) -> dict[str, Any]:
    # `{"error": {...}}`, or in a list of one (a streamed answer's JSON array form).
    if isinstance(parsed, list) and len(parsed) == 1:
        parsed = parsed[0]
    err = parsed.get("error") if isinstance(parsed, dict) else None
    return err if isinstance(err, dict) else {}


def gateway_error(status: int, err: dict[str, Any]) -> GatewayError:
    """A Google error object (`{"code", "message", "status"}`) as the client's: the `status`
    (the canonical code's name) is the code."""
    name = err.get("status")
    if not isinstance(name, str) or not name:
        name = _BY_STATUS.get(status)
    known = _ERRORS.get(name or "")
    if known is not None:
        openai_type, fixed = known
    else:
        openai_type = "invalid_request_error" if 400 <= status < 500 else "server_error"
        fixed = status if status >= 400 else 502  # (an error answer that does not say it is one)
    return GatewayError(
        fixed,
        str(err.get("message") or f"The provider answered {status}"),
        openai_type,
        name or f"provider_{status}",
    )


def error(status: int, body: bytes) -> GatewayError:
    """A Gemini error answer (`{"error": {"code", "message", "status", "details"}}`) as the
    client's (Google names the error in the body only)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    return gateway_error(status, _error_object(parsed))


# -- the event stream ---------------------------------------------------------------------------


class StreamTranslator:
    """Gemini's event stream (`data: {GenerateContentResponse}` events, separated by CRLF
    pairs; SSEParser takes any line ending) to OpenAI's chunk stream: each piece in, the OpenAI
    events its whole events make out. Function calls arrive whole: one tool call delta each.

    Gemini's stream has no closing event (the body's end is its end): the usage chunk and
    `[DONE]` come with the event holding a finishReason, when it holds the usageMetadata too
    (as Gemini's last event does); when it does not but earlier events did, with the next
    event that does (a body that ends before one does ends without them: the relay charges
    `partial_usage`); when no event held any, at once. A prompt blocked (promptFeedback, no
    candidates) ends it filtered. An error object in the stream, or a finishReason of a failed
    generation (FAILED), ends it with OpenAI's error chunk (and `failed`). One candidate is
    followed (`n` > 1 is refused for streams)."""

    def __init__(self, model: str) -> None:
        self.parser = SSEParser()
        self.chunks = openai_answer.Chunks(model)  # its id: from the first event
        self.metadata: dict[str, Any] | None = None  # the latest usageMetadata
        self.report: Usage | None = None  # the usage the stream ended with
        self.started = False
        self.finish_reason: str | None = None
        self.calls = 0  # tool calls so far (the next one's OpenAI index)
        self.text_parts: list[str] = []
        self.produced = 0  # characters of text, thoughts and calls
        self.done = False
        self.failed: GatewayError | None = None

    @property
    def usage(self) -> Usage | None:
        return self.report

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def partial_usage(self) -> Usage | None:
        """A stream cut before its end: the prompt Gemini reported (on every event), the output
        estimated from what was produced (4 characters a token, or the count reported, whichever
        is more: over, never under)."""
        if self.metadata is None:
            return None
        report = usage(self.metadata)
        if report is None:
            return None
        output = max(report.completion_tokens, -(-self.produced // 4))
        prompt = report.prompt_tokens
        return Usage(prompt, output, prompt + output, report.cached_tokens)

    def finish(self) -> bytes:
        # The last usageMetadata seen may predate the last candidates: no usage chunk of it
        # (the relay charges partial_usage, which estimates the output from what came).
        self.done = True
        return self.chunks.end(None)

    def feed(self, piece: bytes) -> bytes:
        out = bytearray()
        for data in self.parser.feed(piece):
            if self.done:
                break
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue  # not an event of this API: nothing to translate
            if isinstance(event, dict):
                out += b"".join(self._event(event))
        return bytes(out)

    def _end(self) -> Iterable[bytes]:
        self.done = True
        self.report = usage(self.metadata)
        yield self.chunks.end(self.report, _thoughts(self.metadata))

    def _fail(self, err: GatewayError) -> Iterable[bytes]:
        self.failed = err
        self.done = True
        yield self.chunks.error(err)

    def _event(self, event: dict[str, Any]) -> Iterable[bytes]:
        if "error" in event:
            err = _error_object(event)
            code = err.get("code")
            yield from self._fail(gateway_error(code if isinstance(code, int) else 500, err))
            return
        if not self.started:
            self.started = True
            self.chunks.id = _completion_id(event)
            yield self.chunks.delta({"role": "assistant", "content": ""})
        metadata = event.get("usageMetadata")
        if isinstance(metadata, dict):
            self.metadata = metadata
        if self.finish_reason is not None:
            # The finish was said; this event brings the usage it waited for.
            if isinstance(metadata, dict):
                yield from self._end()
            return
        candidates = event.get("candidates")
        candidate = candidates[0] if isinstance(candidates, list) and candidates else None
        if not isinstance(candidate, dict):
            if _blocked(event):
                self.finish_reason = "content_filter"
                yield self.chunks.delta({}, self.finish_reason)
                yield from self._end()
            return
        index = candidate.get("index", 0)
        index = index if isinstance(index, int) else 0
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str) and part["text"]:
                said = part["text"]
                self.produced += len(said)
                if part.get("thought") is True:
                    yield self.chunks.delta({"reasoning_content": said}, index=index)
                else:
                    self.text_parts.append(said)
                    yield self.chunks.delta({"content": said}, index=index)
            elif isinstance(part.get("functionCall"), dict):
                call = tool_call(part["functionCall"], part.get("thoughtSignature"))
                function = call["function"]
                self.produced += len(function["name"]) + len(function["arguments"])
                yield self.chunks.delta(
                    {"tool_calls": [{"index": self.calls, **call}]}, index=index
                )
                self.calls += 1
        reason = candidate.get("finishReason")
        if is_failed(reason):
            # The usage this event may hold stays in `metadata`: partial_usage charges it.
            yield from self._fail(failed(str(reason), candidate))
            return
        if reason and reason != "FINISH_REASON_UNSPECIFIED":
            self.finish_reason = finish_reason(reason, self.calls > 0)
            yield self.chunks.delta({}, self.finish_reason, index)
            if isinstance(metadata, dict) or self.metadata is None:
                yield from self._end()


# -- embeddings ---------------------------------------------------------------------------------

# Texts one request takes: the Gemini API's batchEmbedContents at most 100 (its own 400 says
# so); Vertex AI's predict at most 250 instances, and one for its Gemini embedding models.
GEMINI_API_BATCH = 100
VERTEX_BATCH = 250


def is_vertex(url_path: str) -> bool:
    """A backend URL of Vertex AI (`/v1/projects/{p}/locations/{l}/publishers/google`, or its
    express mode's `/v1/publishers/google`) rather than of the Gemini API (`/v1beta`)."""
    return "/projects/" in url_path or "/publishers/" in f"{url_path}/"


def vertex_method(model: str) -> str:
    """Vertex AI's method for an embedding model: `embedContent` (one content a request) for
    its Gemini embedding models after gemini-embedding-001 (Gemini Embedding 2, which `predict`
    does not serve), `predict` for the others (text-embedding-005, text-multilingual-embedding-
    002, gemini-embedding-001)."""
    model_id = model.rsplit("/", 1)[-1]
    if "gemini" in model_id and not model_id.startswith("gemini-embedding-001"):
        return "embedContent"
    return "predict"


def _prompt_count(metadata: Any) -> int | None:
    if not isinstance(metadata, dict):
        return None
    return openai_answer.count(metadata.get("promptTokenCount"))


class GeminiEmbeddings:
    """OpenAI's embeddings (base.Embeddings) on Google's APIs, the backend URL's path telling
    which: the Gemini API's `models/{model}:batchEmbedContents` (one EmbedContentRequest per
    text, in order; at most 100), or Vertex AI's `:predict` (`instances` of `{content}`; at
    most 250, one for gemini-embedding-001, as Vertex AI's reference limits them) or
    `:embedContent` (one text) by the model (`vertex_method`). `dimensions` is
    `outputDimensionality` (the model refuses a size it cannot give). No task type is sent
    (OpenAI has none: the model's default). On Vertex AI `autoTruncate` is false: a text longer
    than the model takes is refused, as OpenAI refuses it, not cut silently (the Gemini API has
    no such switch).

    Usage: the Gemini API's batchEmbedContents reports none (the gateway counts the input);
    Vertex AI's `predict` reports each text's `statistics.token_count` (their sum, when every
    prediction has one), its `embedContent` `usageMetadata.promptTokenCount`."""

    def path(self, target: ResolvedTarget) -> str:
        model = target.provider_model
        method = vertex_method(model) if is_vertex(target.url_path) else "batchEmbedContents"
        return f"{target.url_path}/models/{quote(model, safe='')}:{method}"

    def request(self, target: ResolvedTarget, body: dict[str, Any]) -> dict[str, Any]:
        openai_request.check_embeddings(body, PROVIDER_NAME)
        items = openai_request.texts(body, PROVIDER_NAME)
        size = openai_request.dimensions(body)
        model = target.provider_model
        if not is_vertex(target.url_path):
            openai_request.at_most(items, GEMINI_API_BATCH, PROVIDER_NAME)
            config = {} if size is None else {"outputDimensionality": size}
            return {
                "requests": [
                    {"model": f"models/{model}", "content": {"parts": [{"text": text}]}, **config}
                    for text in items
                ]
            }
        gemini_model = "gemini" in model.rsplit("/", 1)[-1]
        openai_request.at_most(items, 1 if gemini_model else VERTEX_BATCH, PROVIDER_NAME)
        if vertex_method(model) == "embedContent":
            out: dict[str, Any] = {
                "content": {"role": "user", "parts": [{"text": items[0]}]},
                "autoTruncate": False,
            }
            if size is not None:
                out["outputDimensionality"] = size
            return out
        parameters: dict[str, Any] = {"autoTruncate": False}
        if size is not None:
            parameters["outputDimensionality"] = size
        return {"instances": [{"content": text} for text in items], "parameters": parameters}

    def answer(
        self, answer: dict[str, Any], model: str, headers: Mapping[str, str]
    ) -> dict[str, Any]:
        predictions = answer.get("predictions")
        if isinstance(predictions, list):  # Vertex AI's predict
            vectors = []
            counts: list[int | None] = []
            for prediction in predictions:
                embedding = prediction.get("embeddings") if isinstance(prediction, dict) else None
                if not isinstance(embedding, dict):
                    raise ValueError("a prediction without its embeddings")
                vectors.append(openai_answer.vector(embedding.get("values")))
                stats = embedding.get("statistics")
                stats = stats if isinstance(stats, dict) else {}
                counts.append(
                    openai_answer.count(stats.get("token_count", stats.get("tokenCount")))
                )
            known = [c for c in counts if c is not None]
            tokens = sum(known) if vectors and len(known) == len(counts) else None
            return openai_answer.embeddings_list(vectors, model, tokens)
        single = answer.get("embedding")
        if isinstance(single, dict):  # embedContent (Vertex AI's, or the Gemini API's)
            values = [openai_answer.vector(single.get("values"))]
            return openai_answer.embeddings_list(
                values, model, _prompt_count(answer.get("usageMetadata"))
            )
        batch = answer.get("embeddings")
        if isinstance(batch, list) and batch:  # batchEmbedContents
            values = [
                openai_answer.vector(e.get("values") if isinstance(e, dict) else None)
                for e in batch
            ]
            return openai_answer.embeddings_list(
                values, model, _prompt_count(answer.get("usageMetadata"))
            )
        raise ValueError("not an embeddings answer")


EMBEDDINGS = GeminiEmbeddings()


# -- the provider -------------------------------------------------------------------------------


class Gemini:
    """Google's Gemini API (and Vertex AI's, the same bodies) as a provider (base.Provider)."""

    name = "gemini"
    # The credential (an API key, or a Vertex AI bearer token) is the backend's auth header.
    request_headers: Mapping[str, str] = {}
    # The project whose quota and billing a request uses (Google's system parameter): the
    # backend's credential decides it, not a header the client sent.
    strip_headers: tuple[str, ...] = ("x-goog-user-project",)
    stream_content_type = "text/event-stream"
    embeddings: Embeddings | None = EMBEDDINGS

    def path(self, target: ResolvedTarget, stream: bool) -> str:
        return model_path(target.url_path, target.provider_model, stream)

    def request(self, target: ResolvedTarget, body: dict[str, Any]) -> dict[str, Any]:
        return generate_content_request(body, target.max_tokens, target.provider_model)

    def usage(self, answer: dict[str, Any]) -> Usage | None:
        return usage(answer.get("usageMetadata"))

    def answer(self, answer: dict[str, Any], model: str) -> dict[str, Any]:
        return chat_completion(answer, model)

    def error(
        self, status: int, body: bytes, headers: Mapping[str, str] | None = None
    ) -> GatewayError:
        return error(status, body)  # Google names its errors in the body only

    def stream(self, model: str) -> StreamTranslator:
        return StreamTranslator(model)


PROVIDER = Gemini()

if TYPE_CHECKING:
    _PROVIDER: Provider = PROVIDER  # checked against the protocol by mypy
