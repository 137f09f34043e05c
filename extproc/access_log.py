"""Accounting from Envoy's access log: the answers the downstream stage did not wait for.

For a request to a model served by one backend whose answer need not pass the sidecar (a JSON
answer with `sidecar.json_path: access_log` and no response guard, a stream that carries its
own usage report, or a stream the observer follows), the downstream stage ends its ext_proc
stream with the request body: Envoy sends the answer to the client without asking the sidecar
(two messages per request instead of four). Every such request is counted here; a successful
stream the observer followed is finished (tokens, quota, audit) by the observer, everything
else here (settlement.SETTLED_BY).
Envoy's json_to_metadata filter copies a JSON answer's `usage` into the request's metadata
(its sse_to_metadata filter, a stream's usage report), and
Envoy's gRPC access log brings each such request's entry here, in batches, once it has ended:
the metadata the downstream stage left (team, model, reservation, report), the usage, the status.
This settles the reservation, counts the request and its tokens, and writes the audit record.

Any sidecar process may read the log (Envoy keeps one stream per worker thread), so with
several workers the quota store must be shared, as for the stream observer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from . import native, routing, settlement
from .config import organization_of
from .contract import METADATA_NAMESPACE, USAGE_KEYS, Handover, native_from_route
from .protocol import struct_dict
from .services import Services
from .settlement import Finisher
from .streams import RELEASED
from .telemetry.metrics import ACCESS_LOG_ENTRIES
from .telemetry.report import RequestReport
from .telemetry.tracing import NO_TRACE
from .usage import SOURCE_PROVIDER, Usage, estimated

log = logging.getLogger("extproc.access_log")


# The hand-over, and the answer's usage as Envoy's json_to_metadata filter copied it (_usage).
_READ_KEYS = Handover.KEYS | {*USAGE_KEYS, "cached_tokens", "reasoning_tokens", "token_source"}

# The longest the reader holds the loop within a batch (an entry takes ~50 µs).
YIELD_AFTER_S = 0.0005

_NO_USAGE = (
    "backend %s sent an answer without usage; charged the request's maximum "
    "(set sidecar.json_path: inline to count the answer itself)"
)
_NO_STREAM_USAGE = (
    "backend %s sent a stream without a usage report; charged the request's maximum "
    "(set sidecar.stream_path: observe to count streams themselves)"
)

_ACCOUNTED = ACCESS_LOG_ENTRIES.labels("accounted")
_IGNORED = ACCESS_LOG_ENTRIES.labels("ignored")
_FAILED = ACCESS_LOG_ENTRIES.labels("error")


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):
    """Envoy's access log stream: one per Envoy worker thread, open as long as Envoy runs (a
    shutdown ends them: see Sidecar.stop)."""

    def __init__(self, services: Callable[[], Services]) -> None:
        self.services = services  # the current ones: a reload swaps them
        self.streams = 0  # open now: none means no Envoy is there to send what is pending

    async def StreamAccessLogs(self, request_iterator, context):
        self.streams += 1
        try:
            await self._read(request_iterator)
        finally:
            self.streams -= 1
        return als_pb2.StreamAccessLogsResponse()

    async def _read(self, request_iterator: Any) -> None:
        async for message in request_iterator:
            services = self.services()
            yielded = time.perf_counter()
            for entry in message.http_logs.log_entry:
                # A native route's request was never released by a downstream stage: a
                # shutdown does not wait for it (RELEASED counts only those it does).
                released = native_from_route(entry.common_properties.route_name) is None
                try:
                    if account(services, entry):
                        _ACCOUNTED.inc()
                        if released:
                            RELEASED.done()
                    else:
                        _IGNORED.inc()
                except Exception:
                    # One bad entry must not cost the others in the batch, or the stream.
                    _FAILED.inc()
                    if released:
                        RELEASED.done()  # it came back: a shutdown need not wait for it
                    log.exception("could not account an access log entry")
                # A batch holds several entries: requests in flight get the loop in between,
                # rather than waiting for the whole batch (that showed as p99 latency). Not
                # after every entry: each turn of the loop costs the sidecar's CPU too (~5 %
                # of it per request at saturation when it was every entry).
                now = time.perf_counter()
                if now - yielded > YIELD_AFTER_S:
                    await asyncio.sleep(0)
                    yielded = time.perf_counter()


def account(services: Services, entry: Any) -> bool:
    """One ended request whose answer the downstream stage handed over, or that Envoy served on
    a native route; False for an entry that is not one (Envoy's filter sends only those)."""
    struct = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
    info = struct_dict(struct, _READ_KEYS) if struct is not None else {}
    served = native_from_route(entry.common_properties.route_name)
    if served is not None:
        handover = _native_handover(services, entry, *served)
    elif struct is None:
        return False
    else:
        handover = Handover.from_metadata(info)
    if not handover.account:
        return False
    status = entry.response.response_code.value  # 0: the request ended without an answer
    body_bytes = entry.response.response_body_bytes
    content_type = entry.response.response_headers.get("content-type", "")
    headers = {":status": str(status), "content-type": content_type}
    path = settlement.answer_path(handover.observe, True, headers)
    report = RequestReport.from_handover(handover, stream=handover.stream, path=path.value)
    report.status = status
    report.backend = handover.backend or None
    report.provider_model = handover.provider_model or None
    report.attempts = entry.common_properties.upstream_request_attempt_count or 1
    # Every request released with its body is counted here (settlement.counted_by).
    report.count_request(services.runtime.config)
    if settlement.SETTLED_BY[path] is not Finisher.ACCESS_LOG:
        # A stream the observer followed: it has the tokens, the quota and the audit record.
        return True
    prompt = handover.prompt_tokens
    usage = None
    if 200 <= status < 300:
        usage = _usage(info)  # Envoy's json_to_metadata filter put it there, not the hand-over
        max_output = handover.output_estimate
        if usage is None and body_bytes == 0:
            usage = estimated(prompt, 0, max_output)  # nothing was delivered
        elif usage is None:
            # No usage report reached Envoy and nothing here read the answer: charge what the
            # request could have produced, so a team is never under-counted.
            usage = estimated(prompt, None, max_output)
            # A client that left before the report cut the stream short: not the backend's fault.
            if not entry.common_properties.response_flags.downstream_connection_termination:
                log.warning(_NO_STREAM_USAGE if handover.stream else _NO_USAGE, report.backend)
    trace = NO_TRACE
    if handover.traceparent:
        # A child of the request's span, which the downstream stage ended with the request.
        trace = services.tracing.request({"traceparent": handover.traceparent}, name="response")
    reservation = settlement.handed_back(services, handover)
    # status 0: the request ended without an answer (the client went away).
    settlement.settle(services, reservation, usage, status, status != 0, prompt, trace)
    # Envoy's own measure (the entry may arrive a batch later): request start to the answer's
    # last byte sent.
    last_byte = entry.common_properties.time_to_last_downstream_tx_byte
    if last_byte.seconds or last_byte.nanos:
        duration = last_byte.seconds + last_byte.nanos / 1e9
    else:
        duration = time.time() - report.started_at
    settlement.finish(services, report, usage, trace, duration)
    return True


def _native_handover(services: Services, entry: Any, team: str, model: str) -> Handover:
    """What the downstream stage would have handed over, for a request Envoy served on a
    native route (native.py): no count and no reservation; the answer's usage is the account.
    Without a usage report the request is charged its maximum, as on the strict path: the
    prompt estimated from the body's size, the output at quota.default_max_tokens."""
    cfg = services.runtime.config
    spec = cfg.models.get(model)
    target = routing.fixed_target(services.runtime, model, 0) if spec is not None else None
    if (team, model) not in native.served(cfg) and (team, model) not in _STALE_WARNED:
        # A reload changed the team, its rules, limits or guards, and Envoy's routes are
        # older: until they are rendered again, these requests are not admitted.
        _STALE_WARNED.add((team, model))
        reason = (
            native.why_not(cfg, team, model)
            if team in cfg.teams and spec is not None
            else "the team or the model is gone"
        )
        log.warning(_STALE_NATIVE, team, model, reason or "no JWT rule maps to the team now")
    start = entry.common_properties.start_time
    content_type = entry.response.response_headers.get("content-type", "")
    return Handover(
        team=team,
        # (Its user is not known here: a native route serves teams with no user budgets, and
        # the access log does not carry the token's claims.)
        organization=organization_of(cfg, team),
        model=model,
        endpoint=native.ENDPOINT_PATHS[spec.type] if spec is not None else "",
        stream=settlement.is_event_stream({"content-type": content_type}),
        prompt_tokens=-(-entry.request.request_body_bytes // 4),
        output_estimate=cfg.quota.default_max_tokens,
        started_at=start.seconds + start.nanos / 1e9,
        account=True,
        backend=target.backend if target is not None else "",
        provider_model=target.provider_model if target is not None else "",
    )


_STALE_WARNED: set[tuple[str, str]] = set()
_STALE_NATIVE = (
    "Envoy served team %s's request to %s on a native route, but by the current config: %s. "
    "Such requests are not admitted until Envoy's config is rendered again (extproc envoy) "
    "and Envoy restarted"
)


def _usage(info: dict[str, Any]) -> Usage | None:
    """The backend's usage report, as Envoy's json_to_metadata filter copied it."""
    if info.get("token_source") != SOURCE_PROVIDER or "prompt_tokens" not in info:
        return None
    prompt, completion = _int(info.get("prompt_tokens")), _int(info.get("completion_tokens"))
    total = _int(info.get("total_tokens")) or prompt + completion
    return Usage(
        prompt,
        completion,
        total,
        _int(info.get("cached_tokens")),
        reasoning_tokens=_int(info.get("reasoning_tokens")),
    )


def _int(value: Any) -> int:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return int(value)
    return 0
