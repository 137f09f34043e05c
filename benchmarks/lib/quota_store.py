"""The quota store alone: what one request's reserve (three limits) + settle costs an event
loop, the embedded store against Redis on loopback (a redis-server started for the
measurement and stopped after it)."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid

from benchmarks.lib.configs import HOST, free_port
from benchmarks.lib.stack import redis_binary
from extproc.config import parse_config
from extproc.quota.budgets import Budgets
from extproc.quota.memory import MemoryStore
from extproc.quota.policy import Amounts, charges
from extproc.quota.redis_store import RedisStore
from extproc.quota.store import QuotaStore

CONFIG = parse_config(
    {
        "teams": {
            "bench": {
                "keys": [{"sha256": "0" * 64}],
                "limits": [
                    {"window": "minute", "tokens": 10**12},
                    {"window": "minute", "requests": 10**12},
                    {"window": "day", "tokens": 10**12},
                ],
            }
        },
        "backends": {"b": {"url": "http://127.0.0.1:1/v1"}},
        "models": {"m": {"targets": [{"backend": "b"}]}},
    }
)
SPECS = Budgets.of(CONFIG).teams["bench"]


async def one_request(store: QuotaStore) -> None:
    res_id = uuid.uuid4().hex
    planned = charges(SPECS, Amounts(120, 256), CONFIG, "m", time.time(), 960)
    result = await store.reserve("bench", res_id, planned, 900)
    assert result.ok
    await store.settle("bench", res_id, [150, 1, 150])


async def measure(store: QuotaStore, requests: int, concurrency: int) -> float:
    """Microseconds of wall time per request with `concurrency` requests in flight."""
    per_worker = requests // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            await one_request(store)

    for _ in range(100):  # warm-up: scripts loaded, connections open
        await one_request(store)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.perf_counter() - started) / (per_worker * concurrency) * 1e6


def start_redis() -> tuple[subprocess.Popen, str, str]:
    """A redis-server on a free loopback port: (process, URL, its data directory)."""
    binary = redis_binary()
    if binary is None:
        raise SystemExit("redis-server is not installed (make test installs it)")
    port, workdir = free_port(), tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return proc, f"redis://{HOST}:{port}/0", workdir
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


async def measure_stores(args: argparse.Namespace, redis_url: str) -> dict[str, dict[int, float]]:
    """Both stores at every concurrency, `args.runs` times; medians."""
    results: dict[str, dict[int, list[float]]] = {"memory": {}, "redis": {}}
    for _ in range(args.runs):
        for kind in ("memory", "redis"):
            for c in args.concurrency:
                store = MemoryStore() if kind == "memory" else RedisStore.from_url(redis_url)
                try:
                    await store.reset("bench")
                    us = await measure(store, args.requests, c)
                finally:
                    await store.close()
                results[kind].setdefault(c, []).append(us)
    return {k: {c: statistics.median(v) for c, v in d.items()} for k, d in results.items()}


def collect(args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """Median µs per request by store and concurrency (`benchmarks.run --suite full` too).

    `args`: the options of `python -m benchmarks.quota_store` (requests, runs, concurrency).
    """
    proc, url, workdir = start_redis()
    try:
        try:
            import uvloop

            return uvloop.run(measure_stores(args, url))
        except ImportError:
            return asyncio.run(measure_stores(args, url))
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def markdown(args: argparse.Namespace, medians: dict[str, dict[int, float]]) -> str:
    lines = [
        f"Quota reserve + settle, 3 limits, {args.requests} requests, median of {args.runs} runs",
        "",
        "| store | concurrency | µs per request | requests/s (one event loop) |",
        "|---|---:|---:|---:|",
    ]
    for kind, by_c in medians.items():
        for c, us in sorted(by_c.items()):
            lines.append(f"| {kind} | {c} | {us:.1f} | {1e6 / us:,.0f} |")
    return "\n".join(lines)
