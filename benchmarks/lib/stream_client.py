"""The streaming load client: one streamed chat completion read event by event and timed,
the latency phase (streams one after the other), the memory phase (K slow streams held open at
once, with RSS, CPU per chunk and Envoy's circuit breakers around them), and the Envoy admin
reads the memory phase needs."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from benchmarks.lib.configs import API_KEY, MODEL, PATH
from benchmarks.lib.procstat import cpu_seconds, rss_kb
from benchmarks.lib.stats import median_of, percentile_ms

# Streams in the middle of opening (request sent, first chunk not yet back) during a memory
# phase: a ramp, so thousands of connects do not overflow a listen backlog all at once.
OPENING_AT_ONCE = 64
# A memory phase's ramp that gets no stream to its first chunk for this long has hit a limit.
STALL_S = 3.0
# CPU per chunk is measured over this long once every stream is open, ending before the first
# stream ends: only chunks flowing then, no connects, no stream endings.
CPU_WINDOW_S = 5.0


def stream_request(
    tokens: int, tokens_per_second: float, include_usage: bool = False
) -> tuple[bytes, dict[str, str]]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "stream": True,
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": "application/json",
        "x-fake-ttft-ms": "0",
        "x-fake-tokens-per-second": f"{tokens_per_second:g}",
        "x-fake-response-tokens": str(tokens),
    }
    return orjson.dumps(body), headers


@dataclass(slots=True)
class StreamResult:
    status: int | None = None
    headers_s: float | None = None  # request sent -> response headers
    ttft_s: float | None = None  # request sent -> first content delta
    content_times: list[float] = field(default_factory=list)  # perf_counter of each delta
    events: int = 0
    done: bool = False
    error: str | None = None  # None for HTTP 200 ending with data: [DONE]
    detail: str = ""

    def gaps(self) -> list[float]:
        t = self.content_times
        return [b - a for a, b in itertools.pairwise(t)]


def _content_delta(payload: bytes) -> bool:
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    choices = event.get("choices") if isinstance(event, dict) else None
    if not choices or not isinstance(choices[0], dict):
        return False
    delta = choices[0].get("delta")
    return isinstance(delta, dict) and bool(delta.get("content"))


async def one_stream(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    on_first: Callable[[], None] | None = None,
) -> StreamResult:
    """POST a streaming request and read its SSE body line by line, timing every delta."""
    clock = time.perf_counter
    result = StreamResult()
    t0 = clock()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            result.status = resp.status
            result.headers_s = clock() - t0
            if resp.status != 200:
                result.error = f"HTTP {resp.status}"
                result.detail = (await resp.text())[:300]
                return result
            async for raw in resp.content:
                now = clock()
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                result.events += 1
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    result.done = True
                elif _content_delta(payload):
                    if not result.content_times:
                        result.ttft_s = now - t0
                        if on_first is not None:
                            on_first()
                    result.content_times.append(now)
            if not result.done:
                result.error = "no [DONE]"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        result.error = type(exc).__name__
        result.detail = str(exc)[:300]
    return result


def _errors(results: list[StreamResult]) -> tuple[Counter[str], dict[str, str]]:
    kinds: Counter[str] = Counter(r.error for r in results if r.error is not None)
    details: dict[str, str] = {}
    for r in results:
        if r.error is not None and r.error not in details:
            details[r.error] = r.detail
    return kinds, details


# --------------------------------------------------------------------------- latency phase


async def latency_phase(
    url: str,
    streams: int,
    warmup: int,
    tokens: int,
    tokens_per_second: float,
    include_usage: bool,
) -> dict[str, Any]:
    """`streams` streaming requests one after the other over one keep-alive connection."""
    body, headers = stream_request(tokens, tokens_per_second, include_usage)
    connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=60)
    life_s = tokens / tokens_per_second if tokens_per_second > 0 else 0.0
    timeout = aiohttp.ClientTimeout(total=10 + life_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        target_url = url + PATH
        for _ in range(warmup):
            await one_stream(session, target_url, body, headers)
        start = time.perf_counter()
        results = [await one_stream(session, target_url, body, headers) for _ in range(streams)]
        wall = time.perf_counter() - start
    ok = [r for r in results if r.error is None]
    ttft = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    to_headers = sorted(r.headers_s for r in ok if r.headers_s is not None)
    # The first delta's trip alone: what one chunk costs, without the request path before it.
    after_headers = sorted(
        r.ttft_s - r.headers_s for r in ok if r.ttft_s is not None and r.headers_s is not None
    )
    gaps = sorted(g for r in ok for g in r.gaps())
    short = sum(1 for r in ok if len(r.content_times) != tokens)
    kinds, details = _errors(results)
    return {
        "streams": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": dict(kinds),
        "error_details": details,
        "streams_with_missing_deltas": short,
        "wall_s": round(wall, 3),
        "ttft_p50_ms": percentile_ms(ttft, 0.50),
        "ttft_p99_ms": percentile_ms(ttft, 0.99),
        "headers_p50_ms": percentile_ms(to_headers, 0.50),
        "first_after_headers_p50_ms": percentile_ms(after_headers, 0.50),
        "first_after_headers_p99_ms": percentile_ms(after_headers, 0.99),
        "gaps": len(gaps),
        "gap_p50_ms": percentile_ms(gaps, 0.50),
        "gap_p99_ms": percentile_ms(gaps, 0.99),
        "gap_max_ms": percentile_ms(gaps, 1.0),
    }


# --------------------------------------------------------------------------- memory phase


@dataclass
class _Ramp:
    """Counts of a memory phase's streams; `progress` is set at every first chunk or failure."""

    wanted: int
    first: int = 0  # got their first content delta
    failed_early: int = 0  # ended (error or not) before any content delta
    live: int = 0  # got their first delta and have not ended
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def settled(self) -> bool:
        return self.first + self.failed_early >= self.wanted


def _rss_mb(pids: dict[str, int]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, pid in pids.items():
        kb = rss_kb(pid)
        out[name] = None if kb is None else round(kb / 1024, 2)
    return out


async def _sample_rss(pids: dict[str, int], samples: int = 3) -> dict[str, float | None]:
    """Median of a few RSS samples 0.3 s apart, per process."""
    taken = []
    for i in range(samples):
        if i:
            await asyncio.sleep(0.3)
        taken.append(_rss_mb(pids))
    return {name: median_of([t[name] for t in taken]) for name in pids}


# Envoy counters and gauges that show a cluster's circuit breakers at work.
_CLUSTER_STATS = (
    r"^cluster\.[^.]+\.(upstream_\w+_overflow|upstream_rq_active|upstream_rq_pending_active"
    r"|upstream_cx_active)$"
)


def _is_overflow(name: str) -> bool:
    return name.endswith("_overflow")


async def envoy_cluster_stats(admin: str) -> dict[str, int]:
    """{"<cluster>.<stat>": value} from an Envoy admin endpoint; {} when it does not answer."""
    out: dict[str, int] = {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"http://{admin}/stats", params={"filter": _CLUSTER_STATS}) as resp,
        ):
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return out
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.strip().isdigit():
            out[name.removeprefix("cluster.")] = int(value)
    return out


async def envoy_circuit_breakers(admin: str) -> dict[str, dict[str, int]]:
    """Each cluster's default-priority thresholds, from the admin /clusters page."""
    out: dict[str, dict[str, int]] = {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"http://{admin}/clusters") as resp,
        ):
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return out
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[1] == "default_priority" and parts[3].isdigit():
            if parts[2] in ("max_connections", "max_pending_requests", "max_requests"):
                out.setdefault(parts[0], {})[parts[2]] = int(parts[3])
    return out


async def memory_phase(
    url: str,
    admin: str,
    k: int,
    tokens: int,
    tokens_per_second: float,
    pids: dict[str, int],
    settle_s: float,
    include_usage: bool,
) -> dict[str, Any]:
    """Hold `k` slow streams open at once and sample RSS once all have their first chunk.

    Streams are opened OPENING_AT_ONCE at a time. RSS is sampled once every stream has its
    first chunk or failed, or the ramp has made no progress for STALL_S (streams queued
    behind a limit), or half a stream's life has passed; streams that have no first chunk by
    then are cancelled, the others read to the end. Then, while every live stream is still
    receiving, CPU per chunk over up to CPU_WINDOW_S.
    """
    body, headers = stream_request(tokens, tokens_per_second, include_usage)
    life_s = (tokens - 1) / tokens_per_second if tokens_per_second > 0 else 0.0
    gc.collect()
    await asyncio.sleep(0.5)
    before = await _sample_rss(pids)
    stats_before = await envoy_cluster_stats(admin)
    ramp = _Ramp(wanted=k)
    opening = asyncio.Semaphore(OPENING_AT_ONCE)
    unstarted: set[asyncio.Task[StreamResult]] = set()
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=True)
    # No total timeout: a stream lasts `life_s`; a read silent for longer than that is dead.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=max(30.0, life_s))
    clock = time.perf_counter
    start = clock()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        target_url = url + PATH

        async def stream() -> StreamResult:
            me = asyncio.current_task()
            await opening.acquire()
            released = False

            def on_first() -> None:
                nonlocal released
                released = True
                opening.release()
                unstarted.discard(me)
                ramp.first += 1
                ramp.live += 1
                ramp.progress.set()

            try:
                return await one_stream(session, target_url, body, headers, on_first)
            finally:
                if released:
                    ramp.live -= 1
                else:
                    opening.release()
                    unstarted.discard(me)
                    ramp.failed_early += 1
                    ramp.progress.set()

        tasks = [asyncio.create_task(stream()) for _ in range(k)]
        unstarted.update(tasks)
        stalled = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(10.0, life_s / 2)):
                while not ramp.settled:
                    ramp.progress.clear()
                    try:
                        async with asyncio.timeout(STALL_S):
                            await ramp.progress.wait()
                    except TimeoutError:
                        stalled = True
                        break
        ramp_s = clock() - start
        await asyncio.sleep(settle_s)
        live_at_sample = ramp.live
        during = await _sample_rss(pids)
        stats_during = await envoy_cluster_stats(admin)
        live = min(live_at_sample, ramp.live)
        sampled_at_s = clock() - start
        queued = list(unstarted)
        for task in queued:
            task.cancel()
        # The sidecar's CPU includes its worker processes' (if it has any).
        tree = {name: name == "sidecar" for name in pids}
        window_s = min(CPU_WINDOW_S, life_s - (clock() - start) - 1.0)
        cpu_window: tuple[float, float, dict[str, float | None], dict[str, float | None]] | None
        cpu_window = None
        if window_s >= 1.0:
            cpu_a = {name: cpu_seconds(pid, tree[name]) for name, pid in pids.items()}
            t_a = clock()
            await asyncio.sleep(window_s)
            cpu_b = {name: cpu_seconds(pid, tree[name]) for name, pid in pids.items()}
            cpu_window = (t_a, clock(), cpu_a, cpu_b)
        _, pending = await asyncio.wait(tasks, timeout=life_s + 15.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    results = [t.result() for t in tasks if not t.cancelled()]
    wall = clock() - start
    stats_after = await envoy_cluster_stats(admin)
    gc.collect()
    await asyncio.sleep(2.0)
    after = await _sample_rss(pids)
    kinds, details = _errors(results)
    cancelled = sum(1 for t in tasks if t.cancelled())
    if cancelled:
        kinds["no first chunk by the sample (cancelled)"] = cancelled
    cpu_per_chunk: dict[str, Any] = {}
    if cpu_window is not None:
        t_a, t_b, cpu_a, cpu_b = cpu_window
        chunks = sum(1 for r in results for t in r.content_times if t_a <= t < t_b)
        cpu_per_chunk = {
            "window_s": round(t_b - t_a, 2),
            "chunks": chunks,
            "us_per_chunk": {
                name: round(1e6 * (cpu_end - before) / chunks, 1)
                for name, before in cpu_a.items()
                if chunks and before is not None and (cpu_end := cpu_b[name]) is not None
            },
        }
    errors = sum(kinds.values())
    growth: dict[str, Any] = {}
    for name in pids:
        b, d = before[name], during[name]
        if b is None or d is None:
            continue
        growth[name] = {
            "before_mb": b,
            "during_mb": d,
            "after_mb": after[name],
            "growth_mb": round(d - b, 2),
            "kb_per_stream": round((d - b) * 1024 / live, 2) if live else None,
        }
    overflow = {
        name: stats_after.get(name, 0) - stats_before.get(name, 0)
        for name in stats_after
        if _is_overflow(name) and stats_after.get(name, 0) != stats_before.get(name, 0)
    }
    active = {
        name: value for name, value in stats_during.items() if not _is_overflow(name) and value
    }
    return {
        "k": k,
        "live_at_sample": live,
        "first_chunk": ramp.first,
        "failed_before_first_chunk": ramp.failed_early,
        "ramp_stalled": stalled,
        "ramp_s": round(ramp_s, 2),
        "sampled_at_s": round(sampled_at_s, 2),
        "wall_s": round(wall, 2),
        "ok": sum(1 for r in results if r.error is None),
        "errors": errors,
        "error_kinds": dict(kinds),
        "error_details": details,
        "rss": growth,
        "cpu_per_chunk": cpu_per_chunk,
        "envoy_overflow": overflow,
        "envoy_active_at_sample": active,
    }
