from __future__ import annotations

import asyncio
import logging
import os
import random
import string
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc import tokens
from extproc.config import ConfigError, build_runtime, parse_config
from extproc.server import build_runtime_parts
from extproc.telemetry import metrics
from extproc.tokens import (
    ASYNC_THREAD_THRESHOLD_CHARS,
    COUNT_THREADS,
    IMAGE_TOKENS_ESTIMATE,
    PIECE_CHARS,
    TokenCount,
    TokenCounter,
    estimate_tokens,
)

# tiktoken reads this when an encoding is first loaded (in the fixture), not at import.
# The Makefile exports it; the fallback lets `pytest` run on its own without a network.
os.environ.setdefault(
    "TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "tiktoken")
)

# From OpenAI's cookbook "How to count tokens with tiktoken".
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates "
        "corporate jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on "
        "opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the "
        "client deliverable.",
    },
]

# Large enough to take the thread path; sentences rather than one repeated character,
# which is a slow case for BPE.
BIG_TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ 你好。\n" * (
    ASYNC_THREAD_THRESHOLD_CHARS // 50
)
assert len(BIG_TEXT) > ASYNC_THREAD_THRESHOLD_CHARS


REPO = Path(__file__).resolve().parents[1]
# Long ordinary texts: the project's own code, and prose (its documentation).
CODE = "\n".join(p.read_text() for p in sorted((REPO / "extproc").rglob("*.py")))
PROSE = "\n\n".join(
    path.read_text()
    for path in (
        REPO / "README.md",
        REPO / "benchmarks" / "README.md",
        REPO / "envoy" / "README.md",
    )
)
assert len(CODE) > 4 * ASYNC_THREAD_THRESHOLD_CHARS and len(PROSE) > ASYNC_THREAD_THRESHOLD_CHARS


def estimates(reason: str) -> float:
    return metrics.TOKEN_COUNT_ESTIMATES.labels(reason)._value.get()


def off_loop_counts() -> float:
    """How many counts went to the tokenizer threads (observations of the histogram)."""
    return sum(bucket.get() for bucket in metrics.TOKEN_COUNT_SECONDS._buckets)


def wait_idle() -> None:
    """Until the tokenizer threads have nothing queued or running (a hang fails the test)."""
    deadline = time.monotonic() + 30
    while tokens._scheduler().snapshot() != ({}, 0):
        assert time.monotonic() < deadline, tokens._scheduler().snapshot()
        time.sleep(0.005)


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    c = TokenCounter()
    assert c.preload(["cl100k_base", "o200k_base"]) == {"cl100k_base": None, "o200k_base": None}
    return c


@pytest.fixture
def to_thread_calls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    calls: list[object] = []
    real = asyncio.to_thread

    async def spy(func, /, *args, **kwargs):
        calls.append(func)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    return calls


# -- known counts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-3.5-turbo", 129),
        ("gpt-4", 129),
        ("gpt-4-0613", 129),
        ("gpt-4o", 124),
        ("gpt-4o-mini", 124),
        ("gpt-3.5-turbo-0301", 127),
    ],
)
def test_cookbook_chat_counts(counter: TokenCounter, model: str, expected: int) -> None:
    assert counter.count_chat(model, COOKBOOK_MESSAGES) == TokenCount(expected, True)
    assert asyncio.run(counter.count_chat_async(model, COOKBOOK_MESSAGES)) == TokenCount(
        expected, True
    )


def test_known_text_counts(counter: TokenCounter) -> None:
    assert counter.count_text("gpt-4", "tiktoken is great!") == TokenCount(6, True)
    assert counter.count_text("gpt-4o", "tiktoken is great!") == TokenCount(6, True)
    assert counter.count_text("gpt-4", "") == TokenCount(0, True)


def test_prompt_shapes(counter: TokenCounter) -> None:
    assert counter.count_prompt("gpt-3.5-turbo", "tiktoken is great!") == TokenCount(6, True)
    assert counter.count_prompt("gpt-3.5-turbo", ["tiktoken is great!", "hello"]) == TokenCount(
        7, True
    )
    assert counter.count_prompt("gpt-3.5-turbo", [1, 2, 3]) == TokenCount(3, True)
    assert counter.count_prompt("gpt-3.5-turbo", [[1, 2], [3, 4, 5]]) == TokenCount(5, True)
    assert counter.count_prompt("gpt-3.5-turbo", []) == TokenCount(0, True)
    assert counter.count_embedding_input("text-embedding-3-small", [[1, 2], "hello"]) == (
        TokenCount(3, True)
    )


def test_odd_prompt_shapes_do_not_raise(counter: TokenCounter) -> None:
    assert counter.count_prompt("gpt-4", [1, None, "hello", [1, "x"], {"a": 1}]) == TokenCount(
        2, False
    )
    assert counter.count_prompt("gpt-4", {"not": "a prompt"}) == TokenCount(0, False)
    assert counter.count_embedding_input("gpt-4", 42) == TokenCount(0, False)
    assert counter.count_prompt("gpt-4", [True, 1]) == TokenCount(1, False)


# -- chat shapes -------------------------------------------------------------------------------


def test_chat_content_parts(counter: TokenCounter) -> None:
    plain = counter.count_chat("gpt-4o", [{"role": "user", "content": "tiktoken is great!"}])
    parts = counter.count_chat(
        "gpt-4o",
        [{"role": "user", "content": [{"type": "text", "text": "tiktoken is great!"}]}],
    )
    assert plain == parts == TokenCount(3 + 1 + 6 + 3, True)

    with_image = counter.count_chat(
        "gpt-4o",
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "tiktoken is great!"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                ],
            }
        ],
    )
    assert with_image == TokenCount(plain.tokens + IMAGE_TOKENS_ESTIMATE, False)


def test_chat_none_content_and_tool_calls(counter: TokenCounter) -> None:
    enc = counter._encoding("o200k_base")
    assert enc is not None
    messages = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    expected = (
        3 * 2
        + 3
        + sum(
            len(enc.encode(s))
            for s in ("assistant", "get_weather", '{"city":"Paris"}', "tool", "call_1", "sunny")
        )
    )
    assert counter.count_chat("gpt-4o", messages) == TokenCount(expected, False)


def test_chat_tools_add_an_estimate(counter: TokenCounter) -> None:
    messages = [{"role": "user", "content": "hi"}]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    base = counter.count_chat("gpt-4o", messages)
    with_tools = counter.count_chat("gpt-4o", messages, tools)
    assert base.exact
    assert not with_tools.exact
    assert with_tools.tokens > base.tokens + 10
    assert counter.count_chat("gpt-4o", messages, []) == base


@pytest.mark.parametrize(
    "messages",
    [
        None,
        "hello",
        [None, 1, "x"],
        [{"role": 5, "content": {"weird": True}, "name": ["x"]}],
        [{"role": "user", "content": [None, 3, {"type": "input_audio"}, {"text": "x"}]}],
        [{"role": "assistant", "tool_calls": "nope", "function_call": 3}],
        [{"role": "assistant", "tool_calls": [None, {"function": None}, {"function": {}}]}],
    ],
)
def test_chat_malformed_does_not_raise(counter: TokenCounter, messages: object) -> None:
    result = counter.count_chat("gpt-4o", messages, tools=[{1, 2}])  # type: ignore[arg-type]
    assert result.tokens >= 3
    assert not result.exact


# -- encoding choice ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4o-2024-08-06", "o200k_base"),
        ("gpt-4.1", "o200k_base"),
        ("gpt-4.1-mini", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("llama-3-70b", "cl100k_base"),
        ("", "cl100k_base"),
    ],
)
def test_encoding_choice(model: str, encoding: str) -> None:
    assert TokenCounter().encoding_name_for(model) == encoding


def test_default_and_override() -> None:
    c = TokenCounter(default_encoding="o200k_base", model_encodings={"gpt-4": "o200k_base"})
    assert c.encoding_name_for("llama-3-70b") == "o200k_base"
    assert c.encoding_name_for("gpt-4") == "o200k_base"
    assert c.encoding_name_for("gpt-4-0613") == "cl100k_base"
    c = TokenCounter(model_encodings={"gpt-4o": "cl100k_base"})
    assert c.encoding_name_for("gpt-4o") == "cl100k_base"


def test_model_cache_is_bounded() -> None:
    c = TokenCounter()
    for i in range(tokens._MODEL_CACHE_SIZE + 500):
        assert c.encoding_name_for(f"gpt-4o-user-{i}") == "o200k_base"
        assert c.encoding_name_for(f"unknown-{i}") == "cl100k_base"
    assert c._resolve.cache_info().currsize <= tokens._MODEL_CACHE_SIZE


# -- fallback ----------------------------------------------------------------------------------


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "extproc.tokens" and r.levelno == logging.WARNING
    ]


def test_unavailable_default_encoding_estimates_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="extproc.tokens")
    c = TokenCounter(default_encoding="no_such_encoding")
    unavailable = estimates("unavailable")
    text = "tiktoken is great! ✓"  # 22 utf-8 bytes
    assert c.count_text("some-local-model", text) == TokenCount(6, False)
    assert c.count_prompt("some-local-model", [text, [1, 2]]) == TokenCount(8, False)
    assert c.count_chat("some-local-model", [{"role": "user", "content": "abcd"}]) == (
        TokenCount(3 + 1 + 1 + 3, False)
    )
    assert asyncio.run(c.count_embedding_input_async("some-local-model", BIG_TEXT)) == (
        TokenCount(estimate_tokens(BIG_TEXT), False)
    )
    # Models that tiktoken maps elsewhere still count exactly.
    assert c.count_text("gpt-4", "tiktoken is great!") == TokenCount(6, True)
    assert estimates("unavailable") == unavailable + 4

    records = _warnings(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert "no_such_encoding" in message
    assert "TIKTOKEN_CACHE_DIR" in message
    assert "Unknown encoding" in message  # the reason


def test_preload_reports_failure_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="extproc.tokens")
    c = TokenCounter(model_encodings={"my-model": "bogus_base"})
    result = c.preload(["bogus_base", "cl100k_base"])
    assert result["cl100k_base"] is None
    assert isinstance(result["bogus_base"], str) and "bogus_base" in result["bogus_base"]
    assert c.preload(["bogus_base"]) == {"bogus_base": result["bogus_base"]}
    for _ in range(3):
        assert c.count_text("my-model", "abcdefgh") == TokenCount(2, False)
    assert len(_warnings(caplog)) == 1


def test_estimate_tokens() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("a") == 1
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2
    assert estimate_tokens("é") == 1  # 2 bytes
    assert estimate_tokens("\ud800") == 1  # a lone surrogate must not raise


# -- special tokens and arbitrary text ---------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-4", "gpt-4o"])
def test_special_tokens_are_plain_text(counter: TokenCounter, model: str) -> None:
    text = "hello <|endoftext|> <|fim_prefix|><|im_start|>"
    result = counter.count_text(model, text)
    assert result.exact
    assert result.tokens > 3  # encoded as ordinary text, not as single special tokens
    chat = counter.count_chat(model, [{"role": "user", "content": "<|endoftext|>"}])
    assert chat.exact and chat.tokens > 3 + 1 + 1 + 3


def test_lone_surrogates_do_not_raise(counter: TokenCounter) -> None:
    assert counter.count_text("gpt-4o", "a\ud800b").tokens > 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(st.characters(codec=None, exclude_categories=())))
def test_count_text_never_raises(counter: TokenCounter, text: str) -> None:
    for model in ("gpt-4", "gpt-4o"):
        result = counter.count_text(model, text)
        assert result.tokens >= 0
        assert result.exact
        assert result.tokens <= len(text.encode("utf-8", "surrogatepass"))
    assert estimate_tokens(text) >= 0


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"])},
    optional={
        "content": st.none() | st.text() | _json,
        "name": st.text(max_size=10),
        "tool_call_id": st.text(max_size=10),
        "tool_calls": _json,
    },
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(_message | _json, max_size=4), prompt=_json)
def test_async_matches_sync_small(counter: TokenCounter, messages: list, prompt: object) -> None:
    for model in ("gpt-4o", "gpt-3.5-turbo-0301"):
        sync = counter.count_chat(model, messages)
        assert sync.tokens >= 0
        assert asyncio.run(counter.count_chat_async(model, messages)) == sync
    assert asyncio.run(counter.count_prompt_async("gpt-4", prompt)) == counter.count_prompt(
        "gpt-4", prompt
    )


def test_async_matches_sync_large_via_the_threads(
    counter: TokenCounter, to_thread_calls: list[object]
) -> None:
    messages = [{"role": "user", "content": BIG_TEXT}]
    sync_chat = counter.count_chat("gpt-4o", messages)
    sync_prompt = counter.count_prompt("gpt-4", [BIG_TEXT])
    sync_embed = counter.count_embedding_input("gpt-4", BIG_TEXT)
    assert sync_chat.exact and sync_chat.tokens > ASYNC_THREAD_THRESHOLD_CHARS // 10

    before = off_loop_counts()
    big = 10.0  # no budget runs out here
    assert asyncio.run(counter.count_chat_async("gpt-4o", messages, budget=big)) == sync_chat
    assert asyncio.run(counter.count_prompt_async("gpt-4", [BIG_TEXT], budget=big)) == sync_prompt
    embed = asyncio.run(counter.count_embedding_input_async("gpt-4", BIG_TEXT, team="t"))
    assert embed == sync_embed
    # Counted on the tokenizer threads, in pieces; no thread per request.
    assert off_loop_counts() == before + 3
    assert to_thread_calls == []
    assert sync_embed == TokenCount(len(counter._encoding("cl100k_base").encode(BIG_TEXT)), True)


def test_async_small_input_stays_inline(
    counter: TokenCounter, to_thread_calls: list[object]
) -> None:
    before = off_loop_counts()
    result = asyncio.run(counter.count_chat_async("gpt-4o", COOKBOOK_MESSAGES))
    assert result == TokenCount(124, True)
    assert to_thread_calls == []
    assert off_loop_counts() == before


# -- long texts: pieces, failures, budget, fairness ---------------------------------------------


def safe_pieces(text: str) -> tuple[list[str], int]:
    """`text` cut where the counter cuts it safely (hard cuts left out), and how many cuts."""
    pieces, start, piece_start = [], 0, 0
    while start < len(text):
        end, safe = tokens._next_cut(text, start)
        if safe and end < len(text):
            pieces.append(text[piece_start:end])
            piece_start = end
        start = end
    pieces.append(text[piece_start:])
    return pieces, len(pieces) - 1


def piece_count(text: str) -> int:
    count, start = 0, 0
    while start < len(text):
        start, _ = tokens._next_cut(text, start)
        count += 1
    return count


@pytest.mark.parametrize("piece_chars", [64, PIECE_CHARS])
@pytest.mark.parametrize("model", ["gpt-4", "gpt-4o"])
def test_safe_cuts_keep_every_token(
    counter: TokenCounter, monkeypatch: pytest.MonkeyPatch, model: str, piece_chars: int
) -> None:
    monkeypatch.setattr(tokens, "PIECE_CHARS", piece_chars)
    enc = counter._encoding(counter.encoding_name_for(model))
    assert enc is not None
    for text in (CODE, PROSE):
        pieces, cuts = safe_pieces(text)
        assert cuts >= len(text) // piece_chars // 2
        whole = enc.encode(text, disallowed_special=())
        assert [t for p in pieces for t in enc.encode(p, disallowed_special=())] == whole


_CHARS = st.sampled_from(
    [" ", " ", "  ", "\t", "\n", "\r\n", "\xa0", "\u3000", "\x1c", "a", "Zb", "é", "你", "7",
     "42", ".", "!?", "'s", "'LL", "<|endoftext|>", "🙂", "\ud800", "the", "The"]
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(_CHARS, max_size=60), piece_chars=st.integers(2, 12))
def test_safe_cuts_keep_every_token_fuzz(
    counter: TokenCounter, parts: list[str], piece_chars: int
) -> None:
    text = "".join(parts)
    with mock.patch.object(tokens, "PIECE_CHARS", piece_chars):
        pieces, _ = safe_pieces(text)
    for name in ("cl100k_base", "o200k_base"):
        enc = counter._encoding(name)
        assert enc is not None
        whole = enc.encode(text, disallowed_special=())
        assert [t for p in pieces for t in enc.encode(p, disallowed_special=())] == whole


@pytest.mark.parametrize("model", ["gpt-4", "gpt-4o"])
def test_long_prose_and_code_count_as_the_whole_text(counter: TokenCounter, model: str) -> None:
    enc = counter._encoding(counter.encoding_name_for(model))
    assert enc is not None
    for text in (CODE, PROSE):
        expected = TokenCount(len(enc.encode(text, disallowed_special=())), True)
        assert counter.count_text(model, text, budget=30) == expected
        result = asyncio.run(counter.count_prompt_async(model, text, team="t", budget=30))
        assert result == expected


WHITESPACE = {
    "1M spaces": " " * 1_000_000,
    "1M tabs": "\t" * 1_000_000,
    "1M mixed": (" \t\n  \r\n\t \u3000" * 100_000)[:1_000_000],
    "1M spaces between words": "x" + " " * 1_000_000 + "y",
}


@pytest.mark.parametrize(
    ("name", "model"), list(zip(WHITESPACE, ["gpt-4o", "gpt-4", "gpt-4o", "gpt-4"], strict=True))
)
def test_whitespace_runs_never_fail(counter: TokenCounter, name: str, model: str) -> None:
    # tiktoken's regex gives up on about a million whitespace characters followed by a
    # non-space ("Max stack size exceeded for backtracking"): the pieces are far shorter.
    text = WHITESPACE[name]
    hard_cuts = estimates("hard_cut")
    result = asyncio.run(
        counter.count_chat_async(model, [{"role": "user", "content": text}], team="t")
    )
    assert not result.exact  # cut inside the run
    assert 3 + 1 + 1 + 3 < result.tokens <= 3 + 1 + 1 + 3 + len(text.encode())
    assert estimates("hard_cut") == hard_cuts + 1
    sync = counter.count_text(model, text)  # bounded by the sync budget, estimated past it
    assert not sync.exact
    assert 0 < sync.tokens <= len(text.encode())
    wait_idle()


def test_a_huge_word_is_bounded_and_marked_inexact(counter: TokenCounter) -> None:
    # BPE on one 4 MB piece takes seconds; in pieces it stops at the budget.
    word = "".join(random.Random(7).choices(string.ascii_lowercase, k=4_100_000))
    before = estimates("hard_cut") + estimates("budget")
    messages = [{"role": "user", "content": word}]
    result = asyncio.run(counter.count_chat_async("gpt-4o", messages, team="t", budget=0.05))
    assert not result.exact
    assert len(word) // 8 < result.tokens < len(word)
    assert estimates("hard_cut") + estimates("budget") > before
    sync = counter.count_text("gpt-4o", word, budget=0.05)
    assert not sync.exact
    assert len(word) // 8 < sync.tokens < len(word)
    wait_idle()


def test_an_exhausted_budget_estimates_what_is_left(counter: TokenCounter) -> None:
    before = estimates("budget")
    exact = counter.count_prompt("gpt-4", BIG_TEXT)
    assert exact.exact
    # Nothing may be counted: all of it is the estimate.
    assert counter.count_prompt("gpt-4", BIG_TEXT, budget=0) == TokenCount(
        estimate_tokens(BIG_TEXT), False
    )
    assert estimates("budget") == before + 1
    # Off the loop, what the threads counted before the budget ran out is kept. A text the
    # threads cannot count before the loop's next turn (BIG_TEXT alone, ~3 ms of counting,
    # sometimes was, when the loop waited that long for the GIL).
    big = BIG_TEXT * 32
    result = asyncio.run(counter.count_prompt_async("gpt-4", big, team="t", budget=0))
    assert not result.exact
    low, high = sorted((exact.tokens * 32, estimate_tokens(big)))
    assert low - 10 <= result.tokens <= high + 10
    assert estimates("budget") == before + 2
    wait_idle()


class FailingEncoding:
    """tiktoken failing on any text that holds "boom", as its regex does on some inputs."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def encode(self, text: str, disallowed_special: Any = ()) -> list[int]:
        if "boom" in text:
            raise ValueError("Regex error while tokenizing: Max stack size exceeded")
        return self.real.encode(text, disallowed_special=disallowed_special)


def test_a_piece_tiktoken_fails_on_is_estimated(counter: TokenCounter) -> None:
    real = counter._encoding("cl100k_base")
    c = TokenCounter()
    c._encodings["cl100k_base"] = FailingEncoding(real)  # type: ignore[assignment]
    before = estimates("tokenizer_error")
    # Short texts (encoded whole, inline): only the failing text is estimated.
    result = c.count_chat("gpt-4", [{"role": "user", "content": "boom, boom"}])
    # 3 for the message, 3 to prime the reply, 1 for "user", the estimate of the content.
    assert result == TokenCount(3 + 3 + 1 + estimate_tokens("boom, boom"), False)
    assert estimates("tokenizer_error") == before + 1
    # Long ones: only the failing piece is estimated.
    text = "hello world " * 2_000 + "boom" + " hello world" * 8_000
    whole = len(real.encode(text))
    for count in (
        c.count_text("gpt-4", text, budget=30),
        asyncio.run(c.count_prompt_async("gpt-4", text, team="t", budget=30)),
    ):
        assert not count.exact
        assert abs(count.tokens - whole) <= PIECE_CHARS // 4
    assert estimates("tokenizer_error") == before + 3
    wait_idle()


class SlowEncoding:
    """A millisecond a piece (asleep: no CPU), and a log of the pieces in the order taken."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.pieces: list[str] = []
        self.started = threading.Event()  # set once three pieces were taken
        self._lock = threading.Lock()

    def encode(self, text: str, disallowed_special: Any = ()) -> list[int]:
        with self._lock:
            self.pieces.append(text)
            if len(self.pieces) >= 3:
                self.started.set()
        time.sleep(0.001)
        return self.real.encode(text, disallowed_special=disallowed_special)


@pytest.fixture
def slow(
    counter: TokenCounter, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TokenCounter, SlowEncoding]]:
    # Many small pieces: the scheduler's order shows without spending CPU on tokenizing.
    monkeypatch.setattr(tokens, "PIECE_CHARS", 64)
    monkeypatch.setattr(tokens, "ASYNC_THREAD_THRESHOLD_CHARS", 256)
    c = TokenCounter()
    enc = SlowEncoding(counter._encoding("cl100k_base"))
    c._encodings["cl100k_base"] = enc  # type: ignore[assignment]
    yield c, enc
    wait_idle()


A_TEXT = "alpha " * 2_000  # ~250 pieces of 64 characters at most
B_TEXT = "bravo " * 60  # ~8 pieces


def test_cancelled_count_drops_its_queued_pieces(slow: tuple[TokenCounter, SlowEncoding]) -> None:
    counter, enc = slow
    total = piece_count(A_TEXT)

    async def main() -> dict[str, int]:
        task = asyncio.create_task(counter.count_prompt_async("gpt-4", A_TEXT, team="a", budget=60))
        assert await asyncio.to_thread(enc.started.wait, 30)
        task.cancel()  # what grpc.aio does to the stream of a request Envoy gave up on
        with pytest.raises(asyncio.CancelledError):
            await task
        queued, _ = tokens._scheduler().snapshot()
        return queued

    assert asyncio.run(main()) == {}  # nothing of team a is queued any more
    wait_idle()
    taken = len(enc.pieces)
    assert taken < total // 2
    time.sleep(0.01)
    assert len(enc.pieces) == taken  # and nothing more is encoded


def test_teams_are_served_round_robin(slow: tuple[TokenCounter, SlowEncoding]) -> None:
    counter, enc = slow
    backlog = 4 * piece_count(A_TEXT)

    async def main() -> tuple[TokenCount, int, list[str]]:
        a_tasks = [
            asyncio.create_task(counter.count_prompt_async("gpt-4", A_TEXT, team="a", budget=60))
            for _ in range(4)
        ]
        assert await asyncio.to_thread(enc.started.wait, 30)
        b = await counter.count_prompt_async("gpt-4", B_TEXT, team="b", budget=60)
        a_done = sum(t.done() for t in a_tasks)
        log = list(enc.pieces)
        for t in a_tasks:
            t.cancel()
        await asyncio.gather(*a_tasks, return_exceptions=True)
        return b, a_done, log

    b, a_done, log = asyncio.run(main())
    assert b == TokenCount(len(enc.real.encode(B_TEXT)), True)
    # Team b's prompt was done while team a's backlog had hardly started...
    assert a_done == 0
    assert len(log) < backlog // 4
    # ...because every other piece handed out was b's while b had some queued.
    b_at = [i for i, piece in enumerate(log) if "bravo" in piece]
    assert len(b_at) == piece_count(B_TEXT)
    assert b_at[-1] - b_at[0] + 1 <= 2 * len(b_at) + 2 * COUNT_THREADS


def test_within_a_team_the_shortest_prompt_goes_first(
    slow: tuple[TokenCounter, SlowEncoding],
) -> None:
    counter, enc = slow

    async def main() -> tuple[bool, list[str]]:
        big = asyncio.create_task(counter.count_prompt_async("gpt-4", A_TEXT, team="a", budget=60))
        assert await asyncio.to_thread(enc.started.wait, 30)
        await counter.count_prompt_async("gpt-4", B_TEXT, team="a", budget=60)
        big_done = big.done()
        log = list(enc.pieces)
        big.cancel()
        await asyncio.gather(big, return_exceptions=True)
        return big_done, log

    big_done, log = asyncio.run(main())
    assert not big_done
    b_at = [i for i, piece in enumerate(log) if "bravo" in piece]
    # Its pieces went out one after another (a piece or two of the big one were in flight).
    assert b_at[-1] - b_at[0] + 1 <= len(b_at) + COUNT_THREADS


def test_counters_share_a_few_threads(counter: TokenCounter) -> None:
    # A reload builds a new counter: the threads stay the same few.
    for budget in (1.0, 2.0, 3.0):
        c = TokenCounter(budget_s=budget)
        c._encodings.update(counter._encodings)
        assert asyncio.run(c.count_prompt_async("gpt-4", BIG_TEXT)).exact
    names = [t.name for t in threading.enumerate() if t.name.startswith("extproc-tokens-")]
    assert len(names) == COUNT_THREADS


# -- the setting -------------------------------------------------------------------------------

_CONFIG = {
    "teams": {"t": {"keys": [{"sha256": "0" * 64}]}},
    "backends": {"b": {"url": "http://127.0.0.1:8081/v1"}},
    "models": {"m": {"targets": [{"backend": "b"}]}},
}


def test_count_budget_setting() -> None:
    assert parse_config(_CONFIG).sidecar.count_budget_ms == 500
    # The default stays below a short message timeout.
    short = {**_CONFIG, "sidecar": {"message_timeout_ms": 400}}
    assert parse_config(short).sidecar.count_budget_ms == 200
    runtime = build_runtime(parse_config({**_CONFIG, "sidecar": {"count_budget_ms": 300}}))
    assert build_runtime_parts(runtime)[1].budget_s == 0.3

    for sidecar in ({"count_budget_ms": 2000}, {"message_timeout_ms": 400, "count_budget_ms": 450}):
        with pytest.raises(ConfigError) as info:
            parse_config({**_CONFIG, "sidecar": sidecar})
        [(path, message)] = info.value.problems
        assert path == "sidecar.count_budget_ms"
        assert "message_timeout_ms" in message
