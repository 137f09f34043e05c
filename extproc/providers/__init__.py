"""Backends that speak another API than OpenAI's, translated for the OpenAI clients: one
module per provider format (`anthropic.py`, ...) behind base.Provider, and which one a
backend's type takes (`registry.py`). A provider's error becomes a GatewayError, rendered like
any refusal."""

from .registry import (
    TranslatedStream,
    answer_and_usage,
    backend_path,
    check,
    is_stream,
    provider,
    request_body,
    request_headers,
    stream_relay,
    takes_usage_request,
    translates,
)

__all__ = [
    "TranslatedStream",
    "answer_and_usage",
    "backend_path",
    "check",
    "is_stream",
    "provider",
    "request_body",
    "request_headers",
    "stream_relay",
    "takes_usage_request",
    "translates",
]
