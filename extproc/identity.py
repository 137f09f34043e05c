"""Who is calling: a JWT Envoy verified (its claims mapped to a team, a user and the models it
may use by identities.jwt), or the key the client sends (OpenAI's bearer key, Azure's api-key,
Anthropic's x-api-key), mapped to a team (and maybe a user). The team's organization follows
from the team. Nothing a client sends names any of them but its key or its verified token."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .config import (
    TOKEN_LABEL_PREFIX,
    ClaimMatch,
    Config,
    JwtIssuer,
    Runtime,
    model_set,
    organization_of,
    user_problem,
)
from .contract import INTERNAL_HEADER_PREFIX, jwt_failure_key
from .errors import GatewayError, unauthorized
from .keys.records import KEY_ID_PREFIX, KeysUnavailable

if TYPE_CHECKING:
    from .keys.directory import KeyDirectory


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


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, at every level a budget, a metric or an audit record may be kept at."""

    team: str
    organization: str = ""  # the team's, "" when it has none
    user: str = ""  # "" when the key or token names none
    # The key's label (a config key's name, a run-time key's id) or the issuer's name for a
    # token; never the key itself.
    key: str = ""
    # Narrower than the team's models (a key's allow-list, a token's model rules); None: the
    # team's.
    models: frozenset[str] | None = None
    # A run-time key's own limits, as stored (the config's Limit, dumped): quota/budgets.py
    # resolves them once per key. A config key's are the config's.
    key_limits: tuple[Mapping[str, Any], ...] = ()

    def may_use(self, runtime: Runtime, model: str) -> bool:
        return runtime.may_use(self.team, model) and (self.models is None or model in self.models)


def authenticate(
    runtime: Runtime,
    headers: Mapping[str, str],
    verified: Mapping[str, Any] | None = None,
    keys: KeyDirectory | None = None,
) -> Identity:
    """The caller, or a 401 that never echoes the key. `verified`: what Envoy's JWT filter
    wrote of the request's token (the JWT namespace of its metadata), if anything; `keys`: the
    run-time keys (keys.enabled), asked after the config's."""
    if verified:
        found = identity_for_token(runtime.config, verified)
        if found is not None:
            return found
    key = bearer_key(headers)
    if key is None:
        raise unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' "
            "(or 'x-api-key: YOUR_KEY').",
            "missing_api_key",
        )
    entry = runtime.key(key)
    if entry is None and keys is not None:
        found = _run_time_key(runtime.config, keys, key)
        if found is not None:
            return found
    if entry is None:
        failure = _token_failure(runtime.config, verified or {}) if looks_like_jwt(key) else None
        if failure is not None:
            raise refused_token(failure)
        # A short fingerprint helps an operator match logs without revealing the key.
        hint = f"...{key[-4:]}" if len(key) >= 12 else "(hidden)"
        raise unauthorized(f"Incorrect API key provided: {hint}.")
    return Identity(
        entry.team,
        organization_of(runtime.config, entry.team),
        entry.user,
        entry.label,
        entry.models,
    )


def identity_for_token(cfg: Config, verified: Mapping[str, Any]) -> Identity | None:
    """The caller of a token Envoy verified: the team of the first of its issuer's rules its
    claims match (a 403 when none does), its user claim, the models its model rules allow.
    None when no token was verified."""
    for name, issuer in cfg.identities.jwt.items():
        claims = verified.get(name)
        if not isinstance(claims, Mapping):
            continue
        for rule in issuer.teams:
            if claim_matches(claims, rule):
                user = _user_of(claim_value(claims, issuer.user_path))
                team = cfg.teams[rule.team]
                if not user and (team.user_limits or team.users):
                    # Served without a user, the caller would escape their user budget.
                    raise GatewayError(
                        403,
                        f"Your token is valid, but its '{'.'.join(issuer.user_path)}' claim "
                        "does not name a user, and this team's budgets are per user.",
                        "invalid_request_error",
                        "no_user_for_token",
                    )
                return Identity(
                    rule.team,
                    organization_of(cfg, rule.team),
                    user,
                    token_label(name),
                    _token_models(cfg, issuer, claims),
                )
        raise GatewayError(
            403,
            "Your token is valid, but no team of this gateway is mapped to its claims.",
            "invalid_request_error",
            "no_team_for_token",
        )
    return None


def _run_time_key(cfg: Config, keys: KeyDirectory, key: str) -> Identity | None:
    try:
        record = keys.lookup(key)
    except KeysUnavailable:
        # Fail closed: the copy of the keys may miss a revocation (keys/directory.py).
        raise GatewayError(
            503,
            "The gateway cannot check run-time API keys right now; retry shortly",
            "server_error",
            "key_store_unavailable",
            headers=(("retry-after", "1"),),
        ) from None
    if record is None or record.team not in cfg.teams:  # (a team gone from the config)
        return None
    return Identity(
        record.team,
        organization_of(cfg, record.team),
        record.user or "",
        record.id,
        model_set(cfg, record.models),
        record.limits,
    )


def settling(cfg: Config, keys: KeyDirectory | None, team: str, user: str, key: str) -> Identity:
    """The caller of a request another stage admitted (from its hand-over), as far as settling
    its budgets needs: a run-time key's limits come from the key store, revoked keys' too."""
    org = organization_of(cfg, team)
    record = keys.by_id(key) if keys is not None and key.startswith(KEY_ID_PREFIX) else None
    if record is None:
        return Identity(team, org, user, key)
    return Identity(team, org, user, key, model_set(cfg, record.models), record.limits)


def token_label(issuer: str) -> str:
    """Identity.key of a token's caller: the issuer's name, in a namespace of its own (a
    config key may not be named so: config._cross_check)."""
    return f"{TOKEN_LABEL_PREFIX}{issuer}"


def _user_of(claim: Any) -> str:
    """The user a claim names: a string (or a number, as some providers' subjects are) that
    config.user_problem takes; "" for anything else."""
    if isinstance(claim, int) and not isinstance(claim, bool):
        claim = str(claim)
    return claim if isinstance(claim, str) and user_problem(claim) is None else ""


def _token_models(
    cfg: Config, issuer: JwtIssuer, claims: Mapping[str, Any]
) -> frozenset[str] | None:
    if issuer.models is None:
        return None
    matched: list[str] = []
    for rule in issuer.models:
        if claim_matches(claims, rule):
            matched += rule.models
    return model_set(cfg, matched)


def claim_value(claims: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = claims
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def claim_matches(claims: Mapping[str, Any], rule: ClaimMatch) -> bool:
    """The claim is the rule's value, or a list that holds it (as the native routes match)."""
    value = claim_value(claims, rule.path)
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
