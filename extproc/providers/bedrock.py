"""AWS Bedrock's Converse API (`POST /model/{modelId}/converse`, and `/converse-stream` for
ConverseStream) behind OpenAI's chat completions: the request translated to a Converse
request, the answer, its errors and its binary event stream (application/vnd.amazon.eventstream)
back to OpenAI's shapes.

The request is signed for AWS (SigV4) after the sidecar has set its body, by the proxy (Envoy's
aws_request_signing filter): nothing here knows about credentials.

Nothing is dropped without a word: a parameter Converse has no equivalent for is refused with a
400 naming it (unless it has its neutral value), and what Converse returns beyond OpenAI's
shape (reasoning) is passed as `reasoning_content`, as in anthropic.py. Where the reference
leaves a choice:

- `tool_choice: "none"`: Converse has no such choice. The tools are left out of the request
  (the model cannot call what it is not told of), which serves it exactly; but Converse refuses
  a conversation holding toolUse/toolResult blocks without a `toolConfig`, so such a request
  is refused (400 naming `tool_choice`) rather than served with callable tools.
- `parallel_tool_calls: false`: Converse has no counterpart (one model family's own field
  would be a model-specific `additionalModelRequestFields`). Neutral, so accepted, when no
  tools are sent (no tools, or `tool_choice: "none"`); refused (400 naming it) otherwise.
- Images: Converse takes an image's bytes or an S3 location, never a web URL; a `data:` URL
  becomes the bytes, any other URL is refused (400 naming the part) rather than fetched.
- `user`, `metadata`, `store`, `service_tier`: without effect on what the model produces; not
  sent (`requestMetadata` only takes a restricted alphabet, and a tier is the operator's choice).
- `top_p: 1` is left out (its neutral value, sent by many clients with a temperature, which
  recent Claude models on Bedrock refuse together with one).
- `max_completion_tokens` / `max_tokens`: `maxTokens` (the former when both are set); absent,
  the backend's `max_tokens`. A value below 1 is refused (400 naming it, as OpenAI refuses it;
  Converse's `maxTokens` has a minimum of 1), never replaced by the default.
- Tool call ids: Converse's `toolUseId` must match `[a-zA-Z0-9_.:-]{1,64}` (the service
  model). An OpenAI `tool_call_id` that does not (one made by another backend of a failover
  pool, e.g. a Gemini id carrying its thought signature) is sent as `t_` and 40 hex digits of
  its SHA-256, the same in the toolUse and in the toolResult answering it, so the pairs still
  match; the client's ids are never rewritten in what it gets back.

Usage: Bedrock's `inputTokens` does not hold the input read from or written to the prompt
cache (`cacheReadInputTokens`, `cacheWriteInputTokens`, reported apart, as Anthropic does);
OpenAI's `prompt_tokens` holds all of it, the reads as `cached_tokens`. `totalTokens` is not
read: the total is recomputed from the parts.

Errors: Bedrock's exception name is the code. A JSON error answer names it in the
`x-amzn-errortype` response header (`ValidationException:http://internal.amazon.com/coral/...`;
the body is often `{"message": ...}` alone), which is read first, as botocore's rest-json
parser does; then a body's `__type` (or `code`); else the name the status stands for. A stream
names it in its exception frame's `:exception-type`. The status a client gets is one OpenAI
clients know: ModelTimeoutException (408, the model took too long) is a 504 `timeout` (a
gateway timeout, which OpenAI's SDKs retry like any 5xx; 408 reads as the client's own
slowness), ModelErrorException and ModelStreamErrorException (424) are a 502 `server_error`,
ModelNotReadyException (429 in the service model, but not the client's rate) a 503, and
ServiceQuotaExceededException (400 in the service model: the account's quota, "resubmit
later") a 429 `rate_limit_error`; these three differ from their status only by name, so only
the header (or a body naming them) tells them apart.

What every translation reads the same way is read in openai_request.py, OpenAI's answers are
built in openai_answer.py.

References: AWS's Amazon Bedrock Runtime API reference (Converse, ConverseStream, and the
service model botocore ships), the AWS event stream encoding; OpenAI's chat completions API.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson
from botocore.eventstream import EventStreamBuffer  # type: ignore[import-untyped]

from ..errors import GatewayError, bad_request
from ..usage import Usage
from ..wire.openai.answer import count_of
from . import openai_answer, openai_request

if TYPE_CHECKING:
    from ..config import ResolvedTarget
    from .base import Embeddings, Provider

# The provider as the client's error messages name it.
PROVIDER_NAME = "AWS Bedrock"
STREAM_CONTENT_TYPE = "application/vnd.amazon.eventstream"

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
    # The model's output could not be read as what it meant to say: it ended all the same.
    "malformed_model_output": "stop",
    "malformed_tool_use": "stop",
}

# Converse's image formats by the media type of a data: URL.
IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}

# Converse's toolUseId (the service model's ToolUseId shape).
TOOL_USE_ID = re.compile(r"^[a-zA-Z0-9_.:-]{1,64}$")


def tool_use_id(call_id: Any) -> str:
    """An OpenAI tool call id as Converse's toolUseId: as it is when Converse takes it, else
    `t_` and 40 hex digits of its SHA-256 (the same for the same id, so a toolUse and the
    toolResult answering it still match)."""
    if not isinstance(call_id, str):
        raise TypeError("a tool call id is not a string")
    if TOOL_USE_ID.match(call_id):
        return call_id
    return "t_" + hashlib.sha256(call_id.encode()).hexdigest()[:40]


def model_path(url_path: str, model_id: str, stream: bool) -> str:
    """The request's path: the model id percent-encoded whole (an ARN holds `:` and `/`)."""
    operation = "converse-stream" if stream else "converse"
    return f"{url_path}/model/{quote(model_id, safe='')}/{operation}"


# -- the request --------------------------------------------------------------------------------


def converse_request(body: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """A validated OpenAI chat completions body as a Converse request (the model id is in the
    path, streaming is the path's choice). Raises a 400 for what Converse cannot do as asked,
    and for a part of the body that does not have the shape OpenAI's API gives it."""
    with openai_request.shape_checked():
        return _converse_request(body, default_max_tokens)


def _converse_request(body: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    # Converse takes no OpenAI parameter beyond those every translation takes
    # (openai_request.HANDLED): any other is refused unless it has its neutral value.
    openai_request.check_parameters(body, PROVIDER_NAME)
    system, messages, has_tool_blocks = _messages(body["messages"])
    out: dict[str, Any] = {"messages": messages}
    if system:
        out["system"] = system
    config: dict[str, Any] = {"maxTokens": openai_request.max_tokens(body, default_max_tokens)}
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, int | float) or isinstance(temperature, bool):
            raise TypeError("temperature is not a number")
        if temperature > 1:
            raise bad_request(
                "`temperature` above 1 is not supported by this model's provider (AWS Bedrock: "
                "0 to 1)",
                "unsupported_value",
                "temperature",
            )
        config["temperature"] = temperature
    top_p = body.get("top_p")
    if top_p is not None and top_p != 1:
        config["topP"] = top_p
    stops = openai_request.stop_sequences(body)
    if stops:
        config["stopSequences"] = stops
    out["inferenceConfig"] = config
    tool_config = _tool_config(
        body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    )
    if tool_config is not None:
        out["toolConfig"] = tool_config
    elif has_tool_blocks and body.get("tool_choice") == "none":
        raise bad_request(
            "`tool_choice: none` cannot be served by this model's provider (AWS Bedrock) for a "
            "conversation with tool calls: Converse needs the tools declared then, and has no "
            "choice that forbids calling them",
            "unsupported_value",
            "tool_choice",
        )
    elif has_tool_blocks:
        raise bad_request(
            "This model's provider (AWS Bedrock) needs `tools` declared for a conversation with "
            "tool calls",
            "invalid_value",
            "tools",
        )
    return out


def _tool_config(tools: Any, choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is not None and choice != "none" and not tools:
        raise bad_request("`tool_choice` needs `tools`", "invalid_value", "tool_choice")
    if not tools or choice == "none":
        # No tool can be called: parallel_tool_calls has its neutral effect whatever it says.
        return None
    if parallel is False:
        raise bad_request(
            "`parallel_tool_calls: false` is not supported by this model's provider (AWS "
            "Bedrock's Converse has no such option)",
            "unsupported_value",
            "parallel_tool_calls",
        )
    out: dict[str, Any] = {"tools": [_tool(t) for t in tools]}
    if choice is None:
        return out
    if choice == "auto":
        out["toolChoice"] = {"auto": {}}
    elif choice == "required":
        out["toolChoice"] = {"any": {}}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        out["toolChoice"] = {"tool": {"name": choice["function"]["name"]}}
    else:
        raise bad_request("`tool_choice` is not one OpenAI defines", "invalid_value", "tool_choice")
    return out


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise openai_request.unsupported(f"tools[].type={tool.get('type')}", PROVIDER_NAME)
    function = tool["function"]
    spec: dict[str, Any] = {
        "name": function["name"],
        "inputSchema": {"json": function.get("parameters") or {"type": "object", "properties": {}}},
    }
    if function.get("description"):
        spec["description"] = function["description"]
    if function.get("strict") is True:
        spec["strict"] = True
    return {"toolSpec": spec}


def _messages(
    messages: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """(system blocks, the turns, whether the turns hold tool calls or results): system and
    developer messages become system blocks; tool results go back in a user turn; consecutive
    turns of one role are merged, as Converse wants them alternating, from a user turn on."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    tool_blocks = False
    for i, message in enumerate(messages):
        role = message.get("role")
        if role in ("system", "developer"):
            text = openai_request.text_only(message.get("content"), f"messages[{i}].content")
            if text.strip():  # Converse refuses a blank system text
                system.append({"text": text})
            continue
        if role == "user":
            blocks = _blocks(message.get("content"), f"messages[{i}].content")
            turn_role = "user"
        elif role == "assistant":
            blocks = _assistant_blocks(message, i)
            turn_role = "assistant"
        elif role == "tool":
            result = _text_blocks(message.get("content"), f"messages[{i}].content")
            use_id = tool_use_id(message["tool_call_id"])
            blocks = [{"toolResult": {"toolUseId": use_id, "content": result}}]
            turn_role = "user"
        else:
            raise openai_request.unsupported_role(role, i)
        tool_blocks = tool_blocks or any("toolUse" in b or "toolResult" in b for b in blocks)
        openai_request.add_turn(turns, turn_role, blocks, "content")
    if not turns or turns[0]["role"] != "user":
        raise bad_request(
            "This model's provider (AWS Bedrock) needs the conversation to start with a user "
            "message (after any system messages)",
            "invalid_value",
            "messages",
        )
    return system, turns, tool_blocks


def _text_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """Text parts as Converse text blocks; Converse refuses a blank text block (an assistant's
    "\\n\\n" before its tool calls is common): it says nothing, so it is left out."""
    return [{"text": text} for text in openai_request.text_parts(content, where) if text.strip()]


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    # A blank text is left out by content_parts, as by _text_blocks.
    return [
        {"text": value} if kind == "text" else _image(value, at)
        for kind, value, at in openai_request.content_parts(content, where)
    ]


def _image(url: str, where: str) -> dict[str, Any]:
    image_format, data = openai_request.inline_image(url, where, PROVIDER_NAME, IMAGE_FORMATS)
    # A blob in Converse's JSON is its base64 text: the data URL's as it is.
    return {"image": {"format": image_format, "source": {"bytes": data}}}


def _assistant_blocks(message: dict[str, Any], i: int) -> list[dict[str, Any]]:
    blocks = _text_blocks(openai_request.assistant_content(message), f"messages[{i}].content")
    for call in message.get("tool_calls") or ():
        arguments = openai_request.tool_arguments(call, f"messages[{i}].tool_calls")
        blocks.append(
            {
                "toolUse": {
                    "toolUseId": tool_use_id(call["id"]),
                    "name": call["function"]["name"],
                    "input": arguments,
                }
            }
        )
    return blocks


# -- the answer ---------------------------------------------------------------------------------


def usage(report: Any) -> Usage | None:
    """Bedrock's usage in OpenAI's terms: the prompt counts the input read from the cache and
    written to it too (Bedrock's `inputTokens` holds neither), the reads are `cached_tokens`."""
    if not isinstance(report, dict) or count_of(report.get("inputTokens")) is None:
        return None
    read = report.get("cacheReadInputTokens") or 0
    written = report.get("cacheWriteInputTokens") or 0
    if count_of(read) is None or count_of(written) is None:
        return None
    prompt = report["inputTokens"] + read + written
    completion = report.get("outputTokens") or 0
    if count_of(completion) is None:
        return None
    return Usage(prompt, completion, prompt + completion, read, cache_write_tokens=written)


def chat_completion(answer: dict[str, Any], model: str) -> dict[str, Any]:
    """A Converse answer as an OpenAI chat completion for the client's `model` name."""
    text: list[str] = []
    reasoning: list[str] = []
    calls = []
    output = answer.get("output") or {}
    message = output.get("message") if isinstance(output, dict) else None
    for block in (message or {}).get("content") or ():
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            text.append(block["text"])
        elif isinstance(block.get("toolUse"), dict):
            use = block["toolUse"]
            arguments = orjson.dumps(use.get("input") or {}).decode()
            calls.append(
                openai_answer.tool_call(
                    str(use.get("toolUseId", "")), str(use.get("name", "")), arguments
                )
            )
        elif isinstance(block.get("reasoningContent"), dict):
            said = block["reasoningContent"].get("reasoningText")
            if isinstance(said, dict) and isinstance(said.get("text"), str):
                reasoning.append(said["text"])
    out_message = openai_answer.assistant_message(text, calls, reasoning)
    finish = FINISH_REASONS.get(str(answer.get("stopReason") or ""), "stop")
    # Converse answers carry no id (the request id is a header): one of OpenAI's shape.
    return openai_answer.chat_completion(
        openai_answer.completion_id(),
        model,
        [openai_answer.choice(out_message, finish)],
        usage(answer.get("usage")),
    )


# -- errors -------------------------------------------------------------------------------------

# Bedrock's exceptions as OpenAI's (type, status the client gets: None keeps Bedrock's).
_ERRORS: dict[str, tuple[str, int | None]] = {
    "ValidationException": ("invalid_request_error", 400),
    "SerializationException": ("invalid_request_error", 400),
    "AccessDeniedException": ("permission_error", 403),
    "ResourceNotFoundException": ("invalid_request_error", 404),
    "ThrottlingException": ("rate_limit_error", 429),
    "ServiceQuotaExceededException": ("rate_limit_error", 429),
    "ModelTimeoutException": ("timeout", 504),
    "ModelErrorException": ("server_error", 502),
    "ModelStreamErrorException": ("server_error", 502),
    "InternalServerException": ("server_error", 500),
    "ServiceUnavailableException": ("server_error", 503),
    "ModelNotReadyException": ("server_error", 503),
    # AWS's authentication layer (the gateway's own credentials, not the client's).
    "UnrecognizedClientException": ("authentication_error", None),
    "InvalidSignatureException": ("authentication_error", None),
    "IncompleteSignatureException": ("authentication_error", None),
    "MissingAuthenticationTokenException": ("authentication_error", None),
    "ExpiredTokenException": ("authentication_error", None),
}
# The exception a status means when the answer does not name it.
_BY_STATUS = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}


def exception_name(raw: Any) -> str | None:
    """`ValidationException` from any of the spellings AWS uses: `ValidationException`,
    `com.amazon.coral.validate#ValidationException`, `ValidationException:http://...`, and a
    stream's `validationException` (cut at the first `:`, then after the last `#`, as
    botocore does)."""
    if not isinstance(raw, str) or not raw:
        return None
    name = raw.partition(":")[0].rpartition("#")[2].strip()
    return name[:1].upper() + name[1:] if name else None


def gateway_error(status: int, name: str | None, message: Any) -> GatewayError:
    """A Bedrock exception (its name, or None: only the status is known) as the client's."""
    name = name or _BY_STATUS.get(status)
    known = _ERRORS.get(name or "")
    if known is not None:
        openai_type, fixed = known
    else:
        openai_type = "invalid_request_error" if 400 <= status < 500 else "server_error"
        fixed = None if status >= 400 else 502  # (an error answer that does not say it is one)
    return GatewayError(
        fixed or status,
        str(message or f"The provider answered {status}"),
        openai_type,
        name or f"provider_{status}",
    )


ERROR_TYPE_HEADER = "x-amzn-errortype"


def error(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> GatewayError:
    """A Bedrock error answer (`{"message": ...}`, `Message` in some) as the client's: the
    exception's name as the code, from the `x-amzn-errortype` response header (`headers`:
    lower-case names), else the body's `__type` (or `code`), else by status."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        parsed = {}
    name = (
        exception_name((headers or {}).get(ERROR_TYPE_HEADER))
        or exception_name(parsed.get("__type"))
        or exception_name(parsed.get("code") or parsed.get("Code"))
    )
    return gateway_error(status, name, parsed.get("message") or parsed.get("Message"))


# -- the event stream ---------------------------------------------------------------------------

# A stream's exception frames (`:exception-type`) and the status each stands for.
_STREAM_EXCEPTIONS = {
    "ThrottlingException": 429,
    "ModelStreamErrorException": 424,
    "ValidationException": 400,
    "InternalServerException": 500,
    "ServiceUnavailableException": 503,
}


class StreamTranslator:
    """ConverseStream's event stream (AWS's binary event stream framing, decoded by botocore's
    EventStreamBuffer as it arrives, split anywhere) to OpenAI's chunk stream: each piece in,
    the OpenAI events its whole frames make out. The usage chunk and `[DONE]` come with the
    `metadata` event, which ConverseStream sends after `messageStop`. A frame that cannot be
    decoded (a checksum that does not match) ends the stream with an error chunk."""

    def __init__(self, model: str) -> None:
        self.buffer = EventStreamBuffer()
        # ConverseStream carries no id either.
        self.chunks = openai_answer.Chunks(model, openai_answer.completion_id())
        self.report: Usage | None = None
        self.finish_reason: str | None = None
        self.tool_index: dict[int, int] = {}  # contentBlockIndex -> OpenAI tool call index
        self.text_parts: list[str] = []
        self.produced = 0  # characters of every delta (text, tool arguments, reasoning)
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
        """None: ConverseStream reports usage (the input's count included) in its last event
        only, so a stream cut before it reported nothing. The output could be estimated from
        what was produced, but not the input: the gateway then charges its own count of the
        prompt and of the text the relay kept (settlement.stream_usage), which a partial report
        with no input would undercut."""
        return None

    def finish(self) -> bytes:
        # No metadata event: no report, so no usage chunk (the gateway counts the stream).
        self.done = True
        return self.chunks.end(None)

    def feed(self, piece: bytes) -> bytes:
        if self.done:
            return b""
        out = bytearray()
        self.buffer.add_data(piece)
        while not self.done:
            try:
                message = next(self.buffer, None)
            except Exception as exc:  # botocore's ParserError, or struct/unicode errors
                out += self._fail(
                    GatewayError(
                        502,
                        f"The provider's event stream could not be read ({type(exc).__name__})",
                        "server_error",
                        "bad_event_stream",
                    )
                )
                break
            if message is None:
                break
            out += b"".join(self._message(message.headers, message.payload))
        return bytes(out)

    def _fail(self, err: GatewayError) -> bytes:
        self.failed = err
        self.done = True
        return self.chunks.error(err)

    def _message(self, headers: Mapping[str, Any], payload: bytes) -> Iterable[bytes]:
        kind = headers.get(":message-type")
        if kind == "exception":
            name = exception_name(headers.get(":exception-type")) or "InternalServerException"
            try:
                body = orjson.loads(payload)
            except orjson.JSONDecodeError:
                body = None
            if not isinstance(body, dict):
                body = {}
            message = body.get("message") or body.get("Message")
            status = _STREAM_EXCEPTIONS.get(name, 500)
            yield self._fail(gateway_error(status, name, message))
            return
        if kind == "error":  # the event stream's own error frame (no payload)
            name = exception_name(headers.get(":error-code")) or "InternalServerException"
            yield self._fail(gateway_error(500, name, headers.get(":error-message")))
            return
        if kind != "event":
            return
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return  # not an event of this API: nothing to translate
        if isinstance(event, dict):
            yield from self._event(str(headers.get(":event-type")), event)

    def _tool(self, block_index: Any) -> int:
        return self.tool_index.setdefault(
            block_index if isinstance(block_index, int) else 0, len(self.tool_index)
        )

    def _event(self, kind: str, event: dict[str, Any]) -> Iterable[bytes]:
        if kind == "messageStart":
            yield self.chunks.delta({"role": "assistant", "content": ""})
        elif kind == "contentBlockStart":
            start = event.get("start") or {}
            use = start.get("toolUse") if isinstance(start, dict) else None
            if isinstance(use, dict):
                index = self._tool(event.get("contentBlockIndex"))
                call = openai_answer.tool_call(
                    str(use.get("toolUseId", "")), str(use.get("name", "")), ""
                )
                yield self.chunks.delta({"tool_calls": [{"index": index, **call}]})
        elif kind == "contentBlockDelta":
            delta = event.get("delta") or {}
            if not isinstance(delta, dict):
                return
            if isinstance(delta.get("text"), str):
                self.produced += len(delta["text"])
                self.text_parts.append(delta["text"])
                yield self.chunks.delta({"content": delta["text"]})
            elif isinstance(delta.get("toolUse"), dict):
                fragment = delta["toolUse"].get("input")
                if isinstance(fragment, str):
                    self.produced += len(fragment)
                    index = self._tool(event.get("contentBlockIndex"))
                    arguments = {"arguments": fragment}
                    yield self.chunks.delta(
                        {"tool_calls": [{"index": index, "function": arguments}]}
                    )
            elif isinstance(delta.get("reasoningContent"), dict):
                said = delta["reasoningContent"].get("text")
                if isinstance(said, str):
                    self.produced += len(said)
                    yield self.chunks.delta({"reasoning_content": said})
        elif kind == "messageStop":
            self.finish_reason = FINISH_REASONS.get(str(event.get("stopReason") or ""), "stop")
            yield self.chunks.delta({}, self.finish_reason)
        elif kind == "metadata":
            self.done = True
            self.report = usage(event.get("usage"))
            yield self.chunks.end(self.report)
        # contentBlockStop, and events added later: nothing to say.


# -- embeddings (InvokeModel) ------------------------------------------------------------------

INPUT_TOKENS_HEADER = "x-amzn-bedrock-input-token-count"
# Bedrock's embedding models by their base model id, each with its request format, the texts
# one request takes, and the `dimensions` it takes (the first: the model's own size).
EMBEDDING_MODELS: dict[str, tuple[str, int, tuple[int, ...]]] = {
    "amazon.titan-embed-text-v2": ("titan", 1, (1024, 512, 256)),
    "amazon.titan-embed-text-v1": ("titan-v1", 1, (1536,)),
    "amazon.titan-embed-g1-text-02": ("titan-v1", 1, (1536,)),
    "cohere.embed-english-v3": ("cohere-v3", 96, (1024,)),
    "cohere.embed-multilingual-v3": ("cohere-v3", 96, (1024,)),
    "cohere.embed-v4": ("cohere-v4", 96, (1536, 1024, 512, 256)),
}
# A base model id, after an inference profile's geography (`us.`, `eu.`, `apac.`, `global.`,
# `us-gov.`...) and before the version (`:0`, `:2:8k`).
_EMBEDDING_MODEL = re.compile(
    r"^(?:[a-z]{2,8}(?:-[a-z]+)?\.)?(?P<base>"
    + "|".join(re.escape(m) for m in EMBEDDING_MODELS)
    + r")(?::[\w.:-]*)?$"
)
# Cohere Embed v3 on Bedrock takes texts of at most 2048 characters.
COHERE_V3_TEXT_CHARACTERS = 2048


def _header_count(headers: Mapping[str, str], name: str) -> int | None:
    """A count in a response header (`name`: lower-case), whatever the case of its name."""
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


def embedding_model(model_id: str) -> tuple[str, int, tuple[int, ...]] | None:
    """The embedding model a Bedrock model id names: a model id, an inference profile id (its
    geography prefix), or the ARN of either (`...:foundation-model/{id}`,
    `...:inference-profile/{id}`). None for any other: an ARN that does not say which model it
    serves (an application inference profile, a provisioned model), or a model whose format
    the gateway does not know."""
    if model_id.startswith("arn:"):
        # arn:{partition}:bedrock:{region}:{account}:{type}/{id}
        kind, _, resource = model_id.split(":", 5)[-1].partition("/")
        if kind not in ("foundation-model", "inference-profile"):
            return None
        model_id = resource
    match = _EMBEDDING_MODEL.match(model_id)
    return None if match is None else EMBEDDING_MODELS[match["base"]]


class BedrockEmbeddings:
    """OpenAI's embeddings (base.Embeddings) on Bedrock's InvokeModel
    (`POST /model/{modelId}/invoke`), in the request format of the model the backend's model id
    names (`embedding_model`; Bedrock's own formats differ by model, and nothing in the answer
    to a wrong one would say so): any other model id is refused (400 naming `model`).

    - Amazon Titan Text Embeddings v2: `{inputText, dimensions, normalize: true}` (OpenAI's
      vectors are normalized), one text a request (more: 400 naming `input`); `dimensions`
      256, 512 or 1024. Titan Text Embeddings v1 (G1): `{inputText}`, 1536 dimensions.
    - Cohere Embed v3 (english, multilingual) and v4: `{texts, input_type: search_document,
      embedding_types: [float]}`, at most 96 texts (v3: of at most 2048 characters each), no
      `truncate` (Cohere's default refuses a text too long, as OpenAI does). OpenAI has no
      input type: `search_document`, the type of a corpus, is sent (a query embedded for search
      may match slightly less well than with `search_query`). v3: 1024 dimensions; v4:
      `output_dimension` 256, 512, 1024 or 1536.

    Usage: Titan's `inputTextTokenCount`, else (Cohere) the input count Bedrock reports in the
    `X-Amzn-Bedrock-Input-Token-Count` response header."""

    def path(self, target: ResolvedTarget) -> str:
        return f"{target.url_path}/model/{quote(target.provider_model, safe='')}/invoke"

    def request(self, target: ResolvedTarget, body: dict[str, Any]) -> dict[str, Any]:
        openai_request.check_embeddings(body, PROVIDER_NAME)
        known = embedding_model(target.provider_model)
        if known is None:
            raise bad_request(
                f"This model's Bedrock model id ({target.provider_model}) is not one of the "
                "embedding models the gateway translates to (Amazon Titan Text Embeddings v1 "
                "and v2, Cohere Embed v3 and v4: by model id, inference profile id, or their "
                "ARN)",
                "model_not_supported",
                "model",
            )
        kind, most, sizes = known
        items = openai_request.texts(body, PROVIDER_NAME)
        openai_request.at_most(items, most, PROVIDER_NAME)
        size = openai_request.dimensions(body)
        if size is not None and size not in sizes:
            raise openai_request.dimensions_refused(size, PROVIDER_NAME, sizes)
        if kind == "titan":
            out: dict[str, Any] = {"inputText": items[0], "normalize": True}
            if size is not None:
                out["dimensions"] = size
            return out
        if kind == "titan-v1":
            return {"inputText": items[0]}
        if kind == "cohere-v3":
            for i, text in enumerate(items):
                if len(text) > COHERE_V3_TEXT_CHARACTERS:
                    raise bad_request(
                        f"`input[{i}]` is longer than this model's provider takes (AWS Bedrock, "
                        f"Cohere Embed v3: {COHERE_V3_TEXT_CHARACTERS} characters a text)",
                        "unsupported_value",
                        "input",
                    )
        out = {"texts": items, "input_type": "search_document", "embedding_types": ["float"]}
        if kind == "cohere-v4" and size is not None:
            out["output_dimension"] = size
        return out

    def answer(
        self, answer: dict[str, Any], model: str, headers: Mapping[str, str]
    ) -> dict[str, Any]:
        reported = _header_count(headers, INPUT_TOKENS_HEADER)
        titan = answer.get("embedding")
        if isinstance(titan, list):
            tokens = openai_answer.count(answer.get("inputTextTokenCount"))
            return openai_answer.embeddings_list(
                [openai_answer.vector(titan)], model, reported if tokens is None else tokens
            )
        cohere = answer.get("embeddings")
        if isinstance(cohere, dict):  # embeddings_by_type
            cohere = cohere.get("float")
        if isinstance(cohere, list) and cohere:
            return openai_answer.embeddings_list(
                [openai_answer.vector(v) for v in cohere], model, reported
            )
        raise ValueError("not an embeddings answer")


EMBEDDINGS = BedrockEmbeddings()


# -- the provider -------------------------------------------------------------------------------


class Bedrock:
    """AWS Bedrock's Converse API as a provider (base.Provider)."""

    name = "bedrock"
    # The request is signed (SigV4: by Envoy, or in a pool by aws_signing.py); Converse takes
    # no version header.
    request_headers: Mapping[str, str] = {}
    strip_headers: tuple[str, ...] = ()
    stream_content_type = STREAM_CONTENT_TYPE
    embeddings: Embeddings | None = EMBEDDINGS

    def path(self, target: ResolvedTarget, stream: bool) -> str:
        return model_path(target.url_path, target.provider_model, stream)

    def request(self, target: ResolvedTarget, body: dict[str, Any]) -> dict[str, Any]:
        return converse_request(body, target.max_tokens)

    def usage(self, answer: dict[str, Any]) -> Usage | None:
        return usage(answer.get("usage"))

    def answer(self, answer: dict[str, Any], model: str) -> dict[str, Any]:
        return chat_completion(answer, model)

    def error(
        self, status: int, body: bytes, headers: Mapping[str, str] | None = None
    ) -> GatewayError:
        return error(status, body, headers)

    def stream(self, model: str) -> StreamTranslator:
        return StreamTranslator(model)


PROVIDER = Bedrock()

if TYPE_CHECKING:
    _PROVIDER: Provider = PROVIDER  # checked against the protocol by mypy
