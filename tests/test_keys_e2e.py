"""API keys managed at run time, end to end: created, rotated and revoked with `extproc keys`
(the admin API) while the gateway serves, used by the openai SDK through a real Envoy and two
sidecar worker processes that share the key store (Redis, which also holds the quotas).

A key's own limits and its user's hold; a revoked key is refused by every worker within a
second of the revocation; the config file's keys work beside them throughout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import openai
import pytest

from .conftest import Gateway, running_gateway
from .redis_servers import RedisServer, redis_server_module  # noqa: F401

pytestmark = pytest.mark.e2e

MODEL = "gpt-4o-mini"
WORKERS = 2
ADMIN_TOKEN_ENV, ADMIN_TOKEN = "EXTPROC_TEST_ADMIN_TOKEN", "admin-secret-for-keys"


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server_module: RedisServer,  # noqa: F811
) -> Iterator[Gateway]:
    def edit(config: dict) -> None:
        config["sidecar"]["workers"] = WORKERS
        config["quota"] = {"store": "redis", "redis": {"url": redis_server_module.url}}
        config["keys"] = {"enabled": True}  # in the quota's Redis: every worker sees them
        config["admin"] = {"token": {"env": ADMIN_TOKEN_ENV}}  # (which keys.enabled needs)
        config["teams"]["team-a"]["user_limits"] = [{"window": "day", "requests": 4}]

    os.environ[ADMIN_TOKEN_ENV] = ADMIN_TOKEN  # the sidecar's (its environment is this one's)
    with running_gateway(tmp_path_factory.mktemp("keys"), edit=edit) as gateway:
        yield gateway


def keys_cli(gw: Gateway, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "extproc", "keys", *args, "--address", gw.sidecar_listen],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "EXTPROC_ADMIN_TOKEN": ADMIN_TOKEN},  # the CLI's default variable
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def created(output: str) -> tuple[str, str]:
    """(id, secret) of `extproc keys create|rotate`'s output, once every worker can know it: the
    worker that created it at once, the others at their next poll of the store (250 ms)."""
    key_id = output.split()[0]
    (secret,) = [line.removeprefix("secret: ") for line in output.splitlines() if "secret:" in line]
    time.sleep(0.5)
    return key_id, secret


def ask(gw: Gateway, secret: str) -> int:
    client = openai.OpenAI(base_url=gw.base_url, api_key=secret, max_retries=0)
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    except openai.APIStatusError as err:
        return err.status_code
    finally:
        client.close()
    assert raw.headers["x-aigw-team"] == "team-a"
    return raw.status_code


def test_a_keys_own_limit_and_its_users_hold(gw: Gateway) -> None:
    key_id, secret = created(
        keys_cli(gw, "create", "--team", "team-a", "--limit", "day:requests=2", "--models", MODEL)
    )
    assert key_id.startswith("key_") and secret.startswith("sk-aigw-")
    assert [ask(gw, secret) for _ in range(2)] == [200, 200]
    client = openai.OpenAI(base_url=gw.base_url, api_key=secret, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "quota_exceeded:key:requests-day"
    assert f"key {key_id} of team team-a" in caught.value.message
    # Its models: the key may use only gpt-4o-mini, though its team may use more.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    client.close()

    # Two keys of one user share the user's budget (4 requests a day in team-a).
    first = created(keys_cli(gw, "create", "--team", "team-a", "--user", "ann@example.com"))[1]
    second = created(keys_cli(gw, "create", "--team", "team-a", "--user", "ann@example.com"))[1]
    assert [ask(gw, first), ask(gw, second), ask(gw, first), ask(gw, second)] == [200] * 4
    assert ask(gw, first) == 429 and ask(gw, second) == 429
    assert ask(gw, "sk-team-a") == 200  # the team's config key: no user, no user limit


def test_a_revoked_key_is_refused_by_every_worker_within_a_second(gw: Gateway) -> None:
    key_id, secret = created(keys_cli(gw, "create", "--team", "team-a"))
    assert ask(gw, secret) == 200
    keys_cli(gw, "revoke", key_id)
    time.sleep(1.0)
    # Many requests, over new connections: Envoy spreads them over both workers.
    assert {ask(gw, secret) for _ in range(4 * WORKERS)} == {401}
    assert "revoked" in keys_cli(gw, "show", key_id)


def test_a_rotated_keys_old_secret_stops_and_its_new_one_works(gw: Gateway) -> None:
    key_id, old = created(keys_cli(gw, "create", "--team", "team-a", "--description", "ci"))
    rotated_id, new = created(keys_cli(gw, "rotate", key_id))
    assert rotated_id == key_id and new != old
    time.sleep(0.5)  # (with created's wait: a second since the rotation)
    assert {ask(gw, old) for _ in range(2 * WORKERS)} == {401}
    assert {ask(gw, new) for _ in range(2 * WORKERS)} == {200}
    listed = keys_cli(gw, "list", "--team", "team-a")
    assert key_id in listed and new not in listed and old not in listed  # never a secret
