"""The config file: schema errors with their field paths, secrets, the Runtime, `extproc check`."""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import (
    Config,
    ConfigError,
    Runtime,
    build_runtime,
    load_config,
    load_runtime,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def team_of(rt: Runtime, presented: str) -> str | None:
    hit = rt.key(presented)
    return hit.team if hit is not None else None


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


BASE: dict[str, Any] = {
    "teams": {"t": {"keys": [{"sha256": sha("sk-t")}]}},
    "backends": {"b": {"url": "http://127.0.0.1:8081/v1"}},
    "models": {"m": {"targets": [{"backend": "b"}]}},
}


def cfg(**changes: Any) -> dict[str, Any]:
    """A deep copy of BASE with top-level sections replaced."""
    data = copy.deepcopy(BASE)
    data.update(copy.deepcopy(changes))
    return data


def parse_problems(data: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def runtime_problems(data: Any) -> list[tuple[str, str]]:
    config = parse_config(data)
    with pytest.raises(ConfigError) as info:
        build_runtime(config)
    return info.value.problems


@pytest.fixture(scope="module")
def quickstart() -> Runtime:
    return load_runtime(QUICKSTART)


# -- the quickstart ---------------------------------------------------------------------------


def test_quickstart_keys_map_to_their_teams(quickstart: Runtime) -> None:
    assert team_of(quickstart, "sk-team-a") == "team-a"
    assert team_of(quickstart, "sk-team-b") == "team-b"
    assert team_of(quickstart, "sk-team-c") is None
    assert team_of(quickstart, "sk-team-a ") is None
    assert team_of(quickstart, "") is None
    assert len(quickstart.key_index) == 2


def test_quickstart_team_models(quickstart: Runtime) -> None:
    # team-a has no list: every model, in config order; team-b is restricted.
    assert quickstart.team_models == {
        "team-a": ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small"),
        "team-b": ("gpt-4o-mini", "text-embedding-3-small"),
    }
    assert quickstart.may_use("team-a", "gpt-4o")
    assert not quickstart.may_use("team-b", "gpt-4o")
    assert quickstart.may_use("team-b", "gpt-4o-mini")
    assert not quickstart.may_use("team-c", "gpt-4o-mini")


def test_quickstart_targets(quickstart: Runtime) -> None:
    assert set(quickstart.targets) == {
        ("gpt-4o-mini", "fake"),
        ("gpt-4o", "fake"),
        ("text-embedding-3-small", "fake"),
    }
    target = quickstart.targets[("gpt-4o", "fake")]
    assert target.provider_model == "fake-gpt-4o"
    assert target.credential is None
    assert target.auth_header == "authorization"
    assert target.weight == 1
    assert quickstart.targets[("gpt-4o-mini", "fake")].provider_model == "gpt-4o-mini"
    assert quickstart.config.models["text-embedding-3-small"].type == "embedding"
    assert quickstart.config.backends["fake"].base_path == "/v1"
    assert quickstart.config.backends["fake"].port == 8081
    assert not quickstart.config.backends["fake"].tls


# -- schema errors, each with its path --------------------------------------------------------


def test_unknown_top_level_field() -> None:
    assert parse_problems(cfg(bogus=1)) == [("bogus", "unknown field")]


def test_dev_tool_sections_are_set_aside_unread() -> None:
    # `fake_llm:` is `extproc up`'s to read: the gateway's schema has no such field, and the
    # gateway (a reload too) takes the file whatever the section holds.
    assert "fake_llm" not in Config.model_fields
    config = parse_config(cfg(fake_llm={"response_tokens": -1, "bogus": True}))
    assert config == parse_config(BASE)


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"sidecar": {"listn": "127.0.0.1:1"}}, "sidecar.listn"),
        ({"teams": {"t": {"keys": [{"sha256": sha("k"), "label": "x"}]}}}, "teams.t.keys.0.label"),
        ({"teams": {"t": {"keys": [{"sha256": sha("k")}], "model": ["m"]}}}, "teams.t.model"),
        ({"backends": {"b": {"url": "http://h/v1", "timeout": 3}}}, "backends.b.timeout"),
        (
            {"backends": {"b": {"url": "http://h/v1", "api_key": {"env": "X", "value": "v"}}}},
            "backends.b.api_key.value",
        ),
        (
            {"models": {"m": {"targets": [{"backend": "b", "wieght": 2}]}}},
            "models.m.targets.0.wieght",
        ),
    ],
)
def test_unknown_nested_field(changes: dict[str, Any], path: str) -> None:
    assert parse_problems(cfg(**changes)) == [(path, "unknown field")]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://h/v1", "must be an http:// or https:// URL with a host"),
        ("http:///v1", "must be an http:// or https:// URL with a host"),
        ("127.0.0.1:8081/v1", "must be an http:// or https:// URL with a host"),
        ("http://h/v1?x=1", "must not have a query or fragment"),
        ("http://h/v1#top", "must not have a query or fragment"),
    ],
)
def test_bad_backend_url(url: str, message: str) -> None:
    assert parse_problems(cfg(backends={"b": {"url": url}})) == [("backends.b.url", message)]


def test_backend_url_with_a_bad_port() -> None:
    [(path, message)] = parse_problems(cfg(backends={"b": {"url": "http://h:99999/v1"}}))
    assert path == "backends.b.url"
    assert message.startswith("bad port: ")


def test_target_naming_an_unknown_backend() -> None:
    data = cfg(models={"m": {"targets": [{"backend": "nope"}]}})
    assert parse_problems(data) == [("models.m.targets.0.backend", "unknown backend 'nope'")]


def test_same_backend_twice_in_one_model() -> None:
    data = cfg(models={"m": {"targets": [{"backend": "b"}, {"backend": "b", "model": "x"}]}})
    assert parse_problems(data) == [("models.m.targets.1.backend", "backend 'b' appears twice")]


def test_all_weights_zero() -> None:
    data = cfg(
        backends={"b": {"url": "http://h1/v1"}, "c": {"url": "http://h2/v1"}},
        models={"m": {"targets": [{"backend": "b", "weight": 0}, {"backend": "c", "weight": 0}]}},
    )
    assert parse_problems(data) == [("models.m.targets", "the weights add up to 0")]


def test_one_zero_weight_is_fine() -> None:
    data = cfg(
        backends={"b": {"url": "http://h1/v1"}, "c": {"url": "http://h2/v1"}},
        models={"m": {"targets": [{"backend": "b", "weight": 0}, {"backend": "c"}]}},
    )
    assert [t.weight for t in parse_config(data).models["m"].targets] == [0, 1]


def test_negative_weight() -> None:
    data = cfg(models={"m": {"targets": [{"backend": "b", "weight": -1}]}})
    [(path, _)] = parse_problems(data)
    assert path == "models.m.targets.0.weight"


def test_team_listing_an_unknown_model() -> None:
    data = cfg(teams={"t": {"keys": [{"sha256": sha("k")}], "models": ["m", "ghost"]}})
    assert parse_problems(data) == [("teams.t.models.1", "unknown model 'ghost'")]


def test_team_without_keys() -> None:
    [(path, _)] = parse_problems(cfg(teams={"t": {"keys": []}}))
    assert path == "teams.t.keys"


EXACTLY_ONE_KEY = "give exactly one of 'sha256', 'env' or 'file'"


@pytest.mark.parametrize(
    "key",
    [
        {},
        {"name": "just a label"},
        {"sha256": sha("k"), "env": "KEY"},
        {"env": "KEY", "file": "/tmp/key"},
        {"sha256": sha("k"), "file": "/tmp/key"},
        {"sha256": sha("k"), "env": "KEY", "file": "/tmp/key"},
    ],
)
def test_api_key_needs_exactly_one_source(key: dict[str, str]) -> None:
    data = cfg(teams={"t": {"keys": [{"sha256": sha("ok")}, key]}})
    assert parse_problems(data) == [("teams.t.keys.1", EXACTLY_ONE_KEY)]


@pytest.mark.parametrize("digest", ["abc", sha("k")[:-1], sha("k") + "0", "g" * 64, "sk-team-a"])
def test_bad_sha256(digest: str) -> None:
    data = cfg(teams={"t": {"keys": [{"sha256": digest}]}})
    assert parse_problems(data) == [
        ("teams.t.keys.0.sha256", "must be 64 hexadecimal characters (sha256 of the key)")
    ]


def test_upper_case_sha256_is_accepted_and_normalised() -> None:
    data = cfg(teams={"t": {"keys": [{"sha256": sha("sk-upper").upper()}]}})
    config = parse_config(data)
    assert config.teams["t"].keys[0].sha256 == sha("sk-upper")
    assert team_of(build_runtime(config), "sk-upper") == "t"


def test_secret_ref_needs_exactly_one_source() -> None:
    for ref in ({}, {"env": "A", "file": "/tmp/a"}):
        data = cfg(backends={"b": {"url": "http://h/v1", "api_key": ref}})
        assert parse_problems(data) == [
            ("backends.b.api_key", "give exactly one of 'env' (a variable name) or 'file' (a path)")
        ]


def test_bad_auth_header() -> None:
    data = cfg(backends={"b": {"url": "http://h/v1", "auth_header": "x api key"}})
    assert parse_problems(data) == [("backends.b.auth_header", "must be an HTTP header name")]


def test_auth_header_is_lower_cased() -> None:
    data = cfg(backends={"b": {"url": "http://h/v1", "auth_header": "Api-Key"}})
    assert parse_config(data).backends["b"].auth_header == "api-key"


def test_bad_addresses() -> None:
    data = cfg(sidecar={"listen": "nowhere"}, envoy={"listen": "unix:/tmp/envoy.sock"})
    assert [p for p, _ in parse_problems(data)] == ["sidecar.listen", "envoy.listen"]


def test_backends_of_one_model_with_different_url_paths() -> None:
    data = cfg(
        backends={"b": {"url": "http://h1/v1"}, "azure": {"url": "https://h2/openai/v1/"}},
        models={"m": {"targets": [{"backend": "b"}, {"backend": "azure"}]}},
    )
    assert parse_problems(data) == [
        ("models.m.targets", "the backends' URLs have different paths: ['/openai/v1', '/v1']")
    ]


def test_a_url_without_path_means_v1() -> None:
    data = cfg(
        backends={"b": {"url": "http://h1"}, "c": {"url": "https://h2/v1/"}},
        models={"m": {"targets": [{"backend": "b"}, {"backend": "c"}]}},
    )
    config = parse_config(data)
    assert config.backends["b"].base_path == "/v1"
    assert config.backends["b"].port == 80
    assert config.backends["c"].port == 443


def test_several_schema_problems_at_once() -> None:
    data = cfg(
        bogus=True,
        teams={"t": {"keys": [{}]}},
        backends={"b": {"url": "ftp://h"}},
        models={"m": {"type": "video", "targets": [{"backend": "b"}]}},
    )
    assert parse_problems(data) == [
        ("teams.t.keys.0", EXACTLY_ONE_KEY),
        ("backends.b.url", "must be an http:// or https:// URL with a host"),
        (
            "models.m.type",
            "Input should be 'chat', 'completion', 'embedding', 'image', 'audio', "
            "'moderation' or 'rerank'",
        ),
        ("bogus", "unknown field"),
    ]


def test_several_cross_reference_problems_at_once() -> None:
    data = cfg(
        teams={"t": {"keys": [{"sha256": sha("k")}], "models": ["ghost", "m", "phantom"]}},
        models={
            "m": {"targets": [{"backend": "b"}]},
            "n": {"targets": [{"backend": "nope", "weight": 0}, {"backend": "b", "weight": 0}]},
        },
    )
    assert parse_problems(data) == [
        ("models.n.targets.0.backend", "unknown backend 'nope'"),
        ("models.n.targets", "the weights add up to 0"),
        ("teams.t.models.0", "unknown model 'ghost'"),
        ("teams.t.models.2", "unknown model 'phantom'"),
    ]


def test_missing_sections() -> None:
    problems = parse_problems({})
    assert sorted(p for p, _ in problems) == ["backends", "models", "teams"]
    assert {m for _, m in problems} == {"Field required"}


def test_config_error_render() -> None:
    err = ConfigError([("", "the file must hold a mapping"), ("a.b", "bad")], "x.yaml")
    assert str(err) == "x.yaml: 2 error(s)\n  <root>: the file must hold a mapping\n  a.b: bad"


def test_non_mapping_data() -> None:
    assert parse_problems([1, 2]) == [("", "the file must hold a mapping")]


# -- runtime: secrets -------------------------------------------------------------------------


def test_backend_api_key_env_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXTPROC_TEST_UNSET_KEY", raising=False)
    data = cfg(backends={"b": {"url": "http://h/v1", "api_key": {"env": "EXTPROC_TEST_UNSET_KEY"}}})
    assert runtime_problems(data) == [
        ("backends.b.api_key", "environment variable EXTPROC_TEST_UNSET_KEY is not set")
    ]


def test_backend_api_key_empty_and_unreadable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EXTPROC_TEST_BLANK", "  \n")
    data = cfg(
        backends={
            "b": {"url": "http://h/v1", "api_key": {"env": "EXTPROC_TEST_BLANK"}},
            "c": {"url": "http://h/v1", "api_key": {"file": str(tmp_path / "missing")}},
        }
    )
    assert runtime_problems(data) == [
        ("backends.b.api_key", "the secret is empty"),
        ("backends.c.api_key", f"cannot read {tmp_path / 'missing'}: No such file or directory"),
    ]


def test_backend_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EXTPROC_TEST_OPENAI", "sk-openai-secret\n")
    secret_file = tmp_path / "azure.key"
    secret_file.write_text("  azure-secret  \n")
    data = cfg(
        backends={
            "openai": {
                "url": "https://api.example.com/v1",
                "api_key": {"env": "EXTPROC_TEST_OPENAI"},
            },
            "azure": {
                "url": "https://az.example.com/v1",
                "auth_header": "api-key",
                "api_key": {"file": str(secret_file)},
            },
        },
        models={"m": {"targets": [{"backend": "openai"}, {"backend": "azure", "model": "m-az"}]}},
    )
    rt = build_runtime(parse_config(data))
    assert rt.targets[("m", "openai")].credential == "Bearer sk-openai-secret"
    assert rt.targets[("m", "openai")].auth_header == "authorization"
    assert rt.targets[("m", "azure")].credential == "azure-secret"
    assert rt.targets[("m", "azure")].auth_header == "api-key"
    assert rt.targets[("m", "azure")].provider_model == "m-az"


def test_client_keys_from_env_and_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EXTPROC_TEST_CLIENT_KEY", "sk-from-env")
    key_file = tmp_path / "client.key"
    key_file.write_text("sk-from-file\n")
    data = cfg(
        teams={
            "env-team": {"keys": [{"env": "EXTPROC_TEST_CLIENT_KEY"}]},
            "file-team": {"keys": [{"file": str(key_file), "name": "ci"}]},
        }
    )
    rt = build_runtime(parse_config(data))
    assert team_of(rt, "sk-from-env") == "env-team"
    assert team_of(rt, "sk-from-file") == "file-team"
    assert team_of(rt, "sk-from-file\n") is None
    by_file, by_env = (
        rt.key_index[hashlib.sha256(k).digest()] for k in (b"sk-from-file", b"sk-from-env")
    )
    assert (by_file.team, by_file.label) == ("file-team", "ci")
    assert (by_env.team, by_env.label) == ("env-team", "env-team#0")


def test_client_key_env_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXTPROC_TEST_UNSET_CLIENT", raising=False)
    data = cfg(teams={"t": {"keys": [{"sha256": sha("a")}, {"env": "EXTPROC_TEST_UNSET_CLIENT"}]}})
    assert runtime_problems(data) == [
        ("teams.t.keys.1", "environment variable EXTPROC_TEST_UNSET_CLIENT is not set")
    ]


def test_a_key_shared_by_two_teams(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTPROC_TEST_SHARED", "sk-shared")
    data = cfg(
        teams={
            "a": {"keys": [{"sha256": sha("sk-shared")}]},
            "b": {"keys": [{"sha256": sha("sk-b")}, {"env": "EXTPROC_TEST_SHARED"}]},
        }
    )
    assert runtime_problems(data) == [("teams.b.keys.1", "the same key is also 'a#0' of 'a'")]


def test_the_same_key_twice_in_one_team_is_fine() -> None:
    data = cfg(teams={"t": {"keys": [{"sha256": sha("k")}, {"sha256": sha("k").upper()}]}})
    assert team_of(build_runtime(parse_config(data)), "k") == "t"


def test_secrets_never_appear_in_repr_or_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    backend_secret = "sk-backend-SECRET-0123456789"
    client_secret = "sk-client-SECRET-9876543210"
    file_secret = "sk-file-SECRET-5555555555"
    monkeypatch.setenv("EXTPROC_TEST_BACKEND_SECRET", backend_secret)
    monkeypatch.setenv("EXTPROC_TEST_CLIENT_SECRET", client_secret)
    key_file = tmp_path / "k"
    key_file.write_text(file_secret)
    teams = {
        "a": {"keys": [{"env": "EXTPROC_TEST_CLIENT_SECRET"}, {"file": str(key_file)}]},
    }
    backends = {"b": {"url": "http://h/v1", "api_key": {"env": "EXTPROC_TEST_BACKEND_SECRET"}}}
    rt = build_runtime(parse_config(cfg(teams=teams, backends=backends)))
    assert rt.targets[("m", "b")].credential == f"Bearer {backend_secret}"
    for text in (repr(rt.config), str(rt.config), rt.config.model_dump_json()):
        for secret in (backend_secret, client_secret, file_secret):
            assert secret not in text

    # Errors once the secrets are resolved: both teams share them, one more is missing.
    teams["b"] = {"keys": [{"env": "EXTPROC_TEST_CLIENT_SECRET"}, {"file": str(key_file)}]}
    backends["c"] = {"url": "http://h/v1", "api_key": {"env": "EXTPROC_TEST_UNSET_SECRET"}}
    monkeypatch.delenv("EXTPROC_TEST_UNSET_SECRET", raising=False)
    problems = runtime_problems(cfg(teams=teams, backends=backends))
    assert [p for p, _ in problems] == ["teams.b.keys.0", "teams.b.keys.1", "backends.c.api_key"]

    # A secret pasted where it does not belong is not echoed either.
    pasted = cfg(
        teams={"t": {"keys": [{"sha256": client_secret}, client_secret]}},
        backends={"b": {"url": "http://h/v1", "api_key": backend_secret}},
    )
    pasted_problems = parse_problems(pasted)
    assert [p for p, _ in pasted_problems] == [
        "teams.t.keys.0.sha256",
        "teams.t.keys.1",
        "backends.b.api_key",
    ]

    for err_problems in (problems, pasted_problems):
        text = ConfigError(err_problems).render()
        for secret in (backend_secret, client_secret, file_secret):
            assert secret not in text


# -- files ------------------------------------------------------------------------------------


def test_load_config_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("teams: [\n  a: b\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [(where, message)] = info.value.problems
    assert where == ""
    assert message.startswith("not valid YAML: ")
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: 1 error(s)\n  <root>: not valid YAML: ")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "42\n"])
def test_load_config_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [("", "the file must hold a mapping")]
    assert info.value.source == str(path)


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.problems == [("", "cannot read: No such file or directory")]


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"# caf\xe9\n" + yaml.safe_dump(BASE).encode())
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [(where, _)] = info.value.problems
    assert where == ""


def test_key_file_not_utf8(tmp_path: Path) -> None:
    key_file = tmp_path / "binary.key"
    key_file.write_bytes(b"\xff\xfe\x00k")
    data = cfg(teams={"t": {"keys": [{"file": str(key_file)}]}})
    [(where, _)] = runtime_problems(data)
    assert where == "teams.t.keys.0"


def test_load_config_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert load_config(path) == parse_config(BASE)


# -- the CLI ----------------------------------------------------------------------------------


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_TEST_")},
        timeout=60,
        check=False,
    )


def test_cli_check_quickstart() -> None:
    result = run_check(QUICKSTART)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"{QUICKSTART}: OK (2 teams, 2 keys, 1 backends, 3 models)\n")


def test_cli_check_broken_file(tmp_path: Path) -> None:
    data = cfg(
        teams={"t": {"keys": [{"sha256": "abc"}], "modles": ["m"]}},
        backends={"b": {"url": "gopher://h/v1"}},
    )
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run_check(path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"{path}: 3 error(s)\n"
        "  teams.t.keys.0.sha256: must be 64 hexadecimal characters (sha256 of the key)\n"
        "  teams.t.modles: unknown field\n"
        "  backends.b.url: must be an http:// or https:// URL with a host\n"
    )


def test_cli_check_reports_the_fake_llm_section_with_the_gateway(tmp_path: Path) -> None:
    data = cfg(
        backends={"b": {"url": "gopher://h/v1"}},
        fake_llm={"response_tokens": -1, "listn": "127.0.0.1:1"},
    )
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run_check(path)
    assert result.returncode == 2
    assert result.stderr == (
        f"{path}: 3 error(s)\n"
        "  backends.b.url: must be an http:// or https:// URL with a host\n"
        "  fake_llm.response_tokens: Input should be greater than or equal to 0\n"
        "  fake_llm.listn: unknown field\n"
    )


def test_cli_check_missing_secret(tmp_path: Path) -> None:
    data = cfg(backends={"b": {"url": "http://h/v1", "api_key": {"env": "EXTPROC_TEST_NEVER_SET"}}})
    path = tmp_path / "nosecret.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run_check(path)
    assert result.returncode == 2
    assert result.stderr == (
        f"{path}: 1 error(s)\n"
        "  backends.b.api_key: environment variable EXTPROC_TEST_NEVER_SET is not set\n"
    )


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    # A second `team-a:` would silently replace the first, and its keys would vanish.
    path = tmp_path / "dup.yaml"
    path.write_text(
        "teams:\n"
        "  team-a: {keys: [{env: A}]}\n"
        "  team-a: {keys: [{env: B}]}\n"
        "backends: {b: {url: 'http://127.0.0.1:1/v1'}}\n"
        "models: {m: {targets: [{backend: b}]}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [(where, message)] = info.value.problems
    assert where == ""
    assert "'team-a' appears twice" in message


def test_pool_priorities_must_be_contiguous_and_weighted() -> None:
    backends = {"b": {"url": "http://h1/v1"}, "c": {"url": "http://h2/v1"}}
    gap = cfg(
        backends=backends,
        models={"m": {"targets": [{"backend": "b"}, {"backend": "c", "priority": 2}]}},
    )
    assert parse_problems(gap) == [
        ("models.m.targets", "priorities must be 0, 1, 2, ... (got [0, 2])")
    ]
    idle = cfg(
        backends=backends,
        models={"m": {"targets": [{"backend": "b"}, {"backend": "c", "priority": 1, "weight": 0}]}},
    )
    assert parse_problems(idle) == [("models.m.targets", "no target of priority 1 has a weight")]


def test_quota_failover_needs_a_next_pool() -> None:
    data = cfg(models={"m": {"targets": [{"backend": "b"}], "quota_failover": True}})
    assert parse_problems(data) == [("models.m.quota_failover", "needs a target of priority 1")]


def test_several_workers_need_a_shared_quota_store_and_a_port() -> None:
    limited = {"t": {"keys": [{"sha256": sha("sk-t")}], "limits": [{"window": "day", "tokens": 9}]}}
    problems = parse_problems(cfg(sidecar={"workers": 2}, teams=limited))
    assert [p for p, _ in problems] == ["sidecar.workers"]
    assert "quota.store: redis" in problems[0][1] and "t's quota" in problems[0][1]
    problems = parse_problems(cfg(sidecar={"workers": 2, "listen": "unix:/tmp/x.sock"}))
    assert problems == [("sidecar.workers", "several workers need a HOST:PORT listen address")]
    redis = {"store": "redis", "redis": {"url": "redis://127.0.0.1:6379/0"}}
    assert (
        parse_config(cfg(sidecar={"workers": 4}, teams=limited, quota=redis)).sidecar.workers == 4
    )
    assert parse_config(cfg(sidecar={"workers": 2})).sidecar.workers == 2  # no limits: fine


def test_redis_max_connections_is_the_old_name_of_pool_size() -> None:
    old = parse_config(cfg(quota={"store": "redis", "redis": {"max_connections": 8}}))
    assert old.quota.redis.pool_size == 8
    both = {"store": "redis", "redis": {"max_connections": 8, "pool_size": 4}}
    ((path, message),) = parse_problems(cfg(quota=both))
    assert path == "quota.redis" and "pool_size" in message
