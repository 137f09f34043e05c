"""One chat scenario measured: its process tree started, Envoy alone, the floor (the gateway's
Envoy config with a do-nothing ext_proc server) and the gateway alternated for every
concurrency of every run, the samples summarized, everything stopped.

`args` are the options of `python -m benchmarks.run` (runs, duration, warmup,
envoy_concurrency, keep_workdir); the suite passes its own.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
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
    ChatRequest,
    check_preflight,
    describe,
    measure,
    preflight,
    request_for,
)
from benchmarks.lib.configs import CHAT_TARGETS, LOCAL_GUARDS, QUOTA_LIMITS, Scenario
from benchmarks.lib.procstat import children_cpu_seconds, cpu_seconds, self_cpu_seconds
from benchmarks.lib.report import fmt
from benchmarks.lib.runtime import loop_factory
from benchmarks.lib.stack import Targets, envoy_workers, ext_proc_counters, started
from benchmarks.lib.stats import summarize_chat
from benchmarks.lib.wrk import Wrk

PYTHON_CAVEAT = (
    "the Python client spends ~0.1 ms of CPU per request on the cores it shares with the "
    "targets: it caps Envoy alone below what Envoy serves and so flatters every ratio "
    "against Envoy alone at saturation (benchmarks/README.md)"
)


def loadgen_cpu_seconds() -> float:
    """CPU time of the load generator so far: this process and its waited-for children."""
    return self_cpu_seconds() + children_cpu_seconds()


def cpu_now(pids: dict[str, int], tree: dict[str, bool]) -> dict[str, float | None]:
    """CPU time so far of every process measured, and of the load generator ("loadgen": this
    process and the children it waited for, i.e. the wrk runs)."""
    cpu = {n: cpu_seconds(pid, tree[n]) for n, pid in pids.items()}
    cpu["loadgen"] = loadgen_cpu_seconds()
    return cpu


def _record_cpu(into: dict[str, float | None], pids: dict[str, int], tree: dict[str, bool]) -> None:
    into.update(cpu_now(pids, tree))


def generator_settings(args: argparse.Namespace, generator: Wrk | None) -> dict[str, Any]:
    """Which load generator drove the chat load, for the result and every report's header."""
    if generator is not None:
        found = generator.settings()
    else:
        found = {"name": "python", "client": describe(), "caveat": PYTHON_CAVEAT}
    warning = getattr(args, "generator_warning", None)
    return {**found, "warning": warning} if warning else found


def requests_of(scenario: Scenario) -> dict[str, ChatRequest]:
    """What each target is sent: the scenario's client API to the gateway (and the floor), and
    always OpenAI's chat request to Envoy alone, which translates nothing: with another client
    API the comparison includes what the translation costs."""
    return {
        target: request_for("openai" if target == "baseline" else scenario.client, scenario.bearer)
        for target in CHAT_TARGETS
    }


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
            # The native path's floor is Envoy alone: no Python on the request's path. A
            # translated backend or client has none: the floor server translates nothing.
            floor=(
                not scenario.native
                and scenario.provider == "openai"
                and scenario.client == "openai"
            ),
        ) as targets:
            requests = requests_of(scenario)
            generator = (
                Wrk(workdir, {r.api: r for r in requests.values()}.values())
                if args.generator == "wrk"
                else None
            )
            outcome = measure_scenario(
                args, scenario, concurrencies, targets, started_at, generator
            )
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
    generator: Wrk | None = None,
) -> Outcome:
    """Measure `scenario` on running `targets`: a pre-flight per target, then for every run and
    concurrency Envoy alone, the floor and the gateway back to back. `started`: when the
    scenario began (time.monotonic()), for its elapsed time. `generator`: wrk, or None for the
    Python client (the pre-flight is always the Python client's)."""
    measured = [t for t in CHAT_TARGETS if t in targets.urls]
    workers = {t: envoy_workers(targets.admins[t]) for t in measured}
    if len(set(workers.values())) != 1:
        raise RuntimeError(f"Envoy worker counts differ: {workers}")
    urls = targets.urls
    requests = requests_of(scenario)
    pids = {t: {**targets.pids(t), "fake-llm": targets.fake.pid} for t in measured}
    samples: list[dict[str, Any]] = []
    latencies: dict[tuple[int, str], list[float]] = {}
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        preflight_headers = {
            target: runner.run(preflight(urls[target], time.monotonic() + 20, requests[target]))
            for target in measured
        }
        check_preflight(scenario, preflight_headers)
        talking = [t for t in measured if t != "baseline"]
        counters = {t: ext_proc_counters(targets.admins[t]) for t in talking}
        if "floor" in counters and not (counters["floor"] or {}).get("streams"):
            raise RuntimeError(f"the floor's Envoy opened no ext_proc stream: {counters}")
        if scenario.native and (counters["gateway"] or {}).get("streams"):
            raise RuntimeError(f"the native path opened ext_proc streams: {counters}")
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
                    # The CPU window opens after the warm-up, right before the measurement.
                    cpu_before: dict[str, float | None] = {}
                    mark = functools.partial(_record_cpu, cpu_before, pids[target], tree)
                    keep = latencies.setdefault((c, target), [])
                    if generator is not None:
                        sample = generator.measure(
                            urls[target],
                            c,
                            args.warmup,
                            args.duration,
                            keep,
                            mark,
                            requests[target],
                        )
                    else:
                        sample = runner.run(
                            measure(
                                urls[target],
                                c,
                                args.warmup,
                                args.duration,
                                keep,
                                mark,
                                requests[target],
                            )
                        )
                    cpu = cpu_now(pids[target], tree)
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
        "generator": generator_settings(args, generator),
        "scenario": {
            "name": scenario.name,
            "label": scenario.label,
            "headline": scenario.is_headline,
            "quota": scenario.quota,
            "guards": scenario.guards,
            "failover": scenario.failover,
            "failover_fault": scenario.failover_fault if scenario.failover else None,
            "workers": scenario.workers,
            "native": scenario.native,
            "provider": scenario.provider,
            "client": scenario.client,
        },
        "settings": {
            "scenario": {"name": scenario.name, "label": scenario.label},
            "runs": args.runs,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": concurrencies,
            "envoy_concurrency": args.envoy_concurrency,
            "generator": args.generator,
            "envoy_workers_reported": workers,
            "targets": measured,
            "floor": targets.floor_settings or None,
            "quota_limits": QUOTA_LIMITS if scenario.quota != "none" else None,
            "local_guards": LOCAL_GUARDS if scenario.guards else None,
            "payload": PAYLOAD,
            # What each target was sent, when not all the same request (`--client`).
            "requests": (
                {
                    t: {"api": r.api, "path": r.path, "body": json.loads(r.body)}
                    for t, r in requests.items()
                    if t in measured
                }
                if scenario.client != "openai"
                else None
            ),
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
