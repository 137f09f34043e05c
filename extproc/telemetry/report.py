"""What one request reports when it ends: its metrics, its audit record, its span's attributes.

A request's facts are gathered by the stage that sees them (RequestReport); they are reported
once, by the stage that sees the request end: the downstream stage for answers it follows to
the end, the stream observer for the streams it takes over, the access log's reader for
requests released with their body (these may run in another process, so the downstream stage
hands them the report's first half in the forwarded metadata). The request itself is counted
by the downstream stage, or for a released request by the access log's reader.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from ..contract import DEFAULT_WIRE
from ..guard.detectors import find_all, known_kinds, mask
from . import metrics

if TYPE_CHECKING:
    from ..config import Config
    from ..contract import Handover
    from ..guard.types import Verdict
    from ..identity import Identity
    from ..usage import Usage

# Prompts longer than this are hashed and masked on a worker thread, not on the event loop.
OFF_LOOP_CHARS = 16 * 1024


def team_label(cfg: Config, team: str | None) -> str:
    if not team:
        return metrics.NONE
    return team if team in cfg.teams else metrics.UNKNOWN


def organization_label(cfg: Config, organization: str) -> str:
    if not organization:
        return metrics.NONE
    return organization if organization in cfg.organizations else metrics.UNKNOWN


# The users this process has given a series of their own (observability.metrics.max_users).
_USERS: set[tuple[str, str]] = set()


def user_label(cfg: Config, team: str, user: str) -> str | None:
    """The user's label value; None: no metrics by user (observability.metrics.users off)."""
    settings = cfg.observability.metrics
    if not settings.users:
        return None
    if not user:
        return metrics.NONE
    if (team, user) not in _USERS:
        if len(_USERS) >= settings.max_users:
            return metrics.OTHER_USERS
        _USERS.add((team, user))
    return user


def model_label(cfg: Config, model: str | None) -> str:
    if not model:
        return metrics.NONE
    # A client may send any string as its model: only configured names become label values.
    return model if model in cfg.models else metrics.UNKNOWN


def backend_label(cfg: Config, backend: str | None) -> str:
    if not backend:
        return metrics.NONE
    return backend if backend in cfg.backends else metrics.UNKNOWN


def cost_usd(cfg: Config, model: str | None, usage: Usage) -> float | None:
    price = cfg.prices.get(model) if model else None
    if price is None:
        return None
    return (
        price.micro_usd(
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            usage.cache_write_tokens,
            usage.reasoning_tokens,
        )
        / 1e6
    )


def verdict_entries(stage: str, verdicts: list[Verdict]) -> list[dict[str, Any]]:
    """Verdicts as the audit record keeps them: what was decided and why, never the text."""
    out = []
    for v in verdicts:
        entry: dict[str, Any] = {"stage": stage, "guard": v.guard, "action": v.action}
        if v.reason:
            entry["reason"] = v.reason
        if v.categories:
            entry["categories"] = list(v.categories)
        if v.counts:
            entry["counts"] = dict(v.counts)
        out.append(entry)
    return out


def prompt_fields(texts: list[str], include_prompt: bool) -> dict[str, Any]:
    """The prompt's fingerprint (and, when enabled, its text with PII and secrets masked).
    The hash is of the prompt as it left the gateway (after the guards' masks)."""
    digest = hashlib.sha256(orjson.dumps(texts)).hexdigest()
    out: dict[str, Any] = {"prompt_sha256": digest}
    if include_prompt:
        kinds = known_kinds()
        out["prompt"] = [mask(t, find_all(t, kinds)) for t in texts]
    return out


@dataclass(slots=True)
class RequestReport:
    """A request's facts, filled in as its phases pass."""

    started_at: float = field(default_factory=time.time)
    request_id: str = ""
    team: str | None = None
    # Who called, around the team (identity.Identity): audit records and traces; "" for none.
    organization: str = ""
    user: str = ""
    key: str = ""
    model: str | None = None
    endpoint: str = ""
    api: str = DEFAULT_WIRE  # the client's wire format (extproc/wire/)
    stream: bool = False
    backend: str | None = None
    provider_model: str | None = None
    provider: str | None = None  # the API the backend speaks (its type), when known
    status: int = 0
    code: str | None = None  # the gateway's error code when it answered itself
    failover: str = ""  # "retry" (Envoy retried on the next pool) or "quota"
    attempts: int = 1
    path: str = ""  # how the answer passed: buffered, logged, inline or observed
    guards: list[dict[str, Any]] = field(default_factory=list)
    prompt: dict[str, Any] = field(default_factory=dict)  # prompt_fields()
    trace_id: str = ""

    def identify(self, who: Identity) -> None:
        self.team = who.team
        self.organization, self.user, self.key = who.organization, who.user, who.key

    @property
    def outcome(self) -> str:
        return metrics.outcome_of(self.status, self.code, bool(self.failover))

    def handover(self) -> dict[str, Any]:
        """What the stage that finishes the request needs to write its audit record: Handover
        fields (extproc.contract)."""
        prompt = self.prompt.get("prompt")
        return {
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "guards": tuple(self.guards),
            "prompt_sha256": self.prompt.get("prompt_sha256", ""),
            "prompt": tuple(prompt) if prompt is not None else None,
        }

    @classmethod
    def from_handover(
        cls, handover: Handover, stream: bool = True, path: str = "observed"
    ) -> RequestReport:
        report = cls(
            started_at=handover.started_at,
            request_id=handover.request_id,
            team=handover.team or None,
            organization=handover.organization,
            user=handover.user,
            key=handover.key,
            model=handover.model or None,
            endpoint=handover.endpoint,
            api=handover.wire,
            stream=stream,
            path=path,
            trace_id=handover.trace_id,
        )
        report.guards = list(handover.guards)
        if handover.prompt_sha256:
            report.prompt["prompt_sha256"] = handover.prompt_sha256
        if handover.prompt is not None:
            report.prompt["prompt"] = list(handover.prompt)
        if handover.pool:
            report.failover = "quota"
        return report

    def count_request(self, cfg: Config) -> None:
        """The request's outcome (once per request: by the downstream stage, or the access log's
        reader for a released request)."""
        model, team = model_label(cfg, self.model), team_label(cfg, self.team)
        org = organization_label(cfg, self.organization)
        outcome = self.outcome
        metrics.child(
            metrics.REQUESTS, org, team, model, outcome, str(self.status or 0), self.api
        ).inc()
        user = user_label(cfg, team, self.user)
        if user is not None:
            metrics.child(metrics.USER_REQUESTS, org, team, user, outcome).inc()
        if self.failover and 200 <= self.status < 300:
            metrics.child(
                metrics.FAILOVERS, model, backend_label(cfg, self.backend), self.failover
            ).inc()

    def count_usage(self, cfg: Config, usage: Usage | None) -> float | None:
        """Tokens and cost (once per request, by the stage that settles it)."""
        if usage is None:
            return None
        team, model = team_label(cfg, self.team), model_label(cfg, self.model)
        org, backend = organization_label(cfg, self.organization), backend_label(cfg, self.backend)
        user = user_label(cfg, team, self.user)
        source = usage.source
        # Each token once, by what it is priced as (Price.micro_usd).
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        written = min(usage.cache_write_tokens, usage.prompt_tokens - cached)
        reasoning = min(usage.reasoning_tokens, usage.completion_tokens)
        kinds = (
            ("input", usage.prompt_tokens - cached - written),
            ("cached_input", cached),
            ("cache_write_input", written),
            ("output", usage.completion_tokens - reasoning),
            ("reasoning_output", reasoning),
        )
        for kind, count in kinds:
            if count:
                metrics.child(metrics.TOKENS, org, team, model, backend, kind, source).inc(count)
                if user is not None:
                    metrics.child(metrics.USER_TOKENS, org, team, user, kind).inc(count)
        cost = cost_usd(cfg, self.model, usage)
        if cost:
            metrics.child(metrics.COST, org, team, model).inc(cost)
            if user is not None:
                metrics.child(metrics.USER_COST, org, team, user).inc(cost)
        return cost

    def span_attributes(self, usage: Usage | None, cost: float | None) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "http.response.status_code": self.status,
            "extproc.outcome": self.outcome,
            "extproc.backend": self.backend,
            "gen_ai.response.model": self.provider_model,
            "gen_ai.system": self.provider,
            "extproc.error_code": self.code,
            "extproc.failover": self.failover or None,
        }
        if usage is not None:
            attrs["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            attrs["gen_ai.usage.output_tokens"] = usage.completion_tokens
            attrs["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
            attrs["extproc.token_source"] = usage.source
        if cost is not None:
            attrs["extproc.cost_usd"] = cost
        return attrs

    def end_span(self, trace: Any, usage: Usage | None, cost: float | None) -> None:
        """The request's span gets its attributes and ends, marked failed when the gateway or
        the backend failed it."""
        trace.set(self.span_attributes(usage, cost))
        outcome = self.outcome
        trace.end(outcome if outcome in ("error", "backend_error") else None)

    def audit_record(
        self,
        usage: Usage | None,
        cost: float | None,
        duration_s: float,
        timing: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(self.started_at, UTC).isoformat(timespec="milliseconds"),
            "request_id": self.request_id,
            "organization": self.organization or None,
            "team": self.team,
            "user": self.user or None,
            "key": self.key or None,
            "model": self.model,
            "endpoint": self.endpoint,
            "api": self.api,
            "stream": self.stream,
            "backend": self.backend,
            "provider_model": self.provider_model,
            "provider": self.provider,
            "status": self.status,
            "outcome": self.outcome,
            "decision": _decision(self.outcome),
            "error_code": self.code,
            "failover": self.failover or None,
            "attempts": self.attempts,
            "path": self.path or None,
            "tokens": None,
            "cost_usd": round(cost, 8) if cost is not None else None,
            "latency_ms": round(duration_s * 1000, 3),
            "guards": self.guards,
        }
        if usage is not None:
            record["tokens"] = {
                "input": usage.prompt_tokens,
                "output": usage.completion_tokens,
                "cached_input": usage.cached_tokens,
                "cache_write_input": usage.cache_write_tokens,
                "reasoning_output": usage.reasoning_tokens,
                "total": usage.total_tokens,
                "source": usage.source,
            }
        if timing:
            record["ttft_ms"] = timing.get("ttft_ms")
            record["chunks"] = timing.get("chunks")
        record.update(self.prompt)
        if self.trace_id:
            record["trace_id"] = self.trace_id
        return record


def _decision(outcome: str) -> str:
    if outcome in ("served", "failed_over", "backend_error"):
        return "allowed"
    return "blocked" if outcome == "guard_blocked" else "rejected"
