"""Which translation a backend's provider type takes: the request checked and translated, a
whole answer translated, the relay of a translated stream. A new provider format is a module
beside anthropic.py and a branch in each function here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from ..wire.openai.answer import error_body
from . import anthropic

if TYPE_CHECKING:
    from ..config import ResolvedTarget
    from ..guard.types import Verdict
    from ..sse import RelayedStream
    from ..usage import Usage


def check(target: ResolvedTarget, body: dict[str, Any]) -> None:
    """Raises the 400 of a request the target's provider cannot serve as asked (before any
    quota is reserved for it)."""
    if target.provider == "anthropic":
        anthropic.messages_request(body, target.provider_model, target.max_tokens)


def request_body(target: ResolvedTarget, body: dict[str, Any]) -> bytes:
    """The client's (OpenAI) body in the target's provider's terms."""
    if target.provider == "anthropic":
        translated = anthropic.messages_request(body, target.provider_model, target.max_tokens)
        return orjson.dumps(translated)
    raise ValueError(f"no translation for provider {target.provider!r}")


class TranslatedStream:
    """A provider's event stream relayed to an OpenAI client: each piece translated into
    OpenAI's chunks, then through the OpenAI relay (`inner`: usage read, the usage chunk cut
    when the client did not ask for it, response guards), as an OpenAI backend's would be."""

    def __init__(self, translator: anthropic.StreamTranslator, inner: RelayedStream) -> None:
        self.translator = translator
        self.inner = inner
        self.usage: Usage | None = None  # the inner relay's, after each piece
        self.events = 0
        self.error_code: str | None = None
        self.partial_usage: Usage | None = None

    def feed(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        openai_bytes = self.translator.feed(chunk)
        out = self.inner.feed(openai_bytes, end_of_stream)
        self.usage, self.events = self.inner.usage, self.inner.events
        if self.translator.failed is not None:
            self.error_code = self.translator.failed.code
        if self.usage is None:
            self.partial_usage = self.translator.partial_usage
        # The client never gets the provider's own bytes: the translation, or what the relay
        # made of it.
        return out if out is not None else openai_bytes

    @property
    def expects_usage(self) -> bool:
        return self.inner.expects_usage

    @property
    def text(self) -> str:
        return self.inner.text

    @property
    def blocked(self) -> Verdict | None:
        return self.inner.blocked


def stream_relay(target_provider: str, model: str, inner: RelayedStream) -> RelayedStream:
    """The relay of a translated stream for the client's `model` name."""
    if target_provider == "anthropic":
        # Anthropic always reports usage; the inner relay cuts the chunk if not asked for.
        return TranslatedStream(anthropic.StreamTranslator(model, include_usage=True), inner)
    raise ValueError(f"no translation for provider {target_provider!r}")


def answer(target_provider: str, model: str, status: int, raw: bytes) -> tuple[int, bytes]:
    """A provider's whole answer (JSON, or its error) as the OpenAI client's: (status, body).
    Raises ValueError for a 2xx body that is not the provider's JSON."""
    if target_provider != "anthropic":
        raise ValueError(f"no translation for provider {target_provider!r}")
    if 200 <= status < 300:
        parsed = orjson.loads(raw)
        if not isinstance(parsed, dict):
            raise ValueError("not a JSON object")
        return status, orjson.dumps(anthropic.chat_completion(parsed, model))
    err = anthropic.error(status, raw)
    return err.status, error_body(err.message, err.type, err.code, err.param)
