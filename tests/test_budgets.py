"""Who is calling, below and above the team, and the budgets of every level: the config, the
identity of a key or a token, the counters a request charges, and one reservation holding
every level at once under concurrency, on the embedded store, Redis and a Redis Cluster."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from types import SimpleNamespace
from typing import Any

import pytest

from extproc import identity, settlement
from extproc.config import ConfigError, build_runtime, parse_config
from extproc.contract import Handover
from extproc.errors import GatewayError
from extproc.identity import Identity
from extproc.quota.budgets import Budgets, moved_teams, user_tag
from extproc.quota.memory import MemoryStore
from extproc.quota.policy import Amounts, counter_name, window_bounds
from extproc.quota.redis_store import RedisStore
from extproc.quota.service import QuotaService
from extproc.quota.store import QuotaStore

from .redis_servers import RedisClusterNodes, RedisServer, redis_cluster, redis_server  # noqa: F401


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


MODELS = {
    "big": {"targets": [{"backend": "b"}]},
    "small": {"targets": [{"backend": "b"}]},
    "other": {"targets": [{"backend": "b"}]},
}


def config(**sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "backends": {"b": {"url": "http://127.0.0.1:1/v1"}},
        "models": MODELS,
        "model_groups": {"cheap": ["small"]},
        "organizations": {
            "acme": {"limits": [{"name": "monthly", "window": "month", "tokens": 1000}]}
        },
        "teams": {
            "ml": {
                "organization": "acme",
                "keys": [
                    {"sha256": sha("sk-jane"), "user": "jane@acme.test"},
                    {
                        "sha256": sha("sk-bot"),
                        "name": "bot",
                        "models": ["cheap"],
                        "limits": [{"window": "day", "requests": 5}],
                    },
                ],
                "limits": [{"name": "daily", "window": "day", "tokens": 500}],
                "user_limits": [{"name": "daily", "window": "day", "tokens": 100}],
                "users": {
                    "boss@acme.test": {
                        "limits": [{"name": "daily", "window": "day", "tokens": 300}]
                    }
                },
            },
            "solo": {
                "keys": [{"sha256": sha("sk-solo"), "user": "sam"}],
                "limits": [{"name": "daily", "window": "day", "tokens": 50}],
                "user_limits": [{"name": "hourly", "window": "hour", "tokens": 20}],
            },
        },
    }
    data.update(sections)
    return data


def problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        build_runtime(parse_config(data))
    return caught.value.problems


# -- the config ---------------------------------------------------------------------------------


def test_every_level_is_checked_at_load_with_its_field() -> None:
    data = config()
    data["teams"]["ml"]["organization"] = "nobody"
    data["teams"]["solo"]["keys"][0]["limits"] = [{"window": "day", "tokens": 1}]
    data["teams"]["solo"]["user_limits"] = [
        {"window": "day", "tokens": 1},
        {"window": "day", "tokens": 2},
    ]
    data["organizations"]["acme"]["models"] = ["nope"]
    found = problems(data)
    assert ("teams.ml.organization", "unknown organization 'nobody'") in found
    assert ("teams.solo.keys.0.name", "a key with limits needs a name") in found
    assert (
        "teams.solo.user_limits.1.name",
        "two limits are called 'tokens-day': name them",
    ) in found
    assert ("organizations.acme.models.0", "unknown model or group 'nope'") in found
    data = config()
    data["teams"]["solo"]["users"] = {"line\nbreak": {}}  # it would reach logs as two lines
    assert [path for path, _ in problems(data)] == ["teams.solo.users.line\nbreak.[key]"]
    data = config()
    data["teams"]["solo"]["keys"][0]["name"] = "jwt:corp"  # a token caller's label
    assert problems(data) == [("teams.solo.keys.0.name", "may not start with 'jwt:' or 'key_'")]


def test_an_organization_narrows_its_teams_models() -> None:
    data = config()
    data["organizations"]["acme"]["models"] = ["cheap"]
    rt = build_runtime(parse_config(data))
    assert rt.team_models["ml"] == ("small",)
    assert rt.team_models["solo"] == ("big", "small", "other")
    data["teams"]["ml"]["models"] = ["big"]
    assert problems(data) == [("teams.ml.models.0", "organization acme may not use it")]


def test_a_usd_limit_at_any_level_needs_the_prices_of_what_it_counts() -> None:
    data = config()
    data["organizations"]["acme"]["limits"] = [{"window": "month", "usd": 10}]
    found = problems(data)
    assert found == [
        ("organizations.acme.limits.0.usd", "no price for big, small, other (prices:)")
    ]


# -- who is calling -----------------------------------------------------------------------------


def test_a_key_names_its_team_organization_user_and_models() -> None:
    rt = build_runtime(parse_config(config()))
    jane = identity.authenticate(rt, {"authorization": "Bearer sk-jane"})
    assert jane == Identity("ml", "acme", "jane@acme.test", "ml#0", None)
    bot = identity.authenticate(rt, {"authorization": "Bearer sk-bot"})
    assert (bot.user, bot.key, bot.models) == ("", "bot", frozenset({"small"}))
    assert bot.may_use(rt, "small") and not bot.may_use(rt, "big")
    assert identity.authenticate(rt, {"x-api-key": "sk-solo"}) == Identity(
        "solo", "", "sam", "solo#0"
    )


JWT = {
    "corp": {
        "issuer": "https://idp.test/",
        "jwks": {"uri": "https://idp.test/jwks"},
        "teams": [{"claim": "groups", "value": "ml", "team": "ml"}],
        "user_claim": "email",
        "models": [
            {"claim": "groups", "value": "research", "models": ["big"]},
            {"claim": ["realm", "roles"], "value": "cheap", "models": ["cheap"]},
        ],
    }
}


def test_a_tokens_claims_name_its_user_and_the_models_its_groups_may_use() -> None:
    rt = build_runtime(parse_config(config(identities={"jwt": JWT})))

    def who(**claims: Any) -> Identity:
        return identity.authenticate(rt, {}, {"corp": claims})

    both = who(groups=["ml", "research"], email="ann@acme.test", realm={"roles": ["cheap"]})
    models = frozenset({"big", "small"})
    assert both == Identity("ml", "acme", "ann@acme.test", "jwt:corp", models)
    ann = who(groups=["ml"], email="ann@acme.test")
    assert ann.models == frozenset() and not ann.may_use(rt, "small")  # no model rule
    # A number names a user too (some providers' subjects are numbers), and so may any
    # printable text: counters hash it.
    assert who(groups=["ml"], email=7).user == "7"
    assert who(groups=["ml"], email="a|b@acme.test").user == "a|b@acme.test"
    # No usable user claim, in a team whose budgets are per user: refused, not served as
    # nobody (which would escape the user budget).
    for odd in (None, True, "", "x" * 300, "line\nbreak", "rtl\u202eoverride"):
        with pytest.raises(GatewayError) as caught:
            who(groups=["ml"], email=odd)
        assert (caught.value.status, caught.value.code) == (403, "no_user_for_token")
    with pytest.raises(GatewayError) as caught:
        who(groups=["marketing"], email="x@acme.test")
    assert caught.value.code == "no_team_for_token"


def test_without_model_rules_a_token_may_use_its_teams_models() -> None:
    jwt = {"corp": {**JWT["corp"], "models": None}}
    rt = build_runtime(parse_config(config(identities={"jwt": jwt})))
    claims = {"groups": ["ml"], "email": "ann@acme.test"}
    caller = identity.authenticate(rt, {}, {"corp": claims})
    assert caller.models is None and caller.may_use(rt, "other")


# -- the counters of each level -----------------------------------------------------------------


def test_the_counters_of_a_request_are_in_one_scope_named_by_level() -> None:
    cfg = parse_config(config())
    budgets = Budgets.of(cfg)
    now = 1_800_000_000.0
    day = window_bounds("day", now)[0]
    month = window_bounds("month", now)[0]
    jane = Identity("ml", "acme", "jane@acme.test", "ml#0")
    names = [counter_name(s, window_bounds(s.window, now)[0]) for s in budgets.all_of(jane)]
    tag = user_tag("jane@acme.test")
    assert names == [f"o|monthly:{month}", f"t|ml|daily:{day}", f"t|ml|u|{tag}|daily:{day}"]
    assert [s.label for s in budgets.all_of(jane)] == [
        "organization:monthly",
        "daily",
        "user:daily",
    ]
    assert budgets.scope("ml") == "~acme"
    # A configured user has their own limits instead of the team's user_limits.
    boss = budgets.all_of(Identity("ml", "acme", "boss@acme.test"))
    assert [(s.label, s.limit) for s in boss][-1] == ("user:daily", 300)
    # The key's own limit counts only the models the key may use.
    bot = budgets.applicable(Identity("ml", "acme", "", "bot"), "small")
    assert [s.label for s in bot] == ["organization:monthly", "daily", "key:requests-day"]
    assert [s.label for s in budgets.applicable(Identity("ml", "acme", "", "bot"), "big")] == [
        "organization:monthly",
        "daily",
    ]
    # A team of no organization keeps its counters where they were before levels existed.
    sam = budgets.all_of(Identity("solo", "", "sam"))
    assert budgets.scope("solo") == "solo"
    assert [counter_name(s, 0) for s in sam] == ["daily:0", f"u|{user_tag('sam')}|hourly:0"]


def test_a_caller_with_no_user_charges_no_user_limit() -> None:
    budgets = Budgets.of(parse_config(config()))
    assert [s.label for s in budgets.all_of(Identity("solo"))] == ["daily"]


# -- one reservation, every level, under concurrency --------------------------------------------

ORG_LIMIT, TEAM_LIMIT, USER_LIMIT = 1500, 900, 100
USERS = [f"user{i}@acme.test" for i in range(20)]  # 20 x 100 > 900 (+ ops 700) > 1500
COST = 7  # tokens a request reserves and uses


def hierarchy_config() -> Any:
    data = config()
    data["organizations"]["acme"]["limits"] = [
        {"name": "org", "window": "day", "tokens": ORG_LIMIT}
    ]
    data["teams"]["ml"]["limits"] = [{"name": "team", "window": "day", "tokens": TEAM_LIMIT}]
    data["teams"]["ml"]["user_limits"] = [{"name": "user", "window": "day", "tokens": USER_LIMIT}]
    data["teams"]["ml"]["users"] = {}
    # A second team of the organization spends from the organization's budget at once.
    data["teams"]["ops"] = {
        "organization": "acme",
        "keys": [{"sha256": sha("sk-ops")}],
        "limits": [{"name": "team", "window": "day", "tokens": 10_000}],
    }
    return parse_config(data)


async def race(store: QuotaStore, requests: int = 400) -> None:
    """`requests` requests at once from 20 users of `ml` and team `ops`, each reserving then
    settling COST tokens (some settle, some release): no level ends above its limit, and what
    each level holds is exactly what its admitted requests used."""
    cfg = hierarchy_config()
    budgets = Budgets.of(cfg)
    service = QuotaService(store, cfg.quota)
    rng = random.Random(19)
    # One user sends a fifth of the team's requests: over their own limit before the team's.
    callers = [Identity("ml", "acme", USERS[0]) for _ in range((requests - 100) // 5)]
    callers += [
        Identity("ml", "acme", rng.choice(USERS[1:])) for _ in range(requests - 100 - len(callers))
    ]
    callers += [Identity("ops", "acme") for _ in range(100)]
    rng.shuffle(callers)
    used: dict[str, int] = {}
    refused: set[str] = set()

    async def one(who: Identity) -> None:
        specs = budgets.applicable(who, "big")
        try:
            res = await service.reserve(
                cfg, budgets.scope(who.team), "big", specs, Amounts(COST, 0), who=who
            )
        except GatewayError as err:
            assert err.status == 429 and (err.code or "").startswith("quota_exceeded:")
            refused.add(err.code or "")
            return
        await asyncio.sleep(rng.random() / 100)
        spent = 0 if rng.random() < 0.1 else COST  # some answers never came: released
        service.settle_soon(res, Amounts(spent, 0))
        for spec in specs:
            used[counter_name(spec, 0)] = used.get(counter_name(spec, 0), 0) + spent

    await asyncio.gather(*(one(who) for who in callers))
    await service.drain()
    now = time.time()
    for who in {*callers}:
        for spec in budgets.applicable(who, "big"):
            name = counter_name(spec, window_bounds(spec.window, now)[0])
            (state,) = await store.usage(budgets.scope(who.team), [name])
            assert state.reserved == 0, name
            assert state.used == used[counter_name(spec, 0)], name  # nothing lost or doubled
            assert state.used <= spec.limit, name  # nothing overshot
    # Every level was the one that refused somebody: the race tested them all.
    assert refused == {
        "quota_exceeded:organization:org",
        "quota_exceeded:team",
        "quota_exceeded:user:user",
    }


# Generous: the race is about the numbers, and 400 calls queueing for a pool of 16 on a loaded
# machine must not turn into timeouts (the store's own bounds: test_quota_store.py).
PATIENT = {"timeout_s": 2.0, "connect_timeout_s": 2.0, "pool_size": 16}


async def race_on(store: QuotaStore) -> None:
    try:
        await race(store)
    finally:
        await store.close()


def test_every_level_holds_at_once_on_the_embedded_store() -> None:
    asyncio.run(race_on(MemoryStore()))


def test_every_level_holds_at_once_on_redis(redis_server: RedisServer) -> None:  # noqa: F811
    asyncio.run(race_on(RedisStore.from_url(redis_server.url, **PATIENT)))


def test_every_level_holds_at_once_on_a_redis_cluster(
    redis_cluster: RedisClusterNodes,  # noqa: F811
) -> None:
    url = redis_cluster.url
    asyncio.run(race_on(RedisStore.from_url(url, cluster=True, **PATIENT)))


def test_the_429_names_the_level_and_the_limit() -> None:
    asyncio.run(the_429_names_the_level_and_the_limit())


async def the_429_names_the_level_and_the_limit() -> None:
    cfg = hierarchy_config()
    budgets = Budgets.of(cfg)
    service = QuotaService(MemoryStore(), cfg.quota)
    who = Identity("ml", "acme", "ann@acme.test")
    specs = budgets.applicable(who, "big")
    with pytest.raises(GatewayError) as caught:
        await service.reserve(cfg, "~acme", "big", specs, Amounts(USER_LIMIT + 1, 0), who=who)
    err = caught.value
    assert err.code == "quota_exceeded:user:user"
    assert "user ann@acme.test of team ml" in err.message
    assert ("x-should-retry", "false") in err.headers
    await service.reserve(cfg, "~acme", "big", specs, Amounts(USER_LIMIT - 10, 0), who=who)
    with pytest.raises(GatewayError) as caught:
        await service.reserve(cfg, "~acme", "big", specs, Amounts(20, 0), who=who)
    headers = dict(caught.value.headers)
    # The rate-limit headers are the tightest limit's: the user's, 10 tokens left.
    assert headers["x-ratelimit-limit-tokens"] == str(USER_LIMIT)
    assert headers["x-ratelimit-remaining-tokens"] == "10"


def test_resetting_a_team_of_an_organization_keeps_the_rest_of_the_organization() -> None:
    asyncio.run(resetting_a_team_of_an_organization())


async def resetting_a_team_of_an_organization() -> None:
    cfg = hierarchy_config()
    budgets = Budgets.of(cfg)
    store = MemoryStore()
    service = QuotaService(store, cfg.quota)
    ml, ops = Identity("ml", "acme", "ann"), Identity("ops", "acme")
    for who in (ml, ops):
        res = await service.reserve(
            cfg, "~acme", "big", budgets.applicable(who, "big"), Amounts(5, 0), who=who
        )
        service.settle_soon(res, Amounts(5, 0))
    await service.drain()
    assert await store.reset("~acme", budgets.team_prefix("ml")) == 2  # ml's team and user
    now = time.time()
    names = {s.label: counter_name(s, window_bounds(s.window, now)[0]) for s in budgets.all_of(ml)}
    states = await store.usage("~acme", list(names.values()))
    assert [s.used for s in states] == [10, 0, 0]  # the organization's keeps both teams' use


def test_a_reservation_is_settled_in_the_scope_it_was_made_in() -> None:
    """A reload that moved the team into an organization (whose limits change no label) while
    a request was in flight: its reservation is settled where it was made, not left to expire
    into a charge at its estimate in the old scope."""
    asyncio.run(settled_where_reserved())


async def settled_where_reserved() -> None:
    before = parse_config(config())
    store = MemoryStore()
    service = QuotaService(store, before.quota)
    who = Identity("solo", "", "sam")
    budgets = Budgets.of(before)
    specs = budgets.applicable(who, "big")
    res = await service.reserve(before, "solo", "big", specs, Amounts(10, 0), who=who)
    assert res is not None
    moved = config()
    moved["teams"]["solo"]["organization"] = "acme"
    moved["organizations"]["acme"]["limits"] = []  # a label only: no limit label changes
    after = parse_config(moved)
    services = SimpleNamespace(
        budgets=Budgets.of(after),
        keys=None,
        quota=service,
        runtime=SimpleNamespace(config=after),
    )
    handover = Handover(
        team="solo",
        model="big",
        user="sam",
        reservation=res.id,
        scope=res.scope,
        limits=tuple(s.label for s in specs),
    )
    rebuilt = settlement.handed_back(services, handover)  # type: ignore[arg-type]
    assert rebuilt is not None and rebuilt.scope == "solo"
    service.settle_soon(rebuilt, Amounts(4, 0))
    await service.drain()
    names = [counter_name(s, window_bounds(s.window, time.time())[0]) for s in specs]
    states = await store.usage("solo", names)
    assert [(s.used, s.reserved) for s in states] == [(4, 0), (4, 0)]


def test_a_reload_says_which_teams_counters_start_again() -> None:
    before = Budgets.of(parse_config(config()))
    moved = config()
    moved["teams"]["solo"]["organization"] = "acme"
    moved["teams"]["ml"]["organization"] = None
    after = Budgets.of(parse_config(moved))
    assert moved_teams(before, after) == [("ml", "~acme", "ml"), ("solo", "solo", "~acme")]
    assert moved_teams(before, before) == []
