"""What the tests of the provider translations share (tests/test_provider_*.py, for each
provider, and tests/test_fake_*.py, the translations against the fake): the conversations they
translate, the tools offered, an image, the fake's AWS keys and boto3 client, embeddings
targets, and a translated stream read as the openai SDK reads it."""

from __future__ import annotations

from typing import Any

import boto3
import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc.config import ResolvedTarget
from extproc.providers.base import StreamTranslator

# A 1x1 PNG, base64.
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
    "AAAABJRU5ErkJggg=="
)

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {
    "type": "function",
    "function": {"name": "weather", "description": "The weather in a city", "parameters": CITY},
}


# The weather tool with what only JSON Schema takes (Gemini's `parameters` refuses it, its
# `parametersJsonSchema` takes it): `$schema`, `additionalProperties`; and `strict`.
STRICT_WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


def tool_call(
    call_id: str, name: str = "weather", arguments: str = '{"city": "Paris"}'
) -> dict[str, Any]:
    """An assistant's OpenAI tool call."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def golden_conversation(
    second_image: str, second_call: dict[str, Any], second_result: str
) -> list[dict[str, Any]]:
    """The multi-turn conversation of each provider's golden request: a system and a developer
    prompt; the user's text, a PNG (a data: URL) and `second_image` (its URL); the assistant's
    text and two tool calls (`call_1`, the weather in Paris, and `second_call`, `call_2`);
    their results (`18 C`, then `second_result` as a text part); the user's thanks."""
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture, and the weather?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": second_image}},
            ],
        },
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [tool_call("call_1"), second_call],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {
            "role": "tool",
            "tool_call_id": "call_2",
            "content": [{"type": "text", "text": second_result}],
        },
        {"role": "user", "content": "Thanks."},
    ]


def check_golden_answer(out: dict[str, Any], call_id: str) -> ChatCompletion:
    """A provider's golden answer, translated for the client's `claude`, as the openai SDK reads
    it: reasoning ("The user wants weather."), "Checking." and a tool call (`call_id`, the
    weather in Paris); 20 input tokens, 100 read from the prompt cache and 5 written to it, 9 of
    output. OpenAI's prompt_tokens holds all the input, the cache reads as cached_tokens."""
    parsed = ChatCompletion.model_validate(out)
    choice = parsed.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert (call.id, call.function.name) == (call_id, "weather")
    assert orjson.loads(call.function.arguments) == {"city": "Paris"}
    assert out["choices"][0]["message"]["reasoning_content"] == "The user wants weather."
    assert parsed.model == "claude"
    assert out["usage"] == {
        "prompt_tokens": 125,
        "completion_tokens": 9,
        "total_tokens": 134,
        "prompt_tokens_details": {"cached_tokens": 100},
    }
    return parsed


# -- the translations against the fake --------------------------------------------------------

# What a translated request asks the fake: a system prompt, the user's text and a PNG, the
# assistant's tool call and its result.
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is this, and the weather?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        ],
    },
    {"role": "assistant", "content": None, "tool_calls": [tool_call("call_1")]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": CITY}}]


def chunks(raw: bytes) -> list[dict[str, Any]]:
    """The JSON of each data event of a translated stream (its chunks, or its error), in order."""
    out = []
    for line in raw.split(b"\n\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            out.append(orjson.loads(line[6:]))
    return out


def fed_in_pieces(
    translator: StreamTranslator, raw: bytes
) -> tuple[bytes, list[ChatCompletionChunk]]:
    """A provider's streamed answer fed to its translator in pieces of 5 bytes: the OpenAI
    stream out, and its chunks as the openai SDK reads them."""
    out = b"".join(translator.feed(raw[i : i + 5]) for i in range(0, len(raw), 5))
    lines = [line for line in out.split(b"\n\n") if line.startswith(b"data: {")]
    return out, [ChatCompletionChunk.model_validate(orjson.loads(line[6:])) for line in lines]


# The fake's AWS credentials, and its settings for them (said outright: none from the
# environment of the test run).
KEY, SECRET = "AKIAFAKEFAKEFAKEFAKE", "fake/secret+key"
AWS_CREDENTIALS: dict[str, Any] = {
    "aws_access_key_id": KEY,
    "aws_secret_access_key": SECRET,
    "aws_session_token": None,
    "aws_bearer_token": None,
}


def bedrock_client(
    port: int, secret: str = SECRET, key: str = KEY, token: str | None = None
) -> Any:
    """boto3's bedrock-runtime client of the fake at `port`, signing with these credentials."""
    return boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        aws_session_token=token,
        config=Config(retries={"total_max_attempts": 1}, read_timeout=5, connect_timeout=5),
    )


def signed_headers(
    port: int, path: str, body: bytes, secret: str = SECRET, region: str = "us-east-1"
) -> dict[str, str]:
    """The headers of a JSON POST of `body` to the fake at `path`, signed by botocore's SigV4
    signer (as Envoy signs the gateway's), for requests sent without the SDK."""
    request = AWSRequest(
        method="POST",
        url=f"http://127.0.0.1:{port}{path}",
        data=body,
        headers={"content-type": "application/json"},
    )
    SigV4Auth(Credentials(KEY, secret), "bedrock", region).add_auth(request)
    return dict(request.headers)


def embeddings_target(provider: str, model: str, url_path: str = "") -> ResolvedTarget:
    """A target of the `emb` model at a backend of `provider`'s type."""
    return ResolvedTarget(
        model="emb",
        backend="b",
        provider_model=model,
        weight=1,
        auth_header="authorization",
        credential=None,
        provider=provider,
        url_path=url_path,
    )
