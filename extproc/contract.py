"""The contract between Envoy and the sidecar, in one place: every header name, gRPC metadata
key, dynamic metadata key, attribute and cluster name that the rendered Envoy config
(envoy_config.py) and the stages (downstream.py, upstream.py, observer.py, access_log.py,
server.py) must agree on. Nothing else defines one; this module imports nothing of the gateway's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

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
# With ROUTE_HEADER, for a model whose backends differ in API or addressing when Envoy chooses
# the backend: the client's endpoint (`/v1/chat/completions`, ...), from which the upstream
# stage makes each attempt's path (an attempt starts from the path the last one left).
ENDPOINT_HEADER = f"{P}endpoint"

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
            ENDPOINT_HEADER,
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
# What of the hand-over only the sidecar reads, as one JSON string (Handover.to_metadata).
HANDOVER_KEY = "handover"
# The client's wire format (extproc/wire/), when it is not this one: how the finisher reads the
# answer. Left out for this one, as a sidecar from before wire formats wrote none.
WIRE_KEY = "wire"
DEFAULT_WIRE = "openai"
# The `usage` fields of a JSON answer Envoy's json_to_metadata filter copies into the request's
# metadata (the same keys the sidecar sets for the answers it reads itself).
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")

# -- the native path: requests Envoy serves without the sidecar (native.py) ---------------------

# Envoy's jwt_authn filter writes each verified token's claims here, under the issuer's name
# (identities.jwt), and a failed verification's {code, message} under jwt_failure_key(name).
# The downstream stage receives this namespace (ext_proc forwarding_namespaces).
JWT_NAMESPACE = "envoy.filters.http.jwt_authn"


def jwt_failure_key(issuer: str) -> str:
    return f"{issuer}.failed"


# What Envoy's json_to_metadata filter reads of a request body when the native path is on, for
# the native routes to match: the model, and whether (and how) it streams.
REQUEST_NAMESPACE = "extproc.request"

# A native route's name says whose request it served and to which model: the access log's
# reader accounts the request from it (team and model names never hold "|").
NATIVE_ROUTE_PREFIX = "native|"


def native_route_name(team: str, model: str, variant: str) -> str:
    return f"{NATIVE_ROUTE_PREFIX}{team}|{model}|{variant}"


def native_from_route(name: str) -> tuple[str, str] | None:
    """(team, model) of a native route's name; None for any other route."""
    if not name.startswith(NATIVE_ROUTE_PREFIX):
        return None
    parts = name[len(NATIVE_ROUTE_PREFIX) :].split("|")
    return (parts[0], parts[1]) if len(parts) == 3 else None


# -- attributes Envoy sends with a response -----------------------------------------------------

CLUSTER_ATTRIBUTE = "xds.cluster_name"
# The metadata of the host an attempt went to: names the backend behind a pooled model's
# aggregate cluster (whose own name says only the model).
HOST_ATTRIBUTE = "xds.upstream_host_metadata"

# How the answer came about: "via_upstream" for a backend's; anything else is Envoy's own
# reply or a stage's immediate response.
CODE_DETAILS_ATTRIBUTE = "response.code_details"
FROM_BACKEND = "via_upstream"

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


# -- the hand-over: what the downstream stage passes to the stage that finishes the request ------


@dataclass(frozen=True, slots=True)
class Handover:
    """What the downstream stage passes, in the request's dynamic metadata (METADATA_NAMESPACE),
    to the stage that finishes the request in its place: the stream observer, or the access
    log's reader, in whichever sidecar process that runs. to_metadata() and from_metadata() are
    the one writer and the one reader of these keys."""

    team: str
    model: str
    endpoint: str = ""
    wire: str = DEFAULT_WIRE  # the client's wire format: how the answer reads
    # Who called, below and above the team (identity.Identity): the finisher settles their
    # budgets and writes them into the audit record and the trace.
    organization: str = ""
    user: str = ""
    key: str = ""
    stream: bool = False
    prompt_tokens: int = 0  # the prompt's count, as reserved
    started_at: float = 0.0  # wall clock (the finisher may run in another process)
    observe: bool = False  # the stream observer is instantiated (OBSERVE_KEY)
    account: bool = False  # Envoy's access log brings the request back (ACCOUNT_KEY)
    reservation: str = ""  # its id; "" when nothing was reserved
    # Where it was reserved (the quota store's scope): settled there even if a reload moved
    # the team into or out of an organization meanwhile.
    scope: str = ""
    limits: tuple[str, ...] = ()  # the reservation's limits' labels (LimitSpec.label), in order
    pool: int = 0  # 1: a quota failover pinned the request to pool 1
    output_estimate: int = 0  # the most output the request may produce, as reserved
    output_cap: int | None = None  # the most the client allowed; None: it set none
    backend: str = ""  # when one backend serves the request: known before the answer
    provider_model: str = ""
    traceparent: str = ""  # the request's span, for the finisher's child span
    # For the audit record (when the audit trail is on).
    request_id: str = ""
    trace_id: str = ""
    guards: tuple[dict[str, Any], ...] = ()
    prompt_sha256: str = ""
    prompt: tuple[str, ...] | None = None  # masked, with audit include_prompt

    # Every key to_metadata may write: what a reader takes out of the request's metadata, which
    # also holds what it does not need (rate-limit headers, the answer's status and timing).
    # With the keys a sidecar wrote before the hand-over was packed (HANDOVER_KEY).
    KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "team", "model", HANDOVER_KEY, OBSERVE_KEY, ACCOUNT_KEY, "backend", "provider_model",
            "endpoint", "stream", "prompt_tokens_estimate", WIRE_KEY, "started_at",
            OUTPUT_ESTIMATE_KEY, "reservation", "limits", "pool", OUTPUT_CAP_KEY, "traceparent",
            "request_id", "trace_id", "guards", "prompt_sha256", "prompt", "organization",
            "user", "key", "scope",
        }
    )  # fmt: skip

    def to_metadata(self) -> dict[str, Any]:
        """The metadata values. What Envoy reads itself (the answer's headers, the observer's
        and the access log's filters, the access log line) are keys of their own; the rest,
        which only the sidecar reads, travels as one JSON string (HANDOVER_KEY): Envoy copies
        the request's metadata into every access log entry and every message of an observed
        stream, and one string costs it (and the sidecar's readers) far less than a Struct of
        twenty values. What is empty is left out."""
        packed: dict[str, Any] = {
            "endpoint": self.endpoint,
            "stream": self.stream,
            "prompt_tokens_estimate": self.prompt_tokens,
        }
        if self.wire != DEFAULT_WIRE:
            packed[WIRE_KEY] = self.wire
        optional: dict[str, Any] = {
            "organization": self.organization,
            "user": self.user,
            "key": self.key,
            "started_at": self.started_at,
            OUTPUT_ESTIMATE_KEY: self.output_estimate,
            "reservation": self.reservation,
            "scope": self.scope,
            "limits": list(self.limits),
            "pool": self.pool,
            OUTPUT_CAP_KEY: self.output_cap,
            "traceparent": self.traceparent,
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "guards": list(self.guards),
            "prompt_sha256": self.prompt_sha256,
            "prompt": list(self.prompt) if self.prompt is not None else None,
        }
        packed.update((k, v) for k, v in optional.items() if v or (k == OUTPUT_CAP_KEY and v == 0))
        out: dict[str, Any] = {
            "team": self.team,
            "model": self.model,
            HANDOVER_KEY: orjson.dumps(packed).decode(),
        }
        envoy_reads = {
            OBSERVE_KEY: self.observe,
            ACCOUNT_KEY: self.account,
            "backend": self.backend,
            "provider_model": self.provider_model,
        }
        out.update((k, v) for k, v in envoy_reads.items() if v)
        return out

    @classmethod
    def from_metadata(cls, info: Mapping[str, Any]) -> Handover:
        """Read back from the metadata as Envoy forwards it (a Struct made plain: numbers are
        floats), tolerating what an older sidecar did not write (or wrote unpacked)."""
        packed = info.get(HANDOVER_KEY)
        if isinstance(packed, str):
            try:
                unpacked = orjson.loads(packed)
            except orjson.JSONDecodeError:
                unpacked = None
            if isinstance(unpacked, dict):
                info = {**info, **unpacked}
        cap = _number(info.get(OUTPUT_CAP_KEY))
        prompt = info.get("prompt")
        guards = info.get("guards")
        return cls(
            team=_text(info, "team"),
            model=_text(info, "model"),
            endpoint=_text(info, "endpoint"),
            wire=_text(info, WIRE_KEY) or DEFAULT_WIRE,
            organization=_text(info, "organization"),
            user=_text(info, "user"),
            key=_text(info, "key"),
            stream=info.get("stream") is True,
            prompt_tokens=int(_number(info.get("prompt_tokens_estimate")) or 0),
            started_at=_number(info.get("started_at")) or time.time(),
            observe=info.get(OBSERVE_KEY) is True,
            account=info.get(ACCOUNT_KEY) is True,
            reservation=_text(info, "reservation"),
            scope=_text(info, "scope"),
            limits=tuple(str(n) for n in info.get("limits") or ()),
            pool=int(_number(info.get("pool")) or 0),
            output_estimate=int(_number(info.get(OUTPUT_ESTIMATE_KEY)) or 0),
            output_cap=int(cap) if cap is not None else None,
            backend=_text(info, "backend"),
            provider_model=_text(info, "provider_model"),
            traceparent=_text(info, "traceparent"),
            request_id=_text(info, "request_id"),
            trace_id=_text(info, "trace_id"),
            guards=tuple(_whole(g) for g in guards if isinstance(g, dict))
            if isinstance(guards, list | tuple)
            else (),
            prompt_sha256=_text(info, "prompt_sha256"),
            prompt=tuple(str(p) for p in prompt) if isinstance(prompt, list | tuple) else None,
        )


def _text(info: Mapping[str, Any], key: str) -> str:
    value = info.get(key)
    return value if isinstance(value, str) else ""


def _number(value: Any) -> float | None:
    """A non-negative number, or None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def _whole(entry: dict[str, Any]) -> dict[str, Any]:
    """A guard verdict entry back from a Struct, whose numbers are all floats: counts are whole
    numbers again."""
    out = dict(entry)
    counts = out.get("counts")
    if isinstance(counts, dict):
        out["counts"] = {k: int(v) for k, v in counts.items()}
    return out
