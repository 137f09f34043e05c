"""Budgets at every level of who is calling: organization -> team -> user -> key.

A request reserves against the limits of every level that applies to its caller and model in
one reservation, one atomic call to the store: it is admitted only if it fits all of them, so
no level is overshot however many requests of however many users race (store.py).

For that to hold on a Redis Cluster, every counter one request touches must be in one slot:
the store's scope (its hash tag) is the top of the caller's hierarchy. A team of an
organization keeps its counters in the organization's scope ("~<org>"); a team without one in
its own (named as the team, as before there were levels, so no counter resets on upgrade).
Counter names within the scope say whose they are:

    o|<limit>:<start>                               the organization's (scope "~<org>")
    [t|<team>|]<limit>:<start>                      the team's ("t|<team>|" in an organization)
    [t|<team>|]u|<sha256(user)[:16]>|<limit>:<start>  a user's in that team
    [t|<team>|]k|<key label>|<limit>:<start>        a key's

A user's id is hashed: ids are often e-mail addresses, which have no business in Redis keys.
Limit names never hold "|", so no two levels' names can meet.

Moving a team into an organization (or out) moves its counters to another scope: they start
again from zero in the window they are in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..config import Config, Limit, key_label, narrowed, org_models, team_models
from .policy import TEAM, LimitSpec, specs_of

if TYPE_CHECKING:
    from ..identity import Identity

ORGANIZATION = "organization"
USER = "user"
KEY = "key"

# Users (and run-time keys) whose limits are kept resolved: beyond this many, a cache starts
# over rather than grow with every user ever seen.
_CACHED = 4096


def _names(models: frozenset[str] | None) -> list[str] | None:
    return None if models is None else sorted(models)


def user_tag(user: str) -> str:
    return hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def org_scope(org: str) -> str:
    return f"~{org}"


@dataclass(slots=True)
class Budgets:
    """Every level's limits of a config, resolved once per config (load or reload)."""

    orgs: dict[str, tuple[LimitSpec, ...]] = field(default_factory=dict)
    teams: dict[str, tuple[LimitSpec, ...]] = field(default_factory=dict)
    # The team's user_limits (their counters' names without the user's part), and each
    # configured user's own, by (team, user).
    user_defaults: dict[str, tuple[LimitSpec, ...]] = field(default_factory=dict)
    users: dict[tuple[str, str], tuple[LimitSpec, ...]] = field(default_factory=dict)
    # The config's keys' own limits, by (team, key label).
    keys: dict[tuple[str, str], tuple[LimitSpec, ...]] = field(default_factory=dict)
    team_orgs: dict[str, str] = field(default_factory=dict)
    cfg: Config | None = None  # what run-time keys' limits are resolved against
    _resolved_users: dict[tuple[str, str], tuple[LimitSpec, ...]] = field(default_factory=dict)
    _resolved_keys: dict[tuple[str, str], tuple[LimitSpec, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: Config) -> Budgets:
        out = cls(cfg=cfg)
        for org_name, org in cfg.organizations.items():
            models = org_models(cfg, org_name)
            out.orgs[org_name] = specs_of(cfg, org.limits, models, ORGANIZATION, "o|")
        for team_name, team in cfg.teams.items():
            if team.organization:
                out.team_orgs[team_name] = team.organization
            models = team_models(cfg, team_name)
            prefix = out.team_prefix(team_name)
            out.teams[team_name] = specs_of(cfg, team.limits, models, TEAM, prefix)
            out.user_defaults[team_name] = specs_of(cfg, team.user_limits, models, USER, prefix)
            for user, settings in team.users.items():
                counter = out.user_counter(team_name, user)
                out.users[(team_name, user)] = specs_of(cfg, settings.limits, models, USER, counter)
            for i, key in enumerate(team.keys):
                if key.limits:
                    label = key_label(team_name, i, key)
                    key_models = narrowed(cfg, models, key.models)
                    counter = out.key_counter(team_name, label)
                    out.keys[(team_name, label)] = specs_of(
                        cfg, key.limits, key_models, KEY, counter
                    )
        return out

    def scope(self, team: str) -> str:
        """Where the counters of a team's requests are (the store's scope)."""
        org = self.team_orgs.get(team)
        return org_scope(org) if org else team

    def team_prefix(self, team: str) -> str:
        """What the names of a team's counters (its users' and keys' too) start with."""
        return f"t|{team}|" if self.team_orgs.get(team) else ""

    def user_counter(self, team: str, user: str) -> str:
        """What the names of a user's counters start with."""
        return f"{self.team_prefix(team)}u|{user_tag(user)}|"

    def key_counter(self, team: str, label: str) -> str:
        """What the names of a key's counters start with."""
        return f"{self.team_prefix(team)}k|{label}|"

    def of_user(self, team: str, user: str) -> tuple[LimitSpec, ...]:
        if not user:
            return ()
        own = self.users.get((team, user))
        if own is not None:
            return own
        defaults = self.user_defaults.get(team, ())
        if not defaults:
            return ()

        def resolve() -> tuple[LimitSpec, ...]:
            counter = self.user_counter(team, user)
            return tuple(replace(spec, counter=counter) for spec in defaults)

        return _cached(self._resolved_users, (team, user), resolve)

    def of_key(self, who: Identity) -> tuple[LimitSpec, ...]:
        """The key's own limits: a config key's, or a run-time key's (Identity.key_limits)."""
        own = self.keys.get((who.team, who.key))
        if own is not None:
            return own
        cfg = self.cfg
        if not who.key_limits or cfg is None or who.team not in cfg.teams:
            return ()

        def resolve() -> tuple[LimitSpec, ...]:
            # (A run-time key's limits never change: its id is enough to cache them by.)
            assert cfg is not None
            limits = [Limit.model_validate(stored) for stored in who.key_limits]
            models = narrowed(cfg, team_models(cfg, who.team), _names(who.models))
            return specs_of(cfg, limits, models, KEY, self.key_counter(who.team, who.key))

        return _cached(self._resolved_keys, (who.team, who.key), resolve)

    def all_of(self, who: Identity) -> tuple[LimitSpec, ...]:
        """Every limit of the caller's levels, outermost first (the organization's)."""
        org = self.team_orgs.get(who.team)
        return (
            *(self.orgs.get(org, ()) if org else ()),
            *self.teams.get(who.team, ()),
            *self.of_user(who.team, who.user),
            *self.of_key(who),
        )

    def applicable(self, who: Identity, model: str) -> tuple[LimitSpec, ...]:
        """The limits a request of the caller to `model` reserves against."""
        return tuple(s for s in self.all_of(who) if model in s.models)


def _cached(
    cache: dict[tuple[str, str], tuple[LimitSpec, ...]],
    key: tuple[str, str],
    resolve: Callable[[], tuple[LimitSpec, ...]],
) -> tuple[LimitSpec, ...]:
    hit = cache.get(key)
    if hit is None:
        if len(cache) >= _CACHED:
            cache.clear()
        hit = cache[key] = resolve()
    return hit


def moved_teams(before: Budgets, after: Budgets) -> list[tuple[str, str, str]]:
    """(team, scope before, scope after) of the teams a new config moves into, out of or
    between organizations: their counters do not follow (a reload warns of it)."""
    return [
        (team, before.scope(team), after.scope(team))
        for team in sorted(set(before.teams) & set(after.teams))
        if before.scope(team) != after.scope(team)
    ]
