"""The fake's Gemini API (and Vertex AI's), driven through Google's official `google-genai`
SDK, and the gateway's translation (extproc/providers/gemini.py) checked against it: a
translated request the fake (after Google's reference) would refuse fails here."""

from __future__ import annotations

import base64
import json
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from google import genai
from google.genai import errors, types
from google.oauth2.credentials import Credentials
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc.devtools.fake_llm import FakeLLMSettings
from extproc.devtools.fake_llm import gemini as fake
from extproc.devtools.fake_llm.identity import GOOGLE_SCOPE, GOOGLE_TOKEN_URI, JWT_BEARER
from extproc.errors import GatewayError
from extproc.providers import gemini as translation
from extproc.wire.openai.answer import error_body

from .provider_cases import CONVERSATION as ONE_CALL
from .provider_cases import PNG, STRICT_WEATHER, fed_in_pieces, tool_call
from .test_fake_llm import _http, _running

MODEL = "gemini-2.5-flash"
PATH = f"/v1beta/models/{MODEL}:generateContent"
STREAM_PATH = f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
VERTEX = "/v1/projects/p/locations/us-central1/publishers/google"
HEADERS = {"x-goog-api-key": "test-key", "content-type": "application/json"}


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with _running(FakeLLMSettings(name="fake-gemini", response_tokens=6)) as bound:
        yield bound


def _options(port: int, api_version: str) -> types.HttpOptions:
    return types.HttpOptions(
        base_url=f"http://127.0.0.1:{port}",
        api_version=api_version,
        timeout=5000,
        retry_options=types.HttpRetryOptions(attempts=1),
    )


@pytest.fixture
def client(port: int) -> genai.Client:
    return genai.Client(api_key="test-key", http_options=_options(port, "v1beta"))


def records(port: int) -> list[dict[str, Any]]:
    return json.loads(_http(port, "/_fake/requests")[2])


def post(port: int, body: Any, path: str = PATH, **headers: str) -> tuple[int, Any]:
    status, _, raw = _http(
        port,
        path,
        method="POST",
        body=body if isinstance(body, bytes) else orjson.dumps(body),
        headers={**HEADERS, **headers},
    )
    return status, json.loads(raw) if raw.startswith(b"{") else raw


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"text": text}]}


# -- the SDK --------------------------------------------------------------------------------------


def test_generate_content_through_the_sdk(client: genai.Client, port: int) -> None:
    answer = client.models.generate_content(
        model=MODEL,
        contents="hello",
        config=types.GenerateContentConfig(
            system_instruction="Be brief.", max_output_tokens=100, temperature=0.5
        ),
    )
    assert answer.text == "tok0 tok1 tok2 tok3 tok4 tok5"
    assert answer.candidates is not None
    assert answer.candidates[0].finish_reason == types.FinishReason.STOP
    usage = answer.usage_metadata
    assert usage is not None and usage.candidates_token_count == 6
    assert usage.prompt_token_count and usage.total_token_count == usage.prompt_token_count + 6
    record = records(port)[-1]
    assert record["path"] == PATH and record["credential"] == "x-goog-api-key"
    assert record["body"]["systemInstruction"] == {"parts": [{"text": "Be brief."}], "role": "user"}


def test_a_stream_through_the_sdk(client: genai.Client) -> None:
    chunks = list(
        client.models.generate_content_stream(
            model=MODEL,
            contents="hello",
            config=types.GenerateContentConfig(max_output_tokens=3),
        )
    )
    assert len(chunks) == 3
    assert "".join(c.text or "" for c in chunks) == "tok0 tok1 tok2"
    assert chunks[0].usage_metadata is not None and chunks[0].usage_metadata.prompt_token_count
    last = chunks[-1]
    assert last.candidates is not None and last.candidates[0].finish_reason == "MAX_TOKENS"
    assert last.usage_metadata is not None and last.usage_metadata.candidates_token_count == 3


def test_a_function_call_and_its_response_through_the_sdk(client: genai.Client) -> None:
    weather = types.FunctionDeclaration(
        name="weather",
        description="The weather in a city",
        parameters_json_schema={
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "additionalProperties": False,
        },
    )
    config = types.GenerateContentConfig(
        tools=[types.Tool(function_declarations=[weather])],
        tool_config=types.ToolConfig(
            function_calling_config=types.FunctionCallingConfig(
                mode=types.FunctionCallingConfigMode.ANY, allowed_function_names=["weather"]
            )
        ),
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )
    answer = client.models.generate_content(model=MODEL, contents="weather?", config=config)
    assert answer.function_calls is not None
    (call,) = answer.function_calls
    assert (call.name, call.args) == ("weather", {"fake": "input"})
    assert answer.candidates is not None and answer.candidates[0].content is not None
    called = answer.candidates[0].content
    assert called.parts is not None and called.parts[0].thought_signature
    # The conversation goes on with the function's response.
    followed = client.models.generate_content(
        model=MODEL,
        contents=[
            types.Content(role="user", parts=[types.Part(text="weather?")]),
            called,
            types.Content(
                role="user",
                parts=[types.Part.from_function_response(name="weather", response={"c": 5})],
            ),
        ],
        config=types.GenerateContentConfig(
            tools=config.tools,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        ),
    )
    assert followed.text


def test_a_validation_error_is_the_sdks_client_error(client: genai.Client) -> None:
    with pytest.raises(errors.ClientError) as caught:
        client.models.generate_content(
            model=MODEL, contents="x", config=types.GenerateContentConfig(temperature=3)
        )
    assert caught.value.code == 400 and caught.value.status == "INVALID_ARGUMENT"
    assert "temperature" in (caught.value.message or "")


def google_token(port: int) -> str:
    """A token from the fake's Google token endpoint (identity.py), as google-auth gets one."""
    claims = {"scope": GOOGLE_SCOPE, "aud": GOOGLE_TOKEN_URI}
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    form = urllib.parse.urlencode({"grant_type": JWT_BEARER, "assertion": f"e30.{payload}.sig"})
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/_fake/identity/google-token", data=form.encode()
    ) as resp:
        return str(json.load(resp)["access_token"])


def test_vertex_ai_with_a_bearer_token_through_the_sdk(port: int) -> None:
    token = google_token(port)
    client = genai.Client(
        vertexai=True,
        project="p",
        location="us-central1",
        credentials=Credentials(token),
        http_options=_options(port, "v1"),
    )
    answer = client.models.generate_content(model=MODEL, contents="hello")
    assert answer.text == "tok0 tok1 tok2 tok3 tok4 tok5"
    record = records(port)[-1]
    assert record["path"] == f"{VERTEX}/models/{MODEL}:generateContent"
    assert record["credential"] == "bearer"
    assert record["headers"]["authorization"] == f"Bearer {token}"


def test_vertex_ai_refuses_a_token_it_did_not_issue(port: int) -> None:
    client = genai.Client(
        vertexai=True,
        project="p",
        location="us-central1",
        credentials=Credentials("ya29.not-issued"),
        http_options=_options(port, "v1"),
    )
    with pytest.raises(errors.ClientError) as caught:
        client.models.generate_content(model=MODEL, contents="hello")
    assert (caught.value.code, caught.value.status) == (401, "UNAUTHENTICATED")


def test_faults_in_googles_shape(client: genai.Client) -> None:
    def config(fault: str) -> types.GenerateContentConfig:
        return types.GenerateContentConfig(
            http_options=types.HttpOptions(headers={"x-fake-fault": fault})
        )

    with pytest.raises(errors.ClientError) as limited:
        client.models.generate_content(model=MODEL, contents="x", config=config("429"))
    assert (limited.value.code, limited.value.status) == (429, "RESOURCE_EXHAUSTED")
    for fault, status in (("500", "INTERNAL"), ("503", "UNAVAILABLE")):
        with pytest.raises(errors.ServerError) as failed:
            client.models.generate_content(model=MODEL, contents="x", config=config(fault))
        assert (failed.value.code, failed.value.status) == (int(fault), status)
    # A stream cut midway: what came first arrived.
    received = []
    with pytest.raises(Exception, match=r"(?i)reset|closed|disconnect"):
        for chunk in client.models.generate_content_stream(
            model=MODEL, contents="x", config=config("reset-after:2")
        ):
            received.append(chunk.text)
    assert received == ["tok0 ", "tok1 "]


# -- Google's rules, as the fake keeps them -------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"contents": [user("x")], "model": MODEL}, 'Unknown name "model"'),
        (
            {"contents": [user("x")], "generationConfig": {"max_tokens": 5}},
            'Unknown name "max_tokens"',
        ),
        ({"contents": []}, "contents is not specified"),
        ({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, "valid role"),
        ({"contents": [{"role": "user", "parts": []}]}, "must not be empty"),
        ({"contents": [{"role": "user", "parts": [{"text": ""}]}]}, "oneof field 'data'"),
        (
            {"contents": [{"role": "user", "parts": [{"text": "x", "inlineData": {}}]}]},
            "already set",
        ),
        (
            {
                "contents": [
                    {
                        "role": "user",
                        "parts": [{"inlineData": {"mimeType": "image/png", "data": "*"}}],
                    }
                ]
            },
            "Base64",
        ),
        (
            {
                "contents": [
                    user("x"),
                    {"role": "model", "parts": [{"functionCall": {"name": "f"}}]},
                    {
                        "role": "user",
                        "parts": [{"functionResponse": {"name": "g", "response": {}}}],
                    },
                ]
            },
            "answers no function call",
        ),
        (
            {
                "contents": [
                    user("x"),
                    {
                        "role": "user",
                        "parts": [{"functionResponse": {"name": "g", "response": {}}}],
                    },
                ]
            },
            "comes immediately after a function call turn",
        ),
        (
            {
                "contents": [
                    user("x"),
                    {
                        "role": "model",
                        "parts": [{"functionCall": {"name": "f"}}, {"functionCall": {"name": "f"}}],
                    },
                    {
                        "role": "user",
                        "parts": [{"functionResponse": {"name": "f", "response": {}}}],
                    },
                ]
            },
            "number of function response parts",
        ),
        (
            {
                "contents": [user("x")],
                "tools": [
                    {
                        "functionDeclarations": [
                            {
                                "name": "f",
                                "parameters": {"type": "object", "additionalProperties": False},
                            }
                        ]
                    }
                ],
            },
            'Unknown name "additionalProperties"',
        ),
        (
            {
                "contents": [user("x")],
                "tools": [{"functionDeclarations": [{"name": "f"}]}],
                "toolConfig": {
                    "functionCallingConfig": {"mode": "AUTO", "allowedFunctionNames": ["f"]}
                },
            },
            "only allowed when the mode is ANY",
        ),
        ({"contents": [user("x")], "generationConfig": {"candidateCount": 9}}, "candidate_count"),
        (
            {"contents": [user("x")], "generationConfig": {"stopSequences": list("abcdef")}},
            "at most 5",
        ),
        (
            {
                "contents": [user("x")],
                "generationConfig": {"responseJsonSchema": {"type": "object"}},
            },
            "requires the response_mime_type",
        ),
    ],
    ids=[
        "model-in-body",
        "openai-field",
        "no-contents",
        "assistant-role",
        "no-parts",
        "empty-text",
        "two-data-fields",
        "bad-base64",
        "response-for-another-call",
        "response-without-call",
        "response-count",
        "openapi-schema-additional-properties",
        "allowed-names-with-auto",
        "candidate-count",
        "stop-sequences",
        "schema-without-json",
    ],
)
def test_what_google_refuses_the_fake_refuses(port: int, body: dict[str, Any], words: str) -> None:
    status, answer = post(port, body)
    assert status == 400, answer
    assert answer["error"]["code"] == 400 and answer["error"]["status"] == "INVALID_ARGUMENT"
    assert words in answer["error"]["message"]


def test_proto_field_names_are_taken_too(port: int) -> None:
    body = {
        "system_instruction": {"parts": [{"text": "Be brief."}]},
        "contents": [user("x")],
        "generation_config": {"max_output_tokens": 2},
    }
    status, answer = post(port, body)
    assert status == 200 and answer["candidates"][0]["finishReason"] == "MAX_TOKENS"


def test_a_credential_is_required(port: int) -> None:
    status, answer = post(port, {"contents": [user("x")]}, **{"x-goog-api-key": ""})
    assert status == 403 and answer["error"]["status"] == "PERMISSION_DENIED"
    path = f"{VERTEX}/models/{MODEL}:generateContent"
    status, answer = post(port, {"contents": [user("x")]}, path, **{"x-goog-api-key": ""})
    assert status == 401 and answer["error"]["status"] == "UNAUTHENTICATED"


def test_the_stream_route_wants_server_sent_events_and_crlf(port: int) -> None:
    status, answer = post(port, {"contents": [user("x")]}, STREAM_PATH.removesuffix("?alt=sse"))
    assert status == 400 and "alt=sse" in answer["error"]["message"]
    status, raw = post(port, {"contents": [user("x")]}, STREAM_PATH)
    assert status == 200 and raw.endswith(b"}\r\n\r\n") and raw.count(b"\r\n\r\n") == 6
    status, answer = post(port, {"contents": [user("x")]}, f"/v1beta/models/{MODEL}:fooContent")
    assert status == 404 and answer["error"]["status"] == "NOT_FOUND"


# -- the gateway's translation against the fake ---------------------------------------------------

# The shared conversation with a second call, whose result comes first.
CONVERSATION = [
    *ONE_CALL[:2],
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [tool_call("call_1"), tool_call("call_2", arguments='{"city": "Rome"}')],
    },
    {"role": "tool", "tool_call_id": "call_2", "content": '{"c": 24}'},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
]
TOOLS = [STRICT_WEATHER]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"tools": TOOLS, "tool_choice": "auto", "temperature": 1.5, "stop": ["END"], "seed": 3},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "weather"}}},
        {"tools": TOOLS, "tool_choice": "none", "parallel_tool_calls": False},
        {"n": 2, "max_tokens": 4, "presence_penalty": 0.5, "frequency_penalty": -0.5},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": {"type": "object"}},
            }
        },
    ],
    ids=["plain", "tools-auto", "tools-forced", "tools-none", "n-penalties", "json-schema"],
)
def test_translated_requests_pass_the_fake_and_come_back_as_openai(
    port: int, extra: dict[str, Any]
) -> None:
    body = {"model": "gem", "messages": CONVERSATION, **extra}
    status, answer = post(port, translation.generate_content_request(body, 64))
    assert status == 200, answer
    out = ChatCompletion.model_validate(translation.chat_completion(answer, "gem"))
    assert len(out.choices) == extra.get("n", 1)
    if isinstance(extra.get("tool_choice"), dict):
        assert out.choices[0].finish_reason == "tool_calls"
        assert out.choices[0].message.tool_calls is not None
    else:
        assert out.choices[0].finish_reason in ("stop", "length")
        assert out.choices[0].message.content
    assert out.usage is not None and out.usage.completion_tokens >= 1


def test_a_forced_call_comes_back_and_goes_on_with_its_signature(port: int) -> None:
    """The call's thought signature rides in the tool call id and goes back with the call."""
    first = {
        "model": "gem",
        "messages": CONVERSATION[:2],
        "tools": TOOLS,
        "tool_choice": "required",
    }
    status, answer = post(port, translation.generate_content_request(first, 64))
    assert status == 200, answer
    message = translation.chat_completion(answer, "gem")["choices"][0]["message"]
    (call,) = message["tool_calls"]
    follow = {
        "model": "gem",
        "messages": [
            *CONVERSATION[:2],
            message,
            {"role": "tool", "tool_call_id": call["id"], "content": "18 C"},
        ],
        "tools": TOOLS,
    }
    status, answer = post(port, translation.generate_content_request(follow, 64))
    assert status == 200, answer
    sent = records(port)[-1]["body"]["contents"][1]["parts"][0]
    assert sent == {
        "functionCall": {"name": "weather", "args": {"fake": "input"}},
        "thoughtSignature": fake.SIGNATURE,
    }


def translated_stream(
    port: int, body: dict[str, Any]
) -> tuple[translation.StreamTranslator, bytes, list[ChatCompletionChunk]]:
    """The OpenAI `body` translated, streamed by the fake, its events translated back (fed in
    pieces of 5 bytes) and read with the openai SDK's chunk type."""
    status, raw = post(port, translation.generate_content_request(body, 64), STREAM_PATH)
    assert status == 200, raw
    translator = translation.StreamTranslator("gem")
    out, chunks = fed_in_pieces(translator, raw)
    return translator, out, chunks


def test_a_translated_stream_from_the_fake_reads_as_openai_chunks(port: int) -> None:
    body = {"model": "gem", "messages": CONVERSATION, "stream": True}
    translator, out, chunks = translated_stream(port, body)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == translator.text and len(text.split()) == 6
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert out.endswith(b"data: [DONE]\n\n") and translator.failed is None


def test_a_streamed_forced_call_translated(port: int) -> None:
    body = {"model": "gem", "messages": CONVERSATION, "stream": True, "tools": TOOLS,
            "tool_choice": "required"}  # fmt: skip
    _, _, chunks = translated_stream(port, body)
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert len(calls) == 1 and calls[0].function is not None
    assert calls[0].function.name == "weather"
    assert orjson.loads(calls[0].function.arguments or "") == {"fake": "input"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_the_openai_shape_of_the_fakes_errors(port: int) -> None:
    status, answer = post(port, {"contents": []})
    err = translation.PROVIDER.error(status, orjson.dumps(answer), {})
    assert (err.status, err.type, err.code) == (400, "invalid_request_error", "INVALID_ARGUMENT")
    assert orjson.loads(error_body(err.message, err.type, err.code))["error"]["message"] == (
        "* GenerateContentRequest.contents: contents is not specified"
    )


# -- thought signatures of calls another backend made --------------------------------------------

GEMINI_3 = "gemini-3-pro-preview"


def _path(model: str) -> str:
    return f"/v1beta/models/{model}:generateContent"


def test_a_gemini_3_model_refuses_a_current_call_without_its_signature(port: int) -> None:
    """CONVERSATION's calls were made by another backend (no `~sig~` in their ids)."""
    body = {"model": "gem", "messages": CONVERSATION, "tools": TOOLS}
    unsigned = translation.generate_content_request(body, 64, MODEL)  # no placeholder: 2.5
    assert "thoughtSignature" not in unsigned["contents"][1]["parts"][0]
    status, answer = post(port, unsigned, _path(MODEL))
    assert status == 200, answer  # Gemini 2.5 does not validate signatures
    status, answer = post(port, unsigned, _path(GEMINI_3))
    assert status == 400 and answer["error"]["status"] == "INVALID_ARGUMENT"
    assert "missing a thought_signature" in answer["error"]["message"]
    assert "`weather` , position 2" in answer["error"]["message"]
    # The gateway's translation for that model: Google's placeholder on the first call.
    signed = translation.generate_content_request(body, 64, GEMINI_3)
    parts = signed["contents"][1]["parts"]
    assert [p.get("thoughtSignature") for p in parts] == [translation.PLACEHOLDER_SIGNATURE, None]
    status, answer = post(port, signed, _path(GEMINI_3))
    assert status == 200, answer


def test_only_the_current_turn_is_checked(port: int) -> None:
    """An unsigned call of an earlier turn (before the last user message) is not refused."""
    earlier = [*CONVERSATION, {"role": "assistant", "content": "Sunny."},
               {"role": "user", "content": "Thanks!"}]  # fmt: skip
    body = {"model": "gem", "messages": earlier, "tools": TOOLS}
    request = translation.generate_content_request(body, 64, GEMINI_3)
    assert not any("thoughtSignature" in p for c in request["contents"] for p in c["parts"])
    status, answer = post(port, request, _path(GEMINI_3))
    assert status == 200, answer


# -- what the gateway refuses before sending, the fake (as Gemini) refuses too --------------------


def _image(media_type: str) -> dict[str, Any]:
    url = f"data:{media_type};base64,{PNG}"
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}


@pytest.mark.parametrize(
    ("openai", "gemini_request", "param"),
    [
        ({"messages": [{"role": "system", "content": "x"}]},
         {"contents": []}, "messages"),
        ({"seed": 2**31}, {"contents": [user("x")], "generationConfig": {"seed": 2**31}}, "seed"),
        ({"n": 9}, {"contents": [user("x")], "generationConfig": {"candidateCount": 9}}, "n"),
        ({"max_tokens": 0}, {"contents": [user("x")], "generationConfig": {"maxOutputTokens": 0}},
         "max_tokens"),
        ({"messages": [_image("image/gif")]},
         {"contents": [{"role": "user", "parts": [
             {"inlineData": {"mimeType": "image/gif", "data": PNG}}]}]},
         "messages[0].content[0].image_url"),
    ],
    ids=["system-only", "seed", "n", "max-tokens-0", "gif"],
)  # fmt: skip
def test_what_gemini_refuses_is_refused_before_it_is_sent(
    port: int, openai: dict[str, Any], gemini_request: dict[str, Any], param: str
) -> None:
    body = {"model": "gem", "messages": [{"role": "user", "content": "x"}], **openai}
    with pytest.raises(GatewayError) as caught:
        translation.generate_content_request(body, 64, MODEL)
    assert (caught.value.status, caught.value.param) == (400, param)
    status, answer = post(port, gemini_request)
    assert status == 400 and answer["error"]["status"] == "INVALID_ARGUMENT", answer


@pytest.mark.parametrize("media_type", ["image/png", "image/jpeg", "image/jpg", "image/webp",
                                        "image/heic", "image/heif"])  # fmt: skip
def test_the_image_types_gemini_takes_pass_the_fake(port: int, media_type: str) -> None:
    body = {"model": "gem", "messages": [_image(media_type)]}
    status, answer = post(port, translation.generate_content_request(body, 64, MODEL))
    assert status == 200, answer
