"""Gateway overhead against an Envoy-only baseline, measured side by side in one run.

`python -m benchmarks.run` (or `make bench`) starts, in this one process tree:

- one fake LLM (no time to first token, no pacing, a few response tokens);
- the *baseline*: an Envoy whose bootstrap is the gateway's own (`envoy_config.bootstrap`) with
  the ext_proc pieces taken out (no ext_proc HTTP filter, no upstream ext_proc filter in the
  backend cluster, no sidecar cluster, one route from `/v1/` straight to the fake's cluster);
- the *gateway*: `extproc.supervisor.Stack` (sidecar + Envoy) in front of the same fake.

Then it drives both with a small asyncio client, alternating baseline and gateway for every
concurrency of every run, and reports medians over runs: a markdown table on stdout, and JSON,
markdown and PNG plots in benchmarks/results/. Flags pick what the gateway runs (`--quota`,
`--guards`, `--failover`, `--workers`); `--suite full` runs every scenario and the streaming
benchmark and writes one combined report with the performance budget (benchmarks/suite.py).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import yaml

from extproc.config import Config, load_config
from extproc.envoy_config import (
    EXT_PROC_FILTER,
    GATEWAY_FILTERS,
    HTTP_PROTOCOL_OPTIONS,
    SIDECAR_CLUSTER,
    bootstrap,
    to_dict,
)
from extproc.supervisor import Stack, envoy_binary, stop_process, wait_envoy_ready, wait_tcp

HOST = "127.0.0.1"
MODEL = "gpt-4o-mini"
API_KEY = "sk-bench"
RESPONSE_TOKENS = 8
PAYLOAD = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
PATH = "/v1/chat/completions"
TARGETS = ("baseline", "gateway")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_DIR = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0
DEFAULT_CONCURRENCY = [1, 4, 16]
QUOTA_STORES = ("memory", "redis", "none")
# The status the failover scenario's priority-0 backend answers every request with.
FAILOVER_FAULTS = ("429", "503")
# Percentiles kept in the JSON per concurrency and target (all runs pooled): enough to redraw
# the latency distribution without keeping every sample.
KEPT_PERCENTILES = [*range(0, 100), 99.9, 100]


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """What the gateway runs. The baseline is always Envoy alone with the same routes."""

    quota: str = "memory"  # memory | redis | none
    guards: bool = False
    failover: bool = False
    failover_fault: str = "429"
    workers: int = 1

    @property
    def name(self) -> str:
        """A short id: JSON keys and progress lines."""
        parts = ["chat", f"quota-{self.quota}"]
        if self.guards:
            parts.append("guards")
        if self.failover:
            parts.append(f"failover-{self.failover_fault}")
        if self.workers > 1:
            parts.append(f"workers-{self.workers}")
        return "+".join(parts)

    @property
    def label(self) -> str:
        """What the gateway does on every request, for the reports."""
        quota = {
            "memory": "quota (embedded store)",
            "redis": "quota (Redis on loopback)",
            "none": "no quota",
        }[self.quota]
        parts = ["auth", "token counting", quota]
        if self.guards:
            parts.append("local guards")
        if self.failover:
            parts.append(f"failover (priority 0 answers {self.failover_fault}, retried on 1)")
        if self.workers > 1:
            parts.append(f"{self.workers} sidecar workers")
        return ", ".join(parts)

    @property
    def is_headline(self) -> bool:
        """The configuration the performance budget is defined for."""
        return self == Scenario(failover_fault=self.failover_fault)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# `--guards`: the local guard pipeline on every request and response (no external guard).
LOCAL_GUARDS: dict[str, Any] = {
    "guards": {
        "deny": {
            "type": "deny",
            "patterns": ["(?i)ignore (all )?(previous|prior) instructions"],
            "keywords": ["DAN mode", "forbidden-word"],
        },
        "pii": {"type": "pii", "action": "mask"},
        "size": {"type": "max_prompt_tokens", "max_tokens": 8000},
        "secrets-out": {"type": "pii", "entities": ["secret"]},
    },
    "guardrails": {"request": ["deny", "pii", "size"], "response": ["secrets-out"]},
}

# `--quota memory|redis`: limits that never reject, so every request reserves against both
# and settles (the work the quota adds), without a 429 ever changing what is measured.
QUOTA_LIMITS: list[dict[str, Any]] = [
    {"window": "minute", "tokens": 10**12},
    {"window": "minute", "requests": 10**12},
]
# The product's default (50 ms) counts a slower Redis answer as "store unavailable" (503):
# at saturation on two shared cores a call can take that long, and a 503 is not a cost.
REDIS_TIMEOUT_MS = 1000


def gateway_config(
    fake_port: int,
    scenario: Scenario | None = None,
    redis_url: str | None = None,
    failing_port: int | None = None,
) -> dict[str, Any]:
    """The gateway's config: free loopback ports, one team key, the running fake as backend."""
    scenario = scenario or Scenario()
    team: dict[str, Any] = {"keys": [{"sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}]}
    config: dict[str, Any] = {
        "sidecar": {"listen": f"{HOST}:{free_port()}"},
        "envoy": {"listen": f"{HOST}:{free_port()}", "admin": f"{HOST}:{free_port()}"},
        "teams": {"bench": team},
        "backends": {"fake": {"url": f"http://{HOST}:{fake_port}/v1"}},
        "models": {MODEL: {"targets": [{"backend": "fake"}]}},
    }
    if scenario.workers > 1:
        # Only when asked: a config without the key is what every earlier result measured.
        config["sidecar"]["workers"] = scenario.workers
    if scenario.quota != "none":
        team["limits"] = QUOTA_LIMITS
    if scenario.quota == "redis":
        assert redis_url is not None
        config["quota"] = {
            "store": "redis",
            "redis": {"url": redis_url, "timeout_ms": REDIS_TIMEOUT_MS},
        }
    if scenario.failover:
        assert failing_port is not None
        # A pooled model: priority 0 always fails, so Envoy retries every request on priority 1.
        config["backends"]["failing"] = {"url": f"http://{HOST}:{failing_port}/v1"}
        config["models"][MODEL] = {
            "targets": [
                {"backend": "failing", "priority": 0},
                {"backend": "fake", "priority": 1},
            ]
        }
    if scenario.guards:
        config.update(LOCAL_GUARDS)
    return config


def _without_ext_proc(filters: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """The filters without the gateway's (GATEWAY_FILTERS): their cost is the gateway's."""
    kept = [f for f in filters if f.get("name") not in GATEWAY_FILTERS]
    if len(kept) == len(filters):
        raise RuntimeError(f"no {EXT_PROC_FILTER} filter in {where}: the bootstrap changed shape")
    return kept


def baseline_bootstrap(cfg: Config, listen: str, admin: str) -> dict[str, Any]:
    """The gateway's bootstrap for `cfg`, on other ports, with every ext_proc piece removed.

    Listener, connection manager, stdout access log, clusters (a pooled model's aggregate
    cluster and its members too), the model route's action (its retry policy too) and timeouts
    stay exactly as the gateway renders them, so the sidecar (and the header match it needs)
    is the only difference.
    """
    envoy = cfg.envoy.model_copy(update={"listen": listen, "admin": admin})
    doc = to_dict(bootstrap(cfg.model_copy(update={"envoy": envoy})))
    resources = doc["staticResources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != SIDECAR_CLUSTER]
    for cluster in resources["clusters"]:
        options = cluster.get("typedExtensionProtocolOptions", {}).get(HTTP_PROTOCOL_OPTIONS)
        if options and "httpFilters" in options:
            # What remains is envoy.filters.http.upstream_codec, Envoy's default upstream chain.
            options["httpFilters"] = _without_ext_proc(
                options["httpFilters"], f"cluster {cluster['name']}"
            )
    wanted_route = f"model:{MODEL}"
    for listener in resources["listeners"]:
        for chain in listener["filterChains"]:
            for network_filter in chain["filters"]:
                hcm = network_filter["typedConfig"]
                if not hcm.get("@type", "").endswith(".HttpConnectionManager"):
                    continue
                hcm["httpFilters"] = _without_ext_proc(hcm["httpFilters"], "the listener")
                # The gRPC access log to the sidecar goes; the stdout one (if on) stays.
                logs = hcm.get("accessLog", [])
                hcm["accessLog"] = [x for x in logs if SIDECAR_CLUSTER not in json.dumps(x)]
                for vhost in hcm["routeConfig"]["virtualHosts"]:
                    routes = []
                    for route in vhost["routes"]:
                        if route.get("name") == wanted_route:
                            # No sidecar sets x-aigw-model: route /v1/ straight to the cluster.
                            route = {**route, "name": "v1", "match": {"prefix": "/v1/"}}
                        elif route["match"].get("headers"):
                            continue  # another model's header route
                        routes.append(route)
                    vhost["routes"] = routes
    text = json.dumps(doc)
    if SIDECAR_CLUSTER in text or EXT_PROC_FILTER in text or '"name": "v1"' not in text:
        raise RuntimeError("could not derive the Envoy-only baseline from the gateway bootstrap")
    return doc


def envoy_version() -> str:
    try:
        out = subprocess.run(
            [envoy_binary(), "--version"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return " ".join(out.split()) or "unknown"


def envoy_workers(admin: str) -> int | None:
    """The `--concurrency` a running Envoy reports on its admin endpoint."""
    try:
        with urllib.request.urlopen(f"http://{admin}/server_info", timeout=2) as resp:
            return int(json.load(resp)["command_line_options"]["concurrency"])
    except (OSError, ValueError, KeyError):
        return None


def redis_binary() -> str | None:
    """Debian's redis-server (`make system-deps` installs it), or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    return "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), e.g. the sidecar's worker processes."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int, tree: bool = False) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), or None.

    `tree`: its descendants' too (the sidecar with `sidecar.workers` is a supervisor whose
    workers do the work; their time reaches the parent's own counters only once reaped).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if tree:
        total += sum(cpu_seconds(child) or 0.0 for child in _descendants(pid))
    return total


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- load generator


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; `ordered` sorted ascending."""
    if not ordered:
        return None
    k = (len(ordered) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def phase(
    session: aiohttp.ClientSession,
    url: str,
    concurrency: int,
    seconds: float,
    keep: list[float] | None = None,
) -> dict[str, Any]:
    """`concurrency` closed-loop workers; none starts a request after `seconds`.

    `keep`: a list that receives every HTTP 200 latency (seconds), for the plots.
    """
    body = json.dumps(PAYLOAD).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    exceptions: Counter[str] = Counter()
    retried = 0
    clock = time.perf_counter
    start = clock()
    stop_at = start + seconds

    async def worker() -> None:
        nonlocal retried
        while True:
            t0 = clock()
            if t0 >= stop_at:
                return
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
                    # Envoy says how many attempts a request took (the route config asks it
                    # to): the failover scenario checks that every request took the retry.
                    attempts = resp.headers.get("x-envoy-attempt-count", "1")
            except (aiohttp.ClientError, TimeoutError) as exc:
                exceptions[type(exc).__name__] += 1
                await asyncio.sleep(0.01)  # no hot loop against a dead port
                continue
            elapsed = clock() - t0
            statuses[status] += 1
            if status == 200:
                latencies.append(elapsed)
                if attempts != "1":
                    retried += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = clock() - start
    latencies.sort()
    ok = len(latencies)
    errors = sum(n for s, n in statuses.items() if s != 200) + sum(exceptions.values())
    if keep is not None:
        keep.extend(latencies)

    def ms(q: float) -> float | None:
        value = percentile(latencies, q)
        return None if value is None else round(value * 1000, 3)

    return {
        "requests": ok + errors,
        "ok": ok,
        "errors": errors,
        "retried": retried,
        "statuses": {str(s): n for s, n in sorted(statuses.items())},
        "exceptions": dict(exceptions),
        "wall_s": round(wall, 3),
        "rps": round(ok / wall, 1) if wall > 0 else 0.0,
        "p50_ms": ms(0.50),
        "p90_ms": ms(0.90),
        "p99_ms": ms(0.99),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 3) if latencies else None,
    }


async def measure(
    base_url: str,
    concurrency: int,
    warmup: float,
    duration: float,
    keep: list[float] | None = None,
) -> dict[str, Any]:
    """Warm up, then measure, over one keep-alive session pooled to `concurrency`."""
    connector = aiohttp.TCPConnector(
        limit=concurrency, limit_per_host=concurrency, keepalive_timeout=60
    )
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        url = base_url + PATH
        if warmup > 0:
            await phase(session, url, concurrency, warmup)
        return await phase(session, url, concurrency, duration, keep)


def _reported_header(name: str) -> bool:
    return name.startswith(("x-aigw-", "x-ratelimit-")) or name == "x-envoy-attempt-count"


async def preflight(base_url: str, deadline: float) -> dict[str, str]:
    """One request until it answers 200 (Envoy may still be health-checking the sidecar).

    Returns the response's gateway, rate-limit and attempt-count headers.
    """
    last = "no answer"
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            try:
                async with session.post(base_url + PATH, json=PAYLOAD, headers=headers) as resp:
                    text = await resp.text()
                    if resp.status == 200:
                        return {k: v for k, v in resp.headers.items() if _reported_header(k)}
                    last = f"HTTP {resp.status}: {text[:300]}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{base_url}{PATH} never answered 200; last: {last}")


def check_preflight(scenario: Scenario, headers: dict[str, dict[str, str]]) -> None:
    """The gateway really does what the scenario says (else the numbers measure something else)."""
    gw = headers["gateway"]
    if gw.get("x-aigw-team") != "bench":
        raise RuntimeError(f"the gateway did not identify the caller: {gw}")
    if scenario.quota != "none" and "x-ratelimit-limit-requests" not in gw:
        raise RuntimeError(f"the gateway applied no quota limit: {gw}")
    if scenario.failover:
        for target in TARGETS:
            if headers[target].get("x-envoy-attempt-count") != "2":
                raise RuntimeError(f"{target}: the request was not retried once: {headers[target]}")
        if gw.get("x-aigw-failover") != "true":
            raise RuntimeError(f"the gateway did not report the failover: {gw}")


# --------------------------------------------------------------------------- report


def median_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(
    samples: list[dict[str, Any]],
    concurrencies: list[int],
    latencies: dict[tuple[int, str], list[float]] | None = None,
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for c in concurrencies:
        per_target: dict[str, Any] = {}
        for target in TARGETS:
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
                k: _diff(gw[f"{k}_ms"], base[f"{k}_ms"]) for k in ("p50", "p90", "p99", "mean")
            },
            "throughput_pct": _pct(gw["rps"], base["rps"]),
            "per_run_added_p50_ms": [_diff(g["p50_ms"], b["p50_ms"]) for b, g in pairs],
            "per_run_added_p99_ms": [_diff(g["p99_ms"], b["p99_ms"]) for b, g in pairs],
            "per_run_throughput_pct": [_pct(g["rps"], b["rps"]) for b, g in pairs],
        }
    return summary


def _is(sample: dict[str, Any], run: int, target: str, c: int) -> bool:
    return sample["run"] == run and sample["target"] == target and sample["concurrency"] == c


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _pct(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(100 * a / b, 1)


def _fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _span(values: list[float | None], digits: int, sign: bool = False, unit: str = "") -> str:
    present = [v for v in values if v is not None]
    if len(present) < 2:
        return ""
    low, high = _fmt(min(present), digits, sign), _fmt(max(present), digits, sign)
    return f"runs {low}{unit} … {high}{unit}"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    summary = result["summary"]
    label = s.get("scenario", {}).get("label", "")
    lines = [
        f"Envoy-only baseline vs gateway ({label}): median of {s['runs']} run(s), "
        f"{s['duration_s']:g} s per concurrency after {s['warmup_s']:g} s warm-up, Envoy "
        f"--concurrency {s['envoy_concurrency']}, {result['machine']['cpus']} CPU(s) shared by "
        "everything.",
        "",
        "| concurrency | metric | baseline | gateway | gateway vs baseline | spread over runs |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for c, row in summary.items():
        base, gw = row["baseline"], row["gateway"]
        lines.append(
            f"| {c} | throughput (req/s) | {_fmt(base['rps'], 0)} | {_fmt(gw['rps'], 0)} | "
            f"{_fmt(row['throughput_pct'], 1)} % | "
            f"{_span(row['per_run_throughput_pct'], 1, unit=' %')} |"
        )
        for key in ("p50", "p90", "p99"):
            spread = row.get(f"per_run_added_{key}_ms")
            lines.append(
                f"| {c} | {key} latency (ms) | {_fmt(base[f'{key}_ms'])} | {_fmt(gw[f'{key}_ms'])} "
                f"| {_fmt(row['added_ms'][key], sign=True)} ms | "
                f"{_span(spread, 2, sign=True, unit=' ms') if spread else ''} |"
            )
        errors = base["errors"] + gw["errors"]
        lines.append(
            f"| {c} | requests / errors | {base['requests']} / {base['errors']} | "
            f"{gw['requests']} / {gw['errors']} | {'**ERRORS**' if errors else 'all 200'} | |"
        )
        if base.get("retried") or gw.get("retried"):
            lines.append(
                f"| {c} | retried (attempts > 1) | {_retried(base)} | {_retried(gw)} | | |"
            )
    lines.append("")
    headline = result["headline"]
    if headline.get("latency_concurrency") is not None:
        c = headline["latency_concurrency"]
        lines.append(
            f"- Added latency at concurrency {c}: p50 {_fmt(headline['added_p50_ms'], sign=True)} "
            f"ms, p99 {_fmt(headline['added_p99_ms'], sign=True)} ms."
        )
    if headline.get("throughput_concurrency") is not None:
        c = headline["throughput_concurrency"]
        lines.append(
            f"- Gateway throughput at concurrency {c}: "
            f"{_fmt(headline['throughput_pct'], 1)} % of the baseline."
        )
    cpu_lines = []
    for c, row in summary.items():
        for target in TARGETS:
            cores = row[target]["cpu_cores"]
            if cores:
                rps = row[target]["rps"]
                parts = ", ".join(
                    f"{n} {_fmt(v)}" + (f" ({1000 * v / rps:.2f} ms CPU/req)" if v and rps else "")
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
        lines.append(f"- **{total_errors} request(s) did not get HTTP 200**: " + "; ".join(bad))
    else:
        lines.append("- Every response was HTTP 200.")
    return "\n".join(lines)


def _retried(row: dict[str, Any]) -> str:
    ok = row["requests"] - row["errors"]
    return f"{row.get('retried', 0)} ({_fmt(_pct(row.get('retried', 0), ok), 1)} %)"


# --------------------------------------------------------------------------- results


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


def report_header(result: dict[str, Any], title: str, module: str = "benchmarks.run") -> list[str]:
    git = result["git"]
    commit = git["commit"] or "unknown"
    if git.get("dirty"):
        commit += " (with uncommitted changes)"
    m = result["machine"]
    return [
        f"# {title}",
        "",
        f"{result['timestamp']}, commit {commit}, {m['cpus']} CPU(s), {m['platform']}, "
        f"Python {m['python']}, {m['envoy']}. Command: "
        f"`python -m {module} {' '.join(result['argv'])}`.",
        "",
    ]


# --------------------------------------------------------------------------- main


@dataclass
class Targets:
    """The running processes: the fake LLM(s), the baseline Envoy and the gateway's Stack."""

    fake: subprocess.Popen
    baseline: subprocess.Popen
    stack: Stack
    urls: dict[str, str]
    admins: dict[str, str]
    # Processes only the gateway uses (redis) and ones both targets use besides the fake
    # (the failover scenario's failing backend).
    gateway_extra: dict[str, subprocess.Popen] = field(default_factory=dict)
    shared_extra: dict[str, subprocess.Popen] = field(default_factory=dict)

    def pids(self, target: str) -> dict[str, int]:
        """The processes a target's requests go through (the fake is shared)."""
        shared = {name: proc.pid for name, proc in self.shared_extra.items()}
        if target == "baseline":
            return {"envoy": self.baseline.pid, **shared}
        return {
            "envoy": self.stack.procs["envoy"].pid,
            "sidecar": self.stack.procs["sidecar"].pid,
            **{name: proc.pid for name, proc in self.gateway_extra.items()},
            **shared,
        }

    def check(self) -> None:
        exited = self.stack.poll()
        others = {
            "baseline envoy": self.baseline,
            "fake-llm": self.fake,
            **self.gateway_extra,
            **self.shared_extra,
        }
        for name, proc in others.items():
            if exited is None and proc.poll() is not None:
                exited = (name, proc.returncode)
        if exited is not None:
            raise RuntimeError(f"a process exited during the benchmark: {exited}")


@contextlib.contextmanager
def started(
    workdir: Path,
    envoy_concurrency: int,
    fake_args: Sequence[str] = (),
    scenario: Scenario | None = None,
) -> Iterator[Targets]:
    """Fake LLM, baseline Envoy and gateway on free loopback ports; all stopped on exit.

    The fake runs with no time to first token and no pacing unless `fake_args` say otherwise;
    a request may set its own with the x-fake-* headers. The scenario may add a redis-server
    (the gateway's quota store) and a second fake that fails every request (priority 0 of the
    failover pool, in both targets' config).
    """
    scenario = scenario or Scenario()
    workdir.mkdir(parents=True, exist_ok=True)
    logs: list[TextIO] = []
    procs: list[subprocess.Popen] = []  # stopped in reverse order
    stack: Stack | None = None

    def log_file(name: str) -> TextIO:
        handle = (workdir / f"{name}.log").open("w", encoding="utf-8")
        logs.append(handle)
        return handle

    def spawn(name: str, argv: list[str]) -> subprocess.Popen:
        log = log_file(name)
        proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    def fake_llm(name: str, port: int, extra: Sequence[str]) -> subprocess.Popen:
        return spawn(
            name,
            [sys.executable, "-m", "extproc", "fake-llm", "--listen", f"{HOST}:{port}",
             "--ttft-ms", "0", "--tokens-per-second", "0", "--record-limit", "0", *extra],
        )  # fmt: skip

    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        fake_port = free_port()
        fake = fake_llm("fake-llm", fake_port, fake_args)
        wait_tcp(f"{HOST}:{fake_port}", deadline, fake)

        gateway_extra: dict[str, subprocess.Popen] = {}
        shared_extra: dict[str, subprocess.Popen] = {}
        redis_url = failing_port = None
        if scenario.quota == "redis":
            binary = redis_binary()
            if binary is None:
                raise RuntimeError("redis-server is not installed (`make system-deps`)")
            redis_port = free_port()
            (workdir / "redis").mkdir(exist_ok=True)
            gateway_extra["redis"] = spawn(
                "redis",
                [binary, "--port", str(redis_port), "--bind", HOST, "--save", "",
                 "--appendonly", "no", "--dir", str(workdir / "redis")],
            )  # fmt: skip
            wait_tcp(f"{HOST}:{redis_port}", deadline, gateway_extra["redis"])
            redis_url = f"redis://{HOST}:{redis_port}/0"
        if scenario.failover:
            failing_port = free_port()
            shared_extra["fake-failing"] = fake_llm(
                "fake-failing",
                failing_port,
                ["--fault", scenario.failover_fault, "--name", "failing"],
            )
            wait_tcp(f"{HOST}:{failing_port}", deadline, shared_extra["fake-failing"])

        config_path = workdir / "gateway.yaml"
        config = gateway_config(fake_port, scenario, redis_url, failing_port)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        cfg = load_config(config_path)

        base_listen, base_admin = f"{HOST}:{free_port()}", f"{HOST}:{free_port()}"
        base_path = workdir / "baseline-envoy.yaml"
        base_path.write_text(
            yaml.safe_dump(baseline_bootstrap(cfg, base_listen, base_admin), sort_keys=False)
        )
        baseline = spawn(
            "baseline-envoy",
            [envoy_binary(), "-c", str(base_path), "--disable-hot-restart",
             "--log-level", "warning", "--concurrency", str(envoy_concurrency)],
        )  # fmt: skip
        wait_envoy_ready(base_admin, deadline, baseline)

        stack = Stack(
            config_path,
            workdir=workdir,
            stdout=log_file("gateway"),
            envoy_concurrency=envoy_concurrency,
        )
        stack.start(timeout=max(1.0, deadline - time.monotonic()))
        yield Targets(
            fake=fake,
            baseline=baseline,
            stack=stack,
            urls={"baseline": f"http://{base_listen}", "gateway": f"http://{cfg.envoy.listen}"},
            admins={"baseline": base_admin, "gateway": cfg.envoy.admin},
            gateway_extra=gateway_extra,
            shared_extra=shared_extra,
        )
    finally:
        if stack is not None:
            stack.stop(grace=5)
        for proc in reversed(procs):
            stop_process(proc)
        for handle in logs:
            handle.close()


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """A comma-separated list of integers >= 1, sorted, without repeats."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 like 1,16, got {text!r}")
    return sorted(set(values))


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
        "--suite",
        choices=("full",),
        help="every scenario, then the streaming benchmark: one combined report with the budget",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 run of 2 s per measurement")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and process logs")
    args = p.parse_args(argv)
    if args.workers > 1 and args.quota == "memory":
        p.error(
            "--workers > 1 needs --quota redis or --quota none: each worker would keep its own "
            "embedded counters (extproc check refuses that config)"
        )
    if args.suite and (args.guards or args.failover):
        p.error("--suite full runs the guards and failover scenarios itself")
    if args.quick:
        args.runs, args.duration, args.warmup = 1, 2.0, min(args.warmup, 0.5)
    return args


def scenario_of(args: argparse.Namespace) -> Scenario:
    return Scenario(
        quota=args.quota,
        guards=args.guards,
        failover=args.failover,
        failover_fault=args.failover_fault,
        workers=args.workers,
    )


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _raise_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


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
        ) as targets:
            outcome = _measure_all(args, scenario, concurrencies, targets, started_at)
        ok = True
        return outcome
    finally:
        if ok and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"configs and process logs kept in {workdir}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # same clean-up as Ctrl-C
    if args.suite == "full":
        from benchmarks.suite import run_suite

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
    from benchmarks import budget

    result["budget"] = budget.chat_rows(result) if result["scenario"]["headline"] else []
    out = write_result(stem, result, scenario_report(result))
    print(markdown(result))
    if result["budget"]:
        print("\n" + budget.markdown(result["budget"]))
    print(
        f"\nresult: {out}, report {stem.name}.md, plots {', '.join(result['plots'].values())}",
        file=sys.stderr,
    )
    return 1 if result["errors_total"] else 0


def scenario_report(result: dict[str, Any]) -> str:
    """The markdown report file of a single-scenario run."""
    from benchmarks import budget

    lines = report_header(result, f"Gateway vs Envoy alone: {result['scenario']['label']}")
    if result.get("budget"):
        lines += ["## Budget", "", budget.markdown(result["budget"]), ""]
    lines += ["## Results", "", markdown(result), "", *plot_links(result["plots"])]
    return "\n".join(lines)


def plot_links(plots: dict[str, str]) -> list[str]:
    titles = {
        "latency": "Latency distribution at the lowest concurrency",
        "throughput": "Throughput vs concurrency",
    }
    lines = ["## Plots", ""]
    for kind, name in plots.items():
        lines += [f"![{titles.get(kind, kind)}]({name})", ""]
    return lines


def write_plots(stem: Path, outcomes: list[tuple[Outcome, str]]) -> dict[str, str]:
    """The latency distribution at each scenario's lowest concurrency, and throughput over
    concurrency; returns {kind: file name} (files next to the JSON). A plotting failure is
    reported, not fatal: the measurements are already taken."""
    try:
        from benchmarks import plots
    except ImportError as exc:  # matplotlib is in the `bench` extra (`make bench` installs it)
        print(f"no plots: {exc}", file=sys.stderr)
        return {}
    files: dict[str, str] = {}
    panels = []
    series = []
    for outcome, title in outcomes:
        result = outcome.result
        low = min(result["settings"]["concurrency"])
        by_target = {t: [v * 1000 for v in outcome.latencies.get((low, t), [])] for t in TARGETS}
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


def _measure_all(
    args: argparse.Namespace,
    scenario: Scenario,
    concurrencies: list[int],
    targets: Targets,
    started: float,
) -> Outcome:
    workers = {t: envoy_workers(targets.admins[t]) for t in TARGETS}
    if workers["baseline"] != workers["gateway"]:
        raise RuntimeError(f"Envoy worker counts differ: {workers}")
    urls = targets.urls
    pids = {t: {**targets.pids(t), "fake-llm": targets.fake.pid} for t in TARGETS}
    samples: list[dict[str, Any]] = []
    latencies: dict[tuple[int, str], list[float]] = {}
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        preflight_headers = {
            target: runner.run(preflight(urls[target], time.monotonic() + 20)) for target in TARGETS
        }
        check_preflight(scenario, preflight_headers)
        total = args.runs * len(concurrencies) * len(TARGETS)
        for run in range(1, args.runs + 1):
            for c in concurrencies:
                for target in TARGETS:  # A/B, back to back, same machine conditions
                    targets.check()
                    gc.collect()
                    tree = {n: n == "sidecar" for n in pids[target]}
                    cpu_before = {n: cpu_seconds(pid, tree[n]) for n, pid in pids[target].items()}
                    self_before = self_cpu_seconds()
                    keep = latencies.setdefault((c, target), [])
                    sample = runner.run(measure(urls[target], c, args.warmup, args.duration, keep))
                    cpu = {n: cpu_seconds(pid, tree[n]) for n, pid in pids[target].items()}
                    cores = {
                        n: round((cpu[n] - before) / sample["wall_s"], 2)
                        for n, before in cpu_before.items()
                        if before is not None and cpu[n] is not None
                    }
                    # Includes warm-up time too; an approximation for the client's share.
                    cores["loadgen"] = round(
                        (self_cpu_seconds() - self_before) / (sample["wall_s"] + args.warmup),
                        2,
                    )
                    sample.update(run=run, target=target, concurrency=c, cpu_cores=cores)
                    samples.append(sample)
                    print(
                        f"[{len(samples)}/{total}] {scenario.name} run {run} c={c:<3} "
                        f"{target:<8} {sample['rps']:8.1f} req/s  p50 {_fmt(sample['p50_ms'])} "
                        f"ms  p99 {_fmt(sample['p99_ms'])} ms  errors {sample['errors']}",
                        file=sys.stderr,
                        flush=True,
                    )

    summary = summarize(samples, concurrencies, latencies)
    low, high = min(concurrencies), max(concurrencies)
    headline: dict[str, Any] = {
        "latency_concurrency": low,
        "added_p50_ms": summary[str(low)]["added_ms"]["p50"],
        "added_p99_ms": summary[str(low)]["added_ms"]["p99"],
        "throughput_concurrency": high if high > low else None,
        "throughput_pct": summary[str(high)]["throughput_pct"] if high > low else None,
    }
    result = {
        "scenario": {
            "name": scenario.name,
            "label": scenario.label,
            "headline": scenario.is_headline,
            "quota": scenario.quota,
            "guards": scenario.guards,
            "failover": scenario.failover,
            "failover_fault": scenario.failover_fault if scenario.failover else None,
            "workers": scenario.workers,
        },
        "settings": {
            "scenario": {"name": scenario.name, "label": scenario.label},
            "runs": args.runs,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": concurrencies,
            "envoy_concurrency": args.envoy_concurrency,
            "envoy_workers_reported": workers,
            "quota_limits": QUOTA_LIMITS if scenario.quota != "none" else None,
            "local_guards": LOCAL_GUARDS if scenario.guards else None,
            "payload": PAYLOAD,
            "fake_llm": {
                "ttft_ms": 0,
                "tokens_per_second": 0,
                "response_tokens": RESPONSE_TOKENS,
            },
            "tiktoken_cache_dir": os.environ.get("TIKTOKEN_CACHE_DIR"),
        },
        "preflight_headers": preflight_headers,
        "gateway_headers": preflight_headers["gateway"],
        "headline": headline,
        "summary": summary,
        "samples": samples,
        "errors_total": sum(s["errors"] for s in samples),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    return Outcome(result=result, latencies=latencies)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
