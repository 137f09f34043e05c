"""What a fake instance does (`FakeLLMSettings`), and what one request asks of it
(`RequestSettings`: those settings with the request's ``x-fake-*`` headers applied)."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from .faults import Fault, parse_fault
from .wire import MAX_EMBEDDING_DIMENSIONS, RequestError

INSTANCE_HEADER = "x-fake-llm-instance"
DEFAULT_LISTEN = "127.0.0.1:8081"


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
    # The AWS credentials the Bedrock endpoints check requests' SigV4 signatures with
    # (bedrock.py); by default the standard AWS environment variables of the fake's process.
    # No key: a signed request is taken unchecked. The bearer token: a Bedrock API key.
    aws_access_key_id: str | None = field(default_factory=lambda: _env("AWS_ACCESS_KEY_ID"))
    aws_secret_access_key: str | None = field(
        default_factory=lambda: _env("AWS_SECRET_ACCESS_KEY"), repr=False
    )
    aws_session_token: str | None = field(
        default_factory=lambda: _env("AWS_SESSION_TOKEN"), repr=False
    )
    aws_bearer_token: str | None = field(
        default_factory=lambda: _env("AWS_BEARER_TOKEN_BEDROCK"), repr=False
    )


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def validate_settings(settings: FakeLLMSettings) -> None:
    def non_negative(name: str, value: float) -> None:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    non_negative("ttft_ms", settings.ttft_ms)
    non_negative("tokens_per_second", settings.tokens_per_second)
    non_negative("stall_seconds", settings.stall_seconds)
    non_negative("response_tokens", settings.response_tokens)
    non_negative("record_limit", settings.record_limit)
    if not 1 <= settings.embedding_dimensions <= MAX_EMBEDDING_DIMENSIONS:
        raise ValueError(
            f"embedding_dimensions must be in 1..{MAX_EMBEDDING_DIMENSIONS}, "
            f"got {settings.embedding_dimensions!r}"
        )
    if not 0.0 <= settings.fault_rate <= 1.0:
        raise ValueError(f"fault_rate must be in [0, 1], got {settings.fault_rate!r}")
    if settings.fault is not None:
        parse_fault(settings.fault)
    if (settings.aws_access_key_id is None) != (settings.aws_secret_access_key is None):
        raise ValueError("aws_access_key_id and aws_secret_access_key go together")


@dataclass(slots=True)
class RequestSettings:
    """Per-request behaviour: the settings with header overrides applied."""

    ttft: float  # seconds
    tokens_per_second: float
    tokens: int
    fault: Fault | None
    # A backend that reports no usage, streamed or not (x-fake-no-usage: 1).
    no_usage: bool = False
    # A chat answer with this text instead of tok0 tok1 ..., streamed `chunk_chars` characters
    # per event (x-fake-response-text, x-fake-chunk-chars): response guards need real text.
    text: str | None = None
    chunk_chars: int = 4
    # Of the completion, what the usage report calls reasoning (x-fake-reasoning-tokens).
    reasoning_tokens: int = 0
    # Seconds a chat stream stays open after [DONE] before it ends (x-fake-linger-ms), as a
    # server that closes its streams late: a client reading to [DONE] has gone by then.
    linger: float = 0.0


def request_settings(settings: FakeLLMSettings, headers: Mapping[str, str]) -> RequestSettings:
    override = headers.get("x-fake-fault")
    if override is not None:
        try:
            fault = parse_fault(override)
        except ValueError as exc:
            raise RequestError(
                f"invalid x-fake-fault header: {exc}", code="invalid_fake_header"
            ) from None
    elif settings.fault and (settings.fault_rate >= 1.0 or random.random() < settings.fault_rate):
        fault = parse_fault(settings.fault)
    else:
        fault = None
    return RequestSettings(
        ttft=_header_number(headers, "x-fake-ttft-ms", settings.ttft_ms) / 1000.0,
        tokens_per_second=_header_number(
            headers, "x-fake-tokens-per-second", settings.tokens_per_second
        ),
        tokens=_header_int(headers, "x-fake-response-tokens", settings.response_tokens),
        fault=fault,
        no_usage=headers.get("x-fake-no-usage") == "1",
        text=headers.get("x-fake-response-text"),
        chunk_chars=max(1, _header_int(headers, "x-fake-chunk-chars", 4)),
        reasoning_tokens=max(0, _header_int(headers, "x-fake-reasoning-tokens", 0)),
        linger=_header_number(headers, "x-fake-linger-ms", 0) / 1000.0,
    )


def _header_number(headers: Mapping[str, str], name: str, default: float) -> float:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise RequestError(
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
        raise RequestError(
            f"invalid {name} header {raw!r}: expected an integer >= 0", code="invalid_fake_header"
        )
    return value
