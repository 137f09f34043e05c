"""Streaming cost of the gateway against an Envoy-only baseline, measured side by side.

`python -m benchmarks.streaming` starts the same process tree as `benchmarks.run` (one fake LLM,
an Envoy-only baseline derived from the gateway's bootstrap, and the gateway via
`extproc.supervisor.Stack`, all on free loopback ports) and measures, alternating Envoy alone
and the gateway's two stream paths within every run (*inline*: the client did not ask for
usage, every chunk waits for the sidecar; *observed*: the client asked for usage, the stream
observer follows a copy and Envoy holds nothing back):

1. added time to first token: streaming chat requests at concurrency 1, the fake pacing 20
   tokens at 100 tokens/s with no time to first token; client-side time from sending the request
   to the first event carrying a content delta, p50 and p99 over N streams;
2. added per-chunk latency: for the same streams, response headers to the first content delta
   (one chunk's trip), and the gaps between successive deltas against the fake's pacing
   (10 ms), p50 and p99;
3. memory per concurrent stream: K slow streams (1 token/s, 21 tokens: 20 s each) held open
   at once, in a fresh process tree per K and variant; the RSS of the sidecar and of Envoy
   once every stream has received its first chunk (or the ramp stalls on a limit), against the
   RSS before they opened, per stream live at that moment; the Envoy circuit-breaker overflows
   it caused; and the CPU each process spends per chunk while the K streams flow.

The gateway's team has quota limits that never reject (`--quota`, default the embedded store),
as in `benchmarks.run`. Medians over runs; a markdown table on stdout, the full result as JSON
in `benchmarks/results/streaming-<UTC timestamp>.json` and a markdown report (with the
streaming figures of the performance budget) beside it. `benchmarks.run --suite full` calls
`collect()` and puts the result into its combined report instead. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import itertools
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from benchmarks import budget
from benchmarks.run import (
    API_KEY,
    MODEL,
    PATH,
    QUOTA_STORES,
    TARGETS,
    Scenario,
    Targets,
    _diff,
    _fmt,
    _loop_factory,
    cpu_seconds,
    envelope,
    envoy_workers,
    int_list,
    median_of,
    percentile,
    positive_float,
    positive_int,
    preflight,
    report_header,
    started,
    stem_for,
    write_result,
)

# What is measured: Envoy alone, and the gateway on each of its two stream paths. A client
# that asks for usage is followed by the observer (Envoy holds no chunk back); one that does
# not is relayed inline (the usage event the gateway asked for is cut out of its stream).
VARIANTS: dict[str, tuple[str, bool]] = {  # variant -> (process tree, client asks for usage)
    "baseline": ("baseline", False),
    "inline": ("gateway", False),
    "observed": ("gateway", True),
}
GATEWAY_VARIANTS = ("inline", "observed")
LABELS = {
    "baseline": "Envoy alone",
    "inline": "gateway, inline",
    "observed": "gateway, observed",
}
# Connections the load generator keeps for itself beyond the streams (sessions, pre-flight).
FD_MARGIN = 64
# Streams in the middle of opening (request sent, first chunk not yet back) during a memory
# phase: a ramp, so thousands of connects do not overflow a listen backlog all at once.
OPENING_AT_ONCE = 64
# A memory phase's ramp that gets no stream to its first chunk for this long has hit a limit.
STALL_S = 3.0
# CPU per chunk is measured over this long once every stream is open, ending before the first
# stream ends: only chunks flowing then, no connects, no stream endings.
CPU_WINDOW_S = 5.0


# --------------------------------------------------------------------------- processes


def ready(runner: asyncio.Runner, targets: Targets, warm_streams: int = 0) -> dict[str, Any]:
    """Both targets answer (pre-flight), run the same number of Envoy workers, and have served
    `warm_streams` streams (so lazy start-up work is not counted as per-stream memory)."""
    workers = {t: envoy_workers(targets.admins[t]) for t in TARGETS}
    if workers["baseline"] != workers["gateway"]:
        raise RuntimeError(f"Envoy worker counts differ: {workers}")
    for target in TARGETS:
        runner.run(preflight(targets.urls[target], time.monotonic() + 20))
        if warm_streams:
            runner.run(latency_phase(targets.urls[target], warm_streams, 0, 5, 0, False))
    return workers


def rss_kb(pid: int) -> int | None:
    """Resident set size of a process in KiB (VmRSS in /proc/<pid>/status), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def open_files_limit(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of a running process (/proc/<pid>/limits), or None."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        pass
    return None


def raise_open_files_limit() -> dict[str, Any]:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft_before": before, "soft": soft, "hard": hard}


def streams_that_fit(limits: dict[str, int | None]) -> int:
    """The most concurrent streams every process's open-files limit allows.

    The load generator and the fake need one socket per stream, Envoy two (downstream and
    upstream); the sidecar's ext_proc streams share a few gRPC connections.
    """
    per_stream = {"loadgen": 1, "fake-llm": 1, "baseline envoy": 2, "gateway envoy": 2}
    fits = [
        (limit - FD_MARGIN) // per_stream[name]
        for name, limit in limits.items()
        if limit is not None and name in per_stream
    ]
    return max(0, min(fits)) if fits else 1 << 30


# --------------------------------------------------------------------------- one stream


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


def _ms(ordered: list[float], q: float) -> float | None:
    value = percentile(ordered, q)
    return None if value is None else round(value * 1000, 3)


# --------------------------------------------------------------------------- 1 + 2: latency


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
        "ttft_p50_ms": _ms(ttft, 0.50),
        "ttft_p99_ms": _ms(ttft, 0.99),
        "headers_p50_ms": _ms(to_headers, 0.50),
        "first_after_headers_p50_ms": _ms(after_headers, 0.50),
        "first_after_headers_p99_ms": _ms(after_headers, 0.99),
        "gaps": len(gaps),
        "gap_p50_ms": _ms(gaps, 0.50),
        "gap_p99_ms": _ms(gaps, 0.99),
        "gap_max_ms": _ms(gaps, 1.0),
    }


# --------------------------------------------------------------------------- 3: memory


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
                unstarted.discard(me)  # type: ignore[arg-type]
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
                    unstarted.discard(me)  # type: ignore[arg-type]
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
                name: round(1e6 * (cpu_b[name] - before) / chunks, 1)
                for name, before in cpu_a.items()
                if chunks and before is not None and cpu_b[name] is not None
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


# --------------------------------------------------------------------------- report


def summarize_latency(samples: list[dict[str, Any]], pacing_ms: float) -> dict[str, Any]:
    keys = (
        "ttft_p50_ms",
        "ttft_p99_ms",
        "gap_p50_ms",
        "gap_p99_ms",
        "headers_p50_ms",
        "first_after_headers_p50_ms",
        "first_after_headers_p99_ms",
    )
    per_variant: dict[str, Any] = {}
    for variant in VARIANTS:
        rows = [s for s in samples if s["target"] == variant]
        per_variant[variant] = {key: median_of([r[key] for r in rows]) for key in keys}
        per_variant[variant]["cpu_ms_per_stream"] = {
            name: median_of([r["cpu_ms_per_stream"].get(name) for r in rows])
            for name in sorted({n for r in rows for n in r["cpu_ms_per_stream"]})
        }
        per_variant[variant]["streams"] = sum(r["streams"] for r in rows)
        per_variant[variant]["errors"] = sum(r["errors"] for r in rows)
        per_variant[variant]["streams_with_missing_deltas"] = sum(
            r["streams_with_missing_deltas"] for r in rows
        )
    base = per_variant["baseline"]
    added: dict[str, Any] = {}
    per_run: dict[str, list[dict[str, Any]]] = {}
    for variant in GATEWAY_VARIANTS:
        gw = per_variant[variant]
        added[variant] = {key.removesuffix("_ms"): _diff(gw[key], base[key]) for key in keys}
        per_run[variant] = []
        for run in sorted({s["run"] for s in samples}):
            b = next(s for s in samples if s["run"] == run and s["target"] == "baseline")
            g = next(s for s in samples if s["run"] == run and s["target"] == variant)
            per_run[variant].append({key: _diff(g[key], b[key]) for key in keys})
    return {
        **per_variant,
        "pacing_ms": pacing_ms,
        "added_ms": added,
        "per_run_added_ms": per_run,
    }


def _spread(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if len(present) < 2:
        return ""
    return f"runs {_fmt(min(present), sign=True)} … {_fmt(max(present), sign=True)} ms"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lat = result["latency"]
    base = lat["baseline"]
    lines = [
        f"Streaming, Envoy alone vs gateway: {s['runs']} run(s) x {s['latency_streams']} streams "
        f"at concurrency 1, {s['tokens']} tokens at {s['tokens_per_second']:g} tokens/s "
        f"(pacing {lat['pacing_ms']:g} ms), no time to first token; medians over runs; Envoy "
        f"--concurrency {s['envoy_concurrency']}; {result['machine']['cpus']} CPU(s) shared by "
        "the load generator, both Envoys, the fake LLM and the sidecar. *inline*: the client "
        "did not ask for usage (the gateway injects the request and cuts the usage event, so "
        "every chunk waits for the sidecar); *observed*: the client asked for usage (the "
        "observer follows a copy, Envoy holds nothing back).",
        "",
        "| metric | Envoy alone | gateway inline | added inline | gateway observed | "
        "added observed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = (
        ("time to first token p50 (ms)", "ttft_p50"),
        ("time to first token p99 (ms)", "ttft_p99"),
        (f"gap between chunks p50 (ms, pacing {lat['pacing_ms']:g})", "gap_p50"),
        (f"gap between chunks p99 (ms, pacing {lat['pacing_ms']:g})", "gap_p99"),
        ("time to response headers p50 (ms)", "headers_p50"),
        ("response headers to first token p50 (ms)", "first_after_headers_p50"),
        ("response headers to first token p99 (ms)", "first_after_headers_p99"),
    )
    for label, key in rows:
        cells = [_fmt(base[f"{key}_ms"])]
        for variant in GATEWAY_VARIANTS:
            spread = _spread([r[f"{key}_ms"] for r in lat["per_run_added_ms"][variant]])
            cells.append(_fmt(lat[variant][f"{key}_ms"]))
            cells.append(
                f"{_fmt(lat['added_ms'][variant][key], sign=True)} ms"
                + (f" ({spread})" if spread else "")
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def cpu(variant: str) -> str:
        values = lat[variant]["cpu_ms_per_stream"].items()
        return ", ".join(f"{name} {_fmt(value)}" for name, value in values if value)

    lines.append(
        f"| CPU ms per stream | {cpu('baseline')} | {cpu('inline')} | | {cpu('observed')} | |"
    )
    errors = sum(lat[v]["errors"] for v in VARIANTS)
    lines.append(
        "| streams / errors | "
        + " | ".join(
            f"{lat[v]['streams']} / {lat[v]['errors']}" + (" |" if v != "baseline" else "")
            for v in VARIANTS
        )
        + (" **ERRORS** |" if errors else " all ended with [DONE] |")
    )
    lines += [
        "",
        f"Memory per concurrent stream: K streams at {s['slow_tokens_per_second']:g} token/s, "
        f"{s['slow_tokens']} tokens each, opened {OPENING_AT_ONCE} at a time; RSS (median of 3 "
        f"samples) {s['settle_s']:g} s after every stream had its first chunk, against the RSS "
        "before they opened; per stream = growth / streams live at the sample. CPU per chunk: "
        f"CPU time over up to {CPU_WINDOW_S:g} s right after the sample (every stream open, "
        "none opening or ending) / content chunks the client received in that window.",
        "",
        "| K | target | live streams | process | RSS before (MB) | RSS with K open (MB) | "
        "growth (MB) | KB per stream | RSS after (MB) | CPU µs per chunk | ok / errors |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in result["memory"]:
        per_chunk = m.get("cpu_per_chunk", {}).get("us_per_chunk", {})
        for name, g in m["rss"].items():
            lines.append(
                f"| {m['k']} | {LABELS[m['target']]} | {m['live_at_sample']} | {name} | "
                f"{_fmt(g['before_mb'], 1)} | {_fmt(g['during_mb'], 1)} | "
                f"{_fmt(g['growth_mb'], 1, sign=True)} | {_fmt(g['kb_per_stream'], 1)} | "
                f"{_fmt(g['after_mb'], 1)} | {_fmt(per_chunk.get(name), 1)} | "
                f"{m['ok']} / {m['errors']} |"
            )
    lines.append("")
    for note in result["notes"]:
        lines.append(f"- {note}")
    for m in result["memory"]:
        if m["errors"]:
            kinds = ", ".join(f"{kind}: {n}" for kind, n in m["error_kinds"].items())
            detail = next((d for d in m["error_details"].values() if d), "")
            lines.append(
                f"- **K={m['k']} {LABELS[m['target']]}: {m['errors']} of {m['k']} stream(s) "
                f"failed** ({kinds})" + (f"; e.g. `{detail[:160]}`" if detail else "")
            )
        if m["envoy_overflow"]:
            counted = ", ".join(f"{name} +{n}" for name, n in m["envoy_overflow"].items())
            lines.append(
                f"  - its Envoy's circuit breakers overflowed: {counted}; active at the sample: "
                + ", ".join(f"{name} {n}" for name, n in m["envoy_active_at_sample"].items())
            )
    breakers = s.get("envoy_circuit_breakers") or {}
    limits = {
        f"{cluster}: " + ", ".join(f"{k} {v}" for k, v in sorted(thresholds.items()))
        for per_target in breakers.values()
        for cluster, thresholds in per_target.items()
    }
    if limits:
        lines.append(f"- Envoy circuit-breaker thresholds in force: {'; '.join(sorted(limits))}.")
    for sample in result["latency_samples"]:
        if sample["errors"]:
            lines.append(
                f"- **latency run {sample['run']} {LABELS[sample['target']]}: "
                f"{sample['errors']} error(s)** {sample['error_kinds']}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.streaming", description=__doc__.split("\n")[0]
    )
    p.add_argument("--runs", type=positive_int, default=3, help="baseline/gateway pairs")
    p.add_argument(
        "--latency-streams", type=positive_int, default=200, help="streams per run and target"
    )
    p.add_argument("--warmup-streams", type=int, default=5, help="unmeasured streams first")
    p.add_argument("--tokens", type=positive_int, default=20, help="tokens per latency stream")
    p.add_argument(
        "--tokens-per-second", type=positive_float, default=100.0, help="latency streams' pacing"
    )
    p.add_argument(
        "--streams", type=int_list, default=[1000, 5000], help="K concurrent slow streams"
    )
    p.add_argument("--slow-tokens", type=positive_int, default=21, help="tokens per slow stream")
    p.add_argument(
        "--slow-tokens-per-second", type=positive_float, default=1.0, help="slow streams' pacing"
    )
    p.add_argument(
        "--memory-targets",
        choices=("gateway", "both"),
        default="both",
        help="hold the K streams through the gateway only, or through Envoy alone too",
    )
    p.add_argument(
        "--memory-paths",
        choices=("inline", "observed", "both"),
        default="both",
        help="the gateway stream path(s) whose memory is measured",
    )
    p.add_argument("--settle", type=float, default=1.0, help="seconds before sampling RSS")
    p.add_argument(
        "--quota",
        choices=QUOTA_STORES,
        default="memory",
        help="the team's limits and their store, as benchmarks.run (default memory)",
    )
    p.add_argument(
        "--envoy-concurrency", type=positive_int, default=1, help="Envoy worker threads (both)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 run, 30 streams, K=200")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and process logs")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.latency_streams, args.warmup_streams = 1, 30, 2
        args.streams, args.slow_tokens = [200], 15
    return args


def _on_sigterm(_signum: int, _frame: Any) -> None:
    """Stop like Ctrl-C: cancel the running phase, or unwind synchronous code right here.

    Raising KeyboardInterrupt from the handler while the loop runs (as `run._raise_interrupt`
    does) is not enough under uvloop: when the signal lands in a transport callback, uvloop
    reports the exception as a fatal transport error and carries on (or the process dies of
    the signal), and the child processes are left running.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise KeyboardInterrupt from None
    for task in asyncio.all_tasks(loop):
        task.cancel()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)  # same clean-up as Ctrl-C
    code, result = collect(args, argv)
    if result is None:
        return code
    stem = stem_for(dt.datetime.fromisoformat(result["timestamp"]), "streaming-")
    result["budget"] = budget.streaming_rows(result)
    out = write_result(stem, result, report(result))
    print(markdown(result))
    print("\n" + budget.markdown(result["budget"]))
    print(f"\nresult: {out}, report {stem.name}.md ({result['elapsed_s']} s)", file=sys.stderr)
    return code


def report(result: dict[str, Any]) -> str:
    """The markdown report file of a streaming run."""
    lines = report_header(result, "Streaming: gateway vs Envoy alone", "benchmarks.streaming")
    lines += ["## Budget", "", budget.markdown(result["budget"]), "", "## Results", ""]
    return "\n".join([*lines, markdown(result)])


def collect(args: argparse.Namespace, argv: list[str] | None) -> tuple[int, dict[str, Any] | None]:
    """Run every part; returns the exit code and the result (None when interrupted).

    The caller installs the SIGTERM handler (`_on_sigterm`) and writes the result.
    """
    scenario = Scenario(quota=args.quota)
    rlimit = raise_open_files_limit()  # before starting anything: the children inherit it
    workdir = Path(tempfile.mkdtemp(prefix="extproc-bench-streaming-"))
    started_at = time.monotonic()
    ok = False
    notes: list[str] = []
    loop = asyncio.Runner(loop_factory=_loop_factory())
    try:
        with started(workdir / "latency", args.envoy_concurrency, scenario=scenario) as targets:
            workers = ready(loop, targets)
            fd_limits = {
                "loadgen": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                "fake-llm": open_files_limit(targets.fake.pid),
                "baseline envoy": open_files_limit(targets.baseline.pid),
                "gateway envoy": open_files_limit(targets.pids("gateway")["envoy"]),
                "sidecar": open_files_limit(targets.pids("gateway")["sidecar"]),
            }
            fits = streams_that_fit(fd_limits)
            ks = sorted({min(k, fits) for k in args.streams})
            if any(k > fits for k in args.streams):
                notes.append(
                    f"**open-files limit too low**: {fd_limits} (soft raised from "
                    f"{rlimit['soft_before']} to {rlimit['soft']}, hard {rlimit['hard']}) fits "
                    f"{fits} concurrent streams; measured K={ks} instead of {args.streams}."
                )
            print(f"open-files limits {fd_limits}: up to {fits} streams", file=sys.stderr)
            breakers = {t: loop.run(envoy_circuit_breakers(targets.admins[t])) for t in TARGETS}

            # 1 + 2: latency, baseline then gateway in every run.
            pacing_ms = 1000 / args.tokens_per_second
            latency_samples: list[dict[str, Any]] = []
            total = args.runs * len(VARIANTS)
            for run in range(1, args.runs + 1):
                for variant, (target, include_usage) in VARIANTS.items():
                    targets.check()
                    pids = {**targets.pids(target), "fake-llm": targets.fake.pid}
                    gc.collect()
                    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    sample = loop.run(
                        latency_phase(
                            targets.urls[target],
                            args.latency_streams,
                            args.warmup_streams,
                            args.tokens,
                            args.tokens_per_second,
                            include_usage,
                        )
                    )
                    cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    measured = args.latency_streams + args.warmup_streams
                    sample["cpu_ms_per_stream"] = {
                        name: round(1000 * (cpu_after[name] - before) / measured, 3)
                        for name, before in cpu_before.items()
                        if before is not None and cpu_after[name] is not None
                    }
                    sample.update(run=run, target=variant)
                    latency_samples.append(sample)
                    print(
                        f"[{len(latency_samples)}/{total}] run {run} {variant:<8} "
                        f"ttft p50 {_fmt(sample['ttft_p50_ms'])} p99 {_fmt(sample['ttft_p99_ms'])}"
                        f" ms  gap p50 {_fmt(sample['gap_p50_ms'])} p99 "
                        f"{_fmt(sample['gap_p99_ms'])} ms  errors {sample['errors']}",
                        file=sys.stderr,
                        flush=True,
                    )
            targets.check()

        # 3: memory, per K in a fresh process tree (allocators keep what an earlier phase
        # freed, which would hide growth), baseline (when asked) then gateway.
        memory: list[dict[str, Any]] = []
        paths = GATEWAY_VARIANTS if args.memory_paths == "both" else (args.memory_paths,)
        memory_targets = (("baseline",) if args.memory_targets == "both" else ()) + paths
        for k in ks:
            for variant in memory_targets:
                target, include_usage = VARIANTS[variant]
                # A fresh process tree per K and variant: allocators keep what an earlier
                # phase freed, which would hide growth.
                phase_dir = workdir / f"memory-{k}-{variant}"
                with started(phase_dir, args.envoy_concurrency, scenario=scenario) as targets:
                    ready(loop, targets, warm_streams=args.warmup_streams)
                    targets.check()
                    pids = {**targets.pids(target), "fake-llm": targets.fake.pid}
                    pids["loadgen"] = os.getpid()
                    sample = loop.run(
                        memory_phase(
                            targets.urls[target],
                            targets.admins[target],
                            k,
                            args.slow_tokens,
                            args.slow_tokens_per_second,
                            pids,
                            args.settle,
                            include_usage,
                        )
                    )
                    sample["target"] = variant
                    memory.append(sample)
                    growth = ", ".join(
                        f"{name} {_fmt(g['growth_mb'], 1, sign=True)} MB"
                        for name, g in sample["rss"].items()
                    )
                    print(
                        f"memory K={k} {variant:<8} live {sample['live_at_sample']} "
                        f"(ramp {sample['ramp_s']} s): {growth}; ok {sample['ok']} errors "
                        f"{sample['errors']} {sample['error_kinds'] or ''} "
                        f"{sample['envoy_overflow'] or ''}",
                        file=sys.stderr,
                        flush=True,
                    )
                    targets.check()

        now = dt.datetime.now(dt.UTC)
        errors_total = sum(s["errors"] for s in latency_samples) + sum(m["errors"] for m in memory)
        result = {
            **envelope(args, argv, now),
            "settings": {
                "quota": args.quota,
                "runs": args.runs,
                "latency_streams": args.latency_streams,
                "warmup_streams": args.warmup_streams,
                "tokens": args.tokens,
                "tokens_per_second": args.tokens_per_second,
                "streams": args.streams,
                "streams_measured": ks,
                "slow_tokens": args.slow_tokens,
                "slow_tokens_per_second": args.slow_tokens_per_second,
                "memory_targets": list(memory_targets),
                "opening_at_once": OPENING_AT_ONCE,
                "settle_s": args.settle,
                "envoy_concurrency": args.envoy_concurrency,
                "envoy_workers_reported": workers,
                "envoy_circuit_breakers": breakers,
                "open_files": {"rlimit": rlimit, "per_process": fd_limits, "streams_fit": fits},
                "tiktoken_cache_dir": os.environ.get("TIKTOKEN_CACHE_DIR"),
            },
            "latency": summarize_latency(latency_samples, pacing_ms),
            "memory": memory,
            "notes": notes,
            "latency_samples": latency_samples,
            "errors_total": errors_total,
            "elapsed_s": round(time.monotonic() - started_at, 1),
        }
        ok = True
        return (1 if errors_total else 0), result
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; stopping everything", file=sys.stderr)
        return 130, None
    finally:
        loop.close()
        if ok and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"configs and process logs kept in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
