"""Anthropic's wire format: the Messages API (`POST /v1/messages`) and its token count
(`POST /v1/messages/count_tokens`), as the anthropic SDKs and Claude Code speak them.

A backend of type `anthropic` with the model to itself gets the request as it is (thinking,
cache_control, betas and all) and its answer goes back as it is, read on the way. Every other
backend gets it as chat completions (chat_bridge.py), and its answer is translated back; a
provider of another API gets that chat request in its own API, as an OpenAI client's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from ..base import Stateless
from . import answer, request
from .chat_bridge import BRIDGE
from .guarded_stream import AnthropicGuardedRelay
from .request import COUNT_TOKENS, MESSAGES
from .stream import MessagesRelay

if TYPE_CHECKING:
    from ..base import ChatBridge, GuardedRelay

__all__ = ["ANTHROPIC", "COUNT_TOKENS", "MESSAGES", "Anthropic"]


class Anthropic(Stateless):
    """WireFormat (extproc/wire/base.py) for Anthropic's Messages API."""

    name = "anthropic"
    bridge: ChatBridge | None = BRIDGE
    own_header_prefix = "anthropic-"
    own_guarded_relay: GuardedRelay | None = AnthropicGuardedRelay
    owns = staticmethod(request.owns)
    route = staticmethod(request.route)
    parse = staticmethod(request.parse)
    count_prompt = staticmethod(request.count_prompt)
    request_slots = staticmethod(request.request_slots)
    span_attributes = staticmethod(request.span_attributes)
    answer_usage = staticmethod(answer.answer_usage)
    answer_text = staticmethod(answer.answer_text)
    answer_slots = staticmethod(answer.answer_slots)
    error_body = staticmethod(answer.error_body)

    def token_count_body(self, tokens: int) -> bytes:
        return orjson.dumps({"input_tokens": tokens})

    def with_usage_requested(self, body: dict[str, Any]) -> bytes:
        raise TypeError("a Messages stream always reports its usage: nothing to ask for")

    def drop_logprobs(self, answer_: Any) -> bool:
        return False  # Messages answers carry no log-probabilities

    def stream_relay(self, strip_usage_chunk: bool) -> MessagesRelay:
        return MessagesRelay()


ANTHROPIC = Anthropic()
