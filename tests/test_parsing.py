"""OpenAI's wire format: endpoint routing and request-body validation, with its error shape."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extproc import wire
from extproc.errors import GatewayError, check_content_type, too_large
from extproc.wire import Endpoint, ParsedRequest
from extproc.wire.openai import CHAT, COMPLETIONS, EMBEDDINGS, MODEL, MODELS, OPENAI


def route(method: str, path: str) -> tuple[Endpoint, str | None]:
    found = wire.route(method, path)
    assert found.wire is OPENAI
    return found.endpoint, found.model_id


def parse_body(endpoint: Endpoint, raw: bytes) -> ParsedRequest:
    return OPENAI.parse(endpoint, raw)


def assert_error(
    err: GatewayError, status: int, code: str, param: str | None = None, message: str | None = None
) -> None:
    assert err.status == status
    assert err.code == code
    assert err.param == param
    assert err.type == "invalid_request_error"
    if message is not None:
        assert err.message == message
    body = orjson.loads(OPENAI.error_body(err))
    assert body == {
        "error": {
            "message": err.message,
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }
    }


def route_error(method: str, path: str) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        route(method, path)
    return info.value


def body_error(endpoint: Endpoint, body: Any) -> GatewayError:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    with pytest.raises(GatewayError) as info:
        parse_body(endpoint, raw)
    return info.value


# -- route ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/v1/chat/completions", (CHAT, None)),
        ("POST", "/v1/completions", (COMPLETIONS, None)),
        ("POST", "/v1/embeddings", (EMBEDDINGS, None)),
        ("GET", "/v1/models", (MODELS, None)),
        ("GET", "/v1/models/gpt-4o", (MODEL, "gpt-4o")),
        ("GET", "/v1/models/ft:gpt-4o:org:abc", (MODEL, "ft:gpt-4o:org:abc")),
        ("GET", "/v1/models/meta-llama/Llama-3", (MODEL, "meta-llama/Llama-3")),
        # trailing slash
        ("POST", "/v1/chat/completions/", (CHAT, None)),
        ("POST", "/v1/completions/", (COMPLETIONS, None)),
        ("POST", "/v1/embeddings/", (EMBEDDINGS, None)),
        ("GET", "/v1/models/", (MODELS, None)),
        ("GET", "/v1/models/gpt-4o/", (MODEL, "gpt-4o")),
        # query string
        ("POST", "/v1/chat/completions?api-version=2024-10-21", (CHAT, None)),
        ("POST", "/v1/embeddings/?a=1&b=2", (EMBEDDINGS, None)),
        ("GET", "/v1/models?limit=5", (MODELS, None)),
        ("GET", "/v1/models/gpt-4o?x=/y", (MODEL, "gpt-4o")),
    ],
)
def test_route(method: str, path: str, expected: tuple[Endpoint, str | None]) -> None:
    assert route(method, path) == expected


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        ("/v2/chat/completions", "/v2/chat/completions"),
        ("/v1/chat/completion", "/v1/chat/completion"),
        ("/v1/chat/completions/extra", "/v1/chat/completions/extra"),
        ("/v1/assistants?x=1", "/v1/assistants"),
        ("/chat/completions", "/chat/completions"),
        ("/", "/"),
        ("", ""),
        ("/v1", "/v1"),
        ("/V1/models", "/V1/models"),
    ],
)
def test_route_unknown_path(path: str, shown: str) -> None:
    err = route_error("POST", path)
    assert_error(err, 404, "unknown_url", message=f"Invalid URL (POST {shown})")
    assert err.headers == ()


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/completions", "POST"),
        ("DELETE", "/v1/embeddings/", "POST"),
        ("POST", "/v1/models", "GET"),
        ("DELETE", "/v1/models/gpt-4o", "GET"),
        ("post", "/v1/chat/completions", "POST"),
    ],
)
def test_route_wrong_method(method: str, path: str, allow: str) -> None:
    err = route_error(method, path)
    shown = path.rstrip("/")
    assert_error(
        err, 405, "method_not_allowed", message=f"Method {method} is not allowed for {shown}"
    )
    assert err.headers == (("allow", allow),)


def test_route_percent_encoded_model_id() -> None:
    assert route("GET", "/v1/models/meta-llama%2FLlama-3") == (MODEL, "meta-llama/Llama-3")


# -- content type and size --------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        "Application/JSON",
        "  application/json  ",
    ],
)
def test_content_type_ok(value: str) -> None:
    assert check_content_type(value) is None


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("text/plain", "'text/plain'"),
        ("text/plain; charset=utf-8", "'text/plain; charset=utf-8'"),
        ("application/jsonl", "'application/jsonl'"),
        ("multipart/form-data; boundary=x", "'multipart/form-data; boundary=x'"),
        ("application/x-www-form-urlencoded", "'application/x-www-form-urlencoded'"),
        (None, "'none'"),
        ("", "'none'"),
    ],
)
def test_content_type_rejected(value: str | None, shown: str) -> None:
    with pytest.raises(GatewayError) as info:
        check_content_type(value)
    assert_error(
        info.value,
        415,
        "unsupported_media_type",
        message=f"Content-Type must be application/json, got {shown}",
    )


def test_too_large() -> None:
    assert_error(
        too_large(4096),
        413,
        "request_too_large",
        message="The request body is larger than this gateway's limit of 4096 bytes",
    )


# -- parse_body: the envelope -----------------------------------------------------------------

CHAT_MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("raw", [b"{", b"", b"{'model': 'x'}", b'{"model": "x",}', b"\xff\xfe{}"])
def test_malformed_json(raw: bytes) -> None:
    err = body_error(CHAT, raw)
    assert_error(err, 400, "invalid_json")
    assert err.message.startswith("We could not parse the JSON body of your request (")


@pytest.mark.parametrize("raw", [b"[]", b'["model"]', b"null", b'"gpt-4o"', b"42", b"true"])
def test_body_not_an_object(raw: bytes) -> None:
    err = body_error(CHAT, raw)
    assert_error(err, 400, "invalid_json", message="The request body must be a JSON object")


@pytest.mark.parametrize("model", ["<absent>", "", None, 4, ["gpt-4o"], {"id": "gpt-4o"}, True])
@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS, EMBEDDINGS])
def test_missing_model(endpoint: Endpoint, model: Any) -> None:
    body: dict[str, Any] = {"messages": CHAT_MESSAGES, "prompt": "x", "input": "x"}
    if model != "<absent>":
        body["model"] = model
    err = body_error(endpoint, body)
    assert_error(err, 400, "missing_model", "model", "you must provide a model parameter")


@pytest.mark.parametrize("stream", ["true", 1, 0, [], {}])
def test_stream_not_a_bool(stream: Any) -> None:
    err = body_error(CHAT, {"model": "m", "messages": CHAT_MESSAGES, "stream": stream})
    assert_error(err, 400, "invalid_type", "stream", "'stream' must be a boolean")


@pytest.mark.parametrize(("stream", "expected"), [(True, True), (False, False), (None, False)])
def test_stream_values(stream: Any, expected: bool) -> None:
    parsed = parse_body(
        CHAT,
        orjson.dumps({"model": "m", "messages": CHAT_MESSAGES, "stream": stream}),
    )
    assert parsed.stream is expected


def test_stream_defaults_to_false() -> None:
    parsed = parse_body(CHAT, orjson.dumps({"model": "m", "messages": CHAT_MESSAGES}))
    assert parsed.stream is False
    assert parsed.include_usage is False


def test_embeddings_cannot_stream() -> None:
    err = body_error(EMBEDDINGS, {"model": "e", "input": "x", "stream": True})
    assert_error(err, 400, "invalid_value", "stream", "Embeddings cannot be streamed")
    parsed = parse_body(EMBEDDINGS, orjson.dumps({"model": "e", "input": "x", "stream": False}))
    assert parsed.stream is False


@pytest.mark.parametrize(
    ("options", "include_usage"),
    [
        ({"include_usage": True}, True),
        ({"include_usage": False}, False),
        ({"include_usage": "true"}, False),
        ({"include_usage": 1}, False),
        ({}, False),
        (None, False),
    ],
)
def test_stream_options_include_usage(options: Any, include_usage: bool) -> None:
    body = {"model": "m", "messages": CHAT_MESSAGES, "stream": True, "stream_options": options}
    assert parse_body(CHAT, orjson.dumps(body)).include_usage is include_usage


@pytest.mark.parametrize("options", [True, "include_usage", [{"include_usage": True}], 1])
def test_stream_options_not_an_object(options: Any) -> None:
    body = {"model": "m", "messages": CHAT_MESSAGES, "stream_options": options}
    err = body_error(CHAT, body)
    assert_error(err, 400, "invalid_type", "stream_options", "'stream_options' must be an object")


def test_parsed_request_fields() -> None:
    body = {
        "model": "gpt-4o",
        "messages": CHAT_MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
        "unknown_extension": {"x": [1, 2]},
    }
    parsed = parse_body(CHAT, orjson.dumps(body))
    assert parsed.endpoint is CHAT
    assert parsed.body == body
    assert parsed.model == "gpt-4o"
    assert parsed.stream is True
    assert parsed.include_usage is True


@pytest.mark.parametrize(
    ("endpoint", "fields", "cap", "answers"),
    [
        (CHAT, {}, None, 1),
        (CHAT, {"max_tokens": 50}, 50, 1),
        (CHAT, {"max_completion_tokens": 70, "max_tokens": 50}, 70, 1),
        (CHAT, {"max_completion_tokens": 0, "max_tokens": 50}, 50, 1),
        (CHAT, {"max_tokens": 50, "n": 3}, 150, 3),
        (CHAT, {"n": 3}, None, 3),
        (CHAT, {"max_tokens": True, "n": True}, None, 1),
        (COMPLETIONS, {"max_tokens": -5, "n": 0}, None, 1),
        (EMBEDDINGS, {"max_tokens": 50}, 0, 1),
    ],
)
def test_output_cap_and_answers(
    endpoint: Endpoint, fields: dict[str, Any], cap: int | None, answers: int
) -> None:
    text = {CHAT: {"messages": CHAT_MESSAGES}, COMPLETIONS: {"prompt": "x"}}
    body = {"model": "m", **text.get(endpoint, {"input": "x"}), **fields}
    parsed = parse_body(endpoint, orjson.dumps(body))
    assert (parsed.output_cap, parsed.answers) == (cap, answers)


# -- chat messages ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
        [{"role": "assistant"}],
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": []}],
    ],
)
def test_chat_messages_accepted(messages: list[Any]) -> None:
    parsed = parse_body(CHAT, orjson.dumps({"model": "m", "messages": messages}))
    assert parsed.body["messages"] == messages


@pytest.mark.parametrize("messages", ["<absent>", None, [], "hello", {"role": "user"}, 3])
def test_chat_messages_not_a_list(messages: Any) -> None:
    body: dict[str, Any] = {"model": "m"}
    if messages != "<absent>":
        body["messages"] = messages
    err = body_error(CHAT, body)
    assert_error(err, 400, "invalid_value", "messages", "'messages' must be a non-empty array")


@pytest.mark.parametrize(
    ("messages", "index"),
    [
        (["hi"], 0),
        ([None], 0),
        ([{"content": "hi"}], 0),
        ([{"role": "user", "content": "a"}, {"role": 1, "content": "b"}], 1),
        ([{"role": "user"}, {"role": "user"}, [{"role": "user"}]], 2),
        ([{"role": None}], 0),
    ],
)
def test_chat_message_not_an_object_with_role(messages: list[Any], index: int) -> None:
    err = body_error(CHAT, {"model": "m", "messages": messages})
    assert_error(
        err,
        400,
        "invalid_value",
        f"messages[{index}]",
        f"messages[{index}] must be an object with a string 'role'",
    )


@pytest.mark.parametrize("content", [5, {"type": "text", "text": "hi"}, True, 1.5])
def test_chat_message_content_type(content: Any) -> None:
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": content}]
    err = body_error(CHAT, {"model": "m", "messages": messages})
    assert_error(
        err,
        400,
        "invalid_type",
        "messages[1].content",
        "messages[1].content must be a string or an array of content parts",
    )


# -- completions prompt and embeddings input --------------------------------------------------

TEXT_OR_TOKENS_OK = [
    "hello",
    "",
    ["a", "b"],
    [""],
    [1, 2, 3],
    [0],
    [[1, 2], [3]],
    [[1]],
]

TEXT_OR_TOKENS_BAD = [
    [],
    ["a", 1],
    [1, "a"],
    [[1], "a"],
    ["a", [1]],
    [1, [2]],
    [True],
    [1, False],
    [[True]],
    [[1, True]],
    [["a"]],
    [1.5],
    [None],
    [{"text": "a"}],
    5,
    None,
    {"text": "a"},
    True,
]


@pytest.mark.parametrize("prompt", TEXT_OR_TOKENS_OK)
def test_completions_prompt_accepted(prompt: Any) -> None:
    parsed = parse_body(COMPLETIONS, orjson.dumps({"model": "m", "prompt": prompt}))
    assert parsed.body["prompt"] == prompt
    assert parsed.endpoint is COMPLETIONS


@pytest.mark.parametrize("prompt", TEXT_OR_TOKENS_BAD)
def test_completions_prompt_rejected(prompt: Any) -> None:
    err = body_error(COMPLETIONS, {"model": "m", "prompt": prompt})
    assert_error(
        err,
        400,
        "invalid_value",
        "prompt",
        "'prompt' must be a string, an array of strings, or an array of token arrays",
    )


def test_completions_prompt_missing() -> None:
    err = body_error(COMPLETIONS, {"model": "m", "messages": CHAT_MESSAGES})
    assert_error(err, 400, "invalid_value", "prompt")


@pytest.mark.parametrize("value", TEXT_OR_TOKENS_OK)
def test_embeddings_input_accepted(value: Any) -> None:
    parsed = parse_body(EMBEDDINGS, orjson.dumps({"model": "e", "input": value}))
    assert parsed.body["input"] == value
    assert parsed.endpoint is EMBEDDINGS


@pytest.mark.parametrize("value", [*TEXT_OR_TOKENS_BAD, "<absent>"])
def test_embeddings_input_rejected(value: Any) -> None:
    body: dict[str, Any] = {"model": "e", "prompt": "not the right field"}
    if value != "<absent>":
        body["input"] = value
    err = body_error(EMBEDDINGS, body)
    assert_error(
        err,
        400,
        "invalid_value",
        "input",
        "'input' must be a string, an array of strings, or an array of token arrays",
    )


def test_chat_does_not_check_prompt_and_completions_do_not_check_messages() -> None:
    parse_body(CHAT, orjson.dumps({"model": "m", "messages": CHAT_MESSAGES, "prompt": 5}))
    parse_body(COMPLETIONS, orjson.dumps({"model": "m", "prompt": "x", "messages": 5}))


def test_gateway_error_str() -> None:
    err = route_error("GET", "/v1/chat/completions")
    assert str(err) == "405 method_not_allowed: Method GET is not allowed for /v1/chat/completions"
