"""Azure OpenAI's deployment API (`{resource}/openai/deployments/{deployment}/...?api-version=`):
OpenAI's bodies and answers, at a path that names the deployment and the API version, with
`api-key` or an Entra ID bearer token, and errors of Azure's own shapes (its content filter's
above all) made OpenAI's.

Nothing is translated in a body: a model's target names the deployment (`model:`), which the
path carries. (Azure's newer `/openai/v1` API takes OpenAI's paths as they are: a backend of
`type: openai` with that URL and `auth_header: api-key` serves it.) References: Azure OpenAI's
REST API reference (data plane, inference) and its content filtering documentation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from ..errors import GatewayError

if TYPE_CHECKING:
    from ..config import ResolvedTarget


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "timeout",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def takes_stream_options(api_version: str) -> bool:
    """Azure added `stream_options` (a stream's usage report) in 2024-09-01-preview; earlier
    versions refuse the parameter. (ISO dates compare as strings; a `-preview` suffix of an
    earlier date sorts before 2024-09-01.)"""
    return api_version >= "2024-09-01"


def path(target: ResolvedTarget, endpoint_path: str, api_version: str) -> str:
    """The deployment's path for the client's OpenAI endpoint (`/v1/chat/completions`, ...)."""
    deployment = quote(target.provider_model, safe="")
    suffix = endpoint_path.removeprefix("/v1")
    return f"{target.url_path}/deployments/{deployment}{suffix}?api-version={api_version}"


def error(status: int, body: bytes) -> GatewayError | None:
    """Azure's error answer as the client's OpenAI error; None when it is one already (the
    client then gets it as Azure sent it)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    err = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(err, dict):
        code = err.get("code")
        if code == "content_filter":
            return _content_filter(status, err)
        if isinstance(err.get("type"), str) and isinstance(err.get("message"), str):
            return None  # OpenAI's shape already
        message = err.get("message")
        return GatewayError(
            status,
            str(message or f"The provider answered {status}"),
            _TYPES.get(status, "server_error"),
            str(code) if code is not None else f"provider_{status}",
            err.get("param") if isinstance(err.get("param"), str) else None,
        )
    # Azure's gateway answers some failures (401 above all) as {"statusCode": .., "message": ..}.
    message = parsed.get("message") if isinstance(parsed, dict) else None
    return GatewayError(
        status,
        str(message or f"The provider answered {status}"),
        _TYPES.get(status, "server_error"),
        f"provider_{status}",
    )


def _content_filter(status: int, err: dict[str, Any]) -> GatewayError:
    """Azure's content filter refused the prompt: the categories it filtered, named."""
    inner = err.get("innererror")
    result = inner.get("content_filter_result") if isinstance(inner, dict) else None
    hits = []
    if isinstance(result, dict):
        for category, verdict in result.items():
            if isinstance(verdict, dict) and verdict.get("filtered"):
                severity = verdict.get("severity")
                hits.append(f"{category}: {severity}" if isinstance(severity, str) else category)
    said = f" ({', '.join(hits)})" if hits else ""
    return GatewayError(
        status if 400 <= status < 500 else 400,
        f"The request was refused by the provider's content filter (Azure OpenAI){said}",
        "invalid_request_error",
        "content_filter",
        err.get("param") if isinstance(err.get("param"), str) else "prompt",
    )
