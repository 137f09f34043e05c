"""Who is calling: a JWT Envoy verified (its claims mapped to a team by identities.jwt), or
the key the client sends (OpenAI's bearer key, Azure's api-key, Anthropic's x-api-key), mapped
to a team."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import orjson

from .config import ClaimRule, Config, Runtime
from .contract import INTERNAL_HEADER_PREFIX, jwt_failure_key
from .errors import GatewayError, unauthorized


def bearer_key(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if value is None:
        # Azure-style clients send the key in api-key, Anthropic's SDKs (and Claude Code) in
        # x-api-key: accept both so they work unchanged.
        value = headers.get("api-key") or headers.get("x-api-key")
        return value.strip() or None if value is not None else None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(
    runtime: Runtime, headers: Mapping[str, str], verified: Mapping[str, Any] | None = None
) -> str:
    """The caller's team, or a 401 that never echoes the key. `verified`: what Envoy's JWT
    filter wrote of the request's token (the JWT namespace of its metadata), if anything."""
    if verified:
        team = team_for_token(runtime.config, verified)
        if team is not None:
            return team
    key = bearer_key(headers)
    if key is None:
        raise unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' "
            "(or 'x-api-key: YOUR_KEY').",
            "missing_api_key",
        )
    team = runtime.team_for_key(key)
    if team is None:
        failure = _token_failure(runtime.config, verified or {}) if looks_like_jwt(key) else None
        if failure is not None:
            raise refused_token(failure)
        # A short fingerprint helps an operator match logs without revealing the key.
        hint = f"...{key[-4:]}" if len(key) >= 12 else "(hidden)"
        raise unauthorized(f"Incorrect API key provided: {hint}.")
    return team


def team_for_token(cfg: Config, verified: Mapping[str, Any]) -> str | None:
    """The team of a token Envoy verified: the first of its issuer's rules its claims match; a
    403 when none does. None when no token was verified."""
    for name, issuer in cfg.identities.jwt.items():
        claims = verified.get(name)
        if not isinstance(claims, Mapping):
            continue
        for rule in issuer.teams:
            if claim_matches(claims, rule):
                return rule.team
        raise GatewayError(
            403,
            "Your token is valid, but no team of this gateway is mapped to its claims.",
            "invalid_request_error",
            "no_team_for_token",
        )
    return None


def claim_matches(claims: Mapping[str, Any], rule: ClaimRule) -> bool:
    """The claim is the rule's value, or a list that holds it (as the native routes match)."""
    value: Any = claims
    for key in rule.path:
        if not isinstance(value, Mapping):
            return False
        value = value.get(key)
    if isinstance(value, str):
        return value == rule.value
    if isinstance(value, list):
        return any(isinstance(v, str) and v == rule.value for v in value)
    return False


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated parts, the first a JSON header naming an algorithm: a token, not a
    key (an API key that failed as a token is answered as a key)."""
    parts = token.split(".")
    if len(parts) != 3 or len(parts[0]) > 4096:
        return False
    try:
        header = orjson.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (binascii.Error, ValueError):
        return False
    return isinstance(header, dict) and "alg" in header


def _token_failure(cfg: Config, verified: Mapping[str, Any]) -> str | None:
    """Why Envoy refused the token: the reason of the issuer it claims to be from, rather than
    the other issuers' "not configured"."""
    reasons = []
    for name in cfg.identities.jwt:
        status = verified.get(jwt_failure_key(name))
        if isinstance(status, Mapping):
            reasons.append(str(status.get("message") or "Jwt verification fails"))
    reasons.sort(key=lambda r: "not configured" in r)
    return reasons[0].replace('"', "'") if reasons else None


def refused_token(reason: str) -> GatewayError:
    # RFC 6750: the scheme and why, for clients that refresh their token on invalid_token.
    challenge = f'Bearer realm="extproc", error="invalid_token", error_description="{reason}"'
    return GatewayError(
        401,
        f"The bearer token was refused: {reason}.",
        "invalid_request_error",
        "invalid_token",
        headers=(("www-authenticate", challenge),),
    )


def spoofed_headers(headers: Mapping[str, str]) -> list[str]:
    """Client-sent internal headers: removed so nobody can claim a team or pick a backend."""
    return [name for name in headers if name.startswith(INTERNAL_HEADER_PREFIX)]


def credentials_headers(headers: Mapping[str, str]) -> list[str]:
    """The client's own key never travels upstream; the backend gets its own credential. (So
    do the key headers of other providers' APIs, which a client may send too.)"""
    return [name for name in CLIENT_CREDENTIAL_HEADERS if name in headers]


CLIENT_CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key", "x-goog-api-key")
