"""The shared key store: the Redis (one server or a Redis Cluster) that already holds the quotas,
so that every sidecar of a fleet sees the same keys.

Key layout (prefix "aigw"):

    aigw:{keys}:k    hash    key id -> the record as JSON (records.to_json_dict: every field
                             but last_used_at; digests in hex, never a secret)
    aigw:{keys}:d    hash    sha256 hex of a secret -> key id: every key's current secret, and
                             the one before its last rotation while a grace period kept it
    aigw:{keys}:u    hash    key id -> last_used_at (unix time); apart from the record, so
                             that the once-a-minute touches never rewrite it (or race a rotate)
    aigw:{keys}:rev  string  the revision (store.py): INCR'd by every create, rotate, revoke

Every key carries the hash tag `{keys}`, so all of them are in one Cluster slot and each script
below runs on one node, atomically. All keys live in one slot, hence on one node: fine for
thousands of keys (a record is a few hundred bytes).

A write is a compare-and-set: the record is read, changed in Python, and written by a script
only if it is still what was read (else read again). Python does the change so that the record
is encoded in one place (Lua's cjson would round unix times to 14 digits). Each script is also
idempotent: a write that finds its own result already there reports success, so redis-py may
retry a command whose answer a broken connection lost.

No persistence is configured here: a Redis that restarts empty loses the keys, as it loses the
quota counters. Run it with AOF or RDB snapshots if run-time keys matter (they do).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from ..quota.redis_store import open_client
from .records import KeyRecord, KeyStoreUnavailable, from_json_dict, to_json_dict
from .store import KeyStore, Snapshot, require

T = TypeVar("T")

# Records (twice this many list items) a snapshot decodes on the event loop; more go to a thread.
_DECODE_ON_LOOP = 2 * 200
# Another writer changed the record between our read and write: read again, a few times.
_CAS_ATTEMPTS = 5

_SEED = """
-- A store never written starts its revision from the server's clock (store.py says why).
local function bump(rev)
  if redis.call('EXISTS', rev) == 0 then
    local t = redis.call('TIME')
    -- Microseconds, as text: a Lua number could reach Redis in a float's notation.
    redis.call('SET', rev, t[1] .. string.format('%06d', tonumber(t[2])))
  end
  return redis.call('INCR', rev)
end
"""

# KEYS: k, d, rev. ARGV: id, the record as read ('' for a new one), the record to write,
# how many digests to map to the id, those digests, then the digests to unmap.
# Returns 1 (written, or already written by this same call), 0 (the record changed since it was
# read), -1 (a digest to map belongs to another key).
_WRITE = (
    _SEED
    + """
local k, d, rev = KEYS[1], KEYS[2], KEYS[3]
local id, expected, new = ARGV[1], ARGV[2], ARGV[3]
local nadd = tonumber(ARGV[4])
local cur = redis.call('HGET', k, id)
if cur == new then return 1 end
if (cur or '') ~= expected then return 0 end
for i = 5, 4 + nadd do
  local owner = redis.call('HGET', d, ARGV[i])
  if owner and owner ~= id then return -1 end
end
redis.call('HSET', k, id, new)
for i = 5, 4 + nadd do redis.call('HSET', d, ARGV[i], id) end
for i = 5 + nadd, #ARGV do
  if redis.call('HGET', d, ARGV[i]) == id then redis.call('HDEL', d, ARGV[i]) end
end
bump(rev)
return 1
"""
)

# KEYS: k, u, rev. Returns {revision, k's flat field/value list, u's}.
_SNAPSHOT = """
local rev = redis.call('GET', KEYS[3]) or '0'
return {rev, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""

# KEYS: k, u, d. ARGV: an id, or '' and a digest. Returns {record or false, last used or false}.
_GET = """
local id = ARGV[1]
if id == '' then
  id = redis.call('HGET', KEYS[3], ARGV[2])
  if not id then return {false, false} end
end
return {redis.call('HGET', KEYS[1], id), redis.call('HGET', KEYS[2], id)}
"""

# KEYS: k, u. ARGV: id, when. last_used_at only moves forward, and only for a key that exists.
_TOUCH = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local cur = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
return 1
"""

_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


class RedisKeyStore(KeyStore):
    def __init__(
        self, client: Redis | RedisCluster, *, timeout_s: float = 0.5, prefix: str = "aigw"
    ) -> None:
        """`timeout_s` bounds each call, connecting included."""
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix {prefix!r}: braces would break the {{keys}} hash tag")
        self._client = client
        self._timeout_s = timeout_s
        tag = f"{prefix}:{{keys}}:"
        self.records_key, self.digests_key = tag + "k", tag + "d"
        self.used_key, self.revision_key = tag + "u", tag + "rev"
        self._write = client.register_script(_WRITE)
        self._snapshot = client.register_script(_SNAPSHOT)
        self._get = client.register_script(_GET)
        self._touch = client.register_script(_TOUCH)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        cluster: bool = False,
        password: str | None = None,
        timeout_s: float = 0.5,
        connect_timeout_s: float = 0.5,
        prefix: str = "aigw",
    ) -> RedisKeyStore:
        options: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout_s,
            "socket_timeout": timeout_s,
            # Once, at once: a connection a Redis restart broke fails its next command, and
            # every script here may run twice (see the module's docstring).
            "retry": Retry(NoBackoff(), 1),
        }
        client = open_client(url, cluster=cluster, password=password, options=options)
        return cls(client, timeout_s=timeout_s, prefix=prefix)

    @property
    def client(self) -> Redis | RedisCluster:
        return self._client

    @property
    def keys(self) -> tuple[str, ...]:
        """Every Redis key of the store."""
        return (self.records_key, self.digests_key, self.used_key, self.revision_key)

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call()
        except _FAILURES as exc:
            raise KeyStoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def _script(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._call(lambda: script(keys=list(keys), args=list(args)))

    # -- the store ------------------------------------------------------------------------------

    async def get(self, key_id: str) -> KeyRecord | None:
        return (await self._lookup(key_id, ""))[1]

    async def by_digest(self, digest: bytes) -> KeyRecord | None:
        return (await self._lookup("", digest.hex()))[1]

    async def _lookup(self, key_id: str, digest: str) -> tuple[bytes, KeyRecord | None]:
        """The record's text as stored, and the record."""
        keys = (self.records_key, self.used_key, self.digests_key)
        raw, used = await self._script(self._get, keys, (key_id, digest))
        return (raw, _decode(raw, used)) if raw else (b"", None)

    async def snapshot(self) -> Snapshot:
        keys = (self.records_key, self.used_key, self.revision_key)
        revision, flat, flat_used = await self._script(self._snapshot, keys, ())

        def decoded() -> tuple[KeyRecord, ...]:
            used = dict(zip(flat_used[::2], flat_used[1::2], strict=True))
            return tuple(
                _decode(raw, used.get(key_id))
                for key_id, raw in zip(flat[::2], flat[1::2], strict=True)
            )

        # Every process reloads every key after any change: many keys are decoded off the
        # event loop, so a revocation elsewhere does not stall this process's requests.
        records = await asyncio.to_thread(decoded) if len(flat) > _DECODE_ON_LOOP else decoded()
        return Snapshot(int(revision), records)

    async def revision(self) -> int:
        value = await self._call(lambda: self._client.get(self.revision_key))
        return 0 if value is None else int(value)

    async def touch(self, key_id: str, when: float) -> None:
        await self._script(self._touch, (self.records_key, self.used_key), (key_id, repr(when)))

    async def _insert(self, record: KeyRecord) -> bool:
        return await self._put(record.id, None, record, "") == 1

    async def _update(self, key_id: str, change: Callable[[KeyRecord], KeyRecord]) -> KeyRecord:
        for _ in range(_CAS_ATTEMPTS):
            raw, found = await self._lookup(key_id, "")
            old = require(found, key_id)
            new = change(old)
            if new == old:
                return old
            # Compared with the text read, not a re-encoding: a newer sidecar's record may
            # hold fields this one drops.
            if await self._put(key_id, old, new, raw.decode()) == 1:
                return new
        raise KeyStoreUnavailable(f"key {key_id!r} kept changing: {_CAS_ATTEMPTS} attempts")

    async def _put(self, key_id: str, old: KeyRecord | None, new: KeyRecord, expected: str) -> int:
        """Write `new` if the stored text is still `expected` ('': none); 1 when written."""
        mapped = [d for d in (new.digest, new.previous_digest) if d is not None]
        unmapped = [] if old is None else [d for d in (old.digest, old.previous_digest) if d]
        unmapped = [d for d in unmapped if d not in mapped]
        args = [
            key_id,
            expected,
            _encode(new),
            len(mapped),
            *(d.hex() for d in mapped),
            *(d.hex() for d in unmapped),
        ]
        keys = (self.records_key, self.digests_key, self.revision_key)
        result = int(await self._script(self._write, keys, args))
        if result == -1:
            # Two secrets with one sha256, or a key id drawn twice: astronomically unlikely.
            if old is None:
                return 0  # create() draws another id and secret
            raise KeyStoreUnavailable(f"key {key_id!r}: its new secret's digest is in use")
        return result  # 0: the id is taken (a create), the record changed (an update)

    async def close(self) -> None:
        await self._client.aclose()


def _encode(record: KeyRecord) -> str:
    # sort_keys: the same record is always the same text, so that a write repeated by a retry
    # recognizes its own result.
    return json.dumps(to_json_dict(record), sort_keys=True, separators=(",", ":"))


def _decode(raw: bytes | str, used: bytes | str | None) -> KeyRecord:
    return from_json_dict(json.loads(raw), None if not used else float(used))
