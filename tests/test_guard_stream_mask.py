"""Masking a stream fed in arbitrary pieces equals masking the whole text at once."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.guard.detectors import PII_KINDS, count_kinds, detector, find_all, luhn_valid, mask
from extproc.guard.stream_mask import StreamMasker
from extproc.guard.types import Span

Find = Callable[[str], list[Span]]


def finder(kinds: Sequence[str]) -> tuple[Find, int]:
    return (
        functools.partial(find_all, kinds=kinds),
        max(detector(k).max_length for k in kinds),
    )


def pieces(text: str, cuts: Sequence[int]) -> list[str]:
    """`text` cut at `cuts`; a repeated cut makes an empty piece."""
    bounds = [0, *sorted(min(c, len(text)) for c in cuts), len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


def run(masker: StreamMasker, parts: Sequence[str], holdback: int) -> str:
    out: list[str] = []
    for part in parts:
        out.append(masker.feed(part))
        assert masker.held <= holdback
    out.append(masker.flush())
    assert masker.held == 0
    return "".join(out)


# -- generated texts --------------------------------------------------------------------------


def _card(body: str) -> str:
    d = next(d for d in "0123456789" if luhn_valid(body + d))
    number = body + d
    return " ".join(number[i : i + 4] for i in range(0, len(number), 4))


_emails = st.builds(
    "{}@{}.{}".format,
    st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,20}", fullmatch=True),
    st.from_regex(r"[a-z0-9][a-z0-9-]{0,15}(\.[a-z0-9]{1,10}){0,2}", fullmatch=True),
    st.sampled_from(["com", "io", "co.uk", "museum", "xn--p1ai"]),
)
_cards = st.from_regex(r"4[0-9]{14}", fullmatch=True).map(_card)
_ssns = st.builds(
    "{:03d}-{:02d}-{:04d}".format,
    st.integers(1, 665),
    st.integers(1, 99),
    st.integers(1, 9999),
)
_secrets = st.one_of(
    st.from_regex(r"sk-(proj-|ant-api03-)?[A-Za-z0-9_-]{20,60}", fullmatch=True),
    st.from_regex(r"AKIA[0-9A-Z]{16}", fullmatch=True),
    st.from_regex(r"ghp_[A-Za-z0-9]{36,40}", fullmatch=True),
    st.from_regex(r"Bearer [A-Za-z0-9]{10,30}\.[A-Za-z0-9]{5,30}", fullmatch=True),
    st.from_regex(
        r"eyJ[A-Za-z0-9_-]{8,40}\.eyJ[A-Za-z0-9_-]{8,60}\.[A-Za-z0-9_-]{0,40}", fullmatch=True
    ),
)
_phones = st.one_of(
    st.sampled_from(["(415) 555-0132", "415.555.0132", "+1 415 555 0132", "+44 20 7946 0958"]),
    st.from_regex(r"\+[1-9][0-9]{7,12}", fullmatch=True),
)
_ips = st.one_of(
    st.sampled_from(["2001:db8::1", "::ffff:192.168.1.1", "fe80::1"]),
    st.builds("{}.{}.{}.{}".format, *[st.integers(0, 255)] * 4),
)
_near_misses = st.sampled_from(
    ["1.2.3.4.5", "2024-05-01", "4111 1111 1111 1112", "000-12-3456", "sk-abc", "a@b", "x@y."]
)
_BY_KIND = {
    "email": _emails,
    "phone": _phones,
    "credit_card": _cards,
    "us_ssn": _ssns,
    "ip_address": _ips,
    "secret": _secrets,
}
_any_pii = st.one_of(*_BY_KIND.values())
_filler = st.one_of(
    st.text(max_size=20),
    st.sampled_from([" ", "-", ".", "@", "+", ":", "1", "中文", "😀", "é", "\n", "a", "_"]),
)
_separators = st.sampled_from([" ", " ", "", "\n", ", "])
_units = st.sampled_from([" ", "a", "lorem ipsum ", "7", "中", "😀", "-", ". ", "x@y", "\n"])


@st.composite
def stream_texts(draw: st.DrawFn, kinds: Sequence[str], holdback: int) -> str:
    """Matches of `kinds` (and others) among random text, with runs of filler between them
    from none to `holdback` long: matches both next to each other and further apart than the
    hold-back."""
    segment = st.one_of(_filler, _near_misses, _any_pii, *(_BY_KIND[k] for k in kinds))
    segments = draw(st.lists(segment, min_size=1, max_size=20))
    unit = draw(_units)
    gap = st.integers(0, max(1, holdback // len(unit)))
    gap = st.tuples(_separators, gap, _separators)
    gaps = draw(st.lists(gap, min_size=len(segments), max_size=len(segments)))
    return "".join(seg + a + unit * n + b for seg, (a, n, b) in zip(segments, gaps, strict=True))


@st.composite
def cuts_for(draw: st.DrawFn, text: str, spans: list[Span], holdback: int) -> list[int]:
    """Cut points anywhere, and some where it matters: at and next to a match's edges, and
    where the hold-back window passes a match's start (the moment it becomes final)."""
    cuts = draw(st.lists(st.integers(0, len(text)), max_size=30))
    anchors = sorted(
        {
            p
            for s in spans
            for p in (
                s.start - 1,
                s.start,
                s.start + 1,
                (s.start + s.end) // 2,
                s.end - 1,
                s.end,
                s.end + 1,
                s.start + holdback,
                s.start + holdback + 1,
            )
            if 0 <= p <= len(text)
        }
    )
    if anchors:
        cuts += draw(st.lists(st.sampled_from(anchors), max_size=15))
    return cuts


KIND_SETS = [
    PII_KINDS,
    ("email", "phone", "credit_card", "us_ssn", "ip_address"),
    ("us_ssn",),
    ("credit_card", "us_ssn"),
    ("phone", "ip_address"),
    ("email",),
    ("secret",),
]


# -- the contract -----------------------------------------------------------------------------


@settings(deadline=None, max_examples=200)
@given(st.sampled_from(KIND_SETS), st.data())
def test_any_split_masks_like_the_whole_text(kinds: tuple[str, ...], data: st.DataObject) -> None:
    find, holdback = finder(kinds)
    text = data.draw(stream_texts(kinds, holdback), label="text")
    expected = find(text)
    parts = pieces(text, data.draw(cuts_for(text, expected, holdback), label="cuts"))
    masker = StreamMasker(find, holdback)
    assert run(masker, parts, holdback) == mask(text, expected)
    assert masker.counts == count_kinds(expected)


@settings(deadline=None, max_examples=200)
@given(st.sampled_from(KIND_SETS[2:]), st.data())
def test_small_pieces(kinds: tuple[str, ...], data: st.DataObject) -> None:
    """Pieces of 0-3 characters: every feed moves the release point by little."""
    find, holdback = finder(kinds)
    text = data.draw(stream_texts(kinds, holdback), label="text")[:4000]
    sizes = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=20), label="sizes")
    sizes.append(1)  # an empty piece now and then, but always progress
    parts: list[str] = []
    pos = i = 0
    while pos < len(text):
        size = sizes[i % len(sizes)]
        parts.append(text[pos : pos + size])
        pos += size
        i += 1
    assert run(StreamMasker(find, holdback), parts, holdback) == mask(text, find(text))


@settings(deadline=None, max_examples=200)
@given(st.text(max_size=300), st.integers(0, 50), st.data())
def test_text_is_released_once_it_is_holdback_behind(
    text: str, holdback: int, data: st.DataObject
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=20), label="cuts")
    masker = StreamMasker(lambda _: [], holdback)
    released, seen = "", 0
    for part in pieces(text, cuts):
        released += masker.feed(part)
        seen += len(part)
        assert released == text[: max(0, seen - holdback)]
    assert released + masker.flush() == text


_TOY = re.compile(r"x[a-c]{0,4}y")


def toy_find(text: str) -> list[Span]:
    """A regex whose matches grow as text arrives ("xa" may become "xaaay"), at most 6 long."""
    return [Span(m.start(), m.end(), "toy") for m in _TOY.finditer(text)]


@settings(deadline=None, max_examples=200)
@given(
    st.lists(st.sampled_from(["x", "y", "a", "bc", "aaaa", "xabcy", "xaaaay", " ", "d"]))
    .map("".join)
    .map(lambda s: s[:300]),
    st.integers(6, 8),
    st.data(),
)
def test_growing_matches_with_a_tight_holdback(
    text: str, holdback: int, data: st.DataObject
) -> None:
    cuts = data.draw(cuts_for(text, toy_find(text), holdback), label="cuts")
    masked = run(StreamMasker(toy_find, holdback), pieces(text, cuts), holdback)
    assert masked == mask(text, toy_find(text))


# -- explicit cases ---------------------------------------------------------------------------

SECRET = "sk-proj-" + "Ab1_Cd2-" * 6


def test_secret_fed_one_character_at_a_time() -> None:
    find, holdback = finder(PII_KINDS)
    text = f"my key is {SECRET} and that is all. " + "filler " * 400
    masker = StreamMasker(find, holdback)
    out = [masker.feed(ch) for ch in text]
    out.append(masker.flush())
    joined = "".join(out)
    assert joined == "my key is [SECRET] and that is all. " + "filler " * 400
    assert "sk-p" not in joined
    assert masker.counts == {"secret": 1}
    assert len(out[-1]) <= holdback  # released as it came, not only by flush


def test_glued_emails_mask_alike_whatever_the_split() -> None:
    """A scan of a window must not pair "x@y.comx@y.com..." up differently from the whole."""
    find, holdback = finder(PII_KINDS)
    text = "john.doe@example.com" * 300
    for size in (1, 7, 20, 333):
        parts = [text[i : i + size] for i in range(0, len(text), size)]
        assert run(StreamMasker(find, holdback), parts, holdback) == mask(text, find(text))


def test_card_split_across_two_deltas() -> None:
    find, holdback = finder(["credit_card"])
    masker = StreamMasker(find, holdback)
    first = masker.feed("pay with 4111 1111 ")
    rest = masker.feed("1111 1111 please, thanks" + " " * 60) + masker.flush()
    assert "4111" not in first
    assert first + rest == "pay with [CREDIT_CARD] please, thanks" + " " * 60


def test_a_domain_that_keeps_growing() -> None:
    find, holdback = finder(["email"])
    masker = StreamMasker(find, holdback)
    parts = ["write to a@b.co", "m.a", "u now", " " * 600, "end"]
    assert run(masker, parts, holdback) == "write to [EMAIL] now" + " " * 600 + "end"


def test_release_stops_before_a_match_and_resumes_after_it() -> None:
    find, holdback = finder(["us_ssn"])  # holdback 13
    masker = StreamMasker(find, holdback)
    assert masker.feed("x" * 20) == "x" * 7
    # The number starts within the last 13 characters: it may yet grow or vanish.
    assert masker.feed(" 123-45-6789") == "x" * 12
    assert masker.held == holdback
    # Now it starts more than 13 behind: final, and released whole though it ends later.
    assert masker.feed(" and more text here") == "x [US_SSN] and m"
    assert masker.flush() == "ore text here"


def test_held_never_exceeds_the_holdback() -> None:
    find, holdback = finder(PII_KINDS)
    text = ("lorem a@b.io ipsum 4111 1111 1111 1111 dolor " * 1000)[: 1 << 15]
    for size in (13, 500, 5000, 20_000):
        parts = [text[i : i + size] for i in range(0, len(text), size)]
        assert run(StreamMasker(find, holdback), parts, holdback) == mask(text, find(text))


def test_find_sees_a_bounded_window_not_the_stream() -> None:
    find, holdback = finder(["email", "credit_card"])
    windows: list[int] = []

    def recording(text: str) -> list[Span]:
        windows.append(len(text))
        return find(text)

    masker = StreamMasker(recording, holdback)
    chunk = "mail a@b.io or pay 4111 1111 1111 1111 " * 25
    for _ in range(200):
        masker.feed(chunk)
    masker.flush()
    assert max(windows) <= 2 * holdback + 16 + len(chunk)


def test_flush_on_empty_and_empty_feeds() -> None:
    find, holdback = finder(PII_KINDS)
    masker = StreamMasker(find, holdback)
    assert masker.flush() == ""
    assert masker.feed("") == ""
    assert masker.held == 0
    assert masker.flush() == ""
    assert masker.counts == {}


def test_masker_is_empty_again_after_flush() -> None:
    find, holdback = finder(["email"])
    masker = StreamMasker(find, holdback)
    assert masker.feed("a@b.io") == ""
    assert masker.flush() == "[EMAIL]"
    assert masker.feed("c@d.io") == ""
    assert masker.flush() == "[EMAIL]"
    assert masker.counts == {"email": 2}


def test_template() -> None:
    find, holdback = finder(["email", "us_ssn"])
    masker = StreamMasker(find, holdback, template="<{kind}>")
    assert masker.feed("a@b.io 123-45-6789") + masker.flush() == "<email> <us_ssn>"


def test_zero_holdback_releases_everything_at_once() -> None:
    masker = StreamMasker(lambda _: [], 0)
    assert masker.feed("abc") == "abc"
    assert masker.held == 0


def test_negative_holdback() -> None:
    with pytest.raises(ValueError, match="holdback"):
        StreamMasker(lambda _: [], -1)
