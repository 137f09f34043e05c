"""What a key store must do, whatever keeps the keys (a SQLite file, Redis), and the operations
common to all of them, written once on top of two primitives: insert a new record, and change
one record atomically.

The *revision* is a number that changes on every create, rotate and revoke (never on a
`touch`): every sidecar process polls it, cheaply, and reloads the keys only when it moved. It
starts from the clock (microseconds) when a store is first written, not from 0, so that a store
that lost everything (a Redis restarted without persistence) and was written again does not
come back to a revision a process already holds for other contents.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .records import (
    KeyNotFound,
    KeyRecord,
    KeySpec,
    KeyStoreUnavailable,
    new_key_id,
    new_record,
    new_secret,
    revoked,
    rotated,
)

# An id drawn twice (64 random bits) is not impossible: draw again, a few times.
_ID_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every key, and the revision they are at, read together."""

    revision: int
    records: tuple[KeyRecord, ...]


class KeyStore(ABC):
    # -- what each store implements -------------------------------------------------------------

    @abstractmethod
    async def get(self, key_id: str) -> KeyRecord | None:
        """The key with this id (revoked and expired ones too); None when there is none."""

    @abstractmethod
    async def by_digest(self, digest: bytes) -> KeyRecord | None:
        """The key whose secret has this sha256: its current secret, or the one before its
        last rotation if that rotation gave it a grace period. The caller checks the times
        (KeyRecord.usable, previous_usable): revoked and expired keys, and old secrets past
        their grace period, are returned too. None when there is none."""

    @abstractmethod
    async def snapshot(self) -> Snapshot:
        """Every key, revoked and expired ones included, with the revision, consistently."""

    @abstractmethod
    async def revision(self) -> int:
        """Changes on every create, rotate and revoke; 0 for a store never written."""

    @abstractmethod
    async def touch(self, key_id: str, when: float) -> None:
        """Record a use: last_used_at becomes `when` unless it is later already. An unknown id
        is ignored. The revision does not change: no process reloads for it."""

    @abstractmethod
    async def _insert(self, record: KeyRecord) -> bool:
        """Store a new record and move the revision; False (and nothing stored) when its id is
        taken."""

    @abstractmethod
    async def _update(self, key_id: str, change: Callable[[KeyRecord], KeyRecord]) -> KeyRecord:
        """Replace the record by `change(record)` atomically (no other write in between) and
        move the revision; when `change` returns the record unchanged, write nothing. Raises
        KeyNotFound, or what `change` raises. Returns the record written."""

    async def close(self) -> None:  # noqa: B027 - optional for stores without resources
        """Release connections and threads."""

    # -- the operations, for every store ----------------------------------------------------------

    async def create(self, spec: KeySpec, now: float | None = None) -> tuple[KeyRecord, str]:
        """A new key: its record and its secret, which exists nowhere else from now on."""
        now = time.time() if now is None else now
        for _ in range(_ID_ATTEMPTS):
            secret = new_secret()
            record = new_record(spec, new_key_id(), secret, now)
            if await self._insert(record):
                return record, secret
        raise KeyStoreUnavailable(f"no free key id after {_ID_ATTEMPTS} attempts")

    async def list(self, team: str | None = None) -> list[KeyRecord]:
        """Every key (of one team), oldest first."""
        records: Sequence[KeyRecord] = (await self.snapshot()).records
        if team is not None:
            records = [r for r in records if r.team == team]
        return sorted(records, key=lambda r: (r.created_at, r.id))

    async def rotate(
        self, key_id: str, *, now: float | None = None, grace_s: float = 0.0
    ) -> tuple[KeyRecord, str]:
        """A new secret for the key; the old one stops working at once, or after `grace_s`.
        KeyRevoked for a revoked key."""
        now = time.time() if now is None else now
        secret = new_secret()
        record = await self._update(key_id, lambda r: rotated(r, secret, now, grace_s))
        return record, secret

    async def revoke(self, key_id: str, when: float | None = None) -> KeyRecord:
        """The key stops working at `when` (now); revoking it again changes nothing."""
        when = time.time() if when is None else when
        return await self._update(key_id, lambda r: revoked(r, when))


def require(record: KeyRecord | None, key_id: str) -> KeyRecord:
    if record is None:
        raise KeyNotFound(key_id)
    return record
