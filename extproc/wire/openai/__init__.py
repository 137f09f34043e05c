"""OpenAI's wire format: Chat Completions, Completions, Embeddings and the model list, as the
OpenAI API and the servers that copy it (vLLM, Azure OpenAI, ...) speak them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import request
from .answer import answer_slots, answer_text, answer_usage, drop_logprobs, error_body
from .guarded_stream import GuardedStreamRelay
from .request import CHAT, COMPLETIONS, EMBEDDINGS, MODEL, MODELS
from .stream import StreamRelay

if TYPE_CHECKING:
    from ...errors import GatewayError
    from ...guard.pipeline import CompiledGuard
    from ...guard.texts import Slot
    from ...guard.types import Span
    from ...tokens import TokenCount, TokenCounter
    from ...usage import Usage
    from ..base import ChatBridge, Endpoint, ParsedRequest

__all__ = ["CHAT", "COMPLETIONS", "EMBEDDINGS", "MODEL", "MODELS", "OPENAI", "OpenAI"]


class OpenAI:
    """WireFormat (extproc/wire/base.py) for OpenAI's API."""

    name = "openai"
    bridge: ChatBridge | None = None
    own_headers: tuple[str, ...] = ()

    def owns(self, path: str) -> bool:
        return request.owns(path)

    def route(self, method: str, path: str) -> tuple[Endpoint, str | None] | None:
        return request.route(method, path)

    def parse(self, endpoint: Endpoint, raw: bytes) -> ParsedRequest:
        return request.parse(endpoint, raw)

    async def count_prompt(
        self,
        tokens: TokenCounter,
        parsed: ParsedRequest,
        *,
        team: str | None,
        budget: float | None,
    ) -> TokenCount:
        return await request.count_prompt(tokens, parsed, team=team, budget=budget)

    def token_count_body(self, tokens: int) -> bytes:
        raise TypeError("OpenAI's chat completions API has no token count endpoint")

    def request_slots(self, endpoint: Endpoint, body: dict[str, Any]) -> list[Slot]:
        return request.request_slots(endpoint, body)

    def span_attributes(self, body: dict[str, Any]) -> dict[str, Any]:
        return request.span_attributes(body)

    def with_usage_requested(self, body: dict[str, Any]) -> bytes:
        return request.with_usage_requested(body)

    def answer_usage(self, answer: Any) -> Usage | None:
        return answer_usage(answer)

    def answer_text(self, answer: Any) -> str:
        return answer_text(answer)

    def answer_slots(self, endpoint: Endpoint, answer: Any) -> list[Slot]:
        return answer_slots(endpoint, answer)

    def drop_logprobs(self, answer: Any) -> bool:
        return drop_logprobs(answer)

    def stream_relay(self, strip_usage_chunk: bool) -> StreamRelay:
        return StreamRelay(strip_usage_chunk)

    def guarded_stream_relay(
        self,
        endpoint: Endpoint,
        strip_usage_chunk: bool,
        find: Callable[[str], list[Span]],
        holdback: int,
        owners: dict[str, CompiledGuard],
    ) -> GuardedStreamRelay:
        return GuardedStreamRelay(endpoint, strip_usage_chunk, find, holdback, owners)

    def error_body(self, err: GatewayError) -> bytes:
        return error_body(err.message, err.type, err.code, err.param)


OPENAI = OpenAI()
