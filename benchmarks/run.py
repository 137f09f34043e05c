"""Gateway overhead against an Envoy-only baseline, measured side by side in one run.

`python -m benchmarks.run` (or `make bench`) starts, in this one process tree:

- one fake LLM (no time to first token, no pacing, a few response tokens);
- the *baseline*: an Envoy whose bootstrap is the gateway's own (`envoy_config.bootstrap`) with
  the ext_proc pieces taken out (no ext_proc HTTP filter, no upstream ext_proc filter in the
  backend cluster, no sidecar cluster, one route from `/v1/` straight to the fake's cluster);
- the *gateway*: `extproc.supervisor.Stack` (sidecar + Envoy) in front of the same fake.

Then it drives both with a small asyncio client, alternating baseline and gateway for every
scenario of every run, and reports medians over runs. See benchmarks/README.md.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import yaml

from extproc.config import Config, load_config
from extproc.envoy_config import (
    EXT_PROC_FILTER,
    HTTP_PROTOCOL_OPTIONS,
    OBSERVER_FILTER,
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
REQUEST_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0


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


def gateway_config(fake_port: int, guards: bool = False) -> dict[str, Any]:
    """The gateway's config: free loopback ports, one team key, the running fake as backend."""
    return {
        "sidecar": {"listen": f"{HOST}:{free_port()}"},
        "envoy": {"listen": f"{HOST}:{free_port()}", "admin": f"{HOST}:{free_port()}"},
        "teams": {"bench": {"keys": [{"sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}]}},
        "backends": {"fake": {"url": f"http://{HOST}:{fake_port}/v1"}},
        "models": {MODEL: {"targets": [{"backend": "fake"}]}},
        **(LOCAL_GUARDS if guards else {}),
    }


def _without_ext_proc(filters: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    kept = [f for f in filters if f.get("name") not in (EXT_PROC_FILTER, OBSERVER_FILTER)]
    if len(kept) == len(filters):
        raise RuntimeError(f"no {EXT_PROC_FILTER} filter in {where}: the bootstrap changed shape")
    return kept


def baseline_bootstrap(cfg: Config, listen: str, admin: str) -> dict[str, Any]:
    """The gateway's bootstrap for `cfg`, on other ports, with every ext_proc piece removed.

    Listener, connection manager, access log, backend cluster and timeouts stay exactly as the
    gateway renders them, so the sidecar (and the header route it needs) is the only difference.
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


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    session: aiohttp.ClientSession, url: str, concurrency: int, seconds: float
) -> dict[str, Any]:
    """`concurrency` closed-loop workers; none starts a request after `seconds`."""
    body = json.dumps(PAYLOAD).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    exceptions: Counter[str] = Counter()
    clock = time.perf_counter
    start = clock()
    stop_at = start + seconds

    async def worker() -> None:
        while True:
            t0 = clock()
            if t0 >= stop_at:
                return
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                exceptions[type(exc).__name__] += 1
                await asyncio.sleep(0.01)  # no hot loop against a dead port
                continue
            elapsed = clock() - t0
            statuses[status] += 1
            if status == 200:
                latencies.append(elapsed)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = clock() - start
    latencies.sort()
    ok = len(latencies)
    errors = sum(n for s, n in statuses.items() if s != 200) + sum(exceptions.values())

    def ms(q: float) -> float | None:
        value = percentile(latencies, q)
        return None if value is None else round(value * 1000, 3)

    return {
        "requests": ok + errors,
        "ok": ok,
        "errors": errors,
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
    base_url: str, concurrency: int, warmup: float, duration: float
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
        return await phase(session, url, concurrency, duration)


async def preflight(base_url: str, deadline: float) -> dict[str, str]:
    """One request until it answers 200 (Envoy may still be health-checking the sidecar)."""
    last = "no answer"
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            try:
                async with session.post(base_url + PATH, json=PAYLOAD, headers=headers) as resp:
                    text = await resp.text()
                    if resp.status == 200:
                        return {k: v for k, v in resp.headers.items() if k.startswith("x-aigw-")}
                    last = f"HTTP {resp.status}: {text[:300]}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{base_url}{PATH} never answered 200; last: {last}")


# --------------------------------------------------------------------------- report


def median_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(samples: list[dict[str, Any]], concurrencies: list[int]) -> dict[str, Any]:
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
            per_target[target]["runs_with_errors"] = sorted(r["run"] for r in rows if r["errors"])
            per_target[target]["cpu_cores"] = {
                name: median_of([r["cpu_cores"].get(name) for r in rows])
                for name in sorted({n for r in rows for n in r["cpu_cores"]})
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
    lines = [
        f"Envoy-only baseline vs gateway: median of {s['runs']} run(s), {s['duration_s']:g} s "
        f"per scenario after {s['warmup_s']:g} s warm-up, Envoy --concurrency "
        f"{s['envoy_concurrency']}, {result['machine']['cpus']} CPU(s) shared by everything.",
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


# --------------------------------------------------------------------------- main


@dataclass
class Targets:
    """The running processes: one fake LLM, the baseline Envoy and the gateway's Stack."""

    fake: subprocess.Popen
    baseline: subprocess.Popen
    stack: Stack
    urls: dict[str, str]
    admins: dict[str, str]

    def pids(self, target: str) -> dict[str, int]:
        """The processes a target's requests go through (the fake is shared)."""
        if target == "baseline":
            return {"envoy": self.baseline.pid}
        return {
            "envoy": self.stack.procs["envoy"].pid,
            "sidecar": self.stack.procs["sidecar"].pid,
        }

    def check(self) -> None:
        exited = self.stack.poll()
        if exited is None and self.baseline.poll() is not None:
            exited = ("baseline envoy", self.baseline.returncode)
        if exited is None and self.fake.poll() is not None:
            exited = ("fake-llm", self.fake.returncode)
        if exited is not None:
            raise RuntimeError(f"a process exited during the benchmark: {exited}")


@contextlib.contextmanager
def started(
    workdir: Path, envoy_concurrency: int, fake_args: Sequence[str] = (), guards: bool = False
) -> Iterator[Targets]:
    """Fake LLM, baseline Envoy and gateway on free loopback ports; all stopped on exit.

    The fake runs with no time to first token and no pacing unless `fake_args` say otherwise;
    a request may set its own with the x-fake-* headers.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    logs: list[TextIO] = []
    fake: subprocess.Popen | None = None
    baseline: subprocess.Popen | None = None
    stack: Stack | None = None

    def log_file(name: str) -> TextIO:
        handle = (workdir / f"{name}.log").open("w", encoding="utf-8")
        logs.append(handle)
        return handle

    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        fake_port = free_port()
        fake_log = log_file("fake-llm")
        fake = subprocess.Popen(
            [sys.executable, "-m", "extproc", "fake-llm", "--listen", f"{HOST}:{fake_port}",
             "--ttft-ms", "0", "--tokens-per-second", "0", "--record-limit", "0", *fake_args],
            stdout=fake_log, stderr=fake_log, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        wait_tcp(f"{HOST}:{fake_port}", deadline, fake)

        config_path = workdir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(gateway_config(fake_port, guards), sort_keys=False))
        cfg = load_config(config_path)

        base_listen, base_admin = f"{HOST}:{free_port()}", f"{HOST}:{free_port()}"
        base_path = workdir / "baseline-envoy.yaml"
        base_path.write_text(
            yaml.safe_dump(baseline_bootstrap(cfg, base_listen, base_admin), sort_keys=False)
        )
        base_log = log_file("baseline-envoy")
        baseline = subprocess.Popen(
            [envoy_binary(), "-c", str(base_path), "--disable-hot-restart",
             "--log-level", "warning", "--concurrency", str(envoy_concurrency)],
            stdout=base_log, stderr=base_log, stdin=subprocess.DEVNULL,
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
        )
    finally:
        if stack is not None:
            stack.stop(grace=5)
        stop_process(baseline)
        stop_process(fake)
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
    p.add_argument("--duration", type=positive_float, default=5.0, help="seconds per scenario")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each measurement")
    p.add_argument("--runs", type=positive_int, default=3, help="baseline/gateway pairs")
    p.add_argument(
        "--concurrency", type=int_list, default=[1, 16], help="client concurrencies (default 1,16)"
    )
    p.add_argument(
        "--envoy-concurrency", type=positive_int, default=1, help="Envoy worker threads (both)"
    )
    p.add_argument(
        "--guards", action="store_true", help="the gateway runs the local guard pipeline too"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 run of 2 s per scenario")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and process logs")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.duration, args.warmup = 1, 2.0, min(args.warmup, 0.5)
    return args


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _raise_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # same clean-up as Ctrl-C
    workdir = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    ok = False
    started_at = time.monotonic()
    try:
        with started(
            workdir,
            args.envoy_concurrency,
            ["--response-tokens", str(RESPONSE_TOKENS)],
            guards=args.guards,
        ) as targets:
            code = _measure_all(args, argv, targets, started_at)
        ok = True
        return code
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        if ok and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"configs and process logs kept in {workdir}", file=sys.stderr)


def _measure_all(
    args: argparse.Namespace, argv: list[str] | None, targets: Targets, started: float
) -> int:
    workers = {t: envoy_workers(targets.admins[t]) for t in TARGETS}
    if workers["baseline"] != workers["gateway"]:
        raise RuntimeError(f"Envoy worker counts differ: {workers}")
    urls = targets.urls
    pids = {t: {**targets.pids(t), "fake-llm": targets.fake.pid} for t in TARGETS}
    samples: list[dict[str, Any]] = []
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        gateway_headers = {}
        for target in TARGETS:
            headers = runner.run(preflight(urls[target], time.monotonic() + 20))
            if target == "gateway":
                gateway_headers = headers
        if gateway_headers.get("x-aigw-team") != "bench":
            raise RuntimeError(f"the gateway did not identify the caller: {gateway_headers}")
        total = args.runs * len(args.concurrency) * len(TARGETS)
        for run in range(1, args.runs + 1):
            for c in args.concurrency:
                for target in TARGETS:  # A/B, back to back, same machine conditions
                    targets.check()
                    gc.collect()
                    cpu_before = {n: cpu_seconds(pid) for n, pid in pids[target].items()}
                    self_before = self_cpu_seconds()
                    sample = runner.run(measure(urls[target], c, args.warmup, args.duration))
                    cpu = {n: cpu_seconds(pid) for n, pid in pids[target].items()}
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
                        f"[{len(samples)}/{total}] run {run} c={c:<3} {target:<8} "
                        f"{sample['rps']:8.1f} req/s  p50 {_fmt(sample['p50_ms'])} ms  "
                        f"p99 {_fmt(sample['p99_ms'])} ms  errors {sample['errors']}",
                        file=sys.stderr,
                        flush=True,
                    )

    summary = summarize(samples, args.concurrency)
    low, high = min(args.concurrency), max(args.concurrency)
    headline: dict[str, Any] = {
        "latency_concurrency": low,
        "added_p50_ms": summary[str(low)]["added_ms"]["p50"],
        "added_p99_ms": summary[str(low)]["added_ms"]["p99"],
        "throughput_concurrency": high if high > low else None,
        "throughput_pct": summary[str(high)]["throughput_pct"] if high > low else None,
    }
    now = dt.datetime.now(dt.UTC)
    result = {
        "timestamp": now.isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "settings": {
            "runs": args.runs,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "envoy_concurrency": args.envoy_concurrency,
            "envoy_workers_reported": workers,
            "local_guards": LOCAL_GUARDS if args.guards else None,
            "payload": PAYLOAD,
            "fake_llm": {
                "ttft_ms": 0,
                "tokens_per_second": 0,
                "response_tokens": RESPONSE_TOKENS,
            },
            "tiktoken_cache_dir": os.environ.get("TIKTOKEN_CACHE_DIR"),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "envoy": envoy_version(),
        },
        "gateway_headers": gateway_headers,
        "headline": headline,
        "summary": summary,
        "samples": samples,
        "errors_total": sum(s["errors"] for s in samples),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(result))
    print(f"\nresult: {out}", file=sys.stderr)
    return 1 if result["errors_total"] else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
