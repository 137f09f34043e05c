"""OpenAI's Files and Batch APIs through the real Envoy with the openai SDK: a batch file is
checked, counted and sent with the backend's model name; a batch reserves its counts and is
settled at the usage it reports, once; every file and batch is its team's alone."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.admin.v1 import quota_pb2, quota_pb2_grpc

from .conftest import Gateway, running_gateway, sha256_hex

pytestmark = pytest.mark.e2e


def with_batches(config: dict) -> None:
    config["backends"]["fake-a"]["batches"] = True
    config["backends"]["fake-a"]["responses_api"] = True
    teams = config["teams"]
    teams["team-c"] = {
        "keys": [{"sha256": sha256_hex("sk-team-c")}],
        "models": ["gpt-4o", "gpt-4o-mini"],
        "limits": [
            {"name": "daily", "window": "day", "tokens": 5000},
            {"name": "calls", "window": "day", "requests": 50},
        ],
    }
    teams["team-g"] = {
        "keys": [{"sha256": sha256_hex("sk-team-g")}],
        "guardrails": {"request": ["no-secrets"]},
    }
    config.setdefault("guards", {})["no-secrets"] = {"type": "deny", "keywords": ["password"]}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("batches"), edit=with_batches) as g:
        yield g


def client(gw: Gateway, key: str = "sk-team-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


def jsonl(*lines: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat_line(i: int, model: str = "gpt-4o", **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}]
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": messages, **body},
    }


def usage(gw: Gateway, team: str) -> dict[str, Any]:
    with grpc.insecure_channel(gw.sidecar_listen) as channel:
        stub = quota_pb2_grpc.QuotaAdminStub(channel)
        reply = stub.GetUsage(quota_pb2.GetUsageRequest(team=team), timeout=10)
    return {lim.name: lim for lim in reply.limits}


def settled(gw: Gateway, team: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        found = usage(gw, team)
        if all(lim.reserved == 0 for lim in found.values()):
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.05)


def tokens_counted(gw: Gateway, team: str) -> float:
    """extproc_tokens_total of the team, input and output."""
    url = f"http://{gw.config['observability']['metrics']['listen']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "extproc_tokens_total"
        and s.labels.get("team") == team
        and s.labels.get("type") in ("input", "output")
    )


def finished(c: openai.OpenAI, batch_id: str) -> Any:
    for _ in range(50):
        batch = c.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.05)
    pytest.fail(f"batch {batch_id} did not finish: {batch.status}")


def test_a_batch_runs_with_the_backends_model_name_and_its_output_is_the_teams(
    gw: Gateway,
) -> None:
    c = client(gw)
    upload = c.files.create(
        file=("in.jsonl", jsonl(*(chat_line(i) for i in range(3)))), purpose="batch"
    )
    assert upload.purpose == "batch" and upload.id
    sent = gw.fake_requests(gw.fake_a)[-1]
    assert sent["path"] == "/v1/files"
    # The backend got the file with its own name for the model; every other field as it was.
    content = c.files.content(upload.id).read()
    lines = [json.loads(line) for line in content.splitlines()]
    assert [line["body"]["model"] for line in lines] == ["fake-gpt-4o"] * 3
    assert [line["custom_id"] for line in lines] == ["req-0", "req-1", "req-2"]

    batch = c.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = finished(c, batch.id)
    assert done.status == "completed" and done.output_file_id
    output = [json.loads(x) for x in c.files.content(done.output_file_id).read().splitlines()]
    assert sorted(o["custom_id"] for o in output) == ["req-0", "req-1", "req-2"]
    assert all(o["response"]["status_code"] == 200 for o in output)
    # The team's own objects, listed; the SDK's paging reads the filtered page.
    assert batch.id in [b.id for b in c.batches.list()]
    files = [f.id for f in c.files.list()]
    assert upload.id in files and done.output_file_id in files


def test_another_team_cannot_reach_a_teams_files_or_batches(gw: Gateway) -> None:
    a, other = client(gw), client(gw, "sk-team-c")
    upload = a.files.create(file=("in.jsonl", jsonl(chat_line(1))), purpose="batch")
    batch = a.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    for call in (
        lambda: other.files.retrieve(upload.id),
        lambda: other.files.content(upload.id),
        lambda: other.files.delete(upload.id),
        lambda: other.batches.retrieve(batch.id),
        lambda: other.batches.cancel(batch.id),
        lambda: other.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert upload.id not in [f.id for f in other.files.list()]
    assert batch.id not in [b.id for b in other.batches.list()]
    # Still there for its owner, who may delete it; then it is gone for everyone.
    assert a.files.retrieve(upload.id).id == upload.id
    assert a.files.delete(upload.id).deleted
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(upload.id)


def test_a_batch_reserves_its_counts_and_settles_at_its_usage_once(gw: Gateway) -> None:
    c = client(gw, "sk-team-c")
    before = settled(gw, "team-c")
    counted = tokens_counted(gw, "team-c")
    upload = c.files.create(
        file=("in.jsonl", jsonl(*(chat_line(i, max_tokens=200) for i in range(4)))),
        purpose="batch",
    )
    batch = c.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    held = usage(gw, "team-c")
    # Reserved: at least the four lines' output caps, and four requests.
    assert held["daily"].reserved >= 4 * 200 + 4
    assert held["calls"].reserved == 4
    done = finished(c, batch.id)
    assert done.usage is not None and done.usage.total_tokens > 0
    after = settled(gw, "team-c")
    assert after["daily"].used - before["daily"].used == done.usage.total_tokens
    assert after["calls"].used - before["calls"].used == 4
    # Seen finished again (a retrieve, a list): not charged again.
    c.batches.retrieve(batch.id)
    list(c.batches.list())
    again = settled(gw, "team-c")
    assert again["daily"].used == after["daily"].used
    # Its tokens are in the team's metrics once, from the request that saw it finished.
    deadline = time.monotonic() + 5
    while tokens_counted(gw, "team-c") - counted < done.usage.total_tokens:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert tokens_counted(gw, "team-c") - counted == done.usage.total_tokens


def test_a_batch_bigger_than_a_limit_is_refused_when_created(gw: Gateway) -> None:
    c = client(gw, "sk-team-c")
    upload = c.files.create(
        file=("in.jsonl", jsonl(*(chat_line(i, max_tokens=2000) for i in range(3)))),
        purpose="batch",
    )
    with pytest.raises(openai.RateLimitError) as raised:
        c.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert raised.value.response.headers.get("x-should-retry") == "false"
    assert "daily" in raised.value.message


def test_a_cancelled_batch_that_ran_nothing_is_released(gw: Gateway) -> None:
    c = client(gw, "sk-team-c")
    before = settled(gw, "team-c")
    upload = c.files.create(file=("in.jsonl", jsonl(chat_line(1))), purpose="batch")
    batch = c.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers={"x-fake-batch-hold": "1"},
    )
    assert c.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    assert finished(c, batch.id).status == "cancelled"
    after = settled(gw, "team-c")
    assert after["daily"].used == before["daily"].used
    assert after["calls"].used == before["calls"].used


def raw_upload(
    gw: Gateway, content: bytes, purpose: str = "batch", key: str = "sk-team-a"
) -> tuple[int, dict]:
    boundary = "----extproc-test"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return post_form(gw, body, boundary, key)


def post_form(gw: Gateway, body: bytes, boundary: str, key: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{gw.base_url}/files",
        data=body,
        headers={
            "authorization": f"Bearer {key}",
            "content-type": f"multipart/form-data; boundary={boundary}",
        },
    )
    try:
        with urllib.request.urlopen(request) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


@pytest.mark.parametrize(
    ("content", "purpose", "key", "status", "code"),
    [
        (jsonl(chat_line(1)), "assistants", "sk-team-a", 400, "unsupported_purpose"),
        (b"not json\n", "batch", "sk-team-a", 400, "invalid_batch_file"),
        (jsonl(chat_line(1), chat_line(1)), "batch", "sk-team-a", 400, "invalid_batch_file"),
        (jsonl(chat_line(1), chat_line(2, "gpt-4o-mini")), "batch", "sk-team-a", 400,
         "mixed_batch_file"),
        (jsonl(chat_line(1, stream=True)), "batch", "sk-team-a", 400, "invalid_batch_file"),
        (jsonl({**chat_line(1), "url": "/v1/images/generations"}), "batch", "sk-team-a", 400,
         "unsupported_batch_endpoint"),
        # Not on the team's allow-list: the same 404 as a request to it.
        (jsonl(chat_line(1, "llama-8b")), "batch", "sk-team-c", 404, "model_not_found"),
        # One backend that does not run batches.
        (jsonl(chat_line(1, "llama-8b")), "batch", "sk-team-a", 400, "batches_not_supported"),
        # A pool or canary: no one backend to run it.
        (jsonl(chat_line(1, "canary")), "batch", "sk-team-a", 400, "batches_not_supported"),
        (jsonl(chat_line(1)), "batch", "sk-team-g", 403, "batch_guarded"),
        # What the gateway cannot count before the batch runs, or could be another team's.
        (jsonl({**chat_line(1), "body": {"model": "gpt-4o", "messages": [{"role": "user",
         "content": [{"type": "image_url", "image_url": {"url": "https://x.invalid/a.png"}}]}]}}),
         "batch", "sk-team-a", 400, "unsupported_batch_content"),
        (jsonl({**chat_line(1), "body": {"model": "gpt-4o", "messages": [{"role": "user",
         "content": "hi"}], "metadata": {"file_id": "file-x"}}}), "batch", "sk-team-a", 400,
         "unsupported_batch_content"),
    ],
)  # fmt: skip
def test_an_upload_the_gateway_cannot_govern_is_refused(
    gw: Gateway, content: bytes, purpose: str, key: str, status: int, code: str
) -> None:
    count = len(gw.fake_requests(gw.fake_a))
    got, answer = raw_upload(gw, content, purpose, key)
    assert (got, answer["error"]["code"]) == (status, code), answer
    assert len(gw.fake_requests(gw.fake_a)) == count  # nothing reached the backend


def test_a_batch_on_a_file_not_uploaded_for_batches_is_refused(gw: Gateway) -> None:
    c = client(gw)
    upload = c.files.create(file=("in.jsonl", jsonl(chat_line(1))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as raised:
        c.batches.create(
            input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
        )
    assert raised.value.code == "invalid_value"
    with pytest.raises(openai.NotFoundError):
        c.batches.create(
            input_file_id="file-nobody", endpoint="/v1/chat/completions", completion_window="24h"
        )


def test_a_file_by_id_in_a_request_must_be_the_teams(gw: Gateway) -> None:
    a, other = client(gw), client(gw, "sk-team-c")
    upload = a.files.create(file=("in.jsonl", jsonl(chat_line(1))), purpose="batch")
    part = {"type": "file", "file": {"file_id": upload.id}}
    messages: Any = [{"role": "user", "content": [part, {"type": "text", "text": "Repeat it."}]}]
    before = len(gw.fake_requests(gw.fake_a))
    with pytest.raises(openai.NotFoundError) as raised:
        other.chat.completions.create(model="gpt-4o", messages=messages)
    assert raised.value.code == "file_not_found"
    items: Any = [
        {"role": "user", "content": [{"type": "input_file", "file_id": upload.id}]},
    ]
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model="gpt-4o", input=items)
    # Wherever a request names it: a code interpreter's files too.
    tools: Any = [
        {"type": "code_interpreter", "container": {"type": "auto", "file_ids": [upload.id]}}
    ]
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model="gpt-4o", input="Run it.", tools=tools)
    assert len(gw.fake_requests(gw.fake_a)) == before  # nothing reached the backend
    # Its own team's request goes on with it.
    a.chat.completions.create(model="gpt-4o", messages=messages)
    sent = gw.fake_requests(gw.fake_a)[-1]
    assert sent["body"]["messages"][0]["content"][0] == part


def test_the_sdks_paging_lists_every_batch_of_the_team_and_no_other(gw: Gateway) -> None:
    a, b = client(gw), client(gw, "sk-team-b")
    mine, theirs = [], []
    for owner, ids in ((a, mine), (b, theirs), (a, mine), (b, theirs), (a, mine)):
        line = chat_line(1, "gpt-4o-mini")
        upload = owner.files.create(file=("in.jsonl", jsonl(line)), purpose="batch")
        ids.append(
            owner.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            ).id
        )
    # One a page: the SDK follows the cursor page after page, through the other team's.
    listed = [b.id for b in a.batches.list(limit=1)]
    assert set(mine) <= set(listed) and not set(theirs) & set(listed)
    assert len(listed) == len(set(listed))
    page = a.batches.list(limit=1)
    assert page.has_more and page.last_id in mine  # type: ignore[attr-defined]
    # The gateway asked for the largest page, and for an answer it can read (not compressed).
    sent = gw.fake_requests(gw.fake_a)[-1]
    assert sent["path"] == "/v1/batches" and "accept-encoding" not in sent["headers"]


def test_a_multipart_trick_cannot_show_the_gateway_one_file_and_the_backend_another(
    gw: Gateway,
) -> None:
    boundary = "----extproc-trick"
    decoy = jsonl(chat_line(1, max_tokens=1))
    hidden = jsonl(*(chat_line(i, "llama-8b", max_tokens=4000) for i in range(3)))
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
            "\r\n"
        ).encode()
        + decoy
        + (
            f"\r\n--{boundary}\r\n"
            'X-Content-Disposition: form-data; name="notes"\r\n'
            'Content-Disposition: form-data; name="file"; filename="b.jsonl"\r\n\r\n'
        ).encode()
        + hidden
        + f"\r\n--{boundary}--\r\n".encode()
    )
    count = len(gw.fake_requests(gw.fake_a))
    status, answer = post_form(gw, body, boundary, "sk-team-c")
    assert (status, answer["error"]["code"]) == (400, "invalid_form")
    assert len(gw.fake_requests(gw.fake_a)) == count
    # A file the gateway accepts is sent as it read it: one part, built anew.
    c = client(gw, "sk-team-c")
    upload = c.files.create(file=("one.jsonl", decoy), purpose="batch")
    assert upload.filename == "one.jsonl"
    sent = gw.fake_requests(gw.fake_a)[-1]
    assert "extproc-" in sent["headers"]["content-type"]
    sent_lines = [json.loads(x) for x in c.files.content(upload.id).read().splitlines()]
    expected = chat_line(1, max_tokens=1)
    assert sent_lines == [{**expected, "body": {**expected["body"], "model": "fake-gpt-4o"}}]
