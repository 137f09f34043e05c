"""OpenAI's wire format: Chat Completions, Completions, Embeddings and the model list, as the
OpenAI API and the servers that copy it (vLLM, Azure OpenAI, ...) speak them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..base import Stateless
from . import request
from .answer import answer_slots, answer_text, answer_usage, drop_logprobs, error_body
from .guarded_stream import GuardedStreamRelay
from .request import CHAT, COMPLETIONS, EMBEDDINGS, MODEL, MODELS
from .stream import StreamRelay

if TYPE_CHECKING:
    from ...errors import GatewayError
    from ...guard.pipeline import CompiledGuard
    from ...guard.types import Span
    from ..base import ChatBridge, Endpoint, GuardedRelay

__all__ = ["CHAT", "COMPLETIONS", "EMBEDDINGS", "MODEL", "MODELS", "OPENAI", "OpenAI"]


class OpenAI(Stateless):
    """WireFormat (extproc/wire/base.py) for OpenAI's API."""

    name = "openai"
    bridge: ChatBridge | None = None
    own_header_prefix = ""
    own_guarded_relay: GuardedRelay | None = None
    owns = staticmethod(request.owns)
    route = staticmethod(request.route)
    parse = staticmethod(request.parse)
    count_prompt = staticmethod(request.count_prompt)
    request_slots = staticmethod(request.request_slots)
    span_attributes = staticmethod(request.span_attributes)
    with_usage_requested = staticmethod(request.with_usage_requested)
    answer_usage = staticmethod(answer_usage)
    answer_text = staticmethod(answer_text)
    answer_slots = staticmethod(answer_slots)
    drop_logprobs = staticmethod(drop_logprobs)

    def token_count_body(self, tokens: int) -> bytes:
        raise TypeError("OpenAI's chat completions API has no token count endpoint")

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
