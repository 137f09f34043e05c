"""The sidecar's Prometheus metrics: one catalogue, every name and label in one place.

Label values are bounded by construction: organizations, teams, models, backends and guards
are names from the config (a model the config does not know is "unknown"), statuses are HTTP
codes, and every other label takes a value from a fixed set. No label holds raw client input,
but for the opt-in metrics by user (a verified token's claim or a key's owner), whose number of
values each process caps (observability.metrics.max_users).

Several sidecar processes on one port (issue: scale over cores) share the numbers through
prometheus-client's multiprocess mode: the parent sets PROMETHEUS_MULTIPROC_DIR before the
workers import this module, each worker writes its own memory-mapped files there, and any
worker's /metrics answers with the sum over all of them.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as _multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

UNKNOWN = "unknown"  # a model (or team, backend) the config does not name
NONE = "none"  # no team yet (rejected before authentication), no backend (never sent)

# How a request ended. One value per request, exclusive.
OUTCOMES = (
    "served",  # a 2xx answer from the first backend tried
    "failed_over",  # a 2xx answer after Envoy retried on the next pool, or a quota failover
    "quota_rejected",  # 429 from a team's quota
    "guard_blocked",  # a guardrail blocked the request or the response
    "rejected",  # another client error found by the gateway: auth, validation, unknown model
    "backend_error",  # the backend (or Envoy on its way there) answered non-2xx
    "error",  # the gateway failed: quota store down with failure_mode closed, internal error
    "cancelled",  # the client went away before any answer
)

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)

REQUESTS = Counter(
    "extproc_requests",
    "LLM requests by organization, team, model, outcome, HTTP status and the API the client "
    "spoke (openai, anthropic)",
    ["organization", "team", "model", "outcome", "status", "api"],
)
TOKENS = Counter(
    "extproc_tokens",
    "Tokens by organization, team, model, backend, type (input, output, cached_input) and "
    "source (provider: the backend's usage report; estimate: the sidecar's own count)",
    ["organization", "team", "model", "backend", "type", "source"],
)
COST = Counter(
    "extproc_cost_usd",
    "USD spent at the config's prices (models without a price count nothing)",
    ["organization", "team", "model"],
)
# By user: only with observability.metrics.users, and at most metrics.max_users users per
# process (the rest as "other"): users are not config names, and each is a series.
USER_REQUESTS = Counter(
    "extproc_user_requests",
    "LLM requests by user (observability.metrics.users), with their organization, team and outcome",
    ["organization", "team", "user", "outcome"],
)
USER_TOKENS = Counter(
    "extproc_user_tokens",
    "Tokens by user (observability.metrics.users), with their organization, team and type",
    ["organization", "team", "user", "type"],
)
USER_COST = Counter(
    "extproc_user_cost_usd",
    "USD spent by user (observability.metrics.users) at the config's prices",
    ["organization", "team", "user"],
)
OTHER_USERS = "other"  # the users past observability.metrics.max_users
FAILOVERS = Counter(
    "extproc_failovers",
    "Requests served by another pool than the first: kind retry (Envoy retried after a "
    "failure) or quota (the team's quota for the first pool was exhausted)",
    ["model", "backend", "kind"],
)
PHASE_SECONDS = Histogram(
    "extproc_ext_proc_phase_seconds",
    "Time the sidecar took to answer one ext_proc message, by stage and phase",
    ["stage", "phase"],
    buckets=_LATENCY_BUCKETS,
)
TTFT_SECONDS = Histogram(
    "extproc_time_to_first_token_seconds",
    "From the request reaching the sidecar to the first chunk of a streamed answer",
    ["model"],
    buckets=_TTFT_BUCKETS,
)
CHUNK_GAP_SECONDS = Histogram(
    "extproc_stream_chunk_gap_seconds",
    "Time between two chunks of a streamed answer",
    ["model"],
    buckets=_GAP_BUCKETS,
)
GUARD_SECONDS = Histogram(
    "extproc_guard_call_seconds",
    "Duration of one external guard call (guardrail model or webhook)",
    ["guard", "stage"],
    buckets=_LATENCY_BUCKETS,
)
GUARD_ERRORS = Counter(
    "extproc_guard_errors",
    "External guard calls that failed (on_error then decided): reason timeout, connect, "
    "http_status or bad_reply",
    ["guard", "reason"],
)
GUARD_VERDICTS = Counter(
    "extproc_guard_verdicts",
    "Guard decisions by guard, stage and action (allow, rewrite: masked or replaced, block)",
    ["guard", "stage", "action"],
)
QUOTA_SECONDS = Histogram(
    "extproc_quota_store_seconds",
    "Duration of one quota store operation (reserve, settle)",
    ["store", "operation"],
    buckets=_LATENCY_BUCKETS,
)
QUOTA_ERRORS = Counter(
    "extproc_quota_store_errors",
    "Quota store operations that failed (the failure_mode then decided)",
    ["store", "operation"],
)
QUOTA_SETTLE_RETRIES = Counter(
    "extproc_quota_settle_retries",
    "Retries of quota settlements (and releases) the store failed, by result: settled (went "
    "through), failed (another follows, later), abandoned (given up: the reservation expired "
    "meanwhile, too many were pending, or the process stopped; charged at its estimate)",
    ["store", "result"],
)
ACTIVE_STREAMS = Gauge(
    "extproc_active_streams",
    "Streamed (SSE) answers being followed right now",
    multiprocess_mode="livesum",
)
EXT_PROC_STREAMS = Gauge(
    "extproc_ext_proc_streams",
    "Open ext_proc gRPC streams from Envoy, by stage",
    ["stage"],
    multiprocess_mode="livesum",
)
ACCESS_LOG_ENTRIES = Counter(
    "extproc_access_log_entries",
    "Envoy access log entries of answers the sidecar did not read, by result",
    ["result"],
)
CONFIG_RELOADS = Counter(
    "extproc_config_reloads",
    "Config reloads by result (applied, rejected)",
    ["result"],
)
# Why a token count is not tiktoken's exact count of the whole text (TokenCount.exact=False
# for these, besides the request shapes that are estimated by design: images, tools).
TOKEN_COUNT_REASONS = (
    "unavailable",  # the model's encoding could not be loaded: ceil(utf-8 bytes / 4)
    "tokenizer_error",  # tiktoken failed on a piece of text: that piece was estimated
    "budget",  # sidecar.count_budget_ms ran out: the text not yet counted was estimated
    "hard_cut",  # a long text had no safe place to split: each cut may shift the count by 1
)
TOKEN_COUNT_ESTIMATES = Counter(
    "extproc_token_count_estimates",
    "Token counts that are partly estimates, by reason (a count may have several): "
    "unavailable, tokenizer_error, budget or hard_cut",
    ["reason"],
)
TOKEN_COUNT_SECONDS = Histogram(
    "extproc_token_count_seconds",
    "Time to count a long prompt on the tokenizer threads, the wait for one included",
    buckets=_LATENCY_BUCKETS,
)


_CHILDREN: dict[tuple[object, tuple[str, ...]], Any] = {}


def child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, looked up once: labels() checks and locks on every call, a few
    microseconds that several metrics a request add up to. As bounded as the labels (above);
    nothing removes a child."""
    key = (metric, values)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*values)
    return found


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def exposition() -> bytes:
    """The text exposition of every metric: this process's, or all workers' summed."""
    path = multiprocess_dir()
    if path is None:
        from prometheus_client import REGISTRY

        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry, path)
    return generate_latest(registry)


def process_exited(pid: int, path: str | None = None) -> None:
    """A worker is gone: its live gauges (active streams) stop counting."""
    path = path or multiprocess_dir()
    if path is not None:
        _multiprocess.mark_process_dead(pid, path)


def outcome_of(status: int, code: str | None, failed_over: bool) -> str:
    """The outcome of a request from its final status and the gateway's error code."""
    if code is not None and code.startswith("guard_blocked"):
        return "guard_blocked"  # also a stream a response guard cut after its 200
    if code is not None and code.startswith("provider_error"):
        return "backend_error"  # a stream the backend failed after its 200 (an error event)
    if 200 <= status < 300:
        return "failed_over" if failed_over else "served"
    if status == 0:
        return "cancelled"
    if code is None:
        return "backend_error"
    if code.startswith("quota_exceeded"):
        return "quota_rejected"
    if status >= 500:
        return "error"
    return "rejected"
