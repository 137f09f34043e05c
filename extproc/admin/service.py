"""The admin gRPC services: QuotaAdmin (a team's usage per limit, resetting it, process stats)
and ConfigAdmin (reload the config now). Both check the admin token when one is configured."""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc

from ..guard.pipeline import VERDICTS
from ..quota import policy
from ..quota.budgets import org_scope
from ..quota.store import StoreUnavailable
from ..streams import ACTIVE
from .v1 import config_pb2, config_pb2_grpc, quota_pb2, quota_pb2_grpc

if TYPE_CHECKING:
    from ..services import Services


async def authorized(
    current: Callable[[], Services], context: grpc.aio.ServicerContext
) -> Services:
    """The services of the moment (the admin API follows config reloads like the data path),
    once the caller showed the admin token, if one is configured."""
    services = current()
    token = services.runtime.admin_token
    if token is not None:
        sent = dict(context.invocation_metadata() or ()).get("authorization", "")
        if isinstance(sent, str):
            sent = sent.encode()
        if not hmac.compare_digest(sent, f"Bearer {token}".encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin token required")
    return services


class QuotaAdmin(quota_pb2_grpc.QuotaAdminServicer):
    def __init__(self, current: Callable[[], Services], active: Callable[[], int]) -> None:
        self._current = current
        self._active = active

    async def _authorized(self, context: grpc.aio.ServicerContext) -> Services:
        return await authorized(self._current, context)

    async def GetStats(self, request, context):
        await self._authorized(context)
        return quota_pb2.GetStatsResponse(
            active_ext_proc_streams=self._active(),
            active_sse_streams=ACTIVE.current,
            sse_streams_total=ACTIVE.total,
            pid=os.getpid(),
            guard_verdicts=VERDICTS.counts,
        )

    async def _services(
        self, context: grpc.aio.ServicerContext, team: str, organization: str = ""
    ) -> Services:
        """The services, once the caller is authorized and the team (or, without a team, the
        organization) is the config's."""
        services = await self._authorized(context)
        config = services.runtime.config
        if not team and organization:
            if organization not in config.organizations:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no organization {organization!r}")
        elif team not in config.teams:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no team {team!r}")
        return services

    async def GetUsage(self, request, context):
        """A team's limits (and a user's in it), or, without a team, an organization's."""
        services = await self._services(context, request.team, request.organization)
        budgets = services.budgets
        if not request.team and request.organization:
            specs = budgets.orgs.get(request.organization, ())
            scope = org_scope(request.organization)
        else:
            specs = (
                *budgets.teams.get(request.team, ()),
                *budgets.of_user(request.team, request.user),
            )
            scope = budgets.scope(request.team)
        now = time.time()
        windows = [policy.window_bounds(s.window, now) for s in specs]
        counters = [
            policy.counter_name(s, start) for s, (start, _) in zip(specs, windows, strict=True)
        ]
        try:
            states = await services.quota.store.usage(scope, counters)
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"quota store unavailable: {exc}")
        reply = quota_pb2.GetUsageResponse(
            team=request.team, user=request.user, organization=request.organization
        )
        for spec, (_, end), state in zip(specs, windows, states, strict=True):
            reply.limits.append(
                quota_pb2.LimitUsage(
                    name=spec.name,
                    level=spec.level,
                    metric=spec.metric,
                    window=spec.window,
                    models=sorted(spec.models),
                    limit=spec.limit,
                    used=state.used,
                    reserved=state.reserved,
                    remaining=max(0, spec.limit - state.used - state.reserved),
                    reset_in_seconds=max(0.0, end - now),
                )
            )
        return reply

    async def ResetUsage(self, request, context):
        services = await self._services(context, request.team)
        try:
            # (A team of an organization shares its scope: only the team's counters go.)
            budgets = services.budgets
            scope, prefix = budgets.scope(request.team), budgets.team_prefix(request.team)
            removed = await services.quota.store.reset(scope, prefix)
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"quota store unavailable: {exc}")
        return quota_pb2.ResetUsageResponse(keys_removed=removed)


# (applied, problems) of one reload attempt
Reloader = Callable[[], Awaitable[tuple[bool, list[str]]]]


class ConfigAdmin(config_pb2_grpc.ConfigAdminServicer):
    def __init__(self, current: Callable[[], Services], reload: Reloader, path: str) -> None:
        self._current = current
        self._reload = reload
        self._path = path

    async def Reload(self, request, context):
        await authorized(self._current, context)
        applied, problems = await self._reload()
        return config_pb2.ReloadResponse(
            applied=applied,
            errors=problems,
            config_path=self._path,
            config_sha256=self._current().runtime.digest,
        )
