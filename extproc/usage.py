"""Token usage of one request: the provider's report when it gives one, our own count otherwise."""

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

    def as_metadata(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cached_tokens": self.cached_tokens,
            "token_source": self.source,
        }


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


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def from_openai(obj: Any) -> Usage | None:
    """The `usage` object of an OpenAI-style response or chunk, if it is well formed."""
    if not isinstance(obj, dict):
        return None
    prompt = _int(obj.get("prompt_tokens"))
    if prompt is None:
        return None
    completion = _int(obj.get("completion_tokens")) or 0
    total = _int(obj.get("total_tokens"))
    details = obj.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
    return Usage(
        prompt, completion, total if total is not None else prompt + completion, cached or 0
    )


def completion_text(response: Any) -> str:
    """Text the model produced in a non-streamed response, for our own count."""
    choices = response.get("choices") if isinstance(response, dict) else None
    parts: list[str] = []
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict):
            if isinstance(message.get("content"), str):
                parts.append(message["content"])
            calls = message.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    parts.extend(
                        v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str)
                    )
        elif isinstance(choice.get("text"), str):
            parts.append(choice["text"])
    return "".join(parts)
