"""What every guard speaks: spans of text it found, and verdicts on a request or a response.

Nothing here holds raw user text beyond the call that produced it: a Verdict's `reason` and
`categories` are written to logs and the audit trail, so they name what was found (a category,
an entity kind, a pattern's index), never the text itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Action = Literal["allow", "block", "rewrite"]


@dataclass(frozen=True, slots=True)
class Span:
    """Characters [start, end) of a text that a detector matched, and what they are."""

    start: int
    end: int
    kind: str  # e.g. "email", "credit_card", "secret", or a deny pattern's label


@dataclass(frozen=True, slots=True)
class SafetyReply:
    """A safety model's or moderation API's answer, parsed."""

    safe: bool
    categories: tuple[str, ...] = ()  # as the model names them: "S1", "Violence", "hate", ...


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    guard: str  # the guard's configured name; the error code of a block is "guard_blocked:<guard>"
    reason: str = ""  # safe to log: never the raw text
    categories: tuple[str, ...] = ()
    # For "rewrite": the replacement texts, one per text the guard was given, in order.
    texts: tuple[str, ...] | None = None
    counts: dict[str, int] = field(default_factory=dict)  # e.g. {"email": 2} for masks
    # The guard could not be asked (GuardUnavailable): its on_error policy gave the action.
    unavailable: bool = False


class GuardUnavailable(Exception):
    """An external guard did not answer in time or answered nonsense; the guard's
    `on_error` policy decides (fail closed: block; fail open: allow)."""
