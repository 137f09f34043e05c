"""OpenAI's answers, built from what a provider that speaks another API answered
(anthropic.py, bedrock.py, gemini.py read their provider's answer; the shapes they give the
client are made here): the chat completion (`chat_completion`, `choice`, `assistant_message`,
`tool_call`), its usage object, the chunk stream of a streamed one (`Chunks`: delta chunks,
the usage chunk, an error chunk, `[DONE]`), and the embeddings list (`embeddings_list`), in
the encoding the client asked for (`encode`).

A chat message's `content` is None only when it calls tools and says nothing, as OpenAI's;
what a provider returns beyond OpenAI's shape (thinking, reasoning, thoughts) is
`reasoning_content`, the field OpenAI-compatible servers use for it. An embeddings answer has
`usage` (`prompt_tokens` = `total_tokens`) only when the provider reported a count; a 2xx
answer without its vectors raises ValueError (the caller answers 502).
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from ..wire.openai.answer import error_body

if TYPE_CHECKING:
    from ..errors import GatewayError
    from ..usage import Usage

DONE = b"data: [DONE]\n\n"


def completion_id() -> str:
    """An id of OpenAI's shape, for an answer whose provider gave none."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_object(report: Usage, reasoning_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's `usage`; `reasoning_tokens` (of the completion) where the provider reports
    them apart."""
    out: dict[str, Any] = {
        "prompt_tokens": report.prompt_tokens,
        "completion_tokens": report.completion_tokens,
        "total_tokens": report.total_tokens,
        "prompt_tokens_details": {"cached_tokens": report.cached_tokens},
    }
    if reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return out


# -- a chat completion --------------------------------------------------------------------------


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """An OpenAI tool call; `arguments`: its JSON text."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def assistant_message(
    text: Sequence[str], calls: Sequence[dict[str, Any]], reasoning: Sequence[str]
) -> dict[str, Any]:
    """The assistant's message of a choice: its texts, tool calls and reasoning, in order."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(text) if text or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = list(calls)
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    return message


def choice(message: dict[str, Any], finish_reason: str, index: int = 0) -> dict[str, Any]:
    return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": None}


def chat_completion(
    answer_id: str,
    model: str,
    choices: list[dict[str, Any]],
    report: Usage | None,
    reasoning_tokens: int | None = None,
) -> dict[str, Any]:
    """An OpenAI chat completion for the client's `model` name, with `usage` when the provider
    reported it (`report`)."""
    out: dict[str, Any] = {
        "id": answer_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if report is not None:
        out["usage"] = usage_object(report, reasoning_tokens)
    return out


# -- a streamed chat completion -----------------------------------------------------------------


def event(payload: dict[str, Any]) -> bytes:
    """One server-sent event of OpenAI's stream."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class Chunks:
    """The chunks of one streamed chat completion, each with its `id` (set when the provider's
    stream tells it), its creation time and the client's `model` name."""

    def __init__(self, model: str, answer_id: str = "") -> None:
        self.model = model
        self.id = answer_id
        self.created = int(time.time())

    def _chunk(self, **fields: Any) -> bytes:
        return event(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                **fields,
            }
        )

    def delta(self, delta: dict[str, Any], finish: str | None = None, index: int = 0) -> bytes:
        """A chunk of choice `index`: its delta, and its finish reason when it ends."""
        choices = [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]
        return self._chunk(choices=choices)

    def end(self, report: Usage | None, reasoning_tokens: int | None = None) -> bytes:
        """The stream's end: the usage chunk (none without a `report`), then `[DONE]`."""
        if report is None:
            return DONE
        return self._chunk(choices=[], usage=usage_object(report, reasoning_tokens)) + DONE

    @staticmethod
    def error(err: GatewayError) -> bytes:
        """The end of a stream the provider ended with an error: OpenAI's error chunk, then
        `[DONE]`."""
        return b"data: " + error_body(err.message, err.type, err.code) + b"\n\n" + DONE


# -- embeddings ---------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def vector(value: Any) -> list[float]:
    """A provider's vector (a non-empty JSON array of numbers) as floats; ValueError else."""
    if not isinstance(value, list) or not value:
        raise ValueError("an embedding is not a non-empty array")
    out = []
    for x in value:
        if not isinstance(x, int | float) or isinstance(x, bool):
            raise ValueError("an embedding holds something that is not a number")
        out.append(float(x))
    return out


def count(value: Any) -> int | None:
    """A provider's token count (a non-negative integer, or a number that is one: Vertex AI's
    statistics are JSON numbers of a protobuf Value), or None."""
    if _is_int(value) and value >= 0:
        return int(value)
    if isinstance(value, float) and value >= 0 and value.is_integer():
        return int(value)
    return None


def embeddings_list(
    vectors: Sequence[list[float]], model: str, prompt_tokens: int | None
) -> dict[str, Any]:
    """OpenAI's embeddings answer (`object: list`, `data` in input order) for the client's
    `model` name, in floats (see `encode`)."""
    out: dict[str, Any] = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": values}
            for i, values in enumerate(vectors)
        ],
        "model": model,
    }
    if prompt_tokens is not None:
        out["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return out


def encode(openai_answer: dict[str, Any], encoding_format: str | None) -> dict[str, Any]:
    """OpenAI's embeddings answer (float lists, as a translation's `answer` gives it) in the
    client's `encoding_format`: `base64` makes each vector the base64 of its little-endian
    float32 values, as OpenAI's API does (and as OpenAI's SDKs ask by default, and decode);
    anything else (`float`, None) leaves the answer as it is. A vector that float32 cannot
    hold raises ValueError."""
    if encoding_format != "base64":
        return openai_answer
    data = []
    for item in openai_answer.get("data") or ():
        values = item.get("embedding") if isinstance(item, dict) else None
        if isinstance(values, list):
            try:
                packed = struct.pack(f"<{len(values)}f", *values)
            except (struct.error, OverflowError) as exc:
                raise ValueError(f"an embedding cannot be encoded as float32: {exc}") from None
            item = {**item, "embedding": base64.b64encode(packed).decode("ascii")}
        data.append(item)
    return {**openai_answer, "data": data}
