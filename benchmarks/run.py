"""Gateway overhead against an Envoy-only baseline, measured side by side in one run.

`python -m benchmarks.run` (or `make bench`) starts, in this one process tree:

- one fake LLM (no time to first token, no pacing, a few response tokens);
- the *baseline*: an Envoy whose bootstrap is the gateway's own (`envoy_config.bootstrap`) with
  the ext_proc pieces taken out (no ext_proc HTTP filter, no upstream ext_proc filter in the
  backend cluster, no sidecar cluster, one route from `/v1/` straight to the fake's cluster);
- the *gateway*: `extproc.supervisor.Stack` (sidecar + Envoy) in front of the same fake.

Then it drives them with wrk (or, with `--generator python` or without wrk, a small asyncio
client; the pre-flight requests are always Python's), alternating them for every
concurrency of every run, and reports medians over runs: a markdown table on stdout, and JSON,
markdown and PNG plots in benchmarks/results/. Flags pick what the gateway runs (`--quota`,
`--guards`, `--failover`, `--workers`, `--provider`, `--native`) and the API the load speaks to
it (`--client`: Envoy alone is always sent OpenAI's chat request); `--suite full` runs every
scenario and the streaming benchmark and writes one combined report with the performance budget
(benchmarks/suite.py). The machinery is in `benchmarks.lib`. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import signal
import sys

from benchmarks.lib import budget, wrk
from benchmarks.lib.argtypes import int_list, positive_float, positive_int
from benchmarks.lib.chat_scenario import run_scenario
from benchmarks.lib.configs import CLIENTS, FAILOVER_FAULTS, PROVIDERS, QUOTA_STORES, Scenario
from benchmarks.lib.report import chat_markdown, chat_report
from benchmarks.lib.results import envelope, stem_for, write_plots, write_result
from benchmarks.lib.runtime import raise_interrupt
from benchmarks.suite import run_suite

DEFAULT_CONCURRENCY = [1, 4, 16]
GENERATORS = ("wrk", "python")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=positive_float, default=5.0, help="seconds per measurement")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each measurement")
    p.add_argument("--runs", type=positive_int, default=3, help="baseline/gateway pairs")
    p.add_argument(
        "--concurrency",
        type=int_list,
        default=DEFAULT_CONCURRENCY,
        help="client concurrencies (default 1,4,16)",
    )
    p.add_argument(
        "--envoy-concurrency", type=positive_int, default=1, help="Envoy worker threads (both)"
    )
    p.add_argument(
        "--quota",
        choices=QUOTA_STORES,
        default="memory",
        help="the team's limits and their store (default memory: the embedded store)",
    )
    p.add_argument(
        "--guards", action="store_true", help="the gateway runs the local guard pipeline too"
    )
    p.add_argument(
        "--failover",
        action="store_true",
        help="a pooled model whose priority-0 backend fails every request (retried on 1)",
    )
    p.add_argument(
        "--failover-fault",
        choices=FAILOVER_FAULTS,
        default="429",
        help="what the failing backend answers (default 429; see the README on 503)",
    )
    p.add_argument(
        "--workers", type=positive_int, default=1, help="sidecar worker processes (sidecar.workers)"
    )
    p.add_argument(
        "--provider",
        choices=PROVIDERS,
        default="openai",
        help="the API the backend speaks: another than OpenAI's is translated by the sidecar",
    )
    p.add_argument(
        "--client",
        choices=CLIENTS,
        default="openai",
        help="the API the load speaks to the gateway: anthropic (Messages) or responses (OpenAI's "
        "Responses) are translated to chat completions by the sidecar; Envoy alone is always "
        "sent OpenAI's chat request (default openai)",
    )
    p.add_argument(
        "--native",
        action="store_true",
        help="the native path: a JWT caller whose team has no limit, served by Envoy alone",
    )
    p.add_argument(
        "--suite",
        choices=("full",),
        help="every scenario, then the streaming benchmark: one combined report with the budget",
    )
    p.add_argument(
        "--generator",
        choices=GENERATORS,
        help="the chat load generator: wrk (the default when it is installed) or python (the "
        "aiohttp client; the default otherwise, with a warning in the report)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 run of 2 s per measurement")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and process logs")
    args = p.parse_args(argv)
    if args.workers > 1 and args.quota == "memory":
        p.error(
            "--workers > 1 needs --quota redis or --quota none: each worker would keep its own "
            "embedded counters (extproc check refuses that config)"
        )
    if args.suite and (
        args.guards
        or args.failover
        or args.native
        or args.provider != "openai"
        or args.client != "openai"
    ):
        p.error(
            "--suite full runs the guards, failover, native, provider and client scenarios itself"
        )
    if args.provider != "openai" and (args.native or args.failover):
        p.error("--provider: a translated backend serves neither the native path nor a pool")
    if args.client != "openai" and args.native:
        p.error(
            "--client with --native: on the native path Envoy serves OpenAI's chat requests "
            "alone; another client API needs the sidecar's translation"
        )
    if args.client != "openai" and args.provider != "openai":
        p.error(
            "--client with --provider: measure one translation at a time (the client's API is "
            "translated to chat completions for an OpenAI backend)"
        )
    if args.native and (args.guards or args.failover or args.quota != "memory"):
        p.error("--native: a team with no limit and no guard (no --guards, --failover, --quota)")
    args.generator_warning = None
    if args.generator is None:
        args.generator = "wrk" if wrk.binary() is not None else "python"
        if args.generator == "python":
            args.generator_warning = (
                "wrk is not installed (`make bench` installs Debian's package): the chat load "
                "came from the Python client, which caps Envoy alone's throughput"
            )
            print(f"warning: {args.generator_warning}", file=sys.stderr)
    elif args.generator == "wrk" and wrk.binary() is None:
        p.error("--generator wrk: wrk is not installed (`make bench` installs Debian's package)")
    if args.quick:
        args.runs, args.duration, args.warmup = 1, 2.0, min(args.warmup, 0.5)
    return args


def scenario_of(args: argparse.Namespace) -> Scenario:
    return Scenario(
        quota="none" if args.native else args.quota,
        guards=args.guards,
        failover=args.failover,
        failover_fault=args.failover_fault,
        workers=args.workers,
        native=args.native,
        provider=args.provider,
        client=args.client,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)  # same clean-up as Ctrl-C
    if args.suite == "full":
        return run_suite(args, argv)
    try:
        outcome = run_scenario(args, scenario_of(args), args.concurrency)
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    now = dt.datetime.now(dt.UTC)
    result = {**envelope(args, argv, now), **outcome.result}
    stem = stem_for(now)
    result["plots"] = write_plots(stem, [(outcome, "")])
    if result["scenario"]["headline"]:
        result["budget"] = budget.chat_rows(result)
    else:
        result["budget"] = budget.native_rows(result) if args.native else []
    out = write_result(stem, result, chat_report(result))
    print(chat_markdown(result))
    if result["budget"]:
        print("\n" + budget.markdown(result["budget"]))
    print(
        f"\nresult: {out}, report {stem.name}.md, plots {', '.join(result['plots'].values())}",
        file=sys.stderr,
    )
    return 1 if result["errors_total"] else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
