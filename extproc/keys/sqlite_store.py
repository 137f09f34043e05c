"""The embedded key store: one SQLite file, which survives restarts and is shared by every
sidecar process of one machine (`sidecar.workers`). A fleet of machines needs the Redis store.

Where the file is: `keys.path` of the config, relative to the config file's directory; by
default `keys.sqlite` next to the config file (settings.py). Not the working directory: a
sidecar started from another directory would silently get another, empty, set of keys. Not a
fixed system path either: it would need root, and two gateways on a machine would share it.

Schema (version 1):

    keys   one row per key, revoked ones included
      id                    TEXT PRIMARY KEY   "key_" + 16 hex
      digest                TEXT UNIQUE        sha256 of the secret, hex (never the secret)
      hint                  TEXT               the secret's last 4 characters
      team, user_id         TEXT               user_id NULL: none
      expires_at            REAL               unix time; NULL: never
      models                TEXT               JSON list of model/group names; NULL: the team's
      limits                TEXT               JSON list of the config's Limit, as dicts
      description           TEXT
      created_at, revoked_at, rotated_at, last_used_at    REAL (unix time; NULL: not yet)
      previous_digest       TEXT UNIQUE        the secret before the last rotation, hex, while
      previous_valid_until  REAL               its grace period lasts (then both stay, unused)
    meta   name -> value: "schema" (1), "revision" (see store.py)

Concurrency. WAL mode: readers never wait for a writer, so a process's revision poll is not
held up by another's write; writers queue behind each other (busy timeout). Each write runs in
one BEGIN IMMEDIATE transaction that also increments the revision, so a poll sees a write whole
or not at all. last_used_at is written by UPDATE alone, without the revision: no process
reloads for it.

Every call runs on one of two threads of this store, never on the event loop: one for reads
(the polls, which must not wait behind a write that waits for another process's lock), one for
writes. Each thread owns its connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .records import KeyRecord, KeyStoreUnavailable, from_json_dict, to_json_dict
from .store import KeyStore, Snapshot, require

T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    team TEXT NOT NULL,
    user_id TEXT,
    expires_at REAL,
    models TEXT,
    limits TEXT NOT NULL DEFAULT '[]',
    description TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    revoked_at REAL,
    rotated_at REAL,
    last_used_at REAL,
    previous_digest TEXT UNIQUE,
    previous_valid_until REAL
);
CREATE INDEX IF NOT EXISTS keys_team ON keys (team);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

_COLUMNS = (
    "id, digest, hint, team, user_id, expires_at, models, limits, description, created_at, "
    "revoked_at, rotated_at, last_used_at, previous_digest, previous_valid_until"
)
_COLUMN_NAMES = tuple(name.strip() for name in _COLUMNS.split(","))
_BUMP = "UPDATE meta SET value = value + 1 WHERE name = 'revision'"


class SqliteKeyStore(KeyStore):
    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 5.0) -> None:
        """`busy_timeout_s`: how long a write waits for another process's write to end."""
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        # One thread each, so each connection is only ever used by the thread that opened it.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="keys-sqlite-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="keys-sqlite-write")
        self._read_conn: sqlite3.Connection | None = None
        self._write_conn: sqlite3.Connection | None = None
        self._ready = False
        self._ready_lock = asyncio.Lock()
        self._closed = False

    # -- connections (on their threads) --------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; each write says BEGIN IMMEDIATE.
        # (`timeout` is SQLite's busy timeout.)
        return sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)

    def _writing(self) -> sqlite3.Connection:
        if self._write_conn is None:
            self._write_conn = self._connect()
        return self._write_conn

    def _reading(self) -> sqlite3.Connection:
        if self._read_conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only = 1")
            self._read_conn = conn
        return self._read_conn

    def _init(self) -> None:
        """Create the file (owner-only: it names users and teams) and the schema, once; several
        processes may do this at once.

        Retried while the file is locked, up to the busy timeout: switching a file to WAL needs
        it to itself, and SQLite answers "database is locked" at once, without waiting as the
        busy timeout says, while another process opens or switches it (seen with four
        processes opening a new file together)."""
        deadline = time.monotonic() + self._busy_timeout_s
        pause = 0.005
        while True:
            try:
                return self._init_once()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)  # on the writer thread, never the event loop
            pause = min(pause * 2, 0.1)

    def _init_once(self) -> None:
        if not self.path.exists():
            # The WAL and shared-memory files SQLite creates next to it take its permissions.
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
            os.close(fd)
        conn = self._writing()
        # Persistent in the file: the first process to get here switches it, for all.
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"{self.path}: cannot use WAL mode (got {mode!r})")
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Not executescript(): it would COMMIT first, outside this transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES ('schema', ?), ('revision', ?)",
                (SCHEMA_VERSION, time.time_ns() // 1000),
            )
            schema = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()[0]
            if schema != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"{self.path}: key store schema {schema}, this version reads {SCHEMA_VERSION}"
                )
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    async def _ensure(self) -> None:
        if self._ready:
            return
        async with self._ready_lock:
            if not self._ready:
                await self._run(self._writer, self._init, ready=False)
                self._ready = True

    async def _run(self, pool: ThreadPoolExecutor, call: Callable[[], T], ready: bool = True) -> T:
        if self._closed:
            raise KeyStoreUnavailable(f"sqlite {self.path}: the store is closed")
        if ready:
            await self._ensure()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, call)
        except (sqlite3.Error, OSError) as exc:
            raise KeyStoreUnavailable(f"sqlite {self.path}: {type(exc).__name__}: {exc}") from exc

    async def _read(self, call: Callable[[sqlite3.Connection], T]) -> T:
        return await self._run(self._reader, lambda: call(self._reading()))

    async def _write(self, call: Callable[[sqlite3.Connection], T]) -> T:
        def transaction() -> T:
            conn = self._writing()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = call(conn)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            return result

        return await self._run(self._writer, transaction)

    # -- the store ------------------------------------------------------------------------------

    async def get(self, key_id: str) -> KeyRecord | None:
        return await self._read(lambda conn: _get(conn, key_id))

    async def by_digest(self, digest: bytes) -> KeyRecord | None:
        def find(conn: sqlite3.Connection) -> KeyRecord | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM keys WHERE digest = ? OR previous_digest = ?",
                (digest.hex(), digest.hex()),
            ).fetchone()
            return None if row is None else _record(row)

        return await self._read(find)

    async def snapshot(self) -> Snapshot:
        def read(conn: sqlite3.Connection) -> Snapshot:
            # One read transaction: the revision and the rows of the same moment.
            conn.execute("BEGIN")
            try:
                revision = _revision(conn)
                rows = conn.execute(f"SELECT {_COLUMNS} FROM keys").fetchall()
            finally:
                _rollback(conn)  # nothing was written: ending the read is all it does
            return Snapshot(revision, tuple(_record(row) for row in rows))

        return await self._read(read)

    async def revision(self) -> int:
        return await self._read(_revision)

    async def touch(self, key_id: str, when: float) -> None:
        def update(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE keys SET last_used_at = ? WHERE id = ? "
                "AND (last_used_at IS NULL OR last_used_at < ?)",
                (when, key_id, when),
            )

        await self._write(update)

    async def _insert(self, record: KeyRecord) -> bool:
        def insert(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT 1 FROM keys WHERE id = ?", (record.id,)).fetchone():
                return False
            values = _values(record)
            conn.execute(
                f"INSERT INTO keys ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                tuple(values.values()),
            )
            conn.execute(_BUMP)
            return True

        return await self._write(insert)

    async def _update(self, key_id: str, change: Callable[[KeyRecord], KeyRecord]) -> KeyRecord:
        def update(conn: sqlite3.Connection) -> KeyRecord:
            old = require(_get(conn, key_id), key_id)
            new = change(old)
            if new == old:
                return old
            # Every column but the id, and last_used_at, which touch() alone writes.
            values = _values(new)
            del values["id"], values["last_used_at"]
            conn.execute(
                f"UPDATE keys SET {', '.join(f'{c} = ?' for c in values)} WHERE id = ?",
                (*values.values(), key_id),
            )
            conn.execute(_BUMP)
            return new

        return await self._write(update)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        for pool, attr in ((self._reader, "_read_conn"), (self._writer, "_write_conn")):
            await loop.run_in_executor(pool, self._close_conn, attr)
            pool.shutdown(wait=False)

    def _close_conn(self, attr: str) -> None:
        conn = getattr(self, attr)
        if conn is not None:
            setattr(self, attr, None)
            conn.close()


def _revision(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
    return 0 if row is None else int(row[0])


def _get(conn: sqlite3.Connection, key_id: str) -> KeyRecord | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM keys WHERE id = ?", (key_id,)).fetchone()
    return None if row is None else _record(row)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    # The extended code (SQLITE_BUSY_RECOVERY, ...) carries the primary one in its low byte.
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _values(r: KeyRecord) -> dict[str, Any]:
    """Column -> value: the record as the Redis store keeps it (records.to_json_dict), its
    lists as JSON text and its last use besides."""
    values = to_json_dict(r)
    values["user_id"] = values.pop("user")
    if values["models"] is not None:
        values["models"] = json.dumps(values["models"])
    values["limits"] = json.dumps(values["limits"])
    values["last_used_at"] = r.last_used_at
    return values


def _record(row: tuple[Any, ...]) -> KeyRecord:
    """A row of _COLUMNS as the record (_values' inverse)."""
    data = dict(zip(_COLUMN_NAMES, row, strict=True))
    data["user"] = data.pop("user_id")
    if data["models"] is not None:
        data["models"] = json.loads(data["models"])
    data["limits"] = json.loads(data["limits"])
    return from_json_dict(data, data.pop("last_used_at"))
