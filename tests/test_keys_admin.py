"""The KeyAdmin gRPC service on a real grpc.aio server (a free port, a real SQLite key store, the
services of a real config), and `extproc keys`: its arguments, and the commands against that
server."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from extproc import cli
from extproc.admin.keys_service import KeyAdmin
from extproc.admin.v1 import keys_pb2, keys_pb2_grpc
from extproc.config import Limit, build_runtime, parse_config
from extproc.keys.cli import parse_duration, parse_expires, parse_limit
from extproc.keys.directory import KeyDirectory
from extproc.keys.records import SECRET_PREFIX
from extproc.keys.sqlite_store import SqliteKeyStore
from extproc.server import build_services
from extproc.services import Services

from .conftest import REPO, free_port

TOKEN_ENV = "TEST_KEYS_ADMIN_TOKEN"


def config_data(**extra: Any) -> dict[str, Any]:
    return {
        "teams": {
            "team-a": {"keys": [{"sha256": "a" * 64}]},
            "team-b": {"keys": [{"sha256": "b" * 64}], "models": ["gpt-4o-mini"]},
        },
        "backends": {"fake": {"url": "http://127.0.0.1:9/v1"}},
        "models": {
            "gpt-4o-mini": {"targets": [{"backend": "fake"}]},
            "gpt-4o": {"targets": [{"backend": "fake"}]},
        },
        "model_groups": {"fast": ["gpt-4o-mini"]},
        "prices": {"gpt-4o-mini": {"input": 0.15, "output": 0.6}},
        **extra,
    }


@pytest.fixture(scope="module")
def base_services() -> Services:
    return build_services(build_runtime(parse_config(config_data())))


def services_of(base: Services, data: dict[str, Any]) -> Services:
    # The base's token counter: loading tokenizers again would cost a second per test.
    return build_services(build_runtime(parse_config(data)), base.tokens, base.quota)


@dataclass
class Admin:
    stub: keys_pb2_grpc.KeyAdminStub
    directory: KeyDirectory
    address: str
    services: list[Services]  # [the current one]: a test swaps it, as a reload does


@asynccontextmanager
async def serving(services: Services, store_path: Path) -> AsyncIterator[Admin]:
    directory = KeyDirectory(SqliteKeyStore(store_path))
    current = [services]
    server = grpc.aio.server()
    keys_pb2_grpc.add_KeyAdminServicer_to_server(KeyAdmin(lambda: current[0], directory), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            yield Admin(keys_pb2_grpc.KeyAdminStub(channel), directory, address, current)
    finally:
        await server.stop(None)
        await directory.close()


def run_with(services: Services, store_path: Path, body: Callable[[Admin], Any]) -> None:
    async def main() -> None:
        async with serving(services, store_path) as admin:
            await body(admin)

    asyncio.run(main())


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# -- the service -------------------------------------------------------------------------------


def test_create_returns_the_secret_once_and_the_key_works_at_once(
    base_services: Services, tmp_path: Path
) -> None:
    async def body(admin: Admin) -> None:
        expires = time.time() + 3600
        created = await admin.stub.CreateKey(
            keys_pb2.CreateKeyRequest(
                team="team-a",
                user="alice@example.com",
                expires_at=expires,
                models=["gpt-4o", "group:fast"],
                limits=[
                    keys_pb2.Limit(window="day", metric="tokens", amount=200000),
                    keys_pb2.Limit(
                        name="cash", window="month", metric="usd", amount=12.5, models=["fast"]
                    ),
                ],
                description="nightly batch",
            )
        )
        secret, key = created.secret, created.key
        assert secret.startswith(SECRET_PREFIX) and key.hint == secret[-4:]
        assert key.id.startswith("key_") and key.team == "team-a" and key.status == "active"
        assert key.user == "alice@example.com" and key.expires_at == pytest.approx(expires)
        assert list(key.models) == ["gpt-4o", "fast"]  # "group:" taken off, as in the config
        assert [(lim.name, lim.window, lim.metric, lim.amount) for lim in key.limits] == [
            ("", "day", "tokens", 200000.0),
            ("cash", "month", "usd", 12.5),
        ]
        # The stored limits are the config's Limit.
        record = admin.directory.lookup(secret)  # this process reloaded: no poll needed
        assert record is not None and record.id == key.id
        assert record.limit_objects() == (
            Limit(window="day", tokens=200000),
            Limit(name="cash", window="month", usd=12.5, models=["fast"]),
        )

        shown = await admin.stub.GetKey(keys_pb2.GetKeyRequest(id=key.id))
        listed = await admin.stub.ListKeys(keys_pb2.ListKeysRequest())
        assert shown.key == key and list(listed.keys) == [key]
        for reply in (shown, listed):
            assert secret.encode() not in reply.SerializeToString()
            assert secret[len(SECRET_PREFIX) : -4].encode() not in reply.SerializeToString()

    run_with(base_services, tmp_path / "keys.sqlite", body)


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"team": ""}, "team: required"),
        ({"team": "team-z"}, "team: unknown team 'team-z'"),
        ({"models": ["gpt-4o", "gpt-5"]}, "models[1]: unknown model 'gpt-5'"),
        ({"models": ["group:slow"]}, "models[0]: unknown model group 'slow'"),
        ({"team": "team-b", "models": ["gpt-4o"]}, "models[0]: not one of the team's models"),
        ({"user": "a\u202eb"}, "user: printable characters only"),
        ({"expires_at": 1000.0}, "expires_at: in the past"),
        ({"description": "x" * 1001}, "description: longer than 1000 characters"),
        (
            {"limits": [keys_pb2.Limit(window="day", metric="calls", amount=1)]},
            "limits[0].metric: one of tokens, input_tokens",
        ),
        (
            {"limits": [keys_pb2.Limit(window="week", metric="tokens", amount=1)]},
            "limits[0].window: Input should be 'minute', 'hour', 'day' or 'month'",
        ),
        (
            {"limits": [keys_pb2.Limit(window="day", metric="tokens", amount=1.5)]},
            "limits[0].tokens: Input should be a valid integer",
        ),
        (
            {"limits": [keys_pb2.Limit(window="day", metric="usd", amount=5)]},
            "limits[0].usd: no price for gpt-4o (prices:)",
        ),
        (
            {"limits": [keys_pb2.Limit(window="day", metric="tokens", amount=5, models=["x"])]},
            "limits[0].models[0]: unknown model 'x'",
        ),
        (
            {
                "limits": [
                    keys_pb2.Limit(window="day", metric="tokens", amount=5),
                    keys_pb2.Limit(window="day", metric="tokens", amount=9),
                ]
            },
            "limits[1].name: two limits are called 'tokens-day': name them",
        ),
    ],
)
def test_create_names_the_field_at_fault(
    base_services: Services, tmp_path: Path, request_fields: dict[str, Any], message: str
) -> None:
    async def body(admin: Admin) -> None:
        fields = {"team": "team-a", **request_fields}
        err = await rpc_error(admin.stub.CreateKey(keys_pb2.CreateKeyRequest(**fields)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.details()
        listed = await admin.stub.ListKeys(keys_pb2.ListKeysRequest(include_revoked=True))
        assert list(listed.keys) == []  # nothing created

    run_with(base_services, tmp_path / "keys.sqlite", body)


def test_every_problem_is_reported_at_once(base_services: Services, tmp_path: Path) -> None:
    async def body(admin: Admin) -> None:
        request = keys_pb2.CreateKeyRequest(team="team-z", models=["nope"], expires_at=5)
        err = await rpc_error(admin.stub.CreateKey(request))
        assert err.details() == (
            "team: unknown team 'team-z'; expires_at: in the past; models[0]: unknown model 'nope'"
        )

    run_with(base_services, tmp_path / "keys.sqlite", body)


def test_a_usd_limit_on_priced_models_only_is_taken(
    base_services: Services, tmp_path: Path
) -> None:
    async def body(admin: Admin) -> None:
        # team-b uses gpt-4o-mini only, which has a price.
        limit = keys_pb2.Limit(window="month", metric="usd", amount=3)
        created = await admin.stub.CreateKey(
            keys_pb2.CreateKeyRequest(team="team-b", limits=[limit])
        )
        assert created.key.limits[0].amount == 3.0

    run_with(base_services, tmp_path / "keys.sqlite", body)


def test_list_rotate_revoke(base_services: Services, tmp_path: Path) -> None:
    async def body(admin: Admin) -> None:
        stub, directory = admin.stub, admin.directory
        a = await stub.CreateKey(keys_pb2.CreateKeyRequest(team="team-a"))
        b = await stub.CreateKey(keys_pb2.CreateKeyRequest(team="team-b"))
        listed = await stub.ListKeys(keys_pb2.ListKeysRequest(team="team-b"))
        assert [k.id for k in listed.keys] == [b.key.id]

        rotated = await stub.RotateKey(keys_pb2.RotateKeyRequest(id=a.key.id))
        assert rotated.secret != a.secret and rotated.key.rotated_at > 0
        assert rotated.key.previous_valid_until == 0
        assert directory.lookup(a.secret) is None and directory.lookup(rotated.secret)

        graced = await stub.RotateKey(keys_pb2.RotateKeyRequest(id=a.key.id, grace_seconds=600))
        assert graced.key.previous_valid_until == pytest.approx(time.time() + 600, abs=5)
        assert directory.lookup(rotated.secret) and directory.lookup(graced.secret)

        revoked = await stub.RevokeKey(keys_pb2.RevokeKeyRequest(id=a.key.id))
        assert revoked.key.status == "revoked" and revoked.key.revoked_at > 0
        assert revoked.key.previous_valid_until == 0  # a revoked key's old secret is done too
        assert directory.lookup(graced.secret) is None and directory.lookup(rotated.secret) is None
        again = await stub.RevokeKey(keys_pb2.RevokeKeyRequest(id=a.key.id))
        assert again.key.revoked_at == revoked.key.revoked_at

        listed = await stub.ListKeys(keys_pb2.ListKeysRequest())
        assert [k.id for k in listed.keys] == [b.key.id]
        listed = await stub.ListKeys(keys_pb2.ListKeysRequest(include_revoked=True))
        assert [(k.id, k.status) for k in listed.keys] == [
            (a.key.id, "revoked"),
            (b.key.id, "active"),
        ]
        err = await rpc_error(stub.RotateKey(keys_pb2.RotateKeyRequest(id=a.key.id)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "is revoked" in err.details()
        err = await rpc_error(
            stub.RotateKey(keys_pb2.RotateKeyRequest(id=b.key.id, grace_seconds=-1))
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("grace_seconds:")

    run_with(base_services, tmp_path / "keys.sqlite", body)


def test_unknown_ids_are_not_found(base_services: Services, tmp_path: Path) -> None:
    async def body(admin: Admin) -> None:
        for call in (
            admin.stub.GetKey(keys_pb2.GetKeyRequest(id="key_nope")),
            admin.stub.RotateKey(keys_pb2.RotateKeyRequest(id="key_nope")),
            admin.stub.RevokeKey(keys_pb2.RevokeKeyRequest(id="key_nope")),
        ):
            err = await rpc_error(call)
            assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "no key 'key_nope'")

    run_with(base_services, tmp_path / "keys.sqlite", body)


def test_a_store_that_cannot_answer_is_unavailable(base_services: Services, tmp_path: Path) -> None:
    async def body(admin: Admin) -> None:
        for call in (
            admin.stub.CreateKey(keys_pb2.CreateKeyRequest(team="team-a")),
            admin.stub.ListKeys(keys_pb2.ListKeysRequest()),
            admin.stub.GetKey(keys_pb2.GetKeyRequest(id="key_0123456789abcdef")),
            admin.stub.RevokeKey(keys_pb2.RevokeKeyRequest(id="key_0123456789abcdef")),
        ):
            err = await rpc_error(call)
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert err.details().startswith("key store unavailable: sqlite")

    run_with(base_services, tmp_path / "no-such-dir" / "keys.sqlite", body)


def test_the_admin_token_is_required_when_configured(
    base_services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "s3cret-admin")
    guarded = services_of(base_services, config_data(admin={"token": {"env": TOKEN_ENV}}))

    async def body(admin: Admin) -> None:
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            err = await rpc_error(
                admin.stub.CreateKey(keys_pb2.CreateKeyRequest(team="team-a"), metadata=metadata)
            )
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        good = (("authorization", "Bearer s3cret-admin"),)
        await admin.stub.CreateKey(keys_pb2.CreateKeyRequest(team="team-a"), metadata=good)
        err = await rpc_error(admin.stub.ListKeys(keys_pb2.ListKeysRequest()))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = await admin.stub.ListKeys(keys_pb2.ListKeysRequest(), metadata=good)
        assert len(listed.keys) == 1

    run_with(guarded, tmp_path / "keys.sqlite", body)


def test_the_service_follows_config_reloads(base_services: Services, tmp_path: Path) -> None:
    data = config_data()
    data["teams"]["team-c"] = {"keys": [{"sha256": "c" * 64}]}
    reloaded = services_of(base_services, data)

    async def body(admin: Admin) -> None:
        request = keys_pb2.CreateKeyRequest(team="team-c")
        err = await rpc_error(admin.stub.CreateKey(request))
        assert err.details() == "team: unknown team 'team-c'"
        admin.services[0] = reloaded
        created = await admin.stub.CreateKey(request)
        assert created.key.team == "team-c"

    run_with(base_services, tmp_path / "keys.sqlite", body)


# -- the command line --------------------------------------------------------------------------


def test_limits_in_their_compact_and_json_forms() -> None:
    assert parse_limit("day:tokens=200000") == Limit(window="day", tokens=200000)
    assert parse_limit("month:usd=12.5") == Limit(window="month", usd=12.5)
    assert parse_limit("minute:requests=60:gpt-4o,fast") == Limit(
        window="minute", requests=60, models=["gpt-4o", "fast"]
    )
    assert parse_limit('{"name": "daily", "window": "day", "output_tokens": 5}') == Limit(
        name="daily", window="day", output_tokens=5
    )
    for bad, message in [
        ("day-tokens-5", "not WINDOW:METRIC=AMOUNT"),
        ("week:tokens=5", "window: Input should be"),
        ("day:calls=5", "calls: Extra inputs are not permitted"),
        ("day:tokens=1.5", "tokens: Input should be a valid integer"),
        ("{not json", "not JSON"),
        ('{"window": "day"}', "give exactly one of tokens"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse_limit(bad)


def test_expiry_and_durations() -> None:
    now = 1_800_000_000.0
    assert parse_expires("30d", now) == now + 30 * 86400
    assert parse_expires("12h", now) == now + 12 * 3600
    assert parse_expires("90m", now) == now + 90 * 60
    assert parse_expires("2w", now) == now + 14 * 86400
    assert parse_expires("2027-01-01", now) == 1798761600.0  # UTC midnight
    assert parse_expires("2027-01-01T12:00:00Z", now) == 1798761600.0 + 12 * 3600
    assert parse_expires("2027-01-01T12:00:00+02:00", now) == 1798761600.0 + 10 * 3600
    assert parse_duration("1.5h") == 5400.0
    for bad in ("soon", "30 days", "-1d"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_expires(bad, now)


def test_the_keys_command_line() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(
        ["keys", "create", "--team", "team-a", "--user", "bob", "--expires", "1d",
         "--models", "gpt-4o, fast", "--limit", "day:tokens=10", "--limit", "hour:requests=5",
         "--description", "ci", "--address", "127.0.0.1:1"]
    )  # fmt: skip
    assert args.keys_action == "create" and args.team == "team-a" and args.user == "bob"
    assert args.expires == pytest.approx(time.time() + 86400, abs=5)
    assert args.models == ["gpt-4o", "fast"]
    assert args.limit == [Limit(window="day", tokens=10), Limit(window="hour", requests=5)]
    assert args.address == "127.0.0.1:1" and args.func is cli.cmd_keys

    args = parser.parse_args(["keys", "rotate", "key_0123456789abcdef", "--grace", "1h"])
    assert (args.keys_action, args.id, args.grace) == ("rotate", "key_0123456789abcdef", 3600)
    args = parser.parse_args(["keys", "list", "--team", "team-b", "--all", "-c", "x.yaml"])
    assert (args.team, args.all, args.config) == ("team-b", True, "x.yaml")
    for argv in (["keys"], ["keys", "create"], ["keys", "show"], ["keys", "create",
                 "--team", "t", "--limit", "day:tokens"]):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        assert info.value.code == 2


def test_the_commands_against_a_sidecar(
    base_services: Services, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def body(admin: Admin) -> None:
        async def extproc(*argv: str) -> tuple[int, str, str]:
            capsys.readouterr()
            code = await asyncio.to_thread(cli.main, ["keys", *argv, "--address", admin.address])
            out, err = capsys.readouterr()
            return code, out, err

        code, out, err = await extproc(
            "create", "--team", "team-a", "--user", "carol", "--limit", "day:tokens=1000",
            "--description", "from the CLI",
        )  # fmt: skip
        assert code == 0, err
        first_line, secret_line = out.splitlines()
        key_id = first_line.split()[0]
        secret = secret_line.removeprefix("secret: ")
        assert first_line == f"{key_id} (team team-a, user carol) created"
        assert secret.startswith(SECRET_PREFIX)
        assert "will not be shown again" in err
        record = admin.directory.lookup(secret)
        assert record is not None and record.id == key_id

        code, out, _ = await extproc("list")
        assert code == 0 and key_id in out and f"...{secret[-4:]}" in out
        assert secret not in out and "from the CLI" in out

        code, out, _ = await extproc("show", key_id)
        assert code == 0 and secret not in out
        assert f"sk-aigw-...{secret[-4:]}" in out and "day:tokens=1000" in out

        code, out, err = await extproc("rotate", key_id, "--grace", "10m")
        assert code == 0
        new_secret = out.splitlines()[1].removeprefix("secret: ")
        assert new_secret.startswith(SECRET_PREFIX) and new_secret != secret
        assert "the old secret works until" in out and "will not be shown again" in err

        code, out, _ = await extproc("revoke", key_id)
        assert code == 0 and f"{key_id} (team team-a) revoked at" in out
        assert admin.directory.lookup(new_secret) is None

        code, out, err = await extproc("show", "key_nope")
        assert code == 1 and out == ""
        assert err.strip() == "extproc keys show: NOT_FOUND: no key 'key_nope'"
        code, _, err = await extproc("create", "--team", "team-z")
        assert code == 1 and "INVALID_ARGUMENT: team: unknown team 'team-z'" in err

    run_with(base_services, tmp_path / "keys.sqlite", body)


@pytest.mark.parametrize("enabled", [True, False])
def test_a_sidecar_serves_the_key_admin(tmp_path: Path, enabled: bool) -> None:
    """`extproc serve` registers KeyAdmin; with keys.enabled its keys are in keys.sqlite next
    to the config file by default; without, it says how to turn them on, and opens nothing."""
    config = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    config["sidecar"]["listen"] = f"127.0.0.1:{free_port()}"
    config["sidecar"]["reload_interval_s"] = 0
    if enabled:
        # (keys.enabled needs an admin token: the admin API then hands out credentials.)
        config["keys"] = {"enabled": True}
        config["admin"] = {"token": {"env": "EXTPROC_TEST_ADMIN_TOKEN"}}
    del config["observability"]
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "-c", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "EXTPROC_TEST_ADMIN_TOKEN": "admin-secret"},
    )
    token = (("authorization", "Bearer admin-secret"),)
    try:
        with grpc.insecure_channel(config["sidecar"]["listen"]) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = keys_pb2_grpc.KeyAdminStub(channel)
            if not enabled:
                with pytest.raises(grpc.RpcError) as caught:
                    stub.CreateKey(keys_pb2.CreateKeyRequest(team="team-a"), timeout=10)
                assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "keys.enabled" in (caught.value.details() or "")
                assert not (tmp_path / "keys.sqlite").exists()
                return
            with pytest.raises(grpc.RpcError) as caught:  # no admin token: no key
                stub.CreateKey(keys_pb2.CreateKeyRequest(team="team-a"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            request = keys_pb2.CreateKeyRequest(team="team-a")
            created = stub.CreateKey(request, metadata=token, timeout=10)
            listed = stub.ListKeys(keys_pb2.ListKeysRequest(), metadata=token, timeout=10)
        assert [k.id for k in listed.keys] == [created.key.id]
        assert (tmp_path / "keys.sqlite").exists()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()
