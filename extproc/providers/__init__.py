"""Backends that speak another API than OpenAI's, translated for the OpenAI clients: one
module per provider format (`anthropic.py`, ...), and which one a backend's type takes
(`registry.py`). A provider's error becomes a GatewayError, rendered like any refusal."""

from .registry import TranslatedStream, answer, check, request_body, stream_relay

__all__ = ["TranslatedStream", "answer", "check", "request_body", "stream_relay"]
