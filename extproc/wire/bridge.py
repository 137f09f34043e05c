"""Answers of a chat completions backend to a client of another API (a wire format's
`bridge`): the JSON answer or error, and the relay of a stream, in the client's terms.

Everything the gateway reads of such an answer (usage, text, response guards) it reads as
OpenAI's chat completion, before the bridge: one reader for every client API, and a
provider's answer (already made OpenAI's by providers/) is read the same way."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import GatewayError

if TYPE_CHECKING:
    from ..guard.types import Verdict
    from ..sse import RelayedStream
    from ..usage import Usage
    from .base import ClientStream, WireFormat

log = logging.getLogger("extproc.wire")


def openai_error(status: int, body: bytes) -> GatewayError:
    """An OpenAI error answer (a backend's, a provider's made OpenAI's, Envoy's own reply) as
    the refusal the client's format renders."""
    err: Any = None
    try:
        parsed = orjson.loads(body)
        err = parsed.get("error") if isinstance(parsed, dict) else None
    except orjson.JSONDecodeError:
        pass
    if isinstance(err, str):  # some servers answer {"error": "text"}
        err = {"message": err}
    if not isinstance(err, dict):
        text = body.decode("utf-8", "replace").strip()[:500]
        return GatewayError(status, text or f"The backend answered {status}", "server_error")
    message = err.get("message")
    return GatewayError(
        status,
        str(message) if message else f"The backend answered {status}",
        str(err.get("type") or "server_error"),
        str(err["code"]) if err.get("code") is not None else None,
        str(err["param"]) if err.get("param") is not None else None,
    )


def client_answer(
    client: WireFormat, status: int, body: bytes, model: str, request: dict[str, Any]
) -> bytes:
    """A chat completions answer (JSON or error) as the client's; `request`: the client's body.
    Raises ValueError for a 2xx body that is not a chat completion."""
    assert client.bridge is not None
    if not 200 <= status < 300:
        return client.error_body(openai_error(status, body))
    completion = orjson.loads(body)
    if not isinstance(completion, dict) or not isinstance(completion.get("choices"), list):
        raise ValueError("not a chat completion")
    return orjson.dumps(client.bridge.answer(completion, model, request))


class BridgedStream:
    """A chat completions stream relayed to a client of another API: `inner` reads it as
    OpenAI's (usage, text, response guards; a provider's stream already made OpenAI's), then
    the bridge's translator turns what `inner` lets through into the client's events."""

    __slots__ = ("inner", "translator")

    def __init__(self, inner: RelayedStream, translator: ClientStream) -> None:
        self.inner = inner
        self.translator = translator

    def feed(self, chunk: bytes, end_of_stream: bool) -> bytes:
        relayed = self.inner.feed(chunk, end_of_stream)
        chat = chunk if relayed is None else relayed
        try:
            out = self.translator.feed(chat)
            if end_of_stream:
                out += self.translator.end()
        except Exception:  # a translator should not raise; the stream must not be torn down
            log.exception("a chat stream could not be translated for the client")
            return b""
        return out

    @property
    def usage(self) -> Usage | None:
        return self.inner.usage

    @property
    def events(self) -> int:
        return self.inner.events

    @property
    def partial_usage(self) -> Usage | None:
        return self.inner.partial_usage

    @property
    def error_code(self) -> str | None:
        # (The backend's error chunk is read by the translator, which turns it into the
        # client's error event.)
        return self.inner.error_code or getattr(self.translator, "error_code", None)

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
