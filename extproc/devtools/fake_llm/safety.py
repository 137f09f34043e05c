"""Safety models and guards, for testing the gateway's external guards.

Directives in the judged text steer them (case-sensitive, so ordinary text never does):
``[[unsafe]]`` or ``[[unsafe:A,B]]`` (an unsafe verdict, with default or the given
categories), ``[[slow:MS]]`` (answer MS milliseconds late), ``[[rewrite:OLD=>NEW]]`` (webhook
only).

- A chat or legacy completion whose model name contains ``llama-guard`` answers like Llama
  Guard 3: a blank line, then ``safe``, or ``unsafe`` and a line of categories (the given
  ones, or ``S1``).
- One whose model name contains ``nemoguard`` or ``content-safety`` answers like NemoGuard:
  ``{"User Safety": ..., "Response Safety": ..., "Safety Categories": ...}``, rating the user
  part and the ``response: agent:`` part of the prompt's conversation separately (default
  category ``Violence``).
- ``POST /v1/moderations`` answers like OpenAI's moderation API (default category
  ``violence``).
- ``POST /_fake/guard-webhook`` implements the webhook contract of ``extproc.guard.llm``:
  ``[[unsafe]]`` blocks (reason "fake policy"), ``[[rewrite:OLD=>NEW]]`` rewrites every text
  (replacing OLD with NEW, dropping the directive), anything else is allowed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .wire import RequestError

DEFAULT_MODERATION_MODEL = "omni-moderation-latest"
_DIRECTIVE = re.compile(r"\[\[(unsafe|slow|rewrite)(?::(.*?))?\]\]", re.DOTALL)
_REWRITE_DIRECTIVE = re.compile(r"\[\[rewrite:.*?\]\]", re.DOTALL)
_NG_CONVERSATION = re.compile(r"<BEGIN CONVERSATION>(.*?)<END CONVERSATION>", re.DOTALL)
_NG_RESPONSE = "response: agent:"
_MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)


@dataclass(slots=True)
class Directives:
    unsafe: list[str] | None = None  # None: no [[unsafe]]; empty: the default category
    slow_ms: float = 0.0
    rewrites: list[tuple[str, str]] = field(default_factory=list)

    @property
    def delay(self) -> float:
        return self.slow_ms / 1000.0


def directives(texts: Iterable[str]) -> Directives:
    found = Directives()
    for text in texts:
        if "[[" not in text:
            continue
        for match in _DIRECTIVE.finditer(text):
            kind, arg = match.group(1), match.group(2)
            if kind == "unsafe":
                found.unsafe = found.unsafe or []
                found.unsafe.extend(c.strip() for c in (arg or "").split(",") if c.strip())
            elif kind == "slow":
                try:
                    ms = float(arg or "")
                except ValueError:
                    continue
                if math.isfinite(ms) and ms > found.slow_ms:
                    found.slow_ms = ms
            elif arg and "=>" in arg:
                old, _, new = arg.partition("=>")
                found.rewrites.append((old, new))
    return found


def _categories(given: list[str] | None, default: str) -> list[str]:
    return list(dict.fromkeys(given or [default]))


@lru_cache(maxsize=1024)
def safety_kind(model: str) -> str | None:
    name = model.lower()
    if "llama-guard" in name:
        return "llama_guard"
    if "nemoguard" in name or "content-safety" in name:
        return "nemoguard"
    return None


def message_texts(messages: list[Any]) -> list[tuple[str, str]]:
    """(role, text) of every text in already validated chat messages."""
    out: list[tuple[str, str]] = []
    for message in messages:
        role = str(message.get("role"))
        content = message.get("content")
        if isinstance(content, str):
            out.append((role, content))
        elif isinstance(content, list):
            out.extend(
                (role, part["text"])
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return out


def _llama_guard_reply(texts: list[str]) -> tuple[str, float]:
    # The whole prompt is scanned: Llama Guard's own text never holds a directive. The leading
    # blank line is how the served model typically starts (its template ends right at the
    # assistant header), so clients are tested against it.
    found = directives(texts)
    if found.unsafe is None:
        return "\n\nsafe", found.delay
    return "\n\nunsafe\n" + ",".join(_categories(found.unsafe, "S1")), found.delay


def _nemoguard_reply(pairs: list[tuple[str, str]]) -> tuple[str, float]:
    """Rates the user part and the ``response: agent:`` part of a NemoGuard prompt separately;
    without the prompt's markers, user-side messages against assistant ones."""
    user_texts: list[str] = [text for role, text in pairs if role != "assistant"]
    agent_texts: list[str] | None = [text for role, text in pairs if role == "assistant"] or None
    for _, text in pairs:
        if (match := _NG_CONVERSATION.search(text)) is not None:
            user, marker, answer = match.group(1).partition(_NG_RESPONSE)
            user_texts, agent_texts = [user], ([answer] if marker else None)
            break
    user_found = directives(user_texts)
    verdict = {"User Safety": "safe" if user_found.unsafe is None else "unsafe"}
    unsafe = [user_found.unsafe]
    if agent_texts is not None:
        agent_found = directives(agent_texts)
        verdict["Response Safety"] = "safe" if agent_found.unsafe is None else "unsafe"
        unsafe.append(agent_found.unsafe)
    flagged = [c for cats in unsafe if cats is not None for c in cats]
    if any(cats is not None for cats in unsafe):
        verdict["Safety Categories"] = ", ".join(_categories(flagged, "Violence"))
    delay = directives(text for _, text in pairs).delay
    return json.dumps(verdict), delay


def judge(kind: str, pairs: list[tuple[str, str]]) -> tuple[str, float]:
    """A safety model's answer and how long to wait (seconds) before giving it."""
    if kind == "llama_guard":
        return _llama_guard_reply([text for _, text in pairs])
    return _nemoguard_reply(pairs)


def prompt_text(identity: bytes) -> str:
    # wire.parse_inputs' identities: b"s" + UTF-8 text, or b"t" + token ids (no text to judge).
    return identity[1:].decode() if identity[:1] == b"s" else ""


def moderation_result(texts: list[str]) -> dict[str, Any]:
    found = directives(texts)
    flagged = set() if found.unsafe is None else set(_categories(found.unsafe, "violence"))
    names = list(_MODERATION_CATEGORIES) + sorted(flagged - set(_MODERATION_CATEGORIES))
    return {
        "flagged": bool(flagged),
        "categories": {name: name in flagged for name in names},
        "category_scores": {name: 0.97 if name in flagged else 1e-06 for name in names},
        "category_applied_input_types": {name: ["text"] for name in names},
    }


def moderation_inputs(value: Any) -> list[list[str]]:
    """The texts of each result: one per string, or one for a whole multi-modal array."""
    if isinstance(value, str):
        return [[value]]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return [[item] for item in value]
        if all(
            isinstance(item, dict) and item.get("type") in ("text", "image_url") for item in value
        ):
            return [[item["text"] for item in value if isinstance(item.get("text"), str)]]
    raise RequestError(
        "'input' must be a string, an array of strings or an array of multi-modal inputs",
        param="input",
        code="invalid_type",
    )


def webhook_reply(texts: list[str]) -> dict[str, Any]:
    found = directives(texts)
    if found.unsafe is not None:
        categories = _categories(found.unsafe, "violence")
        return {"action": "block", "reason": "fake policy", "categories": categories}
    if found.rewrites:
        rewritten = []
        for text in texts:
            text = _REWRITE_DIRECTIVE.sub("", text)
            for old, new in found.rewrites:
                if old:
                    text = text.replace(old, new)
            rewritten.append(text)
        return {"action": "rewrite", "reason": "fake rewrite", "texts": rewritten}
    return {"action": "allow"}
