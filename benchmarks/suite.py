"""`python -m benchmarks.run --suite full`: every scenario, one combined report with the budget.

In order, each in its own fresh process tree and against its own Envoy-only baseline:

1. the headline: non-streaming chat with auth, token counting and the quota (`--quota`,
   default the embedded store) over the whole concurrency sweep (`--concurrency`, 1,4,16);
2. the variants, at the sweep's lowest and highest concurrency: the quota on Redis, the local
   guard pipeline, the failover path (each the headline plus that one change);
3. `benchmarks.quota_store`: the quota's reserve + settle alone, embedded store vs Redis;
4. `benchmarks.streaming`: time to first token and per-chunk latency on both stream paths,
   then 5,000 concurrent slow streams through the gateway (memory and CPU per chunk).

Then one JSON, one markdown report and the plots, all named `suite-<UTC timestamp>` in
benchmarks/results/. A scenario that fails (a process that does not start) is reported and
the suite goes on with the next one; the exit code is then 1, as for any request that failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import signal
import sys
import time
from typing import Any

from benchmarks import budget, quota_store, streaming
from benchmarks.run import (
    Outcome,
    Scenario,
    _fmt,
    _retried,
    envelope,
    markdown,
    plot_links,
    redis_binary,
    report_header,
    run_scenario,
    stem_for,
    write_plots,
    write_result,
)

# The streaming part of a full suite: the defaults of benchmarks.streaming, trimmed to keep
# the whole suite near 12 minutes on the 2-core machine. Streams of 10 tokens instead of 20
# halve the latency part; time to first token and a chunk's trip do not depend on the length
# (9 gaps per stream still show the jitter). Only K=5000, the budget's figure, and only
# through the gateway: Envoy alone's memory is context, not a budget.
STREAMING_FULL = [
    "--latency-streams", "200", "--tokens", "10", "--streams", "5000",
    "--memory-targets", "gateway",
]  # fmt: skip
STREAMING_QUICK = ["--quick", "--memory-targets", "gateway"]


def plan(args: argparse.Namespace, notes: list[str]) -> list[tuple[str, Scenario, list[int]]]:
    """(title, scenario, concurrencies) in the order they run."""
    headline = Scenario(quota=args.quota, workers=args.workers)
    ends = sorted({min(args.concurrency), max(args.concurrency)})
    steps = [("headline", headline, args.concurrency)]
    if args.quota != "redis":
        if redis_binary() is not None:
            steps.append(("quota on Redis", dataclasses.replace(headline, quota="redis"), ends))
        else:
            notes.append(
                "redis-server is not installed (`make system-deps` installs it): the Redis "
                "quota scenario was skipped."
            )
    steps.append(("local guards", dataclasses.replace(headline, guards=True), ends))
    failover = dataclasses.replace(headline, failover=True, failover_fault=args.failover_fault)
    steps.append(("failover path", failover, ends))
    return steps


def streaming_argv(args: argparse.Namespace) -> list[str]:
    argv = list(STREAMING_QUICK if args.quick else STREAMING_FULL)
    if not args.quick:
        argv += ["--runs", str(args.runs)]
    argv += ["--quota", args.quota, "--envoy-concurrency", str(args.envoy_concurrency)]
    if args.keep_workdir:
        argv.append("--keep-workdir")
    return argv


def estimate_s(args: argparse.Namespace, steps: list[tuple[str, Scenario, list[int]]]) -> float:
    """A rough duration, printed at the start (start-up ~10 s per process tree)."""
    per_measurement = args.warmup + args.duration
    chat = sum(args.runs * len(cs) * 2 * per_measurement + 10 for _, _, cs in steps)
    chat += 15  # the quota store alone
    if args.quick:
        return chat + 75
    # 3 variants x runs x 205 streams of ~0.11 s, then 2 memory phases of ~55 s.
    return chat + args.runs * 3 * 205 * 0.11 + 2 * 55


def run_suite(args: argparse.Namespace, argv: list[str] | None) -> int:
    started_at = time.monotonic()
    notes: list[str] = []
    steps = plan(args, notes)
    print(
        f"suite: {len(steps)} chat scenario(s) then streaming, about "
        f"{estimate_s(args, steps) / 60:.0f} min",
        file=sys.stderr,
        flush=True,
    )
    outcomes: list[tuple[str, Outcome]] = []
    failed = 0
    try:
        for title, scenario, concurrencies in steps:
            print(f"== {title}: {scenario.label}", file=sys.stderr, flush=True)
            try:
                outcomes.append((title, run_scenario(args, scenario, concurrencies)))
            except (RuntimeError, TimeoutError, OSError) as exc:
                failed += 1
                notes.append(f"**{title} ({scenario.name}) failed**: {exc}")
                print(f"{title} failed: {exc}", file=sys.stderr, flush=True)

        quota_micro = measure_quota_store(args, notes)

        print("== streaming", file=sys.stderr, flush=True)
        stream_args = streaming_argv(args)
        signal.signal(signal.SIGTERM, streaming._on_sigterm)  # its clean-up, as it runs alone
        stream_result: dict[str, Any] | None = None
        try:
            code, stream_result = streaming.collect(streaming.parse_args(stream_args), stream_args)
        except (RuntimeError, TimeoutError, OSError) as exc:
            failed += 1
            notes.append(f"**streaming failed**: {exc}")
            print(f"streaming failed: {exc}", file=sys.stderr, flush=True)
        else:
            if stream_result is None:  # interrupted
                return code
            stream_result["argv"] = stream_args
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130

    now = dt.datetime.now(dt.UTC)
    result: dict[str, Any] = envelope(args, argv, now)
    stem = stem_for(now, "suite-")
    headline = next((o for t, o in outcomes if t == "headline"), None)
    rows = (
        budget.chat_rows(headline.result)
        if headline is not None
        else budget.unmeasured("chat", "the headline scenario failed")
    )
    rows += (
        budget.streaming_rows(stream_result)
        if stream_result is not None
        else budget.unmeasured("streaming", "the streaming benchmark failed")
    )
    if args.workers > 1:
        notes.append(
            f"The chat scenarios ran {args.workers} sidecar workers; the streaming benchmark "
            "runs one sidecar process (the budget's streams are per process)."
        )
    errors = sum(o.result["errors_total"] for _, o in outcomes)
    errors += stream_result["errors_total"] if stream_result is not None else 0
    result.update(
        suite="full",
        settings={
            "runs": args.runs,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "variant_concurrency": sorted({min(args.concurrency), max(args.concurrency)}),
            "envoy_concurrency": args.envoy_concurrency,
            "streaming_argv": stream_args,
        },
        budget=rows,
        scenarios={o.result["scenario"]["name"]: {"title": t, **o.result} for t, o in outcomes},
        quota_store=quota_micro,
        streaming=stream_result,
        notes=notes,
        errors_total=errors,
        failed_parts=failed,
        elapsed_s=round(time.monotonic() - started_at, 1),
    )
    result["plots"] = write_plots(stem, [(o, t) for t, o in outcomes]) if outcomes else {}
    text = report(result, outcomes)
    out = write_result(stem, result, text)
    print(text)
    print(
        f"\nresult: {out}, report {stem.name}.md, plots "
        f"{', '.join(result['plots'].values()) or 'none'} ({result['elapsed_s']} s)",
        file=sys.stderr,
    )
    return 1 if errors or failed else 0


def measure_quota_store(args: argparse.Namespace, notes: list[str]) -> dict[str, Any] | None:
    """The quota store alone, in this process (seconds): what one request's reserve + settle
    costs the sidecar's event loop, embedded vs Redis."""
    if redis_binary() is None:
        return None  # the note about the skipped Redis scenario says why
    print("== quota store alone", file=sys.stderr, flush=True)
    qs_args = quota_store.parse_args(
        ["--requests", "1000" if args.quick else "3000", "--runs", str(args.runs)]
    )
    try:
        medians = quota_store.collect(qs_args)
    except (SystemExit, RuntimeError, OSError) as exc:
        notes.append(f"**the quota store benchmark failed**: {exc}")
        return None
    return {
        "requests": qs_args.requests,
        "runs": qs_args.runs,
        "concurrency": qs_args.concurrency,
        "us_per_request": medians,
        "markdown": quota_store.markdown(qs_args, medians),
    }


def scenarios_table(outcomes: list[tuple[str, Outcome]]) -> list[str]:
    lines = [
        "| scenario | concurrency | Envoy alone (req/s) | gateway (req/s) | gateway / Envoy "
        "alone | added p50 (ms) | added p99 (ms) | retried (gateway) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for title, outcome in outcomes:
        for c, row in outcome.result["summary"].items():
            base, gw = row["baseline"], row["gateway"]
            lines.append(
                f"| {title} | {c} | {_fmt(base['rps'], 0)} | {_fmt(gw['rps'], 0)} | "
                f"{_fmt(row['throughput_pct'], 1)} % | "
                f"{_fmt(row['added_ms']['p50'], sign=True)} | "
                f"{_fmt(row['added_ms']['p99'], sign=True)} | "
                f"{_retried(gw) if gw.get('retried') else '0'} | "
                f"{base['errors'] + gw['errors']} |"
            )
    return lines


def report(result: dict[str, Any], outcomes: list[tuple[str, Outcome]]) -> str:
    s = result["settings"]
    lines = report_header(result, "Benchmark suite: the gateway against Envoy alone")
    lines += [
        "## Budget",
        "",
        f"Medians of {s['runs']} run(s) (the budget is defined for >= {budget.MIN_RUNS}); chat "
        f"at concurrency {min(s['concurrency'])} and, for throughput, {max(s['concurrency'])} "
        "(saturation on this machine).",
        "",
        budget.markdown(result["budget"]),
        "",
        "## Chat scenarios",
        "",
        "Each scenario against its own Envoy-only baseline (same routes, no ext_proc), measured "
        f"back to back; {s['duration_s']:g} s per measurement after {s['warmup_s']:g} s "
        "warm-up. Scenario details below.",
        "",
        *scenarios_table(outcomes),
        "",
        *plot_links(result["plots"]),
    ]
    for title, outcome in outcomes:
        lines += [
            f"### {title}: {outcome.result['scenario']['label']}",
            "",
            markdown({**outcome.result, "machine": result["machine"]}),
            "",
        ]
    if result["quota_store"] is not None:
        lines += [
            "## Quota store alone",
            "",
            "`python -m benchmarks.quota_store`: reserve against three limits, then settle, on "
            "one event loop in the benchmark process (the sidecar's client waits for the "
            "reserve only; the settlement runs off the response path).",
            "",
            result["quota_store"]["markdown"],
            "",
        ]
    if result["streaming"] is not None:
        lines += [
            "## Streaming",
            "",
            f"`python -m benchmarks.streaming {' '.join(result['settings']['streaming_argv'])}`",
            "",
            streaming.markdown(result["streaming"]),
            "",
        ]
    if result["notes"]:
        lines += ["## Notes", "", *(f"- {note}" for note in result["notes"]), ""]
    lines.append(f"Whole suite: {result['elapsed_s']:.0f} s.")
    return "\n".join(lines)
