"""The chat load generator: wrk (Debian's `wrk` package, which `make bench` installs), a
compiled closed-loop HTTP/1.1 client, driving the same POST as the Python client.

Why: the Python client (`chat_client.phase`, aiohttp) spends ~0.13 ms of CPU per request on
this machine's shared cores, which capped Envoy alone below what it serves and so flattered
every ratio against it (benchmarks/README.md, "Is the load generator the bottleneck?"). wrk
spends ~0.01 ms.

One measurement is two wrk runs: a warm-up run (its connections are closed after it) and the
measured run. The Lua script (`script_text`, one per client API: `wrk-chat.lua` for OpenAI's
chat completions, `wrk-<api>.lua` for another) sends `chat_client.request_for(api)`'s path,
headers and body with the team's key, counts every response by status, the 200 answers not of
that API (`ChatRequest.markers` searched for in the body, as the Python client does) and the
answers that took a retry (`x-envoy-attempt-count` > 1) in each wrk thread, and its `done()`
prints one machine-readable line, `WRKJSON {...}`: the run's duration, completed responses,
socket errors (connect, read, write, timeout), statuses, wrong answers, retried, and wrk's
whole latency histogram (microsecond resolution: [value, count] pairs), from which the
percentiles are computed exactly as for the Python client (`stats.percentile`).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from benchmarks.lib.chat_client import REQUEST_TIMEOUT_S, ChatRequest, request_for, sample_of

# Connections from which wrk runs two threads instead of one. One wrk thread (one epoll loop)
# sends and reads ~10,000 req/s for ~0.2 core on this machine, more than any target here
# serves, so below this a second thread would only be one more runnable thread competing with
# Envoy, the sidecar and the fake for the 2 cores. From 64 connections on, one loop walking
# that many ready sockets in turn starts to add its own queueing to the latencies; two halve
# it.
TWO_THREADS_FROM = 64

MARK = "WRKJSON "

# The request, the per-thread counting and the report line. `response()` costs wrk ~5 µs per
# request (it hands the headers and the body, which wrk buffers for it, to Lua); it is what
# makes every non-200 answer an error (wrk itself counts only statuses >= 400), a 200 answer
# not of the request's API too (a few plain `string.find`s over a body of ~500 bytes), and
# counts the retried answers of the failover scenario.
LUA = r"""
wrk.method = "POST"
wrk.path = [==[%(path)s]==]
wrk.body = [==[%(body)s]==]
%(headers)s

-- Lua patterns that must all be in a 200 answer's body (chat_client.ChatRequest.markers).
local markers = {%(markers)s}

local function right_answer(body)
  if body == nil then
    return false
  end
  for _, marker in ipairs(markers) do
    if not string.find(body, marker) then
      return false
    end
  end
  return true
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  retried = 0
  wrong = 0
end

function response(status, headers, body)
  if status == 200 and not right_answer(body) then
    wrong = wrong + 1
    return
  end
  statuses[status] = (statuses[status] or 0) + 1
  local attempts = headers["x-envoy-attempt-count"]
  if attempts ~= nil and attempts ~= "1" then
    retried = retried + 1
  end
end

function done(summary, latency, requests)
  local counted, retries, wrongs = {}, 0, 0
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counted[status] = (counted[status] or 0) + n
    end
    retries = retries + thread:get("retried")
    wrongs = wrongs + thread:get("wrong")
  end
  local statuses = {}
  for status, n in pairs(counted) do
    statuses[#statuses + 1] = string.format('"%%d": %%d', status, n)
  end
  local histogram = {}
  for i = 1, #latency do
    local value, n = latency(i)
    histogram[#histogram + 1] = string.format("[%%d, %%d]", value, n)
  end
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"duration_us": %%d, "responses": %%d, "socket_errors": {"connect": %%d, ' ..
    '"read": %%d, "write": %%d, "timeout": %%d}, "status_errors": %%d, "statuses": {%%s}, ' ..
    '"wrong_answers": %%d, "retried": %%d, "histogram_us": [%%s]}\n',
    summary.duration, summary.requests, e.connect, e.read, e.write, e.timeout, e.status,
    table.concat(statuses, ", "), wrongs, retries, table.concat(histogram, ", ")))
end
"""


def binary() -> str | None:
    """The wrk binary on PATH, or None."""
    return shutil.which("wrk")


def version(path: str) -> str:
    """`wrk --version`'s first line, e.g. "wrk debian/4.1.0-3+b2 [epoll]" (it exits 1)."""
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"wrk (version unknown: {exc})"
    first = (done.stdout or done.stderr).splitlines()[:1]
    return first[0].split(" Copyright")[0].strip() if first else "wrk (version unknown)"


def threads_for(concurrency: int) -> int:
    return 2 if concurrency >= TWO_THREADS_FROM else 1


def lua_pattern(key: str, value: str | None) -> str:
    """A `ChatRequest.markers` entry as a Lua pattern: `"key"%s*:%s*"value"`."""

    def literal(text: str) -> str:
        return "".join("%" + ch if ch in "^$()%.[]*+-?" else ch for ch in text)

    pattern = literal(f'"{key}"') + "%s*:"
    return pattern + ("%s*" + literal(f'"{value}"') if value is not None else "")


def script_text(request: ChatRequest | None = None) -> str:
    """The Lua script sending `request` (default: OpenAI's chat request with the team's key)."""
    request = request or request_for()
    headers = "\n".join(
        f'wrk.headers["{name}"] = [==[{value}]==]' for name, value in request.headers.items()
    )
    markers = ", ".join(f"[==[{lua_pattern(k, v)}]==]" for k, v in request.markers)
    return LUA % {
        "path": request.path,
        "body": request.body.decode(),
        "headers": headers,
        "markers": markers,
        "mark": MARK,
    }


def script_name(api: str) -> str:
    """The script's file name in the workdir (the OpenAI one keeps its earlier name)."""
    return "wrk-chat.lua" if api == "openai" else f"wrk-{api}.lua"


def measured_latencies(raw: dict[str, Any], connections: int) -> dict[int, int]:
    """The latencies wrk measured, {microseconds: count}, one per completed response.

    wrk corrects its histogram for coordinated omission before `done()` sees it
    (`stats_correct` in wrk 4.1's src/stats.c, called from main): with E = the run's duration
    / (responses // connections), every latency n >= 2E adds its count again at n - E,
    n - 2E, ... while above E. That invents samples the Python client never had, more of them
    for a target with a longer tail, so it is undone here: for m > E the corrected count is
    the sum of the measured counts at m, m + E, m + 2E, ..., hence measured[m] = corrected[m]
    - corrected[m + E]. The result must add up to the responses wrk recorded (those of 10 s
    or more it counts as timeouts instead), or this wrk corrects differently and the run fails.
    """
    corrected = {int(v): int(n) for v, n in raw["histogram_us"]}
    per_connection = raw["responses"] // connections
    if per_connection > 0:
        expected = raw["duration_us"] // per_connection
        measured = {
            m: n - corrected.get(m + expected, 0) if m > expected else n
            for m, n in corrected.items()
        }
    else:
        measured = dict(corrected)
    measured = {m: n for m, n in measured.items() if n}
    recorded = raw["responses"] - raw["socket_errors"]["timeout"]
    if any(n < 0 for n in measured.values()) or sum(measured.values()) != recorded:
        raise RuntimeError(
            f"wrk's latency histogram does not undo to its {recorded} responses "
            f"({sum(measured.values())}): not the correction of wrk 4.1"
        )
    return measured


class Wrk:
    """wrk as the chat load generator: `measure` has `chat_client.measure`'s contract."""

    def __init__(self, workdir: Path, requests: Iterable[ChatRequest] = ()) -> None:
        """`requests`: what the targets are sent (one script per client API, written now);
        none: OpenAI's chat request with the team's key."""
        path = binary()
        if path is None:
            raise RuntimeError("wrk is not installed (`make bench` installs Debian's package)")
        self.path = path
        self.version = version(path)
        self.scripts: dict[str, Path] = {}
        for request in list(requests) or [request_for()]:
            script = workdir / script_name(request.api)
            script.write_text(script_text(request), encoding="utf-8")
            self.scripts[request.api] = script

    def settings(self) -> dict[str, Any]:
        return {
            "name": "wrk",
            "version": self.version,
            "binary": self.path,
            "threads": f"1 thread below {TWO_THREADS_FROM} connections, 2 from {TWO_THREADS_FROM}",
            "timeout_s": REQUEST_TIMEOUT_S,
            "script": ", ".join(script.name for script in self.scripts.values()),
        }

    def run(
        self, url: str, concurrency: int, seconds: float, request: ChatRequest | None = None
    ) -> dict[str, Any]:
        """One wrk run of `seconds` over `concurrency` connections, sending `request` (its
        client API's script; default OpenAI's chat request) to `url`: the WRKJSON line, parsed.

        Whole seconds go to `-d` (wrk then stops within ~0.1 s of it); wrk takes no fraction
        of a second, so a fractional duration is ended with SIGINT, on which wrk stops and
        reports the same way. The run's own duration is in the result either way.
        """
        request = request or request_for()
        whole = float(seconds).is_integer()
        cmd = [
            self.path,
            "-t", str(min(threads_for(concurrency), concurrency)),
            "-c", str(concurrency),
            "-d", f"{int(seconds) if whole else math.ceil(seconds) + 5}s",
            "--timeout", f"{REQUEST_TIMEOUT_S:g}s",
            "--latency",
            "-s", str(self.scripts[request.api]),
            url + request.path,
        ]  # fmt: skip
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            try:
                if not whole:
                    try:
                        proc.wait(timeout=seconds)
                    except subprocess.TimeoutExpired:
                        proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=math.ceil(seconds) + 30)
            except BaseException:  # Ctrl-C, SIGTERM, a hung wrk: never leave it running
                proc.kill()
                raise
        line = next((x for x in out.splitlines() if x.startswith(MARK)), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(
                f"wrk failed (exit {proc.returncode}): {' '.join(cmd)}\n{err.strip()}\n"
                f"{out.strip()[:2000]}"
            )
        parsed: dict[str, Any] = json.loads(line[len(MARK) :])
        return parsed

    def phase(
        self,
        url: str,
        concurrency: int,
        seconds: float,
        keep: list[float] | None = None,
        request: ChatRequest | None = None,
    ) -> dict[str, Any]:
        """One measured wrk run as a sample of the same shape as `chat_client.phase`'s."""
        request = request or request_for()
        raw = self.run(url, concurrency, seconds, request)
        measured = measured_latencies(raw, concurrency)
        latencies: list[float] = []
        for value_us, count in sorted(measured.items()):
            latencies.extend([value_us / 1e6] * count)
        statuses = {int(s): n for s, n in raw["statuses"].items()}
        # Every completed response was counted by status in `response()`, or as a 200 of the
        # wrong API: a difference would be a response the script did not see, counted as an
        # error, never as a success.
        wrong = raw["wrong_answers"]
        unseen = raw["responses"] - sum(statuses.values()) - wrong
        exceptions = {f"wrk {kind} error": n for kind, n in raw["socket_errors"].items() if n}
        if wrong:
            exceptions[request.wrong_answer] = wrong
        if unseen > 0:
            exceptions["responses not counted by status"] = unseen
        # wrk's histogram holds every completed response, whatever its status: with any
        # non-200 answer the percentiles include it, but such a run is void anyway (errors).
        sample = sample_of(
            statuses, exceptions, raw["retried"], raw["duration_us"] / 1e6, latencies
        )
        if keep is not None:
            keep.extend(latencies)
        sample["wrk_status_errors"] = raw["status_errors"]
        return sample

    def measure(
        self,
        base_url: str,
        concurrency: int,
        warmup: float,
        duration: float,
        keep: list[float] | None = None,
        mark: Callable[[], None] | None = None,
        request: ChatRequest | None = None,
    ) -> dict[str, Any]:
        """A warm-up run (unmeasured), `mark()`, then the measured run, each sending `request`
        (default: OpenAI's chat request with the team's key)."""
        warm = self.run(base_url, concurrency, warmup, request) if warmup > 0 else None
        if mark is not None:
            mark()
        sample = self.phase(base_url, concurrency, duration, keep, request)
        if warm is None:
            sample["warmup_requests"] = 0
        else:
            errors = sum(warm["socket_errors"].values())
            sample["warmup_requests"] = warm["responses"] + errors
        return sample
