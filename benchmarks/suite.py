"""`python -m benchmarks.run --suite full`: every scenario, one combined report with the budget.

In order, each in its own fresh process tree and against its own Envoy-only baseline:

1. the headline: non-streaming chat with auth, token counting and the quota (`--quota`,
   default the embedded store) over the whole concurrency sweep (`--concurrency`, 1,4,16);
2. the variants, at the sweep's lowest and highest concurrency: the quota on Redis, the local
   guard pipeline, the failover path, the native path, a backend of each other provider's API,
   a client of each other client API (each the headline plus that one change);
3. `benchmarks.quota_store`: the quota's reserve + settle alone, embedded store vs Redis;
4. `benchmarks.streaming`: time to first token and per-chunk latency of a stream whose client
   did not ask for usage and of one whose client did (each through Envoy alone, the floor and
   the gateway, with the gateway's default `sidecar.stream_path: auto`), then 5,000 concurrent
   slow streams through the gateway (memory and CPU per chunk).

Then one JSON, one markdown report and the plots, all named `suite-<UTC timestamp>` in
benchmarks/results/. A scenario that fails (a process that does not start) is reported and
the suite goes on with the next one; the exit code is then 1, as for any request that failed.
The machinery is in `benchmarks.lib`; this module says what the suite runs and in what order.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import signal
import sys
import time
from typing import Any

from benchmarks import quota_store, streaming
from benchmarks.lib import budget
from benchmarks.lib.chat_scenario import Outcome, run_scenario
from benchmarks.lib.configs import CHAT_TARGETS, Scenario
from benchmarks.lib.quota_store import collect as collect_quota_store
from benchmarks.lib.quota_store import markdown as quota_store_markdown
from benchmarks.lib.report import suite_report
from benchmarks.lib.results import envelope, stem_for, write_plots, write_result
from benchmarks.lib.runtime import cancel_or_interrupt
from benchmarks.lib.stack import redis_binary
from benchmarks.lib.stream_scenario import measure_streaming

# The streaming part of a full suite: the defaults of benchmarks.streaming, trimmed to keep
# the whole suite near 17 minutes on the 2-core machine. Streams of 10 tokens instead of 20
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
    native = dataclasses.replace(headline, quota="none", native=True)
    steps.append(("native path", native, ends))
    for provider, title in (
        ("anthropic", "Anthropic backend"),
        ("bedrock", "Bedrock backend"),
        ("gemini", "Gemini backend"),
        ("azure", "Azure OpenAI deployment"),
    ):
        steps.append((title, dataclasses.replace(headline, provider=provider), ends))
    for client, title in (
        ("anthropic", "Anthropic Messages client"),
        ("responses", "Responses API client"),
    ):
        steps.append((title, dataclasses.replace(headline, client=client), ends))
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

    def targets(scenario: Scenario) -> int:  # Envoy alone, the floor (not all), the gateway
        no_floor = scenario.native or scenario.provider != "openai" or scenario.client != "openai"
        return len(CHAT_TARGETS) - (1 if no_floor else 0)

    chat = sum(args.runs * len(cs) * targets(s) * per_measurement + 10 for _, s, cs in steps)
    chat += 15  # the quota store alone
    if args.quick:
        return chat + 90
    # 5 variants (Envoy alone, 2 floors, 2 gateway paths) x runs x 205 streams of ~0.11 s,
    # then 2 memory phases of ~55 s.
    return chat + args.runs * 5 * 205 * 0.11 + 2 * 55


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
        signal.signal(signal.SIGTERM, cancel_or_interrupt)  # the streaming clean-up, as it runs
        stream_result: dict[str, Any] | None = None
        try:
            code, stream_result = measure_streaming(streaming.parse_args(stream_args), stream_args)
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
    native = next((o for t, o in outcomes if t == "native path"), None)
    rows += (
        budget.native_rows(native.result)
        if native is not None
        else budget.unmeasured("native", "the native path scenario failed")
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
        generator=next((o.result["generator"] for _, o in outcomes), None),
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
    text = suite_report(result, [(t, o.result) for t, o in outcomes])
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
        medians = collect_quota_store(qs_args)
    except (SystemExit, RuntimeError, OSError) as exc:
        notes.append(f"**the quota store benchmark failed**: {exc}")
        return None
    return {
        "requests": qs_args.requests,
        "runs": qs_args.runs,
        "concurrency": qs_args.concurrency,
        "us_per_request": medians,
        "markdown": quota_store_markdown(qs_args, medians),
    }
