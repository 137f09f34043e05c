"""Finishing a request, written once: which answer path it took, who finishes it, what it is
charged, and the finish itself (quota settled, tokens and cost counted, span ended, audit
record written).

A request's answer reaches the client on one of four paths (AnswerPath). On each, exactly one
stage settles it (SETTLED_BY) and exactly one counts it in the request metric (counted_by);
the three finishers (downstream.DownstreamStream, observer.ObservedStream, access_log.account)
decide with answer_path() and charge with charge(), so none can double-charge or drop a
charge by deciding alone. docs/architecture.md has the same table in prose.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

from . import identity
from .quota.policy import Amounts
from .telemetry.tracing import NO_TRACE
from .usage import Usage, estimated

if TYPE_CHECKING:
    from .contract import Handover
    from .quota.service import Reservation
    from .services import Services
    from .sse import RelayedStream
    from .telemetry.report import RequestReport
    from .tokens import TokenCounter

log = logging.getLogger("extproc.settlement")


class AnswerPath(Enum):
    """How the answer passed the gateway (the audit record's `path`)."""

    READ = "buffered"  # a JSON answer the downstream stage read whole
    INLINE = "inline"  # a stream the downstream stage relayed chunk by chunk
    OBSERVED = "observed"  # a stream the observer followed from a copy; nothing held back
    LOGGED = "logged"  # released: Envoy answered alone; its access log entry brings it back
    NO_ANSWER = ""  # the exchange ended before an answer's headers reached the downstream stage


class Finisher(Enum):
    DOWNSTREAM = "downstream.DownstreamStream.close"
    OBSERVER = "observer.ObservedStream.close"
    ACCESS_LOG = "access_log.account"


# Who settles each path: the reservation, tokens, cost, the span and the audit record.
SETTLED_BY: Final[Mapping[AnswerPath, Finisher]] = {
    AnswerPath.READ: Finisher.DOWNSTREAM,
    AnswerPath.INLINE: Finisher.DOWNSTREAM,
    AnswerPath.OBSERVED: Finisher.OBSERVER,
    AnswerPath.LOGGED: Finisher.ACCESS_LOG,
    AnswerPath.NO_ANSWER: Finisher.DOWNSTREAM,
}


# The paths the downstream stage hands over, from the table; a tuple, since `in` on it compares
# by identity first (an Enum's hash is Python code, asked on every message).
HANDED_OVER: Final[tuple[AnswerPath, ...]] = tuple(
    path for path, finisher in SETTLED_BY.items() if finisher is not Finisher.DOWNSTREAM
)


def counted_by(released: bool) -> Finisher:
    """Who counts the request (its outcome in the request metric), once. A released request
    (Handover.account) comes back in Envoy's access log whatever its answer, so the reader
    counts it even when the observer settles it: a stream whose observer never started is still
    counted. Any other request is counted by the downstream stage, which saw it end."""
    return Finisher.ACCESS_LOG if released else Finisher.DOWNSTREAM


def is_event_stream(headers: Mapping[str, str]) -> bool:
    media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media_type == "text/event-stream"


def observer_follows(headers: Mapping[str, str]) -> bool:
    """Whether the observer follows an observed request's answer: a successful stream (even one
    whose headers end it: the observer then finishes it at once). The observer decides on the
    answer's headers before the downstream stage sees them (the response path runs the filters
    in reverse order); both decide with this, and the access log's reader with answer_path."""
    status = headers.get(":status", "")
    return is_event_stream(headers) and status.isdigit() and 200 <= int(status) < 300


def answer_path(
    observe: bool, released: bool, headers: Mapping[str, str], end_of_stream: bool = False
) -> AnswerPath:
    """The path of an answer with these headers. `observe`: the observer was instantiated for
    the request; `released`: the downstream stage let it go with its body (Handover.account)."""
    if observe and observer_follows(headers):
        return AnswerPath.OBSERVED
    if released:
        return AnswerPath.LOGGED
    if is_event_stream(headers) and not end_of_stream:
        return AnswerPath.INLINE
    return AnswerPath.READ


def charge(usage: Usage | None, status: int, complete: bool, prompt: int) -> Amounts:
    """The one charging rule. `complete`: the answer ended as the backend meant it to (False:
    the client went away, the stream was cut, or no answer came at all: status 0)."""
    if usage is not None and (not complete or 200 <= status < 300):
        return Amounts(
            usage.prompt_tokens,
            usage.completion_tokens,
            cached_input_tokens=usage.cached_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            reasoning_tokens=usage.reasoning_tokens,
        )
    if complete:
        # The backend answered without usage, or refused or failed: it served no tokens.
        return Amounts(0, 0)
    # No (whole) answer and nothing counted of it: the backend may still have read the prompt.
    return Amounts(prompt, 0)


def settle(
    services: Services,
    reservation: Reservation | None,
    usage: Usage | None,
    status: int,
    complete: bool,
    prompt: int,
    trace: Any = NO_TRACE,
) -> None:
    """Settle the reservation at the charge (once: a settled reservation is left alone)."""
    if reservation is not None and not reservation.settled:
        amounts = charge(usage, status, complete, prompt)
        services.quota.settle_soon(reservation, amounts, trace)


def release_unused(services: Services, reservation: Reservation | None, trace: Any) -> None:
    """Nothing went upstream (a guard blocked, the prompt was too long, the client left before
    the request did): the reservation is released with no tokens used."""
    services.quota.settle_soon(reservation, Amounts(0, 0), trace)


def settle_batch(services: Services, reservation: Reservation | None, used: Amounts) -> None:
    """A batch's reservation, at what the batch reports it used (batches.py): its requests ran
    inside the backend, never through the gateway; one that never ran is released."""
    services.quota.settle_soon(reservation, used)


def finish_batch(
    services: Services,
    report: RequestReport,
    reservation: Reservation | None,
    usage: Usage | None,
    used: Amounts | None,
) -> None:
    """A batch seen finished (batches.py), once: its reservation settled at what it reports
    (`used`; None: it reports nothing though it ran, and its reservation is charged as it
    stands when it expires), its tokens and cost counted, its audit record written."""
    if used is not None:
        settle_batch(services, reservation, used)
    finish(services, report, usage, NO_TRACE, 0.0)


def finish(
    services: Services,
    report: RequestReport,
    usage: Usage | None,
    trace: Any,
    duration_s: float,
    timing: dict[str, Any] | None = None,
) -> None:
    """The finish of the stage that settles the request (SETTLED_BY): its tokens and cost
    counted, its span ended, its audit record written."""
    cfg = services.runtime.config
    if report.provider is None and report.backend in cfg.backends:
        # Known from the backend's config wherever the request was finished.
        report.provider = cfg.backends[report.backend].type
    cost = report.count_usage(cfg, usage)
    if trace is not NO_TRACE:
        report.end_span(trace, usage, cost)
    if services.audit is not None:
        services.audit.write(report.audit_record(usage, cost, duration_s, timing))


def stream_usage(
    relay: RelayedStream, prompt: int, tokens: TokenCounter, model: str, cap: int | None
) -> Usage:
    """A stream's usage: the backend's report, or our own count when there is none (at most
    `cap`, the max output the client allowed: usage.estimated)."""
    if relay.usage is not None:
        return relay.usage
    partial = relay.partial_usage
    if partial is not None:
        # What the backend reported before the cut (its prompt's count, what of it came from
        # or went to its prompt cache), the output estimated.
        charged = estimated(partial.prompt_tokens, partial.completion_tokens, cap)
        charged.cached_tokens = min(partial.cached_tokens, charged.prompt_tokens)
        charged.cache_write_tokens = min(
            partial.cache_write_tokens, charged.prompt_tokens - charged.cached_tokens
        )
        return charged
    if relay.expects_usage:
        # The backend announced a usage report, so the relay kept no text; the report never
        # came (a cut stream). OpenAI-style streams carry about one token per event: count
        # every event but the role chunk, erring towards over-counting, never losing tokens.
        return estimated(prompt, max(0, relay.events - 1), cap)
    return estimate(prompt, tokens, model, relay.text, cap)


def estimate(
    prompt: int, tokens: TokenCounter, model: str, completion: str, cap: int | None
) -> Usage:
    """Our own count of an answer without a usage report, charged by usage.estimated."""
    return estimated(prompt, tokens.count_text(model, completion).tokens, cap)


def handed_back(services: Services, handover: Handover) -> Reservation | None:
    """The reservation the downstream stage handed over, rebuilt by the stage that finishes the
    request (None: there was none, or the team's limits changed since; see
    QuotaService.handed_over)."""
    if not handover.reservation:
        return None
    return reservation_of(
        services,
        team=handover.team,
        user=handover.user,
        key=handover.key,
        model=handover.model,
        reservation=handover.reservation,
        limits=handover.limits,
        scope=handover.scope,
        pool=handover.pool,
    )


def reservation_of(
    services: Services,
    *,
    team: str,
    user: str,
    key: str,
    model: str,
    reservation: str,
    limits: tuple[str, ...],
    scope: str,
    pool: int = 0,
) -> Reservation | None:
    """A reservation another stage or process made, rebuilt from what it recorded (a request's
    hand-over, a batch's record): its caller's limits of the current config, to settle it in
    the scope it was made in (None: its limits changed since; QuotaService.handed_over)."""
    budgets = services.budgets
    who = identity.settling(services.runtime.config, services.keys, team, user, key)
    specs = budgets.applicable(who, model)
    if pool:
        # A quota failover reserved against the limits of all models only (see _reserve).
        specs = tuple(s for s in specs if not s.scoped)
    return services.quota.handed_over(
        services.runtime.config, scope or budgets.scope(team), model, reservation, limits, specs
    )
