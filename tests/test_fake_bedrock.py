"""The fake's AWS Bedrock Converse API, driven through the official AWS SDK (boto3's
`bedrock-runtime` client, which signs its requests with SigV4), and the gateway's translation
(extproc/providers/bedrock.py) checked against it: a translated request the fake (after AWS's
reference) would refuse fails here, and its event stream, cut at random bytes, is decoded by
both the SDK and the translator."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from botocore.exceptions import ClientError, EventStreamError
from openai.types.chat import ChatCompletion

from extproc.devtools.fake_llm import FakeLLMSettings
from extproc.providers import bedrock as translation

from .provider_cases import (
    AWS_CREDENTIALS,
    CONVERSATION,
    PNG,
    SECRET,
    bedrock_client,
    fed_in_pieces,
    signed_headers,
)
from .provider_cases import TOOLS as OPENAI_TOOLS
from .test_fake_llm import _http, _running

MODEL_ID = "us.anthropic.claude-3-5-sonnet-20241022-v2:0"
HELLO = [{"role": "user", "content": [{"text": "hello"}]}]
TOOLS = {
    "tools": [
        {
            "toolSpec": {
                "name": "weather",
                "description": "The weather in a city",
                "inputSchema": {
                    "json": {"type": "object", "properties": {"city": {"type": "string"}}}
                },
            }
        }
    ]
}


def settings(**fields: Any) -> FakeLLMSettings:
    """Credentials said outright: none from the environment of the test run."""
    return FakeLLMSettings(
        **{"name": "fake-bedrock", "response_tokens": 6, **AWS_CREDENTIALS, **fields}
    )


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with _running(settings()) as bound:
        yield bound


@pytest.fixture
def client(port: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    # A Bedrock API key in the environment would make the SDK send it instead of signing.
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK", raising=False)
    return bedrock_client(port)


def with_headers(client: Any, **headers: str) -> Any:
    """The client's requests get these headers after they are signed (the fake's knobs are
    not signed, as a proxy's headers would not be)."""

    def add(request: Any, **_: Any) -> None:
        for name, value in headers.items():
            request.headers[name.replace("_", "-")] = value

    client.meta.events.register("before-send.bedrock-runtime.*", add)
    return client


def signed_post(
    port: int, model: str, body: bytes, stream: bool = False, secret: str = SECRET, **extra: str
) -> tuple[int, dict[str, str], bytes]:
    """A POST signed by botocore's SigV4 signer, sent by urllib (for bodies the SDK would not
    send)."""
    path = translation.model_path("", model, stream)
    signed = signed_headers(port, path, body, secret, region="eu-west-3")
    knobs = {name.replace("_", "-"): value for name, value in extra.items()}
    return _http(port, path, method="POST", body=body, headers={**signed, **knobs})


# -- the SDK --------------------------------------------------------------------------------------


def test_converse_through_the_sdk(client: Any) -> None:
    answer = client.converse(
        modelId=MODEL_ID,
        messages=HELLO,
        system=[{"text": "Be brief."}],
        inferenceConfig={"maxTokens": 100, "temperature": 0.5, "topP": 0.9},
    )
    assert answer["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert answer["stopReason"] == "end_turn"
    (block,) = answer["output"]["message"]["content"]
    assert len(block["text"].split()) == 6
    usage = answer["usage"]
    assert usage["outputTokens"] == 6 and usage["inputTokens"] > 0
    assert usage["totalTokens"] == usage["inputTokens"] + 6 and "cacheReadInputTokens" not in usage
    assert answer["metrics"]["latencyMs"] >= 0


def test_converse_stream_through_the_sdk(client: Any) -> None:
    answer = client.converse_stream(
        modelId=MODEL_ID, messages=HELLO, inferenceConfig={"maxTokens": 3}
    )
    events = list(answer["stream"])
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "messageStart" and kinds[-2:] == ["messageStop", "metadata"]
    text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events
                   if "contentBlockDelta" in e)  # fmt: skip
    assert text.split() == ["tok0", "tok1", "tok2"]
    assert events[-2]["messageStop"]["stopReason"] == "max_tokens"
    assert events[-1]["metadata"]["usage"]["outputTokens"] == 3


@pytest.mark.parametrize("split", ["1", "7", "random"])
def test_a_stream_cut_anywhere_reads_the_same_through_the_sdk(client: Any, split: str) -> None:
    whole = list(client.converse_stream(modelId=MODEL_ID, messages=HELLO)["stream"])
    cut = with_headers(client, x_fake_split=split)
    got = list(cut.converse_stream(modelId=MODEL_ID, messages=HELLO)["stream"])
    for events in (whole, got):
        for event in events:
            event.pop("metadata", None)  # (its latency varies)
    assert got == whole and len(got) > 6


def chunk_sizes(port: int, headers: dict[str, str], body: bytes) -> tuple[list[int], bytes]:
    """The sizes of an answer's HTTP chunks as they came on the wire, and the body."""
    path = translation.model_path("", MODEL_ID, True)
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
             f"Content-Length: {len(body)}"]  # fmt: skip
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        raw = b""
        while data := sock.recv(65536):
            raw += data
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower(), head
    sizes, payload = [], b""
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if not size:
            return sizes, payload
        sizes.append(size)
        payload, rest = payload + rest[:size], rest[size + 2 :]


@pytest.mark.parametrize("split", ["7", "random"])
def test_the_split_knob_cuts_the_stream_on_the_wire(port: int, split: str) -> None:
    body = orjson.dumps({"messages": HELLO})
    path = translation.model_path("", MODEL_ID, True)
    signed = signed_headers(port, path, body)
    whole_sizes, whole = chunk_sizes(port, signed, body)
    sizes, cut = chunk_sizes(port, {**signed, "x-fake-split": split}, body)
    assert max(whole_sizes) > 64 and max(sizes) <= (7 if split == "7" else 64)
    assert len(cut) == len(whole) and len(sizes) > len(whole) // 64
    translators = [translation.StreamTranslator("m"), translation.StreamTranslator("m")]
    texts = [t.feed(raw) and t.text for t, raw in zip(translators, (whole, cut), strict=True)]
    assert texts[0] == texts[1] and len(texts[0].split()) == 6


def test_a_forced_tool_and_its_result_through_the_sdk(client: Any) -> None:
    tools = {**TOOLS, "toolChoice": {"tool": {"name": "weather"}}}
    answer = client.converse(modelId=MODEL_ID, messages=HELLO, toolConfig=tools)
    assert answer["stopReason"] == "tool_use"
    (block,) = answer["output"]["message"]["content"]
    use = block["toolUse"]
    assert use["name"] == "weather" and use["input"] == {"fake": "input"}
    conversation = [
        *HELLO,
        answer["output"]["message"],
        {"role": "user", "content": [
            {"toolResult": {"toolUseId": use["toolUseId"], "content": [{"text": "18 C"}],
                            "status": "success"}},
            {"text": "And now?"},
        ]},
    ]  # fmt: skip
    again = client.converse(modelId=MODEL_ID, messages=conversation, toolConfig=TOOLS)
    assert again["stopReason"] == "end_turn"
    streamed = client.converse_stream(modelId=MODEL_ID, messages=HELLO,
                                      toolConfig={**TOOLS, "toolChoice": {"any": {}}})  # fmt: skip
    events = list(streamed["stream"])
    starts = [
        e["contentBlockStart"]["start"]["toolUse"] for e in events if "contentBlockStart" in e
    ]
    assert [s["name"] for s in starts] == ["weather"]
    pieces = [e["contentBlockDelta"]["delta"]["toolUse"]["input"] for e in events
              if "contentBlockDelta" in e]  # fmt: skip
    assert orjson.loads("".join(pieces)) == {"fake": "input"}


def test_an_image_and_reasoning_through_the_sdk(client: Any) -> None:
    import base64

    image = {"image": {"format": "png", "source": {"bytes": base64.b64decode(PNG)}}}
    answer = client.converse(
        modelId=MODEL_ID,
        messages=[{"role": "user", "content": [{"text": "what is it?"}, image]}],
        additionalModelRequestFields={"thinking": {"type": "enabled", "budget_tokens": 1024}},
    )
    thought, text = answer["output"]["message"]["content"]
    assert thought["reasoningContent"]["reasoningText"]["text"] and text["text"]


def test_cache_points_write_then_read(client: Any) -> None:
    system = [
        {"text": "A long and stable system prompt. " * 20},
        {"cachePoint": {"type": "default"}},
    ]
    first = client.converse(modelId=MODEL_ID, messages=HELLO, system=system)["usage"]
    second = client.converse(modelId=MODEL_ID, messages=HELLO, system=system)["usage"]
    assert first["cacheWriteInputTokens"] > 0 and first["cacheReadInputTokens"] == 0
    assert second["cacheReadInputTokens"] == first["cacheWriteInputTokens"]
    assert second["cacheWriteInputTokens"] == 0
    assert second["inputTokens"] == first["inputTokens"]
    cached = first["cacheWriteInputTokens"]
    assert first["totalTokens"] == first["inputTokens"] + cached + first["outputTokens"]


@pytest.mark.parametrize(
    ("call", "words"),
    [
        ({"messages": [{"role": "assistant", "content": [{"text": "hi"}]}]}, "start with a user"),
        ({"messages": [*HELLO, *HELLO]}, "alternate"),
        ({"messages": [{"role": "user", "content": [{"text": "  "}]}]}, "blank"),
        ({"messages": HELLO, "inferenceConfig": {"temperature": 1.5}}, "temperature"),
        ({"messages": [{"role": "user", "content": [
            {"toolResult": {"toolUseId": "tooluse_x", "content": [{"text": "18"}]}}]}],
          "toolConfig": TOOLS}, "tooluse_x"),
        ({"messages": [*HELLO, {"role": "assistant", "content": [
            {"toolUse": {"toolUseId": "t1", "name": "weather", "input": {}}}]}, *HELLO],
          "toolConfig": TOOLS}, "Expected toolResult"),
        ({"messages": [*HELLO, {"role": "assistant", "content": [
            {"toolUse": {"toolUseId": "t1", "name": "weather", "input": {}}}]}]},
         "toolConfig field must be defined"),
        ({"messages": HELLO, "toolConfig": {**TOOLS, "toolChoice": {"tool": {"name": "nope"}}}},
         "nope"),
        ({"messages": HELLO, "toolConfig": {"tools": [{"toolSpec": {
            "name": "f", "inputSchema": {"json": {"type": "array"}}}}]}}, "must be object"),
    ],
    ids=["assistant-first", "not-alternating", "blank-text", "temperature", "orphan-result",
         "unanswered-use", "no-tool-config", "unknown-tool-choice", "schema-not-object"],
)  # fmt: skip
def test_what_bedrock_refuses_the_fake_refuses(
    client: Any, call: dict[str, Any], words: str
) -> None:
    with pytest.raises(ClientError) as caught:
        client.converse(modelId=MODEL_ID, **call)
    error = caught.value.response["Error"]
    assert error["Code"] == "ValidationException" and words in error["Message"]
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_fields_the_sdk_would_not_send_are_refused(port: int) -> None:
    status, headers, raw = signed_post(
        port, MODEL_ID, orjson.dumps({"model": "x", "messages": HELLO})
    )
    assert status == 400 and headers["x-amzn-errortype"].startswith("ValidationException:")
    assert "extraneous key [model]" in orjson.loads(raw)["message"]
    status, headers, _ = signed_post(port, MODEL_ID, b"{not json")
    assert status == 400 and headers["x-amzn-errortype"].startswith("SerializationException:")
    body = {"messages": [{"role": "user", "content": [{"text": "x", "image": {}}]}]}
    status, _, raw = signed_post(port, MODEL_ID, orjson.dumps(body))
    assert status == 400 and "exactly one member" in orjson.loads(raw)["message"]


# -- signatures -----------------------------------------------------------------------------------


def test_a_wrong_secret_is_refused(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK", raising=False)
    with pytest.raises(ClientError) as caught:
        bedrock_client(port, secret="not-the-secret").converse(modelId=MODEL_ID, messages=HELLO)
    assert caught.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as caught:
        bedrock_client(port, key="AKIAOTHEROTHEROTHER0").converse(modelId=MODEL_ID, messages=HELLO)
    assert caught.value.response["Error"]["Code"] == "UnrecognizedClientException"


def test_a_signature_covers_the_body_and_the_path(port: int) -> None:
    body = orjson.dumps({"messages": HELLO})
    path = translation.model_path("", MODEL_ID, False)
    signed = signed_headers(port, path, body, region="us-west-2")
    assert _http(port, path, method="POST", body=body, headers=signed)[0] == 200
    tampered = orjson.dumps({"messages": [{"role": "user", "content": [{"text": "HELLO"}]}]})
    assert _http(port, path, method="POST", body=tampered, headers=signed)[0] == 403
    other = translation.model_path("", "amazon.nova-pro-v1:0", False)
    status, headers, _ = _http(port, other, method="POST", body=body, headers=signed)
    assert status == 403 and headers["x-amzn-errortype"].startswith("InvalidSignatureException")
    # Headers the signature does not name may be added on the way (a proxy's).
    extra = {**signed, "x-forwarded-for": "10.0.0.1"}
    assert _http(port, path, method="POST", body=body, headers=extra)[0] == 200


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda h: h.pop("Authorization"), "MissingAuthenticationTokenException"),
        (lambda h: h.update(Authorization="AWS4-HMAC-SHA256 Signature=00"),
         "IncompleteSignatureException"),
        (lambda h: h.update(Authorization=h["Authorization"].replace("/bedrock/", "/s3/")),
         "InvalidSignatureException"),
        (lambda h: h.update(Authorization=h["Authorization"].replace(
            "SignedHeaders=content-type;host;x-amz-date", "SignedHeaders=content-type;host")),
         "IncompleteSignatureException"),
        (lambda h: h.update({"X-Amz-Date": "20200101T000000Z"}), "InvalidSignatureException"),
    ],
    ids=["no-authorization", "incomplete", "other-service", "date-not-signed", "expired"],
)  # fmt: skip
def test_malformed_signatures_are_refused(
    port: int, change: Callable[[dict[str, str]], Any], code: str
) -> None:
    body = orjson.dumps({"messages": HELLO})
    path = translation.model_path("", MODEL_ID, False)
    headers = signed_headers(port, path, body)
    assert "SignedHeaders=content-type;host;x-amz-date" in headers["Authorization"]
    change(headers)
    status, answer_headers, _ = _http(port, path, method="POST", body=body, headers=headers)
    assert status in (400, 403) and answer_headers["x-amzn-errortype"].startswith(code + ":")


def test_session_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK", raising=False)
    with _running(settings(aws_session_token="session-token")) as bound:
        answer = bedrock_client(bound, token="session-token").converse(
            modelId=MODEL_ID, messages=HELLO
        )
        assert answer["stopReason"] == "end_turn"
        for token in (None, "another-token"):
            with pytest.raises(ClientError) as caught:
                bedrock_client(bound, token=token).converse(modelId=MODEL_ID, messages=HELLO)
            assert caught.value.response["Error"]["Code"] == "UnrecognizedClientException"


def test_without_credentials_any_signature_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK", raising=False)
    unchecked = settings(aws_access_key_id=None, aws_secret_access_key=None)
    with _running(unchecked) as bound:
        answer = bedrock_client(bound, secret="whatever").converse(modelId=MODEL_ID, messages=HELLO)
        assert answer["stopReason"] == "end_turn"
        body = orjson.dumps({"messages": HELLO})
        path = translation.model_path("", MODEL_ID, False)
        assert _http(port=bound, path=path, method="POST", body=body)[0] == 403  # not signed


def test_bedrock_api_keys() -> None:
    with _running(settings(aws_bearer_token="ABSKfakekey")) as bound:
        path = translation.model_path("", MODEL_ID, False)
        body = orjson.dumps({"messages": HELLO})
        for key, status in (("ABSKfakekey", 200), ("ABSKother", 403)):
            headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
            assert _http(bound, path, method="POST", body=body, headers=headers)[0] == status
        # (The SDK sends a Bedrock API key over HTTPS only.)


# -- faults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "code", "status"),
    [
        ("429", "ThrottlingException", 429),
        ("500", "InternalServerException", 500),
        ("503", "ServiceUnavailableException", 503),
    ],
)
def test_faults_in_bedrocks_shape(client: Any, fault: str, code: str, status: int) -> None:
    faulty = with_headers(client, x_fake_fault=fault)
    with pytest.raises(ClientError) as caught:
        faulty.converse(modelId=MODEL_ID, messages=HELLO)
    assert caught.value.response["Error"]["Code"] == code
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == status


def test_a_stream_that_fails_midway(client: Any) -> None:
    faulty = with_headers(client, x_fake_stream_exception="modelStreamErrorException:3")
    stream = faulty.converse_stream(modelId=MODEL_ID, messages=HELLO)["stream"]
    received = []
    with pytest.raises(EventStreamError) as caught:
        received.extend(stream)
    assert len(received) == 3
    assert caught.value.response["Error"]["Code"] == "modelStreamErrorException"


# -- the gateway's translation against the fake ---------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": OPENAI_TOOLS},
        {"tools": OPENAI_TOOLS, "tool_choice": "auto", "temperature": 0.5, "stop": ["END"]},
        {
            "tools": OPENAI_TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
        },
        {"tools": OPENAI_TOOLS, "tool_choice": "required", "max_tokens": 50, "top_p": 0.5},
    ],
    ids=["tools", "tools-auto", "tools-forced", "tools-required"],
)
def test_translated_requests_pass_the_fake_and_come_back_as_openai(
    port: int, extra: dict[str, Any]
) -> None:
    body = {"model": "claude", "messages": CONVERSATION, **extra}
    status, _, raw = signed_post(
        port, MODEL_ID, orjson.dumps(translation.converse_request(body, 64))
    )
    assert status == 200, raw
    out = ChatCompletion.model_validate(translation.chat_completion(orjson.loads(raw), "claude"))
    if extra.get("tool_choice") in (None, "auto"):
        assert out.choices[0].finish_reason == "stop" and out.choices[0].message.content
    else:
        assert out.choices[0].finish_reason == "tool_calls"
        assert out.choices[0].message.tool_calls is not None
    assert out.usage is not None and out.usage.completion_tokens >= 1


def lower(headers: dict[str, str]) -> dict[str, str]:
    """An answer's headers as the sidecar gets them from Envoy: lower-case names."""
    return {name.lower(): value for name, value in headers.items()}


def test_a_refused_translation_reads_as_an_openai_error(port: int) -> None:
    """The fake's refusal, in Bedrock's shape (`{"message"}`, the exception named in the
    `x-amzn-errortype` header only), becomes the OpenAI error the client gets."""
    status, headers, raw = signed_post(port, MODEL_ID, orjson.dumps({"messages": []}))
    assert set(orjson.loads(raw)) == {"message"}
    err = translation.PROVIDER.error(status, raw, lower(headers))
    assert (err.status, err.type, err.code) == (400, "invalid_request_error", "ValidationException")
    assert "user message" in err.message


@pytest.mark.parametrize(
    ("secret", "knobs", "status", "openai_type", "code"),
    [
        # By its status alone (403) it would read as AccessDeniedException, a permission error.
        ("not-the-secret", {}, 403, "authentication_error", "InvalidSignatureException"),
        (SECRET, {"x_fake_fault": "429"}, 429, "rate_limit_error", "ThrottlingException"),
        (SECRET, {"x_fake_fault": "503"}, 503, "server_error", "ServiceUnavailableException"),
    ],
)
def test_the_fakes_errors_are_named_by_their_header(
    port: int, secret: str, knobs: dict[str, str], status: int, openai_type: str, code: str
) -> None:
    answer_status, headers, raw = signed_post(
        port, MODEL_ID, orjson.dumps({"messages": HELLO}), secret=secret, **knobs
    )
    assert answer_status == status and "__type" not in orjson.loads(raw)
    err = translation.PROVIDER.error(answer_status, raw, lower(headers))
    assert (err.status, err.type, err.code) == (status, openai_type, code)


def test_a_tool_call_id_from_another_backend_passes_the_fake(port: int) -> None:
    """A Gemini tool call id (its thought signature after `~sig~`: longer than Converse's 64
    characters, and `~` is not among them) is replaced, the same in the toolUse and in the
    toolResult, so the fake (which checks both, and their pairing) takes the conversation."""
    gemini_id = "call_" + "0" * 24 + "~sig~" + "ZmFrZS1sbG0gdGhvdWdodCBzaWduYXR1cmU=" * 4
    conversation = [
        {**m, "tool_calls": [{**m["tool_calls"][0], "id": gemini_id}]} if m.get("tool_calls")
        else {**m, "tool_call_id": gemini_id} if m["role"] == "tool" else m
        for m in CONVERSATION
    ]  # fmt: skip
    body = {"model": "claude", "messages": conversation, "tools": OPENAI_TOOLS}
    request = translation.converse_request(body, 64)
    status, _, raw = signed_post(port, MODEL_ID, orjson.dumps(request))
    assert status == 200, raw
    # Sent as it is, the fake refuses it, as Bedrock does.
    request["messages"][1]["content"][0]["toolUse"]["toolUseId"] = gemini_id
    request["messages"][2]["content"][0]["toolResult"]["toolUseId"] = gemini_id
    status, headers, raw = signed_post(port, MODEL_ID, orjson.dumps(request))
    assert status == 400 and lower(headers)["x-amzn-errortype"].startswith("ValidationException")


@pytest.mark.parametrize("split", ["random", "1"])
def test_a_translated_stream_from_the_fake_reads_as_openai_chunks(port: int, split: str) -> None:
    body = {"model": "claude", "messages": CONVERSATION, "tools": OPENAI_TOOLS, "stream": True}
    request = orjson.dumps(translation.converse_request(body, 64))
    status, headers, raw = signed_post(port, MODEL_ID, request, stream=True, x_fake_split=split)
    assert status == 200 and headers["Content-Type"] == translation.STREAM_CONTENT_TYPE
    translator = translation.StreamTranslator("claude")
    out, chunks = fed_in_pieces(translator, raw)
    assert out.endswith(b"data: [DONE]\n\n") and translator.failed is None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == translator.text and len(text.split()) == 6
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert translator.usage is not None and translator.usage.prompt_tokens > 0


def test_a_translated_stream_that_fails_midway(port: int) -> None:
    body = {"model": "claude", "messages": CONVERSATION[:2], "stream": True}
    request = orjson.dumps(translation.converse_request(body, 64))
    status, _, raw = signed_post(
        port, MODEL_ID, request, stream=True, x_fake_stream_exception="throttlingException:3"
    )
    assert status == 200
    translator = translation.StreamTranslator("claude")
    out = translator.feed(raw)
    assert translator.failed is not None and translator.failed.status == 429
    assert translator.failed.code == "ThrottlingException" and out.endswith(b"data: [DONE]\n\n")
    assert translator.usage is None
