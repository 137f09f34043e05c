"""Statistics of the measurements: percentiles, medians over runs, the gateway's difference
from and ratio to Envoy alone, and the per-concurrency (chat) and per-variant (streaming)
summaries the reports are drawn from."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks.lib.configs import (
    CHAT_TARGETS,
    STREAM_FLOOR_OF,
    STREAM_GATEWAY_VARIANTS,
    STREAM_VARIANTS,
)

# Percentiles kept in the JSON per concurrency and target (all runs pooled): enough to redraw
# the latency distribution without keeping every sample.
KEPT_PERCENTILES = [*range(0, 100), 99.9, 100]


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; `ordered` sorted ascending."""
    if not ordered:
        return None
    k = (len(ordered) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def percentile_ms(ordered: Sequence[float], q: float) -> float | None:
    """`percentile` of seconds, in milliseconds rounded to the microsecond."""
    value = percentile(ordered, q)
    return None if value is None else round(value * 1000, 3)


def median_of(values: Sequence[float | None]) -> float | None:
    """The median of the values present (None for none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def difference(a: float | None, b: float | None) -> float | None:
    """a - b (the gateway's minus Envoy alone's), or None when either is missing."""
    return None if a is None or b is None else round(a - b, 3)


def percent_of(a: float | None, b: float | None) -> float | None:
    """a as a percentage of b (the gateway's throughput of Envoy alone's), or None."""
    return None if a is None or not b else round(100 * a / b, 1)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b (the gateway's CPU per request over the floor's), or None."""
    return None if a is None or not b else round(a / b, 2)


def _cpu_ms_per_request(sample: dict[str, Any]) -> dict[str, float]:
    """Each process's CPU time per answered request (ms) in one measurement."""
    rps = sample["rps"]
    if not rps:
        return {}
    return {name: round(1000 * cores / rps, 3) for name, cores in sample["cpu_cores"].items()}


# The floor comparison of CPU per request: (gateway's process, floor's process).
CPU_VS_FLOOR = {"sidecar": ("sidecar", "floor"), "envoy": ("envoy", "envoy")}


def _is(sample: dict[str, Any], run: int, target: str, c: int) -> bool:
    return sample["run"] == run and sample["target"] == target and sample["concurrency"] == c


def summarize_chat(
    samples: list[dict[str, Any]],
    concurrencies: list[int],
    latencies: dict[tuple[int, str], list[float]] | None = None,
) -> dict[str, Any]:
    """Per concurrency: each target's medians over runs, the gateway's added latency and
    throughput share against Envoy alone and (when measured) against the floor, its CPU per
    request against the floor's, and the same comparisons run by run (the spread)."""
    summary: dict[str, Any] = {}
    measured = {s["target"] for s in samples}
    targets = [t for t in CHAT_TARGETS if t in measured]
    for c in concurrencies:
        per_target: dict[str, Any] = {}
        for target in targets:
            rows = [s for s in samples if s["target"] == target and s["concurrency"] == c]
            per_target[target] = {
                key: median_of([r[key] for r in rows])
                for key in ("rps", "p50_ms", "p90_ms", "p99_ms", "mean_ms")
            }
            per_target[target]["requests"] = sum(r["requests"] for r in rows)
            per_target[target]["errors"] = sum(r["errors"] for r in rows)
            per_target[target]["retried"] = sum(r.get("retried", 0) for r in rows)
            per_target[target]["runs_with_errors"] = sorted(r["run"] for r in rows if r["errors"])
            per_target[target]["cpu_cores"] = {
                name: median_of([r["cpu_cores"].get(name) for r in rows])
                for name in sorted({n for r in rows for n in r["cpu_cores"]})
            }
            per_run_cpu = [_cpu_ms_per_request(r) for r in rows]
            per_target[target]["cpu_ms_per_request"] = {
                name: median_of([x.get(name) for x in per_run_cpu])
                for name in per_target[target]["cpu_cores"]
            }
            talk = [r["ext_proc_per_request"] for r in rows if r.get("ext_proc_per_request")]
            if talk:
                # What Envoy exchanged with the ext_proc server per request (its counters).
                per_target[target]["ext_proc_per_request"] = {
                    k: median_of([x[k] for x in talk]) for k in talk[0]
                }
            pooled = sorted((latencies or {}).get((c, target), []))
            if pooled:
                # All runs pooled (not medians over runs): the distribution the plot draws.
                per_target[target]["pooled_percentiles_ms"] = {
                    f"{q:g}": round(1000 * (percentile(pooled, q / 100) or 0.0), 3)
                    for q in KEPT_PERCENTILES
                }
        base, gw = per_target["baseline"], per_target["gateway"]
        # Per-run comparisons (each run's pair measured back to back) show the spread.
        pairs = []
        for run in sorted({s["run"] for s in samples}):
            b = next(x for x in samples if _is(x, run, "baseline", c))
            g = next(x for x in samples if _is(x, run, "gateway", c))
            pairs.append((b, g))
        summary[str(c)] = {
            **per_target,
            "added_ms": {
                k: difference(gw[f"{k}_ms"], base[f"{k}_ms"]) for k in ("p50", "p90", "p99", "mean")
            },
            "throughput_pct": percent_of(gw["rps"], base["rps"]),
            "per_run_added_p50_ms": [difference(g["p50_ms"], b["p50_ms"]) for b, g in pairs],
            "per_run_added_p99_ms": [difference(g["p99_ms"], b["p99_ms"]) for b, g in pairs],
            "per_run_throughput_pct": [percent_of(g["rps"], b["rps"]) for b, g in pairs],
        }
        if "floor" in per_target:
            summary[str(c)].update(_floor_comparison(samples, c, per_target))
    return summary


def _floor_comparison(
    samples: list[dict[str, Any]], c: int, per_target: dict[str, Any]
) -> dict[str, Any]:
    """The gateway against the floor (and the floor against Envoy alone) at concurrency c."""
    base, floor, gw = per_target["baseline"], per_target["floor"], per_target["gateway"]
    triples = []
    for run in sorted({s["run"] for s in samples}):
        f = next(x for x in samples if _is(x, run, "floor", c))
        g = next(x for x in samples if _is(x, run, "gateway", c))
        triples.append((f, g, _cpu_ms_per_request(f), _cpu_ms_per_request(g)))
    keys = ("p50", "p90", "p99", "mean")
    return {
        "floor_added_ms": {k: difference(floor[f"{k}_ms"], base[f"{k}_ms"]) for k in keys},
        "floor_throughput_pct": percent_of(floor["rps"], base["rps"]),
        "added_vs_floor_ms": {k: difference(gw[f"{k}_ms"], floor[f"{k}_ms"]) for k in keys},
        "throughput_pct_of_floor": percent_of(gw["rps"], floor["rps"]),
        "cpu_vs_floor": {
            what: ratio(gw["cpu_ms_per_request"].get(mine), floor["cpu_ms_per_request"].get(theirs))
            for what, (mine, theirs) in CPU_VS_FLOOR.items()
        },
        "per_run_added_vs_floor_p50_ms": [
            difference(g["p50_ms"], f["p50_ms"]) for f, g, *_ in triples
        ],
        "per_run_added_vs_floor_p99_ms": [
            difference(g["p99_ms"], f["p99_ms"]) for f, g, *_ in triples
        ],
        "per_run_throughput_pct_of_floor": [percent_of(g["rps"], f["rps"]) for f, g, *_ in triples],
        "per_run_cpu_vs_floor": {
            what: [ratio(gc.get(mine), fc.get(theirs)) for _, _, fc, gc in triples]
            for what, (mine, theirs) in CPU_VS_FLOOR.items()
        },
    }


STREAM_KEYS = (
    "ttft_p50_ms",
    "ttft_p99_ms",
    "gap_p50_ms",
    "gap_p99_ms",
    "headers_p50_ms",
    "first_after_headers_p50_ms",
    "first_after_headers_p99_ms",
)


def _stream_difference(
    samples: list[dict[str, Any]], variant: str, reference: str
) -> tuple[dict[str, float | None], list[dict[str, float | None]]]:
    """What `variant` adds to `reference`: medians over runs, then run by run (the spread)."""
    rows = {v: [s for s in samples if s["target"] == v] for v in (variant, reference)}
    medians = {v: {key: median_of([r[key] for r in rows[v]]) for key in STREAM_KEYS} for v in rows}
    added = {
        key.removesuffix("_ms"): difference(medians[variant][key], medians[reference][key])
        for key in STREAM_KEYS
    }
    per_run = []
    for run in sorted({s["run"] for s in samples}):
        ref = next(s for s in rows[reference] if s["run"] == run)
        mine = next(s for s in rows[variant] if s["run"] == run)
        per_run.append({key: difference(mine[key], ref[key]) for key in STREAM_KEYS})
    return added, per_run


def summarize_stream_latency(samples: list[dict[str, Any]], pacing_ms: float) -> dict[str, Any]:
    """Per streaming variant: medians over runs of the latency part; what each gateway path
    and each floor variant adds to Envoy alone's, and what each gateway path adds to the floor
    of the same client request; each of those run by run too."""
    measured = {s["target"] for s in samples}
    variants = [v for v in STREAM_VARIANTS if v in measured]
    per_variant: dict[str, Any] = {}
    for variant in variants:
        rows = [s for s in samples if s["target"] == variant]
        per_variant[variant] = {key: median_of([r[key] for r in rows]) for key in STREAM_KEYS}
        per_variant[variant]["cpu_ms_per_stream"] = {
            name: median_of([r["cpu_ms_per_stream"].get(name) for r in rows])
            for name in sorted({n for r in rows for n in r["cpu_ms_per_stream"]})
        }
        talk = [r["ext_proc_per_stream"] for r in rows if r.get("ext_proc_per_stream")]
        if talk:
            # What Envoy exchanged with the ext_proc server per stream (its counters).
            per_variant[variant]["ext_proc_per_stream"] = {
                k: median_of([x.get(k) for x in talk]) for k in talk[0]
            }
        per_variant[variant]["streams"] = sum(r["streams"] for r in rows)
        per_variant[variant]["errors"] = sum(r["errors"] for r in rows)
        per_variant[variant]["streams_with_missing_deltas"] = sum(
            r["streams_with_missing_deltas"] for r in rows
        )
    added: dict[str, Any] = {}
    per_run: dict[str, list[dict[str, Any]]] = {}
    added_vs_floor: dict[str, Any] = {}
    per_run_vs_floor: dict[str, list[dict[str, Any]]] = {}
    for variant in variants:
        if variant != "baseline":
            added[variant], per_run[variant] = _stream_difference(samples, variant, "baseline")
    for variant in STREAM_GATEWAY_VARIANTS:
        floor = STREAM_FLOOR_OF[variant]
        if variant in measured and floor in measured:
            added_vs_floor[variant], per_run_vs_floor[variant] = _stream_difference(
                samples, variant, floor
            )
    return {
        **per_variant,
        "pacing_ms": pacing_ms,
        # Against Envoy alone: every gateway and floor variant.
        "added_ms": added,
        "per_run_added_ms": per_run,
        # Against the floor of the same client request: the gateway variants.
        "added_vs_floor_ms": added_vs_floor,
        "per_run_added_vs_floor_ms": per_run_vs_floor,
    }
