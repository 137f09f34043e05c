"""What the gateway asks of a provider format: one module per provider (`anthropic.py`, ...)
exposes a `PROVIDER` with these members, and `registry.py` names it by the backend's `type`.

The client speaks OpenAI's chat completions; a provider turns that request into its own API's,
and its answers (a JSON answer, an error, an event stream) back into OpenAI's shapes. Nothing
here knows about Envoy or the stages: they call the registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..config import ResolvedTarget
    from ..errors import GatewayError
    from ..usage import Usage


class StreamTranslator(Protocol):
    """A provider's streamed answer, as it arrives in pieces (split anywhere), to OpenAI's
    chunk stream (`data: {...}\\n\\n` events ending with `data: [DONE]`)."""

    # The provider ended the stream with an error (an error event or exception): the error
    # the client's stream ended with (as OpenAI's error chunk).
    failed: GatewayError | None
    # The answer's finish reason, once the provider said it (OpenAI's words).
    finish_reason: str | None
    # The translation wrote `data: [DONE]` (after the usage report, or an error).
    done: bool

    def feed(self, piece: bytes) -> bytes:
        """Each piece in, the OpenAI events it completes out (b"" when none): nothing is held
        back longer than the provider's event takes to arrive. Never raises on bad input."""
        ...

    def finish(self) -> bytes:
        """The stream ended after the provider's finish (`finish_reason`) but before the event
        that would have closed it: what closes it for the client now (the usage chunk when the
        provider's report is whole, then `data: [DONE]`); sets `done`."""
        ...

    @property
    def usage(self) -> Usage | None:
        """The provider's usage report, once the stream brought it whole."""
        ...

    @property
    def partial_usage(self) -> Usage | None:
        """For a stream cut before its usage report: what it cost at least (the input the
        provider reported, if it did, and output estimated from what was produced), or
        None when nothing was reported."""
        ...


class Embeddings(Protocol):
    """A provider's embeddings behind OpenAI's `/v1/embeddings`."""

    def path(self, target: ResolvedTarget) -> str:
        """The request's path at the backend (the backend URL's path included)."""
        ...

    def request(self, target: ResolvedTarget, body: dict[str, Any]) -> dict[str, Any]:
        """A validated OpenAI embeddings body (`input`: a string or a list of strings;
        `dimensions`, `encoding_format`, `user`) as the provider's request for
        `target.provider_model`. Raises a 400 GatewayError naming the parameter for what the
        provider cannot do as asked (token-array inputs, too many inputs for one call, ...)."""
        ...

    def answer(
        self, answer: dict[str, Any], model: str, headers: Mapping[str, str]
    ) -> dict[str, Any]:
        """The provider's 2xx JSON answer as OpenAI's embeddings list (`object: list`, `data`
        of `{object: embedding, index, embedding}` in input order, `model`), with `usage`
        (`prompt_tokens`, `total_tokens`) only when the provider reported a count (in its
        body, or in `headers`: the answer's response headers); the gateway settles an answer
        without usage at its own count of the input."""
        ...


class Provider(Protocol):
    """One provider's API behind OpenAI's chat completions (and embeddings, where it has
    them)."""

    name: str  # the backend `type` that selects it
    # Headers every request to it carries (an API version), and headers of the client's
    # that must not reach it (options of the provider's own API the OpenAI client did not
    # mean to send).
    request_headers: Mapping[str, str]
    strip_headers: tuple[str, ...]
    # The content type of its streamed answers, when it is not text/event-stream.
    stream_content_type: str

    def path(self, target: ResolvedTarget, stream: bool) -> str:
        """The request's path at the backend (the backend URL's path included)."""
        ...

    def request(self, target: ResolvedTarget, body: dict[str, Any]) -> dict[str, Any]:
        """A validated OpenAI chat completions body as the provider's request for
        `target.provider_model`. Raises a 400 GatewayError naming the parameter for what the
        provider cannot do as asked, and for a body part not shaped as OpenAI defines it."""
        ...

    def answer(self, answer: dict[str, Any], model: str) -> dict[str, Any]:
        """The provider's 2xx JSON answer as an OpenAI chat completion for the client's
        `model` name (usage included when the provider reported it). Raises a GatewayError
        (a 5xx) for a 2xx answer that is the provider's failure rather than an answer (a
        generation the provider ended as failed), which the client gets instead."""
        ...

    def usage(self, answer: dict[str, Any]) -> Usage | None:
        """The usage the provider reported in its 2xx JSON answer (cache reads and writes,
        reasoning, as far as it reports them); None when it reported none."""
        ...

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> GatewayError:
        """The provider's error answer as the client's error: status (a status OpenAI clients
        do not know mapped to one they do), message, OpenAI error type, and the provider's
        own error type as the code. `headers`: the answer's response headers (lower-case
        names), where some providers name the error (AWS's `x-amzn-errortype`); the registry
        always passes them (an implementation may default them to none for direct callers)."""
        ...

    # None: the provider has no embeddings the gateway translates to.
    embeddings: Embeddings | None

    def stream(self, model: str) -> StreamTranslator:
        """A translator for one streamed answer, for the client's `model` name; it always
        ends with OpenAI's usage chunk when the provider reported usage (the relay cuts it
        when the client did not ask for it)."""
        ...
