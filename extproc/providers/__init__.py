"""Backends that speak another API than OpenAI's, translated for the OpenAI clients: one
module per provider format (`anthropic.py`, ...), the shared types in `base.py`."""

from .registry import TranslatedStream, answer, check, request_body, stream_relay

__all__ = ["TranslatedStream", "answer", "check", "request_body", "stream_relay"]
