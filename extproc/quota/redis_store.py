"""The shared quota store: counters in Redis (one server or a Redis Cluster), so that every
sidecar of a fleet sees the same numbers.

Key layout (prefix "aigw", team "team-a"):

    aigw:{team-a}:c:<counter>   hash  u = used, r = reserved; expires at the charge's expires_at
                                      (the latest one seen)
    aigw:{team-a}:r:<id>        list  counter, amount, counter, amount, ... of one reservation,
                                      in the charges' order (settle's `actual` follows it)
    aigw:{team-a}:rx            zset  in-flight reservation ids, scored by expiry (unix ms);
                                      membership is what makes a reservation exist
    aigw:{team-a}:cx            zset  the team's counter names, scored by expiry: lets reset
                                      find them without KEYS/SCAN

Every key of a team carries the hash tag `{<team>}`, so all of them are in one Cluster slot
and every script runs on one node. The scripts pass the keys they know up front in KEYS, but
two kinds cannot be known by the caller: the reservations that the sweep finds expired, and
the counters named inside a stored reservation (settle gets only the reservation id). Those
keys are built inside the scripts from the team's prefix (ARGV[1]); that is sound only because
they carry the same hash tag, hence live in the slot of the declared keys on the same node.
Do not change the layout without keeping the tag first in every key.

"now" is the Redis server's clock (TIME), so sidecars with skewed clocks agree on expiry. The
scripts are effect-replicated (the default since Redis 5), which TIME requires.

Every call is bounded by `timeout_s` and any failure becomes `StoreUnavailable`; the caller
owns the policy (fail open or closed). A call that timed out may still have run on the server:
a reservation made that way is never settled, expires, and is charged at its reserved amount
(over-counted, never lost). Retrying `reserve` with the same reservation id is idempotent.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from extproc.quota.store import (
    Charge,
    CounterState,
    QuotaStore,
    ReserveResult,
    StoreUnavailable,
)

TEAM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]*")

# Expired reservations charged per call (like memory.py's batch): bounds a script's run time,
# and Redis runs nothing else meanwhile. Leftovers are the oldest, so the next call takes them.
SWEEP_BATCH = 100

_LIB = f"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Give a key at least the expiry at_ms (a later one it has stays).
local function expire_at_least(key, at_ms, now)
  local ttl = redis.call('PTTL', key)
  if ttl == -1 or (ttl >= 0 and now + ttl < at_ms) then
    redis.call('PEXPIREAT', key, at_ms)
  end
end

-- Charge a reservation at its reserved amounts and forget it. A counter that is gone (its
-- window is over) is not created again: it would come back without an expiry.
local function charge(rx, prefix, rid)
  local rk = prefix .. 'r:' .. rid
  local items = redis.call('LRANGE', rk, 0, -1)
  for i = 1, #items, 2 do
    local ck = prefix .. 'c:' .. items[i]
    if redis.call('EXISTS', ck) == 1 then
      redis.call('HINCRBY', ck, 'r', -tonumber(items[i + 1]))
      redis.call('HINCRBY', ck, 'u', items[i + 1])
    end
  end
  redis.call('DEL', rk)
  redis.call('ZREM', rx, rid)
end

local function sweep(rx, prefix, now)
  local due = redis.call('ZRANGEBYSCORE', rx, '-inf', now, 'LIMIT', 0, {SWEEP_BATCH})
  for _, rid in ipairs(due) do
    charge(rx, prefix, rid)
  end
end

local function append_state(out, ck)
  local v = redis.call('HMGET', ck, 'u', 'r')
  out[#out + 1] = tonumber(v[1]) or 0
  out[#out + 1] = tonumber(v[2]) or 0
end
"""

# KEYS: rx, cx, reservation key, then one counter key per charge.
# ARGV: prefix, reservation id, ttl ms, then per charge: counter, limit, amount, expires_at ms.
# Returns {ok, failed (1-based, 0 = none), used1, reserved1, used2, reserved2, ...}.
_RESERVE = (
    _LIB
    + """
local rx, cx, rk = KEYS[1], KEYS[2], KEYS[3]
local prefix, rid, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local n = #KEYS - 3
local now = now_ms()
sweep(rx, prefix, now)

local function result(ok, failed)
  local out = {ok, failed}
  for i = 1, n do append_state(out, KEYS[3 + i]) end
  return out
end

local score = redis.call('ZSCORE', rx, rid)
if score then
  if tonumber(score) > now then
    return result(1, 0)  -- a retry of a reserve that got through: do not reserve twice
  end
  charge(rx, prefix, rid)  -- due but left by the sweep's batch: charge it, then start anew
end

-- Check every counter before touching any; `wanted` sums a counter named twice.
local wanted = {}
for i = 1, n do
  local a = 3 + (i - 1) * 4
  local name, limit, amount = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local v = redis.call('HMGET', KEYS[3 + i], 'u', 'r')
  local total = (wanted[name] or 0) + amount
  if (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0) + total > limit then
    return result(0, i)
  end
  wanted[name] = total
end

local expires = now + ttl
-- The reservation's own keys live until its counters may be forgotten, so an expired one is
-- still there for a sweep to charge as long as charging it can matter.
local keep = expires
redis.call('ZREMRANGEBYSCORE', cx, '-inf', now)
for i = 1, n do
  local a = 3 + (i - 1) * 4
  local name, amount, exp = ARGV[a + 1], ARGV[a + 3], tonumber(ARGV[a + 4])
  local ck = KEYS[3 + i]
  redis.call('HINCRBY', ck, 'r', amount)
  expire_at_least(ck, exp, now)
  local known = redis.call('ZSCORE', cx, name)
  if not known or tonumber(known) < exp then
    redis.call('ZADD', cx, exp, name)
  end
  if exp > keep then keep = exp end
  redis.call('RPUSH', rk, name, amount)
end
redis.call('ZADD', rx, expires, rid)
expire_at_least(rk, keep, now)
expire_at_least(rx, keep, now)
expire_at_least(cx, keep, now)
return result(1, 0)
"""
)

# KEYS: rx, reservation key. ARGV: prefix, reservation id, actual amounts...
# Returns 1 settled, 0 unknown or expired (then charged at its reserved amounts),
# -1 wrong number of amounts (nothing changed).
_SETTLE = (
    _LIB
    + """
local rx, rk = KEYS[1], KEYS[2]
local prefix, rid = ARGV[1], ARGV[2]
local now = now_ms()
sweep(rx, prefix, now)
local score = redis.call('ZSCORE', rx, rid)
if not score then return 0 end
if tonumber(score) <= now then
  charge(rx, prefix, rid)
  return 0
end
local items = redis.call('LRANGE', rk, 0, -1)
if #items ~= 2 * (#ARGV - 2) then return -1 end
for i = 1, #items, 2 do
  local ck = prefix .. 'c:' .. items[i]
  if redis.call('EXISTS', ck) == 1 then
    redis.call('HINCRBY', ck, 'r', -tonumber(items[i + 1]))
    redis.call('HINCRBY', ck, 'u', ARGV[2 + (i + 1) / 2])
  end
end
redis.call('DEL', rk)
redis.call('ZREM', rx, rid)
return 1
"""
)

# KEYS: rx, then the counter keys. ARGV: prefix. Returns used1, reserved1, used2, ...
_USAGE = (
    _LIB
    + """
sweep(KEYS[1], ARGV[1], now_ms())
local out = {}
for i = 2, #KEYS do append_state(out, KEYS[i]) end
return out
"""
)

# KEYS: rx, cx. ARGV: prefix. Returns how many counters and reservations went.
_RESET = """
local rx, cx, prefix = KEYS[1], KEYS[2], ARGV[1]
local n = 0
for _, name in ipairs(redis.call('ZRANGE', cx, 0, -1)) do
  n = n + redis.call('DEL', prefix .. 'c:' .. name)
end
for _, rid in ipairs(redis.call('ZRANGE', rx, 0, -1)) do
  redis.call('DEL', prefix .. 'r:' .. rid)
  n = n + 1
end
redis.call('DEL', rx, cx)
return n
"""

_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


class RedisStore(QuotaStore):
    def __init__(
        self,
        client: Redis | RedisCluster,
        timeout_s: float = 0.05,
        prefix: str = "aigw",
        *,
        max_in_flight: int | None = None,
    ) -> None:
        """`max_in_flight` caps concurrent calls (they queue, within `timeout_s`): Cluster
        nodes raise instead of waiting when their pool is exhausted, so from_url sets it to
        the pool size."""
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix {prefix!r}: braces would break the team's hash tag")
        self._client = client
        self._timeout_s = timeout_s
        self._prefix = prefix
        self._slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        self._cold_cluster = isinstance(client, RedisCluster)
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._usage = client.register_script(_USAGE)
        self._reset = client.register_script(_RESET)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        cluster: bool = False,
        password: str | None = None,
        timeout_s: float = 0.05,
        max_connections: int = 64,
    ) -> RedisStore:
        options: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            # No retries: a slow or dead Redis must cost one timeout, and whether to fail open
            # or closed is the caller's decision, not the client's.
            "retry": Retry(NoBackoff(), 0),
            "max_connections": max_connections,
        }
        if password is not None:  # else a password in the URL applies
            options["password"] = password
        client: Redis | RedisCluster
        if cluster:
            client = RedisCluster.from_url(url, **options)
        else:
            client = Redis.from_url(url, **options)
        return cls(client, timeout_s=timeout_s, max_in_flight=max_connections)

    @property
    def client(self) -> Redis | RedisCluster:
        return self._client

    def team_keys(self, team: str) -> tuple[str, str, str]:
        """Team prefix, reservation index and counter index keys, e.g. "aigw:{t}:"."""
        if not TEAM_RE.fullmatch(team):
            raise ValueError(f"invalid team name {team!r}")
        tag = f"{self._prefix}:{{{team}}}:"
        return tag, tag + "rx", tag + "cx"

    async def reserve(
        self, team: str, reservation_id: str, charges: Sequence[Charge], ttl_s: float
    ) -> ReserveResult:
        tag, rx, cx = self.team_keys(team)
        keys = [rx, cx, f"{tag}r:{reservation_id}"]
        args: list[str | int] = [tag, reservation_id, max(0, round(ttl_s * 1000))]
        for charge in charges:
            if charge.amount < 0:
                raise ValueError(f"negative amount in {charge!r}")
            keys.append(f"{tag}c:{charge.counter}")
            args += [
                charge.counter,
                charge.limit,
                charge.amount,
                round(charge.expires_at * 1000),
            ]
        out = await self._call(self._reserve, keys, args)
        states = _states([c.counter for c in charges], out[2:])
        failed = int(out[1])
        return ReserveResult(bool(out[0]), states, failed - 1 if failed else None)

    async def settle(self, team: str, reservation_id: str, actual: Sequence[int]) -> bool:
        if any(a < 0 for a in actual):
            raise ValueError(f"negative actual amount in {list(actual)!r}")
        tag, rx, _ = self.team_keys(team)
        keys = [rx, f"{tag}r:{reservation_id}"]
        out = int(await self._call(self._settle, keys, [tag, reservation_id, *actual]))
        if out < 0:
            raise ValueError(
                f"settle of {reservation_id!r}: {len(actual)} amounts do not match its charges"
            )
        return out == 1

    async def usage(self, team: str, counters: Sequence[str]) -> tuple[CounterState, ...]:
        tag, rx, _ = self.team_keys(team)
        keys = [rx, *(f"{tag}c:{name}" for name in counters)]
        return _states(counters, await self._call(self._usage, keys, [tag]))

    async def reset(self, team: str) -> int:
        tag, rx, cx = self.team_keys(team)
        return int(await self._call(self._reset, [rx, cx], [tag]))

    async def close(self) -> None:
        await self._client.aclose()

    async def warm_up(self, timeout_s: float = 5.0) -> None:
        """Connect (and discover a cluster's nodes) before the first request must, with a
        start-up budget rather than the per-call one."""
        try:
            await asyncio.wait_for(self._warm(), timeout_s)
        except _FAILURES as e:
            raise StoreUnavailable(f"redis: {type(e).__name__}: {e}") from e

    async def _warm(self) -> None:
        if self._cold_cluster:
            await self._client.initialize()
            self._cold_cluster = False
        await self._client.ping()

    async def _call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        try:
            return await asyncio.wait_for(self._run_once_more(script, keys, args), self._timeout_s)
        except _FAILURES as e:
            raise StoreUnavailable(f"redis: {type(e).__name__}: {e}") from e

    async def _run_once_more(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._run(script, keys, args)
        except RedisConnectionError:
            # After Redis restarts, every pooled connection to the old server fails its next
            # call. Drop them all and try once more within the same time budget: safe, since
            # reserve is idempotent by reservation id and a repeated settle changes nothing.
            pool = getattr(self._client, "connection_pool", None)
            if pool is not None:
                await pool.disconnect()
            return await self._run(script, keys, args)

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        if self._cold_cluster:
            # redis-py's async RedisCluster misroutes commands that race its lazy first
            # initialisation (MOVED storms, then it closes connections others are using).
            # initialize() is idempotent and locked, so let every caller wait for it.
            await self._client.initialize()
            self._cold_cluster = False
        # EVALSHA, and on NOSCRIPT (a restarted or new node) SCRIPT LOAD + EVALSHA.
        if self._slots is None:
            return await script(keys=keys, args=args)
        async with self._slots:
            return await script(keys=keys, args=args)


def _states(counters: Sequence[str], flat: Sequence[Any]) -> tuple[CounterState, ...]:
    return tuple(
        CounterState(name, int(flat[2 * i]), int(flat[2 * i + 1]))
        for i, name in enumerate(counters)
    )
