"""One chat scenario measured: its process tree started, Envoy alone, the floor (the gateway's
Envoy config with a do-nothing ext_proc server) and the gateway alternated for every
concurrency of every run, the samples summarized, everything stopped.

`args` are the options of `python -m benchmarks.run` (runs, duration, warmup,
envoy_concurrency, keep_workdir); the suite passes its own.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.lib.chat_client import (
    PAYLOAD,
    RESPONSE_TOKENS,
    check_preflight,
    measure,
    preflight,
)
from benchmarks.lib.configs import CHAT_TARGETS, LOCAL_GUARDS, QUOTA_LIMITS, Scenario
from benchmarks.lib.procstat import cpu_seconds, self_cpu_seconds
from benchmarks.lib.report import fmt
from benchmarks.lib.runtime import loop_factory
from benchmarks.lib.stack import Targets, envoy_workers, ext_proc_counters, started
from benchmarks.lib.stats import summarize_chat


@dataclass
class Outcome:
    """One scenario measured: its result (JSON-ready) and every latency, for the plots."""

    result: dict[str, Any]
    latencies: dict[tuple[int, str], list[float]]  # (concurrency, target) -> seconds, all runs


def run_scenario(args: argparse.Namespace, scenario: Scenario, concurrencies: list[int]) -> Outcome:
    """Start the process tree for `scenario`, measure every concurrency, stop everything.

    The workdir (configs, process logs) is removed afterwards unless `--keep-workdir`, and
    kept when anything failed.
    """
    workdir = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    ok = False
    started_at = time.monotonic()
    try:
        with started(
            workdir,
            args.envoy_concurrency,
            ["--response-tokens", str(RESPONSE_TOKENS)],
            scenario=scenario,
            floor=True,
        ) as targets:
            outcome = measure_scenario(args, scenario, concurrencies, targets, started_at)
        ok = True
        return outcome
    finally:
        if ok and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"configs and process logs kept in {workdir}", file=sys.stderr)


def measure_scenario(
    args: argparse.Namespace,
    scenario: Scenario,
    concurrencies: list[int],
    targets: Targets,
    started: float,
) -> Outcome:
    """Measure `scenario` on running `targets`: a pre-flight per target, then for every run and
    concurrency Envoy alone, the floor and the gateway back to back. `started`: when the
    scenario began (time.monotonic()), for its elapsed time."""
    measured = [t for t in CHAT_TARGETS if t in targets.urls]
    workers = {t: envoy_workers(targets.admins[t]) for t in measured}
    if len(set(workers.values())) != 1:
        raise RuntimeError(f"Envoy worker counts differ: {workers}")
    urls = targets.urls
    pids = {t: {**targets.pids(t), "fake-llm": targets.fake.pid} for t in measured}
    samples: list[dict[str, Any]] = []
    latencies: dict[tuple[int, str], list[float]] = {}
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        preflight_headers = {
            target: runner.run(preflight(urls[target], time.monotonic() + 20))
            for target in measured
        }
        check_preflight(scenario, preflight_headers)
        talking = [t for t in measured if t != "baseline"]
        counters = {t: ext_proc_counters(targets.admins[t]) for t in talking}
        if "floor" in counters and not (counters["floor"] or {}).get("streams"):
            raise RuntimeError(f"the floor's Envoy opened no ext_proc stream: {counters}")
        total = args.runs * len(concurrencies) * len(measured)
        for run in range(1, args.runs + 1):
            for c in concurrencies:
                for target in measured:  # back to back, same machine conditions
                    targets.check()
                    gc.collect()
                    tree = {n: n == "sidecar" for n in pids[target]}
                    # Envoy's counters, read outside the CPU window (a stats dump costs Envoy).
                    talk_before = (
                        ext_proc_counters(targets.admins[target]) if target in talking else None
                    )
                    cpu_before = {n: cpu_seconds(pid, tree[n]) for n, pid in pids[target].items()}
                    self_before = self_cpu_seconds()
                    keep = latencies.setdefault((c, target), [])
                    sample = runner.run(measure(urls[target], c, args.warmup, args.duration, keep))
                    cpu = {n: cpu_seconds(pid, tree[n]) for n, pid in pids[target].items()}
                    self_after = self_cpu_seconds()
                    talk_after = (
                        ext_proc_counters(targets.admins[target]) if target in talking else None
                    )
                    if talk_before is not None and talk_after is not None:
                        # Per request, warm-up included (Envoy counts those too).
                        n = sample["requests"] + sample["warmup_requests"]
                        sample["ext_proc_per_request"] = {
                            k: round((talk_after[k] - talk_before[k]) / n, 3) if n else None
                            for k in talk_after
                        }
                    cores = {
                        n: round((after - before) / sample["wall_s"], 2)
                        for n, before in cpu_before.items()
                        if before is not None and (after := cpu[n]) is not None
                    }
                    # Includes warm-up time too; an approximation for the client's share.
                    cores["loadgen"] = round(
                        (self_after - self_before) / (sample["wall_s"] + args.warmup),
                        2,
                    )
                    sample.update(run=run, target=target, concurrency=c, cpu_cores=cores)
                    samples.append(sample)
                    print(
                        f"[{len(samples)}/{total}] {scenario.name} run {run} c={c:<3} "
                        f"{target:<8} {sample['rps']:8.1f} req/s  p50 {fmt(sample['p50_ms'])} "
                        f"ms  p99 {fmt(sample['p99_ms'])} ms  errors {sample['errors']}",
                        file=sys.stderr,
                        flush=True,
                    )

    summary = summarize_chat(samples, concurrencies, latencies)
    low, high = min(concurrencies), max(concurrencies)
    headline: dict[str, Any] = {
        "latency_concurrency": low,
        "added_p50_ms": summary[str(low)]["added_ms"]["p50"],
        "added_p99_ms": summary[str(low)]["added_ms"]["p99"],
        "throughput_concurrency": high if high > low else None,
        "throughput_pct": summary[str(high)]["throughput_pct"] if high > low else None,
    }
    if "floor" in measured:
        headline.update(
            added_vs_floor_p50_ms=summary[str(low)]["added_vs_floor_ms"]["p50"],
            added_vs_floor_p99_ms=summary[str(low)]["added_vs_floor_ms"]["p99"],
            throughput_pct_of_floor=(
                summary[str(high)]["throughput_pct_of_floor"] if high > low else None
            ),
            # CPU per request where the most requests were measured (saturation).
            cpu_concurrency=high,
            sidecar_cpu_vs_floor=summary[str(high)]["cpu_vs_floor"]["sidecar"],
            envoy_cpu_vs_floor=summary[str(high)]["cpu_vs_floor"]["envoy"],
        )
    result = {
        "scenario": {
            "name": scenario.name,
            "label": scenario.label,
            "headline": scenario.is_headline,
            "quota": scenario.quota,
            "guards": scenario.guards,
            "failover": scenario.failover,
            "failover_fault": scenario.failover_fault if scenario.failover else None,
            "workers": scenario.workers,
        },
        "settings": {
            "scenario": {"name": scenario.name, "label": scenario.label},
            "runs": args.runs,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": concurrencies,
            "envoy_concurrency": args.envoy_concurrency,
            "envoy_workers_reported": workers,
            "targets": measured,
            "floor": targets.floor_settings or None,
            "quota_limits": QUOTA_LIMITS if scenario.quota != "none" else None,
            "local_guards": LOCAL_GUARDS if scenario.guards else None,
            "payload": PAYLOAD,
            "fake_llm": {
                "ttft_ms": 0,
                "tokens_per_second": 0,
                "response_tokens": RESPONSE_TOKENS,
            },
            "tiktoken_cache_dir": os.environ.get("TIKTOKEN_CACHE_DIR"),
        },
        "preflight_headers": preflight_headers,
        "ext_proc_counters_after_preflight": counters,
        "gateway_headers": preflight_headers["gateway"],
        "headline": headline,
        "summary": summary,
        "samples": samples,
        "errors_total": sum(s["errors"] for s in samples),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    return Outcome(result=result, latencies=latencies)
