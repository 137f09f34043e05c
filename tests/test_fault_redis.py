"""Redis, the quota store, as a failing dependency, end to end: the openai SDK -> a real Envoy ->
the sidecar -> the fake LLM, with the counters in a real Redis that is frozen (SIGSTOP, then
SIGCONT), slowed (DEBUG SLEEP, shorter and longer than the store's timeout) and killed (then
started again from its append-only file) while chat requests run.

What every case checks: each request is answered within a bound derived from the store's
budgets (a bound on hanging, generous for a shared 2-core machine, not a performance figure),
in OpenAI's shape: a completion, or under failure_mode closed a 503
{"error": {"code": "quota_store_unavailable", ...}} with Retry-After; under failure_mode open
every request is served. And once Redis is back, the team's counter holds exactly the tokens
of the requests that were metered (the 200s admitted with a reservation: they carry the
x-ratelimit-* headers), nothing twice, nothing lost, nothing left reserved: the settles that
failed were retried, and what a failed reserve may have left on the server was released.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from .redis_servers import RedisServer, start_server
from .test_quota_e2e import (
    MAX_TOKENS,
    MODEL,
    Background,
    Gateway,
    gateway_config,
    in_one_window,
    new_ports,
    probe_messages,
    running_stack,
    tokens_limit,
)

# Starts a real Envoy, Redis or Prometheus: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

TEAM = "faulty"
LIMIT = "faulty-tokens"
# The store's budgets, the defaults: what the config implies a request may wait for Redis.
TIMEOUT_S = 0.05
CONNECT_TIMEOUT_S = 0.5
# A call: a connection, then its command; once more after a connection that had gone bad.
STORE_BOUND_S = 2 * (CONNECT_TIMEOUT_S + TIMEOUT_S)
SLACK_S = 4.0  # a shared 2-core machine
ANSWER_BOUND_S = STORE_BOUND_S + SLACK_S
FREEZE_S = 1.0
THREADS = 3


@dataclass
class Answer:
    index: int
    status: int  # 0: no HTTP answer
    started: float
    ended: float
    code: str | None = None
    shape_ok: bool = False  # a completion, or {"error": {"message", "type", "code"}}
    metered: bool = False  # admitted with a reservation: the x-ratelimit-* headers are there
    tokens: int = 0
    retry_after: str | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def ask(client: openai.OpenAI, i: int) -> Answer:
    started = time.monotonic()
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=probe_messages(i % 1000), max_tokens=MAX_TOKENS
        )
        completion = raw.parse()
    except openai.APIStatusError as err:
        answer = Answer(i, err.status_code, started, time.monotonic())
        answer.retry_after = err.response.headers.get("retry-after")
        try:
            body = err.response.json()
        except ValueError:
            return answer
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and list(body) == ["error"]:
            answer.code = error.get("code")
            answer.shape_ok = all(isinstance(error.get(k), str) for k in ("message", "type"))
        return answer
    except openai.APIConnectionError:
        return Answer(i, 0, started, time.monotonic())
    answer = Answer(i, raw.status_code, started, time.monotonic(), shape_ok=True)
    answer.metered = "x-ratelimit-limit-tokens" in raw.headers
    answer.tokens = completion.usage.total_tokens if completion.usage else -1
    return answer


class Load(Background[Answer]):
    """Threads sending chat requests one after another until stopped."""

    def __init__(self, gw: Gateway) -> None:
        super().__init__(gw, TEAM, THREADS, send=ask, timeout=30)

    def served_after(self, t: float, n: int = 3) -> None:
        """Wait until n requests that started after t were served: the store is back."""
        self.wait_for(
            f"{n} requests served after the fault",
            lambda seen: sum(a.status == 200 and a.started > t for a in seen) >= n,
        )


@pytest.fixture
def persistent_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis that keeps every write it acknowledged across a kill (the AOF, fsync'd before
    each answer), and takes DEBUG SLEEP from this machine."""
    options = ("--appendonly", "yes", "--appendfsync", "always", "--enable-debug-command", "local")
    server = start_server(tmp_path_factory.mktemp("redis-aof"), options)
    try:
        yield server
    finally:
        server.stop()


def inject_faults(load: Load, redis: RedisServer, log: list[str]) -> None:
    load.wait_for("requests served first", lambda seen: sum(a.status == 200 for a in seen) >= 5)

    # Frozen: the server keeps its sockets and answers nothing; commands wait in its sockets.
    redis.pause()
    frozen = time.monotonic()
    time.sleep(FREEZE_S)
    redis.resume()
    log.append(f"frozen {FREEZE_S}s")
    load.served_after(time.monotonic())

    # Slowed: busy for less than a command's timeout, then for six times as long.
    with redis.client() as control:
        for seconds in (0.02, 0.02, 0.02, 0.3, 0.3):
            control.execute_command("DEBUG", "SLEEP", str(seconds))
            time.sleep(0.1)
    log.append("slowed")
    load.served_after(time.monotonic())

    # Killed: connections reset, then refused; started again from its append-only file.
    redis.kill()
    killed = time.monotonic()
    load.wait_for(
        "requests meeting the dead store",
        lambda seen: sum(a.started > killed for a in seen) >= 2 * THREADS,
    )
    redis.start()
    log.append("killed and restarted")
    load.served_after(time.monotonic())
    assert frozen < killed


@pytest.mark.parametrize("failure_mode", ["closed", "open"])
def test_redis_frozen_slowed_and_killed_under_load(
    tmp_path: Path, persistent_redis: RedisServer, failure_mode: str
) -> None:
    quota = {
        "store": "redis",
        "redis": {"url": persistent_redis.url},  # the default timeouts
        "failure_mode": failure_mode,
    }
    config = gateway_config(new_ports(), {TEAM: [tokens_limit(LIMIT, 10**9)]}, quota)
    with running_stack(tmp_path, config) as gw:
        log: list[str] = []

        def scenario() -> tuple[list[Answer], Any]:
            gw.admin.reset(TEAM)
            with Load(gw) as load:
                inject_faults(load, persistent_redis, log)
            # Every settle retried, every possible leftover released: nothing stays reserved.
            return load.snapshot(), gw.admin.settled(TEAM, timeout=30)[LIMIT]

        answers, usage = in_one_window(gw.admin, TEAM, scenario)
        assert gw.procs["sidecar"].poll() is None

    counts: dict[Any, int] = {}
    for a in answers:
        key = (a.status, a.code, "metered" if a.metered else "")
        counts[key] = counts.get(key, 0) + 1
    metered = sum(a.tokens for a in answers if a.status == 200 and a.metered)
    print(
        f"\n{failure_mode}: {len(answers)} requests through {log}: {counts}; "
        f"slowest {max(a.seconds for a in answers):.2f}s (bound {ANSWER_BOUND_S:.1f}s); "
        f"used {usage.used} reserved {usage.reserved}, metered tokens {metered}"
    )

    slow = [(a.index, a.status, round(a.seconds, 2)) for a in answers if a.seconds > ANSWER_BOUND_S]
    assert not slow, f"answered later than {ANSWER_BOUND_S:.1f}s: {slow[:5]}"
    bad_shape = [(a.index, a.status, a.code) for a in answers if not a.shape_ok]
    assert not bad_shape, f"answers not in OpenAI's shape: {bad_shape[:5]}"
    if failure_mode == "closed":
        odd = [(a.index, a.status, a.code) for a in answers if a.status != 200 and not (
            a.status == 503 and a.code == "quota_store_unavailable" and a.retry_after == "1"
        )]  # fmt: skip
        assert not odd, f"other answers than 200 and 503 quota_store_unavailable: {odd[:5]}"
        assert any(a.status == 503 for a in answers), "the faults refused nothing"
    else:
        refused = [(a.index, a.status, a.code) for a in answers if a.status != 200]
        assert not refused, f"failure_mode open refused requests: {refused[:5]}"
        assert any(not a.metered for a in answers), "the faults left every request metered"
    assert all(a.tokens > 0 for a in answers if a.status == 200)
    # Charged once each, at what was reported; nothing left reserved, nothing lost.
    assert (usage.used, usage.reserved) == (metered, 0)
