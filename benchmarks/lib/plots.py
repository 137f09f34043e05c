"""PNG plots of the non-streaming benchmark: latency distribution and throughput vs concurrency.

matplotlib's object-oriented API on the Agg canvas (no pyplot): nothing needs a display, and
no global figure state leaks between plots of one suite run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before anything else of matplotlib: the machine has no display

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

COLORS = {"baseline": "tab:gray", "floor": "tab:orange", "gateway": "tab:blue"}
NAMES = {"baseline": "Envoy alone", "floor": "floor", "gateway": "gateway"}
# An ECDF of 100,000 latencies draws no better than one of a few thousand of its quantiles.
MAX_POINTS = 4000
DPI = 110
BUDGET_THROUGHPUT_PCT = 50.0


def _ms_formatter(value: float, _pos: int) -> str:
    return f"{value:g}"


def _ecdf(values_ms: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The empirical CDF's steps, thinned to at most MAX_POINTS (first and last kept)."""
    x = np.sort(np.asarray(values_ms, dtype=float))
    y = np.arange(1, len(x) + 1) / len(x)
    if len(x) > MAX_POINTS:
        keep = np.unique(np.linspace(0, len(x) - 1, MAX_POINTS).round().astype(int))
        x, y = x[keep], y[keep]
    return x, y


def latency_cdf(
    path: Path,
    panels: Sequence[tuple[str, int, dict[str, Sequence[float]]]],
    runs: int,
) -> None:
    """One panel per scenario: (title, concurrency, {target: every latency in ms}).

    Each target's empirical CDF on a log latency axis (the gateway's tail is many times
    Envoy's), its p50 and p99 marked with a dot and a dotted line, values in the legend.
    """
    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(7.5 * cols, 4.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (title, concurrency, by_target) in zip(axes, panels, strict=False):
        for target, values in by_target.items():
            if not len(values):
                continue
            color = COLORS.get(target, "tab:orange")
            x, y = _ecdf(values)
            p50, p99 = np.quantile(values, [0.5, 0.99])  # "linear": as stats.percentile
            ax.step(
                x,
                y,
                where="post",
                color=color,
                lw=1.6,
                label=f"{NAMES.get(target, target)}: p50 {p50:.2f} ms, p99 {p99:.2f} ms "
                f"(n={len(values):,})",
            )
            for q, value, marker in ((0.5, p50, "o"), (0.99, p99, "^")):
                ax.axvline(value, color=color, ls=":", lw=0.9)
                ax.plot([value], [q], marker=marker, color=color, ms=6, zorder=3)
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            ax.axhline(q, color="black", lw=0.5, alpha=0.4)
            ax.annotate(
                name,
                (0, q),
                xycoords=("axes fraction", "data"),
                xytext=(3, 3 if q < 0.9 else -11),  # p99's label below its line, off the frame
                textcoords="offset points",
                fontsize=8,
                alpha=0.7,
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(_ms_formatter))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("latency, request sent to whole response read (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.01)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{title}\nconcurrency {concurrency}", fontsize=10)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"Latency distribution (every request of {runs} run(s); dot: p50, triangle: p99)",
        fontsize=11,
    )
    fig.savefig(path, dpi=DPI)


def throughput(path: Path, series: Sequence[tuple[str, dict[str, Any]]], runs: int) -> None:
    """Requests per second over the concurrencies measured, per scenario and target (left),
    and the gateway's as a share of Envoy alone's measured beside it (right, with the budget
    at saturation). `series`: (scenario title, stats.summarize_chat() output)."""
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    ax_rps, ax_pct = fig.subplots(1, 2)
    single = len(series) == 1
    concurrencies: set[int] = set()
    handles = []
    for i, (title, summary) in enumerate(series):
        cs = sorted(int(c) for c in summary)
        concurrencies.update(cs)

        def values(
            key: str, target: str | None = None, cs: list[int] = cs, summary: dict = summary
        ) -> list[float]:
            rows = [summary[str(c)] if target is None else summary[str(c)][target] for c in cs]
            return [np.nan if row[key] is None else row[key] for row in rows]

        gw_color = COLORS["gateway"] if single else f"C{i}"
        base_color = COLORS["baseline"] if single else f"C{i}"
        ax_rps.plot(cs, values("rps", "gateway"), "o-", color=gw_color, lw=1.8)
        ax_rps.plot(cs, values("rps", "baseline"), "s--", color=base_color, lw=1.2, alpha=0.7)
        ax_pct.plot(cs, values("throughput_pct"), "o-", color=gw_color, lw=1.8)
        if single:
            handles += [
                Line2D([], [], color=gw_color, marker="o", label="gateway"),
                Line2D([], [], color=base_color, marker="s", ls="--", label="Envoy alone"),
            ]
        else:
            handles.append(Line2D([], [], color=gw_color, marker="o", label=title))
    if not single:
        handles.append(
            Line2D(
                [],
                [],
                color="black",
                marker="s",
                ls="--",
                alpha=0.7,
                label="dashed: Envoy alone, measured beside each",
            )
        )
    ticks = sorted(concurrencies)
    for ax in (ax_rps, ax_pct):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(_ms_formatter))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("client concurrency (closed-loop connections)")
        ax.grid(True, alpha=0.3)
    ax_rps.set_ylabel("HTTP 200 responses per second (median over runs)")
    ax_rps.set_ylim(bottom=0)
    ax_rps.set_title("Throughput", fontsize=10)
    ax_rps.legend(handles=handles, fontsize=8, loc="best")
    # Black, not red: a scenario's own color may be red.
    ax_pct.axhline(BUDGET_THROUGHPUT_PCT, color="black", ls=":", lw=1.2)
    ax_pct.set_ylabel("gateway throughput, % of Envoy alone")
    ax_pct.set_ylim(0, 105)
    ax_pct.set_title("Gateway as a share of Envoy alone", fontsize=10)
    ax_pct.legend(
        handles=[
            *(h for h in handles if h.get_linestyle() != "--"),
            Line2D([], [], color="black", ls=":", label="budget at saturation (>= 50 %)"),
        ],
        fontsize=8,
        loc="best",
    )
    fig.suptitle(f"Throughput vs concurrency (median of {runs} run(s))", fontsize=11)
    fig.savefig(path, dpi=DPI)
