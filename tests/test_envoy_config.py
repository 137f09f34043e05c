"""The rendered Envoy configuration: accepted by the real Envoy, in sync with envoy/, no secrets."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from extproc.config import load_config, parse_config
from extproc.envoy_config import (
    EXT_PROC_FILTER,
    HTTP_PROTOCOL_OPTIONS,
    OBSERVER_FILTER,
    REQUEST_BUFFER_FILTER,
    REQUEST_HEADERS_FILTER,
    RESPONSE_HEADERS_FILTER,
    STREAM_USAGE_FILTER,
    USAGE_FILTER,
    render_istio,
    render_snippet,
    render_yaml,
    to_dict,
)
from extproc.supervisor import envoy_binary

from .conftest import REPO

# Starts a real Envoy, Redis or Prometheus: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

QUICKSTART = REPO / "examples" / "quickstart.yaml"
GATEWAY_FILTERS = [
    REQUEST_HEADERS_FILTER,
    REQUEST_BUFFER_FILTER,
    EXT_PROC_FILTER,
    OBSERVER_FILTER,
    RESPONSE_HEADERS_FILTER,
    USAGE_FILTER,
    STREAM_USAGE_FILTER,
]


def envoy_validate(path) -> None:
    proc = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout + proc.stderr


def test_quickstart_bootstrap_passes_envoy_validate(tmp_path):
    out = tmp_path / "envoy.yaml"
    out.write_text(render_yaml(load_config(QUICKSTART)))
    envoy_validate(out)


@pytest.mark.parametrize(
    ("committed", "render"),
    [
        ("quickstart.yaml", render_yaml),
        ("extproc-filter.yaml", render_snippet),
        ("istio-envoyfilter.yaml", render_istio),
    ],
)
def test_committed_envoy_files_match_the_renderer(committed, render):
    expected = render(load_config(QUICKSTART))
    assert (REPO / "envoy" / committed).read_text() == expected, "run `make envoy-files`"


def _bootstrap_around(
    http_filters: list[dict], cluster: dict, access_log: list[dict], local_reply: dict
) -> dict:
    """A minimal existing-Envoy bootstrap that takes the drop-in as an operator would."""
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "existing",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters."
                                        "network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "existing",
                                        "access_log": access_log,
                                        "local_reply_config": local_reply,
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "llm",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {
                                                                "prefix": "/v1/",
                                                                "headers": [
                                                                    {
                                                                        "name": "x-aigw-model",
                                                                        "string_match": {
                                                                            "exact": "gpt-4o-mini"
                                                                        },
                                                                    }
                                                                ],
                                                            },
                                                            "route": {"cluster": "my_llm"},
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            *http_filters,
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions"
                                                    ".filters.http.router.v3.Router"
                                                },
                                            },
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                cluster,
                {
                    "name": "my_llm",
                    "type": "STATIC",
                    "load_assignment": {
                        "cluster_name": "my_llm",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": 8000,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                },
            ],
        }
    }


def test_drop_in_snippet_validates_inside_an_existing_envoy(tmp_path):
    snippet = yaml.safe_load((REPO / "envoy" / "extproc-filter.yaml").read_text())
    filters = snippet["http_filters"]
    assert [f["name"] for f in filters] == GATEWAY_FILTERS
    (cluster,) = snippet["clusters"]
    (access_log,) = snippet["access_log"]
    assert access_log["typedConfig"]["commonConfig"]["grpcService"]["envoyGrpc"] == {
        "clusterName": cluster["name"]
    }
    out = tmp_path / "existing.yaml"
    around = _bootstrap_around(filters, cluster, [access_log], snippet["local_reply_config"])
    out.write_text(yaml.safe_dump(around))
    envoy_validate(out)


def test_istio_manifest_patches_validate(tmp_path):
    manifest = yaml.safe_load((REPO / "envoy" / "istio-envoyfilter.yaml").read_text())
    assert manifest["kind"] == "EnvoyFilter"
    patches = manifest["spec"]["configPatches"]
    filter_patches = [p["patch"] for p in patches if p["applyTo"] == "HTTP_FILTER"]
    (cluster_patch,) = [p["patch"] for p in patches if p["applyTo"] == "CLUSTER"]
    assert {p["operation"] for p in filter_patches} == {"INSERT_BEFORE"}
    # Each is inserted right before the router, so applying them in order keeps this order.
    filters = [p["value"] for p in filter_patches]
    assert [f["name"] for f in filters] == GATEWAY_FILTERS
    (hcm_patch,) = [p["patch"] for p in patches if p["applyTo"] == "NETWORK_FILTER"]
    assert hcm_patch["operation"] == "MERGE"
    merged = hcm_patch["value"]["typed_config"]
    out = tmp_path / "istio.yaml"
    around = _bootstrap_around(
        filters, cluster_patch["value"], merged["access_log"], merged["local_reply_config"]
    )
    out.write_text(yaml.safe_dump(around))
    envoy_validate(out)


def _config(**over) -> dict:
    base = {
        "teams": {"t": {"keys": [{"env": "SOME_TEAM_KEY"}]}},
        "backends": {
            "openai": {"url": "https://api.openai.com/v1", "api_key": {"env": "OPENAI_KEY"}},
            "azure": {
                "url": "https://example.openai.azure.com/openai/v1",
                "auth_header": "api-key",
                "api_key": {"env": "AZURE_KEY"},
            },
            "vllm-a": {"url": "http://10.0.0.1:8000/v1"},
            "vllm-b": {"url": "http://vllm-b.internal:8000"},
        },
        "models": {
            "gpt-4o": {"targets": [{"backend": "openai"}]},
            "gpt-4o-azure": {"targets": [{"backend": "azure", "model": "gpt-4o"}]},
            "llama": {
                "targets": [
                    {"backend": "vllm-a", "weight": 90},
                    {"backend": "vllm-b", "weight": 10},
                ]
            },
        },
    }
    base.update(over)
    return base


def test_render_weighted_split_tls_and_path_rewrite(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_KEY", "sk-live-must-not-leak-1234")
    cfg = parse_config(_config())
    text = render_yaml(cfg)
    assert "sk-live-must-not-leak" not in text
    boot = yaml.safe_load(text)
    hcm = boot["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    routes = {r["name"]: r for r in hcm["routeConfig"]["virtualHosts"][0]["routes"]}
    weighted = routes["model:llama"]["route"]["weightedClusters"]["clusters"]
    # A canary's members run the upstream stage (it learns which backend Envoy picked) ...
    assert [(c["name"], c["weight"]) for c in weighted] == [
        ("aigw-split-vllm-a", 90),
        ("aigw-split-vllm-b", 10),
    ]
    assert "requestHeadersToRemove" not in routes["model:llama"]
    # ... a single-backend model goes to the plain cluster, which has none: the downstream
    # stage set the credential and model name, and the route drops the gateway's headers.
    assert routes["model:gpt-4o"]["route"]["cluster"] == "aigw-backend-openai"
    assert routes["model:gpt-4o"]["requestHeadersToRemove"] == [
        "x-aigw-model",
        "x-aigw-pool",
        "x-aigw-team",
        "x-aigw-target",
    ]
    assert "prefixRewrite" not in routes["model:gpt-4o"]["route"]
    assert routes["model:gpt-4o-azure"]["route"]["prefixRewrite"] == "/openai/v1/"
    clusters = {c["name"]: c for c in boot["staticResources"]["clusters"]}
    # Envoy's default circuit breakers (1024 requests) would refuse the 1025th open stream.
    (sidecar_limits,) = clusters["extproc_sidecar"]["circuitBreakers"]["thresholds"]
    assert sidecar_limits["maxRequests"] == 200_000
    (backend_limits,) = clusters["aigw-backend-vllm-a"]["circuitBreakers"]["thresholds"]
    assert backend_limits["maxRequests"] == backend_limits["maxPendingRequests"] == 10_000

    def stages(name: str) -> list[str]:
        options = clusters[name]["typedExtensionProtocolOptions"][HTTP_PROTOCOL_OPTIONS]
        return [f["name"] for f in options.get("httpFilters", [])]

    assert stages("aigw-split-vllm-a") == [EXT_PROC_FILTER, "envoy.filters.http.upstream_codec"]
    assert stages("aigw-backend-vllm-a") == stages("aigw-backend-openai") == []
    assert "aigw-split-openai" not in clusters  # in no canary
    tls = clusters["aigw-backend-openai"]["transportSocket"]["typedConfig"]
    assert tls["sni"] == "api.openai.com"
    assert "transportSocket" not in clusters["aigw-backend-vllm-a"]
    out = tmp_path / "envoy.yaml"
    out.write_text(text)
    envoy_validate(out)


def test_unix_socket_sidecar_renders_a_pipe(tmp_path):
    cfg = parse_config(_config(sidecar={"listen": "unix:/tmp/extproc.sock"}))
    boot = yaml.safe_load(render_yaml(cfg))
    sidecar = next(c for c in boot["staticResources"]["clusters"] if c["name"] == "extproc_sidecar")
    endpoint = sidecar["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]
    assert endpoint["address"] == {"pipe": {"path": "/tmp/extproc.sock"}}
    out = tmp_path / "envoy.yaml"
    out.write_text(render_yaml(cfg))
    envoy_validate(out)


def test_render_a_pooled_model_as_an_aggregate_cluster_with_failover_retries(tmp_path):
    models = {
        "resilient": {
            "targets": [
                {"backend": "openai", "model": "gpt-4o", "priority": 0},
                {"backend": "vllm-a", "model": "llama", "priority": 1},
            ]
        }
    }
    text = render_yaml(parse_config(_config(models=models)))
    boot = yaml.safe_load(text)
    hcm = boot["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    vhost = hcm["routeConfig"]["virtualHosts"][0]
    assert vhost["includeAttemptCountInResponse"] is True
    route = next(r for r in vhost["routes"] if r["name"] == "model:resilient")["route"]
    assert route["cluster"] == "aigw-pool-resilient"
    retry = route["retryPolicy"]
    assert retry["retryOn"] == "5xx,reset,connect-failure,retriable-status-codes"
    assert retry["retriableStatusCodes"] == [429] and retry["numRetries"] == 1
    # The next pool is another backend: no 25 ms default back-off before trying it.
    assert retry["retryBackOff"] == {"baseInterval": "0.001s", "maxInterval": "0.010s"}
    clusters = {c["name"]: c for c in boot["staticResources"]["clusters"]}
    pool = clusters["aigw-pool-resilient"]
    assert pool["clusterType"]["typedConfig"]["clusters"] == [
        "aigw-backend-openai",
        "aigw-backend-vllm-a",
    ]
    options = pool["typedExtensionProtocolOptions"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    stage = options["httpFilters"][0]["typedConfig"]
    assert stage["requestAttributes"] == ["xds.upstream_host_metadata"]
    endpoint = clusters["aigw-backend-vllm-a"]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]
    assert endpoint["metadata"]["filterMetadata"]["extproc"] == {"backend": "vllm-a"}
    assert clusters["aigw-backend-vllm-a"]["outlierDetection"]["consecutive_5xx"] == 5
    out = tmp_path / "envoy.yaml"
    out.write_text(text)
    envoy_validate(out)


def test_render_a_pool_of_several_backends_with_their_own_tls(tmp_path):
    data = _config()
    data["backends"]["openai-eu"] = {"url": "https://eu.api.openai.com/v1"}
    data["models"] = {
        "spread": {
            "targets": [
                {"backend": "openai", "weight": 3},
                {"backend": "openai-eu", "weight": 1},
                {"backend": "vllm-a", "priority": 1},
            ]
        }
    }
    text = render_yaml(parse_config(data))
    clusters = {c["name"]: c for c in yaml.safe_load(text)["staticResources"]["clusters"]}
    aggregate = clusters["aigw-pool-spread"]["clusterType"]["typedConfig"]["clusters"]
    assert aggregate == ["aigw-pool-spread-0", "aigw-backend-vllm-a"]
    pool = clusters["aigw-pool-spread-0"]
    endpoints = pool["loadAssignment"]["endpoints"][0]["lbEndpoints"]
    assert [(e["endpoint"]["hostname"], e["loadBalancingWeight"]) for e in endpoints] == [
        ("api.openai.com", 3),
        ("eu.api.openai.com", 1),
    ]
    snis = {
        m["name"]: m["transportSocket"]["typedConfig"]["sni"]
        for m in pool["transportSocketMatches"]
    }
    assert snis == {"openai": "api.openai.com", "openai-eu": "eu.api.openai.com"}
    out = tmp_path / "envoy.yaml"
    out.write_text(text)
    envoy_validate(out)


def test_several_workers_get_enough_connections_to_spread_over(tmp_path):
    cfg = parse_config(_config(sidecar={"listen": "127.0.0.1:50051", "workers": 3}))
    boot = yaml.safe_load(render_yaml(cfg))
    sidecar = next(c for c in boot["staticResources"]["clusters"] if c["name"] == "extproc_sidecar")
    endpoints = sidecar["loadAssignment"]["endpoints"][0]["lbEndpoints"]
    assert len(endpoints) == 12  # 4 per worker: Envoy opens a connection per host and thread
    assert {e["endpoint"]["address"]["socketAddress"]["portValue"] for e in endpoints} == {50051}
    out = tmp_path / "envoy.yaml"
    out.write_text(render_yaml(cfg))
    envoy_validate(out)


def test_a_direct_route_matches_its_backend_and_a_stale_config_answers_503(tmp_path):
    data = _config()
    data["models"]["resilient"] = {
        "quota_failover": True,
        "targets": [
            {"backend": "openai", "priority": 0},
            {"backend": "vllm-a", "priority": 1},
        ],
    }
    cfg = parse_config(data)
    hcm = yaml.safe_load(render_yaml(cfg))["staticResources"]["listeners"][0]["filterChains"][0]
    routes = hcm["filters"][0]["typedConfig"]["routeConfig"]["virtualHosts"][0]["routes"]
    by_name = {r["name"]: r for r in routes}
    names = [r["name"] for r in routes]

    def headers(route: dict) -> dict[str, str]:
        return {h["name"]: h["stringMatch"]["exact"] for h in route["match"]["headers"]}

    assert headers(by_name["model:gpt-4o"]) == {
        "x-aigw-model": "gpt-4o",
        "x-aigw-target": "openai",
    }
    # Right after it: the same model prepared for another backend (a newer sidecar config).
    stale = by_name["model:gpt-4o:stale"]
    assert names.index("model:gpt-4o:stale") == names.index("model:gpt-4o") + 1
    assert headers(stale) == {"x-aigw-model": "gpt-4o"}
    assert stale["directResponse"]["status"] == 503
    assert "envoy_config_out_of_date" in stale["directResponse"]["body"]["inlineString"]
    # A quota failover pinned to a pool of one is prepared downstream too.
    assert headers(by_name["model:resilient:pool1"])["x-aigw-target"] == "vllm-a"
    assert "x-aigw-target" in by_name["model:resilient:pool1"]["requestHeadersToRemove"]
    assert "x-aigw-target" not in headers(by_name["model:resilient"])  # Envoy chooses there
    assert "model:resilient:stale" not in by_name
    out = tmp_path / "envoy.yaml"
    out.write_text(render_yaml(cfg))
    envoy_validate(out)


def test_the_access_log_and_usage_reader_take_only_what_they_should() -> None:
    import re

    from extproc.envoy_config import JSON_CONTENT_TYPE, accounting_access_log, usage_filter

    cfg = load_config(QUICKSTART)
    log_filter = to_dict(accounting_access_log(cfg))["filter"]["metadataFilter"]
    # Without this Envoy sends every request lacking the key: all of them but the released.
    assert log_filter["matchIfKeyNotFound"] is False
    rules = to_dict(usage_filter())["typedConfig"]["responseRules"]
    assert rules["allowContentTypesRegex"]["regex"] == JSON_CONTENT_TYPE
    for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        assert re.fullmatch(JSON_CONTENT_TYPE, content_type), content_type
    for content_type in ("text/event-stream", "application/jsonl", "text/plain"):
        assert not re.fullmatch(JSON_CONTENT_TYPE, content_type), content_type


def test_a_streams_usage_report_lands_where_a_json_answers_usage_does() -> None:
    """extproc.stream_usage reads each event of a stream with the JSON usage filter's rules:
    the access log's reader finds a stream's report under the same keys, marked `provider`."""
    from extproc.envoy_config import stream_usage_filter, usage_filter

    json_rules = to_dict(usage_filter())["typedConfig"]["responseRules"]["rules"]
    typed = to_dict(stream_usage_filter())["typedConfig"]
    assert typed["@type"].endswith("sse_to_metadata.v3.SseToMetadata")
    parser = typed["responseRules"]["contentParser"]
    assert parser["name"] == "envoy.content_parsers.json"
    stream_rules = parser["typedConfig"]["rules"]
    # Every event is read (no rule stops after its first match): the last report wins.
    assert all(set(r) == {"rule"} for r in stream_rules), stream_rules

    # The same rules, nothing more: no onMissing that an event without `usage` (every event
    # but the report) would write.
    assert [r["rule"] for r in stream_rules] == json_rules
    assert all(set(r) == {"selectors", "onPresent"} for r in json_rules), json_rules
    targets = {r["rule"]["onPresent"]["key"]: r["rule"]["onPresent"] for r in stream_rules}
    assert targets.keys() == {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "token_source",
    }
    assert {t["metadataNamespace"] for t in targets.values()} == {"extproc"}
    assert targets["token_source"]["value"] == "provider"


def test_jwt_identities_and_native_routes_pass_envoy_validate(tmp_path, monkeypatch):
    """Every JWKS source, and the native path's routes, secrets and credential filters, as the
    real Envoy reads them (a backend credential Envoy reads from the environment must be set)."""
    monkeypatch.setenv("OPENAI_KEY", "sk-live-must-not-leak-1234")
    monkeypatch.setenv("AZURE_KEY", "azure-secret-0000")
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    jwk = jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
    jwks = f'{{"keys": [{jwk}]}}'
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(jwks)
    rules = [{"claim": "groups", "value": "ml", "team": "t"}]
    identities = {
        "jwt": {
            "remote": {
                "issuer": "https://a/",
                "jwks": {"uri": "https://idp.test/k"},
                "teams": rules,
            },
            "local": {"issuer": "https://b/", "jwks": {"file": str(jwks_file)}, "teams": rules},
            "inline": {"issuer": "https://c/", "jwks": {"inline": jwks}, "teams": rules},
        }
    }
    data = _config(identities=identities)
    data["teams"]["t"] = {}
    text = render_yaml(parse_config(data))
    assert "sk-live-must-not-leak" not in text and "native|t|gpt-4o|json" in text
    out = tmp_path / "envoy.yaml"
    out.write_text(text)
    envoy_validate(out)
