"""Which provider format a backend's `type` takes, and what the stages ask of it: the request
checked and translated (its body, path and headers), a whole answer translated, the relay of a
translated stream. A new provider format is a module beside anthropic.py (base.Provider) and a
line in PROVIDERS."""

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
    from .base import Provider, StreamTranslator

# backend type -> its provider ("openai": none, the request goes as it is)
PROVIDERS: dict[str, Provider] = {p.name: p for p in (anthropic.PROVIDER,)}

# Every header some provider sets or strips: an attempt of a failover pool starts from the
# headers the previous attempt left, so each removes the others' (upstream.py).
PROVIDER_HEADERS = frozenset(
    h for p in PROVIDERS.values() for h in (*p.request_headers, *p.strip_headers)
)

# The path of a chat completion at an OpenAI backend, after the backend URL's path.
OPENAI_CHAT_PATH = "/chat/completions"


def provider(name: str) -> Provider:
    try:
        return PROVIDERS[name]
    except KeyError:
        raise ValueError(f"no translation for provider {name!r}") from None


def check(target: ResolvedTarget, body: dict[str, Any]) -> None:
    """Raises the 400 of a request the target's provider cannot serve as asked (before any
    quota is reserved for it)."""
    provider(target.provider).request(target, body)


def request_body(target: ResolvedTarget, body: dict[str, Any]) -> bytes:
    """The client's (OpenAI) body in the target's provider's terms."""
    return orjson.dumps(provider(target.provider).request(target, body))


def backend_path(target: ResolvedTarget, stream: bool) -> str:
    """The path of a chat request at the target's backend, whichever API it speaks."""
    if target.provider == "openai":
        return target.base_path + OPENAI_CHAT_PATH
    return provider(target.provider).path(target, stream)


def request_headers(target: ResolvedTarget) -> tuple[dict[str, str], list[str]]:
    """The headers a request to the target's backend gets, and those it must not carry (the
    other providers' own, which an earlier attempt or the client may have set)."""
    if target.provider == "openai":
        return {}, sorted(PROVIDER_HEADERS)
    p = provider(target.provider)
    return dict(p.request_headers), sorted(PROVIDER_HEADERS - set(p.request_headers))


def is_stream(target_provider: str, content_type: str) -> bool:
    """A provider's answer with this content type is its event stream."""
    if target_provider == "openai":
        return False
    return content_type.startswith(provider(target_provider).stream_content_type)


class TranslatedStream:
    """A provider's event stream relayed to an OpenAI client: each piece translated into
    OpenAI's chunks, then through the OpenAI relay (`inner`: usage read, the usage chunk cut
    when the client did not ask for it, response guards), as an OpenAI backend's would be."""

    def __init__(self, translator: StreamTranslator, inner: RelayedStream) -> None:
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
    return TranslatedStream(provider(target_provider).stream(model), inner)


def answer(target_provider: str, model: str, status: int, raw: bytes) -> tuple[int, bytes]:
    """A provider's whole answer (JSON, or its error) as the OpenAI client's: (status, body).
    Raises ValueError for a 2xx body that is not the provider's JSON."""
    p = provider(target_provider)
    if 200 <= status < 300:
        parsed = orjson.loads(raw)
        if not isinstance(parsed, dict):
            raise ValueError("not a JSON object")
        return status, orjson.dumps(p.answer(parsed, model))
    err = p.error(status, raw)
    return err.status, error_body(err.message, err.type, err.code, err.param)
