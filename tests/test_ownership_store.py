"""Owners of stored objects in the quota store (claim / owner / release): one conformance suite
for the memory store, Redis and Redis Cluster, then what only one of them has: the memory
store's bounded sweep, the Redis key and its expiry, a Redis that is down or hung. Real
redis-server processes (tests/redis_servers.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from extproc.quota.memory import _BATCH, MemoryStore
from extproc.quota.redis_store import RedisStore
from extproc.quota.store import CounterState, QuotaStore, ReserveResult, StoreUnavailable
from tests.redis_servers import RedisClusterNodes, RedisServer

pytest_plugins = ["tests.redis_servers"]

# Generous, the wait for a connection too (a Cluster client's first call discovers the nodes
# and opens every connection: over 500 ms once in CI): these tests are about the answers;
# latency has its own tests.
TIMEOUT_S = 2.0
PATIENT = {"timeout_s": TIMEOUT_S, "connect_timeout_s": TIMEOUT_S}


class Harness:
    """Makes stores of one kind and moves their time forward."""

    def __init__(self, kind: str, url: str | None = None) -> None:
        self.kind = kind
        self.url = url
        self.now = 1_800_000_000.0  # the memory store's clock

    def store(self) -> QuotaStore:
        if self.kind == "memory":
            return MemoryStore(clock=lambda: self.now)
        assert self.url is not None
        return RedisStore.from_url(self.url, cluster=self.kind == "cluster", **PATIENT)

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


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.e2e),
        pytest.param("cluster", marks=pytest.mark.e2e),
    ]
)
def harness(request: pytest.FixtureRequest) -> Harness:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server_module")
        return Harness("redis", server.url)
    if request.param == "cluster":
        cluster: RedisClusterNodes = request.getfixturevalue("redis_cluster")
        return Harness("cluster", cluster.url)
    return Harness("memory")


def new_key(kind: str = "response") -> str:
    # Servers are shared by a module's tests: each test works on keys of its own.
    return f"{kind}:resp_{uuid.uuid4().hex[:16]}"


# --- conformance: every store ---------------------------------------------------------------


def test_claim_owner_release(harness: Harness) -> None:
    key, other = new_key(), new_key()

    async def body(store: QuotaStore) -> None:
        assert await store.owner(key) is None  # never claimed
        await store.claim(key, "team-a", 60)
        assert await store.owner(key) == "team-a"
        assert await store.owner(other) is None  # keys are independent
        await store.release(key)
        assert await store.owner(key) is None
        await store.release(key)  # not there: nothing
        await store.release(other)  # never there: nothing
        assert await store.owner(key) is None

    harness.run(body)


def test_claim_never_replaces_an_owner(harness: Harness) -> None:
    key = new_key()

    async def body(store: QuotaStore) -> None:
        assert await store.claim(key, "team-a", 0.3) is None  # free: team-a holds it now
        # Held: the claim is refused and says by whom, and the first ttl stays.
        assert await store.claim(key, "team-b", 60) == "team-a"
        assert await store.owner(key) == "team-a"
        await harness.advance(0.6)
        assert await store.owner(key) is None
        # A key that expired can be claimed again.
        assert await store.claim(key, "team-d", 60) is None
        assert await store.owner(key) == "team-d"
        await store.release(key)
        assert await store.claim(key, "team-e", 60) is None
        assert await store.owner(key) == "team-e"

    harness.run(body)


def test_claims_expire(harness: Harness) -> None:
    short, long = new_key(), new_key("file")

    async def body(store: QuotaStore) -> None:
        await store.claim(short, "team-a", 0.3)
        await store.claim(long, "team-a", 60)
        assert await store.owner(short) == "team-a"
        await harness.advance(0.6)
        assert await store.owner(short) is None
        assert await store.owner(long) == "team-a"
        await store.release(short)  # expired: nothing

    harness.run(body)


def test_keys_and_owners_are_any_short_text(harness: Harness) -> None:
    keys = [
        new_key("batch") + ":{tag}",  # braces: a hash tag on a Cluster, which is fine
        "file:" + "x" * 200,
        "response:ünïcødé id with spaces",
    ]

    async def body(store: QuotaStore) -> None:
        for i, key in enumerate(keys):
            await store.claim(key, f"team-{i}@org/ü", 60)
        for i, key in enumerate(keys):
            assert await store.owner(key) == f"team-{i}@org/ü"
            await store.release(key)
            assert await store.owner(key) is None

    harness.run(body)


def test_empty_key_or_owner_and_non_positive_ttl_are_rejected(harness: Harness) -> None:
    key = new_key()

    async def body(store: QuotaStore) -> None:
        for args in [("", "team-a", 60), (key, "", 60), (key, "team-a", 0), (key, "t", -1)]:
            with pytest.raises(ValueError):
                await store.claim(*args)
        with pytest.raises(ValueError):
            await store.owner("")
        with pytest.raises(ValueError):
            await store.release("")
        assert await store.owner(key) is None  # nothing was claimed

    harness.run(body)


def test_a_store_without_owners_says_so() -> None:
    class Counters(QuotaStore):  # a test double of the counters only, as older ones are
        async def reserve(self, *args: Any) -> ReserveResult:
            raise AssertionError

        async def settle(self, team: str, reservation_id: str, actual: Sequence[int]) -> bool:
            raise AssertionError

        async def usage(self, team: str, counters: Sequence[str]) -> tuple[CounterState, ...]:
            return ()

        async def reset(self, team: str) -> int:
            return 0

    store = Counters()
    with pytest.raises(NotImplementedError):
        asyncio.run(store.owner("response:x"))


# --- memory store ---------------------------------------------------------------------------


def test_memory_expiry_is_by_its_clock() -> None:
    clock = [1_800_000_000.0]
    store = MemoryStore(clock=lambda: clock[0])
    key, start = new_key(), clock[0]

    async def body() -> None:
        await store.claim(key, "team-a", 10)
        clock[0] = start + 9.999
        assert await store.owner(key) == "team-a"
        clock[0] = start + 10  # the claim lasts ttl_s, not a moment more
        assert await store.owner(key) is None
        assert key not in store._owners  # forgotten on read

    asyncio.run(body())


def test_memory_forgets_expired_claims_nobody_reads() -> None:
    clock = [1_800_000_000.0]
    store = MemoryStore(clock=lambda: clock[0])
    n = 5 * _BATCH

    async def body() -> None:
        for i in range(n):
            await store.claim(f"response:old{i}", "team-a", 1)
        kept = new_key()
        await store.claim(kept, "team-a", 3600)
        assert len(store._owners) == n + 1
        clock[0] += 2
        # Each claim sweeps a bounded batch: one did not do it all, a few do, none is missed.
        await store.claim(new_key(), "team-b", 3600)
        assert n + 2 - _BATCH <= len(store._owners) < n + 2
        for _ in range(5):
            await store.claim(new_key(), "team-b", 3600)
        assert len(store._owners) == 7
        assert not any(k.startswith("response:old") for k in store._owners)
        assert await store.owner(kept) == "team-a"

    asyncio.run(body())


def test_memory_replaced_and_released_claims_do_not_pile_up() -> None:
    clock = [1_800_000_000.0]
    store = MemoryStore(clock=lambda: clock[0])

    async def body() -> None:
        live = [new_key() for _ in range(100)]
        for key in live:
            await store.claim(key, "team-a", 3600)
        for i in range(20_000):  # long ttls: no entry comes due, so only compaction helps
            key = live[i % 100]
            if i % 2:
                await store.release(key)
            await store.claim(key, f"team-{i}", 3600)  # kept when held, taken when released
            gone = new_key()
            await store.claim(gone, "team-a", 3600)
            await store.release(gone)
        assert len(store._owners) == 100
        assert len(store._owner_heap) <= 2 * 100 + 64 + 1
        assert await store.owner(live[1]) == "team-19901"
        assert await store.owner(live[0]) == "team-a"  # never released: never replaced
        clock[0] += 3600
        for key in live:
            assert await store.owner(key) is None

    asyncio.run(body())


# --- Redis ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_redis_key_and_its_expiry(redis_server_module: RedisServer) -> None:
    key = new_key()
    check = redis_server_module.client()

    async def main() -> None:
        store = RedisStore.from_url(redis_server_module.url, **PATIENT)
        try:
            assert store.owner_key(key) == f"aigw:own:{key}"
            await store.claim(key, "team-a", 60)
            assert check.get(f"aigw:own:{key}") == b"team-a"
            assert 59_000 < check.pttl(f"aigw:own:{key}") <= 60_000
            assert await store.claim(key, "team-b", 0.25) == "team-a"  # held: kept
            assert check.get(f"aigw:own:{key}") == b"team-a"
            await store.release(key)
            assert await store.claim(key, "team-b", 0.25) is None  # free: taken, with its ttl
            assert check.get(f"aigw:own:{key}") == b"team-b"
            assert 0 < check.pttl(f"aigw:own:{key}") <= 250
            await asyncio.sleep(0.4)
            assert not check.exists(f"aigw:own:{key}")
            # A tiny ttl is at least a millisecond (PX 0 would be an error), not forever.
            await store.claim(key, "team-c", 0.0001)
            await asyncio.sleep(0.05)
            assert await store.owner(key) is None
            await store.claim(key, "team-a", 60)
            await store.release(key)
            assert not check.exists(f"aigw:own:{key}")
            # The prefix is the store's.
            other = RedisStore(Redis(port=redis_server_module.port), prefix="gw2")
            try:
                assert other.owner_key(key) == f"gw2:own:{key}"
                await other.claim(key, "team-z", 60)
                assert check.get(f"gw2:own:{key}") == b"team-z"
                assert await store.owner(key) is None  # another prefix, another owner
            finally:
                await other.close()
        finally:
            await store.close()
            check.close()

    asyncio.run(main())


@pytest.mark.e2e
def test_redis_down_raises_store_unavailable_then_recovers(redis_server: RedisServer) -> None:
    key = new_key()

    async def main() -> None:
        store = RedisStore.from_url(redis_server.url, timeout_s=0.25)
        try:
            await store.claim(key, "team-a", 60)
            assert await store.owner(key) == "team-a"
            redis_server.kill()
            for call in (store.claim(key, "team-b", 60), store.owner(key), store.release(key)):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable) as raised:
                    await call
                assert time.monotonic() - started < 2.0  # about not hanging, not speed
                assert raised.value.__cause__ is not None
            redis_server.restart()  # empty, and without the scripts
            assert await store.owner(key) is None
            await store.claim(key, "team-b", 60)
            assert await store.owner(key) == "team-b"
        finally:
            await store.close()

    asyncio.run(main())


@pytest.mark.e2e
def test_redis_hung_costs_one_timeout_then_recovers(redis_server: RedisServer) -> None:
    key = new_key()

    async def main() -> None:
        store = RedisStore.from_url(redis_server.url, timeout_s=0.1)
        try:
            await store.warm_up()
            await store.claim(key, "team-a", 60)
            redis_server.pause()
            try:
                for call in (store.owner(key), store.claim(key, "team-b", 60)):
                    started = time.monotonic()
                    with pytest.raises(StoreUnavailable) as raised:
                        await call
                    elapsed = time.monotonic() - started
                    assert isinstance(raised.value.__cause__, TimeoutError)
                    assert 0.05 < elapsed < 2.0
            finally:
                redis_server.resume()
            # The timed-out claim may still have run when Redis woke: either owner is fine,
            # what matters is that the same client answers again.
            assert await store.owner(key) in ("team-a", "team-b")
            await store.release(key)
            assert await store.owner(key) is None
        finally:
            await store.close()

    asyncio.run(main())


@pytest.mark.e2e
def test_cluster_keys_on_every_node(redis_cluster: RedisClusterNodes) -> None:
    """Owner keys carry no hash tag: they spread over the slots, so over every node."""
    keys = [new_key() for _ in range(60)]
    assert len({key_slot(f"aigw:own:{k}".encode()) * 3 // 16384 for k in keys}) == 3

    async def main() -> None:
        store = RedisStore.from_url(redis_cluster.url, cluster=True, **PATIENT)
        try:
            await store.warm_up()
            await asyncio.gather(*(store.claim(k, f"team-{i}", 60) for i, k in enumerate(keys)))
            owners = await asyncio.gather(*(store.owner(k) for k in keys))
            assert owners == [f"team-{i}" for i in range(len(keys))]
            await asyncio.gather(*(store.release(k) for k in keys))
            assert await asyncio.gather(*(store.owner(k) for k in keys)) == [None] * len(keys)
        finally:
            await store.close()

    asyncio.run(main())
