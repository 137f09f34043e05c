"""Local detectors: what each finds and what it leaves alone, masking, overlaps, deny lists,
and linear time on adversarial megabytes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.guard import detectors
from extproc.guard.detectors import (
    PII_KINDS,
    DenyList,
    count_kinds,
    detector,
    find_all,
    known_kinds,
    luhn_valid,
    mask,
    register,
)
from extproc.guard.types import Span


def found(kind: str, text: str) -> list[str]:
    return [text[s.start : s.end] for s in detector(kind).find(text)]


def digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def with_check_digit(body: str) -> str:
    """`body` and the digit that makes its digits Luhn-valid."""
    return next(body + d for d in "0123456789" if luhn_valid(digits(body + d)))


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Lets a test register detectors without leaking them into other tests."""
    monkeypatch.setattr(detectors, "_REGISTRY", dict(detectors._REGISTRY))
    yield


class Fixed:
    """A detector that reports the spans it was built with."""

    def __init__(self, kind: str, *bounds: tuple[int, int], max_length: int = 100) -> None:
        self.kind = kind
        self.max_length = max_length
        self._bounds = bounds

    def find(self, text: str) -> list[Span]:
        return [Span(a, b, self.kind) for a, b in self._bounds if b <= len(text)]


# -- email ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "email",
    [
        "john.doe@example.com",
        "first.last+tag@mail.eng.corp.example.co.uk",
        "x_y%z@sub-domain.example.org",
        "a@b.io",
        "user@xn--bcher-kva.xn--p1ai",
        "UPPER@EXAMPLE.COM",
    ],
)
def test_email_found(email: str) -> None:
    assert found("email", f"write to {email}, thanks") == [email]


def test_email_span_stops_at_punctuation_and_next_to_cjk() -> None:
    assert found("email", "mail john@example.com.") == ["john@example.com"]
    assert found("email", "(john@example.com)") == ["john@example.com"]
    assert found("email", "邮箱a@b.com是我的") == ["a@b.com"]


@pytest.mark.parametrize(
    "text",
    [
        "a@b",
        "foo@bar",
        "user@localhost",
        "@home is where",
        "twitter @handle.",
        "a@b.c",
        "email@123.456",
        "me@ home.com",
        "a@.com",
        "no at sign here.com",
    ],
)
def test_email_not_found(text: str) -> None:
    assert found("email", text) == []


# -- phone ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "phone",
    [
        "(415) 555-0132",
        "415-555-0132",
        "415.555.0132",
        "+1 415 555 0132",
        "+1-415-555-0132",
        "+1 (415) 555-0132",
        "+44 20 7946 0958",
        "+4930123456",
        "1-800-555-0199",
    ],
)
def test_phone_found(phone: str) -> None:
    assert found("phone", f"call {phone} today") == [phone]


def test_phone_next_to_cjk() -> None:
    assert found("phone", "电话+8613812345678谢谢") == ["+8613812345678"]


@pytest.mark.parametrize(
    "text",
    [
        "on 2024-05-01 at 12:30:45",
        "version 1.2.3.4.5",
        "version 1.2.3",
        "host 10.0.0.1",
        "card 4111111111111111",
        "id 12345678901",
        "+1234567",  # 7 digits: too short for E.164
        "+12345678901234567",  # 17 digits: too long
        "415-555.0132",  # mixed separators
        "ISBN 978-3-16-148410-0",
        "pi 3.14159265358979",
        "a+14155550132",
    ],
)
def test_phone_not_found(text: str) -> None:
    assert found("phone", text) == []


# -- credit card ------------------------------------------------------------------------------


def test_luhn() -> None:
    assert luhn_valid("79927398713")
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("79927398710")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("")
    assert not luhn_valid("4111-1111")
    assert not luhn_valid("١٢٣")  # non-ASCII digits are not digits here


@pytest.mark.parametrize(
    "card",
    [
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4111111111111111",
        "378282246310005",  # Amex, 15 digits
        "3782 822463 10005",
        "6011 0009 9013 9424",
        "4222222222222",  # 13 digits
        with_check_digit("601100000000000000"),  # 19 digits
        with_check_digit("4000 1234 5678 9010 12"),
    ],
)
def test_card_found(card: str) -> None:
    assert luhn_valid(digits(card))
    assert found("credit_card", f"pay with {card}.") == [card]


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1112",  # Luhn-invalid: not a card
        "4111111111111112",
        "0000 0000 0000 0000",  # Luhn-valid, but a placeholder
        "411111111111",  # 12 digits
        "41111111111111110000",  # 20 digits: a longer number, not a card inside it
        "4111 1111 1111 1111 1",  # continues as a longer grouped number
        "1 2 3 4 5 6 7 8 9 0 1 2 3",  # a list of numbers
        "4111  1111  1111  1111",  # double spaces: four numbers
        "+1 415 555 0132",
    ],
)
def test_card_not_found(text: str) -> None:
    assert found("credit_card", text) == []


def test_single_digit_list_is_luhn_valid_yet_not_a_card() -> None:
    text = " ".join(with_check_digit("411111111111"))
    assert luhn_valid(digits(text))
    assert found("credit_card", text) == []


# -- US SSN -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ssn", ["123-45-6789", "123 45 6789", "078-05-1120", "899-99-9999"])
def test_ssn_found(ssn: str) -> None:
    assert found("us_ssn", f"SSN:{ssn}.") == [ssn]


@pytest.mark.parametrize(
    "text",
    [
        "000-12-3456",
        "666-12-3456",
        "900-12-3456",
        "999-12-3456",
        "123-00-4567",
        "123-45-0000",
        "123-45 6789",  # mixed separators
        "123456789",
        "1123-45-6789",
        "123-45-67890",
        "a123-45-6789",
        "415-555-0132",
    ],
)
def test_ssn_not_found(text: str) -> None:
    assert found("us_ssn", text) == []


# -- IP address -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ip",
    [
        "10.0.0.1",
        "255.255.255.255",
        "0.0.0.0",
        "2001:db8::1",
        "fe80::1",
        "::1",
        "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
        "::ffff:192.168.1.1",
        "1:2:3:4:5:6:7::",
    ],
)
def test_ip_found(ip: str) -> None:
    assert found("ip_address", f"host {ip} is up") == [ip]


def test_ip_span_leaves_punctuation_and_port() -> None:
    assert found("ip_address", "ping 10.0.0.1.") == ["10.0.0.1"]
    assert found("ip_address", "at 192.168.1.1:8080") == ["192.168.1.1"]
    assert found("ip_address", "at 2001:db8::1: ok") == ["2001:db8::1"]
    assert found("ip_address", "地址10.0.0.1") == ["10.0.0.1"]


@pytest.mark.parametrize(
    "text",
    [
        "999.1.1.1",
        "256.1.1.1",
        "1.2.3.4.5",
        "1.2.3.4.5.6",
        "1.2.3",
        "v1.2.3.4",
        "01.2.3.4",
        "at 12:30:45",
        "std::vector<int>",
        "dead::beef",
        "a :: b",
        "00:1A:2B:3C:4D:5E",
        "1:2:3:4:5:6:7:8:9",
    ],
)
def test_ip_not_found(text: str) -> None:
    assert found("ip_address", text) == []


# -- secrets ----------------------------------------------------------------------------------

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)


@pytest.mark.parametrize(
    "secret",
    [
        "sk-" + "A1b2C3d4" * 6,
        "sk-proj-" + "Zx9_Yw8-" * 20,
        "sk-ant-api03-" + "Qq7Rr6Ss5" * 10,
        "sk-svcacct-" + "k" * 30,
        "AKIAIOSFODNN7EXAMPLE",
        "ASIAIOSFODNN7EXAMPLE",
        "ghp_" + "a1B2" * 9,
        "gho_" + "c3D4" * 9,
        "ghs_" + "e5F6" * 9,
        "github_pat_11ABCDEFG0" + "x_y" * 24,
        "xoxb-1234567890-1234567890123-abcdefABCDEF",
        "xoxp-12345-67890-abcdef",
        "AIza" + "SyA-b_c" * 5,
        JWT,
    ],
)
def test_secret_found(secret: str) -> None:
    assert found("secret", f"key={secret} ok") == [secret]
    assert found("secret", f"key:\n  {secret}\n") == [secret]


def test_bearer_masks_only_the_token() -> None:
    token = "abc123DEF456ghi789JKL0.mno-pqr_stu~vwx+yz/=="
    text = f"Authorization: Bearer {token}\r\n"
    assert found("secret", text) == [token]
    assert mask(text, detector("secret").find(text)) == "Authorization: Bearer [SECRET]\r\n"
    assert found("secret", f"bearer\t{token}") == [token]
    # A JWT after "Bearer": both start at the token; the longer span wins.
    assert found("secret", f"Bearer {JWT}") == [JWT]


def test_long_token_is_masked_up_to_the_bound() -> None:
    text = "sk-" + "a" * 1000
    [span] = detector("secret").find(text)
    assert (span.start, span.end) == (0, 3 + 256)
    assert span.end - span.start <= detector("secret").max_length


@pytest.mark.parametrize(
    "text",
    [
        "sk-abc",
        "sk-" + "a" * 19,
        "risk-assessment-and-mitigation-plan-for-2024",
        "task-" + "b" * 40,
        "AKIA" + "A" * 15,
        "AKIAIOSFODNN7EXAMPLEX",  # 21 characters: not an access key id
        "ghp_short",
        "github_pat_short",
        "xoxb-short",
        "AIza" + "x" * 34,
        "the bearer of this letter is my friend",
        "Bearer counterrevolutionaries",
        "eyJhbGciOiJIUzI1NiJ9",  # a header alone is not a token
        "eyJhbGciOiJIUzI1NiJ9.notjson",
    ],
)
def test_secret_not_found(text: str) -> None:
    assert found("secret", text) == []


# -- max_length is a true bound ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "longest", "masked"),
    [
        ("email", "a" * 64 + "@" + ("b" * 63 + ".") * 6 + "c" * 24, None),
        ("phone", "+(1" + ") 1" * 14, None),
        ("credit_card", with_check_digit("411-111-111-111-111-111"), None),
        ("us_ssn", "123-45-6789", None),
        ("ip_address", "ffff:" * 6 + "255.255.255.255", None),
        ("secret", "eyJ" + "h" * 256 + ".eyJ" + "p" * 1024 + "." + "s" * 512, None),
        ("secret", "Bearer" + " " * 8 + "t0" * 512 + "==", "t0" * 512 + "=="),
    ],
)
def test_longest_matches_fit_max_length(kind: str, longest: str, masked: str | None) -> None:
    assert found(kind, f" {longest} ") == [masked or longest]
    assert len(masked or longest) <= detector(kind).max_length


_FRAGMENTS = [
    "john.doe@example.com",
    "4111 1111 1111 1111",
    "123-45-6789",
    "+1 415 555 0132",
    "10.0.0.1",
    "::1",
    "sk-" + "x1" * 15,
    JWT,
    "Bearer tok_" + "9" * 30,
    " ",
    "-",
    ".",
    "@",
    "+",
    ":",
]


@settings(deadline=None, max_examples=200)
@given(
    st.lists(
        st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=12)),
        max_size=20,
    ).map("".join)
)
def test_find_all_spans_are_sorted_disjoint_and_bounded(text: str) -> None:
    spans = find_all(text, PII_KINDS)
    for a, b in pairwise(spans):
        assert a.end <= b.start
    for s in spans:
        assert 0 <= s.start < s.end <= len(text)
        assert s.kind in PII_KINDS
        assert s.end - s.start <= detector(s.kind).max_length


@settings(deadline=None, max_examples=200)
@given(
    st.sampled_from(PII_KINDS),
    st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=6)), max_size=40).map("".join),
    st.data(),
)
def test_a_scan_from_anywhere_finds_the_same_matches(
    kind: str, text: str, data: st.DataObject
) -> None:
    """What windowed stream scanning relies on: past the first few characters of a window,
    a detector finds what it finds in the whole text."""
    cut = data.draw(st.integers(0, len(text)), label="cut")
    whole = [s for s in detector(kind).find(text) if s.start >= cut + 16]
    window = [
        Span(s.start + cut, s.end + cut, s.kind)
        for s in detector(kind).find(text[cut:])
        if s.start >= 16
    ]
    assert window == whole


def test_glued_matches_do_not_pair_up_by_scan_position() -> None:
    text = "john.doe@example.com" * 10
    assert detector("email").find(text) == [Span(0, 28, "email")]
    assert detector("email").find(text[5:]) == [Span(0, 23, "email")]
    jwt_chain = ".".join(["eyJhbGciOiJIUzI1NiJ9"] * 8)
    assert len(detector("secret").find(jwt_chain)) == 1


# -- find_all, mask, registry -----------------------------------------------------------------


def test_mask_is_exact() -> None:
    text = "mail a@b.io, card 4111111111111111!"
    spans = find_all(text, ["email", "credit_card"])
    assert spans == [Span(5, 11, "email"), Span(18, 34, "credit_card")]
    assert mask(text, spans) == "mail [EMAIL], card [CREDIT_CARD]!"
    assert mask(text, spans, "<{kind}>") == "mail <email>, card <credit_card>!"
    assert mask(text, spans, "") == "mail , card !"
    assert mask(text, []) == text
    assert mask("abc", [Span(0, 3, "secret")]) == "[SECRET]"


def test_mask_rejects_overlapping_spans() -> None:
    with pytest.raises(ValueError, match="overlap"):
        mask("abcdef", [Span(0, 3, "a"), Span(2, 4, "b")])


def test_find_all_only_runs_the_kinds_asked_for() -> None:
    text = "a@b.io 10.0.0.1"
    assert [s.kind for s in find_all(text, ["ip_address"])] == ["ip_address"]
    assert find_all(text, []) == []


def test_overlaps_keep_the_earliest_then_the_longest(registry: None) -> None:
    register(Fixed("t_long", (0, 10)))
    register(Fixed("t_short", (0, 5)))
    register(Fixed("t_late", (3, 12)))
    register(Fixed("t_after", (10, 12), (12, 14)))
    spans = find_all("x" * 20, ["t_short", "t_late", "t_long", "t_after"])
    assert spans == [Span(0, 10, "t_long"), Span(10, 12, "t_after"), Span(12, 14, "t_after")]


def test_an_email_beats_the_phone_number_inside_it() -> None:
    text = "+14155550132@example.com"
    assert detector("phone").find(text) == [Span(0, 12, "phone")]
    assert find_all(text, PII_KINDS) == [Span(0, len(text), "email")]


def test_register_adds_and_replaces(registry: None) -> None:
    assert set(PII_KINDS) <= set(known_kinds())
    register(Fixed("employee_id", (4, 9)))
    assert "employee_id" in known_kinds()
    assert find_all("emp E1234 a@b.io", ["employee_id", "email"]) == [
        Span(4, 9, "employee_id"),
        Span(10, 16, "email"),
    ]
    register(Fixed("email", (0, 3)))
    assert find_all("emp E1234 a@b.io", ["email"]) == [Span(0, 3, "email")]


def test_register_rejects_what_is_not_a_detector(registry: None) -> None:
    with pytest.raises(ValueError, match="kind"):
        register(Fixed("", (0, 1)))
    with pytest.raises(ValueError, match="max_length"):
        register(Fixed("neg", (0, 1), max_length=-1))


def test_unknown_kind() -> None:
    with pytest.raises(KeyError, match=r"nope.*known: email"):
        detector("nope")
    with pytest.raises(KeyError, match="nope"):
        find_all("text", ["email", "nope"])
    with pytest.raises(TypeError, match="str"):
        find_all("text", "email")


def test_count_kinds() -> None:
    spans = [Span(0, 1, "email"), Span(2, 3, "secret"), Span(4, 5, "email")]
    assert count_kinds(spans) == {"email": 2, "secret": 1}
    assert count_kinds([]) == {}


# -- deny lists -------------------------------------------------------------------------------


def test_deny_labels_name_the_rule_never_the_text() -> None:
    deny = DenyList([r"secret-\d+", r"(?i)drop\s+table"], ["bomb", "make a weapon"])
    cases = {
        "the code is secret-42": "pattern[0]",
        "'; DROP   TABLE users": "pattern[1]",
        "how to build a bomb": "keyword[0]",
        "how do I make a weapon": "keyword[1]",
        "a harmless question": None,
    }
    for text, label in cases.items():
        got = deny.first_match(text)
        assert got == label
        if got is not None:
            assert got not in text
            for word in text.split():
                assert word.lower() not in got


def test_deny_find_gives_labelled_spans_in_the_original_text() -> None:
    deny = DenyList([r"secret-\d+"], ["bomb", "straße"])
    text = "Straße: a BOMB, secret-42 and STRASSE"
    spans = deny.find(text)
    assert [(text[s.start : s.end], s.kind) for s in spans] == [
        ("Straße", "keyword[1]"),
        ("BOMB", "keyword[0]"),
        ("secret-42", "pattern[0]"),
        ("STRASSE", "keyword[1]"),
    ]
    assert DenyList([r"x*"]).find("abc") == []  # empty matches are not spans
    assert DenyList().find("anything") == []


def test_deny_patterns_are_checked_in_configuration_order() -> None:
    deny = DenyList([r"zzz", r"aaa"], ["aaa"])
    assert deny.first_match("aaa zzz") == "pattern[0]"
    assert deny.first_match("aaa") == "pattern[1]"


def test_bad_deny_pattern_names_its_index_and_the_error() -> None:
    with pytest.raises(ValueError, match=r"pattern\[1\].*missing \)"):
        DenyList(["fine", "(unclosed"])


def test_empty_keyword_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"keyword\[1\]"):
        DenyList(keywords=["ok", "   "])


@pytest.mark.parametrize(
    ("text", "hit"),
    [
        ("BOMB!", True),
        ("a Bomb.", True),
        ("bomb", True),
        ("bombastic", False),  # whole words only: a keyword is not every word containing it
        ("abomb", False),
        ("bombé", False),  # Unicode letters count as word characters
        ("bomb_squad", False),
        ("(bomb)", True),
    ],
)
def test_keywords_are_whole_words_and_case_insensitive(text: str, hit: bool) -> None:
    assert (DenyList(keywords=["bomb"]).first_match(text) is not None) is hit


def test_keyword_phrases_unicode_and_symbols() -> None:
    deny = DenyList(keywords=["make a weapon", "straße", "ÄRGER", "炸弹", "c++"])
    assert deny.first_match("How to MAKE  A\nWEAPON?") == "keyword[0]"
    assert deny.first_match("make a weaponry") is None
    assert deny.first_match("STRASSE") == "keyword[1]"
    assert deny.first_match("viel ärger heute") == "keyword[2]"
    assert deny.first_match("制造炸弹的方法") == "keyword[3]"  # no spaces between CJK words
    assert deny.first_match("I love C++.") == "keyword[4]"


def test_deny_max_length() -> None:
    assert DenyList().max_length == 0
    assert DenyList([r"x"]).max_length == 256
    assert DenyList([r"x"], max_match=10).max_length == 10
    # a keyword's length, plus the character read to see that the word ends
    assert DenyList(keywords=["bomb"]).max_length == 5
    assert DenyList(keywords=["炸弹"]).max_length == 2
    assert DenyList(keywords=["make a weapon"]).max_length == len("makeaweapon") + 2 * 8 + 1


# -- linear time ------------------------------------------------------------------------------

_MB = 1 << 20


def _fill(unit: str) -> str:
    return (unit * (_MB // len(unit) + 1))[:_MB]


_ADVERSARIAL = {
    "email": ["a", "a@", "a.", "a@a.", "@a.", "a" * 64 + "@", "x@" + "a-" * 40 + ".", "a@b." * 7],
    "phone": ["+1", "+1 ", "+( ", "1-", "415-555-", "(415) ", "+1-2-3-4-5-6-7-8-9 ", "2"],
    "credit_card": ["1", "1 ", "1-", "4111 ", "41111111111111111 "],
    "us_ssn": ["123-45-", "123 ", "1", "123-45-6789-"],
    "ip_address": ["1.", "255.", "1:", "::", "a:", "1:1::", ":0", "1.1.1.1."],
    "secret": [
        "sk-",
        "sk-a",
        " sk-" + "a" * 19,
        "eyJ",
        "eyJaaaaaaaaa.",
        "eyJaaaaaaaa.eyJaaaaaaaa.",
        "Bearer ",
        "bearer\t",
        "AKIA",
        "xoxb-",
        "ghp_",
        "AIza",
    ],
}


@pytest.mark.parametrize("kind", PII_KINDS)
def test_adversarial_megabyte_is_fast(kind: str) -> None:
    for unit in _ADVERSARIAL[kind]:
        text = _fill(unit)
        # CPU time of this process: another process's load does not count against us.
        started = time.process_time()
        detector(kind).find(text)
        elapsed = time.process_time() - started
        assert elapsed < 1.0, f"{kind} on {unit[:20]!r}*: {elapsed:.2f}s"


def test_adversarial_megabyte_deny_keywords_are_fast() -> None:
    deny = DenyList(keywords=["bomb", "make a weapon"])
    for unit in ["bom", "make a ", "make  a  weapo", "b"]:
        started = time.process_time()
        deny.first_match(_fill(unit))
        assert time.process_time() - started < 1.0
