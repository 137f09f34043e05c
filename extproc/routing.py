"""Choosing the backend.

The downstream stage names the model in a routing header and clears Envoy's route cache; the
route for that model (a cluster, or weighted_clusters for a canary) picks the backend. The
upstream stage, an ext_proc filter inside each backend's cluster, then knows the backend for
this attempt and rewrites the model name and the credential for it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import orjson

from .config import Model, ResolvedTarget, Runtime, pooled, pools, split
from .contract import ENDPOINT_HEADER, ROUTE_HEADER
from .errors import GatewayError, not_found
from .identity import Identity, spoofed_headers
from .wire import Endpoint, Operation
from .wire.openai import form

if TYPE_CHECKING:
    from .backend_tokens import BackendTokens
    from .wire.base import WireFormat

_CREATED = int(time.time())

# Which config model types may serve which operation (vLLM serves /v1/completions on chat models).
MODEL_TYPES: dict[Operation, frozenset[str]] = {
    Operation.CHAT: frozenset({"chat"}),
    Operation.COMPLETION: frozenset({"chat", "completion"}),
    Operation.EMBEDDING: frozenset({"embedding"}),
    Operation.COUNT_TOKENS: frozenset({"chat"}),
    Operation.IMAGE: frozenset({"image"}),
    Operation.SPEECH: frozenset({"audio"}),
    Operation.TRANSCRIPTION: frozenset({"audio"}),
    Operation.MODERATION: frozenset({"moderation"}),
    Operation.RERANK: frozenset({"rerank"}),
}


def visible_model(runtime: Runtime, who: Identity, model: str) -> Model:
    """The model's config, when it exists and the caller may use it; else the 404 that does not
    tell the two apart."""
    spec = runtime.config.models.get(model)
    if spec is None or not who.may_use(runtime, model):
        # Same answer for "no such model" and "not yours": existence is not disclosed.
        raise not_found(
            f"The model `{model}` does not exist or you do not have access to it.",
            "model_not_found",
            "model",
        )
    return spec


def check_model(runtime: Runtime, who: Identity, model: str, endpoint: Endpoint) -> None:
    spec = visible_model(runtime, who, model)
    if spec.type not in MODEL_TYPES.get(endpoint.operation, frozenset()):
        raise GatewayError(
            400,
            f"The model `{model}` is a {spec.type} model and cannot be used with {endpoint.path}",
            "invalid_request_error",
            "model_not_supported",
            "model",
        )


def served_natively(
    runtime: Runtime,
    model: str,
    target: ResolvedTarget | None,
    client: WireFormat,
    guarded_stream: bool = False,
) -> bool:
    """A client of a bridged API (wire.base.ChatBridge) is served as it speaks: every backend
    the request may go to (`target`, its one backend, or else each of the model's: a failover
    pool or canary split, whose attempts the upstream stage then prepares as they are) speaks
    the client's API (Backend.apis). Any other request of such a client goes as chat
    completions, and so does a stream the response guards judge unless the API has a guarded
    relay of its own events (WireFormat.own_guarded_relay): else the guards judge chat chunks,
    and the client's events rebuilt from them would lose what chat has no place for (a thinking
    block's signature, which the next turn must send back whole), so such a request goes as
    chat from the start."""
    if client.bridge is None or (guarded_stream and client.own_guarded_relay is None):
        return False
    if target is not None:
        return client.name in target.apis
    spec = runtime.config.models.get(model)
    targets = (
        [runtime.targets.get((model, t.backend)) for t in spec.targets if t.weight > 0]
        if spec
        else []
    )
    return bool(targets) and all(t is not None and client.name in t.apis for t in targets)


def model_object(runtime: Runtime, name: str) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": _CREATED,
        "owned_by": runtime.config.models[name].owned_by,
    }


def usable_models(runtime: Runtime, who: Identity) -> tuple[str, ...]:
    """The models the caller may use, in config order."""
    models = runtime.team_models.get(who.team, ())
    return models if who.models is None else tuple(m for m in models if m in who.models)


def list_models_body(runtime: Runtime, who: Identity) -> bytes:
    data = [model_object(runtime, m) for m in usable_models(runtime, who)]
    return orjson.dumps({"object": "list", "data": data})


def retrieve_model_body(runtime: Runtime, who: Identity, model: str) -> bytes:
    visible_model(runtime, who, model)
    return orjson.dumps(model_object(runtime, model))


def fixed_target(runtime: Runtime, model: str, pool: int = 0) -> ResolvedTarget | None:
    """The one backend a request will go to, when the route leaves no choice: a model with a
    single target, or a quota failover pinned to a pool of one. The downstream stage then
    sets the credential and the provider's model name itself, and the route goes to the
    backend's plain cluster, with no upstream stage (one gRPC stream less per request). None
    when Envoy chooses (a canary split, failover pools): the upstream stage does it there."""
    spec = runtime.config.models.get(model)
    if spec is None or split(spec):
        return None
    if pooled(spec):
        if pool != 1:
            return None
        candidates = pools(spec)[1]
    else:
        candidates = [t for t in spec.targets if t.weight > 0]
    if len(candidates) != 1:
        return None
    return runtime.targets.get((model, candidates[0].backend))


def with_token(target: ResolvedTarget, tokens: BackendTokens) -> ResolvedTarget:
    """The target with its current credential, for a backend whose credential is a token the
    sidecar keeps (raises the 503 of one that has none valid now)."""
    if target.token_from is None:
        return target
    return replace(target, credential=tokens.header(target.backend))


def upstream_target(
    runtime: Runtime, backend: str | None, headers: Mapping[str, str]
) -> ResolvedTarget:
    model = headers.get(ROUTE_HEADER)
    target = runtime.targets.get((model or "", backend or ""))
    if target is None:
        # Only a request that bypassed the downstream stage, or a config that no longer has
        # this pair (a reload between the two stages), gets here.
        raise GatewayError(
            502,
            "The gateway could not map this request to a backend; retry the request",
            "server_error",
            "routing_error",
        )
    return target


def upstream_header_mutation(
    runtime: Runtime,
    target: ResolvedTarget,
    headers: Mapping[str, str],
    retriable: bool = False,
) -> tuple[dict[str, str], list[str]]:
    """Headers to set and remove before the request leaves for `target`.

    With `retriable` (a pooled model: Envoy may retry on the next pool), the routing header
    stays: a retry starts from the headers this attempt left, and the next attempt's upstream
    stage needs it to know the model. The backend then sees the model name the client asked
    for, nothing else of the gateway's."""
    remove = spoofed_headers(headers)  # the backend sees none of the gateway's own headers
    if retriable:
        remove = [h for h in remove if h not in (ROUTE_HEADER, ENDPOINT_HEADER)]
    set_headers: dict[str, str] = {}
    # Every header that carries some backend's credential, this one's excepted: whatever set
    # it (a client, or the downstream stage under a newer config), it is not for this host.
    carriers = {"authorization", "api-key"} | {
        b.auth_header for b in runtime.config.backends.values()
    }
    for h in carriers:
        if h in headers and h != target.auth_header:
            remove.append(h)
    if target.credential is not None:
        set_headers[target.auth_header] = target.credential
    elif target.auth_header in headers:
        remove.append(target.auth_header)
    return set_headers, remove


def rewrite_model(raw: bytes, provider_model: str) -> bytes:
    if form.is_form(raw):
        return form.with_field(raw, "model", provider_model)
    body = orjson.loads(raw)
    body["model"] = provider_model
    return orjson.dumps(body)
