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

from ..base import RESPONSE_OBJECT, file_references
from ..openai import OPENAI
from . import answer, request
from .chat_bridge import BRIDGE
from .request import INPUT_TOKENS, RESPONSES
from .stream import ResponsesRelay

if TYPE_CHECKING:
    from ...errors import GatewayError
    from ..base import ChatBridge, GuardedRelay

__all__ = ["INPUT_TOKENS", "RESPONSES", "RESPONSES_API", "Responses"]


class Responses:
    """WireFormat (extproc/wire/base.py) for OpenAI's Responses API."""

    name = "responses"
    bridge: ChatBridge | None = BRIDGE
    own_header_prefix = ""
    own_guarded_relay: GuardedRelay | None = None
    owns = staticmethod(request.owns)
    route = staticmethod(request.route)
    parse = staticmethod(request.parse)
    count_prompt = staticmethod(request.count_prompt)
    request_slots = staticmethod(request.request_slots)
    span_attributes = staticmethod(request.span_attributes)
    answer_usage = staticmethod(answer.answer_usage)
    answer_text = staticmethod(answer.answer_text)
    answer_slots = staticmethod(answer.answer_slots)
    drop_logprobs = staticmethod(answer.drop_logprobs)

    def stored_references(self, body: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        previous = body.get("previous_response_id")
        found = [(RESPONSE_OBJECT, previous)] if isinstance(previous, str) and previous else []
        return (*found, *file_references(body))

    def unstored(self, body: dict[str, Any]) -> dict[str, Any] | None:
        return None if body.get("store") is False else {**body, "store": False}

    def stored_object(self, raw: bytes) -> str | None:
        return answer.stored_id(raw)

    def token_count_body(self, tokens: int) -> bytes:
        return orjson.dumps({"object": "response.input_tokens", "input_tokens": tokens})

    def with_usage_requested(self, body: dict[str, Any]) -> bytes:
        raise TypeError("a Responses stream always reports its usage: nothing to ask for")

    def stream_relay(self, strip_usage_chunk: bool) -> ResponsesRelay:
        return ResponsesRelay()

    def error_body(self, err: GatewayError) -> bytes:
        return OPENAI.error_body(err)  # OpenAI's error shape


RESPONSES_API = Responses()
