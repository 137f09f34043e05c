"""The texts guards read: a slot is one string inside a parsed body, in any wire format.

A slot is a message's content, a text part, a prompt, an embedding input, a choice's answer
(each format finds its own: WireFormat.request_slots and answer_slots); guards read slots and
write masked or rewritten text back into them, so everything else in the body stays as the
client sent it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Slot:
    container: dict[str, Any] | list[Any]
    key: str | int
    role: str = "user"  # whose words: the conversation a safety model judges keeps the roles

    def get(self) -> str:
        return self.container[self.key]  # type: ignore[index]

    def set(self, value: str) -> None:
        self.container[self.key] = value  # type: ignore[index]


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
