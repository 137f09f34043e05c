"""The wire formats the gateway speaks, by name and by the request paths they own.

A format is one module implementing WireFormat (base.py) and one `register` line below; the
request path reaches everything format-specific through the format a request routed to
(`route`) or, in a later stage, the one the hand-over names (`get`).
"""

from __future__ import annotations

from typing import NamedTuple

from ..contract import DEFAULT_WIRE
from ..errors import GatewayError
from .base import Endpoint, Operation, ParsedRequest, WireFormat
from .openai import OPENAI

__all__ = [
    "DEFAULT",
    "Endpoint",
    "Operation",
    "ParsedRequest",
    "Route",
    "WireFormat",
    "get",
    "register",
    "route",
]

_FORMATS: dict[str, WireFormat] = {}


def register(fmt: WireFormat) -> None:
    """Add a format; a path two formats claim goes to the one registered first."""
    if fmt.name in _FORMATS:
        raise ValueError(f"wire format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt


def get(name: str) -> WireFormat:
    """The format of that name; KeyError when none is registered."""
    return _FORMATS[name]


class Route(NamedTuple):
    wire: WireFormat
    endpoint: Endpoint
    model_id: str | None  # a GET of one model: its id


def route(method: str, raw_path: str) -> Route:
    """The format and endpoint a request line names; raises 404 or 405 (OpenAI's words)."""
    path = raw_path.split("?", 1)[0]
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    for fmt in _FORMATS.values():
        found = fmt.route(method, path)
        if found is not None:
            return Route(fmt, *found)
    raise GatewayError(
        404, f"Invalid URL ({method} {path})", "invalid_request_error", "unknown_url"
    )


register(OPENAI)
# The format of a hand-over that names none; the error shape before a request has routed to a
# format, and where no stage knows its format (the upstream stage).
DEFAULT: WireFormat = get(DEFAULT_WIRE)
