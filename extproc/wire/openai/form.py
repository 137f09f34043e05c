"""multipart/form-data bodies (OpenAI's audio transcriptions and translations, file uploads):
the text fields read, a file's content read, and one field's value or one file's content
replaced (the model's name for its backend, a batch file's) with every other byte kept as the
client sent it. After RFC 7578 / 2046: parts between `--boundary` delimiter lines
(the boundary the Content-Type names), each with its headers, a blank line and its content.

The gateway must read the body exactly as the backend will, or a client could show it one
model (or prompt) and the backend another: a body whose first line is not the Content-Type's
delimiter, a part without a readable name, a text field named twice or one too long to read
is refused with a 400 rather than guessed at.
"""

from __future__ import annotations

import re
import uuid

from ...errors import bad_request

# A Content-Disposition's name parameter, quoted or a token (as the backends' parsers take it).
# (At a header line's start: another header that ends in "Content-Disposition" is not it.)
_NAME = re.compile(
    rb'^content-disposition[ \t]*:[^\r\n]*?;[ \t]*name[ \t]*=[ \t]*(?:"([^"]*)"|([^;\s"]+))',
    re.IGNORECASE | re.MULTILINE,
)
_FILENAME_VALUE = re.compile(
    rb';[ \t]*filename[ \t]*=[ \t]*(?:"([^"\r\n]*)"|([^;\s"]+))', re.IGNORECASE
)
_EXTENDED_NAME = re.compile(rb";[ \t]*name\*[ \t]*=", re.IGNORECASE)
_FILENAME = re.compile(rb";[ \t]*filename\*?[ \t]*=", re.IGNORECASE)
_BOUNDARY = re.compile(r';\s*boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
# The longest text field read (a transcription's prompt is the longest OpenAI documents).
MAX_FIELD = 64 * 1024
_FILE = b"\x00file:"


def boundary(content_type: str | None) -> str:
    """The boundary a multipart/form-data Content-Type names (400 when it names none)."""
    found = _BOUNDARY.search(content_type or "")
    if found is None:
        raise bad_request("The multipart/form-data Content-Type names no boundary", "invalid_form")
    return found.group(1) or found.group(2)


def is_form(raw: bytes) -> bool:
    return raw.startswith(b"--")


def check_opening(raw: bytes, mark: str) -> None:
    """The body starts with the delimiter line of `mark`, the Content-Type's boundary (400
    otherwise): the parts are then read with the boundary the backend will use."""
    _opening(raw, mark.encode())


def _opening(raw: bytes, mark: bytes | None) -> tuple[bytes, int]:
    """(the delimiter, where the first part starts); `mark`: the boundary (None: the body's
    first line, once the Content-Type's was checked against it)."""
    end_of_line = raw.find(b"\r\n")
    if mark is None:
        mark = raw[2:end_of_line].rstrip(b" \t") if is_form(raw) and end_of_line > 2 else b""
    opening = b"--" + mark
    if not mark or not raw.startswith(opening) or raw[len(opening) : end_of_line].strip(b" \t"):
        raise bad_request(
            "The request body does not start with the multipart boundary its Content-Type names",
            "invalid_form",
        )
    return b"\r\n" + opening, end_of_line + 2


def _parts(raw: bytes, mark: bytes | None = None) -> list[tuple[bytes, int, int]]:
    """Each part's name and the span of its content in `raw`; `mark` as for _opening."""
    delimiter, start = _opening(raw, mark)
    out = []
    while True:
        head_end = raw.find(b"\r\n\r\n", start)
        next_part = raw.find(delimiter, start)
        if head_end < 0 or next_part < 0 or head_end > next_part:
            break
        name = _NAME.search(raw, start, head_end)
        if name is None or _EXTENDED_NAME.search(raw, start, head_end):
            raise bad_request("A part of the form has no name the gateway can read", "invalid_form")
        value = name.group(1) if name.group(1) is not None else name.group(2)
        is_file = _FILENAME.search(raw, start, head_end) is not None
        out.append((_FILE + value if is_file else value, head_end + 4, next_part))
        start = next_part + len(delimiter)
        if raw[start : start + 2] == b"--":
            return out
        # The delimiter line may carry transport padding before its CRLF (RFC 2046).
        line_end = raw.find(b"\r\n", start)
        if line_end < 0 or raw[start:line_end].strip(b" \t"):
            break
        start = line_end + 2
    raise bad_request("The multipart/form-data body is cut short or malformed", "invalid_form")


def fields(raw: bytes, mark: str | None = None) -> dict[str, str]:
    """The form's text fields (its files left out); raises a 400 for a body that is not a
    whole multipart/form-data one with the boundary `mark`, a text field named twice or
    longer than MAX_FIELD."""
    out: dict[str, str] = {}
    for name, start, end in _parts(raw, mark.encode() if mark is not None else None):
        if name.startswith(_FILE):
            continue
        key = name.decode("utf-8", "replace")
        if key in out:
            raise bad_request(f"The form's field '{key}' is given twice", "invalid_form", key)
        if end - start > MAX_FIELD:
            raise bad_request(
                f"The form's field '{key}' is longer than {MAX_FIELD} bytes", "invalid_form", key
            )
        out[key] = raw[start:end].decode("utf-8", "replace")
    return out


def has_file(raw: bytes, name: str) -> bool:
    key = _FILE + name.encode()
    return any(part == key for part, _, _ in _parts(raw))


def with_field(raw: bytes, name: str, value: str) -> bytes:
    """The body with the text field `name`'s value replaced (it must be there, once: fields()
    refused a body that names it twice)."""
    return _replaced(raw, name.encode(), value.encode())


def file_content(raw: bytes, name: str) -> bytes | None:
    """The content of the file part `name` (None when there is none); 400 when there are two:
    the backend might read either."""
    found = file_part(raw, name)
    return found[1] if found is not None else None


def file_part(raw: bytes, name: str) -> tuple[str, bytes] | None:
    """The file part `name`: (its filename, "" when unreadable; its content), None when there
    is none; 400 when there are two."""
    key = _FILE + name.encode()
    spans = [(start, end) for part, start, end in _parts(raw) if part == key]
    if len(spans) > 1:
        raise bad_request(f"The form's file '{name}' is given twice", "invalid_form", name)
    if not spans:
        return None
    start, end = spans[0]
    head_start = raw.rfind(b"\r\n--", 0, start)
    found = _FILENAME_VALUE.search(raw, max(head_start, 0), start)
    filename = (found.group(1) or found.group(2) or b"") if found is not None else b""
    return filename.decode("utf-8", "replace"), raw[start:end]


def build(fields: list[tuple[str, str]], files: list[tuple[str, str, bytes]]) -> tuple[str, bytes]:
    """A multipart/form-data body of these text fields and files (name, filename, content), with
    a boundary of its own: (its Content-Type, the body)."""
    mark = f"extproc-{uuid.uuid4().hex}"
    out = bytearray()
    for name, value in fields:
        out += (
            f'--{mark}\r\nContent-Disposition: form-data; name="{_quoted(name)}"\r\n\r\n'.encode()
        )
        out += value.encode() + b"\r\n"
    for name, filename, content in files:
        out += (
            f'--{mark}\r\nContent-Disposition: form-data; name="{_quoted(name)}"; '
            f'filename="{_quoted(filename)}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        out += content + b"\r\n"
    out += f"--{mark}--\r\n".encode()
    return f"multipart/form-data; boundary={mark}", bytes(out)


def _quoted(value: str) -> str:
    # (RFC 7578: a quoted name or filename with its quotes and line breaks percent-encoded.)
    return value.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")


def with_file(raw: bytes, name: str, content: bytes) -> bytes:
    """The body with the file part `name`'s content replaced (its headers kept)."""
    return _replaced(raw, _FILE + name.encode(), content)


def _replaced(raw: bytes, key: bytes, value: bytes) -> bytes:
    for part, start, end in _parts(raw):
        if part == key:
            return raw[:start] + value + raw[end:]
    raise KeyError(key.decode(errors="replace"))
