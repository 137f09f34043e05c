"""JWT identities and the native path, without Envoy: the config, which requests Envoy serves
alone (native.py), how the sidecar maps a verified token to a team (identity.py), what is
rendered for Envoy, and how the access log's reader accounts a native request."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from extproc import access_log, identity, native
from extproc.config import ConfigError, build_runtime, parse_config
from extproc.contract import (
    JWT_NAMESPACE,
    NATIVE_ROUTE_PREFIX,
    native_from_route,
    native_route_name,
)
from extproc.envoy_config import (
    EXT_PROC_FILTER,
    JWT_FILTER,
    REQUEST_FACTS_FILTER,
    bootstrap,
    render_snippet,
    render_yaml,
    to_dict,
)
from extproc.errors import GatewayError
from extproc.server import build_services
from extproc.services import Services
from extproc.streams import RELEASED
from extproc.telemetry import metrics

from .conftest import sha256_hex

BACKEND_SECRET = "sk-live-backend-must-not-leak"


def config(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "identities": {
            "jwt": {
                "corp": {
                    "issuer": "https://idp.example.test/",
                    "jwks": {"inline": '{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}'},
                    "teams": [
                        {"claim": "groups", "value": "search", "team": "search"},
                        {"claim": ["realm_access", "roles"], "value": "ml", "team": "ml"},
                    ],
                }
            }
        },
        "teams": {
            "ml": {},
            "search": {"limits": [{"window": "day", "tokens": 1000}]},
            "keyed": {"keys": [{"sha256": sha256_hex("sk-keyed")}]},
        },
        "backends": {
            "openai": {"url": "https://api.openai.com/v1", "api_key": {"env": "NATIVE_TEST_KEY"}},
            "azure": {
                "url": "https://example.openai.azure.com/openai/v1",
                "auth_header": "api-key",
                "api_key": {"file": "/run/secrets/azure"},
            },
            "vllm": {"url": "http://10.0.0.7:8000/v1"},
        },
        "models": {
            "gpt-4o": {"targets": [{"backend": "openai"}]},
            "gpt-4o-azure": {"targets": [{"backend": "azure", "model": "gpt-4o"}]},
            "embed": {"type": "embedding", "targets": [{"backend": "azure"}]},
            "llama": {"targets": [{"backend": "vllm", "weight": 9}, {"backend": "openai"}]},
        },
    }
    base.update(over)
    return base


# -- config ---------------------------------------------------------------------------------------


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return dict(caught.value.problems)


def test_a_rule_must_name_a_team_and_a_team_needs_keys_or_a_rule() -> None:
    data = config()
    data["identities"]["jwt"]["corp"]["teams"][0]["team"] = "nobody"
    found = problems(data)
    assert found["identities.jwt.corp.teams.0.team"] == "unknown team 'nobody'"
    assert "no keys and no JWT" in found["teams.search.keys"]


def test_a_jwks_comes_from_exactly_one_place() -> None:
    data = config()
    data["identities"]["jwt"]["corp"]["jwks"] = {"inline": "{}", "file": "/etc/jwks.json"}
    assert any(k.startswith("identities.jwt.corp.jwks") for k in problems(data))
    data["identities"]["jwt"]["corp"]["jwks"] = {"uri": "ftp://idp/jwks"}
    assert any(k.startswith("identities.jwt.corp.jwks") for k in problems(data))
    data["identities"]["jwt"]["corp"]["jwks"] = {"inline": '{"keys": []}'}
    assert "empty" in str(problems(data))


@pytest.mark.parametrize(
    ("change", "where", "words"),
    [
        ({"teams": [{"claim": "", "value": "x", "team": "ml"}]}, "teams.0.claim", "at least 1"),
        ({"jwks": {"uri": "http://idp.example.test/k"}}, "jwks", "https"),
        ({"jwks": {"inline": '{"keys": [{"kty": "RSA", "e": "AQAB"}]}'}}, "jwks", "no n"),
        ({"jwks": {"inline": '{"keys": [{"kty": "XYZ"}]}'}}, "jwks", "kty must be"),
    ],
    ids=["empty-claim", "plain-http", "rsa-without-n", "unknown-kty"],
)
def test_what_envoy_would_refuse_is_refused_at_load(
    change: dict[str, Any], where: str, words: str
) -> None:
    data = config()
    data["identities"]["jwt"]["corp"].update(change)
    found = problems(data)
    fields = [k for k in found if k.startswith(f"identities.jwt.corp.{where}")]
    assert fields and any(words in found[k] for k in fields), found


def test_a_jwks_on_loopback_may_be_plain_http() -> None:
    data = config()
    data["identities"]["jwt"]["corp"]["jwks"] = {"uri": "http://127.0.0.1:8080/jwks"}
    parse_config(data)


def test_a_jwks_file_is_checked_when_the_runtime_is_built(tmp_path: Any) -> None:
    data = config()
    del data["backends"]["openai"]["api_key"], data["backends"]["azure"]["api_key"]
    data["identities"]["jwt"]["corp"]["jwks"] = {"file": str(tmp_path / "missing.json")}
    with pytest.raises(ConfigError) as caught:
        build_runtime(parse_config(data))
    ((where, problem),) = caught.value.problems
    assert where == "identities.jwt.corp.jwks.file" and "cannot read" in problem


# -- which requests Envoy serves alone ------------------------------------------------------------


@pytest.mark.parametrize(
    ("team", "model", "reason"),
    [
        ("ml", "gpt-4o", None),
        ("ml", "embed", None),
        ("search", "gpt-4o", "limits apply (reserved before the call)"),
        ("ml", "gpt-4o-azure", "the body's model name is rewritten for the backend"),
        ("ml", "llama", "Envoy chooses among several backends"),
    ],
)
def test_why_not(team: str, model: str, reason: str | None) -> None:
    assert native.why_not(parse_config(config()), team, model) == reason


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"envoy": {"native_path": False}}, "envoy.native_path is off"),
        ({"guardrails": {"request": ["deny"]}}, "guards apply"),
        ({"sidecar": {"json_path": "inline"}}, "sidecar.json_path is inline"),
        ({"observability": {"audit": {"path": "/tmp/a.jsonl"}}}, "the audit trail"),
    ],
)
def test_what_takes_a_team_off_the_native_path(over: dict[str, Any], reason: str) -> None:
    data = config(**over)
    if "guardrails" in over:
        data["guards"] = {"deny": {"type": "deny", "keywords": ["x"]}}
    assert reason in (native.why_not(parse_config(data), "ml", "gpt-4o") or "")


def test_a_native_route_leaves_out_tokens_an_earlier_rule_matches() -> None:
    routes = native.native_routes(parse_config(config()))
    assert {(r.team, r.model, r.path) for r in routes} == {
        ("ml", "gpt-4o", "/v1/chat/completions"),
        ("ml", "embed", "/v1/embeddings"),
    }
    assert all([e.team for e in r.earlier] == ["search"] for r in routes)


def test_route_names_carry_team_and_model() -> None:
    name = native_route_name("ml", "meta/llama:8b", "json")
    assert name.startswith(NATIVE_ROUTE_PREFIX)
    assert native_from_route(name) == ("ml", "meta/llama:8b")
    assert native_from_route("model:gpt-4o") is None


# -- the sidecar's side: a verified token's team --------------------------------------------------


def segment(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


JWT_SHAPED = f"{segment({'alg': 'RS256', 'kid': 'k'})}.{segment({'sub': 'x'})}.c2ln"


def team_for_token(cfg: Any, verified: dict[str, Any]) -> str | None:
    found = identity.identity_for_token(cfg, verified)
    return found.team if found is not None else None


def test_the_first_rule_the_claims_match_names_the_team() -> None:
    cfg = parse_config(config())
    both = {"groups": ["ml", "search"], "realm_access": {"roles": ["ml"]}}
    assert team_for_token(cfg, {"corp": both}) == "search"
    assert team_for_token(cfg, {"corp": {"realm_access": {"roles": ["ml"]}}}) == "ml"
    assert team_for_token(cfg, {"corp": {"groups": "search"}}) == "search"
    assert team_for_token(cfg, {"other": {"groups": "search"}}) is None
    with pytest.raises(GatewayError) as caught:
        team_for_token(cfg, {"corp": {"groups": ["marketing"], "realm_access": 3}})
    assert (caught.value.status, caught.value.code) == (403, "no_team_for_token")


def test_a_refused_token_is_answered_as_a_token_and_a_wrong_key_as_a_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    rt = services_for(config(), monkeypatch, tmp_path).runtime
    failed = {"corp.failed": {"code": 3, "message": 'Jwt is "expired"'}}
    with pytest.raises(GatewayError) as caught:
        identity.authenticate(rt, {"authorization": f"Bearer {JWT_SHAPED}"}, failed)
    err = caught.value
    assert (err.status, err.code) == (401, "invalid_token")
    ((name, value),) = err.headers
    assert name == "www-authenticate" and 'error="invalid_token"' in value
    assert "Jwt is 'expired'" in value  # quotes cannot break the header's syntax
    with pytest.raises(GatewayError) as caught:
        identity.authenticate(rt, {"authorization": "Bearer sk-not-a-key-00000"}, failed)
    assert caught.value.code == "invalid_api_key"
    assert identity.authenticate(rt, {"authorization": "Bearer sk-keyed"}, failed).team == "keyed"


@pytest.mark.parametrize(
    ("token", "shaped"),
    [
        (JWT_SHAPED, True),
        ("sk-proj-abc.def.ghi", False),
        (f"{segment({'typ': 'JWT'})}.a.b", False),  # no alg
        ("a.b", False),
    ],
)
def test_looks_like_jwt(token: str, shaped: bool) -> None:
    assert identity.looks_like_jwt(token) is shaped


# -- what Envoy is given --------------------------------------------------------------------------


def hcm(doc: dict[str, Any]) -> dict[str, Any]:
    listener = doc["staticResources"]["listeners"][0]
    return listener["filterChains"][0]["filters"][0]["typedConfig"]


def test_without_jwt_nothing_of_the_native_path_is_rendered() -> None:
    data = config()
    del data["identities"]
    data["teams"]["ml"] = {"keys": [{"sha256": sha256_hex("sk-ml")}]}
    data["teams"]["search"]["keys"] = [{"sha256": sha256_hex("sk-s")}]
    doc = to_dict(bootstrap(parse_config(data)))
    names = [f["name"] for f in hcm(doc)["httpFilters"]]
    assert JWT_FILTER not in names and REQUEST_FACTS_FILTER not in names
    routes = hcm(doc)["routeConfig"]["virtualHosts"][0]["routes"]
    assert not [r for r in routes if r["name"].startswith(NATIVE_ROUTE_PREFIX)]
    assert "secrets" not in doc["staticResources"]
    assert "orFilter" not in json.dumps(hcm(doc)["accessLog"][0]["filter"])


def test_the_native_path_as_rendered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATIVE_TEST_KEY", BACKEND_SECRET)
    cfg = parse_config(config())
    text = render_yaml(cfg)
    assert BACKEND_SECRET not in text  # Envoy reads the variable; the file names it
    doc = to_dict(bootstrap(cfg))
    names = [f["name"] for f in hcm(doc)["httpFilters"]]
    assert (
        names.index(JWT_FILTER) < names.index(REQUEST_FACTS_FILTER) < names.index(EXT_PROC_FILTER)
    )
    routes = [r["name"] for r in hcm(doc)["routeConfig"]["virtualHosts"][0]["routes"]]
    native_names = [n for n in routes if n.startswith(NATIVE_ROUTE_PREFIX)]
    assert len(native_names) == 4  # two models, json and stream each
    assert routes.index(native_names[-1]) < routes.index("model:gpt-4o")  # tried first
    secrets = {s["name"]: s["genericSecret"]["secret"] for s in doc["staticResources"]["secrets"]}
    assert secrets == {
        "aigw-credential-azure": {"filename": "/run/secrets/azure"},
        "aigw-credential-openai": {"environmentVariable": "NATIVE_TEST_KEY"},
    }
    clusters = {c["name"]: c for c in doc["staticResources"]["clusters"]}

    def upstream_filters(name: str) -> list[str]:
        options = clusters[name]["typedExtensionProtocolOptions"]
        options = next(iter(options.values()))
        return [f["name"] for f in options.get("httpFilters", [])]

    assert upstream_filters("aigw-backend-openai")[0] == "envoy.filters.http.credential_injector"
    assert upstream_filters("aigw-backend-vllm") == []  # no native route goes there
    ext_proc = json.dumps([f for f in hcm(doc)["httpFilters"] if f["name"] == EXT_PROC_FILTER])
    assert JWT_NAMESPACE in ext_proc  # the downstream stage gets the verified claims


def test_the_credential_is_envoys_only_where_nothing_set_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The injector fills the native routes' requests, whose client credential the route
    removes, and leaves the downstream stage's (re-read on reload) alone; TLS backends are
    checked for their own name."""
    doc = to_dict(bootstrap(parse_config(config())))
    routes = {r["name"]: r for r in hcm(doc)["routeConfig"]["virtualHosts"][0]["routes"]}
    assert routes["native|ml|embed|json"]["requestHeadersToRemove"] == [
        "api-key",
        "accept-encoding",
    ]  # azure takes its key in api-key
    assert "authorization" in routes["native|ml|gpt-4o|json"]["requestHeadersToRemove"]
    clusters = {c["name"]: c for c in doc["staticResources"]["clusters"]}
    options = clusters["aigw-backend-openai"]["typedExtensionProtocolOptions"]
    (injector,) = [
        f for f in next(iter(options.values()))["httpFilters"] if "credential" in f["name"]
    ]
    assert not injector["typedConfig"].get("overwrite", False)
    tls = clusters["aigw-backend-openai"]["transportSocket"]["typedConfig"]
    sans = tls["commonTlsContext"]["validationContext"]["matchTypedSubjectAltNames"]
    assert sans == [{"sanType": "DNS", "matcher": {"exact": "api.openai.com"}}]


def test_streams_take_the_native_path_only_with_stream_path_auto() -> None:
    def native_names(**sidecar: Any) -> list[str]:
        doc = to_dict(bootstrap(parse_config(config(sidecar=sidecar))))
        routes = hcm(doc)["routeConfig"]["virtualHosts"][0]["routes"]
        return [r["name"] for r in routes if r["name"].startswith(NATIVE_ROUTE_PREFIX)]

    assert "native|ml|gpt-4o|stream" in native_names()
    observed = native_names(stream_path="observe")
    assert "native|ml|gpt-4o|json" in observed and "native|ml|gpt-4o|stream" not in observed


def test_the_snippet_brings_the_jwks_clusters() -> None:
    data = config()
    data["identities"]["jwt"]["corp"]["jwks"] = {"uri": "https://idp.example.test/jwks.json"}
    snippet = render_snippet(parse_config(data))
    assert "aigw-jwks-corp" in snippet and "idp.example.test" in snippet


# -- the access log's reader ----------------------------------------------------------------------


def native_entry(
    team: str, model: str, usage: dict[str, float] | None, body_bytes: int = 400
) -> Any:
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.request.request_body_bytes = body_bytes
    e.common_properties.route_name = native_route_name(team, model, "json")
    e.common_properties.start_time.GetCurrentTime()
    if usage is not None:
        namespace = e.common_properties.metadata.filter_metadata["extproc"]
        namespace.update({**usage, "token_source": "provider"})
    e.response.response_code.value = 200
    e.response.response_body_bytes = 300
    e.response.response_headers["content-type"] = "application/json"
    return e


def services_for(data: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp: Any) -> Services:
    monkeypatch.setenv("NATIVE_TEST_KEY", BACKEND_SECRET)
    secret = tmp / "azure"
    secret.write_text(BACKEND_SECRET)
    data["backends"]["azure"]["api_key"] = {"file": str(secret)}
    return build_services(build_runtime(parse_config(data)))


def account(services: Services, entry: Any) -> bool:
    async def go() -> bool:
        return access_log.account(services, entry)

    return asyncio.run(go())


def tokens(team: str, kind: str) -> float:
    child = metrics.TOKENS.labels("none", team, "gpt-4o", "openai", kind, "provider")
    return child._value.get()


def test_a_native_request_is_accounted_from_its_route(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    services = services_for(config(), monkeypatch, tmp_path)
    before = tokens("ml", "output")
    usage = {"prompt_tokens": 12.0, "completion_tokens": 5.0, "total_tokens": 17.0}
    assert account(services, native_entry("ml", "gpt-4o", usage))
    assert tokens("ml", "output") == before + 5


def test_a_native_team_that_gained_a_limit_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    data = config()
    data["teams"]["ml"] = {"limits": [{"window": "day", "tokens": 10}]}
    services = services_for(data, monkeypatch, tmp_path)
    access_log._STALE_WARNED.clear()
    with caplog.at_level(logging.WARNING, "extproc.access_log"):
        usage = {"prompt_tokens": 1.0, "completion_tokens": 1.0, "total_tokens": 2.0}
        assert account(services, native_entry("ml", "gpt-4o", usage))
        assert account(services, native_entry("ml", "gpt-4o", usage))
    warned = [r for r in caplog.records if "native route" in r.getMessage()]
    assert len(warned) == 1 and "limits apply" in warned[0].getMessage()


def test_extproc_check_says_which_requests_envoy_serves_alone(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from extproc.cli import main

    monkeypatch.setenv("NATIVE_TEST_KEY", BACKEND_SECRET)
    secret = tmp_path / "azure"
    secret.write_text(BACKEND_SECRET)
    data = config()
    data["backends"]["azure"]["api_key"] = {"file": str(secret)}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "team ml, model gpt-4o: native path (Envoy alone)" in out
    assert "team ml, model llama: Envoy chooses among several backends" in out
    assert "team search, model gpt-4o: limits apply" in out
    assert BACKEND_SECRET not in out


def test_an_answer_without_usage_is_counted_at_its_maximum(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    services = services_for(config(), monkeypatch, tmp_path)
    before = {kind: estimated_tokens(kind) for kind in ("input", "output")}
    assert account(services, native_entry("ml", "gpt-4o", None, body_bytes=401))
    assert estimated_tokens("input") == before["input"] + 101  # ceil(401 / 4)
    assert estimated_tokens("output") == before["output"] + 4096  # quota.default_max_tokens


def estimated_tokens(kind: str) -> float:
    child = metrics.TOKENS.labels("none", "ml", "gpt-4o", "openai", kind, "estimate")
    return child._value.get()


def test_a_native_entry_is_not_a_release_a_shutdown_waits_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    services = services_for(config(), monkeypatch, tmp_path)
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.extend([native_entry("ml", "gpt-4o", None) for _ in range(3)])
    receiver = access_log.AccessLogReceiver(lambda: services)

    async def batches() -> Any:
        yield message

    async def read() -> None:
        await receiver.StreamAccessLogs(batches(), None)

    pending = RELEASED.pending
    RELEASED.add()  # a strict-path request whose entry is still to come
    try:
        asyncio.run(read())
        assert RELEASED.pending == pending + 1
    finally:
        RELEASED.done()


def test_a_team_whose_rule_is_gone_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    data = config()
    del data["identities"]["jwt"]["corp"]["teams"][1]  # ml's rule
    data["teams"]["ml"] = {"keys": [{"sha256": sha256_hex("sk-ml")}]}
    services = services_for(data, monkeypatch, tmp_path)
    access_log._STALE_WARNED.clear()
    with caplog.at_level(logging.WARNING, "extproc.access_log"):
        assert account(services, native_entry("ml", "gpt-4o", None))
    (warned,) = [r.getMessage() for r in caplog.records if "native route" in r.getMessage()]
    assert "no JWT rule maps to the team now" in warned
