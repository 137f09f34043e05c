"""Local detectors: PII and secrets found by bounded regular expressions, and deny lists.

Pure functions of the text, no I/O. Every pattern has bounded repetitions and a boundary check
of at most a few characters on each side, so a scan is linear in the text (no catastrophic
backtracking). Two properties let `stream_mask.StreamMasker` mask a stream by scanning only a
window of it:

- A match attempt at position `i` reads nothing before `i - 2` or from `i + max_length` on:
  a detector's `max_length` counts the longest raw regex match plus the characters its
  trailing boundary check reads, so it is also a true upper bound on the spans it reports.
- A match never starts inside another match of the same pattern: the boundary check before
  each pattern excludes every character a match can contain (an email cannot start right
  after "@" or a letter). A scan started anywhere therefore finds the same matches as a scan
  of the whole text, apart from the first one; without this, text like "a@b.coma@b.com..."
  pairs up differently depending on where the scan began.

Numbers use ASCII digits and ASCII-alphanumeric boundaries, so a number written right after
CJK text ("电话+8613812345678") is still found.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .types import Span

PII_KINDS: tuple[str, ...] = ("email", "phone", "credit_card", "us_ssn", "ip_address", "secret")


class Detector(Protocol):
    kind: str
    max_length: int  # the longest match it can produce, in characters (the stream hold-back)

    def find(self, text: str) -> list[Span]: ...


def _resolve(spans: list[Span]) -> list[Span]:
    """Sorted, non-overlapping: the earliest start wins, on a tie the longest (then by kind, so
    the result does not depend on the order detectors ran in)."""
    spans.sort(key=lambda s: (s.start, -s.end, s.kind))
    kept: list[Span] = []
    end = 0
    for span in spans:
        if span.start >= end and span.end > span.start:
            kept.append(span)
            end = span.end
    return kept


# -- email ------------------------------------------------------------------------------------

_EMAIL_LOCAL = 64
_EMAIL_LABEL = 63
_EMAIL_LABELS = 6  # labels before the TLD: "a@mail.eng.corp.example.co.uk" has 5
_EMAIL_TLD = 24  # the longest delegated TLDs, e.g. "xn--vermgensberatung-pwb"
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+@-])"
    rf"[A-Za-z0-9._%+-]{{1,{_EMAIL_LOCAL}}}@"
    rf"(?:[A-Za-z0-9][A-Za-z0-9-]{{0,{_EMAIL_LABEL - 1}}}\.){{1,{_EMAIL_LABELS}}}"
    rf"(?:xn--[A-Za-z0-9-]{{1,{_EMAIL_TLD - 4}}}|[A-Za-z]{{2,{_EMAIL_TLD}}})"
    r"(?![A-Za-z0-9-])"
)


class EmailDetector:
    kind = "email"
    max_length = _EMAIL_LOCAL + 1 + _EMAIL_LABELS * (_EMAIL_LABEL + 1) + _EMAIL_TLD + 1

    def find(self, text: str) -> list[Span]:
        if "@" not in text:
            return []
        return [Span(m.start(), m.end(), self.kind) for m in _EMAIL.finditer(text)]


# -- phone ------------------------------------------------------------------------------------

# "+" and 8-15 digits; up to two of " .()-" before each digit covers "+1 (415) 555-0132".
# A match never ends right before a digit: "+4111111111111111" is not a phone.
_PHONE_E164 = re.compile(r"\+(?<![A-Za-z0-9+]\+)\(?[0-9](?:[ .()-]{0,2}[0-9]){7,14}(?![0-9])")
_E164_MAX = 3 + 14 * 3 + 1
# North American numbers without "+": separators are required (a bare digit run is an id or a
# card) and consistent ("2024-05-01" and "1.2.3" are not 3-3-4); area code and exchange start
# with 2-9.
_PHONE_NANP = re.compile(
    r"[(1-9](?<![A-Za-z0-9+)][(1-9])(?<![0-9)][ .-][(1-9])"
    r"(?:(?<=\()[2-9][0-9]{2}\) ?[2-9][0-9]{2}[ .-]?[0-9]{4}"
    r"|(?<=[2-9])[0-9]{2}([.-])[2-9][0-9]{2}\1[0-9]{4}"
    r"|(?<=1)([ .-])[2-9][0-9]{2}\2[2-9][0-9]{2}\2[0-9]{4})"
    r"(?![A-Za-z0-9]|[.-][0-9])"
)
_NANP_MAX = 14 + 2


class PhoneDetector:
    kind = "phone"
    max_length = max(_E164_MAX, _NANP_MAX)

    def find(self, text: str) -> list[Span]:
        spans = [Span(m.start(), m.end(), self.kind) for m in _PHONE_E164.finditer(text)]
        spans += [Span(m.start(), m.end(), self.kind) for m in _PHONE_NANP.finditer(text)]
        return _resolve(spans)


# -- credit card ------------------------------------------------------------------------------

# A whole run of 13-19 digits, single spaces or dashes allowed between them; a digit before or
# after (even across one separator) makes it part of something longer, which is not a card.
_CARD = re.compile(r"[0-9](?<![0-9]{2})(?<![0-9][ -][0-9])(?:[ -]?[0-9]){12,18}(?![ -]?[0-9])")
_CARD_SEP = re.compile(r"[ -]")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of ASCII digits (False for anything else)."""
    if not digits or not digits.isascii() or not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


class CreditCardDetector:
    kind = "credit_card"
    max_length = 19 + 18 + 2

    def find(self, text: str) -> list[Span]:
        spans: list[Span] = []
        for m in _CARD.finditer(text):
            groups = _CARD_SEP.split(m.group())
            # "1 2 3 4 5 6 7 8 9 0 1 2 3" is a list of numbers; card groups have 3+ digits.
            if len(groups) > 1 and min(map(len, groups)) < 3:
                continue
            digits = "".join(groups)
            if digits.strip("0") and luhn_valid(digits):
                spans.append(Span(m.start(), m.end(), self.kind))
        return spans


# -- US social security number ----------------------------------------------------------------

_SSN = re.compile(
    r"[0-9](?<![A-Za-z0-9][0-9])(?<![0-9][ -][0-9])[0-9]{2}(?<!000)(?<!666)(?<!9[0-9]{2})"
    r"([ -])(?!00)[0-9]{2}\1(?!0000)[0-9]{4}"
    r"(?![A-Za-z0-9]|[ -][0-9])"
)


class SSNDetector:
    kind = "us_ssn"
    max_length = 11 + 2

    def find(self, text: str) -> list[Span]:
        return [Span(m.start(), m.end(), self.kind) for m in _SSN.finditer(text)]


# -- IP address -------------------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4_BODY = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
# Not part of a longer dotted run: "1.2.3.4.5" and "v1.2.3.4" are versions. Permissive octets
# here (starting on a digit lets the engine skip ahead), checked by _IPV4_STRICT.
_IPV4 = re.compile(
    r"[0-9](?<![A-Za-z0-9.][0-9])[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?![A-Za-z0-9]|\.[0-9])"
)
# Permissive shape; `ipaddress` decides. At most 8 groups, the last may be a dotted quad.
_IPV6 = re.compile(
    rf"(?<![A-Za-z0-9:.])(?:[0-9A-Fa-f]{{0,4}}:){{2,8}}(?:{_IPV4_BODY}|[0-9A-Fa-f]{{0,4}})"
    r"(?![A-Za-z0-9:]|\.[0-9])"
)
_IPV4_STRICT = re.compile(_IPV4_BODY)  # octets 0-255 without leading zeros
_DECIMAL = re.compile(r"[0-9]")


def _ipv6_valid(candidate: str) -> bool:
    # Without a decimal digit it is far more often C++ ("ab::cd") or "::" than an address.
    if not _DECIMAL.search(candidate):
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


class IPAddressDetector:
    kind = "ip_address"
    max_length = 8 * 5 + 15 + 2

    def find(self, text: str) -> list[Span]:
        spans: list[Span] = []
        if "." in text:
            spans += [
                Span(m.start(), m.end(), self.kind)
                for m in _IPV4.finditer(text)
                if _IPV4_STRICT.fullmatch(m.group())
            ]
        if "::" in text or text.count(":") >= 6:
            for m in _IPV6.finditer(text):
                candidate, end = m.group(), m.end()
                if not _ipv6_valid(candidate):
                    # "at 2001:db8::1: it..." - the trailing colon is punctuation.
                    if not (candidate.endswith(":") and not candidate.endswith("::")):
                        continue
                    candidate, end = candidate[:-1], end - 1
                    if not _ipv6_valid(candidate):
                        continue
                spans.append(Span(m.start(), end, self.kind))
        return _resolve(spans)


# -- secrets ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SecretPattern:
    regex: re.Pattern[str]
    bound: int  # the longest raw match plus what its trailing check reads
    group: int = 0  # the part to mask
    needs_non_letter: bool = False  # prose ("the bearer of ...") is all letters, tokens are not


# Most have no trailing check: a token longer than its bound is masked up to the bound, which
# leaves the rest unusable. The boundary check before a prefix comes after the literal so the
# regex engine can still skip ahead to the literal.
_SECRETS: tuple[_SecretPattern, ...] = (
    # OpenAI (sk-, sk-proj-, sk-svcacct-) and Anthropic (sk-ant-api03-...) keys.
    _SecretPattern(re.compile(r"sk-(?<![A-Za-z0-9_-]sk-)[A-Za-z0-9_-]{20,256}"), 3 + 256),
    # AWS access key ids (long-term AKIA, temporary ASIA): exactly 20 characters.
    _SecretPattern(re.compile(r"A[KS]IA(?<![A-Za-z0-9]A[KS]IA)[0-9A-Z]{16}(?![0-9A-Za-z])"), 21),
    # GitHub personal, OAuth, user-to-server, server-to-server and refresh tokens.
    _SecretPattern(re.compile(r"gh[pousr]_(?<![A-Za-z0-9_]gh[pousr]_)[A-Za-z0-9]{36,251}"), 255),
    _SecretPattern(
        re.compile(r"github_pat_(?<![A-Za-z0-9_]github_pat_)[A-Za-z0-9_]{22,244}"), 11 + 244
    ),
    # Slack bot, app, user, refresh and legacy tokens.
    _SecretPattern(re.compile(r"xox[baprs]-(?<![A-Za-z0-9]xox[baprs]-)[A-Za-z0-9-]{10,250}"), 255),
    # Google API keys.
    _SecretPattern(re.compile(r"AIza(?<![A-Za-z0-9_-]AIza)[0-9A-Za-z_-]{35}"), 4 + 35),
    # An HTTP bearer token ("Bearer" or "bearer"): only the token is masked. Matching from
    # "earer" lets the engine skip ahead to a literal; the "B" is checked behind.
    _SecretPattern(
        re.compile(
            r"earer(?<=[Bb]earer)(?<![A-Za-z0-9_-][Bb]earer)[ \t]{1,8}"
            r"([A-Za-z0-9._~+/-]{20,1024}={0,2})"
        ),
        6 + 8 + 1024 + 2,
        group=1,
        needs_non_letter=True,
    ),
    # JWT-shaped: base64url JSON header and payload, then the signature.
    _SecretPattern(
        re.compile(
            r"eyJ(?<![A-Za-z0-9_.-]eyJ)[A-Za-z0-9_-]{8,256}\.eyJ[A-Za-z0-9_-]{8,1024}"
            r"(?:\.[A-Za-z0-9_-]{0,512})?"
        ),
        3 + 256 + 1 + 3 + 1024 + 1 + 512,
    ),
)


class SecretDetector:
    kind = "secret"
    max_length = max(s.bound for s in _SECRETS)

    def find(self, text: str) -> list[Span]:
        spans: list[Span] = []
        for secret in _SECRETS:
            for m in secret.regex.finditer(text):
                if secret.needs_non_letter and m.group(secret.group).isalpha():
                    continue
                spans.append(Span(m.start(secret.group), m.end(secret.group), self.kind))
        return _resolve(spans)


# -- registry ---------------------------------------------------------------------------------

_REGISTRY: dict[str, Detector] = {}


def register(detector: Detector) -> None:
    """Add a detector, or replace the one of the same kind."""
    kind = getattr(detector, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"a detector needs a non-empty str kind, got {kind!r}")
    max_length = getattr(detector, "max_length", None)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 0:
        raise ValueError(f"detector {kind!r}: max_length must be an int >= 0, got {max_length!r}")
    if not callable(getattr(detector, "find", None)):
        raise ValueError(f"detector {kind!r} has no find(text) method")
    _REGISTRY[kind] = detector


def detector(kind: str) -> Detector:
    try:
        return _REGISTRY[kind]
    except KeyError:
        known = ", ".join(_REGISTRY)
        raise KeyError(f"unknown detector kind {kind!r} (known: {known})") from None


def known_kinds() -> tuple[str, ...]:
    return tuple(_REGISTRY)


for _builtin in (
    EmailDetector(),
    PhoneDetector(),
    CreditCardDetector(),
    SSNDetector(),
    IPAddressDetector(),
    SecretDetector(),
):
    register(_builtin)


def find_all(text: str, kinds: Iterable[str]) -> list[Span]:
    """Every span the detectors of `kinds` find, sorted and non-overlapping (the earliest start
    wins, on a tie the longest). Unknown kinds raise KeyError."""
    if isinstance(kinds, str):
        raise TypeError(f"kinds must be a collection of kinds, not the str {kinds!r}")
    spans: list[Span] = []
    for kind in dict.fromkeys(kinds):
        spans.extend(detector(kind).find(text))
    return _resolve(spans)


def mask(text: str, spans: Sequence[Span], template: str = "[{KIND}]") -> str:
    """`text` with each span replaced by `template` ({KIND}: "EMAIL", {kind}: "email").
    `spans` must be sorted and non-overlapping, as `find_all` returns them."""
    if not spans:
        return text
    out: list[str] = []
    pos = 0
    for span in spans:
        if span.start < pos:
            raise ValueError("spans must be sorted and must not overlap")
        out.append(text[pos : span.start])
        out.append(template.format(KIND=span.kind.upper(), kind=span.kind))
        pos = span.end
    out.append(text[pos:])
    return "".join(out)


def count_kinds(spans: Iterable[Span]) -> dict[str, int]:
    return dict(Counter(span.kind for span in spans))


# -- deny lists -------------------------------------------------------------------------------

# Scripts written without spaces between words: there a keyword is a substring, not a word
# ("炸弹" must match inside "制造炸弹的方法"; Korean particles attach to the noun).
_UNSPACED_SCRIPTS = (
    "CJK",
    "IDEOGRAPHIC",
    "HIRAGANA",
    "KATAKANA",
    "HALFWIDTH KATAKANA",
    "HANGUL",
    "HALFWIDTH HANGUL",
    "THAI",
    "LAO",
    "KHMER",
    "MYANMAR",
)
_WORD_CHAR = re.compile(r"\w")
_KEYWORD_GAP = 8  # whitespace characters a space in a keyword phrase may stand for


def _word_edge(ch: str) -> bool:
    if not _WORD_CHAR.fullmatch(ch):
        return False
    return not unicodedata.name(ch, "").startswith(_UNSPACED_SCRIPTS)


class DenyList:
    """Deny patterns: regexes and keywords (keywords: case-insensitive, whole-word/phrase match,
    Unicode-aware).

    Keywords are compared case-folded ("STRASSE" matches "straße") and as whole words: "bomb"
    matches "a bomb!" but not "bombastic", since a deny list of words should not block every
    word that contains one. A space in a phrase matches a run of up to 8 whitespace characters.
    In scripts written without spaces (CJK, Thai, ...) a keyword matches anywhere.

    Regexes are used as written (case-sensitive unless they say `(?i)`), and their matches are
    assumed to be at most `max_match` characters long.
    """

    __slots__ = ("_keywords", "_patterns", "max_length")

    def __init__(
        self, patterns: Sequence[str] = (), keywords: Sequence[str] = (), *, max_match: int = 256
    ) -> None:
        compiled: list[re.Pattern[str]] = []
        for i, pattern in enumerate(patterns):
            try:
                compiled.append(re.compile(pattern))
            except re.error as exc:
                raise ValueError(f"pattern[{i}] does not compile: {exc}") from None
        self._patterns = tuple(compiled)
        longest = max_match if compiled else 0
        alternatives: list[str] = []
        for i, keyword in enumerate(keywords):
            words = keyword.casefold().split()
            if not words:
                raise ValueError(f"keyword[{i}] is empty")
            before = r"(?<!\w)" if _word_edge(words[0][0]) else ""
            after = r"(?!\w)" if _word_edge(words[-1][-1]) else ""
            body = rf"\s{{1,{_KEYWORD_GAP}}}".join(map(re.escape, words))
            alternatives.append(f"{before}({body}){after}")
            # Case folding never shortens text, so the raw match is no longer than the folded
            # one; the trailing word check reads one character more.
            gaps = len(words) - 1
            length = sum(map(len, words)) + gaps * _KEYWORD_GAP + (1 if after else 0)
            longest = max(longest, length)
        self._keywords = re.compile("|".join(alternatives)) if alternatives else None
        self.max_length: int = longest

    def find(self, text: str) -> list[Span]:
        """Every match as a span of `text`, its kind the label `first_match` would give
        ("pattern[0]"), sorted and without overlaps: for streams, which mask or cut at them.
        Keywords match the case-folded text, as in `first_match`, so "STRASSE" is found for
        "straße" too; positions are mapped back to the text as written."""
        spans: list[Span] = []
        for i, pattern in enumerate(self._patterns):
            label = f"pattern[{i}]"
            spans += [Span(m.start(), m.end(), label) for m in pattern.finditer(text)]
        if self._keywords is not None:
            folded = text.casefold()
            # Folding is per character and never shortens one, so equal lengths mean positions
            # line up; otherwise ("ß" -> "ss") map each folded position back to its character.
            origin: list[int] | None = None
            if len(folded) != len(text):
                origin = [i for i, ch in enumerate(text) for _ in ch.casefold()]
            for m in self._keywords.finditer(folded):
                start, end = m.span()
                if origin is not None:
                    start, end = origin[start], origin[end - 1] + 1
                spans.append(Span(start, end, f"keyword[{(m.lastindex or 1) - 1}]"))
        return _resolve(spans)

    def first_match(self, text: str) -> str | None:
        """None, or a label that names what matched and never contains any of it: the first
        pattern in configuration order that matches ("pattern[2]"), else the keyword found
        earliest in the text ("keyword[0]")."""
        for i, pattern in enumerate(self._patterns):
            if pattern.search(text):
                return f"pattern[{i}]"
        if self._keywords is not None:
            m = self._keywords.search(text.casefold())
            if m is not None and m.lastindex is not None:
                return f"keyword[{m.lastindex - 1}]"
        return None
