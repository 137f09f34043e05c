"""The stream observer: follows a copy of an SSE response that Envoy does not hold back.

Envoy runs this stage in observability mode: it sends each chunk and moves on without waiting,
and ignores whatever the sidecar answers, so the stage answers nothing. It is instantiated only
for streaming requests the downstream stage marked `observe`, and follows the response only when
it is a successful event stream (settlement.observer_follows, the test by which the downstream
stage hands it over); an error body or a JSON answer stays with the downstream stage, or, for a
request the downstream stage released with its body, goes to the access log's reader.

Everything needed to settle arrives in the forwarded dynamic metadata, so the observer may run
in another sidecar process than the stage that reserved (the quota store must then be shared).
It settles what it follows, cut streams included (close): settlement.SETTLED_BY.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from . import settlement, wire
from .contract import METADATA_NAMESPACE, Handover
from .protocol import ProcessingRequest, answering_backend, header_dict, struct_dict
from .services import Services
from .sse import RelayedStream
from .streams import ACTIVE, StreamTiming
from .telemetry.report import RequestReport, model_label
from .telemetry.tracing import NO_TRACE

log = logging.getLogger("extproc.observer")


class ObservedStream:
    __slots__ = ("done", "handover", "relay", "report", "services", "timing", "trace")

    def __init__(self, services: Services) -> None:
        self.services = services
        self.relay: RelayedStream | None = None
        self.timing: StreamTiming | None = None
        self.handover: Handover | None = None  # from the metadata, when the stream starts
        self.done = False  # finished, or not ours to follow
        self.report: RequestReport | None = None
        self.trace: Any = NO_TRACE

    @property
    def finished(self) -> bool:
        """Nothing more to read: the server ends the call now rather than at Envoy's deferred
        close, so a finished stream holds nothing here."""
        return self.done

    async def handle(self, req: ProcessingRequest) -> None:
        if self.done:
            return
        kind = req.WhichOneof("request")
        if kind == "response_headers":
            msg = req.response_headers
            headers = header_dict(msg.headers)
            if not settlement.observer_follows(headers):
                # An error or a JSON answer: the downstream stage keeps it (or, for a request
                # released with its body, the access log's reader).
                self.done = True
                return
            self._start(req, headers)
            if msg.end_of_stream:
                self._finish()  # a stream with no body: nothing more will come
        elif kind == "response_body" and self.relay is not None:
            assert self.timing is not None
            msg = req.response_body
            self.timing.chunk()
            self.relay.feed(msg.body, msg.end_of_stream)
            if msg.end_of_stream:
                self._finish()

    def _start(self, req: ProcessingRequest, headers: dict[str, str]) -> None:
        struct = req.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
        # Plain Python values: a Struct's lists and nested objects are protobuf containers.
        info = struct_dict(struct, Handover.KEYS) if struct is not None else {}
        self.handover = handover = Handover.from_metadata(info)
        self.relay = wire.get(handover.wire).stream_relay(strip_usage_chunk=False)
        cfg = self.services.runtime.config
        # The request's start on this process's perf_counter clock, for time to first token.
        self.timing = StreamTiming(
            time.perf_counter() - (time.time() - handover.started_at),
            model_label(cfg, handover.model),
        )
        ACTIVE.opened()
        # The rest of the request's report: its first half came in the metadata.
        report = self.report = RequestReport.from_handover(handover)
        report.backend = answering_backend(req)
        status = headers.get(":status", "0")
        report.status = int(status) if status.isdigit() else 0
        attempts = headers.get("x-envoy-attempt-count", "1")
        report.attempts = int(attempts) if attempts.isdigit() else 1
        if not report.failover and report.attempts > 1:
            report.failover = "retry"
        target = self.services.runtime.targets.get((report.model or "", report.backend or ""))
        report.provider_model = target.provider_model if target is not None else None
        if handover.traceparent:
            # A child of the request's span, which the downstream stage ended at hand-over.
            self.trace = self.services.tracing.request(
                {"traceparent": handover.traceparent}, name="stream"
            )

    def failed(self) -> None:
        """Nothing to mark: Envoy never waits for the observer, the client got its answer."""

    def close(self) -> None:
        """The gRPC stream ended: a stream cut short settles what was delivered."""
        if self.relay is not None and not self.done:
            self._finish(complete=False)

    def _finish(self, complete: bool = True) -> None:
        self.done = True
        ACTIVE.closed()
        assert self.relay is not None and self.timing is not None
        handover, services = self.handover, self.services
        assert handover is not None
        # The most output the client allowed caps our own count (None: it set none).
        usage = settlement.stream_usage(
            self.relay, handover.prompt_tokens, services.tokens, handover.model, handover.output_cap
        )
        report = self.report
        assert report is not None
        settlement.settle(
            services,
            settlement.handed_back(services, handover),
            usage,
            report.status,
            complete,
            handover.prompt_tokens,
            self.trace,
        )
        duration = time.time() - report.started_at
        settlement.finish(
            services, report, usage, self.trace, duration, self.timing.as_metadata(None)
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "stream done team=%s model=%s %s %s",
                handover.team,
                handover.model,
                usage.as_metadata(),
                self.timing.as_metadata(usage.completion_tokens),
            )
