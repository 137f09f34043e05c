"""The native path: which requests Envoy serves without asking the sidecar.

A request needs no admission by the sidecar when there is nothing to admit it against: its
caller is identified by Envoy itself (a JWT that Envoy's jwt_authn filter verified, whose
claims map to a team, and its issuer does not narrow the models by claims), no limit applies
at any level (organization, team, user, key) and no guard to the model, and the model is
served by one backend under its own name (no body to rewrite). Envoy then picks the route from
the body's `model` (json_to_metadata), sets the backend's credential (credential_injector) and
sends the request on; the sidecar's downstream stage is not created for it. The answer's usage
reaches the sidecar through the gRPC access log, as for any released request, and is counted
there (access_log.account_native): metrics and the team's usage, no reservation.

Everything else (API keys, which Envoy cannot check without holding them in clear; teams with
limits, whose tokens are reserved before the call; guards; pooled and canary models; streams
without a usage report, which the sidecar asks for) takes the strict path through the sidecar.

Envoy's routes are rendered when its bootstrap is: a team that gains a limit or a guard in a
reload keeps its native routes until Envoy's config is rendered again (configuration.md,
"Reload"); the access log's reader warns when it sees that.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import (
    ClaimRule,
    Config,
    Model,
    has_budgets,
    pooled,
    split,
    stage_guards,
    team_models,
)
from .wire.openai.request import CHAT, COMPLETIONS, EMBEDDINGS

# The endpoint a model's type answers on: the one path its native route matches.
ENDPOINT_PATHS = {"chat": CHAT.path, "completion": COMPLETIONS.path, "embedding": EMBEDDINGS.path}


@dataclass(frozen=True, slots=True)
class NativeRoute:
    """Envoy serves `team`'s requests to `model` on its own, for callers whose token from
    `issuer` matches `rule` and none of `earlier` (the issuer's rules before it: the first rule
    a token matches names its team, in Envoy as in the sidecar)."""

    team: str
    model: str
    backend: str
    path: str
    issuer: str
    rule: ClaimRule
    earlier: tuple[ClaimRule, ...]


def why_not(cfg: Config, team: str, model: str) -> str | None:
    """Why a team's requests to a model take the strict path; None: they can take the native
    one (when a JWT identifies the caller)."""
    model_cfg = cfg.models[model]
    if not cfg.envoy.native_path:
        return "envoy.native_path is off"
    if model not in team_models(cfg, team):
        return "the team may not use the model"
    if has_budgets(cfg, team):
        return "limits apply (reserved before the call)"  # at some level: budgets.py
    if any(stage_guards(cfg, team, model)):
        return "guards apply"
    if cfg.observability.metrics.users:
        return "metrics by user need the token's user, which Envoy's access log does not carry"
    if cfg.observability.audit.path is not None:
        return "the audit trail records each prompt's hash"
    if cfg.sidecar.json_path != "access_log":
        return "sidecar.json_path is inline"
    return _model_why_not(cfg, model, model_cfg)


def _model_why_not(cfg: Config, name: str, model: Model) -> str | None:
    if model.type not in ENDPOINT_PATHS:
        return f"a {model.type} model's requests are passed through the sidecar"
    if pooled(model) or split(model):
        return "Envoy chooses among several backends"
    if any(cfg.backends[t.backend].type != "openai" for t in model.targets):
        return "the backend is not a plain OpenAI one: its paths and answers pass the sidecar"
    target = next(t for t in model.targets if t.weight > 0)
    if cfg.backends[target.backend].token_from is not None:
        return "the backend's credential is a token the sidecar keeps"
    if cfg.backends[target.backend].runs_batches:
        return "the backend stores files: a file a request names by id must be the team's"
    if target.model is not None and target.model != name:
        return "the body's model name is rewritten for the backend"
    return None


# The last config asked about, and its routes: the renderer asks once per piece it renders,
# the access log's reader once per native entry.
_CACHE: tuple[Config | None, tuple[NativeRoute, ...], frozenset[tuple[str, str]]] = (
    None,
    (),
    frozenset(),
)


def native_routes(cfg: Config) -> tuple[NativeRoute, ...]:
    """The native routes, in the order Envoy must try them (before every other route)."""
    global _CACHE
    if _CACHE[0] is not cfg:
        routes = tuple(_native_routes(cfg))
        _CACHE = (cfg, routes, frozenset((r.team, r.model) for r in routes))
    return _CACHE[1]


def served(cfg: Config) -> frozenset[tuple[str, str]]:
    """The (team, model) pairs of `cfg`'s native routes."""
    native_routes(cfg)
    return _CACHE[2]


def _native_routes(cfg: Config) -> list[NativeRoute]:
    out: list[NativeRoute] = []
    for issuer_name, issuer in cfg.identities.jwt.items():
        if issuer.models is not None:
            continue  # which models a token may use is the sidecar's to decide
        for i, rule in enumerate(issuer.teams):
            for model_name, model in cfg.models.items():
                if rule.team not in cfg.teams or why_not(cfg, rule.team, model_name):
                    continue
                target = next(t for t in model.targets if t.weight > 0)
                out.append(
                    NativeRoute(
                        team=rule.team,
                        model=model_name,
                        backend=target.backend,
                        path=ENDPOINT_PATHS[model.type],
                        issuer=issuer_name,
                        rule=rule,
                        earlier=tuple(issuer.teams[:i]),
                    )
                )
    return out
