"""Token usage of one request: the provider's report when it gives one (each wire format reads
its own: WireFormat.answer_usage, the stream relays), our own count otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SOURCE_PROVIDER = "provider"
SOURCE_ESTIMATE = "estimate"


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0
    source: str = SOURCE_PROVIDER
    # Of the prompt, what the provider wrote to its prompt cache (Anthropic reports it).
    cache_write_tokens: int = 0
    # Of the completion, the model's reasoning (OpenAI's reasoning_tokens, Gemini's thoughts).
    reasoning_tokens: int = 0

    def as_metadata(self) -> dict[str, Any]:
        out = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cached_tokens": self.cached_tokens,
            "token_source": self.source,
        }
        if self.reasoning_tokens:  # (most answers have none: no key to carry)
            out["reasoning_tokens"] = self.reasoning_tokens
        return out


def estimated(prompt: int, output: int | None, max_output: int | None) -> Usage:
    """The charge of an answer without the provider's usage report, one rule on every path
    (the downstream stage, the stream observer, the access log's reader): the prompt plus the
    output the gateway counted, at most the most the client allowed (`max_output`: its
    `max_completion_tokens` / `max_tokens` times `n`, which the backend was told; None when it
    set none: no cap, so nothing produced goes uncharged). `output` None: the gateway did not
    see the answer (a JSON answer accounted from Envoy's access log): then `max_output` is
    what was reserved (the declared maximum, else `quota.default_max_tokens`), and that is
    charged.
    """
    if output is None:
        output = max_output or 0
    elif max_output is not None:
        output = min(output, max_output)
    return Usage(prompt, output, prompt + output, source=SOURCE_ESTIMATE)
