"""What a quota store must do, whatever keeps the numbers (this process, Redis, Redis Cluster).

Counters live in *scopes*: a team, or "~<organization>" for the teams of an organization, so
that every counter one request charges (its organization's, team's, user's and key's limits,
quota/budgets.py) is in one scope, which the Redis store keeps in one Cluster slot.

A *counter* is one limit in one window of one scope (e.g. "tpm:1795500000"). It holds two
numbers: `used` (settled) and `reserved` (admitted requests still in flight). A request is
admitted when, for every counter it touches, used + reserved + its estimate <= limit; the check
and the reservation of all counters happen atomically. When the request ends it is settled:
its reserved amounts are released and the real amounts added to `used`. A reservation that is
never settled (a sidecar crash) expires after its TTL and is then charged at its reserved
amount: tokens may be over-counted, never lost.

The store also remembers who owns an object a backend keeps for the gateway (a stored
Response, a file, a batch): `claim` records the owning team under a key such as
"response:resp_abc123" for a while, `owner` reads it back, `release` forgets it. A later call on
the object is passed on only for its owner.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Charge:
    # counter id within the scope: "<level prefix><limit name>:<window start, unix seconds>"
    counter: str
    limit: int  # the most this counter may reach (tokens, requests or micro-USD)
    amount: int  # what this request reserves (>= 0)
    expires_at: float  # unix time after which the counter may be forgotten (window end + slack)


@dataclass(frozen=True, slots=True)
class CounterState:
    counter: str
    used: int
    reserved: int


@dataclass(frozen=True, slots=True)
class ReserveResult:
    ok: bool
    # One state per charge, in the charges' order: after the reservation when ok, as found
    # (without this request) when not.
    states: tuple[CounterState, ...]
    failed: int | None = None  # index of the first charge that did not fit


class StoreUnavailable(Exception):
    """The store did not answer in time or at all; the caller applies the failure policy.

    `maybe_applied` is False only when the call certainly never reached the store (no
    connection could be had); otherwise it may have run there, its answer lost."""

    def __init__(self, message: str, *, maybe_applied: bool = True) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class QuotaStore(ABC):
    @abstractmethod
    async def reserve(
        self, scope: str, reservation_id: str, charges: Sequence[Charge], ttl_s: float
    ) -> ReserveResult:
        """All charges fit -> reserve them all under `reservation_id`; else reserve nothing.
        A counter named twice must have room for both amounts; reserving again with an id
        still in flight returns ok without reserving twice; a negative amount is a ValueError."""

    @abstractmethod
    async def settle(self, scope: str, reservation_id: str, actual: Sequence[int]) -> bool:
        """Release the reservation and add `actual` (one amount per charge, same order) to
        `used`. False when the reservation is unknown (already settled, or expired and
        charged): then nothing changes, so settling twice never counts twice. The wrong number
        of amounts, or a negative one, is a ValueError and changes nothing."""

    @abstractmethod
    async def usage(self, scope: str, counters: Sequence[str]) -> tuple[CounterState, ...]:
        """Current used/reserved of the counters (0/0 for counters never touched)."""

    @abstractmethod
    async def reset(self, scope: str, prefix: str = "") -> int:
        """Without `prefix`: forget every counter and reservation of the scope; returns how
        many keys went. With one: zero what the counters whose names start with it have used
        (one team's, in an organization's scope), leaving reservations in flight to settle;
        returns how many counters were zeroed."""

    # Ownership of stored objects. Not @abstractmethod (yet): test doubles of the quota store
    # written before it (tests/test_quota_store.py, tests/test_quota_policy.py) would no longer
    # instantiate. Both real stores implement all three.
    async def claim(self, key: str, owner: str, ttl_s: float) -> str | None:
        """Remember `owner` (a short text) for `key` for `ttl_s` seconds when no one holds it;
        returns who held it before (None: it was free, and `owner` holds it now). A claim never
        replaces another: an id a backend hands out again, or one claimed twice, keeps its
        first owner. An empty key or owner, or a ttl_s that is not positive, is a ValueError."""
        raise NotImplementedError(f"{type(self).__name__} keeps no owners")

    async def owner(self, key: str) -> str | None:
        """The owner remembered for `key`; None when there is none (never claimed, expired,
        released). An empty key is a ValueError (so in `release`)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no owners")

    async def release(self, key: str) -> None:
        """Forget `key` (nothing when it is not there)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no owners")

    async def close(self) -> None:  # noqa: B027 - optional for stores without resources
        """Release connections."""

    async def warm_up(self, timeout_s: float = 5.0) -> None:  # noqa: B027 - optional
        """Connect ahead of the first request; StoreUnavailable if the store is not there."""


def check_key(key: str) -> None:
    """What every store's `claim`, `owner` and `release` reject: an empty key."""
    if not key:
        raise ValueError("an ownership key must not be empty")


def check_claim(key: str, owner: str, ttl_s: float) -> None:
    """What every store's `claim` rejects: an empty key or owner, a ttl that is not positive."""
    check_key(key)
    if not owner:
        raise ValueError(f"the owner of {key!r} must not be empty")
    if not ttl_s > 0:  # also NaN
        raise ValueError(f"claim of {key!r}: ttl_s must be positive, not {ttl_s!r}")
