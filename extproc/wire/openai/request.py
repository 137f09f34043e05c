"""OpenAI requests: the endpoints, body validation, where the text is, the prompt's count."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard
from urllib.parse import unquote

import orjson

from ...errors import GatewayError, bad_request
from ...guard.texts import Slot
from ..base import TOKENLESS, Endpoint, Operation, ParsedRequest, json_object
from . import form, objects

if TYPE_CHECKING:
    from ...tokens import TokenCount, TokenCounter

CHAT = Endpoint(Operation.CHAT, "/v1/chat/completions")
COMPLETIONS = Endpoint(Operation.COMPLETION, "/v1/completions")
EMBEDDINGS = Endpoint(Operation.EMBEDDING, "/v1/embeddings")
MODELS = Endpoint(Operation.LIST_MODELS, "/v1/models")
MODEL = Endpoint(Operation.GET_MODEL, "/v1/models/{model}")
# Passed to the model's backend as they are (Operation's TOKENLESS).
IMAGES = Endpoint(Operation.IMAGE, "/v1/images/generations")
SPEECH = Endpoint(Operation.SPEECH, "/v1/audio/speech")
TRANSCRIPTIONS = Endpoint(Operation.TRANSCRIPTION, "/v1/audio/transcriptions", form=True)
TRANSLATIONS = Endpoint(Operation.TRANSCRIPTION, "/v1/audio/translations", form=True)
MODERATIONS = Endpoint(Operation.MODERATION, "/v1/moderations")
RERANK = Endpoint(Operation.RERANK, "/v1/rerank")
# The model OpenAI's moderations endpoint uses when a request names none.
DEFAULT_MODERATION_MODEL = "omni-moderation-latest"
# Each passed-through JSON endpoint's text fields: what guards judge and the prompt's count.
_TEXT_FIELDS = {IMAGES: ("prompt",), SPEECH: ("input",), MODERATIONS: ("input",)}

_POST = {
    e.path: e
    for e in (
        CHAT, COMPLETIONS, EMBEDDINGS, IMAGES, SPEECH, TRANSCRIPTIONS, TRANSLATIONS,
        MODERATIONS, RERANK,
    )
}  # fmt: skip
_MODEL_PREFIX = "/v1/models/"


def owns(path: str) -> bool:
    """Every path but another API's is OpenAI's: its 404 `unknown_url` is the gateway's."""
    return True


def route(method: str, path: str) -> tuple[Endpoint, str | None] | None:
    """The endpoint of a request line (and the id of a model, file or batch it names); raises
    405 the way OpenAI words it."""
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
    return objects.route(method, path)


def _method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(
        405,
        f"Method {method} is not allowed for {path}",
        "invalid_request_error",
        "method_not_allowed",
        headers=(("allow", "GET" if path.startswith(MODELS.path) else "POST"),),
    )


def parse(endpoint: Endpoint, raw: bytes) -> ParsedRequest:
    if endpoint.form:
        return _parse_form(endpoint, raw)
    body = json_object(raw)
    if endpoint is MODERATIONS and body.get("model") is None:
        body["model"] = DEFAULT_MODERATION_MODEL
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter", "missing_model", "model")
    if endpoint.operation in TOKENLESS:
        return _parse_passed(endpoint, body, model)
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


def _parse_passed(endpoint: Endpoint, body: dict[str, Any], model: str) -> ParsedRequest:
    """A JSON body passed to the backend as it is: its text fields checked as far as guards and
    the count read them; the rest is the backend's to judge."""
    for field in _TEXT_FIELDS.get(endpoint, ()):
        value = body.get(field)
        if endpoint is MODERATIONS:
            if not (isinstance(value, str) or isinstance(value, list)):
                raise bad_request(f"'{field}' must be a string or an array", "invalid_value",
                                  field)  # fmt: skip
        elif not isinstance(value, str) or not value:
            raise bad_request(f"'{field}' must be a non-empty string", "invalid_value", field)
    if endpoint is RERANK:
        if not isinstance(body.get("query"), str):
            raise bad_request("'query' must be a string", "invalid_value", "query")
        documents = body.get("documents")
        if not isinstance(documents, list) or not documents:
            raise bad_request("'documents' must be a non-empty array", "invalid_value",
                              "documents")  # fmt: skip
    # (Speech, images and the rest may stream their own events; the answer's content type says.)
    return ParsedRequest(endpoint, body, model, False, False, 0)


def _parse_form(endpoint: Endpoint, raw: bytes) -> ParsedRequest:
    fields = form.fields(raw)
    model = fields.get("model")
    if not model:
        raise bad_request("you must provide a model parameter", "missing_model", "model")
    if not form.has_file(raw, "file"):
        raise bad_request("you must provide a file", "missing_file", "file")
    return ParsedRequest(endpoint, dict(fields), model, False, False, 0, form=raw)


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
    if parsed.endpoint is EMBEDDINGS:
        return await tokens.count_embedding_input_async(
            model, body["input"], team=team, budget=budget
        )
    # A passed-through request: its texts, as a guard reads them (an audio file: nothing).
    texts = [slot.get() for slot in request_slots(parsed.endpoint, body)]
    return await tokens.count_prompt_async(model, texts or "", team=team, budget=budget)


def span_attributes(body: dict[str, Any]) -> dict[str, Any]:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    # As the client wrote it, when it is a number: the span shows the request, not our reading.
    max_tokens = value if isinstance(value, int) and not isinstance(value, bool) else None
    return {"gen_ai.request.max_tokens": max_tokens}


def request_slots(endpoint: Endpoint, body: dict[str, Any]) -> list[Slot]:
    if endpoint is CHAT:
        return _message_slots(body.get("messages"))
    if endpoint is RERANK:
        documents = body.get("documents")
        documents = documents if isinstance(documents, list) else []
        slots = [Slot(body, "query")] if isinstance(body.get("query"), str) else []
        for i, doc in enumerate(documents):
            if isinstance(doc, str):
                slots.append(Slot(documents, i))
            elif isinstance(doc, dict) and isinstance(doc.get("text"), str):
                slots.append(Slot(doc, "text"))
        return slots
    if endpoint.form:
        # (A transcription's prompt guides the model's spelling; the audio is not read.)
        return [Slot(body, "prompt")] if isinstance(body.get("prompt"), str) else []
    if endpoint.operation in TOKENLESS:
        return [s for f in _TEXT_FIELDS.get(endpoint, ()) for s in _string_or_list(body, f)]
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
