"""The result files in benchmarks/results/: the envelope every result starts with (when, the
command, the commit, the machine), the JSON and markdown report side by side, and the plots."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.lib.chat_scenario import Outcome
from benchmarks.lib.configs import CHAT_TARGETS
from benchmarks.lib.stack import envoy_version

BENCHMARKS_DIR = Path(__file__).resolve().parents[1]
RESULTS_DIR = BENCHMARKS_DIR / "results"
REPO_DIR = BENCHMARKS_DIR.parent


def git_info() -> dict[str, Any]:
    """The commit measured, and whether the working tree had uncommitted changes to it."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def machine_info() -> dict[str, Any]:
    """CPUs, platform, Python and Envoy version of the machine measured on."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "envoy": envoy_version(),
    }


def envelope(args: argparse.Namespace, argv: list[str] | None, now: dt.datetime) -> dict[str, Any]:
    """What every result file starts with: when, how it was asked for, what and where."""
    return {
        "timestamp": now.isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "flags": vars(args),
        "git": git_info(),
        "machine": machine_info(),
    }


def stem_for(now: dt.datetime, prefix: str = "") -> Path:
    """benchmarks/results/<prefix><UTC timestamp>: the JSON, .md and PNGs add their suffixes."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return RESULTS_DIR / f"{prefix}{now.strftime('%Y%m%dT%H%M%SZ')}"


def write_result(stem: Path, result: dict[str, Any], report: str) -> Path:
    """The JSON and the markdown report side by side; returns the JSON's path."""
    out = stem.with_suffix(".json")
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(report + "\n", encoding="utf-8")
    return out


def write_plots(stem: Path, outcomes: list[tuple[Outcome, str]]) -> dict[str, str]:
    """The latency distribution at each scenario's lowest concurrency, and throughput over
    concurrency; returns {kind: file name} (files next to the JSON). A plotting failure is
    reported, not fatal: the measurements are already taken."""
    try:
        from benchmarks.lib import plots
    except ImportError as exc:  # matplotlib is in the `bench` extra (`make bench` installs it)
        print(f"no plots: {exc}", file=sys.stderr)
        return {}
    files: dict[str, str] = {}
    panels = []
    series = []
    for outcome, title in outcomes:
        result = outcome.result
        low = min(result["settings"]["concurrency"])
        by_target: dict[str, Sequence[float]] = {
            t: [v * 1000 for v in outcome.latencies.get((low, t), [])]
            for t in CHAT_TARGETS
            if (low, t) in outcome.latencies
        }
        panels.append((title or result["scenario"]["label"], low, by_target))
        series.append((title or result["scenario"]["label"], result["summary"]))
    runs = outcomes[0][0].result["settings"]["runs"]
    try:
        name = f"{stem.name}-latency.png"
        plots.latency_cdf(RESULTS_DIR / name, panels, runs)
        files["latency"] = name
        name = f"{stem.name}-throughput.png"
        plots.throughput(RESULTS_DIR / name, series, runs)
        files["throughput"] = name
    except Exception as exc:  # see above: the measurements are taken, report and go on
        print(f"plotting failed: {exc!r}", file=sys.stderr)
    return files
