"""What each target runs: the scenario, the gateway's config and the Envoy-only baseline's
bootstrap derived from it, on free loopback ports; the streaming benchmark's variants."""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass
from typing import Any

from extproc.config import Config
from extproc.contract import ROUTE_HEADER, TARGET_HEADER
from extproc.envoy_config import (
    EXT_PROC_FILTER,
    GATEWAY_FILTERS,
    HTTP_PROTOCOL_OPTIONS,
    SIDECAR_CLUSTER,
    bootstrap,
    to_dict,
)

HOST = "127.0.0.1"
MODEL = "gpt-4o-mini"
API_KEY = "sk-bench"
# The endpoint both load clients call, on either target.
PATH = "/v1/chat/completions"
# The two process trees every benchmark compares, in the order each measurement runs them.
TARGETS = ("baseline", "gateway")
# The chat benchmark adds the floor between them: the gateway's Envoy config with a
# do-nothing Python ext_proc server (benchmarks/lib/floor.py) in the sidecar's place.
CHAT_TARGETS = ("baseline", "floor", "gateway")
QUOTA_STORES = ("memory", "redis", "none")
# The status the failover scenario's priority-0 backend answers every request with.
FAILOVER_FAULTS = ("429", "503")


@dataclass(frozen=True)
class Scenario:
    """What the gateway runs. The baseline is always Envoy alone with the same routes."""

    quota: str = "memory"  # memory | redis | none
    guards: bool = False
    failover: bool = False
    failover_fault: str = "429"
    workers: int = 1

    @property
    def name(self) -> str:
        """A short id: JSON keys and progress lines."""
        parts = ["chat", f"quota-{self.quota}"]
        if self.guards:
            parts.append("guards")
        if self.failover:
            parts.append(f"failover-{self.failover_fault}")
        if self.workers > 1:
            parts.append(f"workers-{self.workers}")
        return "+".join(parts)

    @property
    def label(self) -> str:
        """What the gateway does on every request, for the reports."""
        quota = {
            "memory": "quota (embedded store)",
            "redis": "quota (Redis on loopback)",
            "none": "no quota",
        }[self.quota]
        parts = ["auth", "token counting", quota]
        if self.guards:
            parts.append("local guards")
        if self.failover:
            parts.append(f"failover (priority 0 answers {self.failover_fault}, retried on 1)")
        if self.workers > 1:
            parts.append(f"{self.workers} sidecar workers")
        return ", ".join(parts)

    @property
    def is_headline(self) -> bool:
        """The configuration the performance budget is defined for."""
        return self == Scenario(failover_fault=self.failover_fault)


# What the streaming benchmark measures: Envoy alone, and the gateway on each of its two stream
# paths. A client that asks for usage is followed by the observer (Envoy holds no chunk back);
# one that does not is relayed inline (the usage event the gateway asked for is cut out of its
# stream).
STREAM_VARIANTS: dict[str, tuple[str, bool]] = {  # variant -> (target, client asks for usage)
    "baseline": ("baseline", False),
    "inline": ("gateway", False),
    "observed": ("gateway", True),
}
STREAM_GATEWAY_VARIANTS = ("inline", "observed")
STREAM_LABELS = {
    "baseline": "Envoy alone",
    "inline": "gateway, inline",
    "observed": "gateway, observed",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# `--guards`: the local guard pipeline on every request and response (no external guard).
LOCAL_GUARDS: dict[str, Any] = {
    "guards": {
        "deny": {
            "type": "deny",
            "patterns": ["(?i)ignore (all )?(previous|prior) instructions"],
            "keywords": ["DAN mode", "forbidden-word"],
        },
        "pii": {"type": "pii", "action": "mask"},
        "size": {"type": "max_prompt_tokens", "max_tokens": 8000},
        "secrets-out": {"type": "pii", "entities": ["secret"]},
    },
    "guardrails": {"request": ["deny", "pii", "size"], "response": ["secrets-out"]},
}

# `--quota memory|redis`: limits that never reject, so every request reserves against both
# and settles (the work the quota adds), without a 429 ever changing what is measured.
QUOTA_LIMITS: list[dict[str, Any]] = [
    {"window": "minute", "tokens": 10**12},
    {"window": "minute", "requests": 10**12},
]
# The product's default (50 ms) counts a slower Redis answer as "store unavailable" (503):
# at saturation on two shared cores a call can take that long, and a 503 is not a cost.
REDIS_TIMEOUT_MS = 1000


def gateway_config(
    fake_port: int,
    scenario: Scenario | None = None,
    redis_url: str | None = None,
    failing_port: int | None = None,
) -> dict[str, Any]:
    """The gateway's config: free loopback ports, one team key, the running fake as backend."""
    scenario = scenario or Scenario()
    team: dict[str, Any] = {"keys": [{"sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}]}
    config: dict[str, Any] = {
        "sidecar": {"listen": f"{HOST}:{free_port()}"},
        "envoy": {"listen": f"{HOST}:{free_port()}", "admin": f"{HOST}:{free_port()}"},
        "teams": {"bench": team},
        "backends": {"fake": {"url": f"http://{HOST}:{fake_port}/v1"}},
        "models": {MODEL: {"targets": [{"backend": "fake"}]}},
    }
    if scenario.workers > 1:
        # Only when asked: a config without the key is what every earlier result measured.
        config["sidecar"]["workers"] = scenario.workers
    if scenario.quota != "none":
        team["limits"] = QUOTA_LIMITS
    if scenario.quota == "redis":
        assert redis_url is not None
        config["quota"] = {
            "store": "redis",
            "redis": {"url": redis_url, "timeout_ms": REDIS_TIMEOUT_MS},
        }
    if scenario.failover:
        assert failing_port is not None
        # A pooled model: priority 0 always fails, so Envoy retries every request on priority 1.
        config["backends"]["failing"] = {"url": f"http://{HOST}:{failing_port}/v1"}
        config["models"][MODEL] = {
            "targets": [
                {"backend": "failing", "priority": 0},
                {"backend": "fake", "priority": 1},
            ]
        }
    if scenario.guards:
        config.update(LOCAL_GUARDS)
    return config


def _without_ext_proc(filters: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """The filters without the gateway's (GATEWAY_FILTERS): their cost is the gateway's."""
    kept = [f for f in filters if f.get("name") not in GATEWAY_FILTERS]
    if len(kept) == len(filters):
        raise RuntimeError(f"no {EXT_PROC_FILTER} filter in {where}: the bootstrap changed shape")
    return kept


def baseline_bootstrap(cfg: Config, listen: str, admin: str) -> dict[str, Any]:
    """The gateway's bootstrap for `cfg`, on other ports, with every ext_proc piece removed.

    Listener, connection manager, stdout access log, clusters (a pooled model's aggregate
    cluster and its members too), the model route's action (its retry policy too) and timeouts
    stay exactly as the gateway renders them, so the sidecar (and the header match it needs)
    is the only difference.
    """
    envoy = cfg.envoy.model_copy(update={"listen": listen, "admin": admin})
    doc = to_dict(bootstrap(cfg.model_copy(update={"envoy": envoy})))
    resources = doc["staticResources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != SIDECAR_CLUSTER]
    for cluster in resources["clusters"]:
        options = cluster.get("typedExtensionProtocolOptions", {}).get(HTTP_PROTOCOL_OPTIONS)
        if options and "httpFilters" in options:
            # What remains is envoy.filters.http.upstream_codec, Envoy's default upstream chain.
            options["httpFilters"] = _without_ext_proc(
                options["httpFilters"], f"cluster {cluster['name']}"
            )
    wanted_route = f"model:{MODEL}"
    for listener in resources["listeners"]:
        for chain in listener["filterChains"]:
            for network_filter in chain["filters"]:
                hcm = network_filter["typedConfig"]
                if not hcm.get("@type", "").endswith(".HttpConnectionManager"):
                    continue
                hcm["httpFilters"] = _without_ext_proc(hcm["httpFilters"], "the listener")
                # The gRPC access log to the sidecar goes; the stdout one (if on) stays.
                logs = hcm.get("accessLog", [])
                hcm["accessLog"] = [x for x in logs if SIDECAR_CLUSTER not in json.dumps(x)]
                for vhost in hcm["routeConfig"]["virtualHosts"]:
                    routes = []
                    for route in vhost["routes"]:
                        if route.get("name") == wanted_route:
                            # No sidecar sets x-aigw-model: route /v1/ straight to the cluster.
                            route = {**route, "name": "v1", "match": {"prefix": "/v1/"}}
                        elif route["match"].get("headers"):
                            continue  # another model's header route
                        routes.append(route)
                    vhost["routes"] = routes
    text = json.dumps(doc)
    if SIDECAR_CLUSTER in text or EXT_PROC_FILTER in text or '"name": "v1"' not in text:
        raise RuntimeError("could not derive the Envoy-only baseline from the gateway bootstrap")
    return doc


def floor_bootstrap(cfg: Config, listen: str, admin: str, floor: str) -> dict[str, Any]:
    """The gateway's bootstrap for `cfg`, on other ports, its sidecar cluster pointed at the
    floor server (`floor`, HOST:PORT): every filter, processing mode, access log and cluster
    exactly as the gateway renders them, so the server behind them is the only difference."""
    envoy = cfg.envoy.model_copy(update={"listen": listen, "admin": admin})
    sidecar = cfg.sidecar.model_copy(update={"listen": floor})
    doc = to_dict(bootstrap(cfg.model_copy(update={"envoy": envoy, "sidecar": sidecar})))
    host, port = floor.rsplit(":", 1)
    address = {"socketAddress": {"address": host, "portValue": int(port)}}
    clusters = [c for c in doc["staticResources"]["clusters"] if c["name"] == SIDECAR_CLUSTER]
    endpoints = [
        lb["endpoint"]["address"]
        for c in clusters
        for group in c["loadAssignment"]["endpoints"]
        for lb in group["lbEndpoints"]
    ]
    if not endpoints or any(a != address for a in endpoints):
        raise RuntimeError("could not point the floor's Envoy at the floor server")
    return doc


def floor_routing(doc: dict[str, Any]) -> dict[str, str]:
    """The request headers the model's route matches (exact values): what the floor server
    sets so Envoy routes the request as it routes the gateway's (ROUTE_HEADER, and
    TARGET_HEADER when one backend serves the model)."""
    wanted_route = f"model:{MODEL}"
    for listener in doc["staticResources"]["listeners"]:
        for chain in listener["filterChains"]:
            for network_filter in chain["filters"]:
                hcm = network_filter["typedConfig"]
                for vhost in hcm.get("routeConfig", {}).get("virtualHosts", []):
                    for route in vhost["routes"]:
                        if route.get("name") != wanted_route:
                            continue
                        headers = {
                            h["name"]: h["stringMatch"]["exact"] for h in route["match"]["headers"]
                        }
                        known = {ROUTE_HEADER, TARGET_HEADER}
                        if set(headers) - known or ROUTE_HEADER not in headers:
                            raise RuntimeError(f"the floor cannot route {wanted_route}: {headers}")
                        return headers
    raise RuntimeError(f"no route {wanted_route} in the gateway bootstrap")


def floor_releases(cfg: Config, routing: dict[str, str]) -> bool:
    """Whether the sidecar releases this benchmark's chat request to Envoy with the request
    body (ends its stream there, Envoy's access log brings the answer back): one backend
    prepared by the downstream stage, `json_path: access_log`, no response guard
    (extproc/request_plan.py). The floor then ends its stream at the same message."""
    return (
        TARGET_HEADER in routing
        and cfg.sidecar.json_path == "access_log"
        and not cfg.guardrails.response
    )
