"""The gateway's refusals: status, message, type, code and param, whatever API the client
speaks; the client's wire format renders them in its error shape (WireFormat.error_body)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class GatewayError(Exception):
    """A request the gateway refuses; the stage that refuses it answers with an immediate
    response in the client's API shape (WireFormat.error_body)."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"{self.status} {self.code or self.type}: {self.message}"


def bad_request(message: str, code: str = "invalid_request", param: str | None = None):
    return GatewayError(400, message, "invalid_request_error", code, param)


def unauthorized(message: str, code: str = "invalid_api_key") -> GatewayError:
    # OpenAI answers a bad key with 401 and type invalid_request_error; the SDK maps 401 to
    # AuthenticationError whatever the type, but matching OpenAI keeps client handlers simple.
    return GatewayError(401, message, "invalid_request_error", code)


def not_found(message: str, code: str, param: str | None = None) -> GatewayError:
    return GatewayError(404, message, "invalid_request_error", code, param)


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"The request body is larger than this gateway's limit of {limit} bytes",
        "invalid_request_error",
        "request_too_large",
    )


def check_content_type(value: str | None, form: bool = False) -> None:
    """Every endpoint the gateway speaks takes a JSON body, but those that take a file
    (`form`: multipart/form-data)."""
    media = (value or "").split(";", 1)[0].strip().lower()
    expected = "multipart/form-data" if form else "application/json"
    if media != expected:
        raise GatewayError(
            415,
            f"Content-Type must be {expected}, got {value or 'none'!r}",
            "invalid_request_error",
            "unsupported_media_type",
        )
