"""OpenAI's Files and Batch APIs as the fake speaks them, after OpenAI's API reference and the
official SDK's types (`openai.types.file_object`, `batch`, `batch_usage`,
`batch_request_counts`). Each handler is wrapped by `FakeLLM.v1` (recorded for
`/_fake/requests`, the common faults). State is per fake, in memory.

Files: `POST /v1/files` (multipart: a `file` part and `purpose`, one of assistants, batch,
fine-tune, vision, user_data, evals; missing: 400 `missing_required_parameter`) answers the
FileObject (`id` "file-<hex>", `bytes`, `created_at`, `filename`, `purpose`, `status`
"processed"); `GET /v1/files` (`purpose`, `limit` 1..10000, `order` asc|desc (default desc),
`after`) a cursor page (`data`, `first_id`, `last_id`, `has_more`); `GET /v1/files/{id}`;
`GET /v1/files/{id}/content` (the bytes, `application/octet-stream`); `DELETE /v1/files/{id}`
(`{"id", "object": "file", "deleted": true}`). An unknown id: 404 "No such File object: <id>".

Batches: `POST /v1/batches` (`input_file_id` (a `batch` file), `endpoint`, `completion_window`
"24h", `metadata`) answers the Batch in status `validating`. It is run the first time it is
retrieved or listed: each line checked as OpenAI checks a batch input (a JSON object with a
unique `custom_id`, `method` POST, `url` the batch's endpoint, a `body`; otherwise the batch
is `failed` with `errors.data` [{code, line, message, param}] and runs nothing), then answered
as the fake answers that endpoint (chat completions, completions, embeddings; headers of the
create request apply, as for one request). Answers go to an output file, errors to an error
file (purpose `batch_output`, lines `{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}`); the batch is `completed` with `request_counts` and `usage`
(input, cached, output and reasoning tokens, summed). `POST /v1/batches/{id}/cancel`: a batch
not yet run is `cancelling`, then `cancelled` (nothing run, usage zero) when next retrieved; a
finished one: 400. `GET /v1/batches` (`limit` 1..100, default 20; `after`) newest first.

Headers on the create request: `x-fake-batch-hold: 1` keeps the batch `in_progress` when
retrieved (never run: for cancelling), `x-fake-batch-no-usage: 1` leaves `usage` out (batches
from before OpenAI reported it).
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from .media import _read_form
from .settings import request_settings
from .wire import RequestError, json_response, require_object

if TYPE_CHECKING:
    from .endpoints import FakeLLM
    from .settings import RequestSettings

PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
FINAL = ("completed", "failed", "expired", "cancelled")


class BatchAPI:
    def __init__(self, fake: FakeLLM) -> None:
        self.fake = fake
        self.files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.held: set[str] = set()  # batches never run (x-fake-batch-hold)
        self.no_usage: set[str] = set()
        self.headers: dict[str, dict[str, str]] = {}  # each batch's create headers

    # -- files ------------------------------------------------------------------------------

    async def upload(self, request: web.Request, _ctx: RequestSettings, _body: Any) -> web.Response:
        form = await _read_form(request)
        upload = form.files.get("file")
        if upload is None:
            raise RequestError("Missing required parameter: 'file'.", param="file",
                               code="missing_required_parameter")  # fmt: skip
        purpose = form.one("purpose")
        if purpose is None:
            raise RequestError("Missing required parameter: 'purpose'.", param="purpose",
                               code="missing_required_parameter")  # fmt: skip
        if purpose not in PURPOSES:
            raise RequestError(f"Invalid value for 'purpose': '{purpose}'.", param="purpose",
                               code="invalid_value")  # fmt: skip
        return json_response(self._store(upload.filename, purpose, upload.data))

    def _store(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        file: dict[str, Any] = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        self.files[file_id] = (file, data)
        return file

    def _file(self, file_id: str) -> tuple[dict[str, Any], bytes]:
        found = self.files.get(file_id)
        if found is None:
            raise RequestError(f"No such File object: {file_id}", param="id", status=404)
        return found

    async def list_files(
        self, request: web.Request, _ctx: RequestSettings, _body: Any
    ) -> web.Response:
        query = request.query
        limit = _limit(query.get("limit"), 10_000, 10_000)
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise RequestError("Invalid value for 'order'.", param="order", code="invalid_value")
        files = [f for f, _ in self.files.values()]
        if "purpose" in query:
            files = [f for f in files if f["purpose"] == query["purpose"]]
        if order == "desc":
            files.reverse()
        return json_response(_page(files, query.get("after"), limit))

    async def retrieve_file(
        self, request: web.Request, _ctx: RequestSettings, _body: Any
    ) -> web.Response:
        return json_response(self._file(request.match_info["file_id"])[0])

    async def file_content(
        self, request: web.Request, _ctx: RequestSettings, _body: Any
    ) -> web.Response:
        data = self._file(request.match_info["file_id"])[1]
        return web.Response(body=data, content_type="application/octet-stream")

    async def delete_file(
        self, request: web.Request, _ctx: RequestSettings, _body: Any
    ) -> web.Response:
        file_id = request.match_info["file_id"]
        self._file(file_id)
        del self.files[file_id]
        return json_response({"id": file_id, "object": "file", "deleted": True})

    # -- batches ------------------------------------------------------------------------------

    async def create(self, request: web.Request, _ctx: RequestSettings, raw: Any) -> web.Response:
        body = require_object(raw)
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                raise RequestError(f"Missing required parameter: '{name}'.", param=name,
                                   code="missing_required_parameter")  # fmt: skip
        if body["completion_window"] != "24h":
            raise RequestError("Invalid value for 'completion_window'.",
                               param="completion_window", code="invalid_value")  # fmt: skip
        file, _ = self._file(body["input_file_id"])
        if file["purpose"] != "batch":
            raise RequestError("The input file must have purpose 'batch'.",
                               param="input_file_id", code="invalid_value")  # fmt: skip
        now = int(time.time())
        batch = {
            "id": f"batch_{uuid.uuid4().hex[:24]}",
            "object": "batch",
            "endpoint": body["endpoint"],
            "model": None,
            "errors": None,
            "input_file_id": file["id"],
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        self.batches[batch["id"]] = batch
        headers = {k.lower(): v for k, v in request.headers.items()}
        if headers.get("x-fake-batch-hold") == "1":
            self.held.add(batch["id"])
        if headers.get("x-fake-batch-no-usage") == "1":
            self.no_usage.add(batch["id"])
        self.headers[batch["id"]] = {k: v for k, v in headers.items() if k.startswith("x-fake-")}
        return json_response(batch)

    def _batch(self, batch_id: str) -> dict[str, Any]:
        batch = self.batches.get(batch_id)
        if batch is None:
            raise RequestError(f"No batch found with id '{batch_id}'.", param="batch_id",
                               status=404)  # fmt: skip
        return batch

    async def retrieve(
        self, request: web.Request, _ctx: RequestSettings, _body: Any
    ) -> web.Response:
        batch = self._batch(request.match_info["batch_id"])
        await self._advance(request, batch)
        return json_response(batch)

    async def cancel(self, request: web.Request, _ctx: RequestSettings, _body: Any) -> web.Response:
        batch = self._batch(request.match_info["batch_id"])
        if batch["status"] in FINAL or batch["status"] == "cancelling":
            raise RequestError(f"Cannot cancel a batch with status '{batch['status']}'.",
                               code="invalid_request")  # fmt: skip
        batch["status"], batch["cancelling_at"] = "cancelling", int(time.time())
        return json_response(batch)

    async def list_batches(
        self, request: web.Request, _ctx: RequestSettings, _body: Any
    ) -> web.Response:
        limit = _limit(request.query.get("limit"), 100, 20)
        batches = list(reversed(self.batches.values()))
        for batch in batches:
            await self._advance(request, batch)
        return json_response(_page(batches, request.query.get("after"), limit))

    async def _advance(self, request: web.Request, batch: dict[str, Any]) -> None:
        now = int(time.time())
        if batch["status"] == "cancelling":
            batch["status"], batch["cancelled_at"] = "cancelled", now
            self._usage(batch, [])
            return
        if batch["status"] != "validating":
            return
        batch["in_progress_at"] = now
        if batch["id"] in self.held:
            batch["status"] = "in_progress"
            return
        await self._run(request, batch)

    async def _run(self, request: web.Request, batch: dict[str, Any]) -> None:
        now = int(time.time())
        _, data = self._file(batch["input_file_id"])
        lines, errors = _lines(data, batch["endpoint"])
        if errors:
            batch.update(status="failed", failed_at=now, errors={"object": "list", "data": errors})
            return
        handler = self._handler(batch["endpoint"])
        outputs: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        answers: list[Any] = []
        for line in lines:
            ctx = _settings(self.fake, self.headers.get(batch["id"], {}))
            batch["model"] = batch["model"] or line["body"].get("model")
            try:
                response = await handler(request, ctx, line["body"])
                status, body = response.status, orjson.loads(response.body)
            except RequestError as exc:
                status = exc.status
                body = {"error": {"message": exc.message, "type": "invalid_request_error",
                                  "param": exc.param, "code": exc.code}}  # fmt: skip
            out = {
                "id": f"batch_req_{uuid.uuid4().hex[:24]}",
                "custom_id": line["custom_id"],
                "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
                "error": None,
            }
            (outputs if status == 200 else failures).append(out)
            if status == 200:
                answers.append(body)
        name = f"batch_{batch['id']}"
        if outputs:
            file = self._store(f"{name}_output.jsonl", "batch_output", _jsonl(outputs))
            batch["output_file_id"] = file["id"]
        if failures:
            file = self._store(f"{name}_error.jsonl", "batch_output", _jsonl(failures))
            batch["error_file_id"] = file["id"]
        batch["request_counts"] = {
            "total": len(lines),
            "completed": len(outputs),
            "failed": len(failures),
        }
        batch.update(status="completed", finalizing_at=now, completed_at=now)
        self._usage(batch, answers)

    def _usage(self, batch: dict[str, Any], answers: list[Any]) -> None:
        if batch["id"] in self.no_usage:
            return
        usages = [a.get("usage") or {} for a in answers if isinstance(a, dict)]
        prompt = sum(u.get("prompt_tokens", 0) for u in usages)
        output = sum(u.get("completion_tokens", 0) for u in usages)
        cached = sum((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) for u in usages)
        reasoning = sum(
            (u.get("completion_tokens_details") or {}).get("reasoning_tokens", 0) for u in usages
        )
        batch["usage"] = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + output,
        }

    def _handler(self, endpoint: str) -> Any:
        fake = self.fake
        return {
            "/v1/chat/completions": fake.chat_completions,
            "/v1/completions": fake.completions,
            "/v1/embeddings": fake.embeddings,
        }[endpoint]


def _lines(data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The batch's requests, or the errors OpenAI's validation reports (a line each)."""
    lines, errors, seen = [], [], set()
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            line = None
        problem: tuple[str, str, str | None] | None = None
        if not isinstance(line, dict):
            problem = ("invalid_json_line", "This line is not parseable as valid JSON.", None)
        elif not isinstance(line.get("custom_id"), str) or line["custom_id"] in seen:
            problem = (
                "duplicate_custom_id",
                "The custom_id is missing or not unique.",
                "custom_id",
            )
        elif line.get("method") != "POST":
            problem = ("invalid_method", "The method must be POST.", "method")
        elif line.get("url") != endpoint:
            problem = (
                "mismatched_url",
                f"The url must be the batch's endpoint, {endpoint}.",
                "url",
            )
        elif not isinstance(line.get("body"), dict):
            problem = ("invalid_body", "The body must be an object.", "body")
        if problem is not None:
            code, message, param = problem
            errors.append({"code": code, "line": number, "message": message, "param": param})
            continue
        assert isinstance(line, dict)
        seen.add(line["custom_id"])
        lines.append(line)
    if endpoint not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        message = f"The fake does not run batches of {endpoint}."
        errors.append({"code": "unsupported_endpoint", "line": None, "message": message,
                       "param": None})  # fmt: skip
    if not lines and not errors:
        errors.append({"code": "empty_file", "line": None, "message": "The file has no requests.",
                       "param": None})  # fmt: skip
    return lines, errors


def _settings(fake: FakeLLM, headers: dict[str, str]) -> RequestSettings:
    # A batch's requests take the create request's x-fake-* headers, never a fault.
    return request_settings(fake.settings, {k: v for k, v in headers.items() if "fault" not in k})


def _limit(value: str | None, most: int, default: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= most:
        raise RequestError(f"Invalid value for 'limit': must be 1..{most}.", param="limit",
                           code="invalid_value")  # fmt: skip
    return int(value)


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)
