"""The performance budget (issue "Benchmark harness and the performance budget"): each figure,
its measured value, the budget, pass or miss.

The budget holds on this 2-core machine, for medians of at least 3 runs, with auth, token
counting and the quota on its embedded store (the headline scenario of `benchmarks.run`):

- added latency at concurrency 1 over Envoy alone: p50 <= 0.6 ms, p99 <= 2 ms;
- throughput at saturation >= 50 % of Envoy alone's;
- streaming: added time to first token p50 <= 1 ms, added per-chunk latency p99 <= 0.3 ms;
- 5,000 concurrent streams per sidecar process with its RSS growing <= 200 MB;
- against the floor (the same Envoy config with a do-nothing Python ext_proc server, issue 16):
  strict path throughput at saturation >= 90 % of the floor's, sidecar CPU per request
  <= 1.3x the floor server's, the gateway's Envoy CPU per request <= 1.5x the floor's Envoy;
- the native path (`benchmarks.run --native`: a JWT caller of a team with no limit, served by
  Envoy alone): added latency p50 at concurrency 1 <= 0.3 ms, throughput at saturation >= 70 %
  of Envoy alone's.

A figure that was not measured the way the budget defines it (fewer runs, another scenario,
fewer streams) still gets its verdict, with a note saying what differs; a figure that could
not be measured at all is "n/a".

The streaming figures are per client request: *inline* (the client did not ask for usage) and
*observed* (it asked for usage), keys kept from when the second one was the stream observer's
path. Which path each takes depends on the gateway's `sidecar.stream_path` (configs.
STREAM_PATH_OF): with `auto` (the default) the first is relayed inline and the second released
(Envoy reads its usage report, no sidecar stage follows it); with `observe` the observer
follows both. Each row names the path it measured.

Rows for information only (verdict "info", no budget, not counted as pass or miss): the
streaming time to first token against the floor of the same request (issue 16: every
streaming figure against Envoy alone and against the floor, in the same run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.lib.configs import STREAM_CLIENT, STREAM_PATH_OF

MIN_RUNS = 3
BUDGET_STREAMS = 5000
# The streaming rows' suffixes: the variant keys (configs.STREAM_VARIANTS).
STREAM_PATHS = ("inline", "observed")
INFO = "info"  # the verdict of a row for information only


def stream_path_text(variant: str, stream_path: str = "auto") -> str:
    """A streaming row's client request and the path it took: "usage asked: released"."""
    return f"{STREAM_CLIENT[variant]}: {STREAM_PATH_OF[stream_path][variant]}"


@dataclass(frozen=True)
class Budget:
    key: str
    figure: str
    limit: float
    unit: str
    at_least: bool = False  # the value must be >= limit (throughput), else <= limit

    def text(self) -> str:
        if self.unit == "x":
            return f"{'>=' if self.at_least else '<='} x{self.limit:g}"
        return f"{'>=' if self.at_least else '<='} {self.limit:g} {self.unit}"

    def verdict(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        ok = value >= self.limit if self.at_least else value <= self.limit
        return "pass" if ok else "miss"


ADDED_P50 = Budget("added_p50_ms", "added latency p50 at concurrency 1", 0.6, "ms")
ADDED_P99 = Budget("added_p99_ms", "added latency p99 at concurrency 1", 2.0, "ms")
THROUGHPUT = Budget(
    "throughput_pct", "throughput at saturation, % of Envoy alone", 50.0, "%", at_least=True
)
FLOOR_THROUGHPUT = Budget(
    "throughput_pct_of_floor",
    "strict path: throughput at saturation, % of the floor's",
    90.0,
    "%",
    at_least=True,
)
SIDECAR_CPU = Budget(
    "sidecar_cpu_vs_floor", "sidecar CPU per request, vs the floor server's", 1.3, "x"
)
ENVOY_CPU = Budget(
    "envoy_cpu_vs_floor", "gateway's Envoy CPU per request, vs the floor's Envoy", 1.5, "x"
)
NATIVE_P50 = Budget(
    "native_added_p50_ms", "native path: added latency p50 at concurrency 1", 0.3, "ms"
)
NATIVE_THROUGHPUT = Budget(
    "native_throughput_pct",
    "native path: throughput at saturation, % of Envoy alone",
    70.0,
    "%",
    at_least=True,
)
TTFT_P50 = Budget("stream_added_ttft_p50_ms", "streaming: added time to first token p50", 1.0, "ms")
CHUNK_P99 = Budget("stream_added_chunk_p99_ms", "streaming: added per-chunk latency p99", 0.3, "ms")
RSS_5000 = Budget(
    "stream_sidecar_rss_growth_mb",
    f"{BUDGET_STREAMS:,} concurrent streams: sidecar RSS growth",
    200.0,
    "MB",
)


@dataclass(frozen=True)
class Info:
    """A figure reported beside the budget, for information: no limit, no verdict."""

    key: str
    figure: str
    unit: str


TTFT_P50_VS_FLOOR = Info(
    "stream_added_ttft_p50_vs_floor_ms",
    "streaming: added time to first token p50 vs the floor",
    "ms",
)


def _row(
    figure: Budget | Info,
    value: float | None,
    notes: list[str],
    suffix: str = "",
    stream_path: str = "",
) -> dict:
    """A budget row, or (an Info) a row for information only: no budget, no verdict."""
    return {
        "key": figure.key + (f".{suffix}" if suffix else ""),
        "figure": figure.figure + _path_text(suffix, stream_path),
        "measured": value,
        "unit": figure.unit,
        "budget": figure.text() if isinstance(figure, Budget) else "none",
        "limit": figure.limit if isinstance(figure, Budget) else None,
        "verdict": figure.verdict(value) if isinstance(figure, Budget) else INFO,
        "notes": notes,
    }


def _path_text(suffix: str, stream_path: str) -> str:
    if not suffix:
        return ""
    return f" ({stream_path_text(suffix, stream_path or 'auto')})"


def _runs_notes(result: dict[str, Any]) -> list[str]:
    runs = result["settings"]["runs"]
    return [] if runs >= MIN_RUNS else [f"{runs} run(s), the budget wants medians of >= {MIN_RUNS}"]


def chat_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The non-streaming figures of a `benchmarks.run` result (its headline)."""
    headline = result["headline"]
    common = _runs_notes(result)
    if not result["scenario"]["headline"]:
        common.append(f"measured with {result['scenario']['label']}")
    rows = []
    low = headline["latency_concurrency"]
    at = [] if low == 1 else [f"measured at concurrency {low}"]
    rows.append(_row(ADDED_P50, headline["added_p50_ms"], common + at))
    rows.append(_row(ADDED_P99, headline["added_p99_ms"], common + at))
    high = headline.get("throughput_concurrency")
    notes = list(common)
    if high is None:
        notes.append("one concurrency only: no saturation measured")
    else:
        notes.append(f"concurrency {high}")
    rows.append(_row(THROUGHPUT, headline.get("throughput_pct"), notes))
    if "throughput_pct_of_floor" not in headline:
        reason = "no floor measured"
        return rows + [_row(b, None, [reason]) for b in (FLOOR_THROUGHPUT, SIDECAR_CPU, ENVOY_CPU)]
    rows.append(_row(FLOOR_THROUGHPUT, headline.get("throughput_pct_of_floor"), notes))
    cpu_notes = [*common, f"concurrency {headline['cpu_concurrency']}, CPU time / requests"]
    rows.append(_row(SIDECAR_CPU, headline.get("sidecar_cpu_vs_floor"), cpu_notes))
    rows.append(_row(ENVOY_CPU, headline.get("envoy_cpu_vs_floor"), list(cpu_notes)))
    return rows


def native_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The native path's figures of a `benchmarks.run --native` result: against Envoy alone,
    which is its floor (no Python on the request's path)."""
    headline = result["headline"]
    notes = _runs_notes(result)
    low = headline["latency_concurrency"]
    at = [] if low == 1 else [f"measured at concurrency {low}"]
    high = headline.get("throughput_concurrency")
    saturation = [f"concurrency {high}"] if high else ["one concurrency only: no saturation"]
    return [
        _row(NATIVE_P50, headline["added_p50_ms"], notes + at),
        _row(NATIVE_THROUGHPUT, headline.get("throughput_pct"), notes + saturation),
    ]


def streaming_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The streaming figures of a `benchmarks.streaming` result, per client request (and the
    path it took), then the informational rows against the floor."""
    latency = result["latency"]
    common = _runs_notes(result)
    settings = result["settings"]
    quota = settings.get("quota", "none")
    if quota != "memory":
        common.append(f"quota {quota}")
    stream_path = settings.get("stream_path", "auto")
    if stream_path != "auto":
        common.append(f"sidecar.stream_path: {stream_path}")
    rows = []
    for path in STREAM_PATHS:
        added = latency["added_ms"].get(path, {})
        rows.append(_row(TTFT_P50, added.get("ttft_p50"), list(common), path, stream_path))
    for path in STREAM_PATHS:
        added = latency["added_ms"].get(path, {})
        # One chunk's trip alone: response headers to the first content delta.
        notes = [*common, "response headers to first token"]
        value = added.get("first_after_headers_p99")
        rows.append(_row(CHUNK_P99, value, notes, path, stream_path))
    for path in STREAM_PATHS:
        measured = [m for m in result["memory"] if m["target"] == path and "sidecar" in m["rss"]]
        if not measured:
            rows.append(_row(RSS_5000, None, ["not measured"], path, stream_path))
            continue
        m = max(measured, key=lambda x: x["k"])
        sidecar = m["rss"]["sidecar"]
        notes = []
        value = sidecar["growth_mb"]
        if m["live_at_sample"] < BUDGET_STREAMS:
            # Not the figure the budget names; the growth per stream says where it is heading.
            per_stream = sidecar.get("kb_per_stream")
            estimate = (
                f"; {per_stream:.1f} KB/stream would make ~{per_stream * BUDGET_STREAMS / 1024:.0f}"
                f" MB at {BUDGET_STREAMS:,}"
                if per_stream is not None
                else ""
            )
            if m["k"] < BUDGET_STREAMS:
                where = f"measured at K={m['k']:,} only"
            else:
                where = f"only {m['live_at_sample']:,} of K={m['k']:,} streams live at the sample"
            notes.append(f"{where}: growth {value:+.1f} MB{estimate}")
            value = None
        else:
            notes.append(f"K={m['k']:,}, {m['live_at_sample']:,} live")
        rows.append(_row(RSS_5000, value, notes, path, stream_path))
    for path in STREAM_PATHS:
        vs_floor = latency.get("added_vs_floor_ms", {}).get(path)
        notes = [*common, "gateway - the floor, same client request"]
        if vs_floor is None:
            notes = ["no floor measured"]
        value = vs_floor.get("ttft_p50") if vs_floor else None
        rows.append(_row(TTFT_P50_VS_FLOOR, value, notes, path, stream_path))
    return rows


def unmeasured(part: str, reason: str) -> list[dict[str, Any]]:
    """The rows of a part (`chat` or `streaming`) that could not be measured at all."""
    if part == "chat":
        chat = (ADDED_P50, ADDED_P99, THROUGHPUT, FLOOR_THROUGHPUT, SIDECAR_CPU, ENVOY_CPU)
        return [_row(b, None, [reason]) for b in chat]
    if part == "native":
        return [_row(b, None, [reason]) for b in (NATIVE_P50, NATIVE_THROUGHPUT)]
    return [
        _row(b, None, [reason], path)
        for b in (TTFT_P50, CHUNK_P99, RSS_5000)
        for path in STREAM_PATHS
    ]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| figure | measured | budget | verdict | notes |",
        "|---|---:|---:|---|---|",
    ]
    for r in rows:
        value = r["measured"]
        if value is None:
            shown = "n/a"
        elif r["unit"] == "%":
            shown = f"{value:.1f} %"
        elif r["unit"] == "x":
            shown = f"x{value:.2f}"
        else:
            sign = "+" if r["key"].startswith(("added", "stream_added")) else ""
            shown = f"{value:{sign}.2f} {r['unit']}"
        verdict = {"pass": "**pass**", "miss": "**MISS**"}.get(r["verdict"], r["verdict"])
        lines.append(
            f"| {r['figure']} | {shown} | {r['budget']} | {verdict} | {'; '.join(r['notes'])} |"
        )
    missed = sum(1 for r in rows if r["verdict"] == "miss")
    passed = sum(1 for r in rows if r["verdict"] == "pass")
    info = sum(1 for r in rows if r["verdict"] == INFO)
    unknown = len(rows) - missed - passed - info
    lines += [
        "",
        f"{passed} pass, {missed} miss"
        + (f", {unknown} not measured" if unknown else "")
        + (f"; {info} row(s) for information, with no budget" if info else "")
        + ".",
    ]
    return "\n".join(lines)
