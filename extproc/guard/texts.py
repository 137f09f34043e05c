"""Where the text is in OpenAI-style bodies: what guards judge, mask and rewrite.

A slot is one string inside a parsed body (a message's content, a text part, a prompt, an
embedding input, a choice's answer); guards read slots and write masked or rewritten text back
into them, so everything else in the body stays as the client sent it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..parsing import Endpoint


@dataclass(frozen=True, slots=True)
class Slot:
    container: dict[str, Any] | list[Any]
    key: str | int
    role: str = "user"  # whose words: the conversation a safety model judges keeps the roles

    def get(self) -> str:
        return self.container[self.key]  # type: ignore[index]

    def set(self, value: str) -> None:
        self.container[self.key] = value  # type: ignore[index]


def request_slots(endpoint: Endpoint, body: dict[str, Any]) -> list[Slot]:
    if endpoint is Endpoint.CHAT:
        return _message_slots(body.get("messages"))
    key = "prompt" if endpoint is Endpoint.COMPLETIONS else "input"
    return _string_or_list(body, key)


def response_slots(endpoint: Endpoint, body: Any) -> list[Slot]:
    """The answer's texts in a non-streamed response (embeddings have none)."""
    if not isinstance(body, dict) or endpoint is Endpoint.EMBEDDINGS:
        return []
    choices = body.get("choices")
    out: list[Slot] = []
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        if endpoint is Endpoint.CHAT:
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


def conversation(slots: list[Slot]) -> list[dict[str, str]]:
    """The slots as chat turns, consecutive texts of one role joined (for safety models)."""
    turns: list[dict[str, str]] = []
    for slot in slots:
        text = slot.get()
        if turns and turns[-1]["role"] == slot.role:
            turns[-1]["content"] += "\n" + text
        else:
            turns.append({"role": slot.role, "content": text})
    return turns


def _message_slots(messages: Any) -> list[Slot]:
    out: list[Slot] = []
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        role = role if role in ("system", "user", "assistant") else "user"
        content = message.get("content")
        if isinstance(content, str):
            out.append(Slot(message, "content", role))
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append(Slot(part, "text", role))
    return out


def _string_or_list(body: dict[str, Any], key: str) -> list[Slot]:
    value = body.get(key)
    if isinstance(value, str):
        return [Slot(body, key)]
    if isinstance(value, list):
        # Lists of token ids carry no text a guard can read.
        return [Slot(value, i) for i, item in enumerate(value) if isinstance(item, str)]
    return []
