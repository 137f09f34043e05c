"""multipart/form-data bodies (OpenAI's audio transcriptions and translations): the text fields
read, and one field's value replaced (the model's name for its backend) with every other byte
kept as the client sent it. After RFC 7578: parts between `--boundary` delimiter lines, each
with its headers, a blank line and its content; the body's first line is the delimiter
(clients send no preamble), so the boundary is read from the body itself."""

from __future__ import annotations

import re

from ...errors import bad_request

_NAME = re.compile(rb'content-disposition:[^\r\n]*?;\s*name="([^"]*)"', re.IGNORECASE)
_FILENAME = re.compile(rb";\s*filename\*?=", re.IGNORECASE)
# The longest text field read (a prompt of a transcription is the longest OpenAI documents).
MAX_FIELD = 64 * 1024


def is_form(raw: bytes) -> bool:
    return raw.startswith(b"--")


def _parts(raw: bytes) -> list[tuple[bytes, int, int]]:
    """Each part's name and the span of its content in `raw`."""
    end_of_line = raw.find(b"\r\n")
    if not is_form(raw) or end_of_line < 3:
        raise bad_request("The request body is not multipart/form-data", "invalid_form")
    delimiter = b"\r\n" + raw[:end_of_line]
    out = []
    start = end_of_line + 2
    while True:
        head_end = raw.find(b"\r\n\r\n", start)
        next_part = raw.find(delimiter, start)
        if head_end < 0 or next_part < 0 or head_end > next_part:
            break
        name = _NAME.search(raw, start, head_end)
        if name is not None and not _FILENAME.search(raw, start, head_end):
            out.append((name.group(1), head_end + 4, next_part))
        elif name is not None:
            out.append((b"\x00file:" + name.group(1), head_end + 4, next_part))
        start = next_part + len(delimiter)
        if raw[start : start + 2] == b"--":
            return out
        start += 2  # the delimiter line's CRLF
    raise bad_request("The multipart/form-data body is cut short", "invalid_form")


def fields(raw: bytes) -> dict[str, str]:
    """The form's text fields (its files left out); raises a 400 for a body that is not a
    whole multipart/form-data one."""
    out: dict[str, str] = {}
    for name, start, end in _parts(raw):
        if name.startswith(b"\x00file:") or end - start > MAX_FIELD:
            continue
        out[name.decode("utf-8", "replace")] = raw[start:end].decode("utf-8", "replace")
    return out


def has_file(raw: bytes, name: str) -> bool:
    key = b"\x00file:" + name.encode()
    return any(part == key for part, _, _ in _parts(raw))


def with_field(raw: bytes, name: str, value: str) -> bytes:
    """The body with the text field `name`'s value replaced (it must be there)."""
    for part, start, end in _parts(raw):
        if part == name.encode():
            return raw[:start] + value.encode() + raw[end:]
    raise KeyError(name)
