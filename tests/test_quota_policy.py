"""Quota policy: windows, which limits apply, what a request costs in each, the headers."""

from __future__ import annotations

import asyncio
import calendar

import orjson
import pytest

from extproc.config import QuotaSettings, parse_config
from extproc.errors import GatewayError
from extproc.quota import policy
from extproc.quota.budgets import Budgets
from extproc.quota.policy import Amounts, applicable, go_duration, window_bounds
from extproc.quota.service import QuotaService, requested_output
from extproc.quota.store import CounterState, QuotaStore, ReserveResult, StoreUnavailable
from extproc.wire.openai import CHAT, COMPLETIONS, EMBEDDINGS, OPENAI

T = calendar.timegm((2026, 2, 14, 13, 45, 30))


def cfg(limits, **extra):
    return parse_config(
        {
            "teams": {"t": {"keys": [{"sha256": "0" * 64}], "limits": limits}},
            "backends": {"b": {"url": "http://127.0.0.1:1/v1"}},
            "models": {
                "gpt-4o": {"targets": [{"backend": "b"}]},
                "mini": {"targets": [{"backend": "b"}]},
            },
            **extra,
        }
    )


@pytest.mark.parametrize(
    ("window", "start", "end"),
    [
        (
            "minute",
            calendar.timegm((2026, 2, 14, 13, 45, 0)),
            calendar.timegm((2026, 2, 14, 13, 46, 0)),
        ),
        (
            "hour",
            calendar.timegm((2026, 2, 14, 13, 0, 0)),
            calendar.timegm((2026, 2, 14, 14, 0, 0)),
        ),
        ("day", calendar.timegm((2026, 2, 14, 0, 0, 0)), calendar.timegm((2026, 2, 15, 0, 0, 0))),
        ("month", calendar.timegm((2026, 2, 1, 0, 0, 0)), calendar.timegm((2026, 3, 1, 0, 0, 0))),
    ],
)
def test_calendar_windows(window, start, end):
    assert window_bounds(window, T) == (start, end)


def test_december_rolls_into_the_next_year():
    t = calendar.timegm((2026, 12, 31, 23, 59, 59))
    assert window_bounds("month", t) == (
        calendar.timegm((2026, 12, 1, 0, 0, 0)),
        calendar.timegm((2027, 1, 1, 0, 0, 0)),
    )


def test_amounts_per_metric_and_scope():
    c = cfg(
        [
            {"window": "minute", "tokens": 1000},
            {"window": "minute", "input_tokens": 500},
            {"window": "day", "output_tokens": 300},
            {"window": "minute", "requests": 10},
            {"window": "month", "usd": 5, "models": ["gpt-4o"]},
        ],
        prices={"gpt-4o": {"input": 2.5, "output": 10}},
    )
    specs = Budgets.of(c).teams["t"]
    assert [s.name for s in specs] == [
        "tokens-minute",
        "input_tokens-minute",
        "output_tokens-day",
        "requests-minute",
        "usd-month",
    ]
    assert [s.name for s in applicable(specs, "mini")] == [s.name for s in specs[:4]]
    charges = policy.charges(specs, Amounts(100, 40), c, "gpt-4o", T, 60)
    # 100 input x $2.5/M + 40 output x $10/M = $0.00065 = 650 micro-USD
    assert [ch.amount for ch in charges] == [140, 100, 40, 1, 650]
    assert charges[0].counter == f"tokens-minute:{window_bounds('minute', T)[0]}"
    assert charges[4].limit == 5_000_000
    assert charges[0].expires_at == window_bounds("minute", T)[1] + 60


def test_model_groups_expand():
    c = cfg(
        [{"window": "hour", "tokens": 10, "models": ["premium"]}],
        model_groups={"premium": ["gpt-4o"]},
    )
    (spec,) = Budgets.of(c).teams["t"]
    assert spec.models == frozenset({"gpt-4o"})


@pytest.mark.parametrize(
    ("body", "endpoint", "expected"),
    [
        ({}, CHAT, 4096),
        ({"max_tokens": 50}, CHAT, 50),
        ({"max_completion_tokens": 70, "max_tokens": 50}, CHAT, 70),
        ({"max_tokens": 50, "n": 3}, CHAT, 150),
        ({"max_tokens": True}, CHAT, 4096),
        ({"max_tokens": -5}, COMPLETIONS, 4096),
        ({"max_tokens": 50}, EMBEDDINGS, 0),
    ],
)
def test_requested_output(body, endpoint, expected):
    text = {CHAT: {"messages": [{"role": "user", "content": "hi"}]}, COMPLETIONS: {"prompt": "x"}}
    raw = orjson.dumps({"model": "m", **text.get(endpoint, {"input": "x"}), **body})
    assert requested_output(OPENAI.parse(endpoint, raw), 4096) == expected


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.017, "17ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.24, "59.24s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
        (3723.5, "1h2m3.5s"),
        (0, "0s"),
    ],
)
def test_go_duration(seconds, text):
    assert go_duration(seconds) == text


class _FakeStore(QuotaStore):
    """A scripted store for the service's own logic (the real stores have their own suite)."""

    def __init__(self, result=None, fail=False):
        self.result, self.fail = result, fail
        self.settled: list = []

    async def reserve(self, team, reservation_id, charges, ttl_s):
        if self.fail:
            raise StoreUnavailable("down")
        self.charges = charges
        return self.result(charges)

    async def settle(self, team, reservation_id, actual):
        self.settled.append(list(actual))
        return True

    async def usage(self, team, counters):
        return ()

    async def reset(self, team):
        return 0


def _run(service, c):
    specs = Budgets.of(c).teams["t"]
    return asyncio.run(service.reserve(c, "t", "gpt-4o", specs, Amounts(100, 50)))


def test_429_names_the_limit_with_retry_after_and_openai_headers():
    c = cfg([{"window": "minute", "tokens": 1000}, {"window": "minute", "requests": 5}])
    store = _FakeStore(
        lambda ch: ReserveResult(
            False, (CounterState(ch[0].counter, 900, 0), CounterState(ch[1].counter, 2, 0)), 0
        )
    )
    with pytest.raises(GatewayError) as info:
        _run(QuotaService(store, QuotaSettings()), c)
    err = info.value
    assert err.status == 429
    assert err.code == "quota_exceeded:tokens-minute"
    assert err.type == "tokens"
    headers = dict(err.headers)
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == "100"
    assert headers["x-ratelimit-limit-requests"] == "5"
    assert headers["x-ratelimit-remaining-requests"] == "3"
    assert "used 900, requested 150" in err.message


def test_a_request_bigger_than_the_whole_limit_has_no_retry_after():
    c = cfg([{"window": "minute", "tokens": 100}])
    store = _FakeStore(lambda ch: ReserveResult(False, (CounterState(ch[0].counter, 0, 0),), 0))
    with pytest.raises(GatewayError) as info:
        _run(QuotaService(store, QuotaSettings()), c)
    assert "retry-after" not in dict(info.value.headers)
    assert "more than the whole" in info.value.message


def test_store_failure_closed_is_503_open_admits():
    c = cfg([{"window": "minute", "tokens": 1000}])
    closed = QuotaService(_FakeStore(fail=True), QuotaSettings(failure_mode="closed"))
    with pytest.raises(GatewayError) as info:
        _run(closed, c)
    assert (info.value.status, info.value.code) == (503, "quota_store_unavailable")
    opened = QuotaService(_FakeStore(fail=True), QuotaSettings(failure_mode="open"))
    assert _run(opened, c) is None
    assert opened.failures == 1


def test_settle_sends_actual_amounts_per_limit_once():
    c = cfg(
        [{"window": "minute", "tokens": 10_000}, {"window": "day", "usd": 1}],
        prices={"gpt-4o": {"input": 2.5, "output": 10}, "mini": {"input": 0.15, "output": 0.6}},
    )
    store = _FakeStore(
        lambda ch: ReserveResult(True, tuple(CounterState(x.counter, 0, x.amount) for x in ch))
    )
    service = QuotaService(store, QuotaSettings())

    async def go():
        res = await service.reserve(c, "t", "gpt-4o", Budgets.of(c).teams["t"], Amounts(100, 50))
        service.settle_soon(res, Amounts(80, 20))
        service.settle_soon(res, Amounts(80, 20))  # a second settle is ignored
        await service.drain()
        return res

    res = asyncio.run(go())
    # 80 x 2.5 + 20 x 10 = 400 micro-USD
    assert store.settled == [[100, 400]]
    assert res.settled
    headers = service.rate_headers(res.specs, res.states)
    assert headers["x-ratelimit-remaining-tokens"] == str(10_000 - 150)
    assert "x-ratelimit-limit-requests" not in headers


def test_config_errors_for_limits():
    from extproc.config import ConfigError

    with pytest.raises(ConfigError) as info:
        cfg(
            [
                {"window": "minute", "tokens": 10, "requests": 5},
                {"window": "week", "tokens": 10},
                {"window": "day", "usd": 1},
                {"window": "day", "tokens": 1, "models": ["nope"]},
            ]
        )
    paths = [p for p, _ in info.value.problems]
    assert paths == ["teams.t.limits.0", "teams.t.limits.1.window"]
    with pytest.raises(ConfigError) as info:
        cfg(
            [
                {"window": "day", "usd": 1},
                {"window": "day", "tokens": 1, "models": ["nope"]},
                {"window": "day", "tokens": 2, "models": ["mini"]},
            ]
        )
    assert info.value.problems == [
        ("teams.t.limits.0.usd", "no price for gpt-4o, mini (prices:)"),
        ("teams.t.limits.1.models.0", "unknown model or group 'nope'"),
        ("teams.t.limits.2.name", "two limits are called 'tokens-day': name them"),
    ]
