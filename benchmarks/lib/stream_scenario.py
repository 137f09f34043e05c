"""The streaming benchmark measured: the latency part (Envoy alone, then for each client
request, without and with usage asked for, the floor and the gateway, alternated within every
run) in one process tree, then the memory part (K slow streams held open, Envoy alone and the
gateway) in a fresh process tree per K and variant; the result, JSON-ready.

`args` are the options of `python -m benchmarks.streaming`; the suite passes its own.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.lib.chat_client import describe, preflight
from benchmarks.lib.configs import STREAM_GATEWAY_VARIANTS, STREAM_VARIANTS, TARGETS, Scenario
from benchmarks.lib.procstat import cpu_seconds, open_files_limit, raise_open_files_limit
from benchmarks.lib.report import fmt
from benchmarks.lib.results import envelope
from benchmarks.lib.runtime import loop_factory
from benchmarks.lib.stack import Targets, envoy_workers, ext_proc_counters, started
from benchmarks.lib.stats import summarize_stream_latency
from benchmarks.lib.stream_client import (
    OPENING_AT_ONCE,
    envoy_circuit_breakers,
    latency_phase,
    memory_phase,
)

# Connections the load generator keeps for itself beyond the streams (sessions, pre-flight).
FD_MARGIN = 64


def ready(runner: asyncio.Runner, targets: Targets, warm_streams: int = 0) -> dict[str, Any]:
    """Every target (Envoy alone, the floor when started, the gateway) answers (pre-flight),
    runs the same number of Envoy workers, and has served `warm_streams` streams (so lazy
    start-up work is not counted as per-stream memory). The floor's Envoy must have talked to
    the floor server, or the floor would measure Envoy alone."""
    measured = [t for t in (*TARGETS, "floor") if t in targets.urls]
    workers = {t: envoy_workers(targets.admins[t]) for t in measured}
    if len(set(workers.values())) != 1:
        raise RuntimeError(f"Envoy worker counts differ: {workers}")
    for target in measured:
        runner.run(preflight(targets.urls[target], time.monotonic() + 20))
        if warm_streams:
            runner.run(latency_phase(targets.urls[target], warm_streams, 0, 5, 0, False))
    if "floor" in measured and not (ext_proc_counters(targets.admins["floor"]) or {}).get(
        "streams"
    ):
        raise RuntimeError("the floor's Envoy opened no ext_proc stream to the floor server")
    return workers


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


def measure_streaming(
    args: argparse.Namespace, argv: list[str] | None
) -> tuple[int, dict[str, Any] | None]:
    """Run every part; returns the exit code and the result (None when interrupted).

    The caller installs the SIGTERM handler (`runtime.cancel_or_interrupt`) and writes the
    result.
    """
    scenario = Scenario(quota=args.quota, stream_path=args.stream_path)
    rlimit = raise_open_files_limit()  # before starting anything: the children inherit it
    workdir = Path(tempfile.mkdtemp(prefix="extproc-bench-streaming-"))
    started_at = time.monotonic()
    ok = False
    notes: list[str] = []
    loop = asyncio.Runner(loop_factory=loop_factory())
    try:
        latency_dir = workdir / "latency"
        with started(latency_dir, args.envoy_concurrency, scenario=scenario, floor=True) as targets:
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

            floor_settings = targets.floor_settings

            # 1 + 2: latency, in every run Envoy alone, then per client request (no usage
            # asked, usage asked) the floor and the gateway (STREAM_VARIANTS' order).
            pacing_ms = 1000 / args.tokens_per_second
            latency_samples: list[dict[str, Any]] = []
            total = args.runs * len(STREAM_VARIANTS)
            for run in range(1, args.runs + 1):
                for variant, (target, include_usage) in STREAM_VARIANTS.items():
                    targets.check()
                    pids = {**targets.pids(target), "fake-llm": targets.fake.pid}
                    # Envoy's counters of its talk to the ext_proc server, read outside the
                    # CPU window (a stats dump costs Envoy).
                    talks = target != "baseline"
                    talk_before = ext_proc_counters(targets.admins[target]) if talks else None
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
                        name: round(1000 * (after - before) / measured, 3)
                        for name, before in cpu_before.items()
                        if before is not None and (after := cpu_after[name]) is not None
                    }
                    talk_after = ext_proc_counters(targets.admins[target]) if talks else None
                    if talk_before is not None and talk_after is not None:
                        sample["ext_proc_per_stream"] = {
                            key: round((talk_after[key] - talk_before[key]) / measured, 2)
                            for key in talk_after
                        }
                    sample.update(run=run, target=variant)
                    latency_samples.append(sample)
                    print(
                        f"[{len(latency_samples)}/{total}] run {run} {variant:<14} "
                        f"ttft p50 {fmt(sample['ttft_p50_ms'])} p99 {fmt(sample['ttft_p99_ms'])}"
                        f" ms  gap p50 {fmt(sample['gap_p50_ms'])} p99 "
                        f"{fmt(sample['gap_p99_ms'])} ms  errors {sample['errors']}",
                        file=sys.stderr,
                        flush=True,
                    )
            targets.check()

        # 3: memory, per K in a fresh process tree (allocators keep what an earlier phase
        # freed, which would hide growth), baseline (when asked) then gateway.
        memory: list[dict[str, Any]] = []
        paths = STREAM_GATEWAY_VARIANTS if args.memory_paths == "both" else (args.memory_paths,)
        memory_targets = (("baseline",) if args.memory_targets == "both" else ()) + paths
        for k in ks:
            for variant in memory_targets:
                target, include_usage = STREAM_VARIANTS[variant]
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
                        f"{name} {fmt(g['growth_mb'], 1, sign=True)} MB"
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
            "generator": {
                "name": "python",
                "client": describe(),
                "why": "wrk cannot time the events of a stream, which this benchmark measures",
            },
            "settings": {
                "quota": args.quota,
                "stream_path": args.stream_path,
                "floor": floor_settings or None,
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
            "latency": summarize_stream_latency(latency_samples, pacing_ms),
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
