"""Anthropic's wire format: the Messages API (`POST /v1/messages`) and its token count
(`POST /v1/messages/count_tokens`), as the anthropic SDKs and Claude Code speak them.

A backend of type `anthropic` with the model to itself gets the request as it is (thinking,
cache_control, betas and all) and its answer goes back as it is, read on the way. Every other
backend gets it as chat completions (chat_bridge.py), and its answer is translated back; a
provider of another API gets that chat request in its own API, as an OpenAI client's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from . import answer, request
from .chat_bridge import BRIDGE
from .request import COUNT_TOKENS, MESSAGES
from .stream import MessagesRelay

if TYPE_CHECKING:
    from ...errors import GatewayError
    from ...guard.texts import Slot
    from ...tokens import TokenCount, TokenCounter
    from ...usage import Usage
    from ..base import ChatBridge, Endpoint, ParsedRequest

__all__ = ["ANTHROPIC", "COUNT_TOKENS", "MESSAGES", "Anthropic"]


class Anthropic:
    """WireFormat (extproc/wire/base.py) for Anthropic's Messages API."""

    name = "anthropic"
    bridge: ChatBridge | None = BRIDGE
    own_headers: tuple[str, ...] = ("anthropic-version", "anthropic-beta")

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
        return orjson.dumps({"input_tokens": tokens})

    def request_slots(self, endpoint: Endpoint, body: dict[str, Any]) -> list[Slot]:
        return request.request_slots(endpoint, body)

    def span_attributes(self, body: dict[str, Any]) -> dict[str, Any]:
        return request.span_attributes(body)

    def with_usage_requested(self, body: dict[str, Any]) -> bytes:
        raise TypeError("a Messages stream always reports its usage: nothing to ask for")

    def answer_usage(self, answer_: Any) -> Usage | None:
        return answer.answer_usage(answer_)

    def answer_text(self, answer_: Any) -> str:
        return answer.answer_text(answer_)

    def answer_slots(self, endpoint: Endpoint, answer_: Any) -> list[Slot]:
        return answer.answer_slots(endpoint, answer_)

    def drop_logprobs(self, answer_: Any) -> bool:
        return False  # Messages answers carry no log-probabilities

    def stream_relay(self, strip_usage_chunk: bool) -> MessagesRelay:
        return MessagesRelay()

    def error_body(self, err: GatewayError) -> bytes:
        return answer.error_body(err)


ANTHROPIC = Anthropic()
