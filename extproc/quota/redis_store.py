"""The shared quota store: counters in Redis (one server or a Redis Cluster), so that every
sidecar of a fleet sees the same numbers.

Key layout (prefix "aigw", scope "team-a": a team's, or "~acme" for organization acme's teams,
store.py):

    aigw:{team-a}:c:<counter>   hash  u = used, r = reserved; expires at the charge's expires_at
                                      (the latest one seen)
    aigw:{team-a}:r:<id>        list  counter, amount, counter, amount, ... of one reservation,
                                      in the charges' order (settle's `actual` follows it)
    aigw:{team-a}:rx            zset  in-flight reservation ids, scored by expiry (unix ms);
                                      membership is what makes a reservation exist
    aigw:{team-a}:cx            zset  the team's counter names, scored by expiry: lets reset
                                      find them without KEYS/SCAN
    aigw:{team-a}:g:<id>        string  an id settled (or released) before it was known: a
                                      reserve of it that runs later reserves nothing; an hour
    aigw:own:<key>              string  the owner of a stored object (claim/owner/release), e.g.
                                      aigw:own:response:resp_abc123 -> "team-a"; expires after
                                      the claim's ttl. Not a team's key: no hash tag, and each
                                      call touches this one key, so any Cluster slot will do

Every key of a scope carries the hash tag `{<scope>}`, so all of them are in one Cluster slot
and every script runs on one node. The scripts pass the keys they know up front in KEYS, but
two kinds cannot be known by the caller: the reservations that the sweep finds expired, and
the counters named inside a stored reservation (settle gets only the reservation id). Those
keys are built inside the scripts from the team's prefix (ARGV[1]); that is sound only because
they carry the same hash tag, hence live in the slot of the declared keys on the same node.
Do not change the layout without keeping the tag first in every key.

"now" is the Redis server's clock (TIME), so sidecars with skewed clocks agree on expiry. The
scripts are effect-replicated (the default since Redis 5), which TIME requires.

Connections and time. `pool_size` connections are opened ahead (warm_up), and a call takes one
for itself: a burst queues for a free connection rather than opening hundreds at once (which,
on a busy event loop, took longer than a call's whole budget). A call has two budgets: up to
`connect_timeout_s` to get its connection (the wait for a free one, and reopening it after a
failure or a Redis restart), then `timeout_s` for the command itself. Both are _Deadlines:
patient with a busy event loop, so an answer that arrived in time is never thrown away.
Any failure becomes `StoreUnavailable`; the caller owns the policy (fail open or closed). A
call that failed after its command went out may still have run on the server (its answer
lost, or run late by a server that was frozen): StoreUnavailable.maybe_applied says so, and
the caller can make up for it, since both scripts are idempotent: `reserve` again with the
same id reserves nothing twice, and `settle` of an id that is gone changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisClusterException, RedisError

from extproc.quota.store import (
    Charge,
    CounterState,
    QuotaStore,
    ReserveResult,
    StoreUnavailable,
    check_claim,
    check_key,
)

# A team's name (config._NAME), or "~" and an organization's: the scope of the counters.
SCOPE_RE = re.compile(r"~?[A-Za-z0-9][A-Za-z0-9._:/@-]*")

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

-- Settled or released before it ran: a reserve that waited in a frozen server's socket while
-- its request was answered without it (and released in case it ran). It reserves nothing.
if redis.call('EXISTS', prefix .. 'g:' .. rid) == 1 then
  return result(1, 0)
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
if not score then
  -- Unknown: settled already, expired and charged, or not run yet. For the last, leave word:
  -- the reserve, should it run later, then reserves nothing.
  redis.call('SET', prefix .. 'g:' .. rid, 1, 'PX', 3600000)
  return 0
end
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

# KEYS: rx, cx. ARGV: prefix, counter-name prefix ("": everything). Returns how many counters
# and reservations went (or, with a counter-name prefix, how many counters were zeroed).
_RESET = """
local rx, cx, prefix, only = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local n = 0
if only ~= '' then
  for _, name in ipairs(redis.call('ZRANGE', cx, 0, -1)) do
    if string.sub(name, 1, #only) == only then
      local ck = prefix .. 'c:' .. name
      if redis.call('EXISTS', ck) == 1 then
        redis.call('HSET', ck, 'u', 0)
        n = n + 1
      end
    end
  end
  return n
end
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

# Owners of stored objects: one key each, touched alone (one key per script, so on a Cluster
# it runs on that key's node). Through scripts rather than plain commands so that they share
# _call's lanes, deadlines and NOSCRIPT handling. All three may be retried once by _call on a
# connection that a restart broke: a claim retried after it went through answers its own
# owner, which the caller reads as its own (claim's owners are unique or the caller's).
# KEYS: the owner key. ARGV: owner, ttl ms. Returns the owner before (nil: it was free).
_CLAIM = """
local before = redis.call('GET', KEYS[1])
if not before then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return before
"""

# KEYS: the owner key. Returns the owner, or nil.
_OWNER = """
return redis.call('GET', KEYS[1])
"""

# KEYS: the owner key. Returns how many keys went (0 or 1).
_RELEASE = """
return redis.call('DEL', KEYS[1])
"""

_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)

# Loop iterations a deadline waits, once due, before it cancels (see _Deadline).
_GRACE_ITERATIONS = 3


class _Deadline:
    """asyncio.timeout(delay), patient with a busy event loop.

    When the loop is late (a burst of requests, a descheduled process), a deadline's timer
    can run in the same iteration as, or before, the I/O callback that reads a reply which
    arrived in time; a plain timeout would then throw that reply away and report a healthy
    Redis as unavailable. Once due, this one lets the loop run a few more iterations, so
    whatever already sits in the socket is read and completes the call first. A server that
    does not answer still costs only the deadline (plus a few idle iterations)."""

    __slots__ = ("_delay", "_handle", "_loop", "_timeout")

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._handle: asyncio.Handle | None = None

    async def __aenter__(self) -> _Deadline:
        self._loop = asyncio.get_running_loop()
        self._timeout = asyncio.timeout(None)
        await self._timeout.__aenter__()
        self._handle = self._loop.call_later(self._delay, self._due, _GRACE_ITERATIONS)
        return self

    def _due(self, iterations: int) -> None:
        if iterations:
            self._handle = self._loop.call_soon(self._due, iterations - 1)
        else:
            self._handle = None
            self._timeout.reschedule(self._loop.time())  # cancels the task: TimeoutError

    async def __aexit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        await self._timeout.__aexit__(*exc)  # raises TimeoutError if it fired


class _Lanes:
    """One Redis: `size` clients ("lanes"), each bound to its own connection of the shared
    pool. A call takes a lane for itself (queueing when all are busy) and makes sure its
    connection is open before the command's deadline starts."""

    def __init__(self, client: Redis, size: int) -> None:
        pool = client.connection_pool
        self._lanes: list[Redis] = []
        for _ in range(min(size, pool.max_connections)):
            lane = client.client()  # single_connection_client
            # Its connection, not opened yet: _open does that, never redis-py's lazy connect.
            lane.connection = pool.get_available_connection()
            self._lanes.append(lane)
        self._free: asyncio.Queue[Redis] = asyncio.Queue()
        for lane in self._lanes:
            self._free.put_nowait(lane)
        self._closed = False

    async def acquire(self) -> tuple[Redis, bool]:
        """A lane with an open connection, and whether it was (re)opened just now."""
        if self._closed:
            raise RedisConnectionError("the store is closed (a reload replaced it)")
        lane = await self._free.get()
        try:
            return lane, await _open(lane.connection)
        except BaseException:
            self._free.put_nowait(lane)
            raise

    def release(self, lane: Redis | RedisCluster) -> None:
        self._free.put_nowait(cast(Redis, lane))  # one of ours, from acquire

    def failed(self) -> None:
        """Nothing to do: the failed connection was closed, and its lane reopens it."""

    async def warm(self) -> None:
        lanes: list[Redis] = []
        try:
            for _ in self._lanes:
                lanes.append(await self._free.get())
            results = await asyncio.gather(
                *(_open(lane.connection) for lane in lanes), return_exceptions=True
            )
        finally:
            for lane in lanes:
                self._free.put_nowait(lane)
        _raise_first(results)

    async def close(self) -> None:
        self._closed = True
        for lane in self._lanes:
            await lane.aclose()  # gives its connection back to the pool, which the client closes


async def _open(conn: Any, *, fresh: bool = False) -> bool:
    """Make sure `conn` is open and clean; whether it was (re)opened. `fresh`: reopen it
    even when it looks fine."""
    if conn.is_connected:
        if not fresh:
            try:
                if not await conn.can_read():
                    return False  # open, and nothing unexpected waiting in it
            except (RedisConnectionError, OSError):
                pass
        # Leftover data, the server closed it (a restart), or asked to: start afresh.
        await conn.disconnect(nowait=True)
    try:
        await conn.connect()
    except BaseException:
        # Interrupted halfway, the handshake's answers may still come: a command sent on it
        # would read them as its own. Close it, so the next user opens it again.
        await conn.disconnect(nowait=True)
        raise
    return True


def _raise_first(results: Sequence[Any]) -> None:
    for result in results:
        if isinstance(result, BaseException):
            raise result


class _ClusterSlots:
    """Redis Cluster: the client routes each call to its node and takes one of that node's
    connections itself. So a call takes a slot here (at most `size` calls in flight: no node
    runs out of its `size` connections), and after any failure the next calls first wait for
    one renewal of the topology and of every connection, shared, within their own connect
    budget, rather than reconnecting inside their commands' deadlines."""

    def __init__(self, client: RedisCluster, size: int, budget_s: float) -> None:
        self._client = client
        self._size = size
        self._budget_s = budget_s
        self._slots = asyncio.Semaphore(size)
        self._cold = True
        self._warming: asyncio.Task[None] | None = None
        self._closed = False

    async def acquire(self) -> tuple[RedisCluster, bool]:
        if self._closed:
            raise RedisConnectionError("the store is closed (a reload replaced it)")
        if self._cold:
            await self._await_warm(self._budget_s)
        await self._slots.acquire()
        return self._client, False

    def release(self, _client: Redis | RedisCluster) -> None:
        self._slots.release()

    def failed(self) -> None:
        self._cold = True

    async def warm(self, budget_s: float = 5.0) -> None:
        self._cold = True
        await self._await_warm(budget_s)

    async def _await_warm(self, budget_s: float) -> None:
        # One renewal at a time, shared; a caller whose own deadline passes leaves it running
        # (it has its own budget).
        if self._warming is None or self._warming.done():
            self._warming = asyncio.get_running_loop().create_task(self._warm(budget_s))
            # Its failure is each waiter's to report; none may be left to see it.
            self._warming.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.shield(self._warming)

    async def _warm(self, budget_s: float) -> None:
        held = 0
        try:
            async with asyncio.timeout(budget_s):
                # Every slot: no call is in flight, so every connection of every node is free
                # and may be replaced. Each is, even one that looks fine: a connection whose
                # lazy opening a deadline interrupted would look fine and is not.
                for _ in range(self._size):
                    await self._slots.acquire()
                    held += 1
                # redis-py's async RedisCluster misroutes commands that race its lazy first
                # initialisation; initialize() is locked, and a no-op when current.
                await self._client.initialize()
                for node in self._client.get_primaries():
                    conns = []
                    with contextlib.suppress(MaxConnectionsError):
                        for _ in range(self._size):
                            conns.append(node.acquire_connection())
                    try:
                        results = await asyncio.gather(
                            *(_open(conn, fresh=True) for conn in conns), return_exceptions=True
                        )
                    finally:
                        for conn in conns:
                            node.release(conn)
                    _raise_first(results)
            self._cold = False
        finally:
            for _ in range(held):
                self._slots.release()

    async def close(self) -> None:
        self._closed = True
        if self._warming is not None and not self._warming.done():
            self._warming.cancel()
            with contextlib.suppress(BaseException):
                await self._warming


class RedisStore(QuotaStore):
    def __init__(
        self,
        client: Redis | RedisCluster,
        timeout_s: float = 0.05,
        prefix: str = "aigw",
        *,
        connect_timeout_s: float = 0.5,
        pool_size: int = 16,
    ) -> None:
        """`timeout_s` bounds each command; `connect_timeout_s` what a call may spend first
        waiting for a free connection and (re)opening it; `pool_size` connections are opened
        by warm_up and are the most calls in flight (a standalone client's pool must allow
        that many; a Cluster client's nodes too)."""
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix {prefix!r}: braces would break the team's hash tag")
        self._client = client
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._prefix = prefix
        self._conns: _Lanes | _ClusterSlots = (
            _ClusterSlots(client, pool_size, connect_timeout_s)
            if isinstance(client, RedisCluster)
            else _Lanes(client, pool_size)
        )
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._usage = client.register_script(_USAGE)
        self._reset = client.register_script(_RESET)
        self._claim = client.register_script(_CLAIM)
        self._owner = client.register_script(_OWNER)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        cluster: bool = False,
        password: str | None = None,
        timeout_s: float = 0.05,
        connect_timeout_s: float = 0.5,
        pool_size: int = 16,
    ) -> RedisStore:
        options: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout_s,
            # No socket_timeout: the store's own deadlines bound every call, patiently with a
            # busy loop (_Deadline); redis-py's would not be, and costs a task per command.
            "socket_timeout": None,
            # No retries: a slow or dead Redis must cost one timeout, and whether to fail open
            # or closed is the caller's decision, not the client's.
            "retry": Retry(NoBackoff(), 0),
            "max_connections": pool_size,
        }
        client = open_client(url, cluster=cluster, password=password, options=options)
        return cls(
            client, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, pool_size=pool_size
        )

    @property
    def client(self) -> Redis | RedisCluster:
        """The redis-py client. A standalone client's pool has just the store's connections,
        all held by its lanes: make calls through the store."""
        return self._client

    def team_keys(self, scope: str) -> tuple[str, str, str]:
        """Scope prefix, reservation index and counter index keys, e.g. "aigw:{t}:"."""
        if not SCOPE_RE.fullmatch(scope):
            raise ValueError(f"invalid scope (team name) {scope!r}")
        tag = f"{self._prefix}:{{{scope}}}:"
        return tag, tag + "rx", tag + "cx"

    async def reserve(
        self, scope: str, reservation_id: str, charges: Sequence[Charge], ttl_s: float
    ) -> ReserveResult:
        tag, rx, cx = self.team_keys(scope)
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

    async def settle(self, scope: str, reservation_id: str, actual: Sequence[int]) -> bool:
        if any(a < 0 for a in actual):
            raise ValueError(f"negative actual amount in {list(actual)!r}")
        tag, rx, _ = self.team_keys(scope)
        keys = [rx, f"{tag}r:{reservation_id}"]
        out = int(await self._call(self._settle, keys, [tag, reservation_id, *actual]))
        if out < 0:
            raise ValueError(
                f"settle of {reservation_id!r}: {len(actual)} amounts do not match its charges"
            )
        return out == 1

    async def usage(self, scope: str, counters: Sequence[str]) -> tuple[CounterState, ...]:
        tag, rx, _ = self.team_keys(scope)
        keys = [rx, *(f"{tag}c:{name}" for name in counters)]
        return _states(counters, await self._call(self._usage, keys, [tag]))

    async def reset(self, scope: str, prefix: str = "") -> int:
        tag, rx, cx = self.team_keys(scope)
        return int(await self._call(self._reset, [rx, cx], [tag, prefix]))

    def owner_key(self, key: str) -> str:
        """The Redis key that holds the owner of `key`, e.g. "aigw:own:response:resp_abc"."""
        check_key(key)
        return f"{self._prefix}:own:{key}"

    async def claim(self, key: str, owner: str, ttl_s: float) -> str | None:
        check_claim(key, owner, ttl_s)
        # At least 1 ms: PX 0 is an error, and a positive ttl must not become one.
        ttl_ms = max(1, round(ttl_s * 1000))
        out = await self._call(self._claim, [self.owner_key(key)], [owner, ttl_ms])
        if out is None or out is False:
            return None
        return out.decode(errors="replace") if isinstance(out, bytes) else str(out)

    async def owner(self, key: str) -> str | None:
        out = await self._call(self._owner, [self.owner_key(key)], [])
        if out is None:
            return None
        return out.decode(errors="replace") if isinstance(out, bytes) else str(out)

    async def release(self, key: str) -> None:
        await self._call(self._release, [self.owner_key(key)], [])

    async def close(self) -> None:
        await self._conns.close()
        await self._client.aclose()

    async def warm_up(self, timeout_s: float = 5.0) -> None:
        """Open the pool's connections (and discover a cluster's nodes) and load the scripts
        before the first request needs them, with a start-up budget rather than a call's."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._conns.warm()  # every connection of the pool, opened
                client, _ = await self._conns.acquire()
                try:
                    # Else a burst of first calls would each meet NOSCRIPT and load them.
                    for script in (
                        self._reserve,
                        self._settle,
                        self._usage,
                        self._reset,
                        self._claim,
                        self._owner,
                        self._release,
                    ):
                        await client.script_load(script.script)
                finally:
                    self._conns.release(client)
        except _FAILURES as e:
            raise StoreUnavailable(f"redis: {type(e).__name__}: {e}", maybe_applied=False) from e

    async def _call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """Two deadlines: connect_timeout_s to get a connection (waiting for a free one and
        opening it), then timeout_s for the command itself (EVALSHA; on NOSCRIPT, SCRIPT LOAD
        and EVALSHA again)."""
        sent = False  # whether a command went out: then it may have run, answer or not
        for attempt in (1, 2):
            try:
                async with _Deadline(self._connect_timeout_s):
                    client, fresh = await self._conns.acquire()
            except _FAILURES as e:
                self._conns.failed()
                raise StoreUnavailable(
                    f"redis: no connection within {self._connect_timeout_s * 1000:.0f} ms: "
                    f"{type(e).__name__}: {e}",
                    maybe_applied=sent,
                ) from e
            sent = True
            try:
                async with _Deadline(self._timeout_s):
                    return await script(keys=keys, args=args, client=client)
            except RedisConnectionError as e:
                self._conns.failed()
                if attempt == 1 and not fresh:
                    # A pooled connection to a server that went away (a restart) fails its
                    # next call: once more on a new one. Safe: reserve is idempotent by
                    # reservation id, and a repeated settle changes nothing.
                    continue
                raise StoreUnavailable(f"redis: {type(e).__name__}: {e}") from e
            except _FAILURES as e:
                self._conns.failed()
                raise StoreUnavailable(
                    f"redis: {type(e).__name__} within {self._timeout_s * 1000:.0f} ms: {e}"
                ) from e
            finally:
                self._conns.release(client)
        raise AssertionError("unreachable")


def open_client(
    url: str, *, cluster: bool, password: str | None, options: dict[str, Any]
) -> Redis | RedisCluster:
    """A redis-py client of one server or of a Cluster (the quota store's, the key store's)."""
    if password is not None:  # else a password in the URL applies
        options = {**options, "password": password}
    if cluster:
        return RedisCluster.from_url(url, **options)
    return Redis.from_url(url, **options)


def _states(counters: Sequence[str], flat: Sequence[Any]) -> tuple[CounterState, ...]:
    return tuple(
        CounterState(name, int(flat[2 * i]), int(flat[2 * i + 1]))
        for i, name in enumerate(counters)
    )
