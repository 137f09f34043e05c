"""One conformance suite for every quota store (memory, Redis, Redis Cluster), then what only
one of them has: bounded housekeeping in memory, key layout and failure handling in Redis,
slot placement in the Cluster. Real redis-server processes (tests/redis_servers.py)."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import uvloop
from pydantic import ValidationError
from redis.crc import key_slot

from extproc.config import QuotaSettings, RedisSettings, parse_config
from extproc.errors import GatewayError
from extproc.quota.budgets import Budgets
from extproc.quota.memory import MemoryStore
from extproc.quota.policy import Amounts
from extproc.quota.redis_store import RedisStore
from extproc.quota.service import QuotaService, make_store
from extproc.quota.store import (
    Charge,
    CounterState,
    QuotaStore,
    ReserveResult,
    StoreUnavailable,
)
from extproc.telemetry.metrics import QUOTA_SETTLE_RETRIES
from tests import redis_servers
from tests.redis_servers import RedisClusterNodes, RedisServer

# Starts a real Envoy, Redis or Prometheus: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

pytest_plugins = ["tests.redis_servers"]

# Generous: these tests are about the numbers, and a loaded CI box must not turn them into
# timeouts. Latency bounds are tested on their own below.
CONFORMANCE_TIMEOUT_S = 2.0
# ... the wait for a connection too (a Cluster client's first call discovers the nodes and
# opens every connection; a burst queues for the pool).
PATIENT = {"timeout_s": CONFORMANCE_TIMEOUT_S, "connect_timeout_s": CONFORMANCE_TIMEOUT_S}


class Harness:
    """Makes stores of one kind and moves their time forward."""

    def __init__(self, kind: str, url: str | None = None) -> None:
        self.kind = kind
        self.url = url
        self.now = time.time()  # the memory store's clock

    def store(self, timeout_s: float = CONFORMANCE_TIMEOUT_S) -> QuotaStore:
        if self.kind == "memory":
            return MemoryStore(clock=lambda: self.now)
        assert self.url is not None
        return RedisStore.from_url(
            self.url,
            cluster=self.kind == "cluster",
            timeout_s=timeout_s,
            connect_timeout_s=timeout_s,  # (see PATIENT)
        )

    def time(self) -> float:
        return self.now if self.kind == "memory" else time.time()

    async def advance(self, seconds: float) -> None:
        if self.kind == "memory":
            self.now += seconds
        else:
            await asyncio.sleep(seconds)  # Redis expires by its own clock

    def run(self, body: Callable[[QuotaStore], Awaitable[None]]) -> None:
        async def main() -> None:
            store = self.store()
            try:
                await body(store)
            finally:
                await store.close()

        asyncio.run(main())


@pytest.fixture(params=["memory", "redis", "cluster"])
def harness(request: pytest.FixtureRequest) -> Harness:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server_module")
        return Harness("redis", server.url)
    if request.param == "cluster":
        cluster: RedisClusterNodes = request.getfixturevalue("redis_cluster")
        return Harness("cluster", cluster.url)
    return Harness("memory")


def new_team() -> str:
    # Servers are shared by a module's tests: each test works on teams of its own.
    return f"team-{uuid.uuid4().hex[:12]}"


def rid() -> str:
    return uuid.uuid4().hex


# --- conformance: every store ---------------------------------------------------------------


def test_reserve_within_limit(harness: Harness) -> None:
    team, exp = new_team(), harness.time() + 3600

    async def body(store: QuotaStore) -> None:
        charges = [Charge("tpm:1", 100, 30, exp), Charge("rpm:1", 10, 1, exp)]
        result = await store.reserve(team, rid(), charges, 60)
        assert result.ok and result.failed is None
        assert result.states == (CounterState("tpm:1", 0, 30), CounterState("rpm:1", 0, 1))
        assert await store.usage(team, ["tpm:1", "rpm:1", "never"]) == (
            CounterState("tpm:1", 0, 30),
            CounterState("rpm:1", 0, 1),
            CounterState("never", 0, 0),
        )
        # Exactly up to the limit is admitted.
        result = await store.reserve(team, rid(), [Charge("tpm:1", 100, 70, exp)], 60)
        assert result.ok and result.states == (CounterState("tpm:1", 0, 100),)

    harness.run(body)


def test_reserve_that_does_not_fit_reserves_nothing(harness: Harness) -> None:
    team, exp = new_team(), harness.time() + 3600

    async def body(store: QuotaStore) -> None:
        first = [Charge("day:1", 1000, 60, exp), Charge("tpm:1", 100, 60, exp)]
        assert (await store.reserve(team, rid(), first, 60)).ok
        # The first charge fits, the second (and the third) would not.
        charges = [
            Charge("day:1", 1000, 50, exp),
            Charge("tpm:1", 100, 50, exp),
            Charge("rpm:1", 0, 1, exp),
        ]
        result = await store.reserve(team, rid(), charges, 60)
        assert not result.ok
        assert result.failed == 1
        assert result.states == (
            CounterState("day:1", 0, 60),
            CounterState("tpm:1", 0, 60),
            CounterState("rpm:1", 0, 0),
        )
        assert await store.usage(team, ["day:1", "tpm:1", "rpm:1"]) == result.states

    harness.run(body)


def test_a_counter_named_twice_needs_room_for_both(harness: Harness) -> None:
    team, exp = new_team(), harness.time() + 3600

    async def body(store: QuotaStore) -> None:
        charges = [Charge("tpm:1", 100, 60, exp), Charge("tpm:1", 100, 60, exp)]
        result = await store.reserve(team, rid(), charges, 60)
        assert (result.ok, result.failed) == (False, 1)
        charges = [Charge("tpm:1", 100, 40, exp), Charge("tpm:1", 100, 40, exp)]
        r = rid()
        assert (await store.reserve(team, r, charges, 60)).ok
        assert await store.usage(team, ["tpm:1"]) == (CounterState("tpm:1", 0, 80),)
        assert await store.settle(team, r, [10, 5])
        assert await store.usage(team, ["tpm:1"]) == (CounterState("tpm:1", 15, 0),)

    harness.run(body)


def test_settle_moves_reserved_to_actual_used(harness: Harness) -> None:
    team, exp = new_team(), harness.time() + 3600

    async def body(store: QuotaStore) -> None:
        charges = [Charge("tpm:1", 1000, 40, exp), Charge("usd:1", 10**15, 10**14, exp)]
        a, b = rid(), rid()
        assert (await store.reserve(team, a, charges, 60)).ok
        assert (await store.reserve(team, b, charges, 60)).ok
        assert await store.usage(team, ["tpm:1", "usd:1"]) == (
            CounterState("tpm:1", 0, 80),
            CounterState("usd:1", 0, 2 * 10**14),
        )
        assert await store.settle(team, a, [55, 3 * 10**14])  # more than reserved
        assert await store.usage(team, ["tpm:1", "usd:1"]) == (
            CounterState("tpm:1", 55, 40),
            CounterState("usd:1", 3 * 10**14, 10**14),
        )
        assert await store.settle(team, b, [10, 7])  # less than reserved
        assert await store.usage(team, ["tpm:1", "usd:1"]) == (
            CounterState("tpm:1", 65, 0),
            CounterState("usd:1", 3 * 10**14 + 7, 0),
        )
        # used counts against the limit like reserved does: 1000 - 65 is left.
        assert not (await store.reserve(team, rid(), [Charge("tpm:1", 1000, 936, exp)], 60)).ok
        assert (await store.reserve(team, rid(), [Charge("tpm:1", 1000, 935, exp)], 60)).ok

    harness.run(body)


def test_settle_twice_and_unknown_change_nothing(harness: Harness) -> None:
    team, exp = new_team(), harness.time() + 3600

    async def body(store: QuotaStore) -> None:
        r = rid()
        assert (await store.reserve(team, r, [Charge("tpm:1", 100, 30, exp)], 60)).ok
        assert await store.settle(team, r, [20])
        after = await store.usage(team, ["tpm:1"])
        assert after == (CounterState("tpm:1", 20, 0),)
        assert not await store.settle(team, r, [20])
        assert not await store.settle(team, rid(), [20])
        assert not await store.settle(new_team(), r, [20])
        assert await store.usage(team, ["tpm:1"]) == after

    harness.run(body)


def test_settle_with_wrong_amounts_is_rejected(harness: Harness) -> None:
    team, exp = new_team(), harness.time() + 3600

    async def body(store: QuotaStore) -> None:
        r = rid()
        charges = [Charge("tpm:1", 100, 30, exp), Charge("rpm:1", 10, 1, exp)]
        assert (await store.reserve(team, r, charges, 60)).ok
        with pytest.raises(ValueError):
            await store.settle(team, r, [20])
        with pytest.raises(ValueError):
            await store.settle(team, r, [20, -1])
        with pytest.raises(ValueError):
            await store.reserve(team, rid(), [Charge("tpm:1", 100, -5, exp)], 60)
        assert await store.usage(team, ["tpm:1", "rpm:1"]) == (
            CounterState("tpm:1", 0, 30),
            CounterState("rpm:1", 0, 1),
        )
        assert await store.settle(team, r, [20, 1])

    harness.run(body)


def test_reserve_again_with_the_same_id_does_not_reserve_twice(harness: Harness) -> None:
    # A caller that timed out does not know whether its reserve got through; retrying it
    # must not double the reservation.
    team, exp = new_team(), harness.time() + 3600

    async def body(store: QuotaStore) -> None:
        r, charges = rid(), [Charge("tpm:1", 100, 30, exp)]
        assert (await store.reserve(team, r, charges, 60)).ok
        again = await store.reserve(team, r, charges, 60)
        assert again.ok and again.states == (CounterState("tpm:1", 0, 30),)
        assert await store.settle(team, r, [25])
        assert await store.usage(team, ["tpm:1"]) == (CounterState("tpm:1", 25, 0),)

    harness.run(body)


def test_expired_reservation_is_charged_at_its_reserved_amount(harness: Harness) -> None:
    team, exp = new_team(), harness.time() + 3600

    async def body(store: QuotaStore) -> None:
        seen, unseen, live = rid(), rid(), rid()
        assert (await store.reserve(team, seen, [Charge("tpm:1", 100, 25, exp)], 0.2)).ok
        assert (await store.reserve(team, unseen, [Charge("tpm:2", 100, 15, exp)], 0.2)).ok
        assert (await store.reserve(team, live, [Charge("tpm:1", 100, 5, exp)], 60)).ok
        await harness.advance(0.35)
        # The next touch charges it: used += reserved amount.
        assert await store.usage(team, ["tpm:1"]) == (CounterState("tpm:1", 25, 5),)
        assert not await store.settle(team, seen, [1])
        # Settling one that expired is refused and charges the reserved amount, not `actual`.
        assert not await store.settle(team, unseen, [1])
        assert await store.usage(team, ["tpm:1", "tpm:2"]) == (
            CounterState("tpm:1", 25, 5),
            CounterState("tpm:2", 15, 0),
        )
        assert await store.settle(team, live, [4])
        assert await store.usage(team, ["tpm:1"]) == (CounterState("tpm:1", 29, 0),)

    harness.run(body)


def test_teams_are_independent(harness: Harness) -> None:
    a, b, exp = new_team(), new_team(), harness.time() + 3600

    async def body(store: QuotaStore) -> None:
        assert (await store.reserve(a, rid(), [Charge("tpm:1", 100, 100, exp)], 60)).ok
        assert not (await store.reserve(a, rid(), [Charge("tpm:1", 100, 1, exp)], 60)).ok
        result = await store.reserve(b, rid(), [Charge("tpm:1", 100, 100, exp)], 60)
        assert result.ok and result.states == (CounterState("tpm:1", 0, 100),)

    harness.run(body)


def test_reset_clears_one_team_only(harness: Harness) -> None:
    a, b, exp = new_team(), new_team(), harness.time() + 3600

    async def body(store: QuotaStore) -> None:
        charges = [Charge("tpm:1", 100, 30, exp), Charge("rpm:1", 10, 1, exp)]
        in_flight, settled = rid(), rid()
        for team in (a, b):
            assert (await store.reserve(team, in_flight, charges, 60)).ok
            assert (await store.reserve(team, settled, charges, 60)).ok
            assert await store.settle(team, settled, [20, 1])
        assert await store.reset(a) == 3  # two counters and one reservation
        assert await store.usage(a, ["tpm:1", "rpm:1"]) == (
            CounterState("tpm:1", 0, 0),
            CounterState("rpm:1", 0, 0),
        )
        assert not await store.settle(a, in_flight, [1, 1])
        assert await store.usage(b, ["tpm:1", "rpm:1"]) == (
            CounterState("tpm:1", 20, 30),
            CounterState("rpm:1", 1, 1),
        )
        assert await store.settle(b, in_flight, [5, 1])
        assert await store.reset(a) == 0
        assert await store.reset(new_team()) == 0

    harness.run(body)


def test_concurrent_reserves_admit_exactly_what_fits(harness: Harness) -> None:
    team, exp, limit, amount = new_team(), harness.time() + 3600, 500, 7

    async def body(store: QuotaStore) -> None:
        charges = [Charge("tpm:1", limit, amount, exp)]
        results = await asyncio.gather(
            *(store.reserve(team, rid(), charges, 60) for _ in range(200))
        )
        assert sum(r.ok for r in results) == limit // amount
        assert all(r.failed == 0 for r in results if not r.ok)
        assert await store.usage(team, ["tpm:1"]) == (
            CounterState("tpm:1", 0, (limit // amount) * amount),
        )

    harness.run(body)


@pytest.mark.parametrize("harness", ["redis", "cluster"], indirect=True)
def test_two_sidecars_racing_admit_exactly_what_fits(harness: Harness) -> None:
    team, exp, limit, amount = new_team(), time.time() + 3600, 1000, 9

    async def main() -> None:
        one, two = harness.store(), harness.store()
        try:
            charges = [Charge("tpm:1", limit, amount, exp), Charge("rpm:1", 10**6, 1, exp)]
            calls = [
                store.reserve(team, rid(), charges, 60) for _ in range(100) for store in (one, two)
            ]
            results = await asyncio.gather(*calls)
            assert sum(r.ok for r in results) == limit // amount
            admitted = limit // amount
            for store in (one, two):
                assert await store.usage(team, ["tpm:1", "rpm:1"]) == (
                    CounterState("tpm:1", 0, admitted * amount),
                    CounterState("rpm:1", 0, admitted),  # nothing of a refused request
                )
        finally:
            await one.close()
            await two.close()

    asyncio.run(main())


# --- memory store ---------------------------------------------------------------------------


def test_memory_forgets_expired_counters_and_idle_teams() -> None:
    clock = [1_800_000_000.0]
    store = MemoryStore(clock=lambda: clock[0])
    team, now = new_team(), clock[0]

    async def body() -> None:
        r = rid()
        charges = [Charge("tpm:1", 100, 10, now + 60), Charge("day:1", 10**6, 10, now + 1000)]
        assert (await store.reserve(team, r, charges, 5)).ok
        assert await store.settle(team, r, [10, 10])
        # A later expires_at for the same counter wins; an earlier one does not shorten it.
        assert (await store.reserve(team, rid(), [Charge("tpm:1", 100, 1, now + 120)], 5)).ok
        assert (await store.reserve(team, rid(), [Charge("tpm:1", 100, 1, now + 30)], 5)).ok
        clock[0] = now + 90
        assert await store.usage(team, ["tpm:1"]) == (CounterState("tpm:1", 12, 0),)
        clock[0] = now + 121
        assert await store.usage(team, ["tpm:1"]) == (CounterState("tpm:1", 0, 0),)
        assert set(store._teams[team].counters) == {"day:1"}
        # A team that nobody touches again goes too, on calls for other teams.
        clock[0] = now + 1001
        await store.usage(new_team(), ["tpm:1"])
        assert team not in store._teams

    asyncio.run(body())


def test_memory_sweeps_a_bounded_batch_per_call_but_misses_none() -> None:
    clock = [1_800_000_000.0]
    store = MemoryStore(clock=lambda: clock[0])
    team, exp, n = new_team(), clock[0] + 3600, 300  # more than one batch

    async def body() -> None:
        ids = [rid() for _ in range(n)]
        for r in ids:
            assert (await store.reserve(team, r, [Charge("tpm:1", 10**6, 2, exp)], 1)).ok
        clock[0] += 2
        seen = []
        for _ in range(5):
            (state,) = await store.usage(team, ["tpm:1"])
            assert state.used + state.reserved == 2 * n  # what admission sees never changes
            seen.append(state)
        assert 0 < seen[0].used < 2 * n  # one call did not do it all
        assert seen[-1] == CounterState("tpm:1", 2 * n, 0)
        assert not await store.settle(team, ids[-1], [1])

    asyncio.run(body())


def test_memory_settled_reservations_do_not_pile_up() -> None:
    store = MemoryStore()
    team, exp = new_team(), time.time() + 3600

    async def body() -> None:
        in_flight = [rid() for _ in range(100)]
        for r in in_flight:
            assert (await store.reserve(team, r, [Charge("tpm:1", 10**9, 1, exp)], 600)).ok
        for _ in range(20_000):
            r = rid()
            assert (await store.reserve(team, r, [Charge("tpm:1", 10**9, 1, exp)], 600)).ok
            assert await store.settle(team, r, [1])
        t = store._teams[team]
        assert len(t.reservations) == 100
        assert len(t.reservation_heap) <= 2 * 100 + 64 + 1
        assert await store.usage(team, ["tpm:1"]) == (CounterState("tpm:1", 20_000, 100),)

    asyncio.run(body())


# --- Redis ----------------------------------------------------------------------------------


def test_redis_key_layout_and_expiry(redis_server_module: RedisServer) -> None:
    team, exp = new_team(), time.time() + 3600
    check = redis_server_module.client()
    tag = f"aigw:{{{team}}}:"

    async def main() -> None:
        store = RedisStore.from_url(redis_server_module.url, **PATIENT)
        try:
            r = rid()
            charges = [Charge("tpm:1", 100, 30, exp), Charge("rpm:1", 10, 1, exp - 600)]
            assert (await store.reserve(team, r, charges, 60)).ok
            keys = {k.decode() for k in check.scan_iter(match=f"aigw:{{{team}}}:*")}
            assert keys == {
                tag + "c:tpm:1",
                tag + "c:rpm:1",
                tag + f"r:{r}",
                tag + "rx",
                tag + "cx",
            }
            assert check.hgetall(tag + "c:tpm:1") == {b"r": b"30"}
            assert abs(check.pexpiretime(tag + "c:tpm:1") - exp * 1000) < 5
            assert abs(check.pexpiretime(tag + "c:rpm:1") - (exp - 600) * 1000) < 5
            # Reservation data lives until its counters may go, so a late sweep still counts.
            assert abs(check.pexpiretime(tag + f"r:{r}") - exp * 1000) < 5
            assert check.lrange(tag + f"r:{r}", 0, -1) == [b"tpm:1", b"30", b"rpm:1", b"1"]
            # An earlier expires_at does not shorten a counter's life; a later one extends it.
            assert (await store.reserve(team, rid(), [Charge("tpm:1", 100, 1, exp - 60)], 60)).ok
            assert abs(check.pexpiretime(tag + "c:tpm:1") - exp * 1000) < 5
            assert (await store.reserve(team, rid(), [Charge("tpm:1", 100, 1, exp + 60)], 60)).ok
            assert abs(check.pexpiretime(tag + "c:tpm:1") - (exp + 60) * 1000) < 5
            assert await store.settle(team, r, [20, 1])
            assert not check.exists(tag + f"r:{r}")
            assert check.zscore(tag + "rx", r) is None
            assert await store.reset(team) == 4  # 2 counters, 2 reservations
            assert not list(check.scan_iter(match=f"aigw:{{{team}}}:*"))
        finally:
            await store.close()
            check.close()

    asyncio.run(main())


def test_redis_settle_into_a_forgotten_counter_does_not_recreate_it(
    redis_server_module: RedisServer,
) -> None:
    # A counter key without expiry would never go away.
    team, exp = new_team(), time.time() + 0.3
    check = redis_server_module.client()

    async def main() -> None:
        store = RedisStore.from_url(redis_server_module.url, **PATIENT)
        try:
            r = rid()
            assert (await store.reserve(team, r, [Charge("tpm:1", 100, 30, exp)], 60)).ok
            await asyncio.sleep(0.4)
            assert await store.settle(team, r, [20])
            assert not check.exists(f"aigw:{{{team}}}:c:tpm:1")
        finally:
            await store.close()
            check.close()

    asyncio.run(main())


def test_redis_down_raises_store_unavailable_then_recovers(redis_server: RedisServer) -> None:
    team, exp = new_team(), time.time() + 3600
    charges = [Charge("tpm:1", 100, 10, exp)]

    async def main() -> None:
        store = RedisStore.from_url(redis_server.url, timeout_s=0.25)
        try:
            assert (await store.reserve(team, rid(), charges, 60)).ok
            redis_server.kill()
            for call in (
                store.reserve(team, rid(), charges, 60),
                store.settle(team, rid(), [1]),
                store.usage(team, ["tpm:1"]),
                store.reset(team),
            ):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable) as raised:
                    await call
                assert time.monotonic() - started < 2.0  # about not hanging, not speed
                assert raised.value.__cause__ is not None
            redis_server.restart()  # empty, and without the scripts
            result = await store.reserve(team, rid(), charges, 60)
            assert result.ok and result.states == (CounterState("tpm:1", 0, 10),)
        finally:
            await store.close()

    asyncio.run(main())


def test_redis_hung_costs_one_timeout_then_recovers(redis_server: RedisServer) -> None:
    team, exp = new_team(), time.time() + 3600
    charges = [Charge("tpm:1", 100, 10, exp)]

    async def main() -> None:
        store = RedisStore.from_url(redis_server.url, timeout_s=0.1)
        try:
            assert (await store.usage(team, ["tpm:1"]))[0].used == 0
            redis_server.pause()
            try:
                started = time.monotonic()
                with pytest.raises(StoreUnavailable) as raised:
                    await store.reserve(team, rid(), charges, 60)
                elapsed = time.monotonic() - started
                assert isinstance(raised.value.__cause__, TimeoutError)
                assert 0.05 < elapsed < 2.0
            finally:
                redis_server.resume()
            # The timed-out reserve may still have run on the server: over-counted until it
            # expires, never lost. What matters here is that the same client works again.
            assert (await store.reserve(team, rid(), charges, 60)).ok
        finally:
            await store.close()

    asyncio.run(main())


def test_redis_from_url_turns_retries_off() -> None:
    store = RedisStore.from_url(
        "redis://127.0.0.1:1/0", timeout_s=0.05, connect_timeout_s=0.2, pool_size=8
    )
    kwargs = store.client.connection_pool.connection_kwargs
    assert kwargs["retry"].get_retries() == 0
    # Connecting has its own budget; the command's is the store's deadline, not redis-py's.
    assert kwargs["socket_connect_timeout"] == 0.2
    assert kwargs["socket_timeout"] is None
    assert store.client.connection_pool.max_connections == 8
    cluster = RedisStore.from_url("redis://127.0.0.1:1/0", cluster=True, password="pw")
    assert cluster.client.retry.get_retries() == 0
    assert cluster.client.connection_kwargs["socket_timeout"] is None
    assert cluster.client.connection_kwargs["socket_connect_timeout"] == 0.5
    assert cluster.client.connection_kwargs["password"] == "pw"

    async def unreachable() -> None:
        for s in (store, cluster):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as raised:
                await s.usage("team-a", ["tpm:1"])
            assert time.monotonic() - started < 2.0
            assert not raised.value.maybe_applied  # it never got a connection
        await store.close()
        await cluster.close()

    asyncio.run(unreachable())


def test_redis_rejects_team_names_that_would_break_the_hash_tag() -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1/0")
    for bad in ("a}b", "{a}", "", "-a", "a b"):
        with pytest.raises(ValueError):
            store.team_keys(bad)
    assert store.team_keys("team-a.x/y@z:1")[0] == "aigw:{team-a.x/y@z:1}:"
    with pytest.raises(ValueError):
        RedisStore(store.client, prefix="a{b}")


def test_missing_redis_server_fails_loudly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="redis-server not found on PATH"):
        redis_servers.require("redis-server")


# --- Redis: bursts and a busy event loop with the default timeouts ------------------------------

BURST = 300


@pytest.mark.parametrize("harness", ["redis", "cluster"], indirect=True)
def test_a_burst_after_warm_up_all_succeed_with_the_default_timeouts(harness: Harness) -> None:
    """The pool's connections are opened ahead, and a call's wait for a free one is not
    charged to its command's timeout (50 ms by default): 300 calls at once all succeed."""
    team, exp = new_team(), time.time() + 3600
    charges = [Charge("tpm:1", 10**9, 10, exp)]

    async def main() -> None:
        store = RedisStore.from_url(harness.url, cluster=harness.kind == "cluster")
        try:
            await store.warm_up()
            ids = [rid() for _ in range(BURST)]
            calls = (store.reserve(team, r, charges, 60) for r in ids)
            reserved = await asyncio.gather(*calls, return_exceptions=True)
            failed = [r for r in reserved if not isinstance(r, ReserveResult)]
            assert not failed, f"{len(failed)} of {BURST} reserves failed: {failed[:3]}"
            assert all(r.ok for r in reserved)
            calls = (store.settle(team, r, [7]) for r in ids)
            settled = await asyncio.gather(*calls, return_exceptions=True)
            failed = [r for r in settled if r is not True]
            assert not failed, f"{len(failed)} of {BURST} settles failed: {failed[:3]}"
            assert await store.usage(team, ["tpm:1"]) == (CounterState("tpm:1", 7 * BURST, 0),)
        finally:
            await store.close()

    asyncio.run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_busy_event_loop_does_not_turn_answers_into_timeouts(
    redis_server_module: RedisServer, loop: str
) -> None:
    """The loop is kept busy (80 ms at a time, past every 50 ms deadline) while calls are in
    flight, as a burst of requests or a descheduled process does: answers that came in
    meanwhile are taken, not thrown away as timeouts. (With plain asyncio timeouts about a
    quarter of these calls fail.) The sidecar runs on uvloop, whose loop orders timers and I/O
    differently from asyncio's: both are checked."""
    team, exp = new_team(), time.time() + 3600
    charges = [Charge("tpm:1", 10**9, 1, exp)]
    waves, per_wave = 8, 50

    async def main() -> None:
        store = RedisStore.from_url(redis_server_module.url)
        await store.warm_up()
        busy = True

        async def hog() -> None:
            rng = random.Random(7)
            while busy:
                for _ in range(rng.randint(1, 20)):
                    await asyncio.sleep(0)
                time.sleep(0.08)  # noqa: ASYNC251 - the point: the loop is stuck

        hogging = asyncio.create_task(hog())
        failed: list[BaseException] = []
        try:
            for _ in range(waves):
                calls = (store.reserve(team, rid(), charges, 60) for _ in range(per_wave))
                results = await asyncio.gather(*calls, return_exceptions=True)
                failed += [r for r in results if isinstance(r, BaseException)]
        finally:
            busy = False
            await hogging
            await store.close()
        assert not failed, f"{len(failed)} of {waves * per_wave} failed: {failed[:3]}"

    (asyncio.run if loop == "asyncio" else uvloop.run)(main())


def test_redis_settings_reach_the_store() -> None:
    settings = QuotaSettings(
        store="redis",
        redis=RedisSettings(
            url="redis://127.0.0.1:1/0", timeout_ms=20, connect_timeout_ms=300, pool_size=4
        ),
    )
    store = make_store(settings)
    assert isinstance(store, RedisStore)
    pool = store.client.connection_pool
    assert pool.max_connections == 4
    assert pool.connection_kwargs["socket_connect_timeout"] == 0.3
    assert len(store._conns._lanes) == 4
    assert store._timeout_s == 0.02
    defaults = RedisSettings()
    assert (defaults.timeout_ms, defaults.connect_timeout_ms, defaults.pool_size) == (50, 500, 16)
    for bad in ({"pool_size": 0}, {"connect_timeout_ms": 0}, {"pool_size": 100_000}):
        with pytest.raises(ValidationError):
            RedisSettings(**bad)
    # The old name of pool_size is still taken (tests/test_config.py).
    assert RedisSettings.model_validate({"max_connections": 8}).pool_size == 8


# --- settles that fail are retried (QuotaService over a real Redis) ------------------------------

TEAM = "t"
MODEL = "gpt-4o"


def one_limit_config() -> Any:
    return parse_config(
        {
            "quota": {"store": "redis"},
            "teams": {
                TEAM: {
                    "keys": [{"sha256": "0" * 64}],
                    "limits": [{"name": "tokens", "window": "month", "tokens": 10**9}],
                }
            },
            "backends": {"b": {"url": "http://127.0.0.1:1/v1"}},
            "models": {MODEL: {"targets": [{"backend": "b"}]}},
        }
    )


def retries(result: str) -> float:
    return QUOTA_SETTLE_RETRIES.labels("redis", result)._value.get()


async def wait_until(what: str, predicate: Callable[[], bool], within_s: float = 10.0) -> None:
    """Poll (a bound on hanging, not a timing assertion)."""
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, f"not {what} within {within_s}s"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("fault", ["sigstop", "client_pause"])
def test_a_settle_that_fails_is_retried_and_charged_once(
    redis_server: RedisServer, fault: str
) -> None:
    """The settle's first attempt meets a frozen Redis (SIGSTOP: the command waits in the
    server's socket and runs when it wakes; CLIENT PAUSE: the server holds it back) and times
    out; the retry settles it: the counter ends at the actual amount, nothing reserved, not
    charged twice whichever of the two runs first."""
    cfg = one_limit_config()
    specs = Budgets.of(cfg).teams[TEAM]
    check = redis_server.client()

    async def main() -> None:
        store = RedisStore.from_url(redis_server.url)  # the default timeouts
        service = QuotaService(store, QuotaSettings(store="redis"))
        settled_before, failed_before = retries("settled"), retries("failed")
        try:
            await store.warm_up()
            res = await service.reserve(cfg, TEAM, MODEL, specs, Amounts(100, 50))
            assert res is not None
            (counter,) = (c.counter for c in res.charges)
            assert await store.usage(TEAM, [counter]) == (CounterState(counter, 0, 150),)
            if fault == "sigstop":
                redis_server.pause()
            else:
                check.execute_command("CLIENT", "PAUSE", "300", "WRITE")
            try:
                service.settle_soon(res, Amounts(30, 12))
                await wait_until("failed", lambda: service.pending_settles == 1)
                await asyncio.sleep(0.3)
            finally:
                redis_server.resume()
            await service.drain()
            assert service.pending_settles == 0
            assert await store.usage(TEAM, [counter]) == (CounterState(counter, 42, 0),)
            assert service.failures >= 1
            assert retries("settled") == settled_before + 1
            print(f"\n{fault}: failed retries {retries('failed') - failed_before}")
        finally:
            await store.close()
            check.close()

    asyncio.run(main())


def test_a_reload_hands_failed_and_late_settles_to_the_new_store(
    redis_server: RedisServer,
) -> None:
    """A reload that changes the quota settings closes the old store: a stream admitted before
    it settles through the old service; the settle fails there at once (the store is closed)
    and the new service retries it, so the reservation is charged once, at its actual amount,
    not at its estimate when it expires."""
    cfg = one_limit_config()
    specs = Budgets.of(cfg).teams[TEAM]

    async def main() -> None:
        old_store = RedisStore.from_url(redis_server.url)
        new_store = RedisStore.from_url(redis_server.url, timeout_s=0.2)
        old = QuotaService(old_store, QuotaSettings(store="redis"))
        new = QuotaService(new_store, QuotaSettings(store="redis"))
        try:
            await old_store.warm_up()
            await new_store.warm_up()
            res = await old.reserve(cfg, TEAM, MODEL, specs, Amounts(100, 50))
            assert res is not None
            (counter,) = (c.counter for c in res.charges)
            old.hand_over_to(new)  # what Sidecar.reload does, then drain and close
            await old.drain()
            await old_store.close()
            old.settle_soon(res, Amounts(30, 12))  # the in-flight stream ends now
            await wait_until("handed over", lambda: new.pending_settles == 1)
            await new.drain()
            assert await new_store.usage(TEAM, [counter]) == (CounterState(counter, 42, 0),)
        finally:
            await new_store.close()

    asyncio.run(main())


class LostReplies(QuotaStore):
    """A real store whose first `lose` settles run, but whose answers are lost."""

    def __init__(self, store: RedisStore, lose: int) -> None:
        self.store, self.lose = store, lose

    async def reserve(self, *args: Any) -> ReserveResult:
        return await self.store.reserve(*args)

    async def settle(self, team: str, reservation_id: str, actual: Sequence[int]) -> bool:
        settled = await self.store.settle(team, reservation_id, actual)
        if self.lose:
            self.lose -= 1
            raise StoreUnavailable("the answer was lost")
        return settled

    async def usage(self, team: str, counters: Sequence[str]) -> tuple[CounterState, ...]:
        return await self.store.usage(team, counters)

    async def reset(self, team: str) -> int:
        return await self.store.reset(team)


def test_a_settle_retried_after_its_answer_was_lost_changes_nothing(
    redis_server_module: RedisServer,
) -> None:
    """The settle ran on the server and only its answer was lost: the retries find nothing
    left to settle (the script ignores an id it does not know), so nothing counts twice."""
    cfg = one_limit_config()
    specs = Budgets.of(cfg).teams[TEAM]

    async def main() -> None:
        store = RedisStore.from_url(redis_server_module.url, **PATIENT)
        service = QuotaService(LostReplies(store, lose=2), QuotaSettings(store="redis"))
        try:
            await store.reset(TEAM)
            res = await service.reserve(cfg, TEAM, MODEL, specs, Amounts(100, 50))
            assert res is not None
            (counter,) = (c.counter for c in res.charges)
            service.settle_soon(res, Amounts(30, 12))
            await service.drain()
            assert service.failures == 2  # the first attempt and one retry
            assert await store.usage(TEAM, [counter]) == (CounterState(counter, 42, 0),)
        finally:
            await store.close()

    asyncio.run(main())


def test_a_reserve_that_may_have_run_is_released(redis_server: RedisServer) -> None:
    """A reserve whose answer never came (Redis frozen) may still run when Redis wakes: the
    request was refused (failure_mode closed), so what it may have reserved is released."""
    cfg = one_limit_config()
    specs = Budgets.of(cfg).teams[TEAM]

    async def main() -> None:
        store = RedisStore.from_url(redis_server.url)
        service = QuotaService(store, QuotaSettings(store="redis", failure_mode="closed"))
        try:
            await store.warm_up()
            redis_server.pause()
            try:
                with pytest.raises(GatewayError) as refused:
                    await service.reserve(cfg, TEAM, MODEL, specs, Amounts(100, 50))
                assert (refused.value.status, refused.value.code) == (
                    503,
                    "quota_store_unavailable",
                )
                assert service.pending_settles == 1  # the release
                await asyncio.sleep(0.3)
            finally:
                redis_server.resume()
            counter = f"tokens:{_month_start()}"  # the limit's name and its window's start
            with redis_server.client() as check:  # the reserve ran when Redis woke
                woke = check.hmget(f"aigw:{{{TEAM}}}:c:{counter}", "u", "r")
            print(f"\nafter waking: used, reserved = {woke}")
            await service.drain()
            assert service.pending_settles == 0
            assert await store.usage(TEAM, [counter]) == (CounterState(counter, 0, 0),)
        finally:
            await store.close()

    asyncio.run(main())


def test_a_reserve_that_runs_after_its_release_reserves_nothing(
    redis_server_module: RedisServer,
) -> None:
    """The release of a reserve whose answer was lost can run before that reserve does (both
    waited in a frozen server's sockets, on two connections, in no set order): the late
    reserve then reserves nothing, and nothing is held or charged for a refused request."""
    team = new_team()

    async def main() -> None:
        store = RedisStore.from_url(redis_server_module.url)
        try:
            await store.warm_up()
            res_id = rid()
            charge = Charge("c", 1000, 150, time.time() + 3600)
            assert not await store.settle(team, res_id, [0])  # the release, first
            assert (await store.reserve(team, res_id, [charge], 60)).ok  # the late reserve
            assert await store.usage(team, ["c"]) == (CounterState("c", 0, 0),)
            # A new id is not affected.
            assert (await store.reserve(team, rid(), [charge], 60)).ok
            assert await store.usage(team, ["c"]) == (CounterState("c", 0, 150),)
        finally:
            await store.close()

    asyncio.run(main())


def _month_start() -> int:
    from extproc.quota.policy import window_bounds

    return window_bounds("month", time.time())[0]


class DownStore(QuotaStore):
    """Every settle fails; counts the attempts."""

    def __init__(self) -> None:
        self.settles = 0

    async def reserve(self, *args: Any) -> ReserveResult:
        raise AssertionError("not used")

    async def settle(self, team: str, reservation_id: str, actual: Sequence[int]) -> bool:
        self.settles += 1
        raise StoreUnavailable("down")

    async def usage(self, team: str, counters: Sequence[str]) -> tuple[CounterState, ...]:
        return ()

    async def reset(self, team: str) -> int:
        return 0


def test_retries_stop_when_the_reservation_expires_and_at_drain() -> None:
    """Retrying past a reservation's expiry is pointless (the store has charged it at its
    estimate by then): the retries stop there. drain() gives the rest a bounded time."""
    from extproc.quota.service import Reservation

    cfg = one_limit_config()
    specs = Budgets.of(cfg).teams[TEAM]

    def reservation(expires_in: float) -> Reservation:
        return Reservation(
            TEAM, rid(), MODEL, specs, (), (), Amounts(0, 0), cfg,
            expires_at=time.time() + expires_in,
        )  # fmt: skip

    async def main() -> None:
        store = DownStore()
        service = QuotaService(store, QuotaSettings(store="redis"))
        abandoned = retries("abandoned")
        service.settle_soon(reservation(0.3), Amounts(1, 1))
        await wait_until("failed", lambda: store.settles == 1)
        await wait_until("given up", lambda: service.pending_settles == 0)
        assert 2 <= store.settles <= 4  # the first attempt, then a retry or two before expiry
        assert retries("abandoned") == abandoned + 1

        store.settles = 0
        service.settle_soon(reservation(3600), Amounts(1, 1))
        await wait_until("failed", lambda: store.settles == 1)
        started = time.monotonic()
        await service.drain(retries_s=0.3)
        assert time.monotonic() - started < 5  # a bound on hanging, not a timing assertion
        assert service.pending_settles == 0
        assert store.settles >= 2  # drain retried at once
        assert retries("abandoned") == abandoned + 2

    asyncio.run(main())


def test_cluster_recovers_after_a_node_hangs(redis_cluster: RedisClusterNodes) -> None:
    """A node that hangs fails the calls in flight; once it answers again, the store renews
    its connections and works, with the default timeouts."""
    team, exp = new_team(), time.time() + 3600
    charges = [Charge("tpm:1", 10**6, 10, exp)]
    port = owner_port(redis_cluster, key_slot(team.encode()))
    (node,) = [n for n in redis_cluster.nodes if n.port == port]

    async def main() -> None:
        store = RedisStore.from_url(redis_cluster.url, cluster=True)
        try:
            await store.warm_up()
            assert (await store.reserve(team, rid(), charges, 60)).ok
            node.pause()
            try:
                with pytest.raises(StoreUnavailable):
                    await store.reserve(team, rid(), charges, 60)
            finally:
                node.resume()
            results = await asyncio.gather(
                *(store.reserve(team, rid(), charges, 60) for _ in range(50))
            )
            assert all(r.ok for r in results)
        finally:
            await store.close()

    asyncio.run(main())


# --- Redis Cluster --------------------------------------------------------------------------


def slot_owners(cluster: RedisClusterNodes) -> Iterator[tuple[int, int, int]]:
    with cluster.nodes[0].client() as client:
        for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
            yield int(start), int(end), int(primary[1])


def owner_port(cluster: RedisClusterNodes, slot: int) -> int:
    return next(port for start, end, port in slot_owners(cluster) if start <= slot <= end)


def test_cluster_keeps_a_team_in_one_slot(redis_cluster: RedisClusterNodes) -> None:
    team, exp = new_team(), time.time() + 3600
    tag = f"aigw:{{{team}}}:"

    async def main() -> None:
        store = RedisStore.from_url(redis_cluster.url, cluster=True, **PATIENT)
        try:
            r = rid()
            charges = [Charge("tpm:1", 100, 30, exp), Charge("rpm:1", 10, 1, exp)]
            assert (await store.reserve(team, r, charges, 60)).ok
        finally:
            await store.close()
        expected = {tag + "c:tpm:1", tag + "c:rpm:1", tag + f"r:{r}", tag + "rx", tag + "cx"}
        with redis_cluster.nodes[0].client() as client:
            slots = {client.execute_command("CLUSTER", "KEYSLOT", key) for key in expected}
        assert slots == {key_slot(team.encode())}
        (slot,) = slots
        found: dict[int, set[str]] = {}
        for node in redis_cluster.nodes:
            with node.client() as client:
                keys = client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
                if keys:
                    found[node.port] = {k.decode() for k in keys}
        assert found == {owner_port(redis_cluster, slot): expected}

    asyncio.run(main())


def test_cluster_teams_on_different_nodes_both_work(redis_cluster: RedisClusterNodes) -> None:
    by_node: dict[int, str] = {}
    while len(by_node) < 2:
        team = new_team()
        by_node.setdefault(owner_port(redis_cluster, key_slot(team.encode())), team)
    teams = list(by_node.values())
    exp = time.time() + 3600

    async def main() -> None:
        store = RedisStore.from_url(redis_cluster.url, cluster=True, **PATIENT)
        try:
            for i, team in enumerate(teams):
                r = rid()
                assert (await store.reserve(team, r, [Charge("tpm:1", 100, 10 + i, exp)], 60)).ok
                assert await store.settle(team, r, [20 + i])
            for i, team in enumerate(teams):
                assert await store.usage(team, ["tpm:1"]) == (CounterState("tpm:1", 20 + i, 0),)
                assert await store.reset(team) == 1
        finally:
            await store.close()

    asyncio.run(main())


def test_cluster_fixture_is_healthy(redis_cluster: RedisClusterNodes) -> None:
    assert len(redis_cluster.ports) == 3
    covered = sum(end - start + 1 for start, end, _ in slot_owners(redis_cluster))
    assert covered == 16384
    assert all(redis_servers.cluster_state_ok(node) for node in redis_cluster.nodes)
