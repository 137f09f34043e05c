"""What a client asked for: the endpoint from the request line, the body's fields, validated."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import unquote

import orjson

from .errors import GatewayError, bad_request


class Endpoint(Enum):
    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"
    MODELS = "/v1/models"
    MODEL = "/v1/models/{model}"


# Which config model types may serve which endpoint (vLLM serves /v1/completions on chat models).
ENDPOINT_MODEL_TYPES: dict[Endpoint, frozenset[str]] = {
    Endpoint.CHAT: frozenset({"chat"}),
    Endpoint.COMPLETIONS: frozenset({"chat", "completion"}),
    Endpoint.EMBEDDINGS: frozenset({"embedding"}),
}

_POST = {e.value: e for e in (Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS)}


def route(method: str, raw_path: str) -> tuple[Endpoint, str | None]:
    """Map the request line to an endpoint; raises 404/405 the way OpenAI words them."""
    path = raw_path.split("?", 1)[0]
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    if path in _POST:
        if method != "POST":
            raise _method_not_allowed(method, path)
        return _POST[path], None
    if path == Endpoint.MODELS.value:
        if method != "GET":
            raise _method_not_allowed(method, path)
        return Endpoint.MODELS, None
    if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
        if method != "GET":
            raise _method_not_allowed(method, path)
        # The SDK percent-encodes the id, and model names may hold "/" (meta-llama/...).
        return Endpoint.MODEL, unquote(path[len("/v1/models/") :])
    raise GatewayError(
        404, f"Invalid URL ({method} {path})", "invalid_request_error", "unknown_url"
    )


def _method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(
        405,
        f"Method {method} is not allowed for {path}",
        "invalid_request_error",
        "method_not_allowed",
        headers=(("allow", "GET" if path.startswith("/v1/models") else "POST"),),
    )


def check_content_type(value: str | None) -> None:
    media = (value or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise GatewayError(
            415,
            f"Content-Type must be application/json, got {value or 'none'!r}",
            "invalid_request_error",
            "unsupported_media_type",
        )


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"The request body is larger than this gateway's limit of {limit} bytes",
        "invalid_request_error",
        "request_too_large",
    )


@dataclass(slots=True)
class ParsedRequest:
    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool


def parse_body(endpoint: Endpoint, raw: bytes) -> ParsedRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(
            f"We could not parse the JSON body of your request ({exc.args[0]})", "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object", "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter", "missing_model", "model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "invalid_type", "stream")
    if stream and endpoint is Endpoint.EMBEDDINGS:
        raise bad_request("Embeddings cannot be streamed", "invalid_value", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "invalid_type", "stream_options")
    include_usage = bool(options and options.get("include_usage") is True)

    if endpoint is Endpoint.CHAT:
        _check_messages(body.get("messages"))
    elif endpoint is Endpoint.COMPLETIONS:
        _check_text_or_tokens(body.get("prompt"), "prompt")
    elif endpoint is Endpoint.EMBEDDINGS:
        _check_text_or_tokens(body.get("input"), "input")
    return ParsedRequest(endpoint, body, model, stream, include_usage)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", "invalid_value", "messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise bad_request(
                f"messages[{i}] must be an object with a string 'role'",
                "invalid_value",
                f"messages[{i}]",
            )
        content = msg.get("content")
        if content is not None and not isinstance(content, str | list):
            raise bad_request(
                f"messages[{i}].content must be a string or an array of content parts",
                "invalid_type",
                f"messages[{i}].content",
            )


def _check_text_or_tokens(value: Any, param: str) -> None:
    ok = isinstance(value, str) or (
        isinstance(value, list)
        and value
        and (
            all(isinstance(v, str) for v in value)
            or all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or all(
                isinstance(v, list)
                and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
                for v in value
            )
        )
    )
    if not ok:
        raise bad_request(
            f"'{param}' must be a string, an array of strings, or an array of token arrays",
            "invalid_value",
            param,
        )


def with_usage_requested(body: dict[str, Any]) -> bytes:
    """The body re-encoded with `stream_options.include_usage: true`, other options kept."""
    options = body.get("stream_options") or {}
    return orjson.dumps({**body, "stream_options": {**options, "include_usage": True}})
