"""AWS Bedrock's Converse API (`POST /model/{modelId}/converse`, `.../converse-stream`) as the
fake speaks it, after AWS's published API reference (and the service model botocore ships): the
request checked as strictly as Bedrock checks it (an unknown field, a block of the wrong shape,
a conversation that does not alternate, a tool result that answers no tool use: 400
`ValidationException` in Bedrock's error shape, named in `x-amzn-errortype`), the answer as a
Converse response or as ConverseStream's binary event stream, usage with the cache fields when
the request has cache points.

Authentication: requests are signed with AWS Signature Version 4. When the fake knows the
credentials (`FakeLLMSettings.aws_access_key_id` / `aws_secret_access_key`, and
`aws_session_token`; by default the standard AWS environment variables of its process), the
signature is computed again with botocore over what arrived (method, path, query, the headers
the signature names, the body) for the region and service of its credential scope, and a
request whose signature differs is refused (403, as AWS does). Without credentials any signed
request is taken. A Bedrock API key (`Authorization: Bearer`) is checked against
`aws_bearer_token` (AWS_BEARER_TOKEN_BEDROCK).

Knobs beyond the fake's common ones (request headers):

- ``x-fake-split: N`` or ``random``: the event stream written N bytes at a time (or in random
  pieces of 1 to 64 bytes), for clients' incremental decoding.
- ``x-fake-stream-exception: TYPE[:N]``: the stream ends, after N frames (default 2), with an
  exception frame of TYPE (``modelStreamErrorException``, ``throttlingException``, ...).
- ``x-fake-no-usage: 1``: the stream ends after `messageStop`, without its `metadata` event
  (a Converse answer always has its usage: the field is required).

InvokeModel (`POST /model/{modelId}/invoke`, `invoke`) serves the embedding models, each
checked after its own reference (AWS's model parameters pages): Amazon Titan Text Embeddings v2
(`{inputText, dimensions: 256|512|1024, normalize, embeddingTypes}`) and v1
(`{inputText}`, 1536 dimensions), Cohere Embed v3 (`{texts: at most 96 of at most 2048
characters, input_type, truncate: NONE|START|END, embedding_types}`, 1024 dimensions) and v4
(`output_dimension` 256 to 1536, `truncate: NONE|LEFT|RIGHT`), by model id, inference profile
id or their ARNs; a malformed body is a 400 `ValidationException` ("Malformed input request:
..."), another model "The provided model identifier is invalid.". The vectors are the OpenAI
endpoint's deterministic unit vectors for the same text; the input's token count (4 bytes a
token) is in the answer's `X-Amzn-Bedrock-Input-Token-Count` header (and Titan's
`inputTextTokenCount`), as Bedrock reports it.

Faults (`x-fake-fault`, `--fault`) answer in Bedrock's shape: 429 `ThrottlingException`, 500
`InternalServerException`, 503 `ServiceUnavailableException`; resets and stalls as on the
OpenAI endpoints (`-after:N` counting event stream frames).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import hashlib
import hmac
import random
import re
import struct
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web
from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest, HTTPHeaders  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]

from .faults import EventWriter, non_stream_fault, pause, reset_connection, sleep_until
from .settings import FakeLLMSettings, RequestSettings, request_settings
from .wire import (
    MALFORMED,
    RequestError,
    content,
    embedding,
    estimate_tokens,
    is_int,
    text_pieces,
    word_pieces,
)

STREAM_CONTENT_TYPE = "application/vnd.amazon.eventstream"
SERVICE = "bedrock"
_NAMESPACE = ":http://internal.amazon.com/coral/com.amazon.bedrock/"

_TOP_LEVEL = frozenset(
    {
        "messages", "system", "inferenceConfig", "toolConfig", "guardrailConfig",
        "additionalModelRequestFields", "promptVariables", "additionalModelResponseFieldPaths",
        "requestMetadata", "performanceConfig", "serviceTier", "outputConfig",
        "projectIdentifier",
    }
)  # fmt: skip
_USER_BLOCKS = frozenset(
    {"text", "image", "document", "video", "audio", "toolResult", "guardContent", "cachePoint",
     "searchResult"}
)  # fmt: skip
_ASSISTANT_BLOCKS = frozenset(
    {"text", "image", "document", "video", "toolUse", "reasoningContent", "cachePoint",
     "citationsContent"}
)  # fmt: skip
_IMAGE_FORMATS = frozenset({"png", "jpeg", "gif", "webp"})
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_TOOL_USE_ID = re.compile(r"^[a-zA-Z0-9_.:-]{1,64}$")
_S3_URI = re.compile(r"^s3://[a-z0-9][\.\-a-z0-9]{1,61}[a-z0-9](/.*)?$")
_PATH = re.compile(r"^/model/(?P<model>[^/]+)/(?P<operation>converse|converse-stream)$")
_STREAM_EXCEPTIONS = frozenset(
    {"internalServerException", "modelStreamErrorException", "validationException",
     "throttlingException", "serviceUnavailableException"}
)  # fmt: skip
_SIGV4_TIME = "%Y%m%dT%H%M%SZ"
_MAX_SKEW = datetime.timedelta(minutes=15)
_SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. Check "
    "your AWS Secret Access Key and signing method. Consult the service documentation for "
    "details."
)
_PADDING = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class BedrockError(Exception):
    def __init__(self, message: str, kind: str = "ValidationException", status: int = 400):
        super().__init__(message)
        self.message, self.kind, self.status = message, kind, status


def error_response(err: BedrockError, headers: Mapping[str, str] | None = None) -> web.Response:
    """Bedrock's error shape: `{"message": ...}`, the exception named in `x-amzn-errortype`."""
    return web.Response(
        body=orjson.dumps({"message": err.message}),
        status=err.status,
        content_type="application/json",
        headers={
            "x-amzn-errortype": err.kind + _NAMESPACE,
            "x-amzn-requestid": str(uuid.uuid4()),
            **(headers or {}),
        },
    )


# -- authentication -----------------------------------------------------------------------------


class _Recomputed(SigV4Auth):
    """botocore's SigV4 signer over exactly the headers a request's signature names, and the
    payload hash it declared (x-amz-content-sha256) or that of its body."""

    def __init__(
        self, credentials: Any, region: str, service: str, headers: Any, payload_hash: str
    ) -> None:
        super().__init__(credentials, service, region)
        self._signed_headers = headers
        self._payload_hash = payload_hash

    def headers_to_sign(self, request: Any) -> Any:
        return self._signed_headers

    def payload(self, request: Any) -> str:
        return self._payload_hash


def check_auth(request: web.Request, raw: bytes, settings: FakeLLMSettings) -> None:
    """Raises the 403 (or 400) AWS answers a request not signed as its credentials sign."""
    header = request.headers.get("authorization", "")
    if not header:
        raise BedrockError(
            "Missing Authentication Token", "MissingAuthenticationTokenException", 403
        )
    if header[:7].lower() == "bearer ":
        token = settings.aws_bearer_token
        if token is not None and hmac.compare_digest(header[7:].strip().encode(), token.encode()):
            return
        if token is None and settings.aws_access_key_id is None:
            return  # no credentials to check against
        raise BedrockError(
            "Invalid API Key format: Must start with pre-defined prefix",
            "UnrecognizedClientException",
            403,
        )
    algorithm, _, rest = header.partition(" ")
    parts = dict(p.strip().partition("=")[::2] for p in rest.split(","))
    credential, signed, signature = (
        parts.get("Credential"), parts.get("SignedHeaders"), parts.get("Signature")
    )  # fmt: skip
    if algorithm != "AWS4-HMAC-SHA256" or not credential or not signed or not signature:
        raise BedrockError(
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' "
            f"parameters of algorithm AWS4-HMAC-SHA256. Authorization={header[:40]}...",
            "IncompleteSignatureException",
        )
    scope = credential.split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise BedrockError(
            f"Credential should be scoped to a valid region. Credential={credential}",
            "IncompleteSignatureException",
        )
    access_key, day, region, service, _ = scope
    if service != SERVICE:
        raise BedrockError(
            f"Credential should be scoped to correct service: '{SERVICE}'.",
            "InvalidSignatureException",
            403,
        )
    names = signed.split(";")
    for required in ("host", "x-amz-date"):
        if required not in names:
            raise BedrockError(
                f"'{required}' must be a 'SignedHeader' in the AWS Authorization.",
                "IncompleteSignatureException",
            )
    amz_date = request.headers.get("x-amz-date", "")
    try:
        signed_at = datetime.datetime.strptime(amz_date, _SIGV4_TIME).replace(tzinfo=datetime.UTC)
    except ValueError:
        raise BedrockError(
            "x-amz-date is not an ISO-8601 basic date and time", "IncompleteSignatureException"
        ) from None
    if amz_date[:8] != day:
        raise BedrockError(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 "
            "version of date from HTTP",
            "InvalidSignatureException",
            403,
        )
    now = datetime.datetime.now(datetime.UTC)
    if abs(now - signed_at) > _MAX_SKEW:
        raise BedrockError(
            f"Signature expired: {amz_date} is now earlier or later than "
            f"{now.strftime(_SIGV4_TIME)} (15 minutes apart)",
            "InvalidSignatureException",
            403,
        )
    if settings.aws_access_key_id is None or settings.aws_secret_access_key is None:
        return  # no credentials to check against
    token = request.headers.get("x-amz-security-token")
    if not hmac.compare_digest(access_key.encode(), settings.aws_access_key_id.encode()) or (
        token != settings.aws_session_token
    ):
        raise BedrockError(
            "The security token included in the request is invalid.",
            "UnrecognizedClientException",
            403,
        )
    body_hash = hashlib.sha256(raw).hexdigest()
    declared = request.headers.get("x-amz-content-sha256")
    if declared is not None and declared not in (body_hash, "UNSIGNED-PAYLOAD"):
        raise BedrockError(
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
            "InvalidSignatureException",
            403,
        )
    headers = HTTPHeaders()
    for name in names:
        for value in request.headers.getall(name, ()):
            headers[name] = value
    aws_request = AWSRequest(
        method=request.method, url=f"http://{request.host}{request.raw_path}", data=raw
    )
    aws_request.context["timestamp"] = amz_date
    credentials = Credentials(access_key, settings.aws_secret_access_key, token)
    signer = _Recomputed(credentials, region, service, headers, declared or body_hash)
    expected = signer.signature(
        signer.string_to_sign(aws_request, signer.canonical_request(aws_request)), aws_request
    )
    if not hmac.compare_digest(str(expected).encode(), signature.encode()):
        raise BedrockError(_SIGNATURE_MISMATCH, "InvalidSignatureException", 403)


# -- the request --------------------------------------------------------------------------------


def _fields(value: Any, where: str, required: Iterable[str], optional: Iterable[str] = ()) -> None:
    if not isinstance(value, dict):
        raise BedrockError(f"{where}: expected a structure")
    required = set(required)
    missing = required - set(value)
    if missing:
        raise BedrockError(f"{where}.{sorted(missing)[0]}: member must not be null")
    extra = set(value) - required - set(optional)
    if extra:
        raise BedrockError(f"{where}: extraneous key [{sorted(extra)[0]}] is not permitted")


def _union(value: Any, where: str, allowed: Iterable[str]) -> tuple[str, Any]:
    """The one member a union (a content block, a tool choice, ...) has set."""
    if not isinstance(value, dict) or len(value) != 1:
        raise BedrockError(f"{where}: exactly one member of the union must be set")
    ((member, inner),) = value.items()
    if member not in allowed:
        raise BedrockError(f"{where}: member [{member}] is not permitted here")
    return member, inner


def _text(value: Any, where: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise BedrockError(
            f"The text field in the {where} is blank. Add text to the text field, and try again."
        )


def _base64(value: Any, where: str) -> None:
    try:
        if not isinstance(value, str) or not value or not base64.b64decode(value, validate=True):
            raise ValueError
    except (ValueError, binascii.Error):
        raise BedrockError(f"{where}: expected non-empty base64-encoded bytes") from None


def _image(image: Any, where: str) -> None:
    _fields(image, where, ("format", "source"))
    if image["format"] not in _IMAGE_FORMATS:
        raise BedrockError(f"{where}.format: must be one of {sorted(_IMAGE_FORMATS)}")
    member, source = _union(image["source"], f"{where}.source", ("bytes", "s3Location"))
    if member == "bytes":
        _base64(source, f"{where}.source.bytes")
    else:
        _fields(source, f"{where}.source.s3Location", ("uri",), ("bucketOwner",))
        if not isinstance(source["uri"], str) or not _S3_URI.match(source["uri"]):
            raise BedrockError(f"{where}.source.s3Location.uri: must be an S3 URI")


def _cache_point(point: Any, where: str) -> None:
    _fields(point, where, ("type",), ("ttl",))
    if point["type"] != "default" or point.get("ttl", "5m") not in ("5m", "1h"):
        raise BedrockError(f"{where}: type must be default, ttl 5m or 1h")


def _block(block: Any, where: str, allowed: frozenset[str]) -> tuple[str, Any]:
    member, inner = _union(block, where, allowed)
    at = f"{where}.{member}"
    if member == "text":
        _text(inner, f"ContentBlock object at {where}")
    elif member == "image":
        _image(inner, at)
    elif member == "toolUse":
        _fields(inner, at, ("toolUseId", "name", "input"), ("type",))
        if not isinstance(inner["toolUseId"], str) or not _TOOL_USE_ID.match(inner["toolUseId"]):
            raise BedrockError(f"{at}.toolUseId: must match {_TOOL_USE_ID.pattern}")
        if not isinstance(inner["name"], str) or not _TOOL_NAME.match(inner["name"]):
            raise BedrockError(f"{at}.name: must match {_TOOL_NAME.pattern}")
        if not isinstance(inner["input"], dict):
            raise BedrockError(f"{at}.input: the tool input must be a JSON object")
    elif member == "toolResult":
        _fields(inner, at, ("toolUseId", "content"), ("status", "type"))
        if inner.get("status", "success") not in ("success", "error"):
            raise BedrockError(f"{at}.status: must be success or error")
        if not isinstance(inner["content"], list):
            raise BedrockError(f"{at}.content: expected a list")
        for k, part in enumerate(inner["content"]):
            kind, value = _union(
                part, f"{at}.content.{k}", ("json", "text", "image", "document", "video",
                                            "searchResult")
            )  # fmt: skip
            if kind == "text" and not isinstance(value, str):
                raise BedrockError(f"{at}.content.{k}.text: expected a string")
            if kind == "image":
                _image(value, f"{at}.content.{k}.image")
    elif member == "cachePoint":
        _cache_point(inner, at)
    elif member == "reasoningContent":
        kind, value = _union(inner, at, ("reasoningText", "redactedContent"))
        if kind == "reasoningText":
            _fields(value, f"{at}.reasoningText", ("text",), ("signature",))
        else:
            _base64(value, f"{at}.redactedContent")
    elif member in ("document", "video", "audio"):
        _fields(
            inner,
            at,
            ("source",) if member != "document" else ("name", "source"),
            ("format", "name", "context", "citations"),
        )
    elif not isinstance(inner, dict):  # guardContent, searchResult, citationsContent
        raise BedrockError(f"{at}: expected a structure")
    return member, inner


def check_request(body: Any) -> None:
    """Raises the 400 Bedrock would answer with."""
    if body is MALFORMED or not isinstance(body, dict):
        raise BedrockError("Unable to parse the request body as JSON", "SerializationException")
    for key in body:
        if key not in _TOP_LEVEL:
            raise BedrockError(f"extraneous key [{key}] is not permitted")
    system = body.get("system")
    if system is not None:
        if not isinstance(system, list):
            raise BedrockError("system: expected a list")
        for k, block in enumerate(system):
            member, inner = _union(block, f"system.{k}", ("text", "guardContent", "cachePoint"))
            if member == "text":
                _text(inner, f"SystemContentBlock object at system.{k}")
            elif member == "cachePoint":
                _cache_point(inner, f"system.{k}.cachePoint")
    _check_inference(body.get("inferenceConfig"))
    names = _check_tools(body.get("toolConfig"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BedrockError(
            "A conversation must start with a user message. Try again with a "
            "conversation that starts with a user message."
        )
    uses: set[str] = set()  # the tool uses of the assistant turn before
    any_tool_blocks = False
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        _fields(message, where, ("role", "content"))
        role = message["role"]
        if role not in ("user", "assistant"):
            raise BedrockError(f"{where}.role: must be user or assistant")
        if i == 0 and role != "user":
            raise BedrockError(
                "A conversation must start with a user message. Try again with a "
                "conversation that starts with a user message."
            )
        if i and messages[i - 1].get("role") == role:
            raise BedrockError(
                "A conversation must alternate between user and assistant roles. "
                "Make sure the conversation alternates between user and assistant "
                "roles and try again."
            )
        blocks = message["content"]
        if not isinstance(blocks, list) or not blocks:
            raise BedrockError(f"{where}.content: must have at least 1 content block")
        allowed = _USER_BLOCKS if role == "user" else _ASSISTANT_BLOCKS
        checked = [_block(b, f"{where}.content.{j}", allowed) for j, b in enumerate(blocks)]
        if role == "user":
            results = [inner["toolUseId"] for member, inner in checked if member == "toolResult"]
            if set(results) - uses:
                raise BedrockError(
                    f"{where}.content: the toolResult blocks at {where}.content reference a "
                    f"toolUseId that is not in the previous turn: {sorted(set(results) - uses)[0]}"
                )
            if uses - set(results):
                raise BedrockError(
                    f"Expected toolResult blocks at {where}.content for the following Ids: "
                    + ", ".join(sorted(uses - set(results)))
                )
            uses = set()
            any_tool_blocks = any_tool_blocks or bool(results)
        else:
            uses = {inner["toolUseId"] for member, inner in checked if member == "toolUse"}
            any_tool_blocks = any_tool_blocks or bool(uses)
    if any_tool_blocks and names is None:
        raise BedrockError(
            "The toolConfig field must be defined when using toolUse and toolResult content blocks."
        )
    _check_extras(body)


def _check_inference(config: Any) -> None:
    if config is None:
        return
    _fields(config, "inferenceConfig", (), ("maxTokens", "temperature", "topP", "stopSequences"))
    tokens = config.get("maxTokens")
    if tokens is not None and (not is_int(tokens) or tokens < 1):
        raise BedrockError("inferenceConfig.maxTokens: must be an integer >= 1")
    for name in ("temperature", "topP"):
        value = config.get(name)
        if value is not None and not (
            isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
        ):
            raise BedrockError(f"inferenceConfig.{name}: must be a number between 0 and 1")
    stops = config.get("stopSequences")
    if stops is not None and not (
        isinstance(stops, list)
        and len(stops) <= 2500
        and all(isinstance(s, str) and s for s in stops)
    ):
        raise BedrockError("inferenceConfig.stopSequences: must be a list of non-empty strings")


def _check_tools(config: Any) -> list[str] | None:
    """The names of the tools the request declares (None: it has no toolConfig)."""
    if config is None:
        return None
    _fields(config, "toolConfig", ("tools",), ("toolChoice",))
    tools = config["tools"]
    if not isinstance(tools, list) or not tools:
        raise BedrockError("toolConfig.tools: must have at least 1 tool")
    names: list[str] = []
    for k, tool in enumerate(tools):
        where = f"toolConfig.tools.{k}"
        member, inner = _union(tool, where, ("toolSpec", "systemTool", "cachePoint"))
        if member == "cachePoint":
            _cache_point(inner, f"{where}.cachePoint")
            continue
        at = f"{where}.{member}"
        if member == "systemTool":
            _fields(inner, at, ("name",))
        else:
            _fields(inner, at, ("name", "inputSchema"), ("description", "strict"))
            description = inner.get("description")
            if description is not None and (not isinstance(description, str) or not description):
                raise BedrockError(f"{at}.description: must be a non-empty string")
            if inner.get("strict") is not None and not isinstance(inner["strict"], bool):
                raise BedrockError(f"{at}.strict: must be a boolean")
            _, schema = _union(inner["inputSchema"], f"{at}.inputSchema", ("json",))
            if not isinstance(schema, dict) or schema.get("type") != "object":
                raise BedrockError(
                    f"{at}.inputSchema.json: The top level schema type must be object"
                )
        if not isinstance(inner["name"], str) or not _TOOL_NAME.match(inner["name"]):
            raise BedrockError(f"{at}.name: must match {_TOOL_NAME.pattern}")
        if inner["name"] in names:
            raise BedrockError(f"{at}.name: the tool name {inner['name']} is not unique")
        names.append(inner["name"])
    choice = config.get("toolChoice")
    if choice is not None:
        member, inner = _union(choice, "toolConfig.toolChoice", ("auto", "any", "tool"))
        if member == "tool":
            _fields(inner, "toolConfig.toolChoice.tool", ("name",))
            if inner["name"] not in names:
                raise BedrockError(
                    f"toolConfig.toolChoice.tool.name: no tool named "
                    f"{inner['name']!r} in toolConfig.tools"
                )
        elif inner != {}:
            raise BedrockError(f"toolConfig.toolChoice.{member}: must be an empty structure")
    return names


def _check_extras(body: dict[str, Any]) -> None:
    for name in (
        "additionalModelRequestFields",
        "guardrailConfig",
        "promptVariables",
        "outputConfig",
    ):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise BedrockError(f"{name}: expected a structure")
    metadata = body.get("requestMetadata")
    if metadata is not None and not (
        isinstance(metadata, dict)
        and 1 <= len(metadata) <= 16
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise BedrockError("requestMetadata: must map 1 to 16 strings to strings")
    performance = body.get("performanceConfig")
    if performance is not None:
        _fields(performance, "performanceConfig", (), ("latency",))
        if performance.get("latency", "standard") not in ("standard", "optimized"):
            raise BedrockError("performanceConfig.latency: must be standard or optimized")
    tier = body.get("serviceTier")
    if tier is not None:
        _fields(tier, "serviceTier", ("type",))
        if tier["type"] not in ("priority", "default", "flex", "reserved"):
            raise BedrockError("serviceTier.type: must be priority, default, flex or reserved")
    paths = body.get("additionalModelResponseFieldPaths")
    if paths is not None and not (
        isinstance(paths, list) and len(paths) <= 10 and all(isinstance(p, str) for p in paths)
    ):
        raise BedrockError("additionalModelResponseFieldPaths: at most 10 strings")


# -- the event stream encoding ------------------------------------------------------------------


def _header(name: str, value: str) -> bytes:
    key, text = name.encode(), value.encode()
    # A header: its name's length (1 byte), the name, the value's type (7: string), the value's
    # length (2 bytes, big-endian), the value.
    return struct.pack(">B", len(key)) + key + b"\x07" + struct.pack(">H", len(text)) + text


def frame(headers: Iterable[tuple[str, str]], payload: bytes) -> bytes:
    """One message of AWS's event stream encoding: the prelude (total length, headers length,
    both 4 bytes big-endian, and their CRC32), the headers, the payload, and the CRC32 of all
    that came before."""
    encoded = b"".join(_header(name, value) for name, value in headers)
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event_frame(event_type: str, payload: dict[str, Any]) -> bytes:
    """A ConverseStream event. Bedrock pads each payload with a `p` member of varying length
    (so that sizes do not tell the text); clients ignore it."""
    padding = _PADDING[: 1 + len(orjson.dumps(payload)) % len(_PADDING)]
    return frame(
        ((":event-type", event_type), (":content-type", "application/json"),
         (":message-type", "event")),
        orjson.dumps({**payload, "p": padding}),
    )  # fmt: skip


def exception_frame(exception_type: str, message: str) -> bytes:
    """A ConverseStream exception (its member name, e.g. `throttlingException`)."""
    payload: dict[str, Any] = {"message": message}
    if exception_type == "modelStreamErrorException":
        payload |= {"originalStatusCode": 500, "originalMessage": message}
    return frame(
        ((":exception-type", exception_type), (":content-type", "application/json"),
         (":message-type", "exception")),
        orjson.dumps(payload),
    )  # fmt: skip


class _SplitResponse(web.StreamResponse):
    """A stream response whose writes go out cut into pieces (`split` bytes each, or random
    sizes from 1 to 64 when `split` is 0), as a network may cut them."""

    def __init__(self, split: int, headers: Mapping[str, str]) -> None:
        super().__init__(headers=headers)
        self._split = split
        self._random = random.Random(split)

    async def write(self, data: Any) -> None:
        data = bytes(data)
        i = 0
        while i < len(data):
            n = self._split or self._random.randint(1, 64)
            await super().write(data[i : i + n])
            i += n


# -- the answer ---------------------------------------------------------------------------------


class PromptCache:
    """The prompt prefixes (up to a cache point) the fake has seen: the first request with one
    writes it to the cache, the next ones read it."""

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self.seen: OrderedDict[bytes, None] = OrderedDict()

    def hit(self, prefix: bytes) -> bool:
        key = hashlib.sha256(prefix).digest()
        if key in self.seen:
            self.seen.move_to_end(key)
            return True
        self.seen[key] = None
        if len(self.seen) > self.limit:
            self.seen.popitem(last=False)
        return False


def _usage(body: dict[str, Any], output: int, cache: PromptCache) -> dict[str, int]:
    """Input counted from the request's bytes (4 a token), in Bedrock's order of caching (tools,
    system, messages); what comes before the last cache point is read from the cache or
    written to it, and then reported apart, as Bedrock does."""
    items: list[Any] = [*((body.get("toolConfig") or {}).get("tools") or ())]
    items += body.get("system") or ()
    for message in body["messages"]:
        items += message["content"]
    points = [k for k, item in enumerate(items) if "cachePoint" in item]
    total = sum(len(orjson.dumps(item)) for item in items if "cachePoint" not in item)
    if not points:
        prompt = estimate_tokens(total)
        return {"inputTokens": prompt, "outputTokens": output, "totalTokens": prompt + output}
    prefix = orjson.dumps([item for item in items[: points[-1]] if "cachePoint" not in item])
    cached = estimate_tokens(len(prefix))
    rest = estimate_tokens(max(0, total - len(prefix)))
    read = cache.hit(prefix)
    return {
        "inputTokens": rest,
        "outputTokens": output,
        "totalTokens": rest + cached + output,
        "cacheReadInputTokens": cached if read else 0,
        "cacheWriteInputTokens": 0 if read else cached,
    }


def _forced_tool(body: dict[str, Any]) -> str | None:
    """The tool the request makes the model call (toolChoice any or tool), if any."""
    config = body.get("toolConfig") or {}
    choice = config.get("toolChoice") or {}
    if "tool" in choice:
        return str(choice["tool"]["name"])
    if "any" in choice:
        specs = [t["toolSpec"] for t in config["tools"] if "toolSpec" in t]
        return str(specs[0]["name"]) if specs else None
    return None


def _thinks(body: dict[str, Any]) -> bool:
    """Extended thinking asked for (Claude's `thinking` in additionalModelRequestFields)."""
    fields = body.get("additionalModelRequestFields") or {}
    thinking = fields.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") == "enabled"


REASONING = "The fake considers the request."
_TOOL_INPUT = ('{"fake": ', '"input"}')


def _stream_exception(headers: Mapping[str, str]) -> tuple[str, int] | None:
    raw = headers.get("x-fake-stream-exception")
    if raw is None:
        return None
    kind, _, after = raw.strip().partition(":")
    if kind not in _STREAM_EXCEPTIONS or (after and not after.isdigit()):
        raise RequestError(
            f"invalid x-fake-stream-exception header {raw!r}: expected TYPE[:N], TYPE one of "
            f"{sorted(_STREAM_EXCEPTIONS)}"
        )
    return kind, int(after or 2)


def _split(headers: Mapping[str, str]) -> int | None:
    raw = headers.get("x-fake-split")
    if raw is None:
        return None
    if raw.strip() == "random":
        return 0
    if not raw.strip().isdigit() or int(raw) < 1:
        raise RequestError(f"invalid x-fake-split header {raw!r}: expected N >= 1 or random")
    return int(raw)


async def converse(
    request: web.Request, body: Any, settings: FakeLLMSettings, cache: PromptCache
) -> web.StreamResponse:
    """Converse or ConverseStream (by the path), authenticated, checked, faulted, answered."""
    match = _PATH.match(request.raw_path.partition("?")[0])
    if match is None or not unquote(match["model"]):
        return error_response(BedrockError("The model id is missing", "ValidationException"))
    model_id = unquote(match["model"])
    stream = match["operation"] == "converse-stream"
    try:
        check_auth(request, await request.read(), settings)
        ctx = request_settings(settings, request.headers)
        split = _split(request.headers)
        failure = _stream_exception(request.headers)
        check_request(body)
    except BedrockError as err:
        return error_response(err)
    except RequestError as exc:
        return error_response(BedrockError(exc.message))
    if len(model_id) > 2048:
        return error_response(BedrockError("modelId: must be at most 2048 characters"))
    early = await _fault_before(request, ctx, settings.stall_seconds)
    if early is not None:
        return early
    started = time.monotonic()
    wanted = ctx.tokens
    limit = (body.get("inferenceConfig") or {}).get("maxTokens") or wanted
    count = min(wanted, limit)
    stop = "max_tokens" if count < wanted else "end_turn"
    tool = _forced_tool(body)
    if tool is not None:
        stop, count = "tool_use", 1
    thinks = _thinks(body)
    if not stream:
        await pause(request, ctx.ttft)
        await non_stream_fault(request, ctx.fault, settings.stall_seconds)
        blocks: list[dict[str, Any]] = []
        if thinks:
            blocks.append(
                {
                    "reasoningContent": {
                        "reasoningText": {"text": REASONING, "signature": "fake-signature"}
                    }
                }
            )
        if tool is not None:
            blocks.append(
                {
                    "toolUse": {
                        "toolUseId": _tool_use_id(),
                        "name": tool,
                        "input": orjson.loads("".join(_TOOL_INPUT)),
                    }
                }
            )
        else:
            blocks.append({"text": ctx.text or content(count)})
        answer = {
            "output": {"message": {"role": "assistant", "content": blocks}},
            "stopReason": stop,
            "usage": _usage(body, count, cache),
            "metrics": {"latencyMs": int((time.monotonic() - started) * 1000)},
        }
        return web.Response(
            body=orjson.dumps(answer),
            content_type="application/json",
            headers={"x-amzn-requestid": str(uuid.uuid4())},
        )
    frames = _stream_frames(ctx, body, count, stop, tool, thinks, cache, started)
    return await _stream(request, ctx, settings.stall_seconds, frames, split, failure)


def _tool_use_id() -> str:
    return f"tooluse_{uuid.uuid4().hex[:22]}"


def _delta(index: int, delta: dict[str, Any]) -> bytes:
    return event_frame("contentBlockDelta", {"contentBlockIndex": index, "delta": delta})


def _stream_frames(
    ctx: RequestSettings,
    body: dict[str, Any],
    count: int,
    stop: str,
    tool: str | None,
    thinks: bool,
    cache: PromptCache,
    started: float,
) -> list[tuple[bytes, bool]]:
    """The stream's frames, each with whether it is a token (paced at tokens_per_second)."""
    frames = [(event_frame("messageStart", {"role": "assistant"}), False)]
    index = 0
    if thinks:
        for delta in ({"text": REASONING}, {"signature": "fake-signature"}):
            frames.append((_delta(index, {"reasoningContent": delta}), False))
        frames.append((event_frame("contentBlockStop", {"contentBlockIndex": index}), False))
        index += 1
    if tool is None:
        if ctx.text is not None:
            pieces = text_pieces(ctx.text, ctx.chunk_chars)
        else:
            pieces = word_pieces(count)
        for piece in pieces or [""]:
            frames.append((_delta(index, {"text": piece}), True))
    else:
        # A forced tool choice: the model answers with the call alone, its input in pieces.
        start = {"toolUse": {"toolUseId": _tool_use_id(), "name": tool}}
        frames.append(
            (event_frame("contentBlockStart", {"contentBlockIndex": index, "start": start}), False)
        )
        for piece in _TOOL_INPUT:
            frames.append((_delta(index, {"toolUse": {"input": piece}}), True))
    frames.append((event_frame("contentBlockStop", {"contentBlockIndex": index}), False))
    frames.append((event_frame("messageStop", {"stopReason": stop}), False))
    if not ctx.no_usage:
        metadata = {
            "usage": _usage(body, count, cache),
            "metrics": {"latencyMs": int((time.monotonic() - started) * 1000)},
        }
        frames.append((event_frame("metadata", metadata), False))
    return frames


async def _stream(
    request: web.Request,
    ctx: RequestSettings,
    stall_seconds: float,
    frames: list[tuple[bytes, bool]],
    split: int | None,
    failure: tuple[str, int] | None,
) -> web.StreamResponse:
    first_at = asyncio.get_running_loop().time() + ctx.ttft
    if ctx.ttft > 0:
        await sleep_until(request, first_at)
    headers = {"Content-Type": STREAM_CONTENT_TYPE, "x-amzn-requestid": str(uuid.uuid4())}
    response = (
        web.StreamResponse(headers=headers) if split is None else _SplitResponse(split, headers)
    )
    await response.prepare(request)
    out = EventWriter(request, response, ctx.fault, stall_seconds)
    if failure is not None:
        kind, after = failure
        failed = exception_frame(kind, f"{kind} (injected by fake-llm)")
        frames = [*frames[:after], (failed, False)]
    tokens = 0
    for i, (data, is_token) in enumerate(frames):
        if is_token:
            if ctx.tokens_per_second > 0 and tokens:
                await sleep_until(request, first_at + out.stalled + tokens / ctx.tokens_per_second)
            tokens += 1
        await out.send(data, last=i == len(frames) - 1)
    await response.write_eof()
    return response


async def _fault_before(
    request: web.Request, ctx: RequestSettings, stall_seconds: float
) -> web.Response | None:
    fault = ctx.fault
    if fault is None or fault.after is not None:
        return None
    if fault.kind == "429":
        err = BedrockError(
            "Too many requests, please wait before trying again. (injected by fake-llm)",
            "ThrottlingException",
            429,
        )
        return error_response(err, {"retry-after": "1"})
    if fault.kind == "500":
        return error_response(
            BedrockError(
                "Internal server error (injected by fake-llm)", "InternalServerException", 500
            )
        )
    if fault.kind == "503":
        return error_response(
            BedrockError(
                "Service unavailable (injected by fake-llm)", "ServiceUnavailableException", 503
            )
        )
    if fault.kind == "reset":
        reset_connection(request)
    await pause(request, stall_seconds)
    return None


# -- InvokeModel: the embedding models ----------------------------------------------------------

_INVOKE_PATH = re.compile(r"^/model/(?P<model>[^/]+)/invoke$")
INPUT_TOKENS_HEADER = "X-Amzn-Bedrock-Input-Token-Count"
# Base model id -> (request format, vector size).
EMBEDDING_MODELS = {
    "amazon.titan-embed-text-v2": ("titan-v2", 1024),
    "amazon.titan-embed-text-v1": ("titan-v1", 1536),
    "amazon.titan-embed-g1-text-02": ("titan-v1", 1536),
    "cohere.embed-english-v3": ("cohere-v3", 1024),
    "cohere.embed-multilingual-v3": ("cohere-v3", 1024),
    "cohere.embed-v4": ("cohere-v4", 1536),
}
_EMBEDDING_ID = re.compile(
    r"^(?:(?:us|eu|apac|global|us-gov|ca|jp|au)\.)?(?P<base>"
    + "|".join(re.escape(m) for m in EMBEDDING_MODELS)
    + r")(?::[\w.:-]*)?$"
)
_TITAN_V2_SIZES = (256, 512, 1024)
_COHERE_V4_SIZES = (256, 512, 1024, 1536)
_COHERE_TYPES = ("float", "int8", "uint8", "binary", "ubinary")
_INPUT_TYPES = ("search_document", "search_query", "classification", "clustering")
_COHERE_MAX_TEXTS = 96
_COHERE_V3_MAX_CHARACTERS = 2048
_TITAN_MAX_CHARACTERS = 50_000
_TITAN_MAX_TOKENS = 8192


def _malformed(detail: str) -> BedrockError:
    return BedrockError(
        f"Malformed input request: {detail}, please reformat your input and try again."
    )


def embedding_model(model_id: str) -> tuple[str, int]:
    """(format, vector size) of the embedding model a model id, inference profile id or ARN
    names; raises Bedrock's 400 for any other."""
    if model_id.startswith("arn:"):
        kind, _, model_id = model_id.split(":", 5)[-1].partition("/")
        if kind not in ("foundation-model", "inference-profile"):
            model_id = ""
    match = _EMBEDDING_ID.match(model_id)
    if match is None:
        raise BedrockError("The provided model identifier is invalid.")
    return EMBEDDING_MODELS[match["base"]]


def _keys(body: dict[str, Any], required: Iterable[str], optional: Iterable[str]) -> None:
    for key in required:
        if key not in body:
            raise _malformed(f"#: required key [{key}] not found")
    allowed = set(required) | set(optional)
    for key in body:
        if key not in allowed:
            raise _malformed(f"#: extraneous key [{key}] is not permitted")


def _enum(value: Any, where: str, allowed: Iterable[Any]) -> None:
    if value is not None and (isinstance(value, bool) or value not in tuple(allowed)):
        raise _malformed(f"#/{where}: {orjson.dumps(value).decode()} is not a valid enum value")


def _types(value: Any, where: str, allowed: tuple[str, ...]) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or len(set(map(str, value))) != len(value):
        raise _malformed(f"#/{where}: expected a non-empty array of unique values")
    for k, item in enumerate(value):
        _enum(item, f"{where}/{k}", allowed)
    return list(value)


def _quantized(values: tuple[float, ...], kind: str) -> list[int] | list[float]:
    """A vector in one of Cohere's embedding types (binary ones: 8 dimensions a byte)."""
    if kind == "float":
        return list(values)
    if kind in ("int8", "uint8"):
        signed = [max(-128, min(127, round(v * 127))) for v in values]
        return signed if kind == "int8" else [v + 128 for v in signed]
    bits = [1 if v > 0 else 0 for v in values]
    packed = [
        int("".join(map(str, bits[i : i + 8])).ljust(8, "0"), 2) for i in range(0, len(bits), 8)
    ]
    return packed if kind == "ubinary" else [b - 256 if b > 127 else b for b in packed]


def _titan(kind: str, body: dict[str, Any], size: int) -> tuple[dict[str, Any], int]:
    if kind == "titan-v1":
        _keys(body, ("inputText",), ())
    else:
        _keys(body, ("inputText",), ("dimensions", "normalize", "embeddingTypes"))
    text = body["inputText"]
    if not isinstance(text, str):
        raise _malformed("#/inputText: expected type: String")
    if not text or len(text) > _TITAN_MAX_CHARACTERS:
        raise _malformed(
            f"#/inputText: expected a length from 1 to {_TITAN_MAX_CHARACTERS}, got {len(text)}"
        )
    tokens = estimate_tokens(len(text.encode()))
    if tokens > _TITAN_MAX_TOKENS:
        raise BedrockError(
            f"400 Bad Request: Too many input tokens. Max input tokens: "
            f"{_TITAN_MAX_TOKENS}, request input token count: {tokens}"
        )
    _enum(body.get("dimensions"), "dimensions", _TITAN_V2_SIZES)
    normalize = body.get("normalize")
    if normalize is not None and not isinstance(normalize, bool):
        raise _malformed("#/normalize: expected type: Boolean")
    types = _types(body.get("embeddingTypes"), "embeddingTypes", ("float", "binary")) or ["float"]
    floats = embedding(b"s" + text.encode(), body.get("dimensions") or size)[0]
    answer: dict[str, Any] = {"embedding": list(floats), "inputTextTokenCount": tokens}
    if kind == "titan-v2":
        # Titan's binary type: one 0 or 1 a dimension.
        by_type = {"float": list(floats), "binary": [1 if v > 0 else 0 for v in floats]}
        answer["embeddingsByType"] = {t: by_type[t] for t in types}
    return answer, tokens


def _cohere(kind: str, body: dict[str, Any], size: int) -> tuple[dict[str, Any], int]:
    v4 = kind == "cohere-v4"
    optional = ["texts", "images", "truncate", "embedding_types"]
    if v4:
        optional += ["inputs", "output_dimension", "max_tokens"]
    _keys(body, ("input_type",), optional)
    _enum(body["input_type"], "input_type", _INPUT_TYPES if v4 else (*_INPUT_TYPES, "image"))
    truncations = ("NONE", "LEFT", "RIGHT") if v4 else ("NONE", "START", "END")
    _enum(body.get("truncate"), "truncate", truncations)
    given = [name for name in ("texts", "images", "inputs") if name in body]
    if len(given) != 1:
        names = "texts, images, inputs" if v4 else "texts, images"
        raise _malformed(f"#: exactly one of {names} must be given")
    if given != ["texts"]:
        raise BedrockError("fake-llm embeds texts only")
    texts = body["texts"]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise _malformed("#/texts: expected type: JSONArray of String")
    if len(texts) > _COHERE_MAX_TEXTS:
        raise _malformed(
            f"#/texts: expected maximum item count: {_COHERE_MAX_TEXTS}, found: {len(texts)}"
        )
    for k, text in enumerate(texts):
        if not v4 and len(text) > _COHERE_V3_MAX_CHARACTERS:
            raise _malformed(
                f"#/texts/{k}: expected maxLength: {_COHERE_V3_MAX_CHARACTERS}, actual: {len(text)}"
            )
    if v4:
        _enum(body.get("output_dimension"), "output_dimension", _COHERE_V4_SIZES)
        cap = body.get("max_tokens")
        if cap is not None and (not is_int(cap) or cap < 1):
            raise _malformed("#/max_tokens: expected a positive integer")
        size = body.get("output_dimension") or size
    types = _types(body.get("embedding_types"), "embedding_types", _COHERE_TYPES)
    vectors = [embedding(b"s" + t.encode(), size)[0] for t in texts]
    answer: dict[str, Any] = {"id": str(uuid.uuid4()), "texts": texts}
    if types is None and not v4:
        answer |= {"embeddings": [list(v) for v in vectors], "response_type": "embeddings_floats"}
    else:
        by_type = {t: [_quantized(v, t) for v in vectors] for t in types or ["float"]}
        answer |= {"embeddings": by_type, "response_type": "embeddings_by_type"}
    return answer, sum(estimate_tokens(len(t.encode())) for t in texts)


async def invoke(request: web.Request, body: Any, settings: FakeLLMSettings) -> web.StreamResponse:
    """InvokeModel for an embedding model: authenticated, checked, faulted, answered."""
    match = _INVOKE_PATH.match(request.raw_path.partition("?")[0])
    if match is None or not unquote(match["model"]):
        return error_response(BedrockError("The model id is missing", "ValidationException"))
    model_id = unquote(match["model"])
    started = time.monotonic()
    try:
        check_auth(request, await request.read(), settings)
        ctx = request_settings(settings, request.headers)
        if len(model_id) > 2048:
            raise BedrockError("modelId: must be at most 2048 characters")
        kind, size = embedding_model(model_id)
        if body is MALFORMED or not isinstance(body, dict):
            raise _malformed("#: expected type: JSONObject")
        answer, tokens = (_titan if kind.startswith("titan") else _cohere)(kind, body, size)
    except BedrockError as err:
        return error_response(err)
    except RequestError as exc:
        return error_response(BedrockError(exc.message))
    early = await _fault_before(request, ctx, settings.stall_seconds)
    if early is not None:
        return early
    await pause(request, ctx.ttft)
    await non_stream_fault(request, ctx.fault, settings.stall_seconds)
    return web.Response(
        body=orjson.dumps(answer),
        content_type="application/json",
        headers={
            "x-amzn-requestid": str(uuid.uuid4()),
            INPUT_TOKENS_HEADER: str(tokens),
            "X-Amzn-Bedrock-Invocation-Latency": str(int((time.monotonic() - started) * 1000)),
        },
    )
