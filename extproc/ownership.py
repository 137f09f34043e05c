"""Which team owns an object a backend stores for the gateway (a stored Response, a file, a
batch): recorded
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
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .errors import GatewayError, not_found
from .quota.store import StoreUnavailable
from .wire.base import BATCH_OBJECT, FILE_OBJECT, RESPONSE_OBJECT

if TYPE_CHECKING:
    from .quota.store import QuotaStore

log = logging.getLogger("extproc.ownership")

# The kinds of object (Endpoint.kind), each its own namespace of ids.
RESPONSE, FILE, BATCH = RESPONSE_OBJECT, FILE_OBJECT, BATCH_OBJECT
# OpenAI keeps a stored Response 30 days, a batch's files until they are deleted (or their
# expires_after): the record lasts 30 days.
TTL_S = 30 * 86400.0

_TASKS: set[asyncio.Task[None]] = set()


@dataclass(frozen=True, slots=True)
class Owner:
    team: str
    model: str  # the gateway's model the object was created through
    backend: str  # the backend that stores it
    # What the gateway needs later of the object (a batch input file's counts, a batch's
    # reservation); kept with the record.
    data: Mapping[str, Any] = field(default_factory=dict)


def _key(kind: str, object_id: str) -> str:
    return f"{kind}:{object_id}"


async def record(store: QuotaStore, kind: str, object_id: str, owner: Owner) -> None:
    """Remember the owner; a store that fails is logged (the object is then unreachable
    through the gateway, never another team's)."""
    fields: list[Any] = [owner.team, owner.model, owner.backend]
    if owner.data:
        fields.append(owner.data)
    value = orjson.dumps(fields).decode()
    try:
        held = await store.claim(_key(kind, object_id), value, TTL_S)
    except (StoreUnavailable, OSError) as exc:
        log.warning("could not record the owner of %s %s: %s", kind, object_id, exc)
        return
    if held is not None and held != value and (_parse(held) or owner).team != owner.team:
        # An id the backend handed out again (or a record another team made of it): the first
        # owner keeps it, and this team cannot reach it through the gateway.
        log.warning("%s %s is recorded for another team already: not recorded", kind, object_id)


async def first_time(store: QuotaStore, kind: str, object_id: str) -> bool:
    """True the first time it is asked of this object, in every sidecar sharing the store:
    what must happen once (a batch's settlement) happens where this says so. False too when
    the store cannot say (done later, by whoever asks next)."""
    mark = uuid.uuid4().hex
    try:
        held = await store.claim(_key(f"{kind}-done", object_id), mark, TTL_S)
    except (StoreUnavailable, OSError) as exc:
        log.warning("could not mark %s %s as done: %s", kind, object_id, exc)
        return False
    # (A claim retried after it went through answers our own mark.)
    return held is None or held == mark


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
        raise unknown(kind, object_id)
    return owner


async def owners(store: QuotaStore, kind: str, object_ids: list[str]) -> list[Owner | None]:
    """Each object's owner (None: none recorded, or the store cannot say: such an object is
    taken as another team's)."""

    async def one(object_id: str) -> Owner | None:
        if not object_id:
            return None
        try:
            return _parse(await store.owner(_key(kind, object_id)))
        except (StoreUnavailable, OSError):
            return None

    return list(await asyncio.gather(*(one(i) for i in object_ids)))


def unknown(kind: str, object_id: str) -> GatewayError:
    """The 404 of an object the team does not own, worded as the backend words an unknown id."""
    if kind == RESPONSE:
        return not_found(f"Response with id '{object_id}' not found.", "response_not_found")
    return not_found(f"No such {kind.capitalize()} object: {object_id}", f"{kind}_not_found", "id")


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
        team, model, backend, *rest = orjson.loads(value)
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return None
    data = rest[0] if rest and isinstance(rest[0], dict) else {}
    return Owner(str(team), str(model), str(backend), data)


def _in_background(work: Coroutine[Any, Any, None]) -> None:
    # A reference is kept until it is done: the loop holds only a weak one.
    task = asyncio.ensure_future(work)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
