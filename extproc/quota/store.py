"""What a quota store must do, whatever keeps the numbers (this process, Redis, Redis Cluster).

A *counter* is one limit in one window of one team (e.g. "tpm:1795500000"). It holds two
numbers: `used` (settled) and `reserved` (admitted requests still in flight). A request is
admitted when, for every counter it touches, used + reserved + its estimate <= limit; the check
and the reservation of all counters happen atomically. When the request ends it is settled:
its reserved amounts are released and the real amounts added to `used`. A reservation that is
never settled (a sidecar crash) expires after its TTL and is then charged at its reserved
amount: tokens may be over-counted, never lost.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Charge:
    counter: str  # counter id within the team: "<limit name>:<window start, unix seconds>"
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
        self, team: str, reservation_id: str, charges: Sequence[Charge], ttl_s: float
    ) -> ReserveResult:
        """All charges fit -> reserve them all under `reservation_id`; else reserve nothing.
        A counter named twice must have room for both amounts; reserving again with an id
        still in flight returns ok without reserving twice; a negative amount is a ValueError."""

    @abstractmethod
    async def settle(self, team: str, reservation_id: str, actual: Sequence[int]) -> bool:
        """Release the reservation and add `actual` (one amount per charge, same order) to
        `used`. False when the reservation is unknown (already settled, or expired and
        charged): then nothing changes, so settling twice never counts twice. The wrong number
        of amounts, or a negative one, is a ValueError and changes nothing."""

    @abstractmethod
    async def usage(self, team: str, counters: Sequence[str]) -> tuple[CounterState, ...]:
        """Current used/reserved of the counters (0/0 for counters never touched)."""

    @abstractmethod
    async def reset(self, team: str) -> int:
        """Forget every counter and reservation of the team; returns how many keys went."""

    async def close(self) -> None:  # noqa: B027 - optional for stores without resources
        """Release connections."""

    async def warm_up(self, timeout_s: float = 5.0) -> None:  # noqa: B027 - optional
        """Connect ahead of the first request; StoreUnavailable if the store is not there."""
