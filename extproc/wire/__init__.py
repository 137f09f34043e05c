"""The wire formats the gateway speaks, by name and by the request paths they own.

A format is one module implementing WireFormat (base.py) and one `register` line below; the
request path reaches everything format-specific through the format a request routed to
(`route`) or, in a later stage, the one the hand-over names (`get`).
"""

from __future__ import annotations

from typing import NamedTuple

from ..contract import DEFAULT_WIRE
from ..errors import GatewayError
from .anthropic import ANTHROPIC
from .base import Endpoint, Operation, ParsedRequest, WireFormat
from .openai import OPENAI
from .responses import RESPONSES_API

__all__ = [
    "DEFAULT",
    "Endpoint",
    "Operation",
    "ParsedRequest",
    "Route",
    "WireFormat",
    "get",
    "normalized",
    "register",
    "route",
    "speaking",
]

_FORMATS: dict[str, WireFormat] = {}


def register(fmt: WireFormat) -> None:
    """Add a format; the paths it owns are asked of it before those of formats registered
    earlier (OpenAI's, registered first, owns every path no other format owns)."""
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


def normalized(raw_path: str) -> str:
    """A request's path as the formats read it: no query string, no trailing slash."""
    path = raw_path.split("?", 1)[0]
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return path


def speaking(path: str) -> WireFormat:
    """The format whose paths hold this (normalized) one: the client's API, whose error shape
    its refusals take, from the request line on."""
    for fmt in reversed(_FORMATS.values()):
        if fmt.owns(path):
            return fmt
    return DEFAULT


def route(method: str, raw_path: str) -> Route:
    """The format and endpoint of a request line; raises 404 or 405."""
    path = normalized(raw_path)
    fmt = speaking(path)
    found = fmt.route(method, path)
    if found is not None:
        return Route(fmt, *found)
    raise GatewayError(
        404, f"Invalid URL ({method} {path})", "invalid_request_error", "unknown_url"
    )


register(OPENAI)
# The format of a hand-over that names none; the error shape where no stage knows its format
# (the upstream stage).
DEFAULT: WireFormat = get(DEFAULT_WIRE)
register(ANTHROPIC)
register(RESPONSES_API)
