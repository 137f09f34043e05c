"""OpenAI's Responses API (`POST /v1/responses`, streamed or not, and its input token count
`POST /v1/responses/input_tokens`), as the openai SDKs' `client.responses` and agent
frameworks speak it.

A backend that serves the Responses API itself (config `responses_api`; OpenAI's own) with the
model to itself gets the request as it is and its answer goes back as it is, read on the way.
Every other backend gets it as chat completions (chat_bridge.py), and its answer is translated
back into a Response and its events."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from ..openai.answer import error_body
from . import answer, request
from .chat_bridge import BRIDGE
from .request import INPUT_TOKENS, RESPONSES
from .stream import ResponsesRelay

if TYPE_CHECKING:
    from ...errors import GatewayError
    from ...guard.texts import Slot
    from ...tokens import TokenCount, TokenCounter
    from ...usage import Usage
    from ..base import ChatBridge, Endpoint, ParsedRequest

__all__ = ["INPUT_TOKENS", "RESPONSES", "RESPONSES_API", "Responses"]


class Responses:
    """WireFormat (extproc/wire/base.py) for OpenAI's Responses API."""

    name = "responses"
    bridge: ChatBridge | None = BRIDGE
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
        return orjson.dumps({"object": "response.input_tokens", "input_tokens": tokens})

    def request_slots(self, endpoint: Endpoint, body: dict[str, Any]) -> list[Slot]:
        return request.request_slots(endpoint, body)

    def span_attributes(self, body: dict[str, Any]) -> dict[str, Any]:
        return request.span_attributes(body)

    def with_usage_requested(self, body: dict[str, Any]) -> bytes:
        raise TypeError("a Responses stream always reports its usage: nothing to ask for")

    def answer_usage(self, answer_: Any) -> Usage | None:
        return answer.answer_usage(answer_)

    def answer_text(self, answer_: Any) -> str:
        return answer.answer_text(answer_)

    def answer_slots(self, endpoint: Endpoint, answer_: Any) -> list[Slot]:
        return answer.answer_slots(endpoint, answer_)

    def drop_logprobs(self, answer_: Any) -> bool:
        dropped = False
        for item in answer_.get("output") or () if isinstance(answer_, dict) else ():
            for part in item.get("content") or () if isinstance(item, dict) else ():
                if isinstance(part, dict) and part.get("logprobs"):
                    part["logprobs"] = []
                    dropped = True
        return dropped

    def stream_relay(self, strip_usage_chunk: bool) -> ResponsesRelay:
        return ResponsesRelay()

    def error_body(self, err: GatewayError) -> bytes:
        return error_body(err.message, err.type, err.code, err.param)


RESPONSES_API = Responses()
