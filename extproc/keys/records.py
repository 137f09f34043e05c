"""A run-time API key as stored, what an operator asks for when creating one, and the errors
of the key stores.

The secret itself is never stored, only its SHA-256 digest: a leaked store (a SQLite file, a
Redis dump) lets no one call the gateway. A secret has 240 random bits, so an unsalted fast hash
is enough; a salt or a slow hash would only slow down every request's lookup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Limit

# A prefix tells run-time keys from others at a glance (and to secret scanners), and lets the
# directory answer "not one of mine" without hashing or trusting its cache.
SECRET_PREFIX = "sk-aigw-"
SECRET_BYTES = 30  # 40 url-safe characters
KEY_ID_PREFIX = "key_"
HINT_CHARS = 4


class KeyStoreUnavailable(Exception):
    """The store did not answer (in time or at all); nothing is known about the call's effect."""


class KeyNotFound(LookupError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"no key {key_id!r}")
        self.key_id = key_id


class KeyRevoked(Exception):
    """An operation a revoked key cannot take (rotation)."""

    def __init__(self, key_id: str, revoked_at: float) -> None:
        super().__init__(f"key {key_id!r} is revoked")
        self.key_id = key_id
        self.revoked_at = revoked_at


class KeysUnavailable(Exception):
    """The directory cannot vouch for its copy of the keys (the store has not answered for too
    long): a revoked key could still be in it. The caller refuses (503), it does not guess."""


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def new_key_id() -> str:
    return KEY_ID_PREFIX + secrets.token_hex(8)


def digest_of(secret: str) -> bytes:
    # surrogatepass: whatever a client sent hashes to something (and matches nothing).
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def hint_of(secret: str) -> str:
    return secret[-HINT_CHARS:]


def looks_like_secret(presented: str) -> bool:
    """Whether `presented` could be a run-time key at all."""
    return presented.startswith(SECRET_PREFIX)


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What an operator asks for; validation.py checks it against the config first."""

    team: str
    user: str | None = None
    expires_at: float | None = None  # unix time; None: never
    models: tuple[str, ...] | None = None  # model and model_groups names; None: the team's
    limits: tuple[dict[str, Any], ...] = ()  # config.Limit, dumped (JSON-ready)
    description: str = ""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    digest: bytes  # sha256 of the secret
    hint: str  # its last characters, to tell keys apart in a list
    team: str
    created_at: float
    user: str | None = None
    expires_at: float | None = None
    models: tuple[str, ...] | None = None
    limits: tuple[dict[str, Any], ...] = field(default=(), hash=False)
    description: str = ""
    revoked_at: float | None = None
    # Written in the background, at most once a minute per key and process: up to that late.
    last_used_at: float | None = None
    rotated_at: float | None = None
    # The secret before the last rotation, when that rotation gave it a grace period.
    previous_digest: bytes | None = None
    previous_valid_until: float | None = None

    def status(self, now: float) -> str:
        """active | expired | revoked"""
        # Revoked the moment it is written, whatever this machine's clock says of revoked_at
        # (the revoking process's clock): a sidecar running behind must not serve it on.
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def usable(self, now: float) -> bool:
        return self.status(now) == "active"

    def previous_usable(self, now: float) -> bool:
        """Whether the secret before the last rotation still works."""
        return (
            self.previous_digest is not None
            and self.previous_valid_until is not None
            and now < self.previous_valid_until
            and self.usable(now)
        )

    def limit_objects(self) -> tuple[Limit, ...]:
        """The key's limits as the config's model (they were validated with it when stored)."""
        from ..config import Limit

        return tuple(Limit.model_validate(d) for d in self.limits)

    def without_usage(self) -> KeyRecord:
        """The record as a write sees it: last_used_at is kept apart from the rest."""
        return dataclasses.replace(self, last_used_at=None)


def new_record(spec: KeySpec, key_id: str, secret: str, now: float) -> KeyRecord:
    return KeyRecord(
        id=key_id,
        digest=digest_of(secret),
        hint=hint_of(secret),
        team=spec.team,
        created_at=now,
        user=spec.user,
        expires_at=spec.expires_at,
        models=spec.models,
        limits=spec.limits,
        description=spec.description,
    )


def rotated(record: KeyRecord, secret: str, now: float, grace_s: float) -> KeyRecord:
    """`record` with a new secret. With a grace period the secret it had keeps working until
    then (a second rotation within it ends the first one's old secret at once)."""
    if record.revoked_at is not None:
        raise KeyRevoked(record.id, record.revoked_at)
    keep = grace_s > 0
    return dataclasses.replace(
        record,
        digest=digest_of(secret),
        hint=hint_of(secret),
        rotated_at=now,
        previous_digest=record.digest if keep else None,
        previous_valid_until=now + grace_s if keep else None,
    )


def revoked(record: KeyRecord, when: float) -> KeyRecord:
    """`record` revoked at `when`; one already revoked keeps its first revocation time."""
    if record.revoked_at is not None:
        return record
    return dataclasses.replace(record, revoked_at=when)


# -- a record as JSON (the Redis store's values, SQLite's text columns) -------------------------

_BYTES_FIELDS = ("digest", "previous_digest")
_FIELDS = frozenset(f.name for f in dataclasses.fields(KeyRecord))


def to_json_dict(record: KeyRecord) -> dict[str, Any]:
    """Every field but last_used_at, digests in hex, tuples as lists."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if f.name == "last_used_at":
            continue
        if f.name in _BYTES_FIELDS and value is not None:
            value = value.hex()
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def from_json_dict(data: Mapping[str, Any], last_used_at: float | None = None) -> KeyRecord:
    # Fields this version does not know are dropped: a newer sidecar may have written them
    # during a rolling upgrade.
    values = {k: v for k, v in data.items() if k in _FIELDS and k != "last_used_at"}
    for name in _BYTES_FIELDS:
        if values.get(name) is not None:
            values[name] = bytes.fromhex(values[name])
    if values.get("models") is not None:
        values["models"] = tuple(values["models"])
    values["limits"] = tuple(values.get("limits") or ())
    return KeyRecord(**values, last_used_at=last_used_at)
