"""What each target runs: the scenario, the gateway's config and the Envoy-only baseline's
bootstrap derived from it, on free loopback ports; the streaming benchmark's variants."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from extproc.config import Config
from extproc.contract import ROUTE_HEADER, TARGET_HEADER
from extproc.envoy_config import (
    AWS_SIGNING_FILTER,
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
# The gateway's `sidecar.stream_path` settings the streaming benchmark measures (`--stream-path`).
STREAM_PATHS = ("auto", "observe")
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
    stream_path: str = "auto"  # the gateway's sidecar.stream_path (the product's default: auto)
    # The caller is identified by a JWT Envoy verifies, its team has no limit and no guard:
    # Envoy serves every request alone (extproc/native.py), the sidecar only accounts them.
    native: bool = False
    # The API the backend speaks (a backend `type`): another than OpenAI's is translated both
    # ways by the sidecar (extproc/providers/); Envoy alone then calls the fake's OpenAI API.
    provider: str = "openai"
    # The API the load clients speak to the gateway (CLIENTS): another than OpenAI's chat
    # completions is translated to chat completions for the fake and its answer back
    # (docs/clients.md); Envoy alone is still sent the OpenAI chat request.
    client: str = "openai"

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
        if self.stream_path != "auto":
            parts.append(f"stream-path-{self.stream_path}")
        if self.native:
            parts.append("native")
        if self.provider != "openai":
            parts.append(f"provider-{self.provider}")
        if self.client != "openai":
            parts.append(f"client-{self.client}")
        return "+".join(parts)

    @property
    def label(self) -> str:
        """What the gateway does on every request, for the reports."""
        quota = {
            "memory": "quota (embedded store)",
            "redis": "quota (Redis on loopback)",
            "none": "no quota",
        }[self.quota]
        if self.native:
            return (
                "native path: a JWT verified by Envoy, a team without limits or guards; Envoy "
                "routes by the body's model and serves alone, the sidecar accounts each answer "
                "from the access log"
            )
        parts = ["auth", "token counting", quota]
        if self.guards:
            parts.append("local guards")
        if self.failover:
            parts.append(f"failover (priority 0 answers {self.failover_fault}, retried on 1)")
        if self.workers > 1:
            parts.append(f"{self.workers} sidecar workers")
        if self.stream_path != "auto":
            parts.append(f"sidecar.stream_path: {self.stream_path}")
        if self.provider != "openai":
            parts.append(
                f"a backend speaking {PROVIDER_NAMES[self.provider]}"
                + (" (translated both ways)" if self.provider not in ("openai", "azure") else "")
            )
        if self.client != "openai":
            parts.append(
                f"a client speaking {CLIENT_NAMES[self.client]}, translated to chat completions "
                "for the backend and the answer back (Envoy alone is sent the equivalent OpenAI "
                "chat completions request: the comparison includes the translation)"
            )
        return ", ".join(parts)

    @property
    def bearer(self) -> str:
        """What the load clients send as `Authorization: Bearer ...`."""
        return native_identity()[1] if self.native else API_KEY

    @property
    def is_headline(self) -> bool:
        """The configuration the performance budget is defined for."""
        return self == Scenario(failover_fault=self.failover_fault)


# What the streaming benchmark measures, in this order within every run: Envoy alone, and for
# each of the two client behaviours the floor then the gateway. The keys say what the client
# does, not which path the gateway takes: "inline", the client did not ask for usage;
# "observed", it asked for it (`stream_options.include_usage`). Which path each takes depends
# on the gateway's `sidecar.stream_path` (STREAM_PATH_OF; extproc/request_plan.py): with
# `auto` (the default) and one backend, a stream whose client asked for usage is released with
# its body (no sidecar stage follows it, Envoy's extproc.stream_usage filter reads the usage
# report); with `observe` the stream observer follows every stream. The keys are kept from when
# "observed" meant the observer under the default: the budget and every result use them.
STREAM_VARIANTS: dict[str, tuple[str, bool]] = {  # variant -> (target, client asks for usage)
    "baseline": ("baseline", False),
    "floor_inline": ("floor", False),
    "inline": ("gateway", False),
    "floor_observed": ("floor", True),
    "observed": ("gateway", True),
}
STREAM_GATEWAY_VARIANTS = ("inline", "observed")
# Each gateway variant's floor: the same client request through the floor target.
STREAM_FLOOR_OF = {"inline": "floor_inline", "observed": "floor_observed"}
# The client behaviour a variant (or its floor) stands for.
STREAM_CLIENT = {"inline": "no usage asked", "observed": "usage asked"}
# The path a gateway variant's streams take, per `sidecar.stream_path` (request_plan.plan with
# one backend, `json_path: access_log`, no response guard: the benchmark's gateway).
STREAM_PATH_OF = {
    "auto": {"inline": "inline", "observed": "released"},
    "observe": {"inline": "observer", "observed": "observer"},
}
# What the gateway does on that path, and what the floor server does in its place.
STREAM_PATH_TEXT = {
    ("auto", "inline"): (
        "the sidecar asks the backend for the usage report, the response body switches to "
        "ext_proc STREAMED mode and every chunk waits for the sidecar, which cuts the report "
        "out again"
    ),
    ("auto", "observed"): (
        "the sidecar releases the request with its body: no sidecar stage follows the stream; "
        "Envoy's extproc.stream_usage filter reads the usage report as it passes and the access "
        "log brings it to the sidecar"
    ),
    ("observe", "inline"): (
        "released with its body, the stream observer follows a copy (observability mode: Envoy "
        "holds no chunk back) and counts the completion itself (no usage report is asked for)"
    ),
    ("observe", "observed"): (
        "released with its body, the stream observer follows a copy (observability mode: Envoy "
        "holds no chunk back) and reads the backend's usage report"
    ),
}
FLOOR_PATH_TEXT = {
    ("auto", "inline"): (
        "the floor server keeps the stream, switches the response body to STREAMED at the "
        "headers and answers every chunk with an empty answer"
    ),
    ("auto", "observed"): "the floor server releases the request with its body (`account: true`)",
    ("observe", "inline"): (
        "the floor server releases the request with its body (`account: true`, `observe: "
        "true`); the observer's stream to it is read and not answered"
    ),
    ("observe", "observed"): (
        "the floor server releases the request with its body (`account: true`, `observe: "
        "true`); the observer's stream to it is read and not answered"
    ),
}


def stream_label(variant: str, stream_path: str = "auto") -> str:
    """A streaming variant for the reports: its target, what the client asked, the path."""
    if variant == "baseline":
        return "Envoy alone"
    floor = variant.startswith("floor_")
    path = variant.removeprefix("floor_")
    target = "floor" if floor else "gateway"
    return f"{target}, {STREAM_CLIENT[path]} ({STREAM_PATH_OF[stream_path][path]})"


NATIVE_ISSUER = "https://bench.extproc.test/"
PROVIDERS = ("openai", "anthropic", "bedrock", "gemini", "azure")
PROVIDER_KEY_ENV = "EXTPROC_BENCH_PROVIDER_KEY"
# The API the load clients speak to the gateway (`--client`; docs/clients.md).
CLIENTS = ("openai", "anthropic", "responses")
CLIENT_NAMES = {
    "openai": "OpenAI's chat completions",
    "anthropic": "Anthropic's Messages API",
    "responses": "OpenAI's Responses API",
}
PROVIDER_NAMES = {
    "openai": "OpenAI's API",
    "anthropic": "Anthropic's Messages API",
    "bedrock": "AWS Bedrock's Converse (signed by Envoy)",
    "gemini": "Google's Gemini API",
    "azure": "Azure OpenAI's deployments",
}
# Bedrock: Envoy signs with these, the fake checks the signatures with the same.
BENCH_AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIDBENCH0000001", "AWS_SECRET_ACCESS_KEY": "bench-secret"}


@functools.cache
def native_identity() -> tuple[str, str]:
    """(JWKS JSON, a token it verifies) for the native scenario: RS256, as identity providers
    sign, valid for a day; one token, as one client reuses its token until it expires."""
    import jwt  # PyJWT, with cryptography: the test extra
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = json.dumps({"keys": [{**jwk, "kid": "bench", "alg": "RS256"}]})
    now = int(time.time())
    claims = {"iss": NATIVE_ISSUER, "sub": "bench-client", "team": "bench"}
    claims.update(iat=now, exp=now + 86_400)
    return jwks, jwt.encode(claims, key, algorithm="RS256", headers={"kid": "bench"})


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
    if scenario.stream_path != "auto":
        # The same: the default (auto) is left unwritten.
        config["sidecar"]["stream_path"] = scenario.stream_path
    if scenario.provider == "bedrock":
        # Signed by Envoy with the AWS variables of its environment (inherited from this one,
        # as the fake's are).
        for name, value in BENCH_AWS_ENV.items():
            os.environ.setdefault(name, value)
        config["backends"]["fake"] = {
            "url": f"http://{HOST}:{fake_port}",
            "type": "bedrock",
            "aws_region": "us-east-1",
        }
    elif scenario.provider != "openai":
        backend = config["backends"]["fake"]
        backend["type"] = scenario.provider
        if scenario.provider == "azure":
            backend["url"] = f"http://{HOST}:{fake_port}/openai"
        elif scenario.provider == "gemini":
            backend["url"] = f"http://{HOST}:{fake_port}/v1beta"
        # A provider's API wants a key (the fake checks there is one); the gateway's processes
        # inherit this one's environment.
        os.environ.setdefault(PROVIDER_KEY_ENV, "sk-bench-provider")
        backend["api_key"] = {"env": PROVIDER_KEY_ENV}
    if scenario.native:
        # No key: the team's callers carry the JWT (Scenario.bearer); no limit, no guard.
        del team["keys"]
        config["identities"] = {
            "jwt": {
                "bench": {
                    "issuer": NATIVE_ISSUER,
                    "jwks": {"inline": native_identity()[0]},
                    "teams": [{"claim": "team", "value": "bench", "team": "bench"}],
                }
            }
        }
    elif scenario.quota != "none":
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
            # (Envoy alone speaks OpenAI's API to the fake: Bedrock's signing goes too, its
            # cost is the gateway's.)
            filters = [f for f in options["httpFilters"] if f.get("name") != AWS_SIGNING_FILTER]
            signed = len(filters) < len(options["httpFilters"])
            options["httpFilters"] = (
                [f for f in filters if f.get("name") not in GATEWAY_FILTERS]
                if signed
                else _without_ext_proc(filters, f"cluster {cluster['name']}")
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
                            # Envoy alone speaks OpenAI's API to the fake, whatever API the
                            # gateway's backend type makes it translate to.
                            route["route"] = {
                                k: v for k, v in route["route"].items() if k != "regexRewrite"
                            }
                            route.pop("requestHeadersToAdd", None)
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


def floor_settings(cfg: Config, routing: dict[str, str]) -> dict[str, Any]:
    """What the floor server needs to answer each request as the sidecar's downstream stage
    would (its command line, benchmarks/lib/floor.py): the routing headers, whether a request
    is releasable (`floor_releases`), the gateway's `sidecar.stream_path` and whether it has a
    response guard (which keeps every stream inline, with no observer)."""
    return {
        "headers": routing,
        "release": floor_releases(cfg, routing),
        "stream_path": cfg.sidecar.stream_path,
        "response_guards": bool(cfg.guardrails.response),
    }
