"""From a team's limits and one request to the counters it charges, and what it costs in each."""

from __future__ import annotations

import calendar
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from ..config import Config, Limit, limit_models, limit_name
from .store import Charge

_FIXED = {"minute": 60, "hour": 3600, "day": 86400}
TOKEN_METRICS = frozenset({"tokens", "input_tokens", "output_tokens"})
# USD budgets are counted in micro-dollars so that every store does integer arithmetic.
MICRO = 1_000_000


def window_bounds(window: str, now: float) -> tuple[int, int]:
    """[start, end) of the calendar window (UTC) that holds `now`."""
    if window in _FIXED:
        size = _FIXED[window]
        start = int(now // size) * size
        return start, start + size
    t = datetime.fromtimestamp(now, UTC)
    start = calendar.timegm((t.year, t.month, 1, 0, 0, 0))
    days = calendar.monthrange(t.year, t.month)[1]
    return start, start + days * 86400


TEAM = "team"


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """A configured limit, resolved: its name, what it counts, and which models; the level of
    the hierarchy it belongs to, and where its counters are (quota/budgets.py)."""

    name: str
    metric: str
    window: str
    limit: int  # tokens, requests, or micro-USD
    models: frozenset[str]
    # Lists its models (rather than counting all of the team's): a model's quota failover
    # skips such limits when it serves from the next pool.
    scoped: bool = False
    level: str = TEAM  # organization | team | user | key
    # What its counters' names start with in the store's scope ("" for a team's own limits
    # in the team's scope, as before there were levels).
    counter: str = ""

    @property
    def label(self) -> str:
        """How a 429, the hand-over and the admin API name it: a team limit by its name (as
        before there were levels), any other as "<level>:<name>"."""
        return self.name if self.level == TEAM else f"{self.level}:{self.name}"


@dataclass(frozen=True, slots=True)
class Amounts:
    input_tokens: int
    output_tokens: int
    requests: int = 1
    # Of the input, read from and written to the provider's prompt cache: priced apart
    # (Price.micro_usd); a reservation's estimate has none, so it is never under a settlement.
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0  # of the output


def specs_of(
    cfg: Config,
    limits: Iterable[Limit],
    models: tuple[str, ...],
    level: str = TEAM,
    counter: str = "",
) -> tuple[LimitSpec, ...]:
    """One level's limits, resolved; `models`: what a limit without a list counts."""
    return tuple(
        LimitSpec(
            name=limit_name(limit),
            metric=limit.metric,
            window=limit.window,
            limit=_limit_value(limit),
            models=frozenset(limit_models(cfg, models, limit)),
            scoped=limit.models is not None,
            level=level,
            counter=counter,
        )
        for limit in limits
    )


def _limit_value(limit: Limit) -> int:
    if limit.usd is not None:
        return math.floor(limit.usd * MICRO)
    value = getattr(limit, limit.metric)
    assert isinstance(value, int)
    return value


def amount(spec: LimitSpec, amounts: Amounts, cfg: Config, model: str) -> int:
    if spec.metric == "tokens":
        return amounts.input_tokens + amounts.output_tokens
    if spec.metric == "input_tokens":
        return amounts.input_tokens
    if spec.metric == "output_tokens":
        return amounts.output_tokens
    if spec.metric == "requests":
        return amounts.requests
    price = cfg.prices[model]  # validated at load for every model a USD limit counts
    # Rounded up so a budget is never undercounted.
    return math.ceil(
        price.micro_usd(
            amounts.input_tokens,
            amounts.output_tokens,
            amounts.cached_input_tokens,
            amounts.cache_write_tokens,
            amounts.reasoning_tokens,
        )
    )


def applicable(specs: tuple[LimitSpec, ...], model: str) -> tuple[LimitSpec, ...]:
    return tuple(s for s in specs if model in s.models)


def charges(
    specs: tuple[LimitSpec, ...],
    amounts: Amounts,
    cfg: Config,
    model: str,
    now: float,
    slack_s: float,
) -> tuple[Charge, ...]:
    out = []
    for spec in specs:
        start, end = window_bounds(spec.window, now)
        out.append(
            Charge(
                counter=counter_name(spec, start),
                limit=spec.limit,
                amount=amount(spec, amounts, cfg, model),
                expires_at=end + slack_s,
            )
        )
    return tuple(out)


def counter_name(spec: LimitSpec, window_start: int) -> str:
    """The store's name of a limit's counter in the window that starts at `window_start`."""
    return f"{spec.counter}{spec.name}:{window_start}"


def go_duration(seconds: float) -> str:
    """OpenAI's reset headers use Go's duration format: 17ms, 1.5s, 6m0s, 1h0m0s."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    total_ms = round(seconds * 1000)
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = rest / 1000
    sec_text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{sec_text}"
    if minutes:
        return f"{minutes}m{sec_text}"
    return sec_text
