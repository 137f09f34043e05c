"""Which team owns an object a backend stores for the gateway (a stored Response): recorded
when the backend's answer creates it, looked up before a later call on it is passed on.

Every team reaches a backend with the gateway's one key, so the backend cannot tell teams
apart: without this record any team that learned an object's id could read, continue or
delete another team's. The record lives in the quota store (memory, or Redis shared by every
sidecar), for as long as the backend keeps such objects; a call on an object with no record,
or another team's, is answered as the backend answers an unknown id (404), so the existence
of other teams' objects is not disclosed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .errors import GatewayError, not_found
from .quota.store import StoreUnavailable

if TYPE_CHECKING:
    from .quota.store import QuotaStore

log = logging.getLogger("extproc.ownership")

RESPONSE = "response"
# OpenAI keeps a stored Response 30 days: the record lasts as long.
TTL_S = 30 * 86400.0

_TASKS: set[asyncio.Task[None]] = set()


@dataclass(frozen=True, slots=True)
class Owner:
    team: str
    model: str  # the gateway's model the object was created through
    backend: str  # the backend that stores it


def _key(kind: str, object_id: str) -> str:
    return f"{kind}:{object_id}"


async def record(store: QuotaStore, kind: str, object_id: str, owner: Owner) -> None:
    """Remember the owner; a store that fails is logged (the object is then unreachable
    through the gateway, never another team's)."""
    value = orjson.dumps([owner.team, owner.model, owner.backend]).decode()
    try:
        await store.claim(_key(kind, object_id), value, TTL_S)
    except (StoreUnavailable, OSError) as exc:
        log.warning("could not record the owner of %s %s: %s", kind, object_id, exc)


def remember(store: QuotaStore, kind: str, object_id: str, owner: Owner) -> None:
    """`record` in the background: the answer that created the object is not held for it."""
    _in_background(record(store, kind, object_id, owner))


async def owned(store: QuotaStore, kind: str, object_id: str, team: str) -> Owner:
    """The object's owner when it is `team`; else the backend's 404 for an unknown id (a 503
    when the store cannot say)."""
    try:
        value = await store.owner(_key(kind, object_id))
    except (StoreUnavailable, OSError):
        raise GatewayError(
            503,
            "The gateway cannot check who owns this object right now; retry shortly",
            "server_error",
            "ownership_store_unavailable",
            headers=(("retry-after", "1"),),
        ) from None
    owner = _parse(value)
    if owner is None or owner.team != team:
        raise not_found(
            f"{kind.capitalize()} with id '{object_id}' not found.", f"{kind}_not_found"
        )
    return owner


def forget_later(store: QuotaStore, kind: str, object_id: str) -> None:
    """`forget` in the background (the answer that deleted the object is not held for it)."""
    _in_background(forget(store, kind, object_id))


async def forget(store: QuotaStore, kind: str, object_id: str) -> None:
    try:
        await store.release(_key(kind, object_id))
    except (StoreUnavailable, OSError) as exc:
        log.warning("could not forget %s %s: %s", kind, object_id, exc)


def _parse(value: str | None) -> Owner | None:
    if value is None:
        return None
    try:
        team, model, backend = orjson.loads(value)
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return None
    return Owner(str(team), str(model), str(backend))


def _in_background(work: Coroutine[Any, Any, None]) -> None:
    # A reference is kept until it is done: the loop holds only a weak one.
    task = asyncio.ensure_future(work)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
