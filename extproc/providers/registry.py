"""Which provider format a backend's `type` takes, and what the stages ask of it: the request
checked and translated (its body, path and headers), a whole answer translated, the relay of a
translated stream. A new provider format is a module beside anthropic.py (base.Provider) and a
line in PROVIDERS.

Two types are not translated: `openai` (the request goes as it is, under the backend URL's
path) and `azure` (OpenAI's bodies at Azure's deployment paths, its errors made OpenAI's)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import GatewayError, bad_request
from ..wire.openai.answer import error_body
from ..wire.openai.request import CHAT, EMBEDDINGS
from . import anthropic, azure, bedrock, gemini
from .openai_answer import Chunks, encode

log = logging.getLogger("extproc.providers")

if TYPE_CHECKING:
    from ..config import ResolvedTarget
    from ..guard.types import Verdict
    from ..sse import RelayedStream
    from ..usage import Usage
    from .base import Provider, StreamTranslator

# backend type -> its provider ("openai": none, the request goes as it is)
PROVIDERS: dict[str, Provider] = {
    p.name: p for p in (anthropic.PROVIDER, bedrock.PROVIDER, gemini.PROVIDER)
}

CHAT_PATH, EMBEDDINGS_PATH = CHAT.path, EMBEDDINGS.path

# Every header some provider sets or strips: an attempt of a failover pool starts from the
# headers the previous attempt left, so each removes the others' (upstream.py).
PROVIDER_HEADERS = frozenset(
    h for p in PROVIDERS.values() for h in (*p.request_headers, *p.strip_headers)
)


def translates(provider_type: str) -> bool:
    """A backend of this type gets the request in its own API (and answers in it)."""
    return provider_type in PROVIDERS


def provider(name: str) -> Provider:
    try:
        return PROVIDERS[name]
    except KeyError:
        raise ValueError(f"no translation for provider {name!r}") from None


def serves(provider_type: str, endpoint_path: str) -> bool:
    """A backend of this type can serve the client's OpenAI endpoint (translated ones: chat,
    and embeddings where the provider has them)."""
    p = PROVIDERS.get(provider_type)
    if p is None:
        return True
    if endpoint_path == EMBEDDINGS_PATH:
        return p.embeddings is not None
    return endpoint_path == CHAT_PATH


def check(target: ResolvedTarget, body: dict[str, Any], endpoint_path: str = CHAT_PATH) -> None:
    """Raises the 400 of a request the target's provider cannot serve as asked (before any
    quota is reserved for it)."""
    if target.provider in PROVIDERS:
        if not serves(target.provider, endpoint_path):
            raise bad_request(
                f"The model `{target.model}` is served by a backend that cannot answer "
                f"{endpoint_path} (its API is {target.provider}'s)",
                "model_not_supported",
                "model",
            )
        _translated(target, body, endpoint_path)


def request_body(
    target: ResolvedTarget, body: dict[str, Any], endpoint_path: str = CHAT_PATH
) -> bytes:
    """The client's (OpenAI) body in the target's provider's terms."""
    return orjson.dumps(_translated(target, body, endpoint_path))


def _translated(target: ResolvedTarget, body: dict[str, Any], endpoint_path: str) -> dict:
    p = provider(target.provider)
    if endpoint_path == EMBEDDINGS_PATH:
        if p.embeddings is None:
            raise ValueError(f"provider {p.name!r} has no embeddings")
        return p.embeddings.request(target, body)
    return p.request(target, body)


def backend_path(target: ResolvedTarget, endpoint_path: str, stream: bool) -> str:
    """The path of a request at the target's backend, whichever API it speaks, for the client's
    OpenAI endpoint (`/v1/chat/completions`, ...; a translated backend serves chat only)."""
    if target.provider == "openai":
        return target.base_path + endpoint_path.removeprefix("/v1")
    if target.provider == "azure":
        return azure.path(target, endpoint_path, target.api_version)
    p = provider(target.provider)
    if endpoint_path == EMBEDDINGS_PATH and p.embeddings is not None:
        return p.embeddings.path(target)
    return p.path(target, stream)


def takes_usage_request(target: ResolvedTarget) -> bool:
    """An OpenAI-bodied backend takes `stream_options.include_usage` (Azure's deployments
    only from api-version 2024-09-01, which refuse it before)."""
    return target.provider != "azure" or azure.takes_stream_options(target.api_version)


def request_headers(provider_type: str) -> tuple[dict[str, str], list[str]]:
    """The headers a request to a backend of this type gets, and those it must not carry (the
    other providers' own, which an earlier attempt or the client may have set)."""
    p = PROVIDERS.get(provider_type)
    if p is None:
        return {}, sorted(PROVIDER_HEADERS)
    return dict(p.request_headers), sorted(PROVIDER_HEADERS - set(p.request_headers))


def is_stream(target_provider: str, content_type: str) -> bool:
    """A provider's answer with this content type is its event stream."""
    p = PROVIDERS.get(target_provider)
    return p is not None and content_type.startswith(p.stream_content_type)


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
        translator = self.translator
        reported: Usage | None = None
        partial: Usage | None = None
        try:
            if translator.failed is not None and translator.done:
                # After a failure, nothing more of the provider's reaches the client.
                openai_bytes = b""
            else:
                openai_bytes = translator.feed(chunk)
                reported, partial = translator.usage, translator.partial_usage
            if end_of_stream and not translator.done and translator.finish_reason is not None:
                # The provider finished its answer and ended the stream without the event that
                # would have closed it: it still ends as OpenAI's streams do. (A stream cut
                # before its finish does not: a client sees it was cut.)
                openai_bytes += translator.finish()
        except Exception:
            # A translator that could not read the provider's events (it should not raise):
            # the client's stream ends with an error, never with the gRPC stream torn down.
            log.exception("a %s stream could not be translated", type(translator).__module__)
            translator.failed = GatewayError(
                502, "The provider's stream could not be read", "server_error", "bad_event_stream"
            )
            translator.done = True
            openai_bytes = Chunks.error(translator.failed)
            reported = partial = None
        out = self.inner.feed(openai_bytes, end_of_stream)
        self.usage, self.events = self.inner.usage, self.inner.events
        if self.usage is not None and reported is not None:
            # The provider's report, whole: what it wrote to its prompt cache is priced apart,
            # and OpenAI's usage chunk, which the relay read, has no place for it.
            self.usage = reported
        if translator.failed is not None:
            self.error_code = translator.failed.code
        if self.usage is None and (partial is not None or translator.failed is None):
            self.partial_usage = partial
        # The client never gets the provider's own bytes: the translation, or what the relay
        # made of it.
        return out if out is not None else openai_bytes

    @property
    def expects_usage(self) -> bool:
        return self.inner.expects_usage

    @property
    def finished(self) -> bool:
        return self.inner.finished

    @property
    def text(self) -> str:
        return self.inner.text

    @property
    def blocked(self) -> Verdict | None:
        return self.inner.blocked


def stream_relay(target_provider: str, model: str, inner: RelayedStream) -> RelayedStream:
    """The relay of a stream from a backend of this type, `model` naming what served it."""
    p = PROVIDERS.get(target_provider)
    return inner if p is None else TranslatedStream(p.stream(model), inner)


def answer_and_usage(
    target_provider: str,
    model: str,
    status: int,
    raw: bytes,
    endpoint_path: str = CHAT_PATH,
    headers: Mapping[str, str] | None = None,
    encoding_format: str | None = None,
) -> tuple[int, bytes | None, Usage | None]:
    """A provider's whole answer (JSON, or its error) as the OpenAI client's: (status, body,
    usage); body None: the answer is OpenAI's as it is. The usage is the provider's own report
    of a chat answer, whole (OpenAI's shape has no place for what it wrote to its prompt cache,
    which is priced apart): None for the others, read from the OpenAI answer. `headers`: the
    answer's (lower-case names); `encoding_format`: an embeddings client's (base64: the
    vectors as OpenAI encodes them).
    A 2xx answer the provider's translation reads as a failure (a GatewayError from
    `Provider.answer`: a generation ended as failed) is that error's status and body. Raises
    ValueError for a 2xx body that is not the provider's JSON."""
    if target_provider == "azure":
        if 200 <= status < 300:
            return status, None, None
        mapped = azure.error(status, raw)
        if mapped is None:
            return status, None, None
        rendered = error_body(mapped.message, mapped.type, mapped.code, mapped.param)
        return mapped.status, rendered, None
    p = provider(target_provider)
    if 200 <= status < 300:
        parsed = orjson.loads(raw)
        if not isinstance(parsed, dict):
            raise ValueError("not a JSON object")
        if endpoint_path == EMBEDDINGS_PATH and p.embeddings is not None:
            vectors = p.embeddings.answer(parsed, model, headers or {})
            return status, orjson.dumps(encode(vectors, encoding_format)), None
        try:
            completion = orjson.dumps(p.answer(parsed, model))
        except GatewayError as failed:
            # A generation the provider ended as failed: what it spent is still reported.
            rendered = error_body(failed.message, failed.type, failed.code, failed.param)
            return failed.status, rendered, p.usage(parsed)
        return status, completion, p.usage(parsed)
    err = p.error(status, raw, headers or {})
    return err.status, error_body(err.message, err.type, err.code, err.param), None
