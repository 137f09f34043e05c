"""The non-streaming load client: closed-loop workers posting one small chat request over a
keep-alive pool, and the pre-flight request that checks a target does what the scenario says
(the streaming benchmark's pre-flight too).

The request is in one of the gateway's client APIs (`ChatRequest`, `request_for`): OpenAI's
chat completions, Anthropic's Messages or OpenAI's Responses, each asking the same thing (one
user turn, "hello", at most 8 tokens). Every answer is checked to be 200 and of that API
(`ChatRequest.answer_ok`, a few bytes searched for, the same check wrk's script makes); the
pre-flight parses it whole (`check_answer`).
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from benchmarks.lib.configs import API_KEY, MODEL, PATH, Scenario
from benchmarks.lib.runtime import loop_factory
from benchmarks.lib.stats import percentile_ms

# The fake LLM's answer to every chat request: this many tokens, no pacing.
RESPONSE_TOKENS = 8
PAYLOAD = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
REQUEST_TIMEOUT_S = 10.0

# The same request in each client API (docs/clients.md): one user turn, the same max tokens.
PAYLOADS: dict[str, dict[str, Any]] = {
    "openai": PAYLOAD,
    "anthropic": {
        "model": MODEL,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "hello"}],
    },
    "responses": {"model": MODEL, "input": "hello", "max_output_tokens": 8},
}
PATHS = {"openai": PATH, "anthropic": "/v1/messages", "responses": "/v1/responses"}
# What a right answer is, and the top-level members that tell it from the other two APIs'
# answers: (key, value), value None for "the key is there". A Response's output item has
# `"type": "message"` too, only Anthropic's Message has `stop_reason`.
ANSWERS: dict[str, tuple[str, tuple[tuple[str, str | None], ...]]] = {
    "openai": ("a chat completion", (("object", "chat.completion"),)),
    "anthropic": ("an Anthropic Message", (("type", "message"), ("stop_reason", None))),
    "responses": ("a Response", (("object", "response"),)),
}
ANTHROPIC_VERSION = "2023-06-01"  # what Anthropic's SDKs send


@dataclass(frozen=True)
class ChatRequest:
    """One client API's request, as both load generators send it, and its answer's check."""

    api: str  # configs.CLIENTS
    path: str
    headers: dict[str, str]
    body: bytes
    answer: str  # what a right answer is, for error messages: "a Response"
    markers: tuple[tuple[str, str | None], ...]
    _patterns: tuple[re.Pattern[bytes], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        patterns = tuple(
            re.compile(
                re.escape(f'"{key}"'.encode())
                + rb"\s*:"
                + (rb"\s*" + re.escape(f'"{value}"'.encode()) if value is not None else b"")
            )
            for key, value in self.markers
        )
        object.__setattr__(self, "_patterns", patterns)

    def answer_ok(self, body: bytes) -> bool:
        """Whether a 200 answer's body is of this API (its markers are there): ~1 µs."""
        return all(p.search(body) for p in self._patterns)

    @property
    def wrong_answer(self) -> str:
        """The error a 200 answer of another shape counts as."""
        return f"HTTP 200 not {self.answer}"


def request_for(api: str = "openai", bearer: str = API_KEY) -> ChatRequest:
    """The benchmark's chat request in client API `api`, carrying the team's key."""
    headers = {"Content-Type": "application/json"}
    if api == "anthropic":
        headers.update({"x-api-key": bearer, "anthropic-version": ANTHROPIC_VERSION})
    else:
        headers["Authorization"] = f"Bearer {bearer}"
    answer, markers = ANSWERS[api]
    return ChatRequest(
        api=api,
        path=PATHS[api],
        headers=headers,
        body=json.dumps(PAYLOADS[api]).encode(),
        answer=answer,
        markers=markers,
    )


def check_answer(api: str, doc: Any) -> str | None:
    """What is wrong with a parsed 200 answer for a request in `api`, or None: the pre-flight's
    whole check (the load generators only search for `ChatRequest.markers`)."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    if api == "openai":
        choices = doc.get("choices") or [{}]
        if doc.get("object") != "chat.completion" or not isinstance(
            (choices[0].get("message") or {}).get("content"), str
        ):
            return "not a chat completion with a message"
    elif api == "anthropic":
        content = doc.get("content") or [{}]
        if (
            doc.get("type") != "message"
            or doc.get("role") != "assistant"
            or content[0].get("type") != "text"
            or "stop_reason" not in doc
            or not isinstance((doc.get("usage") or {}).get("output_tokens"), int)
        ):
            return "not an Anthropic Message with a text block and its usage"
    elif api == "responses":
        texts = [
            part.get("text")
            for item in doc.get("output") or []
            if item.get("type") == "message"
            for part in item.get("content") or []
            if part.get("type") == "output_text"
        ]
        if (
            doc.get("object") != "response"
            or doc.get("status") not in ("completed", "incomplete")
            or not texts
            or not isinstance((doc.get("usage") or {}).get("output_tokens"), int)
        ):
            return "not a Response with an output text and its usage"
    else:
        raise ValueError(f"unknown client API {api!r}")
    return None


async def phase(
    session: aiohttp.ClientSession,
    url: str,
    concurrency: int,
    seconds: float,
    keep: list[float] | None = None,
    request: ChatRequest | None = None,
) -> dict[str, Any]:
    """`concurrency` closed-loop workers posting `request` (default: OpenAI's chat request with
    the team's key) to `url`; none starts a request after `seconds`.

    `keep`: a list that receives every right answer's latency (seconds), for the plots. A 200
    answer not of the request's API is an error (`ChatRequest.wrong_answer`).
    """
    request = request or request_for()
    body = request.body
    headers = request.headers
    answer_ok = request.answer_ok
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    exceptions: Counter[str] = Counter()
    retried = wrong = 0
    clock = time.perf_counter
    start = clock()
    stop_at = start + seconds

    async def worker() -> None:
        nonlocal retried, wrong
        while True:
            t0 = clock()
            if t0 >= stop_at:
                return
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    answer = await resp.read()
                    status = resp.status
                    # Envoy says how many attempts a request took (the route config asks it
                    # to): the failover scenario checks that every request took the retry.
                    attempts = resp.headers.get("x-envoy-attempt-count", "1")
            except (aiohttp.ClientError, TimeoutError) as exc:
                exceptions[type(exc).__name__] += 1
                await asyncio.sleep(0.01)  # no hot loop against a dead port
                continue
            elapsed = clock() - t0
            if status == 200 and not answer_ok(answer):
                wrong += 1
                continue
            statuses[status] += 1
            if status == 200:
                latencies.append(elapsed)
                if attempts != "1":
                    retried += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = clock() - start
    latencies.sort()
    if keep is not None:
        keep.extend(latencies)
    if wrong:
        exceptions[request.wrong_answer] += wrong
    return sample_of(statuses, exceptions, retried, wall, latencies)


def sample_of(
    statuses: Mapping[int, int],
    exceptions: Mapping[str, int],
    retried: int,
    wall: float,
    latencies: list[float],
) -> dict[str, Any]:
    """One measurement's figures, whichever generator made it: `statuses` counts the answers by
    HTTP status, `exceptions` the requests that got none or a 200 of the wrong API (by kind),
    `latencies` (seconds, sorted) are the right answers' (wrk's: every answer's)."""
    ok = statuses.get(200, 0)
    errors = sum(n for s, n in statuses.items() if s != 200) + sum(exceptions.values())
    return {
        "requests": ok + errors,
        "ok": ok,
        "errors": errors,
        "retried": retried,
        "statuses": {str(s): n for s, n in sorted(statuses.items())},
        "exceptions": dict(exceptions),
        "wall_s": round(wall, 3),
        "rps": round(ok / wall, 1) if wall > 0 else 0.0,
        "p50_ms": percentile_ms(latencies, 0.50),
        "p90_ms": percentile_ms(latencies, 0.90),
        "p99_ms": percentile_ms(latencies, 0.99),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 3) if latencies else None,
    }


async def measure(
    base_url: str,
    concurrency: int,
    warmup: float,
    duration: float,
    keep: list[float] | None = None,
    mark: Callable[[], None] | None = None,
    request: ChatRequest | None = None,
) -> dict[str, Any]:
    """Warm up, `mark()`, then measure, over one keep-alive session pooled to `concurrency`:
    `request` (default: OpenAI's chat request with the team's key) to its path on `base_url`."""
    request = request or request_for()
    connector = aiohttp.TCPConnector(
        limit=concurrency, limit_per_host=concurrency, keepalive_timeout=60
    )
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        url = base_url + request.path
        warm = (
            await phase(session, url, concurrency, warmup, request=request)
            if warmup > 0
            else {"requests": 0}
        )
        if mark is not None:
            mark()
        sample = await phase(session, url, concurrency, duration, keep, request)
        sample["warmup_requests"] = warm["requests"]
        return sample


def describe() -> str:
    """The Python client, for a report's header: aiohttp's version and the event loop."""
    loop = "uvloop" if loop_factory() is not None else "asyncio"
    return f"aiohttp {aiohttp.__version__} on {loop}, in the benchmark process"


def _reported_header(name: str) -> bool:
    return name.startswith(("x-aigw-", "x-ratelimit-")) or name == "x-envoy-attempt-count"


async def preflight(
    base_url: str, deadline: float, request: ChatRequest | None = None
) -> dict[str, str]:
    """One request (default: OpenAI's chat request with the team's key) until it answers 200
    (Envoy may still be health-checking the sidecar); that answer must be of the request's API,
    whole (`check_answer`) and by the load generators' check (`ChatRequest.answer_ok`).

    Returns the response's gateway, rate-limit and attempt-count headers.
    """
    request = request or request_for()
    url = base_url + request.path
    last = "no answer"
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            try:
                async with session.post(url, data=request.body, headers=request.headers) as resp:
                    body = await resp.read()
                    if resp.status == 200:
                        try:
                            wrong = check_answer(request.api, json.loads(body))
                        except (ValueError, AttributeError, TypeError, IndexError):
                            wrong = "not the JSON expected"
                        if wrong is None and not request.answer_ok(body):
                            wrong = f"no {request.markers} in it (the load generators' check)"
                        if wrong is not None:
                            raise RuntimeError(
                                f"{url} answered 200 with {wrong}, for {request.answer}: "
                                f"{body[:500]!r}"
                            )
                        return {k: v for k, v in resp.headers.items() if _reported_header(k)}
                    last = f"HTTP {resp.status}: {body[:300].decode(errors='replace')}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} never answered 200; last: {last}")


def check_preflight(scenario: Scenario, headers: dict[str, dict[str, str]]) -> None:
    """The gateway really does what the scenario says (else the numbers measure something else);
    every target (Envoy alone, the floor) answered 200 too, or `preflight` would have raised."""
    gw = headers["gateway"]
    if gw.get("x-aigw-team") != "bench":
        raise RuntimeError(f"the gateway did not identify the caller: {gw}")
    if scenario.quota != "none" and "x-ratelimit-limit-requests" not in gw:
        raise RuntimeError(f"the gateway applied no quota limit: {gw}")
    if scenario.failover:
        for target in headers:
            if headers[target].get("x-envoy-attempt-count") != "2":
                raise RuntimeError(f"{target}: the request was not retried once: {headers[target]}")
        if gw.get("x-aigw-failover") != "true":
            raise RuntimeError(f"the gateway did not report the failover: {gw}")
