"""The contract between Envoy and the sidecar, in one place: every header name, gRPC metadata
key, dynamic metadata key, attribute and cluster name that the rendered Envoy config
(envoy_config.py) and the stages (processor.py, observer.py, access_log.py, server.py) must
agree on. Nothing else defines one; this module imports nothing of the gateway's.
"""

from __future__ import annotations

# -- request headers the gateway sets (and removes when a client sends them) --------------------

INTERNAL_HEADER_PREFIX = "x-aigw-"
P = INTERNAL_HEADER_PREFIX

# The routing header: the downstream stage names the model, Envoy's route for it matches.
ROUTE_HEADER = f"{P}model"
# With ROUTE_HEADER, on a request whose one backend the downstream stage prepared: Envoy's route
# to that backend matches it too, so an Envoy config older than the sidecar's (a reload moved
# the model) cannot send that backend's credential to another host.
TARGET_HEADER = f"{P}target"
# Set with the routing header when a pooled model's quota failover pins the request to pool 1.
POOL_HEADER = f"{P}pool"
TEAM_HEADER = f"{P}team"

# -- gRPC initial metadata of the ext_proc streams: which stage a stream is ---------------------

STAGE_METADATA = f"{P}stage"
DOWNSTREAM_STAGE = "downstream"  # no metadata: the HTTP filter stage
UPSTREAM_STAGE = "upstream"  # the ext_proc filter inside a backend's (or a pool's) cluster
OBSERVE_STAGE = "observe"  # the stream observer (a non-blocking copy of the response)
STAGES = (DOWNSTREAM_STAGE, UPSTREAM_STAGE, OBSERVE_STAGE)
# The upstream stage of a backend's own cluster: which backend (a pool's reads the host's).
BACKEND_METADATA = f"{P}backend"

# -- response headers ---------------------------------------------------------------------------

# The gateway's headers on an answer. Envoy renders each from the request's dynamic metadata
# (the key, in the METADATA_NAMESPACE namespace) when the sidecar knew the value before the
# answer came; it first removes any a backend sent, so none can speak in the gateway's name.
RESPONSE_HEADER_KEYS = {
    TEAM_HEADER: "team",
    f"{P}model": "model",
    f"{P}backend": "backend",
    f"{P}provider-model": "provider_model",
    f"{P}failover": "failover",
}
ATTEMPTS_HEADER = f"{P}attempts"
# Set by the sidecar on the answers it reads itself (json_path: inline).
TOKEN_HEADERS = (f"{P}prompt-tokens", f"{P}completion-tokens", f"{P}total-tokens")
TOKEN_SOURCE_HEADER = f"{P}token-source"
# Every x-aigw-* name the gateway uses, request side included: Envoy can only remove by name.
OWN_RESPONSE_HEADERS = tuple(
    dict.fromkeys(
        (
            *RESPONSE_HEADER_KEYS,
            ATTEMPTS_HEADER,
            *TOKEN_HEADERS,
            TOKEN_SOURCE_HEADER,
            ROUTE_HEADER,
            TARGET_HEADER,
            POOL_HEADER,
        )
    )
)
# OpenAI's rate-limit headers, from the reservation (metadata RATE_LIMIT_KEY, by header name).
RATE_LIMIT_KEY = "ratelimit"
RATE_LIMIT_HEADERS = tuple(
    f"x-ratelimit-{what}-{kind}"
    for kind in ("tokens", "requests")
    for what in ("limit", "remaining", "reset")
)

# -- the request's dynamic metadata -------------------------------------------------------------

METADATA_NAMESPACE = "extproc"
# Set with the request body: instantiates the stream observer for this request.
OBSERVE_KEY = "observe"
# Set with the request body: Envoy's access log sends the request's entry to the sidecar, which
# accounts its answer there (the downstream stage does not wait for it).
ACCOUNT_KEY = "account"
# The most output the request may produce, as reserved (for the stage that finishes it).
OUTPUT_ESTIMATE_KEY = "output_estimate"
# ... and the most the client allowed (absent: it set no max_tokens): the cap of the gateway's
# own count of an answer without a usage report (usage.estimated).
OUTPUT_CAP_KEY = "output_cap"
# The `usage` fields of a JSON answer Envoy's json_to_metadata filter copies into the request's
# metadata (the same keys the sidecar sets for the answers it reads itself).
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")

# -- attributes Envoy sends with a response -----------------------------------------------------

CLUSTER_ATTRIBUTE = "xds.cluster_name"
# The metadata of the host an attempt went to: names the backend behind a pooled model's
# aggregate cluster (whose own name says only the model).
HOST_ATTRIBUTE = "xds.upstream_host_metadata"

# -- cluster names ------------------------------------------------------------------------------

_BACKEND_PREFIX = "aigw-backend-"
_SPLIT_PREFIX = "aigw-split-"
_POOL_PREFIX = "aigw-pool-"


def cluster_name(backend: str) -> str:
    """Envoy cluster name of a backend; the sidecar maps it back from CLUSTER_ATTRIBUTE."""
    return f"{_BACKEND_PREFIX}{backend}"


def split_cluster_name(backend: str) -> str:
    """The same backend as a member of a canary split: its cluster runs the upstream stage."""
    return f"{_SPLIT_PREFIX}{backend}"


def pool_cluster_name(model: str) -> str:
    """A pooled model's aggregate cluster (its pools of several backends add `-<priority>`)."""
    return f"{_POOL_PREFIX}{model}"


def backend_from_cluster(cluster: str) -> str | None:
    for prefix in (_BACKEND_PREFIX, _SPLIT_PREFIX):
        if cluster.startswith(prefix):
            return cluster[len(prefix) :]
    return None
