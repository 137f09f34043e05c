"""The markdown the benchmarks write: the chat table, the streaming tables, the suite's
combined report and each report file's header (the budget table is `budget.markdown`)."""

from __future__ import annotations

from typing import Any

from benchmarks.lib import budget
from benchmarks.lib.configs import (
    CHAT_TARGETS,
    FLOOR_PATH_TEXT,
    STREAM_FLOOR_OF,
    STREAM_GATEWAY_VARIANTS,
    STREAM_PATH_OF,
    STREAM_PATH_TEXT,
    stream_label,
)
from benchmarks.lib.stats import percent_of
from benchmarks.lib.stream_client import CPU_WINDOW_S, OPENING_AT_ONCE


def fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    """A number for a table or a progress line: `digits` decimals, "n/a" for None."""
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _span(values: list[float | None], digits: int, sign: bool = False, unit: str = "") -> str:
    present = [v for v in values if v is not None]
    if len(present) < 2:
        return ""
    low, high = fmt(min(present), digits, sign), fmt(max(present), digits, sign)
    return f"runs {low}{unit} … {high}{unit}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"x{value:.2f}"


def chat_markdown(result: dict[str, Any]) -> str:
    """The chat table of one scenario's result, and what it says below it."""
    s = result["settings"]
    summary = result["summary"]
    label = s.get("scenario", {}).get("label", "")
    lines = [
        f"Envoy-only baseline vs floor vs gateway ({label}): median of {s['runs']} run(s), "
        f"{s['duration_s']:g} s per concurrency after {s['warmup_s']:g} s warm-up, Envoy "
        f"--concurrency {s['envoy_concurrency']}, {result['machine']['cpus']} CPU(s) shared by "
        f"everything, load from {s.get('generator', 'python')}. *floor*: the gateway's own "
        "Envoy config in front of a do-nothing Python ext_proc server "
        "(`benchmarks/lib/floor.py`).",
        "",
        "| concurrency | metric | baseline | floor | gateway | floor vs baseline | "
        "gateway vs baseline | gateway vs floor | spread over runs | spread vs floor |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for c, row in summary.items():
        base, gw = row["baseline"], row["gateway"]
        floor = row.get("floor")
        has = floor is not None

        def of(target: dict[str, Any] | None, key: str, digits: int = 2) -> str:
            return fmt(target[key], digits) if target is not None else "n/a"

        lines.append(
            f"| {c} | throughput (req/s) | {fmt(base['rps'], 0)} | {of(floor, 'rps', 0)} | "
            f"{fmt(gw['rps'], 0)} | {fmt(row.get('floor_throughput_pct'), 1)} % | "
            f"{fmt(row['throughput_pct'], 1)} % | "
            f"{fmt(row.get('throughput_pct_of_floor'), 1)} % | "
            f"{_span(row['per_run_throughput_pct'], 1, unit=' %')} | "
            f"{_span(row.get('per_run_throughput_pct_of_floor', []), 1, unit=' %')} |"
        )
        for key in ("p50", "p90", "p99"):
            spread = row.get(f"per_run_added_{key}_ms")
            spread_floor = row.get(f"per_run_added_vs_floor_{key}_ms")
            floor_added = row.get("floor_added_ms", {}).get(key)
            vs_floor = row.get("added_vs_floor_ms", {}).get(key)
            lines.append(
                f"| {c} | {key} latency (ms) | {fmt(base[f'{key}_ms'])} | "
                f"{of(floor, f'{key}_ms')} | {fmt(gw[f'{key}_ms'])} | "
                f"{fmt(floor_added, sign=True)} ms | "
                f"{fmt(row['added_ms'][key], sign=True)} ms | {fmt(vs_floor, sign=True)} ms | "
                f"{_span(spread, 2, sign=True, unit=' ms') if spread else ''} | "
                f"{_span(spread_floor, 2, sign=True, unit=' ms') if spread_floor else ''} |"
            )
        cpu = {t: (row.get(t) or {}).get("cpu_ms_per_request", {}) for t in CHAT_TARGETS}
        cpu_floor = row.get("cpu_vs_floor", {})
        per_run_cpu = row.get("per_run_cpu_vs_floor", {})
        for what, (label_, gw_name, floor_name) in CPU_ROWS.items():
            if gw_name not in cpu["gateway"]:
                continue
            base_value = cpu["baseline"].get(gw_name) if what == "envoy" else None
            lines.append(
                f"| {c} | {label_} | {fmt(base_value, 3)} | "
                f"{fmt(cpu['floor'].get(floor_name), 3)} | {fmt(cpu['gateway'].get(gw_name), 3)} "
                f"| | | {_ratio(cpu_floor.get(what))} | | "
                f"{_span_ratio(per_run_cpu.get(what, []))} |"
            )
        talk = {t: (row.get(t) or {}).get("ext_proc_per_request") for t in ("floor", "gateway")}
        if any(talk.values()):
            lines.append(
                f"| {c} | ext_proc messages per request (sent / answered), access log "
                f"entries | | {_talk(talk['floor'])} | {_talk(talk['gateway'])} | | | | | |"
            )
        errors = base["errors"] + gw["errors"] + (floor["errors"] if has else 0)
        floor_requests = f"{floor['requests']} / {floor['errors']}" if has else "n/a"
        lines.append(
            f"| {c} | requests / errors | {base['requests']} / {base['errors']} | "
            f"{floor_requests} | {gw['requests']} / {gw['errors']} | | "
            f"{'**ERRORS**' if errors else 'all 200'} | | | |"
        )
        if base.get("retried") or gw.get("retried"):
            lines.append(
                f"| {c} | retried (attempts > 1) | {_retried(base)} | "
                f"{_retried(floor) if has else 'n/a'} | {_retried(gw)} | | | | | |"
            )
    lines.append("")
    headline = result["headline"]
    if headline.get("latency_concurrency") is not None:
        c = headline["latency_concurrency"]
        text = (
            f"- Added latency at concurrency {c}: p50 {fmt(headline['added_p50_ms'], sign=True)} "
            f"ms, p99 {fmt(headline['added_p99_ms'], sign=True)} ms over Envoy alone"
        )
        if "added_vs_floor_p50_ms" in headline:
            text += (
                f"; p50 {fmt(headline['added_vs_floor_p50_ms'], sign=True)} ms, p99 "
                f"{fmt(headline['added_vs_floor_p99_ms'], sign=True)} ms over the floor"
            )
        lines.append(text + ".")
    if headline.get("throughput_concurrency") is not None:
        c = headline["throughput_concurrency"]
        text = (
            f"- Gateway throughput at concurrency {c}: "
            f"{fmt(headline['throughput_pct'], 1)} % of the baseline"
        )
        if headline.get("throughput_pct_of_floor") is not None:
            text += f", {fmt(headline['throughput_pct_of_floor'], 1)} % of the floor"
        lines.append(text + ".")
    if headline.get("sidecar_cpu_vs_floor") is not None or headline.get("envoy_cpu_vs_floor"):
        lines.append(
            f"- CPU per request at concurrency {headline['cpu_concurrency']}: the sidecar "
            f"{_ratio(headline.get('sidecar_cpu_vs_floor'))} the floor server's, the gateway's "
            f"Envoy {_ratio(headline.get('envoy_cpu_vs_floor'))} the floor's Envoy."
        )
    cpu_lines = []
    for c, row in summary.items():
        for target in CHAT_TARGETS:
            if target not in row:
                continue
            cores = row[target]["cpu_cores"]
            if cores:
                rps = row[target]["rps"]
                parts = ", ".join(
                    f"{n} {fmt(v)}" + (f" ({1000 * v / rps:.2f} ms CPU/req)" if v and rps else "")
                    for n, v in cores.items()
                )
                cpu_lines.append(f"  - concurrency {c}, {target}: {parts}")
    if cpu_lines:
        lines += ["- CPU cores busy while measuring (median over runs):", *cpu_lines]
    total_errors = result["errors_total"]
    if total_errors:
        bad = [
            f"{x['target']} c={x['concurrency']} run {x['run']}: {x['errors']} "
            f"(statuses {x['statuses']}, exceptions {x['exceptions']})"
            for x in result["samples"]
            if x["errors"]
        ]
        lines.append(
            f"- **{total_errors} request(s) did not get HTTP 200 in the API asked**: "
            + "; ".join(bad)
        )
    else:
        lines.append("- Every response was HTTP 200, an answer of the API asked.")
    return "\n".join(lines)


# CPU-per-request rows of the chat table: (label, gateway's process, floor's process).
CPU_ROWS = {
    "envoy": ("Envoy CPU per request (ms)", "envoy", "envoy"),
    "sidecar": ("ext_proc server CPU per request (ms): sidecar / floor", "sidecar", "floor"),
}


def _span_ratio(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if len(present) < 2:
        return ""
    return f"runs {_ratio(min(present))} … {_ratio(max(present))}"


def _talk(per_request: dict[str, float | None] | None) -> str:
    if not per_request:
        return "n/a"
    return (
        f"{fmt(per_request.get('messages_sent'))} / {fmt(per_request.get('messages_received'))}, "
        f"{fmt(per_request.get('access_log_entries'))}"
    )


def _retried(row: dict[str, Any]) -> str:
    ok = row["requests"] - row["errors"]
    return f"{row.get('retried', 0)} ({fmt(percent_of(row.get('retried', 0), ok), 1)} %)"


def _spread(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if len(present) < 2:
        return ""
    return f"runs {fmt(min(present), sign=True)} … {fmt(max(present), sign=True)} ms"


# The latency rows of the streaming tables: (label, key in the summary without `_ms`).
STREAM_ROWS = (
    ("time to first token p50 (ms)", "ttft_p50"),
    ("time to first token p99 (ms)", "ttft_p99"),
    ("gap between chunks p50 (ms, pacing {pacing})", "gap_p50"),
    ("gap between chunks p99 (ms, pacing {pacing})", "gap_p99"),
    ("time to response headers p50 (ms)", "headers_p50"),
    ("response headers to first token p50 (ms)", "first_after_headers_p50"),
    ("response headers to first token p99 (ms)", "first_after_headers_p99"),
)


def _added(added: dict[str, Any], per_run: list[dict[str, Any]], key: str) -> str:
    """An added figure (ms) with its spread over runs, or n/a."""
    if key not in added:
        return "n/a"
    spread = _spread([r[f"{key}_ms"] for r in per_run])
    return f"{fmt(added[key], sign=True)} ms" + (f" ({spread})" if spread else "")


def _stream_table(lat: dict[str, Any], variant: str) -> list[str]:
    """One client request's table: Envoy alone, the floor and the gateway; what the floor and
    the gateway add to Envoy alone, and what the gateway adds to the floor."""
    floor = STREAM_FLOOR_OF[variant]
    base, fl, gw = lat["baseline"], lat.get(floor), lat.get(variant)
    added = lat["added_ms"]
    per_run = lat["per_run_added_ms"]
    vs_floor = lat.get("added_vs_floor_ms", {}).get(variant, {})
    per_run_vs_floor = lat.get("per_run_added_vs_floor_ms", {}).get(variant, [])

    def of(row: dict[str, Any] | None, key: str) -> str:
        return fmt(row[key]) if row is not None else "n/a"

    lines = [
        "| metric | Envoy alone | floor | gateway | floor vs Envoy alone | gateway vs Envoy alone "
        "| gateway vs floor |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    pacing = f"{lat['pacing_ms']:g}"
    for label, key in STREAM_ROWS:
        lines.append(
            f"| {label.format(pacing=pacing)} | {fmt(base[f'{key}_ms'])} | "
            f"{of(fl, f'{key}_ms')} | {of(gw, f'{key}_ms')} | "
            f"{_added(added.get(floor, {}), per_run.get(floor, []), key)} | "
            f"{_added(added.get(variant, {}), per_run.get(variant, []), key)} | "
            f"{_added(vs_floor, per_run_vs_floor, key)} |"
        )

    def cpu(row: dict[str, Any] | None) -> str:
        if row is None:
            return "n/a"
        values = row["cpu_ms_per_stream"].items()
        return ", ".join(f"{name} {fmt(value)}" for name, value in values if value)

    lines.append(f"| CPU ms per stream | {cpu(base)} | {cpu(fl)} | {cpu(gw)} | | | |")
    talk = {v: (row or {}).get("ext_proc_per_stream") for v, row in ((floor, fl), (variant, gw))}
    if any(talk.values()):
        lines.append(
            "| ext_proc messages per stream (sent / answered), access log entries | | "
            f"{_talk(talk[floor])} | {_talk(talk[variant])} | | | |"
        )
    shown = [row for row in (base, fl, gw) if row is not None]
    errors = sum(row["errors"] for row in shown)
    lines.append(
        "| streams / errors | "
        + " | ".join(
            f"{row['streams']} / {row['errors']}" if row else "n/a" for row in (base, fl, gw)
        )
        + (" | | **ERRORS** | |" if errors else " | | all ended with [DONE] | |")
    )
    return lines


def streaming_markdown(result: dict[str, Any]) -> str:
    """The streaming tables (latency per client request, then memory per concurrent stream)."""
    s = result["settings"]
    lat = result["latency"]
    stream_path = s.get("stream_path", "auto")
    has_floor = any(v in lat for v in STREAM_FLOOR_OF.values())
    lines = [
        f"Streaming, Envoy alone vs the floor vs the gateway with `sidecar.stream_path: "
        f"{stream_path}`: {s['runs']} run(s) x {s['latency_streams']} streams per target and "
        f"request at concurrency 1, {s['tokens']} tokens at {s['tokens_per_second']:g} tokens/s "
        f"(pacing {lat['pacing_ms']:g} ms), no time to first token; medians over runs; Envoy "
        f"--concurrency {s['envoy_concurrency']}; {result['machine']['cpus']} CPU(s) shared by "
        "the load generator, the three Envoys, the fake LLM, the floor server and the sidecar. "
        "*floor*: the gateway's own Envoy config in front of a do-nothing Python ext_proc server "
        "(`benchmarks/lib/floor.py`) that answers each stream as the sidecar's stage does on "
        "that path; *floor vs Envoy alone* is what any Python ext_proc server costs on the "
        "path, *gateway vs floor* what the sidecar's own work costs on top.",
        "",
    ]
    if not has_floor:
        lines += ["No floor was measured in this run.", ""]
    for variant in STREAM_GATEWAY_VARIANTS:
        if variant not in lat:
            continue
        what = "asked for usage" if variant == "observed" else "did not ask for usage"
        path = STREAM_PATH_OF.get(stream_path, {}).get(variant, "?")
        lines += [
            f"**The client {what}** (variant `{variant}`; {path} path): the gateway: "
            f"{STREAM_PATH_TEXT.get((stream_path, variant), '?')}; the floor: "
            f"{FLOOR_PATH_TEXT.get((stream_path, variant), '?')}.",
            "",
            *_stream_table(lat, variant),
            "",
        ]

    def label(variant: str) -> str:
        return stream_label(variant, stream_path)

    lines += [
        f"Memory per concurrent stream: K streams at {s['slow_tokens_per_second']:g} token/s, "
        f"{s['slow_tokens']} tokens each, opened {OPENING_AT_ONCE} at a time; RSS (median of 3 "
        f"samples) {s['settle_s']:g} s after every stream had its first chunk, against the RSS "
        "before they opened; per stream = growth / streams live at the sample. CPU per chunk: "
        f"CPU time over up to {CPU_WINDOW_S:g} s right after the sample (every stream open, "
        "none opening or ending) / content chunks the client received in that window. Each K "
        "and target in a fresh process tree (Envoy alone and the gateway; no floor), with the "
        "same `sidecar.stream_path`.",
        "",
        "| K | target | live streams | process | RSS before (MB) | RSS with K open (MB) | "
        "growth (MB) | KB per stream | RSS after (MB) | CPU µs per chunk | ok / errors |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in result["memory"]:
        per_chunk = m.get("cpu_per_chunk", {}).get("us_per_chunk", {})
        for name, g in m["rss"].items():
            lines.append(
                f"| {m['k']} | {label(m['target'])} | {m['live_at_sample']} | {name} | "
                f"{fmt(g['before_mb'], 1)} | {fmt(g['during_mb'], 1)} | "
                f"{fmt(g['growth_mb'], 1, sign=True)} | {fmt(g['kb_per_stream'], 1)} | "
                f"{fmt(g['after_mb'], 1)} | {fmt(per_chunk.get(name), 1)} | "
                f"{m['ok']} / {m['errors']} |"
            )
    lines.append("")
    for note in result["notes"]:
        lines.append(f"- {note}")
    for m in result["memory"]:
        if m["errors"]:
            kinds = ", ".join(f"{kind}: {n}" for kind, n in m["error_kinds"].items())
            detail = next((d for d in m["error_details"].values() if d), "")
            lines.append(
                f"- **K={m['k']} {label(m['target'])}: {m['errors']} of {m['k']} stream(s) "
                f"failed** ({kinds})" + (f"; e.g. `{detail[:160]}`" if detail else "")
            )
        if m["envoy_overflow"]:
            counted = ", ".join(f"{name} +{n}" for name, n in m["envoy_overflow"].items())
            lines.append(
                f"  - its Envoy's circuit breakers overflowed: {counted}; active at the sample: "
                + ", ".join(f"{name} {n}" for name, n in m["envoy_active_at_sample"].items())
            )
    breakers = s.get("envoy_circuit_breakers") or {}
    limits = {
        f"{cluster}: " + ", ".join(f"{k} {v}" for k, v in sorted(thresholds.items()))
        for per_target in breakers.values()
        for cluster, thresholds in per_target.items()
    }
    if limits:
        lines.append(f"- Envoy circuit-breaker thresholds in force: {'; '.join(sorted(limits))}.")
    for sample in result["latency_samples"]:
        if sample["errors"]:
            lines.append(
                f"- **latency run {sample['run']} {label(sample['target'])}: "
                f"{sample['errors']} error(s)** {sample['error_kinds']}"
            )
    return "\n".join(lines)


def report_header(result: dict[str, Any], title: str, module: str = "benchmarks.run") -> list[str]:
    """A report file's title and what was measured: when, commit, machine, command."""
    git = result["git"]
    commit = git["commit"] or "unknown"
    if git.get("dirty"):
        commit += " (with uncommitted changes)"
    m = result["machine"]
    lines = [
        f"# {title}",
        "",
        f"{result['timestamp']}, commit {commit}, {m['cpus']} CPU(s), {m['platform']}, "
        f"Python {m['python']}, {m['envoy']}. Command: "
        f"`python -m {module} {' '.join(result['argv'])}`.",
        "",
    ]
    if result.get("generator"):
        lines += [generator_line(result["generator"]), ""]
    return lines


def generator_line(gen: dict[str, Any]) -> str:
    """Which load generator drove the load (`chat_scenario.generator_settings`, or the
    streaming benchmark's): said at the top of every report."""
    if gen["name"] == "wrk":
        text = (
            f"Load generator: **{gen['version']}** ({gen['threads']}, {gen['timeout_s']:g} s "
            f"timeout, Lua script `{gen['script']}`); the pre-flight requests are the Python "
            "client's."
        )
    else:
        text = f"Load generator: **the Python client** ({gen['client']})"
        text += f": {gen['why']}." if gen.get("why") else "."
        if gen.get("caveat"):
            text += f" Caveat: {gen['caveat']}."
    if gen.get("warning"):
        text += f" **Warning: {gen['warning']}.**"
    return text


def chat_report(result: dict[str, Any]) -> str:
    """The markdown report file of a single-scenario run."""
    lines = report_header(result, f"Gateway vs Envoy alone: {result['scenario']['label']}")
    if result.get("budget"):
        lines += ["## Budget", "", budget.markdown(result["budget"]), ""]
    lines += ["## Results", "", chat_markdown(result), "", *plot_links(result["plots"])]
    return "\n".join(lines)


def plot_links(plots: dict[str, str]) -> list[str]:
    """The plots section: `plots` is {kind: file name}, the files beside the report."""
    titles = {
        "latency": "Latency distribution at the lowest concurrency",
        "throughput": "Throughput vs concurrency",
    }
    lines = ["## Plots", ""]
    for kind, name in plots.items():
        lines += [f"![{titles.get(kind, kind)}]({name})", ""]
    return lines


def streaming_report(result: dict[str, Any]) -> str:
    """The markdown report file of a streaming run."""
    stream_path = result["settings"].get("stream_path", "auto")
    lines = report_header(
        result,
        f"Streaming: gateway vs the floor vs Envoy alone (sidecar.stream_path: {stream_path})",
        "benchmarks.streaming",
    )
    lines += ["## Budget", "", budget.markdown(result["budget"]), "", "## Results", ""]
    return "\n".join([*lines, streaming_markdown(result)])


def _scenarios_table(scenarios: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = [
        "| scenario | concurrency | Envoy alone (req/s) | floor (req/s) | gateway (req/s) | "
        "gateway / Envoy alone | gateway / floor | added p50 (ms) | added p99 (ms) | "
        "added p50 vs floor (ms) | added p99 vs floor (ms) | retried (gateway) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for title, scenario in scenarios:
        for c, row in scenario["summary"].items():
            base, gw = row["baseline"], row["gateway"]
            floor = row.get("floor")
            vs_floor = row.get("added_vs_floor_ms", {})
            errors = base["errors"] + gw["errors"] + (floor["errors"] if floor else 0)
            lines.append(
                f"| {title} | {c} | {fmt(base['rps'], 0)} | "
                f"{fmt(floor['rps'], 0) if floor else 'n/a'} | {fmt(gw['rps'], 0)} | "
                f"{fmt(row['throughput_pct'], 1)} % | "
                f"{fmt(row.get('throughput_pct_of_floor'), 1)} % | "
                f"{fmt(row['added_ms']['p50'], sign=True)} | "
                f"{fmt(row['added_ms']['p99'], sign=True)} | "
                f"{fmt(vs_floor.get('p50'), sign=True)} | {fmt(vs_floor.get('p99'), sign=True)} | "
                f"{_retried(gw) if gw.get('retried') else '0'} | {errors} |"
            )
    return lines


def suite_report(result: dict[str, Any], scenarios: list[tuple[str, dict[str, Any]]]) -> str:
    """The suite's combined report: `scenarios` are (title, result) of its chat scenarios."""
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
        "Each scenario against its own Envoy-only baseline (same routes, no ext_proc) and its own "
        "floor (the gateway's Envoy config, a do-nothing ext_proc server), measured back to back;"
        f" {s['duration_s']:g} s per measurement after {s['warmup_s']:g} s "
        "warm-up. Scenario details below.",
        "",
        *_scenarios_table(scenarios),
        "",
        *plot_links(result["plots"]),
    ]
    for title, scenario in scenarios:
        lines += [
            f"### {title}: {scenario['scenario']['label']}",
            "",
            chat_markdown({**scenario, "machine": result["machine"]}),
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
            generator_line(result["streaming"]["generator"]),
            "",
            streaming_markdown(result["streaming"]),
            "",
        ]
    if result["notes"]:
        lines += ["## Notes", "", *(f"- {note}" for note in result["notes"]), ""]
    lines.append(f"Whole suite: {result['elapsed_s']:.0f} s.")
    return "\n".join(lines)
