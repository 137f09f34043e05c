"""Budgets of every level at once, end to end: 200 concurrent requests from the users of one
team (JWTs minted here, verified by a real Envoy, their `sub` the user) and from a second team
of the same organization, against the users', the team's and the organization's limits, with
the openai SDK as the client; the counters in the sidecar's memory, or in a Redis Cluster.
Nothing overshot (each level's use is at most its limit), nothing lost (each level's use is
exactly what its admitted requests were served), every refusal a 429 naming its level."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from extproc.admin.v1 import quota_pb2, quota_pb2_grpc
from extproc.quota.policy import window_bounds

from .conftest import free_port
from .redis_servers import RedisClusterNodes, redis_cluster  # noqa: F401
from .test_quota_e2e import MAX_TOKENS, MODEL, gateway_config, new_ports, running_stack

pytestmark = pytest.mark.e2e

ISSUER = "https://idp.acme.test/"
SIGNING_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
USERS = [f"user{i}@acme.test" for i in range(8)]
REQUESTS = 200
OPS_REQUESTS = 40  # from team ops, by its API key
# A request reserves ~32 tokens (its prompt by tiktoken + max_tokens 16) and is served ~26: the
# heavy user is refused by their own limit early, the team by its limit, ops by the
# organization's once both teams have spent it.
USER_LIMIT, TEAM_LIMIT, ORG_LIMIT = 400, 2000, 2800


def token(user: str) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": user, "groups": ["ml"], "iat": now, "exp": now + 600}
    return jwt.encode(claims, SIGNING_KEY, algorithm="RS256", headers={"kid": "k1"})


def jwks() -> str:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(SIGNING_KEY.public_key()))
    return json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256"}]})


def day_limit(name: str, tokens: int) -> list[dict[str, Any]]:
    return [{"name": name, "window": "day", "tokens": tokens}]


def hierarchy(quota: dict[str, Any]) -> dict[str, Any]:
    config = gateway_config(new_ports(), {"ops": day_limit("daily", 1_000_000)}, quota)
    config["organizations"] = {"acme": {"limits": day_limit("daily", ORG_LIMIT)}}
    config["teams"]["ops"]["organization"] = "acme"
    config["teams"]["ml"] = {
        "organization": "acme",
        "limits": day_limit("daily", TEAM_LIMIT),
        "user_limits": day_limit("daily", USER_LIMIT),
    }
    config["identities"] = {
        "jwt": {
            "acme": {
                "issuer": ISSUER,
                "jwks": {"inline": jwks()},
                "teams": [{"claim": "groups", "value": "ml", "team": "ml"}],
            }
        }
    }
    return config


@dataclass
class Outcome:
    who: str  # a user of ml, or "ops"
    status: int
    code: str | None = None
    tokens: int = 0
    limit_header: str = ""


async def ask(client: openai.AsyncOpenAI, who: str, i: int) -> Outcome:
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Budget probe {i:03d}: answer briefly."}],
            max_tokens=MAX_TOKENS,
        )
    except openai.RateLimitError as err:
        limit = err.response.headers.get("x-ratelimit-limit-tokens", "")
        return Outcome(who, 429, err.code, limit_header=limit)
    except openai.APIStatusError as err:
        return Outcome(who, err.status_code, err.code)
    usage = raw.parse().usage
    assert usage is not None
    return Outcome(who, 200, tokens=usage.total_tokens)


async def load(base_url: str) -> list[Outcome]:
    rng = random.Random(2026)
    callers = [USERS[0]] * 40 + [rng.choice(USERS[1:]) for _ in range(REQUESTS - OPS_REQUESTS - 40)]
    callers += ["ops"] * OPS_REQUESTS
    rng.shuffle(callers)
    clients = {
        who: openai.AsyncOpenAI(
            base_url=base_url,
            api_key="sk-ops" if who == "ops" else token(who),
            max_retries=0,
            timeout=30,
        )
        for who in {*callers}
    }
    try:
        return list(
            await asyncio.gather(*(ask(clients[who], who, i) for i, who in enumerate(callers)))
        )
    finally:
        for client in clients.values():
            await client.close()


def usage(stub: Any, **who: str) -> dict[str, quota_pb2.LimitUsage]:
    deadline = time.monotonic() + 15
    while True:
        reply = stub.GetUsage(quota_pb2.GetUsageRequest(**who), timeout=10)
        limits = {f"{lim.level}:{lim.name}": lim for lim in reply.limits}
        if all(lim.reserved == 0 for lim in limits.values()) or time.monotonic() > deadline:
            return limits
        time.sleep(0.05)


def check(sidecar: str, outcomes: list[Outcome]) -> None:
    odd = [o for o in outcomes if o.status not in (200, 429)]
    assert not odd, odd[:5]
    codes = {o.code for o in outcomes if o.status == 429}
    assert codes == {
        "quota_exceeded:user:daily",
        "quota_exceeded:daily",
        "quota_exceeded:organization:daily",
    }, codes
    for o in outcomes:
        if o.status == 429:
            # The headers are the tightest limit's; the user's is the tightest until it is
            # spent, so a refusal names a limit of the caller's own levels.
            assert o.limit_header in {str(USER_LIMIT), str(TEAM_LIMIT), str(ORG_LIMIT), "1000000"}
    served = {
        who: sum(o.tokens for o in outcomes if o.who == who) for who in {o.who for o in outcomes}
    }
    ml = sum(t for who, t in served.items() if who != "ops")
    with grpc.insecure_channel(sidecar) as channel:
        stub = quota_pb2_grpc.QuotaAdminStub(channel)
        org = usage(stub, organization="acme")["organization:daily"]
        team = usage(stub, team="ml")["team:daily"]
        users = {user: usage(stub, team="ml", user=user)["user:daily"] for user in USERS}
    assert (org.used, team.used) == (ml + served.get("ops", 0), ml)  # nothing lost
    assert org.used <= ORG_LIMIT and team.used <= TEAM_LIMIT  # nothing overshot
    for user, state in users.items():
        assert state.used == served.get(user, 0), user
        assert state.used <= USER_LIMIT, user
        assert state.reserved == 0


def run_in_one_day(base_url: str) -> list[Outcome]:
    day = window_bounds("day", time.time())[0]
    outcomes = asyncio.run(load(base_url))
    if window_bounds("day", time.time())[0] != day:
        pytest.skip("the load straddled midnight UTC: its counters are in two windows")
    return outcomes


MAX_USERS = 5  # fewer than the users who call: the rest are counted as "other"


def test_every_level_holds_at_once_on_the_embedded_store(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    config = hierarchy({"store": "memory"})
    metrics_at = f"127.0.0.1:{free_port()}"
    config["observability"] = {
        "metrics": {"listen": metrics_at, "users": True, "max_users": MAX_USERS}
    }
    with running_stack(tmp_path_factory.mktemp("budgets-memory"), config) as gw:
        outcomes = run_in_one_day(gw.base_url)
        check(config["sidecar"]["listen"], outcomes)
        # Every token by organization, and by user with the number of users' series capped.
        served = sum(o.tokens for o in outcomes)
        text = urllib.request.urlopen(f"http://{metrics_at}/metrics", timeout=10).read().decode()
        by_org: dict[str, float] = {}
        by_user: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "extproc_tokens_total":
                    org = s.labels["organization"]
                    by_org[org] = by_org.get(org, 0) + s.value
                if s.name == "extproc_user_tokens_total":
                    by_user[s.labels["user"]] = by_user.get(s.labels["user"], 0) + s.value
        assert by_org == {"acme": served}
        assert sum(by_user.values()) == served
        assert len(set(by_user) - {"none", "other"}) <= MAX_USERS and "other" in by_user
        assert "none" in by_user  # team ops's key names no user
        top = subprocess.run(
            [sys.executable, "-m", "extproc", "top", "--url", f"http://{metrics_at}/metrics",
             "--by", "organization", "--once"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert top.returncode == 0 and "acme" in top.stdout, top.stderr
        # The CLI shows every level's use.
        address = ["--address", config["sidecar"]["listen"]]
        org = quota_cli("usage", "--organization", "acme", *address)
        assert org.splitlines()[0].startswith("organization acme")
        assert "organization:daily" in org and f" {ORG_LIMIT} " in org
        user = quota_cli("usage", "--team", "ml", "--user", USERS[0], *address)
        assert user.splitlines()[0].startswith(f"team ml, user {USERS[0]}")
        assert "user:daily" in user and f" {USER_LIMIT} " in user


def quota_cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "extproc", "quota", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_level_holds_at_once_on_a_redis_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    redis_cluster: RedisClusterNodes,  # noqa: F811
) -> None:
    config = hierarchy({"store": "redis", "redis": {"url": redis_cluster.url, "cluster": True}})
    with running_stack(tmp_path_factory.mktemp("budgets-cluster"), config) as gw:
        check(config["sidecar"]["listen"], run_in_one_day(gw.base_url))
