"""OpenAI's Files and Batch APIs as the gateway reads them: the endpoints, a batch input file's
lines (JSONL: one request each, `{"custom_id", "method": "POST", "url", "body"}`), and the
objects the answers hold (a file, a batch, a list of either). What the gateway does with them
(who owns what, the quota a batch takes) is batches.py's.

References: OpenAI's API reference for files (upload, list, retrieve, content, delete), batches
(create, retrieve, cancel, list), the batch input format, and the Batch object (`usage` is
reported for batches created since September 2025).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from ...errors import bad_request
from ..base import (
    BATCH_OBJECT,
    FILE_OBJECT,
    Endpoint,
    Operation,
    StoredCalls,
    method_not_allowed,
    stored_route,
)

FILE_KIND, BATCH_KIND = FILE_OBJECT, BATCH_OBJECT
UPLOAD = Endpoint(Operation.UPLOAD, "/v1/files", form=True, kind=FILE_KIND)
FILE_LIST = Endpoint(Operation.LIST_STORED, "/v1/files", kind=FILE_KIND)
FILE = Endpoint(Operation.STORED, "/v1/files/{file_id}", kind=FILE_KIND)
FILE_CONTENT = Endpoint(Operation.STORED, "/v1/files/{file_id}/content", kind=FILE_KIND)
CREATE_BATCH = Endpoint(Operation.BATCH, "/v1/batches", kind=BATCH_KIND)
BATCH_LIST = Endpoint(Operation.LIST_STORED, "/v1/batches", kind=BATCH_KIND)
BATCH = Endpoint(Operation.STORED, "/v1/batches/{batch_id}", kind=BATCH_KIND)
CANCEL_BATCH = Endpoint(Operation.STORED, "/v1/batches/{batch_id}/cancel", kind=BATCH_KIND)

_COLLECTIONS = {UPLOAD.path: (UPLOAD, FILE_LIST), CREATE_BATCH.path: (CREATE_BATCH, BATCH_LIST)}
_FILE_CALLS: StoredCalls = {"": (FILE, ("GET", "DELETE")), "/content": (FILE_CONTENT, ("GET",))}
_BATCH_CALLS: StoredCalls = {"": (BATCH, ("GET",)), "/cancel": (CANCEL_BATCH, ("POST",))}
# A batch ends in one of these: its usage is final.
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# OpenAI's limits on a batch input file.
MAX_LINES = 50_000


def route(method: str, path: str) -> tuple[Endpoint, str | None] | None:
    """The endpoint and, for a call on one file or batch, its id."""
    found = _COLLECTIONS.get(path)
    if found is not None:
        create, listing = found
        if method == "POST":
            return create, None
        if method == "GET":
            return listing, None
        raise method_not_allowed(method, path, ("GET", "POST"))
    return stored_route(UPLOAD.path + "/", _FILE_CALLS, method, path) or stored_route(
        CREATE_BATCH.path + "/", _BATCH_CALLS, method, path
    )


@dataclass(frozen=True, slots=True)
class BatchLine:
    number: int  # from 1, as OpenAI numbers a batch's errors
    url: str
    body: dict[str, Any]
    request: dict[str, Any]  # the whole line

    def with_model(self, model: str) -> bytes:
        """The line with its body's model replaced (the backend's name for it)."""
        return orjson.dumps({**self.request, "body": {**self.body, "model": model}})


def batch_lines(content: bytes) -> Iterator[BatchLine]:
    """The requests of a batch input file, checked as OpenAI checks them (400 naming the line
    otherwise): a JSON object a line, each with a unique custom_id, POST, a url, a body."""
    seen: set[str] = set()
    number = 0
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        if number > MAX_LINES:
            message = f"A batch input file holds at most {MAX_LINES} requests"
            raise bad_request(message, "too_many_requests", "file")
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise _bad_line(number, "is not JSON") from None
        if not isinstance(request, dict):
            raise _bad_line(number, "is not a JSON object")
        custom_id, method, url = request.get("custom_id"), request.get("method"), request.get("url")
        body = request.get("body")
        if not isinstance(custom_id, str) or not custom_id:
            raise _bad_line(number, "has no custom_id")
        if custom_id in seen:
            raise _bad_line(number, f"repeats the custom_id '{custom_id}'")
        seen.add(custom_id)
        if method != "POST":
            raise _bad_line(number, "has a method other than POST")
        if not isinstance(url, str) or not isinstance(body, dict):
            raise _bad_line(number, "needs a url and a body object")
        yield BatchLine(number, url, body, request)
    if not seen:
        raise bad_request("The batch input file holds no requests", "empty_file", "file")


def _bad_line(number: int, what: str) -> Exception:
    return bad_request(
        f"Line {number} of the batch input file {what}", "invalid_batch_file", "file"
    )


def file_id(raw: bytes) -> str | None:
    """The id of the file an upload's answer describes."""
    answer = _json(raw)
    value = answer.get("id") if answer is not None else None
    return value if isinstance(value, str) and value else None


def objects(raw: bytes) -> list[dict[str, Any]] | None:
    """The objects an answer holds: one (a file, a batch), or a list's `data`; None when it
    is not a JSON object."""
    answer = _json(raw)
    if answer is None:
        return None
    if answer.get("object") == "list":
        data = answer.get("data")
        return [o for o in data if isinstance(o, dict)] if isinstance(data, list) else []
    return [answer]


def with_objects(raw: bytes, kept: list[dict[str, Any]], limit: int) -> bytes:
    """A list answer holding the first `limit` of `kept`, the objects left of the backend's
    page (the gateway asked it for the largest). Its cursor names only what it holds: the next
    page starts after its last object, as the SDK asks for it; `has_more` when the backend's
    page had more, or `kept` more than `limit` (an empty page may say so: the backend's page
    held none of the team's, and there is no cursor of the team's to go on from)."""
    answer = _json(raw) or {}
    page = kept[:limit]
    answer["data"] = page
    answer["first_id"] = page[0].get("id") if page else None
    answer["last_id"] = page[-1].get("id") if page else None
    answer["has_more"] = len(kept) > limit or answer.get("has_more") is True
    return orjson.dumps(answer)


def _json(raw: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
