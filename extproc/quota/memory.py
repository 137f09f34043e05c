"""The embedded quota store: counters of one sidecar process, kept in its memory.

Each method runs to completion without awaiting, so on one event loop it is atomic; no locks.

Its "teams" are the store's scopes (store.py): a team, or an organization's teams.

Housekeeping is lazy and driven by calls: touching a team charges its expired reservations and
drops its expired counters, and every call also looks at a few idle teams so that teams which
are never touched again are forgotten too. Work per call is bounded (`_BATCH` heap entries of
each kind); heaps are ordered by due time, so whatever a call leaves is first in line next time
and nothing is missed forever. A reservation that is due but not yet swept is harmless in the
meantime: charging moves its amount from `reserved` to `used`, so used + reserved (what
admission looks at) is the same before and after, and `settle` checks its own reservation's
expiry rather than trusting the sweep.

Owners of stored objects (claim/owner/release) are a dict of key -> (owner, expiry) with a heap
of expiries: `owner` ignores an expired entry (lazy expiry), and every `claim` sweeps at most
`_BATCH` due heap entries, so keys that are never read again still go. A claim adds one heap
entry and may remove up to `_BATCH`, so the sweep keeps up with any claim rate; entries left
stale by a replaced or released claim are compacted away like settled reservations.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from extproc.quota.store import (
    Charge,
    CounterState,
    QuotaStore,
    ReserveResult,
    check_claim,
    check_key,
)

# Heap entries looked at per call and per heap: keeps a call's latency independent of how much
# expired at once (say, after a burst of sidecar-side timeouts).
_BATCH = 128


class _Counter:
    __slots__ = ("expires_at", "reserved", "used")

    def __init__(self, expires_at: float) -> None:
        self.used = 0
        self.reserved = 0
        self.expires_at = expires_at


class _Reservation:
    # Counter names are the caller's strings (shared, not copied); amounts a tuple of ints.
    __slots__ = ("amounts", "counters", "expires")

    def __init__(self, expires: float, counters: tuple[str, ...], amounts: tuple[int, ...]):
        self.expires = expires
        self.counters = counters
        self.amounts = amounts


class _Team:
    __slots__ = (
        "counter_heap",
        "counters",
        "drop_at",
        "name",
        "reservation_heap",
        "reservations",
    )

    def __init__(self, name: str, now: float) -> None:
        self.name = name
        self.counters: dict[str, _Counter] = {}
        # (expires_at, counter): one entry per counter; an entry whose counter was extended
        # is pushed again with the new time when it comes up.
        self.counter_heap: list[tuple[float, str]] = []
        self.reservations: dict[str, _Reservation] = {}
        # (expires, reservation id); settled reservations leave stale entries behind, which
        # are compacted away once they outnumber the live ones.
        self.reservation_heap: list[tuple[float, str]] = []
        # The latest time anything of the team may still matter: after it the whole team can
        # go, since every counter may be forgotten and every reservation has expired.
        self.drop_at = now


class MemoryStore(QuotaStore):
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._teams: dict[str, _Team] = {}
        # (drop_at, seq, team): exactly one entry per live team object; seq breaks ties
        # because teams do not compare. A team that was reset leaves a stale entry.
        self._idle: list[tuple[float, int, _Team]] = []
        self._seq = itertools.count()
        # Owners of stored objects: key -> (owner, expiry), and (expiry, key) for the sweep.
        # A replaced or released claim leaves its heap entry behind; the sweep checks the dict.
        self._owners: dict[str, tuple[str, float]] = {}
        self._owner_heap: list[tuple[float, str]] = []

    async def reserve(
        self, scope: str, reservation_id: str, charges: Sequence[Charge], ttl_s: float
    ) -> ReserveResult:
        for charge in charges:
            if charge.amount < 0:
                raise ValueError(f"negative amount in {charge!r}")
        now = self._clock()
        t = self._touch(scope, now, create=True)
        assert t is not None
        existing = t.reservations.get(reservation_id)
        if existing is not None and existing.expires <= now:
            self._charge(t, reservation_id, existing)  # due but not swept yet: a new one
        elif existing is not None:
            # A retried reserve (the caller timed out but the first one got through) must not
            # reserve twice: report the reservation as made.
            return ReserveResult(True, _states(t, charges))
        wanted: dict[str, int] = {}  # what this request puts on each counter so far
        for i, charge in enumerate(charges):
            c = t.counters.get(charge.counter)
            used, reserved = (c.used, c.reserved) if c is not None else (0, 0)
            total = wanted.get(charge.counter, 0) + charge.amount
            if used + reserved + total > charge.limit:
                return ReserveResult(False, _states(t, charges), failed=i)
            wanted[charge.counter] = total
        expires = now + ttl_s
        for charge in charges:
            c = t.counters.get(charge.counter)
            if c is None:
                c = t.counters[charge.counter] = _Counter(charge.expires_at)
                heapq.heappush(t.counter_heap, (charge.expires_at, charge.counter))
            elif charge.expires_at > c.expires_at:
                c.expires_at = charge.expires_at
            c.reserved += charge.amount
            t.drop_at = max(t.drop_at, charge.expires_at)
        t.reservations[reservation_id] = _Reservation(
            expires,
            tuple(charge.counter for charge in charges),
            tuple(charge.amount for charge in charges),
        )
        heapq.heappush(t.reservation_heap, (expires, reservation_id))
        t.drop_at = max(t.drop_at, expires)
        return ReserveResult(True, _states(t, charges))

    async def settle(self, scope: str, reservation_id: str, actual: Sequence[int]) -> bool:
        if any(a < 0 for a in actual):
            raise ValueError(f"negative actual amount in {list(actual)!r}")
        now = self._clock()
        t = self._touch(scope, now, create=False)
        if t is None:
            return False
        r = t.reservations.get(reservation_id)
        if r is None:
            return False
        if r.expires <= now:
            # Expired, even if no sweep got to it yet: it is charged, not settled.
            self._charge(t, reservation_id, r)
            return False
        if len(actual) != len(r.counters):
            raise ValueError(
                f"settle of {reservation_id!r}: {len(actual)} amounts for {len(r.counters)} charges"
            )
        del t.reservations[reservation_id]
        for name, amount, real in zip(r.counters, r.amounts, actual, strict=True):
            c = t.counters.get(name)
            if c is not None:  # None: the counter's window is over and it was forgotten
                c.reserved -= amount
                c.used += real
        _compact(t)
        return True

    async def usage(self, scope: str, counters: Sequence[str]) -> tuple[CounterState, ...]:
        t = self._touch(scope, self._clock(), create=False)
        if t is None:
            return tuple(CounterState(name, 0, 0) for name in counters)
        return tuple(_state(t, name) for name in counters)

    async def reset(self, scope: str, prefix: str = "") -> int:
        now = self._clock()
        if prefix:
            t = self._touch(scope, now, create=False)
            zeroed = 0
            for name, c in t.counters.items() if t is not None else ():
                if name.startswith(prefix) and c.expires_at > now:
                    c.used = 0
                    zeroed += 1
            return zeroed
        t = self._teams.pop(scope, None)
        if t is None:
            return 0
        live_counters = sum(1 for c in t.counters.values() if c.expires_at > now)
        return live_counters + len(t.reservations)

    async def claim(self, key: str, owner: str, ttl_s: float) -> str | None:
        check_claim(key, owner, ttl_s)
        now = self._clock()
        self._sweep_owners(now)
        held = self._owners.get(key)
        if held is not None and held[1] > now:
            return held[0]
        expires = now + ttl_s
        self._owners[key] = (owner, expires)
        heapq.heappush(self._owner_heap, (expires, key))
        return None

    async def owner(self, key: str) -> str | None:
        check_key(key)
        entry = self._owners.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._owners[key]  # its heap entry goes when it comes up
            return None
        return entry[0]

    async def release(self, key: str) -> None:
        check_key(key)
        self._owners.pop(key, None)
        self._compact_owners()

    def _sweep_owners(self, now: float) -> None:
        for _, key in _due(self._owner_heap, now):
            entry = self._owners.get(key)
            # Not due: claimed again since, and that claim's own heap entry comes later.
            if entry is not None and entry[1] <= now:
                del self._owners[key]
        self._compact_owners()

    def _compact_owners(self) -> None:
        # As _compact: replaced and released claims must not pile up in the heap until due.
        if len(self._owner_heap) > 2 * len(self._owners) + 64:
            self._owner_heap = [(exp, key) for key, (_, exp) in self._owners.items()]
            heapq.heapify(self._owner_heap)

    def _touch(self, name: str, now: float, *, create: bool) -> _Team | None:
        self._drop_idle_teams(now)
        t = self._teams.get(name)
        if t is None:
            if not create:
                return None
            t = self._teams[name] = _Team(name, now)
            heapq.heappush(self._idle, (t.drop_at, next(self._seq), t))
            return t
        for _, rid in _due(t.reservation_heap, now):
            r = t.reservations.get(rid)
            # r.expires > now: the id was settled and reserved again; its own entry is later.
            if r is not None and r.expires <= now:
                self._charge(t, rid, r)
        _compact(t)
        for _, counter in _due(t.counter_heap, now):
            c = t.counters.get(counter)
            if c is None:
                continue
            if c.expires_at <= now:
                del t.counters[counter]
            else:  # a later charge extended it; its new time is past now, so not seen again
                heapq.heappush(t.counter_heap, (c.expires_at, counter))
        return t

    def _drop_idle_teams(self, now: float) -> None:
        for _, _, t in _due(self._idle, now):
            if self._teams.get(t.name) is not t:
                continue  # reset (and perhaps created again) since
            if t.drop_at <= now:
                del self._teams[t.name]
            else:
                heapq.heappush(self._idle, (t.drop_at, next(self._seq), t))

    @staticmethod
    def _charge(t: _Team, rid: str, r: _Reservation) -> None:
        del t.reservations[rid]
        for name, amount in zip(r.counters, r.amounts, strict=True):
            c = t.counters.get(name)
            if c is not None:
                c.reserved -= amount
                c.used += amount


_Entry = TypeVar("_Entry", bound=tuple)


def _due(heap: list[_Entry], now: float) -> Iterator[_Entry]:
    """Pop the entries whose time (their first item) has come, at most _BATCH per call: the
    housekeeping a call does stays bounded, and what is left waits for the next call."""
    for _ in range(_BATCH):
        if not heap or heap[0][0] > now:
            return
        yield heapq.heappop(heap)


def _compact(t: _Team) -> None:
    # Settled reservations leave their heap entries behind until they come due; with a long
    # TTL and a high request rate those would dwarf the in-flight ones, so rebuild the heap
    # from the live reservations once the stale entries outnumber them (amortised O(1)).
    if len(t.reservation_heap) > 2 * len(t.reservations) + 64:
        t.reservation_heap = [(r.expires, rid) for rid, r in t.reservations.items()]
        heapq.heapify(t.reservation_heap)


def _state(t: _Team, name: str) -> CounterState:
    c = t.counters.get(name)
    return CounterState(name, c.used, c.reserved) if c is not None else CounterState(name, 0, 0)


def _states(t: _Team, charges: Sequence[Charge]) -> tuple[CounterState, ...]:
    return tuple(_state(t, charge.counter) for charge in charges)
