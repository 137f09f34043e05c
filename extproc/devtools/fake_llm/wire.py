"""The OpenAI wire format as the fake speaks it.

Request checks that fail with OpenAI-style error bodies, the deterministic content it answers
with (``tok0 tok1 ...`` completions, embeddings derived from a hash of the input), and JSON and
SSE encoding.
"""

from __future__ import annotations

import base64
import hashlib
import math
import sys
from array import array
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import orjson
from aiohttp import web

DEFAULT_MODEL = "fake-model"
SYSTEM_FINGERPRINT = "fp_fakellm"
MAX_EMBEDDING_DIMENSIONS = 65536

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"
# A JSON string that cannot come from token text, used to splice tokens into pre-encoded chunks.
SLOT = "\x00fake-llm-slot\x00"
_SLOT_JSON = orjson.dumps(SLOT)


class RequestError(Exception):
    """A client error rendered as an OpenAI-style error body."""

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


def missing_parameter(param: str) -> RequestError:
    """OpenAI's 400 for a required parameter left out."""
    return RequestError(
        f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


def is_int(value: Any) -> bool:
    # bool is an int subclass, but JSON true is not a token id or a count.
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------- requests

MALFORMED = object()


def parse_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return MALFORMED


def require_object(body: Any) -> dict[str, Any]:
    if body is MALFORMED or body is None:
        raise RequestError(
            "We could not parse the JSON body of your request. The request body must be a "
            "JSON object.",
            code="invalid_json",
        )
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", code="invalid_json")
    return body


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        # OpenAI reports a missing model with param null, unlike other missing parameters.
        raise RequestError("you must provide a model parameter", code="missing_model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' must be a non-empty string", param="model", code="invalid_type")
    return model


def stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream", code="invalid_type")
    options = body.get("stream_options")
    include_usage = False
    if stream and options is not None:
        if not isinstance(options, dict):
            raise RequestError(
                "'stream_options' must be an object", param="stream_options", code="invalid_type"
            )
        include_usage = options.get("include_usage") is True
    return stream, include_usage


def completion_length(body: dict[str, Any], names: Sequence[str], wanted: int) -> tuple[int, str]:
    """Tokens to produce and the finish_reason: a request cap below ``wanted`` means "length"."""
    for name in names:
        cap = body.get(name)
        if cap is None:
            continue
        if not is_int(cap) or cap < 1:
            raise RequestError(
                f"Invalid '{name}': expected an integer >= 1, got {cap!r}",
                param=name,
                code="integer_below_min_value" if is_int(cap) else "invalid_type",
            )
        if cap < wanted:
            return cap, "length"
        break
    return wanted, "stop"


def estimate_tokens(utf8_bytes: int) -> int:
    # The usual ~4 bytes per token rule: deterministic and tokenizer-free.
    return max(1, (utf8_bytes + 3) // 4)


def chat_prompt_bytes(messages: list[Any]) -> int:
    total = 0
    for message in messages:
        if not isinstance(message, dict):
            raise RequestError("each message must be an object", param="messages")
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.encode())
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(text := part.get("text"), str):
                    total += len(text.encode())
    return total


def parse_inputs(value: Any, param: str) -> list[tuple[int, bytes]]:
    """Token estimate and a stable identity for each prompt/input of the legacy shapes."""
    if isinstance(value, str):
        return [(estimate_tokens(len(b := value.encode())), b"s" + b)]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return [(estimate_tokens(len(b := item.encode())), b"s" + b) for item in value]
        if all(is_int(item) for item in value):
            return [(len(value), b"t" + ",".join(map(str, value)).encode())]
        if all(isinstance(item, list) and item and all(is_int(t) for t in item) for item in value):
            return [(len(item), b"t" + ",".join(map(str, item)).encode()) for item in value]
    raise RequestError(
        f"'{param}' must be a string, an array of strings, an array of token ids or an array "
        "of token id arrays",
        param=param,
        code="invalid_type",
    )


# --------------------------------------------------------------------------- content


class _Vocabulary:
    """Token words and their JSON encodings, built once and shared by all requests."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.encoded: list[bytes] = []

    def ensure(self, count: int) -> None:
        for i in range(len(self.words), count):
            word = f" tok{i}"
            self.words.append(word)
            self.encoded.append(orjson.dumps(word))


VOCAB = _Vocabulary()


@lru_cache(maxsize=64)
def content(count: int) -> str:
    VOCAB.ensure(count)
    return "".join(VOCAB.words[:count])


def word_pieces(count: int) -> list[str]:
    """content(count) as a stream's pieces: a word each, with the space after it."""
    words = content(count).split(" ")
    return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]


def text_pieces(text: str, chunk_chars: int) -> list[str]:
    """A text asked for (x-fake-response-text) as a stream's pieces of `chunk_chars`
    characters (x-fake-chunk-chars); one empty piece for an empty text."""
    return [text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)] or [""]


@lru_cache(maxsize=4096)
def embedding(identity: bytes, dimensions: int) -> tuple[tuple[float, ...], str]:
    """A unit vector derived from the input's hash, as floats and as base64 float32.

    The float form is the float32 values widened back to double, so a client decoding the
    base64 form gets bit-identical numbers.
    """
    raw = array("H", hashlib.shake_256(identity).digest(2 * dimensions))
    if sys.byteorder == "big":
        raw.byteswap()
    values = [x / 32767.5 - 1.0 for x in raw]
    norm = math.sqrt(math.fsum(v * v for v in values)) or 1.0
    packed = array("f", [v / norm for v in values])
    floats = tuple(packed.tolist())
    if sys.byteorder == "big":
        packed.byteswap()  # the SDK decodes little-endian float32
    return floats, base64.b64encode(packed.tobytes()).decode("ascii")


# --------------------------------------------------------------------------- responses


def json_response(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, content_type="application/json", headers=headers
    )


def error_response(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return json_response(body, status=status, headers=headers)


def chat_usage(prompt: int, completion: int, reasoning: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": min(reasoning, completion),
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def sse_template(payload: Any) -> tuple[bytes, bytes]:
    """Split a chunk holding ``SLOT`` into a prefix/suffix to splice encoded tokens between.

    Encoding each token chunk from scratch is the dominant per-chunk cost; splicing keeps it to
    two concatenations. rpartition because the slot is in the last string field, after the
    client-controlled model name.
    """
    head, _, tail = orjson.dumps(payload).rpartition(_SLOT_JSON)
    return b"data: " + head, tail + b"\n\n"
