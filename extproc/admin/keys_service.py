"""The KeyAdmin gRPC service: run-time API keys created, listed, rotated and revoked
(extproc.keys). Authorized like the other admin services (the admin token, when one is
configured), and checked against the config of the moment (it follows reloads).

The secret of a key is in the answers of CreateKey and RotateKey only, and never logged.
After a write, this process reloads its keys at once; the others see it at their next poll.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from ..config import METRICS, Limit
from ..keys.directory import KeyDirectory
from ..keys.records import KeyNotFound, KeyRecord, KeyRevoked, KeyStoreUnavailable
from ..keys.validation import InvalidKey, check_spec
from .service import authorized
from .v1 import keys_pb2, keys_pb2_grpc

if TYPE_CHECKING:
    from ..services import Services

log = logging.getLogger("extproc.admin.keys")


class KeyAdmin(keys_pb2_grpc.KeyAdminServicer):
    def __init__(
        self,
        current: Callable[[], Services],
        keys: KeyDirectory | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._current = current
        self._directory = keys  # None: run-time keys are off (keys.enabled)
        self._clock = clock

    async def _keys(self, context: grpc.aio.ServicerContext) -> KeyDirectory:
        if self._directory is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "run-time keys are off: set keys.enabled: true in the config (and restart)",
            )
        assert self._directory is not None
        return self._directory

    async def CreateKey(self, request, context):
        services = await authorized(self._current, context)
        keys = await self._keys(context)
        now = self._clock()
        try:
            spec = check_spec(
                services.runtime,
                team=request.team,
                now=now,
                user=request.user or None,
                expires_at=request.expires_at or None,
                models=list(request.models),
                limits=[_limit_dict(i, lim) for i, lim in enumerate(request.limits)],
                description=request.description,
            )
        except InvalidKey as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            record, secret = await keys.store.create(spec, now)
        except KeyStoreUnavailable as exc:
            await _unavailable(context, exc)
        log.info("key %s created for team %s", record.id, record.team)
        await keys.refresh()
        return keys_pb2.CreateKeyResponse(key=_key(record, now), secret=secret)

    async def ListKeys(self, request, context):
        await authorized(self._current, context)
        keys = await self._keys(context)
        try:
            records = await keys.store.list(request.team or None)
        except KeyStoreUnavailable as exc:
            await _unavailable(context, exc)
        now = self._clock()
        return keys_pb2.ListKeysResponse(
            keys=[
                _key(r, now)
                for r in records
                if request.include_revoked or r.status(now) != "revoked"
            ]
        )

    async def GetKey(self, request, context):
        await authorized(self._current, context)
        keys = await self._keys(context)
        try:
            record = await keys.store.get(request.id)
        except KeyStoreUnavailable as exc:
            await _unavailable(context, exc)
        if record is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"no key {request.id!r}")
        return keys_pb2.GetKeyResponse(key=_key(record, self._clock()))

    async def RotateKey(self, request, context):
        await authorized(self._current, context)
        keys = await self._keys(context)
        grace = request.grace_seconds
        if not (math.isfinite(grace) and grace >= 0):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "grace_seconds: 0 or more seconds"
            )
        now = self._clock()
        try:
            record, secret = await keys.store.rotate(request.id, now=now, grace_s=grace)
        except KeyNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except KeyRevoked as exc:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{exc} (at {_iso(exc.revoked_at)}): create a new key",
            )
        except KeyStoreUnavailable as exc:
            await _unavailable(context, exc)
        log.info("key %s rotated (grace %gs)", record.id, grace)
        await keys.refresh()
        return keys_pb2.RotateKeyResponse(key=_key(record, now), secret=secret)

    async def RevokeKey(self, request, context):
        await authorized(self._current, context)
        keys = await self._keys(context)
        now = self._clock()
        try:
            record = await keys.store.revoke(request.id, now)
        except KeyNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except KeyStoreUnavailable as exc:
            await _unavailable(context, exc)
        log.info("key %s revoked", record.id)
        await keys.refresh()
        return keys_pb2.RevokeKeyResponse(key=_key(record, now))


async def _unavailable(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    await _abort(context, grpc.StatusCode.UNAVAILABLE, f"key store unavailable: {exc}")


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, msg: str) -> NoReturn:
    await context.abort(code, msg)
    raise AssertionError("abort raises")  # (for the type checker: it does not say so)


def _limit_dict(i: int, limit: keys_pb2.Limit) -> dict[str, Any]:
    """A Limit message as the config's Limit takes it (validation reports what is wrong)."""
    if limit.metric not in METRICS:
        raise InvalidKey(
            [(f"limits[{i}].metric", f"one of {', '.join(METRICS)}, not {limit.metric!r}")]
        )
    amount: float | int = limit.amount
    if limit.metric != "usd" and float(amount).is_integer():
        amount = int(amount)
    out: dict[str, Any] = {"window": limit.window, limit.metric: amount}
    if limit.name:
        out["name"] = limit.name
    if limit.models:
        out["models"] = list(limit.models)
    return out


def limit_message(limit: Limit) -> keys_pb2.Limit:
    """A limit as the admin API carries it (the CLI's requests and the service's answers)."""
    return keys_pb2.Limit(
        name=limit.name or "",
        window=limit.window,
        metric=limit.metric,
        amount=float(getattr(limit, limit.metric)),
        models=limit.models or [],
    )


def _key(record: KeyRecord, now: float) -> keys_pb2.Key:
    grace_end = record.previous_valid_until if record.previous_usable(now) else None
    return keys_pb2.Key(
        id=record.id,
        team=record.team,
        user=record.user or "",
        hint=record.hint,
        description=record.description,
        models=list(record.models or ()),
        limits=[limit_message(limit) for limit in record.limit_objects()],
        created_at=record.created_at,
        expires_at=record.expires_at or 0.0,
        revoked_at=record.revoked_at or 0.0,
        last_used_at=record.last_used_at or 0.0,
        rotated_at=record.rotated_at or 0.0,
        previous_valid_until=grace_end or 0.0,
        status=record.status(now),
    )


def _iso(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="seconds")
