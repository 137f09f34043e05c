"""Streaming cost of the gateway against Envoy alone and against the floor, side by side.

`python -m benchmarks.streaming` starts the same process tree as `benchmarks.run` (one fake LLM,
an Envoy-only baseline derived from the gateway's bootstrap, the floor: the gateway's own Envoy
config in front of a do-nothing Python ext_proc server, and the gateway via
`extproc.supervisor.Stack`, all on free loopback ports) and measures, alternating within every
run Envoy alone and, for each of two client requests, the floor then the gateway:

- *inline* (variant key kept from the results before): the client did not ask for usage.
  With `--stream-path auto` (the gateway's `sidecar.stream_path`, the product's default) the
  stream is relayed inline: the sidecar asks the backend for its usage report, the response
  body switches to ext_proc STREAMED mode, every chunk waits for the sidecar, which cuts the
  report out again.
- *observed* (key kept too): the client asked for usage (`stream_options.include_usage`).
  With `auto`, one backend (the benchmark's), the sidecar releases the request with its body:
  no sidecar stage follows the stream; Envoy's `extproc.stream_usage` filter reads the usage
  report as it passes and the access log brings it back. Nothing is observed.
- `--stream-path observe`: the stream observer follows every stream (both requests are
  released with their body and observed; Envoy holds no chunk back): the client that asked
  for usage is accounted from the backend's report, the other from the observer's own count.

The floor server answers each stream as the sidecar's stage does on that path, doing no work
(benchmarks/lib/floor.py). Measured:

1. added time to first token: streaming chat requests at concurrency 1, the fake pacing 20
   tokens at 100 tokens/s with no time to first token; client-side time from sending the request
   to the first event carrying a content delta, p50 and p99 over N streams; against Envoy
   alone and against the floor of the same request;
2. added per-chunk latency: for the same streams, response headers to the first content delta
   (one chunk's trip), and the gaps between successive deltas against the fake's pacing
   (10 ms), p50 and p99;
3. memory per concurrent stream: K slow streams (1 token/s, 21 tokens: 20 s each) held open
   at once, in a fresh process tree per K and variant (Envoy alone and the gateway; not the
   floor); the RSS of the sidecar and of Envoy once every stream has received its first chunk
   (or the ramp stalls on a limit), against the RSS before they opened, per stream live at
   that moment; the Envoy circuit-breaker overflows it caused; and the CPU each process spends
   per chunk while the K streams flow.

The gateway's team has quota limits that never reject (`--quota`, default the embedded store),
as in `benchmarks.run`. Medians over runs; a markdown table on stdout, the full result as JSON
in `benchmarks/results/streaming-<UTC timestamp>.json` and a markdown report (with the
streaming figures of the performance budget) beside it. `benchmarks.run --suite full` calls
`benchmarks.lib.stream_scenario.measure_streaming()` and puts the result into its combined
report instead. The machinery is in `benchmarks.lib`. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import signal
import sys

from benchmarks.lib import budget
from benchmarks.lib.argtypes import int_list, positive_float, positive_int
from benchmarks.lib.configs import QUOTA_STORES, STREAM_PATHS
from benchmarks.lib.report import streaming_markdown, streaming_report
from benchmarks.lib.results import stem_for, write_result
from benchmarks.lib.runtime import cancel_or_interrupt
from benchmarks.lib.stream_scenario import measure_streaming


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.streaming", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--runs", type=positive_int, default=3, help="runs of Envoy alone, the floors, the gateway"
    )
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
        help="the client request(s) whose memory through the gateway is measured: without "
        "usage asked (inline) or with it (observed)",
    )
    p.add_argument("--settle", type=float, default=1.0, help="seconds before sampling RSS")
    p.add_argument(
        "--quota",
        choices=QUOTA_STORES,
        default="memory",
        help="the team's limits and their store, as benchmarks.run (default memory)",
    )
    p.add_argument(
        "--stream-path",
        choices=STREAM_PATHS,
        default="auto",
        help="the gateway's sidecar.stream_path (default auto, the product's): with auto a "
        "stream whose client asked for usage is released (Envoy reads the usage), the other "
        "is relayed inline; with observe the stream observer follows every stream",
    )
    p.add_argument(
        "--envoy-concurrency",
        type=positive_int,
        default=1,
        help="Envoy worker threads (every Envoy)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 run, 30 streams, K=200")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and process logs")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.latency_streams, args.warmup_streams = 1, 30, 2
        args.streams, args.slow_tokens = [200], 15
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, cancel_or_interrupt)  # same clean-up as Ctrl-C
    code, result = measure_streaming(args, argv)
    if result is None:
        return code
    stem = stem_for(dt.datetime.fromisoformat(result["timestamp"]), "streaming-")
    result["budget"] = budget.streaming_rows(result)
    out = write_result(stem, result, streaming_report(result))
    print(streaming_markdown(result))
    print("\n" + budget.markdown(result["budget"]))
    print(f"\nresult: {out}, report {stem.name}.md ({result['elapsed_s']} s)", file=sys.stderr)
    return code


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
