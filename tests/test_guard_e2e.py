"""Guardrails through the real Envoy, with the openai SDK as the client and the fake LLM as the
backend, the safety models, the moderation API and the webhook."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import yaml

from extproc.admin.v1 import quota_pb2, quota_pb2_grpc

from .test_quota_e2e import MODEL, Gateway, gateway_config, new_ports, running_stack

# Starts a real Envoy, Redis or Prometheus: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

SECRET = "sk-proj-Abc123Def456Ghi789Jkl012Mno345"


def guard_config(ports: dict[str, int]) -> dict[str, Any]:
    config = gateway_config(ports, {"g": [], "lenient": [], "hooked": []}, {})
    config["sidecar"]["reload_interval_s"] = 0.2
    fake = f"http://127.0.0.1:{ports['fake']}"
    config["guards"] = {
        "deny": {"type": "deny", "keywords": ["forbidden-word"]},
        "pii": {"type": "pii", "action": "mask"},
        "size": {"type": "max_prompt_tokens", "max_tokens": 200},
        "llama": {
            "type": "llama_guard",
            "url": f"{fake}/v1",
            "model": "llama-guard-3-8b",
            "timeout_ms": 300,
            "on_error": "block",
        },
        "nemo": {
            "type": "nemoguard",
            "url": f"{fake}/v1",
            "model": "nemoguard-8b-content-safety",
            "timeout_ms": 300,
            "on_error": "allow",
        },
        "hook": {"type": "webhook", "url": f"{fake}/_fake/guard-webhook", "timeout_ms": 1000},
        "secrets-out": {"type": "pii", "entities": ["secret", "email"]},
        "deny-out": {"type": "deny", "keywords": ["self-destruct"]},
    }
    config["guardrails"] = {
        "request": ["deny", "pii", "size", "llama"],
        "response": ["secrets-out", "deny-out"],
    }
    config["teams"]["lenient"]["guardrails"] = {"request": ["pii", "nemo"]}
    config["teams"]["hooked"]["guardrails"] = {"request": ["hook"], "response": []}
    return config


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, dict, Path]]:
    ports = new_ports()
    config = guard_config(ports)
    workdir = tmp_path_factory.mktemp("guards")
    with running_stack(workdir, config) as gw:
        yield gw, {**config, "_fake": f"http://127.0.0.1:{ports['fake']}"}, workdir


def fake_records(config: dict) -> list[dict]:
    with urllib.request.urlopen(f"{config['_fake']}/_fake/requests", timeout=5) as resp:
        return json.loads(resp.read())


def backend_records(config: dict) -> list[dict]:
    """What the backend itself received (not the guard models)."""
    return [
        r
        for r in fake_records(config)
        if r["path"] == "/v1/chat/completions" and (r["body"] or {}).get("model") == MODEL
    ]


def ask(gw: Gateway, team: str, text: str, **kwargs: Any) -> Any:
    # Not closed here: a stream is read after this returns (the client goes with it).
    client = gw.client(team)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], **kwargs
    )


def audit_lines(gw: Gateway) -> list[dict[str, Any]]:
    marker = "extproc.audit: guard decision "
    return [
        json.loads(line.split(marker, 1)[1])
        for line in gw.log_path.read_text(errors="replace").splitlines()
        if marker in line
    ]


def assert_blocked(exc: openai.APIStatusError, guard: str) -> None:
    assert exc.status_code == 403
    body = exc.body if isinstance(exc.body, dict) else {}
    assert body.get("code") == f"guard_blocked:{guard}", exc.body


def test_pii_reaches_the_backend_masked(stack):
    gw, config, _ = stack
    before = len(backend_records(config))
    out = ask(gw, "g", "Mail jane.doe@example.com, card 4111 1111 1111 1111, ssn 123-45-6789")
    assert out.choices[0].message.content
    seen = backend_records(config)[before:]
    assert len(seen) == 1
    content = seen[0]["body"]["messages"][0]["content"]
    assert content == "Mail [EMAIL], card [CREDIT_CARD], ssn [US_SSN]"
    # The safety model saw the masked prompt too: PII never leaves the gateway.
    judged = [r for r in fake_records(config) if "llama-guard" in json.dumps(r["body"] or {})]
    assert judged and "jane.doe" not in json.dumps(judged[-1]["body"])
    # The audit trail says what was masked, never what it was.
    deadline = time.monotonic() + 5
    while not (lines := audit_lines(gw)) and time.monotonic() < deadline:
        time.sleep(0.05)
    masked = [v for line in lines for v in line["verdicts"] if v["guard"] == "pii"]
    assert masked and masked[-1]["counts"] == {"email": 1, "credit_card": 1, "us_ssn": 1}
    log_text = gw.log_path.read_text(errors="replace")
    for raw in ("jane.doe", "4111 1111", "123-45-6789"):
        assert raw not in log_text


def test_deny_keyword_blocks_and_nothing_goes_upstream(stack):
    gw, config, _ = stack
    before = len(fake_records(config))
    with pytest.raises(openai.PermissionDeniedError) as err:
        ask(gw, "g", "please say the Forbidden-Word now")
    assert_blocked(err.value, "deny")
    assert len(fake_records(config)) == before  # neither the backend nor a guard model


def test_unsafe_prompt_is_blocked_by_the_guard_model(stack):
    gw, config, _ = stack
    before = len(backend_records(config))
    with pytest.raises(openai.PermissionDeniedError) as err:
        ask(gw, "g", "how do I do something terrible [[unsafe:S1,S9]]")
    assert_blocked(err.value, "llama")
    assert len(backend_records(config)) == before


def test_prompt_over_the_token_limit_is_blocked(stack):
    gw, _, _ = stack
    with pytest.raises(openai.PermissionDeniedError) as err:
        ask(gw, "g", "word " * 400)
    assert_blocked(err.value, "size")


def test_slow_guard_hits_its_timeout_and_the_policy_decides(stack):
    gw, _, _ = stack
    start = time.monotonic()
    with pytest.raises(openai.InternalServerError) as err:
        ask(gw, "g", "hello [[slow:2000]]")  # llama: 300 ms, on_error block (fail closed)
    # Not a policy block: the guard judged nothing, so the client is told to retry.
    assert err.value.status_code == 503
    assert err.value.body["code"] == "guard_unavailable:llama", err.value.body
    assert err.value.body["type"] == "server_error"
    assert err.value.response.headers["retry-after"] == "1"
    assert time.monotonic() - start < 1.5
    start = time.monotonic()
    out = ask(gw, "lenient", "hello [[slow:2000]]")  # nemo: 300 ms, on_error allow (fail open)
    assert out.choices[0].message.content
    assert time.monotonic() - start < 1.5


def test_webhook_can_rewrite_or_block(stack):
    gw, config, _ = stack
    before = len(backend_records(config))
    ask(gw, "hooked", "I like cats [[rewrite:cats=>dogs]]")
    (seen,) = backend_records(config)[before:]
    assert seen["body"]["messages"][0]["content"].strip() == "I like dogs"
    with pytest.raises(openai.PermissionDeniedError) as err:
        ask(gw, "hooked", "[[unsafe]] do it")
    assert_blocked(err.value, "hook")


def test_buffered_response_with_a_secret_is_masked(stack):
    gw, _, _ = stack
    out = ask(
        gw, "g", "what is the key?", extra_headers={"x-fake-response-text": f"the key {SECRET} ok"}
    )
    assert out.choices[0].message.content == "the key [SECRET] ok"


def test_buffered_response_denied_is_replaced_by_the_error(stack):
    gw, _, _ = stack
    with pytest.raises(openai.PermissionDeniedError) as err:
        ask(gw, "g", "go", extra_headers={"x-fake-response-text": "now self-destruct please"})
    assert_blocked(err.value, "deny-out")


@pytest.mark.parametrize("chunk_chars", [1, 3, 7])
def test_streamed_secret_split_across_chunks_reaches_the_client_masked(stack, chunk_chars):
    gw, _, _ = stack
    text = f"key: {SECRET} and mail bob@example.org, bye"
    stream = ask(
        gw,
        "g",
        "the key?",
        stream=True,
        extra_headers={"x-fake-response-text": text, "x-fake-chunk-chars": str(chunk_chars)},
    )
    received = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert received == "key: [SECRET] and mail [EMAIL], bye"


def test_streamed_denied_output_ends_the_stream_with_an_error_event(stack):
    gw, _, _ = stack
    stream = ask(
        gw,
        "g",
        "go",
        stream=True,
        extra_headers={
            "x-fake-response-text": "counting down, then self-destruct and more text after",
            "x-fake-chunk-chars": "5",
        },
    )
    received = ""
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            if chunk.choices:
                received += chunk.choices[0].delta.content or ""
    assert "guard_blocked:deny-out" in str(err.value.body)
    assert "self-destruct" not in received


def test_policy_change_applies_within_a_second_while_a_stream_flows(stack):
    gw, _, workdir = stack
    path = workdir / "gateway.yaml"
    original = path.read_text()
    result: dict[str, Any] = {}

    def long_stream() -> None:
        try:
            stream = ask(
                gw,
                "g",
                "count slowly",
                stream=True,
                max_tokens=30,
                extra_headers={"x-fake-tokens-per-second": "10", "x-fake-response-tokens": "30"},
            )
            # The response guards hold text back (up to the longest secret they mask), so the
            # deltas come bunched: compare the text.
            result["text"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except Exception as exc:  # the assertion below reports it
            result["error"] = repr(exc)

    worker = threading.Thread(target=long_stream)
    worker.start()
    try:
        time.sleep(0.5)
        new = yaml.safe_load(original)
        new["guards"]["deny"]["keywords"].append("newly-banned")
        path.write_text(yaml.safe_dump(new, sort_keys=False))
        changed_at = time.monotonic()
        while True:
            try:
                ask(gw, "g", "is newly-banned allowed?")
            except openai.PermissionDeniedError as exc:
                assert_blocked(exc, "deny")
                break
            assert time.monotonic() - changed_at < 1.0, "the new policy took over a second"
            time.sleep(0.05)
        applied_after = time.monotonic() - changed_at
        # An invalid policy is rejected; the new one keeps serving.
        broken = yaml.safe_load(path.read_text())
        broken["guards"]["deny"]["patterns"] = ["(unclosed"]
        path.write_text(yaml.safe_dump(broken, sort_keys=False))
        time.sleep(0.6)
        with pytest.raises(openai.PermissionDeniedError):
            ask(gw, "g", "is newly-banned allowed?")
    finally:
        path.write_text(original)
        worker.join(20)
    print(f"\nnew guard policy applied after {applied_after:.2f} s")
    assert result == {"text": "".join(f" tok{i}" for i in range(30))}
    time.sleep(0.6)
    assert ask(gw, "g", "is newly-banned allowed?").choices[0].message.content


def test_verdicts_are_counted_per_guard_and_action(stack):
    gw, _, _ = stack
    ask(gw, "g", "write to a@example.com")
    with pytest.raises(openai.PermissionDeniedError):
        ask(gw, "g", "[[unsafe]]")
    with grpc.insecure_channel(gw.admin.address) as channel:
        stats = quota_pb2_grpc.QuotaAdminStub(channel).GetStats(
            quota_pb2.GetStatsRequest(), timeout=5
        )
    counts = dict(stats.guard_verdicts)
    assert counts["pii:rewrite"] >= 1
    assert counts["llama:block"] >= 1
    assert counts["llama:allow"] >= 1
