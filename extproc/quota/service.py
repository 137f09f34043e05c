"""Reserve before, settle after: the quota decisions of one request, and the failure policy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import Config, QuotaSettings
from ..errors import GatewayError
from ..telemetry.metrics import QUOTA_ERRORS, QUOTA_SECONDS, QUOTA_SETTLE_RETRIES, child
from ..telemetry.tracing import NO_SPAN, NO_TRACE
from . import policy
from .budgets import KEY, ORGANIZATION, USER
from .policy import MICRO, TOKEN_METRICS, Amounts, LimitSpec
from .store import Charge, CounterState, QuotaStore, StoreUnavailable

if TYPE_CHECKING:
    from ..identity import Identity
    from ..wire import ParsedRequest

log = logging.getLogger("extproc.quota")

_UNITS = {
    "tokens": "tokens",
    "input_tokens": "input tokens",
    "output_tokens": "output tokens",
    "requests": "requests",
    "usd": "micro-USD",
}
_ERROR_TYPE = {"requests": "requests", "usd": "insufficient_quota"}

# Settles the store failed are retried in the background (see _retry_settles): the first retry
# after about this long, then twice as long each time the store fails again, up to the cap.
RETRY_FIRST_S = 0.25
RETRY_MAX_S = 30.0
# Settles waiting for a retry, per process: beyond this a failed settle is given up (its
# reservation is charged at its estimate when it expires), so an outage cannot fill memory.
RETRY_MAX_PENDING = 10_000
# drain() at shutdown or reload: how long the retries of failed settles may still take.
DRAIN_RETRIES_S = 5.0


def requested_output(parsed: ParsedRequest, default: int) -> int:
    """The most output this request may produce, for the reservation: the most the client
    allowed, or `default` (quota.default_max_tokens) for each answer it asked for."""
    if parsed.output_cap is not None:
        return parsed.output_cap
    return default * parsed.answers


@dataclass(slots=True)
class Reservation:
    scope: str  # the store's (budgets.py): the team's, or its organization's
    id: str
    model: str
    specs: tuple[LimitSpec, ...]
    charges: tuple[Charge, ...]
    states: tuple[CounterState, ...]
    estimate: Amounts
    cfg: Config  # the config it was admitted under: prices for settling a USD budget
    settled: bool = False
    # Unix time by which the store has expired it (charged at its estimate): settling it is
    # pointless after that. 0: unknown (handed over), then at most reservation_ttl_s from now.
    expires_at: float = 0.0


@dataclass(slots=True)
class _PendingSettle:
    """A settle (or a release) the store failed, to be retried until `until`."""

    scope: str
    id: str
    amounts: list[int]
    until: float  # unix time: the reservation has expired and been charged by then


@dataclass(slots=True)
class QuotaService:
    store: QuotaStore
    settings: QuotaSettings
    failures: int = 0  # store errors seen; exported as a metric once metrics exist
    _last_warning: float = 0.0
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _pending: deque[_PendingSettle] = field(default_factory=deque)
    _retrier: asyncio.Task | None = None
    _hurry: asyncio.Event | None = None  # set by drain(): retry now, not after the back-off
    # The service a reload put in this one's place: failed settles go to its retries (its
    # store is the one that stays open).
    _successor: QuotaService | None = None

    @classmethod
    def from_settings(cls, settings: QuotaSettings) -> QuotaService:
        return cls(make_store(settings), settings)

    # -- reserve ----------------------------------------------------------------------------

    async def reserve(
        self,
        cfg: Config,
        scope: str,
        model: str,
        specs: tuple[LimitSpec, ...],
        estimate: Amounts,
        ttl_s: float | None = None,
        who: Identity | None = None,
    ) -> Reservation | None:
        """Reserve `estimate` against every limit (of every level: budgets.py), in the store's
        `scope`, or raise the 429 naming the caller's level whose limit is reached (or the 503
        when closed). `ttl_s`: how long it may wait for its settle before it is charged at the
        estimate (default quota.reservation_ttl_s; a batch's runs for a day)."""
        now = time.time()
        ttl = ttl_s if ttl_s is not None else self.settings.reservation_ttl_s
        # (Its counters outlive it: a settle finds them after their window ended.)
        charges = policy.charges(specs, estimate, cfg, model, now, ttl + 60)
        res_id = uuid.uuid4().hex
        started = time.perf_counter()
        try:
            result = await self.store.reserve(scope, res_id, charges, ttl)
        except StoreUnavailable as exc:
            self._store_failed("reserve", exc)
            if exc.maybe_applied:
                # It may still have run (its answer lost, or it ran late): release what it may
                # have reserved, since this request goes on unmetered or not at all. Settling
                # an id the store does not know changes nothing.
                self._retry_later(scope, res_id, [0] * len(charges), now + ttl)
            if self.settings.failure_mode == "open":
                return None
            raise GatewayError(
                503,
                "The gateway cannot check your quota right now; retry shortly",
                "server_error",
                "quota_store_unavailable",
                headers=(("retry-after", "1"),),
            ) from None
        child(QUOTA_SECONDS, self.settings.store, "reserve").observe(time.perf_counter() - started)
        if not result.ok:
            assert result.failed is not None
            whose = _whose(specs[result.failed].level, who, scope)
            raise self._exceeded(whose, specs, charges, result.states, result.failed, now)
        return Reservation(
            scope, res_id, model, specs, charges, result.states, estimate, cfg, expires_at=now + ttl
        )

    def _exceeded(
        self,
        whose: str,
        specs: tuple[LimitSpec, ...],
        charges: tuple[Charge, ...],
        states: tuple[CounterState, ...],
        failed: int,
        now: float,
    ) -> GatewayError:
        spec, charge, state = specs[failed], charges[failed], states[failed]
        _, window_end = policy.window_bounds(spec.window, now)
        wait = max(1, math.ceil(window_end - now))
        unit = _UNITS[spec.metric]
        used = state.used + state.reserved
        headers = [*self.rate_headers(specs, states, now).items()]
        if charge.amount > charge.limit:
            # Waiting cannot help: no Retry-After, so clients do not sleep for nothing, and
            # the openai and anthropic SDKs' own header telling them not to retry a 429.
            headers.append(("x-should-retry", "false"))
            message = (
                f"This request needs {_fmt(charge.amount, spec)} {unit}, more than the whole "
                f"'{spec.name}' quota of {whose} ({_fmt(charge.limit, spec)} {unit} per "
                f"{spec.window}). Lower max_tokens or the prompt."
            )
        else:
            message = (
                f"Quota '{spec.name}' of {whose} reached: limit {_fmt(charge.limit, spec)} "
                f"{unit} per {spec.window}, used {_fmt(used, spec)}, requested "
                f"{_fmt(charge.amount, spec)}. Try again in {policy.go_duration(wait)}."
            )
            headers.append(("retry-after", str(wait)))
        return GatewayError(
            429,
            message,
            _ERROR_TYPE.get(spec.metric, "tokens"),
            f"quota_exceeded:{spec.label}",
            headers=tuple(headers),
        )

    # -- settle -----------------------------------------------------------------------------

    def handed_over(
        self,
        cfg: Config,
        scope: str,
        model: str,
        reservation_id: str,
        limit_names: tuple[str, ...],
        specs: tuple[LimitSpec, ...],
    ) -> Reservation | None:
        """The reservation another stage made, rebuilt from what it passed on (the stream
        observer settles it, maybe in another process). None when the team's limits changed
        since: it then expires into a charge at its estimate, over-counted, never lost."""
        if tuple(spec.label for spec in specs) != limit_names:
            log.warning(
                "limits changed for %s while a stream was in flight; its reservation "
                "will be charged at its estimate when it expires",
                scope,
            )
            return None
        return Reservation(scope, reservation_id, model, specs, (), (), Amounts(0, 0), cfg)

    def settle_soon(
        self, reservation: Reservation | None, actual: Amounts, trace: Any = NO_TRACE
    ) -> None:
        """Settle off the response path: the client need not wait for the store."""
        if reservation is None or reservation.settled:
            return
        reservation.settled = True
        span = trace.start("quota settle")
        if span is not NO_SPAN:
            span.set_attributes(
                {
                    "extproc.input_tokens": actual.input_tokens,
                    "extproc.output_tokens": actual.output_tokens,
                }
            )
        task = asyncio.get_running_loop().create_task(self._settle(reservation, actual, span))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, reservation: Reservation, actual: Amounts, span: Any) -> None:
        amounts = [
            policy.amount(spec, actual, reservation.cfg, reservation.model)
            for spec in reservation.specs
        ]
        started = time.perf_counter()
        try:
            await self.store.settle(reservation.scope, reservation.id, amounts)
        except Exception as exc:
            if not isinstance(exc, StoreUnavailable):  # a bug: retrying is still the best bet
                log.exception("settle of reservation %s failed", reservation.id)
            self._store_failed("settle", exc)
            span.set_attribute("extproc.error", "store_unavailable")
            until = reservation.expires_at or time.time() + self.settings.reservation_ttl_s
            self._retry_later(reservation.scope, reservation.id, amounts, until)
        else:
            child(QUOTA_SECONDS, self.settings.store, "settle").observe(
                time.perf_counter() - started
            )
        finally:
            span.end()

    # -- retries of failed settles ------------------------------------------------------------

    def _retry_later(self, scope: str, res_id: str, amounts: list[int], until: float) -> None:
        """Queue a settle the store failed. Retrying is safe: a settle that did run (only its
        answer was lost) left nothing to settle, and settling an unknown or expired
        reservation changes nothing (an expired one has been charged at its estimate)."""
        if self._successor is not None:
            self._successor._retry_later(scope, res_id, amounts, until)
            return
        if len(self._pending) >= RETRY_MAX_PENDING:
            QUOTA_SETTLE_RETRIES.labels(self.settings.store, "abandoned").inc()
            return
        self._pending.append(_PendingSettle(scope, res_id, amounts, until))
        if self._retrier is None or self._retrier.done():
            self._hurry = asyncio.Event()
            self._retrier = asyncio.get_running_loop().create_task(self._retry_settles())

    async def _retry_settles(self) -> None:
        """One task works through the failed settles. While the store keeps failing it waits
        longer each time (one call per wait, however many are pending, so a recovering store
        is not flooded); once a call gets through, the rest follow back to back. One that
        fails goes to the back of the line (a Cluster node that is down holds up no other
        team's). A settle is retried until its reservation expires, no longer: by then the
        store has charged it at its estimate."""
        store = self.settings.store
        delay = RETRY_FIRST_S
        failing = True  # a call has just failed: wait before the first retry
        while self._pending:
            if failing:
                if await self._pause(delay):
                    delay = RETRY_FIRST_S  # drain() cut the wait short: back off afresh
                delay = min(2 * delay, RETRY_MAX_S)
                failing = False
            item = self._pending[0]
            if time.time() >= item.until:
                self._pending.popleft()
                QUOTA_SETTLE_RETRIES.labels(store, "abandoned").inc()
                continue
            try:
                await self.store.settle(item.scope, item.id, item.amounts)
            except StoreUnavailable as exc:
                self._store_failed("settle", exc)
                QUOTA_SETTLE_RETRIES.labels(store, "failed").inc()
                self._pending.rotate(-1)
                failing = True
                continue
            except Exception:  # the amounts do not match its charges, or a bug: retrying won't help
                log.exception("settle of reservation %s refused by the store", item.id)
                self._pending.popleft()
                QUOTA_SETTLE_RETRIES.labels(store, "abandoned").inc()
                continue
            self._pending.popleft()
            QUOTA_SETTLE_RETRIES.labels(store, "settled").inc()
            delay = RETRY_FIRST_S

    async def _pause(self, delay: float) -> bool:
        """Wait about `delay` (jittered, so sidecars do not retry in step); True when drain()
        cut it short."""
        assert self._hurry is not None
        try:
            async with asyncio.timeout(delay * random.uniform(0.5, 1.0)):
                await self._hurry.wait()
        except TimeoutError:
            return False
        self._hurry.clear()
        return True

    def hand_over_to(self, successor: QuotaService) -> None:
        """A reload replaced this service (its store is about to close): the settles waiting
        for a retry, and those of the requests still in flight that fail on the closed store,
        are retried by `successor` instead (settling is idempotent, and an id another store
        does not know changes nothing there)."""
        self._successor = successor
        if self._retrier is not None and not self._retrier.done():
            self._retrier.cancel()
        while self._pending:
            item = self._pending.popleft()
            successor._retry_later(item.scope, item.id, item.amounts, item.until)

    @property
    def pending_settles(self) -> int:
        """Failed settles waiting for a retry."""
        return len(self._pending)

    async def drain(self, retries_s: float = DRAIN_RETRIES_S) -> None:
        """Wait for pending settlements (shutdown): every first attempt, then the retries of
        those that failed, for at most `retries_s` (they start at once); any left then expire
        into a charge at their estimate."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        retrier = self._retrier
        if retrier is None or retrier.done():
            return
        if self._hurry is not None:
            self._hurry.set()
        try:
            async with asyncio.timeout(retries_s):
                await asyncio.shield(retrier)
        except TimeoutError:
            retrier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retrier
            left = len(self._pending)
            self._pending.clear()
            QUOTA_SETTLE_RETRIES.labels(self.settings.store, "abandoned").inc(left)
            log.warning(
                "%d failed quota settlement(s) still pending; their reservations will be "
                "charged at their estimate when they expire",
                left,
            )

    # -- headers ----------------------------------------------------------------------------

    def rate_headers(
        self,
        specs: tuple[LimitSpec, ...],
        states: tuple[CounterState, ...],
        now: float | None = None,
    ) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the tightest token and request limits."""
        now = time.time() if now is None else now
        out: dict[str, str] = {}
        for kind, metrics in (("tokens", TOKEN_METRICS), ("requests", {"requests"})):
            best = None
            for spec, state in zip(specs, states, strict=True):
                if spec.metric in metrics:
                    remaining = max(0, spec.limit - state.used - state.reserved)
                    if best is None or remaining < best[1]:
                        best = (spec, remaining)
            if best is None:
                continue
            spec, remaining = best
            _, end = policy.window_bounds(spec.window, now)
            out[f"x-ratelimit-limit-{kind}"] = str(spec.limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            out[f"x-ratelimit-reset-{kind}"] = policy.go_duration(end - now)
        return out

    def _store_failed(self, what: str, exc: Exception) -> None:
        self.failures += 1
        QUOTA_ERRORS.labels(self.settings.store, what).inc()
        now = time.monotonic()
        # Loud, but not one line per request while the store is down.
        if now - self._last_warning > 5:
            self._last_warning = now
            log.error(
                "quota store unavailable during %s (%s); failure_mode=%s; %d failures so far",
                what,
                exc,  # names the cause: "redis: TimeoutError within 50 ms: ..."
                self.settings.failure_mode,
                self.failures,
            )


def _whose(level: str, who: Identity | None, scope: str) -> str:
    """The owner of a limit, as a 429 names it: the caller's own user id or key label only
    (both the caller's own), never anyone else's."""
    if who is None:
        return f"team {scope}"
    if level == ORGANIZATION:
        return f"organization {who.organization}"
    if level == USER:
        return f"user {who.user} of team {who.team}"
    if level == KEY:
        return f"key {who.key} of team {who.team}"
    return f"team {who.team}"


def _fmt(value: int, spec: LimitSpec) -> str:
    return f"${value / MICRO:.4f}" if spec.metric == "usd" else str(value)


def make_store(settings: QuotaSettings) -> QuotaStore:
    if settings.store == "memory":
        from .memory import MemoryStore

        return MemoryStore()
    from .redis_store import RedisStore

    redis = settings.redis
    return RedisStore.from_url(
        redis.url,
        cluster=redis.cluster,
        password=redis.password.resolve() if redis.password else None,
        timeout_s=redis.timeout_ms / 1000,
        connect_timeout_s=redis.connect_timeout_ms / 1000,
        pool_size=redis.pool_size,
    )
