from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc import tokens
from extproc.tokens import (
    ASYNC_THREAD_THRESHOLD_CHARS,
    IMAGE_TOKENS_ESTIMATE,
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


def test_async_matches_sync_large_via_thread(
    counter: TokenCounter, to_thread_calls: list[object]
) -> None:
    messages = [{"role": "user", "content": BIG_TEXT}]
    sync_chat = counter.count_chat("gpt-4o", messages)
    sync_prompt = counter.count_prompt("gpt-4", [BIG_TEXT])
    sync_embed = counter.count_embedding_input("gpt-4", BIG_TEXT)
    assert sync_chat.exact and sync_chat.tokens > 10_000

    assert asyncio.run(counter.count_chat_async("gpt-4o", messages)) == sync_chat
    assert asyncio.run(counter.count_prompt_async("gpt-4", [BIG_TEXT])) == sync_prompt
    assert asyncio.run(counter.count_embedding_input_async("gpt-4", BIG_TEXT)) == sync_embed
    assert len(to_thread_calls) == 3


def test_async_small_input_stays_inline(
    counter: TokenCounter, to_thread_calls: list[object]
) -> None:
    result = asyncio.run(counter.count_chat_async("gpt-4o", COOKBOOK_MESSAGES))
    assert result == TokenCount(124, True)
    assert to_thread_calls == []
