"""Run-time API keys (extproc.keys): one conformance suite for every key store (a SQLite file,
Redis, Redis Cluster), then the per-process directory over them (two directories on one store
are two sidecar processes), what only one store has, and the settings. Real redis-server
processes (tests/redis_servers.py) and real SQLite files; nothing is mocked."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from redis.crc import key_slot

from extproc.config import QuotaSettings, RedisSettings
from extproc.keys.directory import KeyDirectory
from extproc.keys.records import (
    SECRET_PREFIX,
    KeyNotFound,
    KeyRevoked,
    KeySpec,
    KeyStoreUnavailable,
    KeysUnavailable,
    digest_of,
    new_record,
)
from extproc.keys.redis_store import RedisKeyStore
from extproc.keys.settings import KeysSettings, make_directory, make_key_store
from extproc.keys.sqlite_store import SqliteKeyStore
from extproc.keys.store import KeyStore
from tests.redis_servers import RedisClusterNodes, RedisServer

from .conftest import REPO

pytest_plugins = ["tests.redis_servers"]

STORES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("redis", id="redis", marks=pytest.mark.e2e),
    pytest.param("cluster", id="cluster", marks=pytest.mark.e2e),
]

SPEC = KeySpec(
    team="team-a",
    user="alice@example.com",
    models=("gpt-4o-mini", "fast"),
    limits=({"window": "day", "tokens": 200000}, {"window": "month", "usd": 12.5}),
    description="the nightly batch",
)


StoreFactory = Callable[[], KeyStore]

# Generous: these tests are about what is stored, and a loaded machine must not turn them into
# timeouts (a Cluster client's first call discovers the nodes within the call's time). The
# stores' own bounds are tested on their own (test_redis_down_is_store_unavailable).
PATIENT = {"timeout_s": 2.0, "connect_timeout_s": 2.0}


@pytest.fixture(params=STORES)
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Makes stores on one place (a file, a Redis), each with its own connections: as many
    sidecar processes would. A Redis is shared by a module's tests, each with its own prefix."""
    kind = request.param
    prefix = f"t{uuid.uuid4().hex[:8]}"
    if kind == "sqlite":
        path = tmp_path / "keys.sqlite"

        def factory() -> KeyStore:
            return SqliteKeyStore(path)

    elif kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server_module")

        def factory() -> KeyStore:
            return RedisKeyStore.from_url(server.url, prefix=prefix, **PATIENT)

    else:
        cluster: RedisClusterNodes = request.getfixturevalue("redis_cluster")

        def factory() -> KeyStore:
            return RedisKeyStore.from_url(cluster.url, cluster=True, prefix=prefix, **PATIENT)

    yield factory


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


# -- every store -------------------------------------------------------------------------------


def test_create_get_list_and_find_by_digest(new_store: StoreFactory) -> None:
    async def body() -> None:
        store = new_store()
        try:
            assert await store.list() == []
            record, secret = await store.create(SPEC, now=1000.0)
            assert secret.startswith(SECRET_PREFIX) and len(secret) >= len(SECRET_PREFIX) + 40
            assert record.id.startswith("key_") and len(record.id) == 4 + 16
            assert record.digest == digest_of(secret) and record.hint == secret[-4:]
            assert (record.team, record.user, record.models) == (
                "team-a",
                "alice@example.com",
                ("gpt-4o-mini", "fast"),
            )
            assert record.limits == SPEC.limits
            assert record.created_at == 1000.0
            assert record.revoked_at is None and record.last_used_at is None

            assert await store.get(record.id) == record
            assert await store.by_digest(digest_of(secret)) == record
            assert await store.by_digest(digest_of(secret + "x")) is None
            assert await store.get("key_0000000000000000") is None

            other, other_secret = await store.create(KeySpec(team="team-b"), now=1001.0)
            assert other_secret != secret and other.id != record.id
            assert other.models is None and other.limits == () and other.user is None
            assert [r.id for r in await store.list()] == [record.id, other.id]
            assert [r.id for r in await store.list("team-b")] == [other.id]
            assert await store.list("team-c") == []
        finally:
            await store.close()

    run(body)


def test_every_write_moves_the_revision_and_every_process_sees_it(new_store: StoreFactory) -> None:
    async def body() -> None:
        one, two = new_store(), new_store()
        try:
            seen = [await one.revision()]
            record, _ = await one.create(SPEC)
            seen.append(await two.revision())
            await two.rotate(record.id)
            seen.append(await one.revision())
            await one.revoke(record.id)
            seen.append(await two.revision())
            assert len(set(seen)) == 4, seen
            # Nothing changed: no process needs to reload.
            await two.revoke(record.id)
            await one.touch(record.id, time.time())
            assert await one.revision() == seen[-1]
            snapshot = await two.snapshot()
            assert snapshot.revision == seen[-1]
            assert [r.id for r in snapshot.records] == [record.id]
        finally:
            await one.close()
            await two.close()

    run(body)


def test_rotate_replaces_the_secret_at_once(new_store: StoreFactory) -> None:
    async def body() -> None:
        store = new_store()
        try:
            record, old = await store.create(SPEC, now=1000.0)
            rotated, new = await store.rotate(record.id, now=2000.0)
            assert new != old and new.startswith(SECRET_PREFIX)
            assert rotated.digest == digest_of(new) and rotated.hint == new[-4:]
            assert rotated.rotated_at == 2000.0 and rotated.previous_digest is None
            assert (rotated.id, rotated.team, rotated.limits) == (record.id, "team-a", SPEC.limits)
            assert await store.by_digest(digest_of(old)) is None
            assert await store.by_digest(digest_of(new)) == rotated
            assert await store.get(record.id) == rotated
        finally:
            await store.close()

    run(body)


def test_rotate_with_a_grace_period_keeps_the_old_secret_until_then(
    new_store: StoreFactory,
) -> None:
    async def body() -> None:
        store = new_store()
        try:
            record, first = await store.create(SPEC, now=1000.0)
            rotated, second = await store.rotate(record.id, now=2000.0, grace_s=3600)
            assert rotated.previous_digest == digest_of(first)
            assert rotated.previous_valid_until == 5600.0
            assert rotated.previous_usable(5599.0) and not rotated.previous_usable(5600.0)
            assert await store.by_digest(digest_of(first)) == rotated
            assert await store.by_digest(digest_of(second)) == rotated
            # A second rotation ends the first one's old secret at once.
            again, third = await store.rotate(record.id, now=2100.0, grace_s=60)
            assert await store.by_digest(digest_of(first)) is None
            assert await store.by_digest(digest_of(second)) == again
            assert await store.by_digest(digest_of(third)) == again
        finally:
            await store.close()

    run(body)


def test_revoke_once_and_no_rotation_after(new_store: StoreFactory) -> None:
    async def body() -> None:
        store = new_store()
        try:
            record, secret = await store.create(SPEC, now=1000.0)
            revoked = await store.revoke(record.id, 2000.0)
            assert revoked.revoked_at == 2000.0 and revoked.status(2000.0) == "revoked"
            assert (await store.revoke(record.id, 3000.0)).revoked_at == 2000.0
            with pytest.raises(KeyRevoked):
                await store.rotate(record.id)
            # Still listed and found (the caller reads the times), with its secret unchanged.
            assert await store.by_digest(digest_of(secret)) == revoked
            assert [r.revoked_at for r in await store.list()] == [2000.0]
        finally:
            await store.close()

    run(body)


def test_unknown_ids(new_store: StoreFactory) -> None:
    async def body() -> None:
        store = new_store()
        try:
            with pytest.raises(KeyNotFound, match="key_nope"):
                await store.revoke("key_nope")
            with pytest.raises(KeyNotFound):
                await store.rotate("key_nope")
            await store.touch("key_nope", time.time())  # ignored
            assert await store.list() == []
        finally:
            await store.close()

    run(body)


def test_touch_only_moves_last_use_forward(new_store: StoreFactory) -> None:
    async def body() -> None:
        store = new_store()
        try:
            record, _ = await store.create(SPEC, now=1000.0)
            await store.touch(record.id, 1500.25)
            await store.touch(record.id, 1200.0)  # a late write of an older use
            found = await store.get(record.id)
            assert found is not None and found.last_used_at == 1500.25
            # A rotation does not forget it, nor does it undo the rotation.
            rotated, _ = await store.rotate(record.id, now=1600.0)
            assert rotated.last_used_at == 1500.25
            await store.touch(record.id, 1700.0)
            found = await store.get(record.id)
            assert found is not None and found.last_used_at == 1700.0
            assert found.rotated_at == 1600.0 and found.digest == rotated.digest
        finally:
            await store.close()

    run(body)


def test_the_secret_is_never_stored(new_store: StoreFactory, tmp_path: Path) -> None:
    async def body() -> None:
        store = new_store()
        try:
            record, secret = await store.create(SPEC)
            _, rotated = await store.rotate(record.id, grace_s=60)
            if isinstance(store, SqliteKeyStore):
                raw = await asyncio.to_thread(read_all, tmp_path, "keys.sqlite*")  # and its WAL
            else:
                assert isinstance(store, RedisKeyStore)
                client = store.client
                raw = repr(
                    [
                        await client.hgetall(store.records_key),
                        await client.hgetall(store.digests_key),
                    ]
                ).encode()
            assert digest_of(rotated).hex().encode() in raw  # what is stored: digests
            for s in (secret, rotated):
                assert s.encode() not in raw
                assert s.removeprefix(SECRET_PREFIX)[:-4].encode() not in raw
        finally:
            await store.close()

    run(body)


# -- the directory: what every sidecar process holds ------------------------------------------


def test_a_revocation_reaches_every_process_within_a_second(new_store: StoreFactory) -> None:
    async def body() -> None:
        one, two = KeyDirectory(new_store()), KeyDirectory(new_store())
        admin = new_store()
        await one.start()
        await two.start()
        try:
            record, secret = await admin.create(SPEC)
            for directory in (one, two):
                await until(lambda d=directory: d.lookup(secret) is not None)
            found = two.lookup(secret)
            assert found is not None and found.id == record.id and found.limits == SPEC.limits

            revoked_at = time.monotonic()
            await admin.revoke(record.id)
            await until(lambda: one.lookup(secret) is None and two.lookup(secret) is None)
            elapsed = time.monotonic() - revoked_at
            assert elapsed < 1.0, f"still served {elapsed:.2f}s after its revocation"
            assert one.trusted and two.trusted
        finally:
            await one.close()
            await two.close()
            await admin.close()

    run(body)


def test_a_rotation_reaches_every_process_and_a_grace_period_holds(
    new_store: StoreFactory,
) -> None:
    async def body() -> None:
        one, two = KeyDirectory(new_store()), KeyDirectory(new_store())
        await one.start()
        await two.start()
        try:
            record, first = await one.store.create(SPEC)
            await until(lambda: two.lookup(first) is not None)
            _, second = await one.store.rotate(record.id, grace_s=3600)
            await until(lambda: two.lookup(second) is not None)
            assert two.lookup(first) is not None  # its grace period
            _, third = await one.store.rotate(record.id)
            await until(lambda: two.lookup(third) is not None)
            assert two.lookup(first) is None and two.lookup(second) is None
        finally:
            await one.close()
            await two.close()

    run(body)


def test_expiry_is_checked_at_each_lookup(tmp_path: Path) -> None:
    now = [1000.0]

    async def body() -> None:
        directory = KeyDirectory(SqliteKeyStore(tmp_path / "keys.sqlite"), clock=lambda: now[0])
        try:
            record, secret = await directory.store.create(
                KeySpec(team="team-a", expires_at=1060.0), now=1000.0
            )
            await directory.refresh()
            assert directory.lookup(secret) == record
            now[0] = 1059.9
            assert directory.lookup(secret) == record
            now[0] = 1060.0  # no poll in between: the clock alone
            assert directory.lookup(secret) is None
            assert record.status(1060.0) == "expired"
        finally:
            await directory.close()

    run(body)


def test_a_grace_period_ends_at_lookup_time_too(tmp_path: Path) -> None:
    now = [1000.0]

    async def body() -> None:
        directory = KeyDirectory(SqliteKeyStore(tmp_path / "keys.sqlite"), clock=lambda: now[0])
        try:
            record, old = await directory.store.create(KeySpec(team="team-a"), now=1000.0)
            _, new = await directory.store.rotate(record.id, now=1000.0, grace_s=30)
            await directory.refresh()
            assert directory.lookup(old) is not None and directory.lookup(new) is not None
            now[0] = 1030.0
            assert directory.lookup(old) is None
            assert directory.lookup(new) is not None
        finally:
            await directory.close()

    run(body)


def test_lookup_refuses_to_answer_from_a_copy_it_cannot_vouch_for(
    redis_server: RedisServer,
) -> None:
    async def body() -> None:
        directory = KeyDirectory(RedisKeyStore.from_url(redis_server.url))
        await directory.start()
        try:
            record, secret = await directory.store.create(SPEC)
            await directory.refresh()
            assert directory.lookup(secret) == record

            redis_server.kill()
            stopped = time.monotonic()
            # A copy confirmed less than a second ago still answers...
            assert directory.lookup(secret) == record
            # ...and then, within a second (and a poll), it no longer does.
            await until(lambda: not directory.trusted, within=2.0)
            assert time.monotonic() - stopped <= 1.0 + 0.3
            with pytest.raises(KeysUnavailable):
                directory.lookup(secret)
            with pytest.raises(KeysUnavailable):
                directory.lookup(SECRET_PREFIX + "a" * 40)  # could be a key made meanwhile
            # Not shaped like a run-time key: not one of ours, whatever the store does.
            assert directory.lookup("sk-team-a") is None
            with pytest.raises(KeyStoreUnavailable):
                await directory.store.list()

            # Back, empty (no persistence): trusted again, and the key is gone with the data.
            redis_server.start()
            await until(lambda: directory.trusted, within=3.0)
            assert directory.lookup(secret) is None
        finally:
            await directory.close()

    run(body)


def test_a_directory_never_loaded_is_not_trusted(tmp_path: Path) -> None:
    directory = KeyDirectory(SqliteKeyStore(tmp_path / "keys.sqlite"))
    assert not directory.trusted
    with pytest.raises(KeysUnavailable):
        directory.lookup(SECRET_PREFIX + "a" * 40)
    assert directory.lookup("sk-from-the-config-file") is None
    run(directory.close)


def test_a_store_that_cannot_open_is_unavailable_not_fatal(tmp_path: Path) -> None:
    async def body() -> None:
        directory = KeyDirectory(SqliteKeyStore(tmp_path / "missing-dir" / "keys.sqlite"))
        await directory.start(timeout_s=1.0)  # logged, not raised: the config's keys work
        try:
            assert not directory.trusted
            with pytest.raises(KeyStoreUnavailable, match="missing-dir"):
                await directory.store.create(SPEC)
        finally:
            await directory.close()

    run(body)


def test_last_use_is_written_in_the_background_at_most_once_a_minute(tmp_path: Path) -> None:
    now = [1000.0]

    async def body() -> None:
        directory = KeyDirectory(SqliteKeyStore(tmp_path / "keys.sqlite"), clock=lambda: now[0])
        try:
            record, secret = await directory.store.create(SPEC, now=900.0)
            await directory.refresh()
            assert directory.lookup(secret) is not None  # noted, not written
            found = await directory.store.get(record.id)
            assert found is not None and found.last_used_at is None
            await directory.flush_uses()
            found = await directory.store.get(record.id)
            assert found is not None and found.last_used_at == 1000.0

            now[0] = 1059.0
            directory.lookup(secret)
            await directory.flush_uses()
            found = await directory.store.get(record.id)
            assert found is not None and found.last_used_at == 1000.0  # within the minute

            now[0] = 1060.0
            directory.lookup(secret)
            await directory.flush_uses()
            found = await directory.store.get(record.id)
            assert found is not None and found.last_used_at == 1060.0
            assert directory.lookup(secret + "x") is None  # a miss notes nothing
        finally:
            await directory.close()

    run(body)


def test_the_background_task_writes_last_use(tmp_path: Path) -> None:
    async def body() -> None:
        directory = KeyDirectory(SqliteKeyStore(tmp_path / "keys.sqlite"))
        await directory.start()
        try:
            record, secret = await directory.store.create(SPEC)
            await directory.refresh()
            before = time.time()
            assert directory.lookup(secret) is not None

            async def written() -> bool:
                found = await directory.store.get(record.id)
                return found is not None and (found.last_used_at or 0) >= before

            await until_async(written)
        finally:
            await directory.close()

    run(body)


# -- SQLite ------------------------------------------------------------------------------------


def test_sqlite_is_shared_with_another_process(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite"
    script = (
        "import asyncio, sys\n"
        "from extproc.keys.sqlite_store import SqliteKeyStore\n"
        "async def main():\n"
        "    store = SqliteKeyStore(sys.argv[1])\n"
        "    await store.revoke(sys.argv[2])\n"
        "    await store.close()\n"
        "asyncio.run(main())\n"
    )

    async def body() -> None:
        directory = KeyDirectory(SqliteKeyStore(path))
        await directory.start()
        try:
            record, secret = await directory.store.create(SPEC)
            await directory.refresh()
            assert directory.lookup(secret) is not None
            done = await asyncio.create_subprocess_exec(
                sys.executable, "-c", script, str(path), record.id, cwd=REPO
            )
            assert await done.wait() == 0
            revoked_at = time.monotonic()
            await until(lambda: directory.lookup(secret) is None)
            assert time.monotonic() - revoked_at < 1.0
        finally:
            await directory.close()

    run(body)


def test_sqlite_takes_writers_of_several_processes_at_once(tmp_path: Path) -> None:
    """Four processes open a new file together (each creating the schema) and write at once,
    waiting for each other's locks: every key and every last use is there."""
    path = tmp_path / "keys.sqlite"
    script = (
        "import asyncio, sys\n"
        "from extproc.keys.records import KeySpec\n"
        "from extproc.keys.sqlite_store import SqliteKeyStore\n"
        "async def main():\n"
        "    store = SqliteKeyStore(sys.argv[1])\n"
        "    for _ in range(25):\n"
        "        record, _ = await store.create(KeySpec(team=sys.argv[2]))\n"
        "        await store.touch(record.id, 1.0)\n"
        "    await store.close()\n"
        "asyncio.run(main())\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path), f"team-{n}"], cwd=REPO)
        for n in range(4)
    ]
    assert [p.wait(60) for p in procs] == [0] * 4

    async def body() -> None:
        store = SqliteKeyStore(path)
        try:
            records = await store.list()
            assert len(records) == 100 and len({r.id for r in records}) == 100
            assert {r.team for r in records} == {f"team-{n}" for n in range(4)}
            assert all(r.last_used_at == 1.0 for r in records)
        finally:
            await store.close()

    run(body)


def test_sqlite_opening_retries_a_file_locked_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Switching a file to WAL while another process does may answer "database is locked"
    without waiting (seen in CI with four processes): opening retries that, up to the busy
    timeout, and no other error."""
    real = SqliteKeyStore._init_once

    def failing(times: float, code: int | None) -> list[int]:
        """Opening fails `times` times with "database is locked", SQLite's code `code`."""
        calls: list[int] = []

        def init_once(self: SqliteKeyStore) -> None:
            calls.append(1)
            if len(calls) <= times:
                exc = sqlite3.OperationalError("database is locked")
                if code is not None:
                    exc.sqlite_errorcode = code  # type: ignore[attr-defined]
                raise exc
            real(self)

        monkeypatch.setattr(SqliteKeyStore, "_init_once", init_once)
        return calls

    async def open_and_create(name: str, busy_timeout_s: float = 5.0) -> None:
        store = SqliteKeyStore(tmp_path / name, busy_timeout_s=busy_timeout_s)
        try:
            await store.create(SPEC)
        finally:
            await store.close()

    async def body() -> None:
        # A busy answer is retried ...
        calls = failing(2, sqlite3.SQLITE_BUSY)
        await open_and_create("a.sqlite")
        assert len(calls) == 3
        # ... an error without SQLite's busy code is not ...
        calls = failing(2, None)
        with pytest.raises(KeyStoreUnavailable):
            await open_and_create("b.sqlite")
        assert len(calls) == 1
        # ... and a lock that lasts is given up on after the busy timeout.
        calls = failing(math.inf, sqlite3.SQLITE_BUSY)
        started = time.monotonic()
        with pytest.raises(KeyStoreUnavailable, match="locked"):
            await open_and_create("c.sqlite", busy_timeout_s=0.3)
        assert time.monotonic() - started >= 0.25 and len(calls) > 2

    run(body)


def test_sqlite_file_is_wal_and_private(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite"

    async def body() -> None:
        store = SqliteKeyStore(path)
        try:
            await store.create(SPEC)
        finally:
            await store.close()

    run(body)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    out = subprocess.run(
        [sys.executable, "-c", f"import sqlite3; print(sqlite3.connect({str(path)!r})"
         ".execute('PRAGMA journal_mode').fetchone()[0])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "wal"


def test_sqlite_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite"

    async def first() -> None:
        store = SqliteKeyStore(path)
        await store.create(SPEC, now=1000.0)
        await store.close()

    async def second() -> None:
        store = SqliteKeyStore(path)
        try:
            [record] = await store.list()
            assert record.created_at == 1000.0 and record.limits == SPEC.limits
        finally:
            await store.close()

    run(first)
    run(second)


# -- Redis -------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_redis_keeps_every_key_of_the_store_in_one_cluster_slot(
    redis_cluster: RedisClusterNodes,
) -> None:
    async def body() -> None:
        store = RedisKeyStore.from_url(redis_cluster.url, cluster=True, **PATIENT)
        try:
            assert store.keys == (
                "aigw:{keys}:k",
                "aigw:{keys}:d",
                "aigw:{keys}:u",
                "aigw:{keys}:rev",
            )
            assert {key_slot(k.encode()) for k in store.keys} == {key_slot(b"keys")}
            record, secret = await store.create(SPEC)
            await store.touch(record.id, time.time())
            client = store.client
            for key in store.keys:
                assert await client.exists(key) == 1, key
            assert (
                await client.hget(store.digests_key, digest_of(secret).hex()) == record.id.encode()
            )
            await store.revoke(record.id)
        finally:
            await store.close()

    run(body)


@pytest.mark.e2e
def test_redis_revision_does_not_come_back_after_a_restart(redis_server: RedisServer) -> None:
    async def body() -> None:
        store = RedisKeyStore.from_url(redis_server.url)
        try:
            assert await store.revision() == 0
            await store.create(SPEC)
            before = await store.revision()
            assert before > 1_000_000_000_000_000  # from the clock, in microseconds
            redis_server.restart()  # empty: no persistence
            assert await store.revision() == 0
            await store.create(SPEC)
            assert await store.revision() not in (0, before)
        finally:
            await store.close()

    run(body)


@pytest.mark.e2e
def test_redis_down_is_store_unavailable(redis_server: RedisServer) -> None:
    async def body() -> None:
        store = RedisKeyStore.from_url(redis_server.url, timeout_s=0.3)
        try:
            redis_server.pause()  # answers nothing
            started = time.monotonic()
            with pytest.raises(KeyStoreUnavailable):
                await store.revision()
            assert time.monotonic() - started < 1.0
        finally:
            redis_server.resume()
            await store.close()

    run(body)


# -- settings ----------------------------------------------------------------------------------


def test_settings_choose_the_store_and_its_file(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "gateway.yaml"
    memory, redis = QuotaSettings(), QuotaSettings(store="redis")
    default = KeysSettings()
    assert default.store_kind(memory) == "sqlite"
    assert default.store_kind(redis) == "redis"
    assert KeysSettings(store="sqlite").store_kind(redis) == "sqlite"
    assert default.sqlite_path(config) == tmp_path / "etc" / "keys.sqlite"
    assert KeysSettings(path=Path("data/k.db")).sqlite_path(config) == tmp_path / "etc/data/k.db"
    assert KeysSettings(path=Path("/var/lib/k.db")).sqlite_path(config) == Path("/var/lib/k.db")

    store = make_key_store(default, quota=memory, config_path=config)
    assert isinstance(store, SqliteKeyStore) and store.path == tmp_path / "etc" / "keys.sqlite"
    assert not store.path.parent.exists()  # nothing opened before the first call
    run(store.close)
    quota = QuotaSettings(store="redis", redis=RedisSettings(url="redis://127.0.0.1:1/0"))
    directory = make_directory(
        KeysSettings(poll_interval_ms=100, stale_after_ms=400), quota=quota, config_path=config
    )
    assert isinstance(directory.store, RedisKeyStore)
    assert (directory.poll_interval_s, directory.stale_after_s) == (0.1, 0.4)
    run(directory.close)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stor": "sqlite"}, "Extra inputs are not permitted"),
        ({"store": "redis", "path": "k.db"}, "the redis store has none"),
        ({"poll_interval_ms": 1000, "stale_after_ms": 1000}, "must exceed poll_interval_ms"),
        ({"store": "memory"}, "'sqlite' or 'redis'"),
    ],
)
def test_settings_refuse(data: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        KeysSettings.model_validate(data)


# -- helpers -----------------------------------------------------------------------------------


def read_all(directory: Path, pattern: str) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.glob(pattern)))


async def until(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.01)


async def until_async(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.02)


def test_a_revocation_holds_whatever_the_clock_of_the_process_reading_it() -> None:
    """revoked_at is the revoking process's clock: a sidecar whose clock is behind still
    refuses the key at once (a revocation is never scheduled for later)."""
    record = new_record(KeySpec(team="t"), "key_0123456789abcdef", SECRET_PREFIX + "x" * 40, 0.0)
    revoked = dataclasses.replace(record, revoked_at=2000.0)
    assert revoked.status(1995.0) == "revoked" and not revoked.usable(1995.0)


def test_a_snapshot_of_many_keys_is_whole(new_store: StoreFactory) -> None:
    """Past a few hundred keys the Redis store decodes a snapshot off the event loop: the same
    keys come back either way."""

    async def body() -> None:
        store = new_store()
        try:
            made = [
                (await store.create(KeySpec(team=f"t{i % 3}"), 1000.0 + i))[0] for i in range(250)
            ]
            snapshot = await store.snapshot()
            assert sorted(r.id for r in snapshot.records) == sorted(r.id for r in made)
            assert {r.id: r.team for r in snapshot.records} == {r.id: r.team for r in made}
        finally:
            await store.close()

    run(body)
