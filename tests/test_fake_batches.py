"""The fake's Files and Batch APIs (extproc/devtools/fake_llm/batches.py), driven with the
official `openai` SDK, whose types parse every answer: upload, list, content, delete; a batch
validated and run when first retrieved, its output and error files and usage; a failed
validation; cancel; the create request's checks; the requests recorded."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from extproc.devtools.fake_llm import FakeLLMSettings

from .test_fake_llm import _http, _running
from .test_fake_media import post_form

DAY = 86_400


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with _running(FakeLLMSettings(name="fake-batches", response_tokens=5)) as port:
        yield openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0, timeout=5
        )


def raw(
    client: openai.OpenAI, method: str, path: str, body: Any = None, **query: str
) -> tuple[int, Any]:
    """A request the SDK would not send as it is: its status and JSON answer."""
    if query:
        path += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"content-type": "application/json"}
    status, _, answer = _http(port(client), path, method=method, body=data, headers=headers)
    return status, json.loads(answer)


def port(client: openai.OpenAI) -> int:
    assert client.base_url.port is not None
    return client.base_url.port


def jsonl(*lines: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat(i: int, url: str = "/v1/chat/completions", **body: Any) -> dict[str, Any]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Hello {i}"}]} | body
    return {"custom_id": f"c{i}", "method": "POST", "url": url, "body": body}


def embed(i: int, text: Any) -> dict[str, Any]:
    body = {"model": "text-embedding-3-small", "input": text}
    return {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": body}


def run(client: openai.OpenAI, data: bytes, endpoint: str, **create: Any) -> openai.types.Batch:
    upload = client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        **create,
    )
    return client.batches.retrieve(batch.id)


def read_lines(client: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in client.files.content(file_id).read().splitlines()]


def test_a_batch_runs_each_line_and_reports_its_usage(client: openai.OpenAI) -> None:
    data = jsonl(chat(1), chat(2), chat(3, max_tokens=2))
    upload = client.files.create(file=("in.jsonl", data), purpose="batch")
    assert (upload.object, upload.purpose, upload.status) == ("file", "batch", "processed")
    assert upload.bytes == len(data) and upload.filename == "in.jsonl"
    assert upload.expires_at == upload.created_at + 30 * DAY  # a batch file's default
    assert upload.id.startswith("file-")
    created = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert created.status == "validating" and created.usage is None and created.model is None
    assert created.id.startswith("batch_") and created.object == "batch"
    assert created.expires_at == created.created_at + DAY
    assert created.metadata == {"job": "nightly"} and created.errors is None
    done = client.batches.retrieve(created.id)
    assert done.status == "completed" and done.model == "gpt-4o-mini"
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 3, "completed": 3, "failed": 0}
    assert done.output_file_id and done.error_file_id is None
    output = client.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output"
    assert output.filename == f"{done.id}_output.jsonl"
    lines = read_lines(client, done.output_file_id)
    assert [x["custom_id"] for x in lines] == ["c1", "c2", "c3"]
    assert all(x["id"].startswith("batch_req_") and x["error"] is None for x in lines)
    assert all(x["response"]["request_id"].startswith("req_") for x in lines)
    assert {x["response"]["status_code"] for x in lines} == {200}
    answers = [x["response"]["body"] for x in lines]
    assert {a["object"] for a in answers} == {"chat.completion"}
    assert done.usage is not None
    assert done.usage.input_tokens == sum(a["usage"]["prompt_tokens"] for a in answers)
    assert done.usage.output_tokens == sum(a["usage"]["completion_tokens"] for a in answers)
    assert done.usage.output_tokens == 5 + 5 + 2
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    assert done.usage.input_tokens_details.cached_tokens == 0
    assert done.usage.output_tokens_details.reasoning_tokens == 0
    # Run once: retrieved again, the batch and its output are as they were.
    assert client.batches.retrieve(created.id) == done


def test_lines_the_endpoint_refuses_go_to_the_error_file(client: openai.OpenAI) -> None:
    bad_input = {
        "custom_id": "e2",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "m"},
    }
    streamed = embed(3, "x") | {"body": {"model": "m", "input": "x", "stream": True}}
    done = run(client, jsonl(embed(1, ["one two", "three"]), bad_input, streamed), "/v1/embeddings")
    assert done.status == "completed" and done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 3, "completed": 1, "failed": 2}
    assert done.output_file_id and done.error_file_id
    assert client.files.retrieve(done.error_file_id).filename == f"{done.id}_error.jsonl"
    (ok,) = read_lines(client, done.output_file_id)
    assert ok["custom_id"] == "e1" and len(ok["response"]["body"]["data"]) == 2
    errors = read_lines(client, done.error_file_id)
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [
        ("e2", 400),
        ("e3", 400),
    ]
    assert [e["response"]["body"]["error"]["param"] for e in errors] == ["input", "stream"]
    assert all(e["error"] is None for e in errors)
    assert done.usage is not None
    assert done.usage.input_tokens == ok["response"]["body"]["usage"]["prompt_tokens"] > 0
    assert (done.usage.output_tokens, done.usage.total_tokens) == (0, done.usage.input_tokens)


def test_the_create_requests_fake_headers_apply_to_its_lines(client: openai.OpenAI) -> None:
    line = {
        "custom_id": "r1",
        "method": "POST",
        "url": "/v1/responses",
        "body": {"model": "gpt-5-mini", "input": "Think"},
    }
    headers = {"x-fake-response-tokens": "7", "x-fake-reasoning-tokens": "3"}
    done = run(client, jsonl(line), "/v1/responses", extra_headers=headers)
    assert done.status == "completed" and done.usage is not None and done.output_file_id
    (out,) = read_lines(client, done.output_file_id)
    assert out["response"]["body"]["object"] == "response"
    assert done.usage.output_tokens == 7
    assert done.usage.output_tokens_details.reasoning_tokens == 3
    assert done.usage.input_tokens == out["response"]["body"]["usage"]["input_tokens"]
    older = run(
        client, jsonl(chat(1)), "/v1/chat/completions", extra_headers={"x-fake-batch-no-usage": "1"}
    )
    assert older.status == "completed" and older.usage is None
    assert "usage" not in raw(client, "GET", f"/v1/batches/{older.id}")[1]


def test_a_line_that_is_not_a_request_fails_the_batch(client: openai.OpenAI) -> None:
    bad = (
        jsonl(chat(1), chat(1), chat(2, url="/v1/embeddings"))
        + b"not json\n\n"
        + jsonl(
            chat(4) | {"method": "GET"},
            {"custom_id": "c5", "method": "POST", "url": "/v1/chat/completions", "body": "hi"},
        )
    )
    failed = run(client, bad, "/v1/chat/completions")
    assert failed.status == "failed" and failed.failed_at
    assert failed.output_file_id is None and failed.error_file_id is None
    assert failed.in_progress_at is None and failed.model is None
    assert failed.errors is not None and failed.errors.object == "list"
    assert [(e.code, e.line, e.param) for e in failed.errors.data or []] == [
        ("duplicate_custom_id", 2, "custom_id"),
        ("mismatched_url", 3, "url"),
        ("invalid_json_line", 4, None),
        ("invalid_method", 6, "method"),
        ("invalid_body", 7, "body"),
    ]
    assert failed.usage is not None and failed.usage.total_tokens == 0
    # A batch of an endpoint the fake does not run, and one whose input file is gone.
    edits = run(client, jsonl(chat(1, url="/v1/images/edits")), "/v1/images/edits")
    assert edits.errors and [e.code for e in edits.errors.data or []] == ["unsupported_endpoint"]
    upload = client.files.create(file=("in.jsonl", jsonl(chat(1))), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    client.files.delete(upload.id)
    gone = client.batches.retrieve(batch.id)
    assert gone.errors and [e.code for e in gone.errors.data or []] == ["missing_input_file"]


def test_a_held_batch_is_cancelled_having_run_nothing(client: openai.OpenAI) -> None:
    upload = client.files.create(file=("in.jsonl", jsonl(chat(1), chat(2))), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers={"x-fake-batch-hold": "1"},
    )
    held = client.batches.retrieve(batch.id)
    assert held.status == "in_progress" and held.in_progress_at and held.model == "gpt-4o-mini"
    assert client.batches.retrieve(batch.id).status == "in_progress"
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    cancelled = client.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    assert cancelled.output_file_id is None and cancelled.request_counts is not None
    assert cancelled.request_counts.model_dump() == {"total": 2, "completed": 0, "failed": 0}
    assert cancelled.usage is not None and cancelled.usage.total_tokens == 0
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(batch.id)
    done = run(client, jsonl(chat(1)), "/v1/chat/completions")
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(done.id)
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_nope")


def test_files_and_batches_are_listed_newest_first_in_pages(client: openai.OpenAI) -> None:
    ids = [
        client.files.create(file=(f"{i}.jsonl", jsonl(chat(i))), purpose="batch").id
        for i in range(3)
    ]
    page = client.files.list(limit=2, purpose="batch")
    assert [f.id for f in page.data] == ids[:0:-1] and page.has_more
    # (Older files of this module's other tests come after.)
    assert client.files.list(limit=2, after=ids[1], purpose="batch").data[0].id == ids[0]
    oldest_first = [f.id for f in client.files.list(order="asc")]
    assert oldest_first.index(ids[0]) < oldest_first.index(ids[1]) < oldest_first.index(ids[2])
    body = raw(client, "GET", "/v1/files", limit="1", purpose="batch")[1]
    assert (body["object"], body["first_id"], body["last_id"]) == ("list", ids[2], ids[2])
    batches = [
        client.batches.create(
            input_file_id=i, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for i in ids
    ]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == batches[:0:-1] and first.has_more
    # Listed is retrieved: each batch listed has run.
    assert {b.status for b in first.data} == {"completed"}
    after = client.batches.list(limit=1, after=batches[1])
    assert [b.id for b in after.data] == [batches[0]]
    assert client.batches.retrieve(batches[0]).status == "completed"
    assert raw(client, "GET", "/v1/batches", limit="101")[0] == 400
    assert raw(client, "GET", "/v1/files", order="up")[0] == 400


def test_uploads_and_creates_are_checked_as_openai_checks_them(client: openai.OpenAI) -> None:
    def upload_error(files: list[tuple[str, str, bytes]], **fields: str) -> dict[str, Any]:
        status, _, answer = post_form(port(client), "/v1/files", list(fields.items()), files)
        assert status == 400
        return dict(json.loads(answer)["error"])

    jsonl_file = [("file", "x.jsonl", jsonl(chat(1)))]
    assert upload_error(jsonl_file) == {
        "message": "Missing required parameter: 'purpose'.",
        "type": "invalid_request_error",
        "param": "purpose",
        "code": "missing_required_parameter",
    }
    assert upload_error([], purpose="batch")["param"] == "file"
    assert upload_error(jsonl_file, purpose="other")["code"] == "invalid_value"
    too_soon = {"expires_after[anchor]": "created_at", "expires_after[seconds]": "60"}
    assert upload_error(jsonl_file, purpose="batch", **too_soon)["param"] == (
        "expires_after[seconds]"
    )
    kept = client.files.create(
        file=("x.pdf", b"%PDF"),
        purpose="user_data",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert kept.expires_at == kept.created_at + 3600
    forever = client.files.create(file=("y.pdf", b"%PDF"), purpose="user_data")
    assert forever.expires_at is None
    assert client.files.content(forever.id).read() == b"%PDF"

    upload = client.files.create(file=("in.jsonl", jsonl(chat(1))), purpose="batch")

    def create_error(**body: Any) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as raised:
            client.batches.create(
                **{
                    "input_file_id": upload.id,
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                    **body,
                }
            )
        return raised.value

    assert create_error(input_file_id=kept.id).status_code == 400  # not a batch file
    assert create_error(input_file_id="file-nope").status_code == 404
    assert create_error(endpoint="/v1/videos").status_code == 400
    assert create_error(endpoint="/v1/chat").status_code == 400
    assert create_error(completion_window="48h").status_code == 400
    assert create_error(metadata={f"k{i}": "v" for i in range(17)}).status_code == 400
    assert create_error(metadata={"k": "v" * 513}).status_code == 400
    wrong_anchor = {"anchor": "completed_at", "seconds": 3600}
    assert create_error(output_expires_after=wrong_anchor).status_code == 400
    status, missing = raw(client, "POST", "/v1/batches", {"input_file_id": upload.id})
    assert status == 400 and missing["error"]["param"] == "endpoint"
    done = run(
        client,
        jsonl(chat(1)),
        "/v1/chat/completions",
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    assert done.output_file_id
    output = client.files.retrieve(done.output_file_id)
    assert output.expires_at == output.created_at + 7200


def test_unknown_ids_are_refused_as_openai_refuses_them(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.files.retrieve("file-nope")
    assert raised.value.body == {
        "message": "No such File object: file-nope",
        "type": "invalid_request_error",
        "param": "id",
        "code": None,
    }
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    upload = client.files.create(file=("x.pdf", b"%PDF"), purpose="user_data")
    deleted = client.files.delete(upload.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (upload.id, "file", True)
    for call in (client.files.content, client.files.retrieve, client.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(upload.id)  # type: ignore[operator]


def test_the_fake_records_its_files_and_batches_requests(client: openai.OpenAI) -> None:
    raw(client, "DELETE", "/_fake/requests")
    upload = client.files.create(file=("rec.jsonl", jsonl(chat(1))), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    client.batches.retrieve(batch.id)
    records = raw(client, "GET", "/_fake/requests")[1]
    assert [(r["method"], r["path"]) for r in records] == [
        ("POST", "/v1/files"),
        ("POST", "/v1/batches"),
        ("GET", f"/v1/batches/{batch.id}"),
    ]
    assert records[0]["body"] == {
        "purpose": "batch",
        "file": {
            "filename": "rec.jsonl",
            "content_type": "application/octet-stream",
            "bytes": upload.bytes,
        },
    }
    assert records[1]["body"]["input_file_id"] == upload.id
    # The common faults apply: a batch retrieved with a 503 is left to run next time.
    other = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.InternalServerError):
        client.batches.retrieve(other.id, extra_headers={"x-fake-fault": "503"})
    assert client.batches.retrieve(other.id).status == "completed"
    # The lines' models are the models the fake was asked for.
    models = [m.id for m in client.models.list()]
    assert "gpt-4o-mini" in models


def test_image_and_moderation_batches_run_as_their_endpoints_answer(
    client: openai.OpenAI,
) -> None:
    image = {"model": "gpt-image-1", "prompt": "A red square", "quality": "low"}
    line = {"custom_id": "i1", "method": "POST", "url": "/v1/images/generations", "body": image}
    done = run(client, jsonl(line), "/v1/images/generations")
    assert done.status == "completed" and done.usage is not None and done.output_file_id
    (out,) = read_lines(client, done.output_file_id)
    usage = out["response"]["body"]["usage"]
    assert (done.usage.input_tokens, done.usage.output_tokens) == (
        usage["input_tokens"],
        usage["output_tokens"],
    )
    moderation = {"model": "omni-moderation-latest", "input": "hello"}
    line = {"custom_id": "m1", "method": "POST", "url": "/v1/moderations", "body": moderation}
    done = run(client, jsonl(line), "/v1/moderations")
    assert done.status == "completed" and done.usage is not None and done.output_file_id
    (out,) = read_lines(client, done.output_file_id)
    assert out["response"]["body"]["results"][0]["flagged"] is False
    assert done.usage.total_tokens == 0
