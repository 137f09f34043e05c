"""Who is calling: the bearer key the OpenAI SDK sends, mapped to a team."""

from __future__ import annotations

from collections.abc import Mapping

from .config import Runtime
from .contract import INTERNAL_HEADER_PREFIX
from .errors import unauthorized


def bearer_key(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if value is None:
        # Azure-style clients send the key in api-key; accept it so they work unchanged.
        value = headers.get("api-key")
        return value.strip() or None if value is not None else None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(runtime: Runtime, headers: Mapping[str, str]) -> str:
    """The caller's team, or a 401 that never echoes the key."""
    key = bearer_key(headers)
    if key is None:
        raise unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            "missing_api_key",
        )
    team = runtime.team_for_key(key)
    if team is None:
        # A short fingerprint helps an operator match logs without revealing the key.
        hint = f"...{key[-4:]}" if len(key) >= 12 else "(hidden)"
        raise unauthorized(f"Incorrect API key provided: {hint}.")
    return team


def spoofed_headers(headers: Mapping[str, str]) -> list[str]:
    """Client-sent internal headers: removed so nobody can claim a team or pick a backend."""
    return [name for name in headers if name.startswith(INTERNAL_HEADER_PREFIX)]


def credentials_headers(headers: Mapping[str, str]) -> list[str]:
    """The client's own key never travels upstream; the backend gets its own credential."""
    return [name for name in ("authorization", "api-key") if name in headers]
