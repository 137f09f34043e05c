"""OpenAI's Files API and Batch API as the fake speaks them, after OpenAI's published API
reference and the official SDK's types (`openai.types.file_object`, `file_create_params`,
`file_list_params`, `batch`, `batch_create_params`, `batch_list_params`, `batch_usage`,
`batch_request_counts`, `batch_error`). Each handler is wrapped by `FakeLLM.v1`, so it is
recorded for `/_fake/requests` and takes the common faults (`x-fake-fault`, `--fault`). What
the fake keeps (files and their bytes, batches) is in memory, per fake.

Files. `POST /v1/files` (multipart/form-data, read with aiohttp's multipart reader): a `file`
part and a `purpose` field (assistants, batch, fine-tune, vision, user_data or evals) are
required: missing, 400 `missing_required_parameter` naming the param; another purpose, 400
`invalid_value`. `expires_after[anchor]` (`created_at`) and `expires_after[seconds]`
(3600..2592000) go together and set `expires_at`; without them a `batch` file expires after 30
days, as the reference says, any other never (`expires_at` null). The answer is the FileObject
`{"id": "file-<hex>", "object": "file", "bytes", "created_at", "filename", "purpose", "status":
"processed", "expires_at", "status_details": null}`. The request's record shows the form as its
body: the fields and the file as `{"filename", "content_type", "bytes"}`.
`GET /v1/files` (`purpose`, `limit` 1..10000 (default 10000), `order` `asc`|`desc` (default
`desc`, by creation), `after` (an id: the files past it)) answers a cursor page `{"object":
"list", "data", "first_id", "last_id", "has_more"}`; `GET /v1/files/{id}` the FileObject;
`GET /v1/files/{id}/content` the bytes as uploaded (`application/octet-stream`);
`DELETE /v1/files/{id}` `{"id", "object": "file", "deleted": true}`. An unknown file: 404
`{"message": "No such File object: <id>", "type": "invalid_request_error", "param": "id",
"code": null}`.

Batches. `POST /v1/batches` (JSON): `input_file_id`, `endpoint` and `completion_window` are
required (400 `missing_required_parameter`); `completion_window` is `24h`; `endpoint` one the
reference lists (/v1/responses, /v1/chat/completions, /v1/embeddings, /v1/completions,
/v1/moderations, /v1/images/generations, /v1/images/edits; not the withdrawn /v1/videos);
`metadata` at most 16 pairs of strings (keys up to 64 characters, values up to 512);
`output_expires_after` `{"anchor": "created_at", "seconds": 3600..2592000}` sets the output and
error files' `expires_at`. An unknown input file: 404 as above; one whose purpose is not `batch`:
400 `invalid_value`. The answer is the Batch (`id` "batch_<hex>", `object` "batch",
`endpoint`, `model` null, `errors` null, `input_file_id`, `completion_window`, `status`
`validating`, `output_file_id` and `error_file_id` null, `created_at`, `in_progress_at`,
`expires_at` (created_at + 24 h), `finalizing_at`, `completed_at`, `failed_at`, `expired_at`,
`cancelling_at`, `cancelled_at`, `request_counts` `{"total", "completed", "failed"}`,
`metadata`); `usage` is added once the batch is over.

When a batch runs, deterministically for tests: the first time it is retrieved
(`GET /v1/batches/{id}`) or listed (`GET /v1/batches`) after it was created. It is validated as
OpenAI's batch input format says: every non-blank line a JSON object (`invalid_json_line`) with
a `custom_id` string unique in the file (`duplicate_custom_id`), `method` `POST`
(`invalid_method`), `url` the batch's endpoint (`mismatched_url`) and an object `body`
(`invalid_body`); a file that is gone (`missing_input_file`), holds no request (`empty_file`),
or is for an endpoint the fake does not run (`unsupported_endpoint`: /v1/images/edits). Any
such error: the batch is `failed` (`failed_at`, `errors` `{"object": "list", "data": [{"code",
"line", "message", "param"}]}`, one for each bad line, `usage` zero) and runs nothing.
Otherwise `model` is the first line's, `request_counts.total` the lines', and each line is
answered as the fake answers that endpoint (chat completions, completions, embeddings,
moderations, responses, image generations), with the create request's `x-fake-*` headers
(`x-fake-response-tokens`, `x-fake-response-text`, `x-fake-reasoning-tokens`,
`x-fake-no-usage`, ...), never its pacing or faults; `stream: true` in a line is answered 400
(a batch answers whole bodies). Answers with status 200 go to an output file, the others (the
fake's 400s for a bad body) to an error file; both have purpose `batch_output`, are named after
the batch (`batch_<hex>_output.jsonl`, `batch_<hex>_error.jsonl`), and hold a line per request
`{"id": "batch_req_<hex>", "custom_id", "response": {"status_code", "request_id": "req_<hex>",
"body"}, "error": null}`. The batch is then `completed` (`in_progress_at`, `finalizing_at`,
`completed_at`) with `request_counts` and `usage` `{"input_tokens", "input_tokens_details":
{"cached_tokens"}, "output_tokens", "output_tokens_details": {"reasoning_tokens"},
"total_tokens"}`, summed over the answers (`prompt_tokens` / `completion_tokens` and their
details for chat, completions and embeddings; `input_tokens` / `output_tokens` for responses
and images). Runs take turns, one at a time; a run cut short (its client gone) leaves the
batch `validating`, to run whole next time.

`POST /v1/batches/{id}/cancel`: a batch not over is `cancelling` (`cancelling_at`), and
`cancelled` (`cancelled_at`, nothing run, `usage` zero) when next retrieved or listed; a batch
already over or cancelling: 400 `invalid_request`. `GET /v1/batches` (`limit` 1..100, default
20; `after`) newest first, a cursor page as for files. An unknown batch: 404 "No batch found
with id '<id>'.".

Headers on the create request: `x-fake-batch-hold: 1` keeps the batch `in_progress` once
validated (never run: for cancelling it); `x-fake-batch-no-usage: 1` leaves `usage` out of the
batch (as on batches created before OpenAI reported it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from .media import _Form, _read_form, record_form
from .settings import request_settings
from .wire import RequestError, is_int, json_response, missing_parameter, require_object

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .endpoints import FakeLLM
    from .media import MediaAPI
    from .responses import ResponsesAPI
    from .settings import RequestSettings

    _Run = Callable[[web.Request, RequestSettings, Any], Awaitable[web.StreamResponse]]

PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
# BatchCreateParams.endpoint, less /v1/videos ("Batch creation no longer accepts this endpoint").
ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
)
FINAL = ("completed", "failed", "expired", "cancelled")
HOLD_HEADER = "x-fake-batch-hold"
NO_USAGE_HEADER = "x-fake-batch-no-usage"
COMPLETION_WINDOW_S = 86_400
EXPIRY_S = (3_600, 2_592_000)  # expires_after.seconds, output_expires_after.seconds
BATCH_FILE_TTL_S = 2_592_000  # a batch file without expires_after: 30 days
MAX_METADATA = (16, 64, 512)  # pairs, key characters, value characters


@dataclass(slots=True)
class _StoredFile:
    file: dict[str, Any]  # the FileObject
    data: bytes


@dataclass(slots=True)
class _StoredBatch:
    batch: dict[str, Any]  # the Batch object
    headers: dict[str, str]  # the create request's x-fake-* headers
    hold: bool
    usage: bool
    output_ttl: int | None  # output_expires_after.seconds


class BatchAPI:
    def __init__(self, fake: FakeLLM, responses: ResponsesAPI, media: MediaAPI) -> None:
        self.fake = fake
        self.runs: dict[str, _Run] = {
            "/v1/chat/completions": fake.chat_completions,
            "/v1/completions": fake.completions,
            "/v1/embeddings": fake.embeddings,
            "/v1/moderations": fake.moderations,
            "/v1/responses": responses.create,
            "/v1/images/generations": media.images_generations,
        }
        self.files: dict[str, _StoredFile] = {}
        self.batches: dict[str, _StoredBatch] = {}
        self.lock = asyncio.Lock()  # one batch advances at a time

    # ----- files

    async def upload(self, request: web.Request, _ctx: RequestSettings, _body: Any) -> web.Response:
        form = await _read_form(request)
        record_form(self.fake, request, form)
        upload = form.files.get("file")
        if upload is None:
            raise missing_parameter("file")
        purpose = form.one("purpose")
        if purpose is None:
            raise missing_parameter("purpose")
        if purpose not in PURPOSES:
            listed = ", ".join(f"'{p}'" for p in PURPOSES)
            raise RequestError(
                f"Invalid value for 'purpose': '{purpose}'. Supported values are: {listed}.",
                param="purpose",
                code="invalid_value",
            )
        ttl = _form_expiry(form)
        if ttl is None and purpose == "batch":
            ttl = BATCH_FILE_TTL_S
        return json_response(self._store(upload.filename, purpose, upload.data, ttl))

    def _store(self, filename: str, purpose: str, data: bytes, ttl: int | None) -> dict[str, Any]:
        now = int(time.time())
        file: dict[str, Any] = {
            "id": f"file-{uuid.uuid4().hex[:24]}",
            "object": "file",
            "bytes": len(data),
            "created_at": now,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None if ttl is None else now + ttl,
            "status_details": None,
        }
        self.files[file["id"]] = _StoredFile(file, data)
        return file

    def _file(self, file_id: str) -> _StoredFile:
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
            raise RequestError(
                f"Invalid value for 'order': '{order}'. Supported values are: 'asc' and 'desc'.",
                param="order",
                code="invalid_value",
            )
        files = [stored.file for stored in self.files.values()]
        if "purpose" in query:
            files = [f for f in files if f["purpose"] == query["purpose"]]
        if order == "desc":
            files.reverse()
        return json_response(_page(files, query.get("after"), limit))

    async def retrieve_file(
        self, request: web.Request, _ctx: RequestSettings, _body: Any
    ) -> web.Response:
        return json_response(self._file(request.match_info["file_id"]).file)

    async def file_content(
        self, request: web.Request, _ctx: RequestSettings, _body: Any
    ) -> web.Response:
        data = self._file(request.match_info["file_id"]).data
        return web.Response(body=data, content_type="application/octet-stream")

    async def delete_file(
        self, request: web.Request, _ctx: RequestSettings, _body: Any
    ) -> web.Response:
        file_id = request.match_info["file_id"]
        self._file(file_id)
        del self.files[file_id]
        return json_response({"id": file_id, "object": "file", "deleted": True})

    # ----- batches

    async def create(self, request: web.Request, _ctx: RequestSettings, raw: Any) -> web.Response:
        body = require_object(raw)
        for name in ("input_file_id", "endpoint", "completion_window"):
            if body.get(name) is None:
                raise missing_parameter(name)
            if not isinstance(body[name], str):
                raise _bad_type(name, "a string", body[name])
        if body["completion_window"] != "24h":
            raise RequestError(
                f"Invalid value for 'completion_window': "
                f"'{body['completion_window']}'. Supported values are: '24h'.",
                param="completion_window",
                code="invalid_value",
            )
        if body["endpoint"] not in ENDPOINTS:
            listed = ", ".join(f"'{e}'" for e in ENDPOINTS)
            raise RequestError(
                f"Invalid value for 'endpoint': '{body['endpoint']}'. Supported "
                f"values are: {listed}.",
                param="endpoint",
                code="invalid_value",
            )
        metadata = _metadata(body.get("metadata"))
        output_ttl = _expiry(body.get("output_expires_after"), "output_expires_after")
        file = self._file(body["input_file_id"]).file
        if file["purpose"] != "batch":
            raise RequestError(
                f"The input file {file['id']} must have purpose 'batch', not '{file['purpose']}'.",
                param="input_file_id",
                code="invalid_value",
            )
        now = int(time.time())
        batch: dict[str, Any] = {
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
            "expires_at": now + COMPLETION_WINDOW_S,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
        }
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.batches[batch["id"]] = _StoredBatch(
            batch,
            headers={k: v for k, v in headers.items() if k.startswith("x-fake-")},
            hold=headers.get(HOLD_HEADER) == "1",
            usage=headers.get(NO_USAGE_HEADER) != "1",
            output_ttl=output_ttl,
        )
        return json_response(batch)

    def _batch(self, batch_id: str) -> _StoredBatch:
        stored = self.batches.get(batch_id)
        if stored is None:
            raise RequestError(
                f"No batch found with id '{batch_id}'.", param="batch_id", status=404
            )
        return stored

    async def retrieve(
        self, request: web.Request, _ctx: RequestSettings, _body: Any
    ) -> web.Response:
        stored = self._batch(request.match_info["batch_id"])
        async with self.lock:
            await self._advance(request, stored)
        return json_response(stored.batch)

    async def cancel(self, request: web.Request, _ctx: RequestSettings, _body: Any) -> web.Response:
        batch = self._batch(request.match_info["batch_id"]).batch
        if batch["status"] in FINAL or batch["status"] == "cancelling":
            raise RequestError(
                f"Cannot cancel a batch with status '{batch['status']}'.", code="invalid_request"
            )
        batch["status"], batch["cancelling_at"] = "cancelling", int(time.time())
        return json_response(batch)

    async def list_batches(
        self, request: web.Request, _ctx: RequestSettings, _body: Any
    ) -> web.Response:
        limit = _limit(request.query.get("limit"), 100, 20)
        newest_first = list(reversed(self.batches.values()))
        async with self.lock:
            for stored in newest_first:
                await self._advance(request, stored)
        batches = [stored.batch for stored in newest_first]
        return json_response(_page(batches, request.query.get("after"), limit))

    async def _advance(self, request: web.Request, stored: _StoredBatch) -> None:
        batch = stored.batch
        now = int(time.time())
        if batch["status"] == "cancelling":
            batch.update(status="cancelled", cancelled_at=now)
            self._usage(stored, [])
            return
        if batch["status"] != "validating":
            return
        lines, errors = self._validate(batch)
        if errors:
            batch.update(status="failed", failed_at=now, errors={"object": "list", "data": errors})
            self._usage(stored, [])
            return
        model = lines[0]["body"].get("model")
        model = model if isinstance(model, str) else None
        if stored.hold:
            batch.update(status="in_progress", in_progress_at=now, model=model)
            batch["request_counts"]["total"] = len(lines)
            return
        await self._run(request, stored, lines, model)

    def _validate(self, batch: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        stored = self.files.get(batch["input_file_id"])
        if stored is None:
            message = f"The input file {batch['input_file_id']} has been deleted."
            return [], [_error("missing_input_file", None, message, "input_file_id")]
        lines, errors = _lines(stored.data, batch["endpoint"])
        if batch["endpoint"] not in self.runs:
            message = f"The fake does not run batches of {batch['endpoint']}."
            errors.append(_error("unsupported_endpoint", None, message, "endpoint"))
        if not lines and not errors:
            errors.append(_error("empty_file", None, "The input file has no requests.", None))
        return lines, errors

    async def _run(
        self,
        request: web.Request,
        stored: _StoredBatch,
        lines: list[dict[str, Any]],
        model: str | None,
    ) -> None:
        batch = stored.batch
        run = self.runs[batch["endpoint"]]
        # Each line is answered as a request to the endpoint carrying the create request's
        # x-fake-* headers would be, but unpaced and unfaulted: the retrieve that runs the
        # batch answers at once.
        headers = {k: v for k, v in stored.headers.items() if "fault" not in k}
        line_request = request.clone(method="POST", rel_url=batch["endpoint"], headers=headers)
        ctx = replace(
            request_settings(self.fake.settings, headers),
            fault=None,
            ttft=0.0,
            tokens_per_second=0.0,
        )
        outputs: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        answers: list[Any] = []
        for line in lines:
            status, answer = await self._answer(run, line_request, ctx, line["body"])
            out = {
                "id": f"batch_req_{uuid.uuid4().hex[:24]}",
                "custom_id": line["custom_id"],
                "response": {
                    "status_code": status,
                    "request_id": f"req_{uuid.uuid4().hex}",
                    "body": answer,
                },
                "error": None,
            }
            if status == 200:
                outputs.append(out)
                answers.append(answer)
            else:
                failures.append(out)
        # Nothing of the batch changes until every line is answered: a run cut short (the
        # retrieving client gone) leaves it validating, to run whole next time.
        now = int(time.time())
        name = batch["id"]
        if outputs:
            file = self._store(
                f"{name}_output.jsonl", "batch_output", _jsonl(outputs), stored.output_ttl
            )
            batch["output_file_id"] = file["id"]
        if failures:
            file = self._store(
                f"{name}_error.jsonl", "batch_output", _jsonl(failures), stored.output_ttl
            )
            batch["error_file_id"] = file["id"]
        batch["request_counts"] = {
            "total": len(lines),
            "completed": len(outputs),
            "failed": len(failures),
        }
        batch.update(
            status="completed",
            model=model,
            in_progress_at=now,
            finalizing_at=now,
            completed_at=now,
        )
        self._usage(stored, answers)

    async def _answer(
        self, run: _Run, request: web.Request, ctx: RequestSettings, body: dict[str, Any]
    ) -> tuple[int, Any]:
        if body.get("stream") is True:
            error = RequestError(
                "Streaming is not supported in a batch: 'stream' must not be true.",
                param="stream",
                code="invalid_value",
            )
            return error.status, _error_body(error)
        model = body.get("model")
        if isinstance(model, str) and model:
            self.fake.note_model(model)
        try:
            response = await run(request, ctx, body)
        except RequestError as exc:
            return exc.status, _error_body(exc)
        if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
            error = RequestError("The fake answered this request with a stream.", status=500)
            return error.status, _error_body(error)
        return response.status, orjson.loads(response.body)

    def _usage(self, stored: _StoredBatch, answers: list[Any]) -> None:
        if not stored.usage:
            return
        usages = [a.get("usage") or {} for a in answers if isinstance(a, dict)]

        def total(*path: str) -> int:
            count = 0
            for usage in usages:
                value: Any = usage
                for key in path:
                    value = value.get(key) if isinstance(value, dict) else None
                count += value if is_int(value) else 0
            return count

        # Chat, completions and embeddings count prompt/completion tokens; responses and
        # images count input/output tokens.
        inputs = total("prompt_tokens") + total("input_tokens")
        outputs = total("completion_tokens") + total("output_tokens")
        cached = total("prompt_tokens_details", "cached_tokens") + total(
            "input_tokens_details", "cached_tokens"
        )
        reasoning = total("completion_tokens_details", "reasoning_tokens") + total(
            "output_tokens_details", "reasoning_tokens"
        )
        stored.batch["usage"] = {
            "input_tokens": inputs,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": outputs,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": inputs + outputs,
        }


def _lines(data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The batch's requests, and an error for each line that is not one (OpenAI's batch input
    format: custom_id, method, url, body)."""
    lines: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            line = None
        if not isinstance(line, dict):
            message = "This line is not parseable as a JSON object."
            errors.append(_error("invalid_json_line", number, message, None))
            continue
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or custom_id in seen:
            message = "The custom_id is missing, not a string, or not unique in the file."
            errors.append(_error("duplicate_custom_id", number, message, "custom_id"))
        elif line.get("method") != "POST":
            message = "The method must be 'POST'."
            errors.append(_error("invalid_method", number, message, "method"))
        elif line.get("url") != endpoint:
            message = f"The url must be the batch's endpoint, '{endpoint}'."
            errors.append(_error("mismatched_url", number, message, "url"))
        elif not isinstance(line.get("body"), dict):
            message = "The body must be a JSON object."
            errors.append(_error("invalid_body", number, message, "body"))
        else:
            lines.append(line)
        if isinstance(custom_id, str):
            seen.add(custom_id)
    return lines, errors


def _error(code: str, line: int | None, message: str, param: str | None) -> dict[str, Any]:
    return {"code": code, "line": line, "message": message, "param": param}


def _error_body(exc: RequestError) -> dict[str, Any]:
    return {
        "error": {
            "message": exc.message,
            "type": "invalid_request_error",
            "param": exc.param,
            "code": exc.code,
        }
    }


def _bad_type(param: str, expected: str, value: Any) -> RequestError:
    return RequestError(
        f"Invalid type for '{param}': expected {expected}, but got {type(value).__name__}.",
        param=param,
        code="invalid_type",
    )


def _seconds(value: Any, param: str) -> int:
    low, high = EXPIRY_S
    if not is_int(value) or not low <= value <= high:
        raise RequestError(
            f"Invalid '{param}': expected an integer between {low} and {high}, got {value!r}.",
            param=param,
            code="invalid_value",
        )
    return int(value)


def _anchor(value: Any, param: str) -> None:
    if value != "created_at":
        raise RequestError(
            f"Invalid value for '{param}': {value!r}. Supported values are: 'created_at'.",
            param=param,
            code="invalid_value",
        )


def _form_expiry(form: _Form) -> int | None:
    """expires_after[anchor] and expires_after[seconds] of an upload: the seconds, or None."""
    anchor, seconds = form.one("expires_after[anchor]"), form.one("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor is None:
        raise missing_parameter("expires_after[anchor]")
    if seconds is None:
        raise missing_parameter("expires_after[seconds]")
    _anchor(anchor, "expires_after[anchor]")
    number: Any = int(seconds) if seconds.strip().isdigit() else seconds
    return _seconds(number, "expires_after[seconds]")


def _expiry(value: Any, param: str) -> int | None:
    """A JSON expiration policy ({"anchor": "created_at", "seconds"}): the seconds, or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad_type(param, "an object", value)
    for key in value:
        if key not in ("anchor", "seconds"):
            raise RequestError(
                f"Unknown parameter: '{param}.{key}'.",
                param=f"{param}.{key}",
                code="unknown_parameter",
            )
    for key in ("anchor", "seconds"):
        if key not in value:
            raise missing_parameter(f"{param}.{key}")
    _anchor(value["anchor"], f"{param}.anchor")
    return _seconds(value["seconds"], f"{param}.seconds")


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    pairs, key_chars, value_chars = MAX_METADATA
    if not isinstance(value, dict):
        raise _bad_type("metadata", "an object", value)
    if len(value) > pairs:
        raise RequestError(
            f"Invalid 'metadata': too many properties; at most {pairs} are allowed.",
            param="metadata",
            code="invalid_value",
        )
    for key, item in value.items():
        if len(key) > key_chars:
            raise RequestError(
                f"Invalid 'metadata': key '{key[:16]}...' is longer than {key_chars} characters.",
                param="metadata",
                code="invalid_value",
            )
        if not isinstance(item, str):
            raise _bad_type(f"metadata.{key}", "a string", item)
        if len(item) > value_chars:
            raise RequestError(
                f"Invalid 'metadata.{key}': longer than {value_chars} characters.",
                param=f"metadata.{key}",
                code="invalid_value",
            )
    return value


def _limit(value: str | None, most: int, default: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= most:
        raise RequestError(
            f"Invalid 'limit': expected an integer between 1 and {most}, got '{value}'.",
            param="limit",
            code="invalid_value",
        )
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
