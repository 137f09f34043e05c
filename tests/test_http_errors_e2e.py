"""Malformed HTTP and bodies over the limit, sent byte by byte to the real Envoy in front of the
sidecar: every one gets an answer with a status and an OpenAI-shaped body, never a closed
connection (envoy_config: the request buffer, the downstream stage created only for decoded
requests, the local-reply mappers)."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest

from .conftest import Gateway

# Starts a real Envoy, Redis or Prometheus: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

KEY = b"Authorization: Bearer sk-team-a\r\n"
CHAT = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"

MALFORMED = {
    "space in a header name": (CHAT + b"Bad Header: 1\r\nContent-Length: 2\r\n\r\n{}", 400),
    "bad chunk size": (CHAT + b"Transfer-Encoding: chunked\r\n\r\nZZ\r\nab\r\n0\r\n\r\n", 400),
    "content-length with chunked": (
        CHAT + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "unknown method": (b"FOO /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n\r\n", 400),
    "HTTP/1.0": (b"GET /v1/models HTTP/1.0\r\n\r\n", 426),
    "70 KB authorization header": (
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
        + b"a" * 70_000
        + b"\r\n\r\n",
        431,
    ),
    "more than 100 headers": (
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n"
        + b"".join(b"x-h%d: 1\r\n" % i for i in range(120))
        + b"\r\n",
        431,
    ),
    "control byte in a header": (
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-A: a\x01b\r\n\r\n",
        400,
    ),
    "no Host": (b"GET /v1/models HTTP/1.1\r\n\r\n", 400),
    # No body that ends: answered at once, not held by the request buffer.
    "CONNECT": (b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n", 403),
}


def exchange(gateway: Gateway, raw: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send raw bytes; read one HTTP/1.1 answer (status, headers, body). The answer must come
    whole: a connection closed without one fails the test."""
    host, port = gateway.base_url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # Envoy may answer and close before reading everything we send
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if sep and match and len(body) >= int(match.group(1)):
                break
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no answer, the connection was closed: {data!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


def openai_error(headers: dict, body: bytes) -> dict:
    assert headers["content-type"] == "application/json", headers
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and error["code"], error
    return error


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_http_gets_an_answer_in_openai_shape(gateway: Gateway, case: str) -> None:
    raw, expected = MALFORMED[case]
    status, headers, body = exchange(gateway, raw)
    assert status == expected, (status, body)
    error = openai_error(headers, body)
    assert error["type"] == "invalid_request_error"


def test_the_gateway_still_serves_after_malformed_requests(gateway: Gateway) -> None:
    for raw, _ in MALFORMED.values():
        exchange(gateway, raw)
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
    raw = CHAT + KEY + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    status, _, answer = exchange(gateway, raw + body)
    assert status == 200, answer
    assert json.loads(answer)["choices"]


def over_the_limit(gateway: Gateway) -> bytes:
    limit = gateway.config["sidecar"]["max_body_bytes"]
    text = "x" * (limit + 1024)
    return json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})


def test_a_chunked_body_over_the_limit_gets_the_same_413_as_one_with_a_length(
    gateway: Gateway,
) -> None:
    body = over_the_limit(gateway).encode()
    common = CHAT + KEY + b"Content-Type: application/json\r\n"
    with_length = common + b"Content-Length: %d\r\n\r\n" % len(body) + body
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 8192]), body[i : i + 8192])
        for i in range(0, len(body), 8192)
    )
    chunked = common + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    answers = []
    for raw in (with_length, chunked):
        status, headers, answer = exchange(gateway, raw)
        assert status == 413, answer
        error = openai_error(headers, answer)
        assert error["code"] == "request_too_large"
        assert error["type"] == "invalid_request_error"
        answers.append(error)
    assert answers[0] == answers[1]
