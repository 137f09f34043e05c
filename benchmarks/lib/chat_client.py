"""The non-streaming load client: closed-loop workers posting one small chat completion over
a keep-alive pool, and the pre-flight request that checks a target does what the scenario says
(the streaming benchmark's pre-flight too)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from benchmarks.lib.configs import API_KEY, MODEL, PATH, Scenario
from benchmarks.lib.runtime import loop_factory
from benchmarks.lib.stats import percentile_ms

# The fake LLM's answer to every chat request: this many tokens, no pacing.
RESPONSE_TOKENS = 8
PAYLOAD = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
REQUEST_TIMEOUT_S = 10.0


async def phase(
    session: aiohttp.ClientSession,
    url: str,
    concurrency: int,
    seconds: float,
    keep: list[float] | None = None,
    bearer: str = API_KEY,
) -> dict[str, Any]:
    """`concurrency` closed-loop workers; none starts a request after `seconds`.

    `keep`: a list that receives every HTTP 200 latency (seconds), for the plots.
    """
    body = json.dumps(PAYLOAD).encode()
    headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"}
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    exceptions: Counter[str] = Counter()
    retried = 0
    clock = time.perf_counter
    start = clock()
    stop_at = start + seconds

    async def worker() -> None:
        nonlocal retried
        while True:
            t0 = clock()
            if t0 >= stop_at:
                return
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
                    # Envoy says how many attempts a request took (the route config asks it
                    # to): the failover scenario checks that every request took the retry.
                    attempts = resp.headers.get("x-envoy-attempt-count", "1")
            except (aiohttp.ClientError, TimeoutError) as exc:
                exceptions[type(exc).__name__] += 1
                await asyncio.sleep(0.01)  # no hot loop against a dead port
                continue
            elapsed = clock() - t0
            statuses[status] += 1
            if status == 200:
                latencies.append(elapsed)
                if attempts != "1":
                    retried += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = clock() - start
    latencies.sort()
    if keep is not None:
        keep.extend(latencies)
    return sample_of(statuses, exceptions, retried, wall, latencies)


def sample_of(
    statuses: Mapping[int, int],
    exceptions: Mapping[str, int],
    retried: int,
    wall: float,
    latencies: list[float],
) -> dict[str, Any]:
    """One measurement's figures, whichever generator made it: `statuses` counts the answers by
    HTTP status, `exceptions` the requests that got none (by kind), `latencies` (seconds,
    sorted) are the HTTP 200 answers' (wrk's: every answer's)."""
    ok = statuses.get(200, 0)
    errors = sum(n for s, n in statuses.items() if s != 200) + sum(exceptions.values())
    return {
        "requests": ok + errors,
        "ok": ok,
        "errors": errors,
        "retried": retried,
        "statuses": {str(s): n for s, n in sorted(statuses.items())},
        "exceptions": dict(exceptions),
        "wall_s": round(wall, 3),
        "rps": round(ok / wall, 1) if wall > 0 else 0.0,
        "p50_ms": percentile_ms(latencies, 0.50),
        "p90_ms": percentile_ms(latencies, 0.90),
        "p99_ms": percentile_ms(latencies, 0.99),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 3) if latencies else None,
    }


async def measure(
    base_url: str,
    concurrency: int,
    warmup: float,
    duration: float,
    keep: list[float] | None = None,
    mark: Callable[[], None] | None = None,
    bearer: str = API_KEY,
) -> dict[str, Any]:
    """Warm up, `mark()`, then measure, over one keep-alive session pooled to `concurrency`."""
    connector = aiohttp.TCPConnector(
        limit=concurrency, limit_per_host=concurrency, keepalive_timeout=60
    )
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        url = base_url + PATH
        warm = (
            await phase(session, url, concurrency, warmup, bearer=bearer)
            if warmup > 0
            else {"requests": 0}
        )
        if mark is not None:
            mark()
        sample = await phase(session, url, concurrency, duration, keep, bearer)
        sample["warmup_requests"] = warm["requests"]
        return sample


def describe() -> str:
    """The Python client, for a report's header: aiohttp's version and the event loop."""
    loop = "uvloop" if loop_factory() is not None else "asyncio"
    return f"aiohttp {aiohttp.__version__} on {loop}, in the benchmark process"


def _reported_header(name: str) -> bool:
    return name.startswith(("x-aigw-", "x-ratelimit-")) or name == "x-envoy-attempt-count"


async def preflight(base_url: str, deadline: float, bearer: str = API_KEY) -> dict[str, str]:
    """One request until it answers 200 (Envoy may still be health-checking the sidecar).

    Returns the response's gateway, rate-limit and attempt-count headers.
    """
    last = "no answer"
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    headers = {"Authorization": f"Bearer {bearer}"}
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            try:
                async with session.post(base_url + PATH, json=PAYLOAD, headers=headers) as resp:
                    text = await resp.text()
                    if resp.status == 200:
                        return {k: v for k, v in resp.headers.items() if _reported_header(k)}
                    last = f"HTTP {resp.status}: {text[:300]}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{base_url}{PATH} never answered 200; last: {last}")


def check_preflight(scenario: Scenario, headers: dict[str, dict[str, str]]) -> None:
    """The gateway really does what the scenario says (else the numbers measure something else);
    every target (Envoy alone, the floor) answered 200 too, or `preflight` would have raised."""
    gw = headers["gateway"]
    if gw.get("x-aigw-team") != "bench":
        raise RuntimeError(f"the gateway did not identify the caller: {gw}")
    if scenario.quota != "none" and "x-ratelimit-limit-requests" not in gw:
        raise RuntimeError(f"the gateway applied no quota limit: {gw}")
    if scenario.failover:
        for target in headers:
            if headers[target].get("x-envoy-attempt-count") != "2":
                raise RuntimeError(f"{target}: the request was not retried once: {headers[target]}")
        if gw.get("x-aigw-failover") != "true":
            raise RuntimeError(f"the gateway did not report the failover: {gw}")
