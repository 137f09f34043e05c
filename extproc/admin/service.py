"""The QuotaAdmin gRPC service: a team's usage per limit, and resetting it."""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from ..quota import policy
from ..quota.store import StoreUnavailable
from ..streams import ACTIVE
from .v1 import quota_pb2, quota_pb2_grpc

if TYPE_CHECKING:
    from ..processor import Services


class QuotaAdmin(quota_pb2_grpc.QuotaAdminServicer):
    def __init__(self, current: Callable[[], Services], active: Callable[[], int]) -> None:
        # The services of the moment: the admin API follows config reloads like the data path.
        self._current = current
        self._active = active

    async def _authorized(self, context: grpc.aio.ServicerContext) -> Services:
        services: Services = self._current()
        token = services.runtime.admin_token
        if token is not None:
            sent = dict(context.invocation_metadata()).get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin token required")
        return services

    async def GetStats(self, request, context):
        await self._authorized(context)
        return quota_pb2.GetStatsResponse(
            active_ext_proc_streams=self._active(),
            active_sse_streams=ACTIVE.current,
            sse_streams_total=ACTIVE.total,
            pid=os.getpid(),
        )

    async def _services(self, context: grpc.aio.ServicerContext, team: str) -> Services:
        services = await self._authorized(context)
        if team not in services.runtime.config.teams:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no team {team!r}")
        return services

    async def GetUsage(self, request, context):
        services = await self._services(context, request.team)
        specs = services.limits.get(request.team, ())
        now = time.time()
        windows = [policy.window_bounds(s.window, now) for s in specs]
        counters = [f"{s.name}:{start}" for s, (start, _) in zip(specs, windows, strict=True)]
        try:
            states = await services.quota.store.usage(request.team, counters)
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"quota store unavailable: {exc}")
        reply = quota_pb2.GetUsageResponse(team=request.team)
        for spec, (_, end), state in zip(specs, windows, states, strict=True):
            reply.limits.append(
                quota_pb2.LimitUsage(
                    name=spec.name,
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
            removed = await services.quota.store.reset(request.team)
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"quota store unavailable: {exc}")
        return quota_pb2.ResetUsageResponse(keys_removed=removed)
