"""End to end: the official openai SDK -> a real Envoy -> the sidecar -> fake LLM backends."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import BACKEND_A_SECRET, BACKEND_B_SECRET, Gateway, sha256_hex

# Starts a real Envoy, Redis or Prometheus: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "Say hello to the gateway."}]


def client(gw: Gateway, key: str = "sk-team-a", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=20, **kw)


def raw_post(gw: Gateway, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    req = urllib.request.Request(f"{gw.base_url}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def last_request(gw: Gateway, fake: str) -> dict:
    records = [r for r in gw.fake_requests(fake) if r["path"].startswith("/v1/")]
    assert records, "the backend received nothing"
    return records[-1]


def test_chat_non_streaming_rewrites_model_and_credentials(gateway: Gateway):
    gateway.clear_fakes()
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == " tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"
    assert completion.usage.completion_tokens == 8
    h = raw.headers
    assert h["x-aigw-team"] == "team-a"
    assert h["x-aigw-model"] == "gpt-4o"
    assert h["x-aigw-backend"] == "fake-a"
    assert h["x-aigw-provider-model"] == "fake-gpt-4o"
    # json_path: access_log (the default): the answer never waited for the sidecar, so it
    # carries no token headers; its usage reached the sidecar in Envoy's access log.
    assert "x-aigw-prompt-tokens" not in h

    seen = last_request(gateway, gateway.fake_a)
    assert seen["body"]["model"] == "fake-gpt-4o"
    assert seen["body"]["messages"] == MESSAGES
    # The backend gets its own credential, never the client's key, and no internal header.
    assert seen["headers"]["authorization"] == f"Bearer {BACKEND_A_SECRET}"
    assert not [k for k in seen["headers"] if k.startswith("x-aigw-")]


def test_inline_json_path_adds_token_headers(gateway: Gateway):
    original = json.loads(json.dumps(gateway.config))
    inline = json.loads(json.dumps(original))
    inline.setdefault("sidecar", {})["json_path"] = "inline"
    try:
        gateway.write_config(inline)
        deadline = time.monotonic() + 5
        while True:
            raw = client(gateway).chat.completions.with_raw_response.create(
                model="gpt-4o", messages=MESSAGES
            )
            if "x-aigw-prompt-tokens" in raw.headers:
                break
            assert time.monotonic() < deadline, "json_path: inline never applied"
            time.sleep(0.1)
    finally:
        gateway.write_config(original)
    completion, h = raw.parse(), raw.headers
    assert int(h["x-aigw-prompt-tokens"]) == completion.usage.prompt_tokens
    assert int(h["x-aigw-completion-tokens"]) == 8
    assert int(h["x-aigw-total-tokens"]) == completion.usage.total_tokens
    assert h["x-aigw-token-source"] == "provider"
    # The headers Envoy renders are there once, whichever path the answer took.
    assert h.get_list("x-aigw-team") == ["team-a"]
    assert h["x-aigw-backend"] == "fake-a"
    assert h["x-aigw-provider-model"] == "fake-gpt-4o"


def test_chat_streaming_with_usage(gateway: Gateway):
    stream = client(gateway).chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_streaming_without_usage(gateway: Gateway):
    stream = client(gateway).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    )
    chunks = list(stream)
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"


def access_log_line(gateway: Gateway, request_id: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entry = next((e for e in gateway.access_log() if e.get("request_id") == request_id), None)
        if entry is not None:
            return entry
        time.sleep(0.1)
    raise AssertionError(f"no access log line for the request {request_id}")


def test_streams_and_responses_reach_the_access_log(gateway: Gateway):
    c = client(gateway)
    marker = f"access-log-{time.monotonic_ns()}"
    stream = c.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": marker}],
        stream=True,
        extra_headers={"x-request-id": marker},
    )
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content) == 8
    entry = access_log_line(gateway, marker)
    assert entry["team"] == "team-a"
    assert entry["model"] == "gpt-4o-mini"
    assert entry["backend"] == "fake-a"
    assert entry["completion_tokens"] == 8
    assert entry["token_source"] == "provider"

    # A JSON answer the sidecar did not read (json_path: access_log): Envoy copied its usage.
    marker += "-json"
    c.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-request-id": marker}
    )
    entry = access_log_line(gateway, marker)
    assert (entry["team"], entry["backend"], entry["status"]) == ("team-a", "fake-a", 200)
    assert entry["completion_tokens"] == 8
    assert entry["token_source"] == "provider"


def test_legacy_completions(gateway: Gateway):
    out = client(gateway).completions.create(model="gpt-4o-mini", prompt="Once upon a time")
    assert out.choices[0].text.startswith(" tok0")
    assert out.usage.completion_tokens == 8


def test_embeddings_base64_and_float(gateway: Gateway):
    c = client(gateway, key="sk-team-b")
    default = c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(default.data) == 2
    floats = c.embeddings.create(
        model="text-embedding-3-small", input="a", encoding_format="float", dimensions=4
    )
    assert len(floats.data[0].embedding) == 4
    assert floats.usage.prompt_tokens >= 1


def test_models_list_per_team(gateway: Gateway):
    everything = sorted(m.id for m in client(gateway).models.list())
    assert everything == sorted(gateway.config["models"])
    team_b = sorted(m.id for m in client(gateway, key="sk-team-b").models.list())
    assert team_b == ["gpt-4o-mini", "text-embedding-3-small"]
    assert client(gateway).models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        client(gateway, key="sk-team-b").models.retrieve("gpt-4o")


def test_bad_and_missing_keys_are_401(gateway: Gateway):
    gateway.clear_fakes()
    with pytest.raises(openai.AuthenticationError) as err:
        client(gateway, key="sk-not-a-real-key-0000").chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
    assert err.value.status_code == 401
    assert err.value.body["code"] == "invalid_api_key"
    assert "sk-not-a-real-key" not in json.dumps(err.value.body)
    status, body = raw_post(
        gateway, "/chat/completions", b"{}", {"content-type": "application/json"}
    )
    assert status == 401
    assert body["error"]["code"] == "missing_api_key"
    assert not [r for r in gateway.fake_requests(gateway.fake_a) if r["path"].startswith("/v1/")]


def test_malformed_json_is_400(gateway: Gateway):
    status, body = raw_post(
        gateway,
        "/chat/completions",
        b'{"model": "gpt-4o-mini", "messages": [',
        {"authorization": "Bearer sk-team-a", "content-type": "application/json"},
    )
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_json"


def test_wrong_content_type_is_415(gateway: Gateway):
    status, body = raw_post(
        gateway,
        "/chat/completions",
        b"model=gpt-4o-mini",
        {"authorization": "Bearer sk-team-a", "content-type": "application/x-www-form-urlencoded"},
    )
    assert status == 415
    assert body["error"]["code"] == "unsupported_media_type"


def test_body_over_the_limit_is_413(gateway: Gateway):
    big = "x " * (200 * 1024)  # over the 256 KiB limit of the test config once JSON-encoded
    with pytest.raises(openai.APIStatusError) as err:
        client(gateway).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": big}]
        )
    assert err.value.status_code == 413
    assert err.value.body["code"] == "request_too_large"


def test_unknown_or_forbidden_model_is_404(gateway: Gateway):
    with pytest.raises(openai.NotFoundError) as err:
        client(gateway).chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client(gateway, key="sk-team-b").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway).chat.completions.create(model="text-embedding-3-small", messages=MESSAGES)
    assert err.value.body["code"] == "model_not_supported"


def test_routing_by_model_reaches_the_other_backend(gateway: Gateway):
    gateway.clear_fakes()
    out = client(gateway).chat.completions.create(model="llama-8b", messages=MESSAGES)
    assert out.model == "meta-llama/Llama-3.1-8B-Instruct"
    seen = last_request(gateway, gateway.fake_b)
    assert seen["instance"] == "fake-b"
    assert seen["body"]["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    # fake-b takes its key Azure-style, in api-key; no Authorization header is left over.
    assert seen["headers"]["api-key"] == BACKEND_B_SECRET
    assert "authorization" not in seen["headers"]
    assert not [r for r in gateway.fake_requests(gateway.fake_a) if r["path"].startswith("/v1/")]


def test_weighted_split_follows_the_weights(gateway: Gateway):
    n = 400
    c = client(gateway)

    def one(_: int) -> str:
        return c.chat.completions.create(model="canary", messages=MESSAGES, max_tokens=1).model

    with ThreadPoolExecutor(8) as pool:
        served = Counter(pool.map(one, range(n)))
    assert set(served) <= {"canary-stable", "canary-next"}
    share = served["canary-next"] / n
    # 20% expected; 4 standard deviations of a binomial(400, 0.2) is +-8 points.
    assert 0.12 <= share <= 0.28, served


def test_spoofed_internal_headers_are_ignored(gateway: Gateway):
    gateway.clear_fakes()
    raw = client(gateway, key="sk-team-b").chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        extra_headers={
            "x-aigw-team": "team-a",
            "x-aigw-model": "gpt-4o",
            "x-aigw-backend": "fake-b",
            "x-aigw-anything": "1",
        },
    )
    assert raw.headers["x-aigw-team"] == "team-b"
    assert raw.headers["x-aigw-model"] == "gpt-4o-mini"
    assert raw.parse().model == "gpt-4o-mini"  # not gpt-4o, which team-b may not use
    seen = last_request(gateway, gateway.fake_a)
    assert seen["body"]["model"] == "gpt-4o-mini"
    assert not [k for k in seen["headers"] if k.startswith("x-aigw-")]


def test_backend_errors_pass_through_in_openai_shape(gateway: Gateway):
    with pytest.raises(openai.RateLimitError) as err:
        client(gateway).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-fake-fault": "429"}
        )
    assert err.value.status_code == 429
    assert err.value.body["type"] in ("rate_limit_error", "requests")


def test_unreachable_backend_gives_an_openai_style_503(gateway: Gateway):
    with pytest.raises(openai.InternalServerError) as err:
        client(gateway).chat.completions.create(model="dead-model", messages=MESSAGES)
    assert err.value.status_code == 503
    assert err.value.body["type"] == "server_error"
    assert err.value.body["message"]


def test_client_disconnect_mid_stream_leaves_the_gateway_healthy(gateway: Gateway):
    c = client(gateway)
    for _ in range(3):
        stream = c.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-fake-tokens-per-second": "20", "x-fake-response-tokens": "200"},
        )
        next(iter(stream))
        stream.close()
    out = c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert out.usage.completion_tokens == 8


def test_sidecar_health_is_serving(gateway: Gateway):
    with grpc.insecure_channel(gateway.sidecar_listen) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_config_reload_applies_without_restart_and_rejects_invalid(gateway: Gateway):
    original = json.loads(json.dumps(gateway.config))
    updated = json.loads(json.dumps(original))
    updated["teams"]["team-c"] = {"keys": [{"sha256": sha256_hex("sk-team-c")}]}
    try:
        gateway.write_config(updated)
        deadline = time.monotonic() + 5
        while True:
            try:
                client(gateway, key="sk-team-c").models.list()
                break
            except openai.AuthenticationError:
                assert time.monotonic() < deadline, "the new team never became valid"
                time.sleep(0.1)
        # An invalid file is refused and the last good config keeps serving.
        broken = json.loads(json.dumps(updated))
        broken["models"]["gpt-4o-mini"]["targets"][0]["backend"] = "nowhere"
        gateway.write_config(broken)
        time.sleep(1.0)
        assert client(gateway, key="sk-team-c").models.list().data
    finally:
        gateway.write_config(original)
    deadline = time.monotonic() + 5
    while True:
        try:
            client(gateway, key="sk-team-c").models.list()
        except openai.AuthenticationError:
            break
        assert time.monotonic() < deadline, "the restored config never applied"
        time.sleep(0.1)


def test_a_model_moved_by_a_reload_never_sends_its_credential_to_the_old_backend(
    gateway: Gateway,
):
    """The sidecar reloads at once; Envoy keeps its routes until it is re-rendered. A model
    moved from fake-a to fake-b must not reach fake-a with fake-b's credential."""
    original = json.loads(json.dumps(gateway.config))
    moved = json.loads(json.dumps(original))
    moved["models"]["gpt-4o-mini"]["targets"] = [{"backend": "fake-b"}]
    gateway.clear_fakes()
    try:
        gateway.write_config(moved)
        deadline = time.monotonic() + 5
        while True:
            try:
                client(gateway).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            except openai.InternalServerError as err:
                assert err.status_code == 503
                assert err.body["code"] == "envoy_config_out_of_date"  # type: ignore[index]
                break
            assert time.monotonic() < deadline, "the reload never applied"
            time.sleep(0.1)
        seen = gateway.fake_requests(gateway.fake_a) + gateway.fake_requests(gateway.fake_b)
        assert BACKEND_B_SECRET not in json.dumps(seen)
    finally:
        gateway.write_config(original)
    deadline = time.monotonic() + 5
    while True:
        try:
            client(gateway).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            break
        except openai.InternalServerError:
            assert time.monotonic() < deadline, "the restored config never applied"
            time.sleep(0.1)
