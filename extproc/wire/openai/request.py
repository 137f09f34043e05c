"""OpenAI requests: the endpoints, body validation, where the text is, the prompt's count."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard
from urllib.parse import unquote

import orjson

from ...errors import GatewayError, bad_request
from ...guard.texts import Slot
from ..base import Endpoint, Operation, ParsedRequest

if TYPE_CHECKING:
    from ...tokens import TokenCount, TokenCounter

CHAT = Endpoint(Operation.CHAT, "/v1/chat/completions")
COMPLETIONS = Endpoint(Operation.COMPLETION, "/v1/completions")
EMBEDDINGS = Endpoint(Operation.EMBEDDING, "/v1/embeddings")
MODELS = Endpoint(Operation.LIST_MODELS, "/v1/models")
MODEL = Endpoint(Operation.GET_MODEL, "/v1/models/{model}")

_POST = {e.path: e for e in (CHAT, COMPLETIONS, EMBEDDINGS)}
_MODEL_PREFIX = "/v1/models/"


def owns(path: str) -> bool:
    """Every path but another API's is OpenAI's: its 404 `unknown_url` is the gateway's."""
    return True


def route(method: str, path: str) -> tuple[Endpoint, str | None] | None:
    """The endpoint of a request line; raises 405 the way OpenAI words it."""
    if path in _POST:
        if method != "POST":
            raise _method_not_allowed(method, path)
        return _POST[path], None
    if path == MODELS.path:
        if method != "GET":
            raise _method_not_allowed(method, path)
        return MODELS, None
    if path.startswith(_MODEL_PREFIX) and len(path) > len(_MODEL_PREFIX):
        if method != "GET":
            raise _method_not_allowed(method, path)
        # The SDK percent-encodes the id, and model names may hold "/" (meta-llama/...).
        return MODEL, unquote(path[len(_MODEL_PREFIX) :])
    return None


def _method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(
        405,
        f"Method {method} is not allowed for {path}",
        "invalid_request_error",
        "method_not_allowed",
        headers=(("allow", "GET" if path.startswith(MODELS.path) else "POST"),),
    )


def parse(endpoint: Endpoint, raw: bytes) -> ParsedRequest:
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
    if stream and endpoint is EMBEDDINGS:
        raise bad_request("Embeddings cannot be streamed", "invalid_value", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "invalid_type", "stream_options")
    include_usage = bool(options and options.get("include_usage") is True)

    if endpoint is CHAT:
        _check_messages(body.get("messages"))
    elif endpoint is COMPLETIONS:
        _check_text_or_tokens(body.get("prompt"), "prompt")
    elif endpoint is EMBEDDINGS:
        _check_text_or_tokens(body.get("input"), "input")
    n = body.get("n")
    answers = n if _positive_int(n) else 1
    return ParsedRequest(
        endpoint, body, model, stream, include_usage, _output_cap(endpoint, body, answers), answers
    )


def _output_cap(endpoint: Endpoint, body: dict[str, Any], answers: int) -> int | None:
    """max_completion_tokens or max_tokens, per answer; an embedding produces no output."""
    if endpoint is EMBEDDINGS:
        return 0
    value = body.get("max_completion_tokens")
    if not _positive_int(value):
        value = body.get("max_tokens")
    if not _positive_int(value):
        return None
    return value * answers


def _positive_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


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


async def count_prompt(
    tokens: TokenCounter,
    parsed: ParsedRequest,
    *,
    team: str | None,
    budget: float | None,
) -> TokenCount:
    body, model = parsed.body, parsed.model
    if parsed.endpoint is CHAT:
        tools = body.get("tools") if isinstance(body.get("tools"), list) else None
        return await tokens.count_chat_async(
            model, body["messages"], tools, team=team, budget=budget
        )
    if parsed.endpoint is COMPLETIONS:
        return await tokens.count_prompt_async(model, body["prompt"], team=team, budget=budget)
    return await tokens.count_embedding_input_async(model, body["input"], team=team, budget=budget)


def span_attributes(body: dict[str, Any]) -> dict[str, Any]:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    # As the client wrote it, when it is a number: the span shows the request, not our reading.
    max_tokens = value if isinstance(value, int) and not isinstance(value, bool) else None
    return {"gen_ai.request.max_tokens": max_tokens}


def request_slots(endpoint: Endpoint, body: dict[str, Any]) -> list[Slot]:
    if endpoint is CHAT:
        return _message_slots(body.get("messages"))
    key = "prompt" if endpoint is COMPLETIONS else "input"
    return _string_or_list(body, key)


def _message_slots(messages: Any) -> list[Slot]:
    out: list[Slot] = []
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        role = role if role in ("system", "user", "assistant") else "user"
        content = message.get("content")
        if isinstance(content, str):
            out.append(Slot(message, "content", role))
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append(Slot(part, "text", role))
    return out


def _string_or_list(body: dict[str, Any], key: str) -> list[Slot]:
    value = body.get(key)
    if isinstance(value, str):
        return [Slot(body, key)]
    if isinstance(value, list):
        # Lists of token ids carry no text a guard can read.
        return [Slot(value, i) for i, item in enumerate(value) if isinstance(item, str)]
    return []
