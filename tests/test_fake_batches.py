"""The fake's Files and Batch APIs (extproc/devtools/fake_llm/batch_api.py), driven with the
official `openai` SDK, whose types parse every answer: upload, list, content, delete; a batch
validated and run when first retrieved, its output and usage; a failed validation; cancel."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from extproc.devtools.fake_llm import FakeLLMSettings

from .test_fake_llm import _running


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with _running(FakeLLMSettings(name="fake-batches", response_tokens=5)) as port:
        yield openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0, timeout=5
        )


def jsonl(*lines: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat(i: int, url: str = "/v1/chat/completions") -> dict[str, Any]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Hello {i}"}]}
    return {"custom_id": f"c{i}", "method": "POST", "url": url, "body": body}


def test_a_batch_runs_each_line_and_reports_its_usage(client: openai.OpenAI) -> None:
    upload = client.files.create(file=("in.jsonl", jsonl(chat(1), chat(2))), purpose="batch")
    assert (upload.object, upload.purpose, upload.status) == ("file", "batch", "processed")
    assert upload.bytes == len(jsonl(chat(1), chat(2)))
    created = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert created.status == "validating" and created.usage is None
    done = client.batches.retrieve(created.id)
    assert done.status == "completed" and done.model == "gpt-4o-mini"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (2, 2)
    assert done.output_file_id and done.error_file_id is None
    lines = [json.loads(x) for x in client.files.content(done.output_file_id).read().splitlines()]
    assert [x["custom_id"] for x in lines] == ["c1", "c2"]
    answers = [x["response"]["body"] for x in lines]
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in lines)
    assert done.usage is not None
    assert done.usage.input_tokens == sum(a["usage"]["prompt_tokens"] for a in answers)
    assert done.usage.output_tokens == 2 * 5
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_a_line_that_is_not_a_request_fails_the_batch(client: openai.OpenAI) -> None:
    bad = jsonl(chat(1), chat(1), chat(2, url="/v1/embeddings"))
    upload = client.files.create(file=("bad.jsonl", bad), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    failed = client.batches.retrieve(batch.id)
    assert failed.status == "failed" and failed.output_file_id is None
    assert failed.errors is not None and failed.errors.data is not None
    assert [(e.code, e.line) for e in failed.errors.data] == [
        ("duplicate_custom_id", 2),
        ("mismatched_url", 3),
    ]


def test_a_held_batch_is_cancelled_having_run_nothing(client: openai.OpenAI) -> None:
    upload = client.files.create(file=("in.jsonl", jsonl(chat(1))), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers={"x-fake-batch-hold": "1"},
    )
    assert client.batches.retrieve(batch.id).status == "in_progress"
    assert client.batches.cancel(batch.id).status == "cancelling"
    cancelled = client.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled" and cancelled.usage is not None
    assert cancelled.usage.total_tokens == 0
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(batch.id)


def test_files_and_batches_are_listed_newest_first_in_pages(client: openai.OpenAI) -> None:
    ids = [
        client.files.create(file=(f"{i}.jsonl", jsonl(chat(i))), purpose="batch").id
        for i in range(3)
    ]
    page = client.files.list(limit=2, purpose="batch")
    assert [f.id for f in page.data] == ids[:0:-1] and page.has_more
    # (Older files of this module's other tests come after.)
    assert client.files.list(limit=2, after=ids[1], purpose="batch").data[0].id == ids[0]
    assert ids[0] in [f.id for f in client.files.list(order="asc")]
    batches = [
        client.batches.create(
            input_file_id=i, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for i in ids[:2]
    ]
    assert [b.id for b in client.batches.list(limit=2).data] == batches[::-1]


def test_unknown_ids_and_bad_uploads_are_refused_as_openai_refuses_them(
    client: openai.OpenAI,
) -> None:
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
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", b"{}"), purpose="other")  # type: ignore[arg-type]
    upload = client.files.create(file=("x.pdf", b"%PDF"), purpose="user_data")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert client.files.delete(upload.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.content(upload.id)
