"""An OpenAI-compatible fake upstream LLM for end-to-end tests, the quickstart and benchmarks.

The fake answers ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` and
``/v1/models`` with deterministic content in the exact OpenAI wire format (including SSE
streaming), and can inject latency and faults so the gateway's retry, timeout and failover
paths can be exercised without a real model.

Per-request knobs are request headers, so one running instance can serve many test cases:

- ``x-fake-fault``: ``429``, ``500``, ``503``, ``reset``, ``stall``, ``reset-after:N``,
  ``stall-after:N`` or ``none`` (suppresses a fault configured on the instance).
- ``x-fake-ttft-ms``, ``x-fake-tokens-per-second``, ``x-fake-response-tokens``.
- ``x-fake-response-text`` (with ``x-fake-chunk-chars``, default 4): a chat answer with this
  text, streamed that many characters per event.
- ``x-fake-no-usage: 1``: a backend that reports no usage (its streams ignore
  ``stream_options.include_usage``, its JSON answers have no ``usage``).

``reset-after:N``/``stall-after:N`` count SSE events (the role chunk and ``[DONE]`` included);
on non-streaming requests they behave like ``reset``/``stall`` so the fault is never silently
dropped. ``stall`` delays the response by ``stall_seconds`` and then answers normally, like a
very slow upstream would.

Safety models and guards, for testing the gateway's external guards. Directives in the judged
text steer them (case-sensitive, so ordinary text never does): ``[[unsafe]]`` or
``[[unsafe:A,B]]`` (an unsafe verdict, with default or the given categories), ``[[slow:MS]]``
(answer MS milliseconds late), ``[[rewrite:OLD=>NEW]]`` (webhook only).

- A chat or legacy completion whose model name contains ``llama-guard`` answers like Llama
  Guard 3: a blank line, then ``safe``, or ``unsafe`` and a line of categories (the given
  ones, or ``S1``).
- One whose model name contains ``nemoguard`` or ``content-safety`` answers like NemoGuard:
  ``{"User Safety": ..., "Response Safety": ..., "Safety Categories": ...}``, rating the user
  part and the ``response: agent:`` part of the prompt's conversation separately (default
  category ``Violence``).
- ``POST /v1/moderations`` answers like OpenAI's moderation API (default category
  ``violence``).
- ``POST /_fake/guard-webhook`` implements the webhook contract of ``extproc.guard.llm``:
  ``[[unsafe]]`` blocks (reason "fake policy"), ``[[rewrite:OLD=>NEW]]`` rewrites every text
  (replacing OLD with NEW, dropping the directive), anything else is allowed.

Test helpers: ``GET /_fake/requests`` lists the recorded ``/v1/*`` and guard webhook requests
and ``DELETE /_fake/requests`` clears them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import random
import re
import signal
import socket
import struct
import sys
import time
import uuid
from array import array
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NoReturn

import orjson
from aiohttp import web

__all__ = ["FakeLLMSettings", "add_arguments", "create_app", "main_from_args", "serve"]

log = logging.getLogger(__name__)

INSTANCE_HEADER = "x-fake-llm-instance"
DEFAULT_LISTEN = "127.0.0.1:8081"
DEFAULT_MODEL = "fake-model"
SYSTEM_FINGERPRINT = "fp_fakellm"

# Long-context prompts and inline images easily exceed aiohttp's 1 MiB default.
_CLIENT_MAX_SIZE = 64 * 1024 * 1024
# Bounds memory when a benchmark sprays many distinct model names.
_MAX_TRACKED_MODELS = 1024
_MAX_EMBEDDING_DIMENSIONS = 65536
# How often a long wait (ttft, pacing, stall) checks whether the client went away; keeps
# handlers from outliving their connection (and delaying shutdown) even when the runner was
# not created with handler_cancellation.
_DISCONNECT_POLL_SECONDS = 0.25

_SIMPLE_FAULTS = frozenset({"429", "500", "503", "reset", "stall"})
_FAULT_HELP = "429, 500, 503, reset, stall, reset-after:N, stall-after:N or none"

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"
# A JSON string that cannot come from token text, used to splice tokens into pre-encoded chunks.
_SLOT = "\x00fake-llm-slot\x00"
_SLOT_JSON = orjson.dumps(_SLOT)


@dataclass
class FakeLLMSettings:
    """Behaviour of a fake LLM instance; read per request, so tests may mutate it live."""

    ttft_ms: float = 0.0
    tokens_per_second: float = 0.0
    response_tokens: int = 16
    embedding_dimensions: int = 8
    fault: str | None = None
    fault_rate: float = 1.0
    stall_seconds: float = 3600.0
    name: str = "fake-llm"
    record_limit: int = 1000


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True, slots=True)
class _Fault:
    kind: str  # one of _SIMPLE_FAULTS
    after: int | None = None  # SSE events to send before the fault; None = before responding


@lru_cache(maxsize=256)
def _parse_fault(spec: str) -> _Fault | None:
    text = spec.strip().lower()
    if text in ("", "none"):
        return None
    if text in _SIMPLE_FAULTS:
        return _Fault(text)
    kind, sep, count = text.partition(":")
    if sep and kind in ("reset-after", "stall-after"):
        try:
            after = int(count)
        except ValueError:
            after = -1
        if after >= 0:
            return _Fault(kind.removesuffix("-after"), after)
    raise ValueError(f"unknown fault {spec!r}: expected {_FAULT_HELP}")


def _validate_settings(settings: FakeLLMSettings) -> None:
    def non_negative(name: str, value: float) -> None:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    non_negative("ttft_ms", settings.ttft_ms)
    non_negative("tokens_per_second", settings.tokens_per_second)
    non_negative("stall_seconds", settings.stall_seconds)
    non_negative("response_tokens", settings.response_tokens)
    non_negative("record_limit", settings.record_limit)
    if not 1 <= settings.embedding_dimensions <= _MAX_EMBEDDING_DIMENSIONS:
        raise ValueError(
            f"embedding_dimensions must be in 1..{_MAX_EMBEDDING_DIMENSIONS}, "
            f"got {settings.embedding_dimensions!r}"
        )
    if not 0.0 <= settings.fault_rate <= 1.0:
        raise ValueError(f"fault_rate must be in [0, 1], got {settings.fault_rate!r}")
    if settings.fault is not None:
        _parse_fault(settings.fault)


class _RequestError(Exception):
    """A client error rendered as an OpenAI-style error body."""

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


class _Aborted(Exception):
    """The connection was deliberately reset (or vanished); there is no response to send."""


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but JSON true is not a token id or a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _header_number(headers: Mapping[str, str], name: str, default: float) -> float:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise _RequestError(
            f"invalid {name} header {raw!r}: expected a number >= 0", code="invalid_fake_header"
        )
    return value


def _header_int(headers: Mapping[str, str], name: str, default: int) -> int:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise _RequestError(
            f"invalid {name} header {raw!r}: expected an integer >= 0", code="invalid_fake_header"
        )
    return value


# --------------------------------------------------------------------------- content helpers


@dataclass(slots=True)
class _Ctx:
    """Per-request behaviour: the settings with header overrides applied."""

    ttft: float  # seconds
    tokens_per_second: float
    tokens: int
    fault: _Fault | None
    # A backend that reports no usage, streamed or not (x-fake-no-usage: 1).
    no_usage: bool = False
    # A chat answer with this text instead of tok0 tok1 ..., streamed `chunk_chars` characters
    # per event (x-fake-response-text, x-fake-chunk-chars): response guards need real text.
    text: str | None = None
    chunk_chars: int = 4


_MALFORMED = object()

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_Endpoint = Callable[[web.Request, _Ctx, Any], Awaitable[web.StreamResponse]]


def _parse_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _MALFORMED


def _require_object(body: Any) -> dict[str, Any]:
    if body is _MALFORMED or body is None:
        raise _RequestError(
            "We could not parse the JSON body of your request. The request body must be a "
            "JSON object.",
            code="invalid_json",
        )
    if not isinstance(body, dict):
        raise _RequestError("The request body must be a JSON object.", code="invalid_json")
    return body


def _require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        # OpenAI reports a missing model with param null, unlike other missing parameters.
        raise _RequestError("you must provide a model parameter", code="missing_model")
    if not isinstance(model, str) or not model:
        raise _RequestError(
            "'model' must be a non-empty string", param="model", code="invalid_type"
        )
    return model


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _RequestError("'stream' must be a boolean", param="stream", code="invalid_type")
    options = body.get("stream_options")
    include_usage = False
    if stream and options is not None:
        if not isinstance(options, dict):
            raise _RequestError(
                "'stream_options' must be an object", param="stream_options", code="invalid_type"
            )
        include_usage = options.get("include_usage") is True
    return stream, include_usage


def _completion_length(body: dict[str, Any], names: Sequence[str], wanted: int) -> tuple[int, str]:
    """Tokens to produce and the finish_reason: a request cap below ``wanted`` means "length"."""
    for name in names:
        cap = body.get(name)
        if cap is None:
            continue
        if not _is_int(cap) or cap < 1:
            raise _RequestError(
                f"Invalid '{name}': expected an integer >= 1, got {cap!r}",
                param=name,
                code="integer_below_min_value" if _is_int(cap) else "invalid_type",
            )
        if cap < wanted:
            return cap, "length"
        break
    return wanted, "stop"


def _estimate_tokens(utf8_bytes: int) -> int:
    # The usual ~4 bytes per token rule: deterministic and tokenizer-free.
    return max(1, (utf8_bytes + 3) // 4)


def _chat_prompt_bytes(messages: list[Any]) -> int:
    total = 0
    for message in messages:
        if not isinstance(message, dict):
            raise _RequestError("each message must be an object", param="messages")
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.encode())
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(text := part.get("text"), str):
                    total += len(text.encode())
    return total


def _parse_inputs(value: Any, param: str) -> list[tuple[int, bytes]]:
    """Token estimate and a stable identity for each prompt/input of the legacy shapes."""
    if isinstance(value, str):
        return [(_estimate_tokens(len(b := value.encode())), b"s" + b)]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return [(_estimate_tokens(len(b := item.encode())), b"s" + b) for item in value]
        if all(_is_int(item) for item in value):
            return [(len(value), b"t" + ",".join(map(str, value)).encode())]
        if all(isinstance(item, list) and item and all(_is_int(t) for t in item) for item in value):
            return [(len(item), b"t" + ",".join(map(str, item)).encode()) for item in value]
    raise _RequestError(
        f"'{param}' must be a string, an array of strings, an array of token ids or an array "
        "of token id arrays",
        param=param,
        code="invalid_type",
    )


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


_VOCAB = _Vocabulary()


@lru_cache(maxsize=64)
def _content(count: int) -> str:
    _VOCAB.ensure(count)
    return "".join(_VOCAB.words[:count])


@lru_cache(maxsize=4096)
def _embedding(identity: bytes, dimensions: int) -> tuple[tuple[float, ...], str]:
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


def _json_response(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, content_type="application/json", headers=headers
    )


def _error_response(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return _json_response(body, status=status, headers=headers)


def _chat_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _sse_template(payload: Any) -> tuple[bytes, bytes]:
    """Split a chunk holding ``_SLOT`` into a prefix/suffix to splice encoded tokens between.

    Encoding each token chunk from scratch is the dominant per-chunk cost; splicing keeps it to
    two concatenations. rpartition because the slot is in the last string field, after the
    client-controlled model name.
    """
    head, _, tail = orjson.dumps(payload).rpartition(_SLOT_JSON)
    return b"data: " + head, tail + b"\n\n"


# --------------------------------------------------------------------------- safety models

_DIRECTIVE = re.compile(r"\[\[(unsafe|slow|rewrite)(?::(.*?))?\]\]", re.DOTALL)
_REWRITE_DIRECTIVE = re.compile(r"\[\[rewrite:.*?\]\]", re.DOTALL)
_NG_CONVERSATION = re.compile(r"<BEGIN CONVERSATION>(.*?)<END CONVERSATION>", re.DOTALL)
_NG_RESPONSE = "response: agent:"
DEFAULT_MODERATION_MODEL = "omni-moderation-latest"
_MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)


@dataclass(slots=True)
class _Directives:
    unsafe: list[str] | None = None  # None: no [[unsafe]]; empty: the default category
    slow_ms: float = 0.0
    rewrites: list[tuple[str, str]] = field(default_factory=list)

    @property
    def delay(self) -> float:
        return self.slow_ms / 1000.0


def _directives(texts: Iterable[str]) -> _Directives:
    found = _Directives()
    for text in texts:
        if "[[" not in text:
            continue
        for match in _DIRECTIVE.finditer(text):
            kind, arg = match.group(1), match.group(2)
            if kind == "unsafe":
                found.unsafe = found.unsafe or []
                found.unsafe.extend(c.strip() for c in (arg or "").split(",") if c.strip())
            elif kind == "slow":
                try:
                    ms = float(arg or "")
                except ValueError:
                    continue
                if math.isfinite(ms) and ms > found.slow_ms:
                    found.slow_ms = ms
            elif arg and "=>" in arg:
                old, _, new = arg.partition("=>")
                found.rewrites.append((old, new))
    return found


def _categories(given: list[str] | None, default: str) -> list[str]:
    return list(dict.fromkeys(given or [default]))


@lru_cache(maxsize=1024)
def _safety_kind(model: str) -> str | None:
    name = model.lower()
    if "llama-guard" in name:
        return "llama_guard"
    if "nemoguard" in name or "content-safety" in name:
        return "nemoguard"
    return None


def _message_texts(messages: list[Any]) -> list[tuple[str, str]]:
    """(role, text) of every text in already validated chat messages."""
    out: list[tuple[str, str]] = []
    for message in messages:
        role = str(message.get("role"))
        content = message.get("content")
        if isinstance(content, str):
            out.append((role, content))
        elif isinstance(content, list):
            out.extend(
                (role, part["text"])
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return out


def _llama_guard_reply(texts: list[str]) -> tuple[str, float]:
    # The whole prompt is scanned: Llama Guard's own text never holds a directive. The leading
    # blank line is how the served model typically starts (its template ends right at the
    # assistant header), so clients are tested against it.
    found = _directives(texts)
    if found.unsafe is None:
        return "\n\nsafe", found.delay
    return "\n\nunsafe\n" + ",".join(_categories(found.unsafe, "S1")), found.delay


def _nemoguard_reply(pairs: list[tuple[str, str]]) -> tuple[str, float]:
    """Rates the user part and the ``response: agent:`` part of a NemoGuard prompt separately;
    without the prompt's markers, user-side messages against assistant ones."""
    user_texts: list[str] = [text for role, text in pairs if role != "assistant"]
    agent_texts: list[str] | None = [text for role, text in pairs if role == "assistant"] or None
    for _, text in pairs:
        if (match := _NG_CONVERSATION.search(text)) is not None:
            user, marker, answer = match.group(1).partition(_NG_RESPONSE)
            user_texts, agent_texts = [user], ([answer] if marker else None)
            break
    user_found = _directives(user_texts)
    verdict = {"User Safety": "safe" if user_found.unsafe is None else "unsafe"}
    unsafe = [user_found.unsafe]
    if agent_texts is not None:
        agent_found = _directives(agent_texts)
        verdict["Response Safety"] = "safe" if agent_found.unsafe is None else "unsafe"
        unsafe.append(agent_found.unsafe)
    flagged = [c for cats in unsafe if cats is not None for c in cats]
    if any(cats is not None for cats in unsafe):
        verdict["Safety Categories"] = ", ".join(_categories(flagged, "Violence"))
    delay = _directives(text for _, text in pairs).delay
    return json.dumps(verdict), delay


def _verdict(kind: str, pairs: list[tuple[str, str]]) -> tuple[str, float]:
    """A safety model's answer and how long to wait (seconds) before giving it."""
    if kind == "llama_guard":
        return _llama_guard_reply([text for _, text in pairs])
    return _nemoguard_reply(pairs)


def _prompt_text(identity: bytes) -> str:
    # _parse_inputs' identities: b"s" + UTF-8 text, or b"t" + token ids (no text to judge).
    return identity[1:].decode() if identity[:1] == b"s" else ""


def _moderation_result(texts: list[str]) -> dict[str, Any]:
    found = _directives(texts)
    flagged = set() if found.unsafe is None else set(_categories(found.unsafe, "violence"))
    names = list(_MODERATION_CATEGORIES) + sorted(flagged - set(_MODERATION_CATEGORIES))
    return {
        "flagged": bool(flagged),
        "categories": {name: name in flagged for name in names},
        "category_scores": {name: 0.97 if name in flagged else 1e-06 for name in names},
        "category_applied_input_types": {name: ["text"] for name in names},
    }


def _moderation_inputs(value: Any) -> list[list[str]]:
    """The texts of each result: one per string, or one for a whole multi-modal array."""
    if isinstance(value, str):
        return [[value]]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return [[item] for item in value]
        if all(
            isinstance(item, dict) and item.get("type") in ("text", "image_url") for item in value
        ):
            return [[item["text"] for item in value if isinstance(item.get("text"), str)]]
    raise _RequestError(
        "'input' must be a string, an array of strings or an array of multi-modal inputs",
        param="input",
        code="invalid_type",
    )


def _webhook_reply(texts: list[str]) -> dict[str, Any]:
    found = _directives(texts)
    if found.unsafe is not None:
        categories = _categories(found.unsafe, "violence")
        return {"action": "block", "reason": "fake policy", "categories": categories}
    if found.rewrites:
        rewritten = []
        for text in texts:
            text = _REWRITE_DIRECTIVE.sub("", text)
            for old, new in found.rewrites:
                if old:
                    text = text.replace(old, new)
            rewritten.append(text)
        return {"action": "rewrite", "reason": "fake rewrite", "texts": rewritten}
    return {"action": "allow"}


# --------------------------------------------------------------------------- connection faults


def _reset_connection(request: web.BaseRequest) -> NoReturn:
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 makes close() send RST instead of FIN, i.e. a real "connection reset".
            with contextlib.suppress(OSError, AttributeError, NotImplementedError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    raise _Aborted


async def _sleep_until(request: web.BaseRequest, deadline: float) -> None:
    """Sleep until the loop-time deadline; raises _Aborted once the client has gone away."""
    loop = asyncio.get_running_loop()
    while (remaining := deadline - loop.time()) > 0:
        await asyncio.sleep(min(remaining, _DISCONNECT_POLL_SECONDS))
        transport = request.transport
        if transport is None or transport.is_closing():
            raise _Aborted


async def _pause(request: web.BaseRequest, seconds: float) -> None:
    if seconds > 0:
        await _sleep_until(request, asyncio.get_running_loop().time() + seconds)


class _EventWriter:
    """Writes SSE events, injecting a mid-stream fault after the configured event count."""

    __slots__ = ("_fault", "_request", "_response", "_sent", "_stall_seconds", "stalled")

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        fault: _Fault | None,
        stall_seconds: float,
    ) -> None:
        self._request = request
        self._response = response
        self._fault = fault if fault is not None and fault.after is not None else None
        self._stall_seconds = stall_seconds
        self._sent = 0
        self.stalled = 0.0  # seconds spent stalling, so token pacing resumes instead of bursting

    async def send(self, data: bytes, *, last: bool = False) -> None:
        # A fault placed past the end fires before the final event, so "-after:N" is never
        # silently skipped (SDKs stop reading at [DONE] and would not notice a later reset).
        if self._fault is not None and (last or self._sent >= (self._fault.after or 0)):
            await self._trigger()
        await self._response.write(data)
        self._sent += 1

    async def _trigger(self) -> None:
        fault, self._fault = self._fault, None
        assert fault is not None
        if fault.kind == "reset":
            _reset_connection(self._request)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await _pause(self._request, self._stall_seconds)
        self.stalled += loop.time() - started


# --------------------------------------------------------------------------- the application


class _FakeLLM:
    def __init__(self, settings: FakeLLMSettings) -> None:
        self.settings = settings
        self.records: deque[dict[str, Any]] = deque(maxlen=settings.record_limit)
        self.models: OrderedDict[str, None] = OrderedDict()
        self.created = int(time.time())

    # ----- plumbing

    async def stamp_instance(self, _request: web.Request, response: web.StreamResponse) -> None:
        response.headers[INSTANCE_HEADER] = self.settings.name

    def record(self, request: web.Request, body: Any) -> None:
        headers: dict[str, str] = {}
        for key, value in request.headers.items():
            name = key.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.records.append(
            {
                "path": request.path,
                "method": request.method,
                "headers": headers,
                "body": None if body is _MALFORMED else body,
                "instance": self.settings.name,
            }
        )

    def note_model(self, model: str) -> None:
        if model in self.models:
            return
        if len(self.models) >= _MAX_TRACKED_MODELS:
            self.models.popitem(last=False)
        self.models[model] = None

    def context(self, request: web.Request) -> _Ctx:
        settings = self.settings
        headers = request.headers
        override = headers.get("x-fake-fault")
        if override is not None:
            try:
                fault = _parse_fault(override)
            except ValueError as exc:
                raise _RequestError(
                    f"invalid x-fake-fault header: {exc}", code="invalid_fake_header"
                ) from None
        elif settings.fault and (
            settings.fault_rate >= 1.0 or random.random() < settings.fault_rate
        ):
            fault = _parse_fault(settings.fault)
        else:
            fault = None
        return _Ctx(
            ttft=_header_number(headers, "x-fake-ttft-ms", settings.ttft_ms) / 1000.0,
            tokens_per_second=_header_number(
                headers, "x-fake-tokens-per-second", settings.tokens_per_second
            ),
            tokens=_header_int(headers, "x-fake-response-tokens", settings.response_tokens),
            fault=fault,
            no_usage=headers.get("x-fake-no-usage") == "1",
            text=headers.get("x-fake-response-text"),
            chunk_chars=max(1, _header_int(headers, "x-fake-chunk-chars", 4)),
        )

    async def observe(self, request: web.Request) -> Any:
        body = _parse_body(await request.read())
        if self.records.maxlen:
            self.record(request, body)
        if isinstance(body, dict) and isinstance(model := body.get("model"), str) and model:
            self.note_model(model)
        return body

    @web.middleware
    async def record_unrouted(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        # Routed /v1 requests are recorded by their endpoint wrapper; this catches 404/405s.
        if request.match_info.http_exception is not None and request.path.startswith("/v1/"):
            await self.observe(request)
        return await handler(request)

    def v1(self, endpoint: _Endpoint) -> _Handler:
        """Wrap an endpoint with recording, header overrides and fault injection."""

        async def handler(request: web.Request) -> web.StreamResponse:
            body = await self.observe(request)
            try:
                ctx = self.context(request)
                if ctx.fault is not None and ctx.fault.after is None:
                    early = await self.pre_response_fault(request, ctx.fault)
                    if early is not None:
                        return early
                return await endpoint(request, ctx, body)
            except _RequestError as exc:
                return _error_response(exc.status, exc.message, param=exc.param, code=exc.code)
            except (_Aborted, ConnectionError):
                # The socket is gone; aiohttp fails to write this and drops it as a client
                # disconnect, without the error log a raised exception would produce.
                return web.Response()

        return handler

    async def pre_response_fault(self, request: web.Request, fault: _Fault) -> web.Response | None:
        kind = fault.kind
        if kind == "429":
            return _error_response(
                429,
                "Rate limit reached for requests (injected by fake-llm).",
                type_="requests",
                code="rate_limit_exceeded",
                headers={"retry-after": "1"},
            )
        if kind == "500":
            return _error_response(
                500,
                "The server had an error while processing your request (injected by fake-llm).",
                type_="server_error",
            )
        if kind == "503":
            return _error_response(
                503,
                "The server is overloaded or not ready yet (injected by fake-llm).",
                type_="server_error",
            )
        if kind == "reset":
            _reset_connection(request)
        await _pause(request, self.settings.stall_seconds)
        return None

    async def non_stream_fault(self, request: web.Request, ctx: _Ctx) -> None:
        # A mid-stream fault on a non-streaming request degrades to its plain form.
        if ctx.fault is not None and ctx.fault.after is not None:
            await self.pre_response_fault(request, ctx.fault)

    async def wait_generation(self, request: web.Request, ctx: _Ctx, tokens: int) -> None:
        # A non-streaming answer arrives when the whole completion would have been generated,
        # so streaming and non-streaming benchmarks see the same end-to-end latency.
        delay = ctx.ttft
        if ctx.tokens_per_second > 0 and tokens > 1:
            delay += (tokens - 1) / ctx.tokens_per_second
        await _pause(request, delay)

    async def stream(
        self,
        request: web.Request,
        ctx: _Ctx,
        head: Iterable[bytes],
        tokens: int,
        token_events: Callable[[int], Iterable[bytes]],
        tail: Iterable[bytes],
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        first_token_at = loop.time() + ctx.ttft
        if ctx.ttft > 0:
            await _sleep_until(request, first_token_at)
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        out = _EventWriter(request, response, ctx.fault, self.settings.stall_seconds)
        for event in head:
            await out.send(event)
        tps = ctx.tokens_per_second
        for i in range(tokens):
            if tps > 0 and i:
                await _sleep_until(request, first_token_at + out.stalled + i / tps)
            for event in token_events(i):
                await out.send(event)
        for event in tail:
            await out.send(event)
        await out.send(_DONE, last=True)
        await response.write_eof()
        return response

    # ----- endpoints

    async def chat_completions(
        self, request: web.Request, ctx: _Ctx, raw_body: Any
    ) -> web.StreamResponse:
        body = _require_object(raw_body)
        model = _require_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _RequestError(
                "'messages' must be a non-empty array", param="messages", code="invalid_type"
            )
        stream, include_usage = _stream_flags(body)
        include_usage = include_usage and not ctx.no_usage
        count, finish_reason = _completion_length(
            body, ("max_completion_tokens", "max_tokens"), ctx.tokens
        )
        prompt_tokens = _estimate_tokens(_chat_prompt_bytes(messages))
        kind = _safety_kind(model)
        verdict = None if kind is None else _verdict(kind, _message_texts(messages))
        pieces: list[str] | None = None
        if verdict is None and ctx.text is not None:
            n = ctx.chunk_chars
            pieces = [ctx.text[i : i + n] for i in range(0, len(ctx.text), n)] or [""]
            count, finish_reason = len(pieces), "stop"
        if verdict is None:
            completion_tokens = count
        else:
            # A safety model answers with its whole verdict, as one token event when streamed.
            await _pause(request, verdict[1])
            count, finish_reason = 1, "stop"
            completion_tokens = _estimate_tokens(len(verdict[0].encode()))
        usage = _chat_usage(prompt_tokens, completion_tokens)
        common = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if stream else "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if not stream:
            await self.wait_generation(request, ctx, count)
            await self.non_stream_fault(request, ctx)
            return _json_response(
                {
                    **common,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": verdict[0]
                                if verdict is not None
                                else ctx.text
                                if ctx.text is not None
                                else _content(count),
                                "refusal": None,
                            },
                            "logprobs": None,
                            "finish_reason": finish_reason,
                        }
                    ],
                    **({} if ctx.no_usage else {"usage": usage}),
                    "service_tier": "default",
                }
            )

        base = common
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice], **extra}

        prefix, suffix = _sse_template(chunk({"content": _SLOT}, None))
        if pieces is not None:
            encoded = [orjson.dumps(piece) for piece in pieces]
        elif verdict is None:
            _VOCAB.ensure(count)
            encoded = _VOCAB.encoded
        else:
            encoded = [orjson.dumps(verdict[0])]
        tail = [_sse(chunk({}, finish_reason))]
        if include_usage:
            tail.append(_sse({**base, "choices": [], "usage": usage}))
        return await self.stream(
            request,
            ctx,
            [_sse(chunk({"role": "assistant", "content": ""}, None))],
            count,
            lambda i: (prefix + encoded[i] + suffix,),
            tail,
        )

    async def completions(
        self, request: web.Request, ctx: _Ctx, raw_body: Any
    ) -> web.StreamResponse:
        body = _require_object(raw_body)
        model = _require_model(body)
        prompt = body.get("prompt")
        # OpenAI treats a missing prompt as <|endoftext|>.
        prompts = [(1, b"")] if prompt is None else _parse_inputs(prompt, "prompt")
        stream, include_usage = _stream_flags(body)
        include_usage = include_usage and not ctx.no_usage
        count, finish_reason = _completion_length(body, ("max_tokens",), ctx.tokens)
        prompt_tokens = sum(tokens for tokens, _ in prompts)
        completion_tokens = count * len(prompts)
        replies: list[str] | None = None
        if (kind := _safety_kind(model)) is not None:
            verdicts = [_verdict(kind, [("user", _prompt_text(i))]) for _, i in prompts]
            replies = [reply for reply, _ in verdicts]
            await _pause(request, max(delay for _, delay in verdicts))
            count, finish_reason = 1, "stop"
            completion_tokens = sum(_estimate_tokens(len(r.encode())) for r in replies)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        common = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if not stream:
            await self.wait_generation(request, ctx, count)
            await self.non_stream_fault(request, ctx)
            texts = [_content(count)] * len(prompts) if replies is None else replies
            choices = [
                {"text": text, "index": i, "logprobs": None, "finish_reason": finish_reason}
                for i, text in enumerate(texts)
            ]
            usage_field = {} if ctx.no_usage else {"usage": usage}
            return _json_response({**common, "choices": choices, **usage_field})

        extra = {"usage": None} if include_usage else {}

        def chunk(text: str, index: int, finish: str | None) -> dict[str, Any]:
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
            return {**common, "choices": [choice], **extra}

        templates = [_sse_template(chunk(_SLOT, i, None)) for i in range(len(prompts))]
        if replies is None:
            _VOCAB.ensure(count)
            encoded = _VOCAB.encoded

            def events(i: int) -> list[bytes]:
                return [prefix + encoded[i] + suffix for prefix, suffix in templates]
        else:
            fixed = [
                prefix + orjson.dumps(reply) + suffix
                for (prefix, suffix), reply in zip(templates, replies, strict=True)
            ]

            def events(i: int) -> list[bytes]:
                return fixed

        tail = [_sse(chunk("", i, finish_reason)) for i in range(len(prompts))]
        if include_usage:
            tail.append(_sse({**common, "choices": [], "usage": usage}))
        return await self.stream(
            request,
            ctx,
            (),
            count,
            events,
            tail,
        )

    async def embeddings(
        self, request: web.Request, ctx: _Ctx, raw_body: Any
    ) -> web.StreamResponse:
        body = _require_object(raw_body)
        model = _require_model(body)
        if "input" not in body:
            raise _RequestError(
                "you must provide an input parameter", param="input", code="missing_input"
            )
        inputs = _parse_inputs(body["input"], "input")
        dimensions = body.get("dimensions")
        if dimensions is None:
            dimensions = self.settings.embedding_dimensions
        elif not _is_int(dimensions) or not 1 <= dimensions <= _MAX_EMBEDDING_DIMENSIONS:
            raise _RequestError(
                f"Invalid 'dimensions': expected an integer in 1..{_MAX_EMBEDDING_DIMENSIONS}",
                param="dimensions",
                code="invalid_value",
            )
        encoding = body.get("encoding_format")
        if encoding is None:
            encoding = "float"
        if encoding not in ("float", "base64"):
            raise _RequestError(
                "Invalid 'encoding_format': expected 'float' or 'base64'",
                param="encoding_format",
                code="invalid_value",
            )
        as_base64 = encoding == "base64"
        await _pause(request, ctx.ttft)
        await self.non_stream_fault(request, ctx)
        data = []
        for index, (_, identity) in enumerate(inputs):
            floats, b64 = _embedding(identity, dimensions)
            data.append(
                {"object": "embedding", "index": index, "embedding": b64 if as_base64 else floats}
            )
        prompt_tokens = sum(tokens for tokens, _ in inputs)
        return _json_response(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            }
        )

    async def moderations(self, request: web.Request, ctx: _Ctx, raw_body: Any) -> web.Response:
        body = _require_object(raw_body)
        model = body.get("model", DEFAULT_MODERATION_MODEL)
        if not isinstance(model, str) or not model:
            raise _RequestError(
                "'model' must be a non-empty string", param="model", code="invalid_type"
            )
        if "input" not in body:
            raise _RequestError(
                "you must provide an input parameter", param="input", code="missing_input"
            )
        groups = _moderation_inputs(body["input"])
        delay = _directives(text for group in groups for text in group).delay
        await _pause(request, ctx.ttft + delay)
        await self.non_stream_fault(request, ctx)
        return _json_response(
            {
                "id": f"modr-{uuid.uuid4().hex}",
                "model": model,
                "results": [_moderation_result(group) for group in groups],
            }
        )

    async def guard_webhook(self, request: web.Request, ctx: _Ctx, raw_body: Any) -> web.Response:
        body = _require_object(raw_body)
        texts = body.get("texts")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise _RequestError(
                "'texts' must be an array of strings", param="texts", code="invalid_type"
            )
        await _pause(request, ctx.ttft + _directives(texts).delay)
        await self.non_stream_fault(request, ctx)
        return _json_response(_webhook_reply(texts))

    async def list_models(self, _request: web.Request, _ctx: _Ctx, _body: Any) -> web.Response:
        names = [DEFAULT_MODEL, *(m for m in self.models if m != DEFAULT_MODEL)]
        data = [
            {"id": name, "object": "model", "created": self.created, "owned_by": "fake-llm"}
            for name in names
        ]
        return _json_response({"object": "list", "data": data})

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def get_records(self, _request: web.Request) -> web.Response:
        return _json_response(list(self.records))

    async def clear_records(self, _request: web.Request) -> web.Response:
        cleared = len(self.records)
        self.records.clear()
        return _json_response({"cleared": cleared})


_STATE = web.AppKey("fake_llm", _FakeLLM)


def create_app(settings: FakeLLMSettings) -> web.Application:
    """Build the fake's aiohttp application; raises ValueError for invalid settings."""
    _validate_settings(settings)
    fake = _FakeLLM(settings)
    app = web.Application(middlewares=[fake.record_unrouted], client_max_size=_CLIENT_MAX_SIZE)
    app[_STATE] = fake
    app.on_response_prepare.append(fake.stamp_instance)
    app.router.add_post("/v1/chat/completions", fake.v1(fake.chat_completions))
    app.router.add_post("/v1/completions", fake.v1(fake.completions))
    app.router.add_post("/v1/embeddings", fake.v1(fake.embeddings))
    app.router.add_post("/v1/moderations", fake.v1(fake.moderations))
    app.router.add_post("/_fake/guard-webhook", fake.v1(fake.guard_webhook))
    app.router.add_get("/v1/models", fake.v1(fake.list_models))
    app.router.add_get("/healthz", fake.healthz)
    app.router.add_get("/_fake/requests", fake.get_records)
    app.router.add_delete("/_fake/requests", fake.clear_records)
    return app


def _format_address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return str(address)


async def serve(host: str, port: int, settings: FakeLLMSettings) -> None:
    """Serve the fake on host:port until cancelled."""
    app = create_app(settings)
    # Access logging would dominate per-request cost in benchmarks. handler_cancellation stops
    # work (pacing, stalls) for clients that have gone away, as real inference servers do.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        for address in runner.addresses:
            log.info("fake-llm %r listening on %s", settings.name, _format_address(address))
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- CLI


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not host or not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.removeprefix("[").removesuffix("]"), port


def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
    return number


def _non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    number = _non_negative_int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return number


def _rate(value: str) -> float:
    number = _non_negative_float(value)
    if number > 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {value!r}")
    return number


def _fault_spec(value: str) -> str | None:
    try:
        fault = _parse_fault(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return None if fault is None else value.strip().lower()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``extproc fake-llm`` options to ``parser``."""
    d = FakeLLMSettings()
    parser.add_argument(
        "--listen",
        type=_listen_address,
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to listen on; port 0 picks a free port (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--ttft-ms",
        type=_non_negative_float,
        default=d.ttft_ms,
        help="delay before the first byte/chunk in milliseconds (default %(default)s)",
    )
    parser.add_argument(
        "--tokens-per-second",
        type=_non_negative_float,
        default=d.tokens_per_second,
        help="pace streamed tokens at this rate; 0 = no pacing (default %(default)s)",
    )
    parser.add_argument(
        "--response-tokens",
        type=_non_negative_int,
        default=d.response_tokens,
        help="completion length in tokens (default %(default)s)",
    )
    parser.add_argument(
        "--embedding-dimensions",
        type=_positive_int,
        default=d.embedding_dimensions,
        help="embedding size when the request has no 'dimensions' (default %(default)s)",
    )
    parser.add_argument(
        "--fault",
        type=_fault_spec,
        default=d.fault,
        help=f"fault injected into /v1 requests: {_FAULT_HELP} (default none)",
    )
    parser.add_argument(
        "--fault-rate",
        type=_rate,
        default=d.fault_rate,
        help="probability that --fault applies to a request (default %(default)s)",
    )
    parser.add_argument(
        "--stall-seconds",
        type=_non_negative_float,
        default=d.stall_seconds,
        help="how long the stall faults hold a request (default %(default)s)",
    )
    parser.add_argument(
        "--name",
        default=d.name,
        help=f"instance name, returned in the {INSTANCE_HEADER} header (default %(default)s)",
    )
    parser.add_argument(
        "--record-limit",
        type=_non_negative_int,
        default=d.record_limit,
        help="recorded requests kept for /_fake/requests (default %(default)s)",
    )


def _settings_from_args(args: argparse.Namespace) -> FakeLLMSettings:
    d = FakeLLMSettings()
    return FakeLLMSettings(
        ttft_ms=getattr(args, "ttft_ms", d.ttft_ms),
        tokens_per_second=getattr(args, "tokens_per_second", d.tokens_per_second),
        response_tokens=getattr(args, "response_tokens", d.response_tokens),
        embedding_dimensions=getattr(args, "embedding_dimensions", d.embedding_dimensions),
        fault=getattr(args, "fault", d.fault),
        fault_rate=getattr(args, "fault_rate", d.fault_rate),
        stall_seconds=getattr(args, "stall_seconds", d.stall_seconds),
        name=getattr(args, "name", d.name),
        record_limit=getattr(args, "record_limit", d.record_limit),
    )


async def _serve_until_terminated(host: str, port: int, settings: FakeLLMSettings) -> None:
    loop = asyncio.get_running_loop()
    terminated = asyncio.Event()
    try:
        loop.add_signal_handler(signal.SIGTERM, terminated.set)
        handles_sigterm = True
    except (NotImplementedError, RuntimeError):  # Windows / not the main thread
        handles_sigterm = False
    server = asyncio.create_task(serve(host, port, settings))
    waiter = asyncio.create_task(terminated.wait())
    try:
        done, _ = await asyncio.wait({server, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if server in done:
            server.result()  # surfaces bind errors
        else:
            log.info("fake-llm %r: SIGTERM received, shutting down", settings.name)
    finally:
        waiter.cancel()
        server.cancel()
        await asyncio.gather(server, waiter, return_exceptions=True)
        if handles_sigterm:
            loop.remove_signal_handler(signal.SIGTERM)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``extproc fake-llm``; returns the process exit code."""
    host, port = args.listen if isinstance(args.listen, tuple) else _listen_address(args.listen)
    settings = _settings_from_args(args)
    try:
        _validate_settings(settings)
    except ValueError as exc:
        print(f"extproc fake-llm: {exc}", file=sys.stderr)
        return 2
    # No-op when the CLI already configured logging; otherwise the bound address would be lost.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve_until_terminated(host, port, settings))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        log.error("fake-llm could not listen on %s:%d: %s", host, port, exc)
        return 1
    return 0
