"""OpenAI-style errors: every rejection the gateway makes has the same JSON shape."""

from __future__ import annotations

from dataclasses import dataclass

import orjson


@dataclass(slots=True)
class GatewayError(Exception):
    """A request the gateway refuses; rendered as an ImmediateResponse by the processor."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def __str__(self) -> str:
        return f"{self.status} {self.code or self.type}: {self.message}"


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def bad_request(message: str, code: str = "invalid_request", param: str | None = None):
    return GatewayError(400, message, "invalid_request_error", code, param)


def unauthorized(message: str, code: str = "invalid_api_key") -> GatewayError:
    # OpenAI answers a bad key with 401 and type invalid_request_error; the SDK maps 401 to
    # AuthenticationError whatever the type, but matching OpenAI keeps client handlers simple.
    return GatewayError(401, message, "invalid_request_error", code)


def not_found(message: str, code: str, param: str | None = None) -> GatewayError:
    return GatewayError(404, message, "invalid_request_error", code, param)
