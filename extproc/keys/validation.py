"""A new key checked against the config it will serve under: its team exists, its models and
limits name the config's models and groups, its limits are the config's `Limit`. Every problem
is named by its field, as the admin API reports it: "models[1]: unknown model 'x'".

Models are named as in the config file: a model's name, or a model group's. "group:<name>" is
taken too, and stored as the plain name (a group cannot share a model's name, so nothing is
lost), so a run-time key's lists read exactly like a config file key's.

Only creation is checked: a later config that drops a key's team or model does not touch the
stored key; the request path judges it against the config of the moment.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from ..config import Config, Limit, Runtime, expand_models, limit_name, narrowed, user_problem
from .records import KeySpec

GROUP_PREFIX = "group:"
MAX_DESCRIPTION = 1000


class InvalidKey(ValueError):
    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{where}: {message}" for where, message in problems))


def check_spec(
    runtime: Runtime,
    *,
    team: str,
    now: float,
    user: str | None = None,
    expires_at: float | None = None,
    models: Sequence[str] | None = None,
    limits: Sequence[Mapping[str, Any]] = (),
    description: str = "",
) -> KeySpec:
    """The key to create, or InvalidKey with every problem. Empty `models` means None (the
    team's models)."""
    cfg = runtime.config
    problems: list[tuple[str, str]] = []
    if not team:
        problems.append(("team", "required"))
    elif team not in cfg.teams:
        problems.append(("team", f"unknown team {team!r}"))
    problem = user_problem(user) if user is not None else None
    if problem is not None:
        problems.append(("user", problem))
    if expires_at is not None:
        if not math.isfinite(expires_at):
            problems.append(("expires_at", "not a time"))
        elif expires_at <= now:
            problems.append(("expires_at", "in the past"))
    if len(description) > MAX_DESCRIPTION:
        problems.append(("description", f"longer than {MAX_DESCRIPTION} characters"))

    team_models = runtime.team_models.get(team, ())
    known_team = team_models if team in cfg.teams else None  # (else said above already)
    names = _names(cfg, "models", models or (), problems, known_team)
    key_models = None if not names else tuple(names)
    # What a limit without its own models counts: the key's models within the team's.
    counted = narrowed(cfg, team_models, None if key_models is None else list(key_models))
    checked = _limits(cfg, limits, counted, problems)
    if checked and cfg.sidecar.workers > 1 and cfg.quota.store == "memory":
        # (config._check_workers refuses the config file's limits so, for the same reason.)
        problems.append(
            ("limits", "several sidecar workers need quota.store: redis to count a key's limits")
        )
    if problems:
        raise InvalidKey(problems)
    return KeySpec(
        team=team,
        user=user,
        expires_at=expires_at,
        models=key_models,
        limits=checked,
        description=description,
    )


def _names(
    cfg: Config,
    where: str,
    given: Sequence[str],
    problems: list[tuple[str, str]],
    team_models: tuple[str, ...] | None,
) -> list[str]:
    """Model and group names, each once, "group:" taken off; with `team_models`, a model must
    be one of them (a key narrows its team's models, it cannot widen them)."""
    out: list[str] = []
    for i, raw in enumerate(given):
        name = raw.removeprefix(GROUP_PREFIX)
        if name in cfg.model_groups:
            pass
        elif raw.startswith(GROUP_PREFIX):
            problems.append((f"{where}[{i}]", f"unknown model group {name!r}"))
            continue
        elif name not in cfg.models:
            problems.append((f"{where}[{i}]", f"unknown model {raw!r}"))
            continue
        elif team_models is not None and name not in team_models:
            problems.append((f"{where}[{i}]", f"not one of the team's models: {name!r}"))
            continue
        if name not in out:
            out.append(name)
    return out


def _limits(
    cfg: Config,
    given: Sequence[Mapping[str, Any]],
    counted: tuple[str, ...],
    problems: list[tuple[str, str]],
) -> tuple[dict[str, Any], ...]:
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, raw in enumerate(given):
        where = f"limits[{i}]"
        try:
            limit = Limit.model_validate(dict(raw))
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                problems.append((where + loc, "unknown field" if "extra" in err["type"] else msg))
            continue
        name = limit_name(limit)
        if name in seen:
            problems.append((f"{where}.name", f"two limits are called {name!r}: name them"))
        seen.add(name)
        models = None
        if limit.models is not None:
            models = _names(cfg, f"{where}.models", limit.models, problems, None)
        if limit.usd is not None:
            counts = counted if models is None else expand_models(cfg, models)
            unpriced = [m for m in counts if m not in cfg.prices]
            if unpriced:
                problems.append((f"{where}.usd", f"no price for {', '.join(unpriced)} (prices:)"))
        dumped = limit.model_dump(mode="json", exclude_none=True)
        if models is not None:
            dumped["models"] = models
        out.append(dumped)
    return tuple(out)
