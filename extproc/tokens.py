"""Token counting for OpenAI-style requests, used on the request hot path.

Counts use tiktoken when the encoding can be loaded. When it cannot (no network and no
local copy in TIKTOKEN_CACHE_DIR), counts fall back to ceil(utf-8 bytes / 4) and are flagged
``exact=False``; the fallback is announced once per encoding with a logged warning.

Chat counts follow OpenAI's cookbook "How to count tokens with tiktoken": 3 tokens of framing
per message, 1 per ``name``, 3 to prime the reply (4 / -1 for gpt-3.5-turbo-0301).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import tiktoken
import tiktoken.model

__all__ = [
    "ASYNC_THREAD_THRESHOLD_CHARS",
    "IMAGE_TOKENS_ESTIMATE",
    "TokenCount",
    "TokenCounter",
    "estimate_tokens",
]

logger = logging.getLogger("extproc.tokens")

# Above this many characters an encode takes long enough (around a millisecond and up) that
# it is worth a thread hop; tiktoken releases the GIL while encoding, so the loop keeps going.
ASYNC_THREAD_THRESHOLD_CHARS = 64 * 1024

# OpenAI documents 85 tokens as the fixed cost of a low-detail image. High-detail images cost
# more, but that depends on the image's size, which is unknown without fetching it.
IMAGE_TOKENS_ESTIMATE = 85

# Model names come from clients, so the resolution cache must not grow without bound.
_MODEL_CACHE_SIZE = 1024

_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING = 3
# gpt-3.5-turbo-0301 used an older chat format: <|im_start|>{role or name}\n{content}<|im_end|>
_LEGACY_CHAT_MODELS = frozenset({"gpt-3.5-turbo-0301", "gpt-35-turbo-0301"})
_LEGACY_TOKENS_PER_MESSAGE = 4
_LEGACY_TOKENS_PER_NAME = -1


@dataclass(frozen=True, slots=True)
class TokenCount:
    tokens: int
    # False when any part was estimated: encoding unavailable, images, tool definitions,
    # tool calls (rendered by the server in an undocumented format) or unrecognised shapes.
    exact: bool


def estimate_tokens(text: str) -> int:
    """Fallback estimate: ceil(utf-8 bytes / 4)."""
    # surrogatepass: clients can send lone surrogates (JSON "\\ud800"); must not raise.
    return (len(text.encode("utf-8", "surrogatepass")) + 3) // 4


class _Tally:
    """What a request contributes: fixed token counts plus the strings still to encode."""

    __slots__ = ("chars", "exact", "fixed", "texts")

    def __init__(self) -> None:
        self.fixed = 0
        self.texts: list[str] = []
        self.chars = 0
        self.exact = True

    def text(self, value: str) -> None:
        if value:
            self.texts.append(value)
            self.chars += len(value)


class TokenCounter:
    """Counts tokens per model; safe to share between the event loop and worker threads."""

    def __init__(
        self,
        default_encoding: str = "cl100k_base",
        model_encodings: Mapping[str, str] | None = None,
    ) -> None:
        self._default = default_encoding
        self._overrides: dict[str, str] = dict(model_encodings or {})
        # Encoding name -> Encoding, or None once it has failed to load.
        self._encodings: dict[str, tiktoken.Encoding | None] = {}
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()
        self._resolve = functools.lru_cache(maxsize=_MODEL_CACHE_SIZE)(self._resolve_uncached)

    # -- encodings ---------------------------------------------------------------------------

    def encoding_name_for(self, model: str) -> str:
        if not isinstance(model, str):
            return self._default
        override = self._overrides.get(model)
        if override is not None:
            return override
        return self._resolve(model)

    def _resolve_uncached(self, model: str) -> str:
        try:
            return tiktoken.model.encoding_name_for_model(model)
        except KeyError:
            return self._default

    def preload(self, encodings: Iterable[str]) -> dict[str, str | None]:
        """Load encodings now (at start-up) so no request waits for a file or a download."""
        result: dict[str, str | None] = {}
        for name in encodings:
            self._encoding(name)
            result[name] = self._errors.get(name)
        return result

    def _encoding(self, name: str) -> tiktoken.Encoding | None:
        # The dict only ever grows, so the unlocked read is safe.
        if name in self._encodings:
            return self._encodings[name]
        with self._lock:
            # Another thread may have loaded it, or failed and warned, while we waited.
            if name in self._encodings:
                return self._encodings[name]
            try:
                loaded: tiktoken.Encoding | None = tiktoken.get_encoding(name)
            # Any failure (unknown name, no network, unreadable or corrupt file) means the
            # same thing here: count with the estimate rather than fail the request.
            except Exception as exc:
                loaded = None
                reason = f"{type(exc).__name__}: {exc}"
                self._errors[name] = reason
                logger.warning(
                    "tiktoken encoding %r is unavailable (%s); token counts that need it are "
                    "estimates (ceil(utf-8 bytes / 4)). To count exactly, put the encoding file "
                    "in the directory named by TIKTOKEN_CACHE_DIR (currently %s) or allow "
                    "tiktoken to download it.",
                    name,
                    reason,
                    os.environ.get("TIKTOKEN_CACHE_DIR") or "unset",
                )
            self._encodings[name] = loaded
            return loaded

    # -- counting ----------------------------------------------------------------------------

    def _finish(self, encoding_name: str, tally: _Tally) -> TokenCount:
        enc = self._encoding(encoding_name)
        if enc is None:
            n = sum(map(estimate_tokens, tally.texts))
            return TokenCount(tally.fixed + n, False)
        encode = enc.encode
        # disallowed_special=(): "<|endoftext|>" typed by a user is plain text, not an error.
        n = sum(len(encode(t, disallowed_special=())) for t in tally.texts)
        return TokenCount(tally.fixed + n, tally.exact)

    async def _finish_async(self, encoding_name: str, tally: _Tally) -> TokenCount:
        # Off the loop: a first load (file read, maybe a download) or a large encode.
        # The estimate is cheap enough to stay inline whatever the size.
        if encoding_name not in self._encodings or (
            tally.chars > ASYNC_THREAD_THRESHOLD_CHARS
            and self._encodings[encoding_name] is not None
        ):
            return await asyncio.to_thread(self._finish, encoding_name, tally)
        return self._finish(encoding_name, tally)

    def count_text(self, model: str, text: str) -> TokenCount:
        tally = _Tally()
        if isinstance(text, str):
            tally.text(text)
        else:
            tally.exact = False
        return self._finish(self.encoding_name_for(model), tally)

    def count_chat(
        self, model: str, messages: list[Any], tools: list[Any] | None = None
    ) -> TokenCount:
        return self._finish(self.encoding_name_for(model), _chat_tally(model, messages, tools))

    async def count_chat_async(
        self, model: str, messages: list[Any], tools: list[Any] | None = None
    ) -> TokenCount:
        tally = _chat_tally(model, messages, tools)
        return await self._finish_async(self.encoding_name_for(model), tally)

    def count_prompt(self, model: str, prompt: Any) -> TokenCount:
        """Legacy completions ``prompt``: str, list[str], list[int] or list[list[int]]."""
        return self._finish(self.encoding_name_for(model), _prompt_tally(prompt))

    async def count_prompt_async(self, model: str, prompt: Any) -> TokenCount:
        return await self._finish_async(self.encoding_name_for(model), _prompt_tally(prompt))

    def count_embedding_input(self, model: str, input: Any) -> TokenCount:
        """Embeddings ``input``: the same shapes as a completions prompt."""
        return self._finish(self.encoding_name_for(model), _prompt_tally(input))

    async def count_embedding_input_async(self, model: str, input: Any) -> TokenCount:
        return await self._finish_async(self.encoding_name_for(model), _prompt_tally(input))


# -- request walkers: never raise on odd shapes, count what can be counted ---------------------


def _chat_tally(model: str, messages: Any, tools: Any) -> _Tally:
    tally = _Tally()
    if model in _LEGACY_CHAT_MODELS:
        per_message, per_name = _LEGACY_TOKENS_PER_MESSAGE, _LEGACY_TOKENS_PER_NAME
    else:
        per_message, per_name = _TOKENS_PER_MESSAGE, _TOKENS_PER_NAME
    tally.fixed = _REPLY_PRIMING
    if not isinstance(messages, list):
        tally.exact = False
        messages = ()
    for message in messages:
        if not isinstance(message, dict):
            tally.exact = False
            continue
        tally.fixed += per_message
        for key, value in message.items():
            if isinstance(value, str):
                tally.text(value)
                if key == "name":
                    tally.fixed += per_name
            elif value is None:
                continue
            elif key == "content":
                _content_parts(tally, value)
            elif key == "tool_calls":
                tally.exact = False
                if isinstance(value, list):
                    for call in value:
                        if isinstance(call, dict):
                            _function(tally, call.get("function"))
            elif key == "function_call":
                tally.exact = False
                _function(tally, value)
            else:
                tally.exact = False
    if tools:
        tally.exact = False
        try:
            tally.text(orjson.dumps(tools).decode())
        except TypeError:  # orjson.JSONEncodeError: not JSON-shaped; nothing to count
            pass
    return tally


def _content_parts(tally: _Tally, content: Any) -> None:
    if not isinstance(content, list):
        tally.exact = False
        return
    for part in content:
        if isinstance(part, str):
            tally.text(part)
            continue
        if not isinstance(part, dict):
            tally.exact = False
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            tally.text(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            tally.text(part["refusal"])
        elif kind == "image_url":
            tally.fixed += IMAGE_TOKENS_ESTIMATE
            tally.exact = False
        else:
            # Audio, files and unknown parts: no basis for a count; a stray text still counts.
            tally.exact = False
            text = part.get("text")
            if isinstance(text, str):
                tally.text(text)


def _function(tally: _Tally, function: Any) -> None:
    if not isinstance(function, dict):
        return
    for field in ("name", "arguments"):
        value = function.get(field)
        if isinstance(value, str):
            tally.text(value)


def _token_ids(tally: _Tally, ids: list[Any]) -> bool:
    """Count a list of token ids; False if it holds anything but ints."""
    # set(map(type, ...)) runs in C: cheap even for prompts of 100k token ids.
    if set(map(type, ids)) <= {int}:
        tally.fixed += len(ids)
        return True
    return False


def _prompt_tally(prompt: Any) -> _Tally:
    tally = _Tally()
    if isinstance(prompt, str):
        tally.text(prompt)
    elif isinstance(prompt, list):
        if not _token_ids(tally, prompt):
            for item in prompt:
                if isinstance(item, str):
                    tally.text(item)
                elif type(item) is int:
                    tally.fixed += 1
                elif not (isinstance(item, list) and _token_ids(tally, item)):
                    tally.exact = False
    elif prompt is not None:
        tally.exact = False
    return tally
