"""OpenAI answers: the usage report, the text produced, where guards find it, the error shape."""

from __future__ import annotations

from typing import Any

import orjson

from ...guard.texts import Slot
from ...usage import Usage
from ..base import Endpoint
from .request import CHAT, EMBEDDINGS


def count_of(value: Any) -> int | None:
    """A token or request count as a usage report gives it: an int, not negative."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


# A usage object's spellings: chat completions' (prompt/completion) and the input/output one
# of the Responses API, the images' and audio endpoints' and a batch's.
_CHAT_KEYS = ("prompt_tokens", "completion_tokens", "prompt_tokens_details",
              "completion_tokens_details")  # fmt: skip
_IO_KEYS = ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")


def usage(obj: Any) -> Usage | None:
    """The `usage` object of a response or a stream chunk, if it is well formed."""
    if not isinstance(obj, dict):
        return None
    read = _read(obj, _CHAT_KEYS)
    # (The images and audio endpoints report input and output tokens, as Responses does.)
    return read if read is not None else io_usage(obj)


def io_usage(obj: Any) -> Usage | None:
    """A usage object of input and output tokens (the Responses API's, the images' and audio
    endpoints', a batch's): cached input among the input, reasoning among the output."""
    if not isinstance(obj, dict):
        return None
    read = _read(obj, _IO_KEYS)
    if read is None:
        # A rerank answer (vLLM's, Jina's, Cohere-compatible servers') reports only its total:
        # the query and documents it read, all input.
        total = count_of(obj.get("total_tokens"))
        return Usage(total, 0, total) if total is not None and len(obj) == 1 else None
    return read


def _read(obj: dict[str, Any], keys: tuple[str, str, str, str]) -> Usage | None:
    input_key, output_key, input_details, output_details = keys
    prompt = count_of(obj.get(input_key))
    if prompt is None:
        return None
    completion = count_of(obj.get(output_key)) or 0
    total = count_of(obj.get("total_tokens"))
    details = obj.get(input_details)
    cached = count_of(details.get("cached_tokens")) if isinstance(details, dict) else None
    out = obj.get(output_details)
    reasoning = count_of(out.get("reasoning_tokens")) if isinstance(out, dict) else None
    return Usage(
        prompt,
        completion,
        total if total is not None else prompt + completion,
        cached or 0,
        reasoning_tokens=reasoning or 0,
    )


def answer_usage(response: Any) -> Usage | None:
    return usage(response.get("usage") if isinstance(response, dict) else None)


def answer_text(response: Any) -> str:
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


def answer_slots(endpoint: Endpoint, body: Any) -> list[Slot]:
    """The answer's texts in a non-streamed response (embeddings have none)."""
    if not isinstance(body, dict) or endpoint is EMBEDDINGS:
        return []
    choices = body.get("choices")
    out: list[Slot] = []
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        if endpoint is CHAT:
            message = choice.get("message")
            if isinstance(message, dict):
                out += _answer_slots(message)
        elif isinstance(choice.get("text"), str):
            out.append(Slot(choice, "text", "assistant"))
    return out


def _answer_slots(message: dict[str, Any]) -> list[Slot]:
    """Every text of an assistant message: content (a string or text parts), a refusal,
    reasoning, tool-call arguments."""
    out: list[Slot] = []
    content = message.get("content")
    if isinstance(content, str):
        out.append(Slot(message, "content", "assistant"))
    elif isinstance(content, list):
        out += [
            Slot(part, "text", "assistant")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
    for key in ("refusal", "reasoning_content"):
        if isinstance(message.get(key), str):
            out.append(Slot(message, key, "assistant"))
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            out.append(Slot(function, "arguments", "assistant"))
    return out


def drop_logprobs(body: Any) -> bool:
    """Remove token log-probabilities from an answer: they repeat its text token by token,
    around any mask. True when there were some."""
    dropped = False
    choices = body.get("choices") if isinstance(body, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict) and choice.get("logprobs") is not None:
            choice["logprobs"] = None
            dropped = True
    return dropped


def error_object(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape: the sidecar's refusals and Envoy's own (envoy_config) alike."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    return orjson.dumps(error_object(message, type_, code, param))
