"""The Files and Batch APIs' pieces without Envoy: the paths, a batch file's lines, what a
finished batch is charged, the records and the once-only mark."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from extproc import ownership
from extproc.batches import NOTHING, _batch_usage
from extproc.errors import GatewayError
from extproc.quota.memory import MemoryStore
from extproc.quota.policy import Amounts
from extproc.wire import route
from extproc.wire.base import file_references
from extproc.wire.openai import form
from extproc.wire.openai import objects as wire_objects


@pytest.mark.parametrize(
    ("method", "path", "endpoint", "object_id"),
    [
        ("POST", "/v1/files", wire_objects.UPLOAD, None),
        ("GET", "/v1/files", wire_objects.FILE_LIST, None),
        ("GET", "/v1/files?purpose=batch&limit=5", wire_objects.FILE_LIST, None),
        ("GET", "/v1/files/file-abc", wire_objects.FILE, "file-abc"),
        ("DELETE", "/v1/files/file-abc/", wire_objects.FILE, "file-abc"),
        ("GET", "/v1/files/file-abc/content", wire_objects.FILE_CONTENT, "file-abc"),
        ("POST", "/v1/batches", wire_objects.CREATE_BATCH, None),
        ("GET", "/v1/batches?limit=2", wire_objects.BATCH_LIST, None),
        ("GET", "/v1/batches/batch_1", wire_objects.BATCH, "batch_1"),
        ("POST", "/v1/batches/batch_1/cancel", wire_objects.CANCEL_BATCH, "batch_1"),
    ],
)
def test_the_paths_of_files_and_batches(
    method: str, path: str, endpoint: object, object_id: str | None
) -> None:
    found = route(method, path)
    assert (found.endpoint, found.model_id) == (endpoint, object_id)


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("DELETE", "/v1/files", 405, "GET, POST"),
        ("POST", "/v1/files/file-abc", 405, "GET, DELETE"),
        ("DELETE", "/v1/batches/batch_1", 405, "GET"),
        ("GET", "/v1/batches/batch_1/cancel", 405, "POST"),
        ("GET", "/v1/files/file-abc/other", 404, None),
        ("GET", "/v1/batches//cancel", 404, None),
    ],
)
def test_other_calls_are_refused_as_openai_refuses_them(
    method: str, path: str, status: int, allow: str | None
) -> None:
    with pytest.raises(GatewayError) as raised:
        route(method, path)
    assert raised.value.status == status
    assert dict(raised.value.headers).get("allow") == allow


def line(i: int, **changes: object) -> bytes:
    request = {
        "custom_id": f"r{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    request.update(changes)
    return orjson.dumps(request)


def test_batch_lines_are_read_as_openai_reads_them() -> None:
    content = line(1) + b"\n\n" + line(2) + b"\r\n"
    lines = list(wire_objects.batch_lines(content))
    assert [(x.number, x.url) for x in lines] == [
        (1, "/v1/chat/completions"),
        (3, "/v1/chat/completions"),
    ]
    renamed = orjson.loads(lines[0].with_model("backend-name"))
    assert renamed["custom_id"] == "r1" and renamed["body"]["model"] == "backend-name"
    assert renamed["body"]["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "holds no requests"),
        (b"[1]\n", "Line 1 of the batch input file is not a JSON object"),
        (line(1) + b"\n{", "Line 2 of the batch input file is not JSON"),
        (line(1) + b"\n" + line(1), "Line 2 of the batch input file repeats the custom_id 'r1'"),
        (line(1, method="GET"), "has a method other than POST"),
        (line(1, custom_id=""), "has no custom_id"),
        (line(1, body="text"), "needs a url and a body object"),
    ],
)
def test_a_bad_batch_line_is_named(content: bytes, message: str) -> None:
    with pytest.raises(GatewayError) as raised:
        list(wire_objects.batch_lines(content))
    assert message in raised.value.message
    assert raised.value.status == 400 and raised.value.param == "file"


def test_a_list_names_only_what_it_holds() -> None:
    raw = orjson.dumps(
        {
            "object": "list",
            "data": [{"id": "a"}, {"id": "b"}, {"id": "c"}, {"id": "d"}],
            "first_id": "a",
            "last_id": "d",
            "has_more": False,
        }
    )
    assert wire_objects.objects(raw) == [{"id": "a"}, {"id": "b"}, {"id": "c"}, {"id": "d"}]
    # The team's own, cut to the client's limit: more of them remain.
    kept = orjson.loads(wire_objects.with_objects(raw, [{"id": "b"}, {"id": "d"}], 1))
    assert kept == {
        "object": "list",
        "data": [{"id": "b"}],
        "first_id": "b",
        "last_id": "b",
        "has_more": True,
    }
    # None of the page is the team's: no other team's id shows; the backend's "more" stands.
    empty = orjson.loads(wire_objects.with_objects(raw, [], 5))
    assert empty["data"] == [] and empty["first_id"] is None and empty["last_id"] is None
    assert empty["has_more"] is False
    more = orjson.loads(wire_objects.with_objects(raw.replace(b"false", b"true"), [], 5))
    assert more["data"] == [] and more["last_id"] is None and more["has_more"] is True
    one = b'{"id": "x", "object": "batch"}'
    assert wire_objects.objects(one) == [{"id": "x", "object": "batch"}]
    assert wire_objects.objects(b"not json") is None
    assert wire_objects.objects(b"[1]") is None


def test_every_file_id_in_a_body_is_found() -> None:
    body = {
        "input": [
            {"role": "user", "content": [{"type": "input_file", "file_id": "f1"}]},
            {"type": "computer_call_output", "output": {"file_id": "f2"}},
        ],
        "tools": [{"type": "code_interpreter", "container": {"file_ids": ["f3", 4, "f4"]}}],
        "prompt": {"variables": {"doc": {"type": "input_file", "file_id": "f5"}}},
        "messages": [{"content": [{"type": "file", "file": {"file_id": "f6"}}]}],
    }
    found = sorted(file_id for _, file_id in file_references(body))
    assert found == ["f1", "f2", "f3", "f4", "f5", "f6"]
    assert file_references({"messages": [{"content": "file_id"}]}) == []


def test_a_file_part_is_read_and_replaced_byte_for_byte() -> None:
    raw = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n'
        b"Content-Type: application/jsonl\r\n\r\nold\r\n--b--\r\n"
    )
    assert form.file_content(raw, "file") == b"old"
    assert form.file_content(raw, "other") is None
    replaced = form.with_file(raw, "file", b"new content")
    assert replaced == raw.replace(b"\r\n\r\nold\r\n", b"\r\n\r\nnew content\r\n")
    assert form.fields(replaced) == {"purpose": "batch"}
    content_type, built = form.build([("purpose", "batch")], [("file", 'a"b.jsonl', b"x\ny")])
    mark = content_type.split("boundary=")[1]
    assert form.fields(built, mark) == {"purpose": "batch"}
    assert form.file_part(built, "file") == ("a%22b.jsonl", b"x\ny")
    twice = raw.replace(
        b"--b--",
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="y"\r\n\r\nz\r\n--b--',
    )
    with pytest.raises(GatewayError):
        form.file_content(twice, "file")


def batch(**fields: object) -> dict[str, object]:
    return {"id": "batch_1", "object": "batch", **fields}


def test_a_finished_batch_is_charged_what_it_reports() -> None:
    reported = batch(
        status="completed",
        request_counts={"total": 3, "completed": 2, "failed": 1},
        usage={
            "input_tokens": 100,
            "input_tokens_details": {"cached_tokens": 40},
            "output_tokens": 30,
            "output_tokens_details": {"reasoning_tokens": 10},
            "total_tokens": 130,
        },
    )
    usage, amounts = _batch_usage(reported)
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (100, 30, 130)
    assert (usage.cached_tokens, usage.reasoning_tokens) == (40, 10)
    assert amounts == Amounts(100, 30, requests=3, cached_input_tokens=40, reasoning_tokens=10)


def test_a_batch_that_ran_nothing_is_released_and_one_without_usage_is_left_to_expire() -> None:
    failed = batch(status="failed", request_counts={"total": 0, "completed": 0, "failed": 0})
    assert _batch_usage(failed) == (None, NOTHING)
    # It ran but reports no usage (a batch older than usage reports): its reservation stands.
    ran = batch(status="completed", request_counts={"total": 2, "completed": 2, "failed": 0})
    assert _batch_usage(ran) == (None, None)
    bad = batch(status="completed", usage={"input_tokens": -1, "output_tokens": "3"})
    assert _batch_usage(bad) == (None, None)


def test_an_owners_data_and_the_once_only_mark_are_kept() -> None:
    store = MemoryStore()

    async def body() -> None:
        counts = {"url": "/v1/chat/completions", "requests": 2, "prompt": 10, "output": 20}
        await ownership.record(
            store, ownership.FILE, "file-1", ownership.Owner("a", "m", "b", counts)
        )
        owner = await ownership.owned(store, ownership.FILE, "file-1", "a")
        assert owner == ownership.Owner("a", "m", "b", counts)
        with pytest.raises(GatewayError) as raised:
            await ownership.owned(store, ownership.FILE, "file-1", "other")
        assert raised.value.status == 404
        assert raised.value.message == "No such File object: file-1"
        # An id recorded again for another team keeps its first owner.
        await ownership.record(store, ownership.FILE, "file-1", ownership.Owner("z", "m", "b"))
        assert (await ownership.owned(store, ownership.FILE, "file-1", "a")).team == "a"
        assert await ownership.owners(store, ownership.FILE, ["file-1", "nope", ""]) == [
            owner,
            None,
            None,
        ]
        assert await ownership.first_time(store, ownership.BATCH, "batch_1")
        assert not await ownership.first_time(store, ownership.BATCH, "batch_1")
        assert await ownership.first_time(store, ownership.BATCH, "batch_2")

    asyncio.run(body())
