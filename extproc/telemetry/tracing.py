"""Traces: one span per request in the sidecar, continuing the trace Envoy started.

Envoy's ext_proc filter sends the W3C `traceparent` of its own span in the gRPC call's
metadata when Envoy traces; a client's `traceparent` request header is the fallback. The
request span carries the OpenTelemetry GenAI attributes, its children the guard calls, the
quota operations and the backend choice.

Off (the default), or without the SDK (`pip install 'extproc[tracing]'`), every request gets
NO_TRACE, whose methods do nothing: no span, no context, no attribute is ever built.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider

    from ..config import TracingSettings

log = logging.getLogger("extproc.tracing")

_PROPAGATOR = TraceContextTextMapPropagator()
TRACEPARENT = "traceparent"

# OpenTelemetry GenAI semantic conventions (gen_ai.*), and ours (extproc.*).
# gen_ai.operation.name by the request's operation (wire.Operation's value), whatever its API.
OPERATION = {
    "chat": "chat",
    "completion": "text_completion",
    "embedding": "embeddings",
}


class RequestTrace:
    """The span of one request and the context its children start from."""

    __slots__ = ("context", "span", "tracer")

    def __init__(self, tracer: trace.Tracer, parent: Context | None, name: str) -> None:
        self.tracer = tracer
        self.span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER)
        self.context = trace.set_span_in_context(self.span, parent)

    def rename(self, name: str) -> None:
        self.span.update_name(name)

    def set(self, attributes: Mapping[str, Any]) -> None:
        self.span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    def start(self, name: str, attributes: Mapping[str, Any] | None = None) -> trace.Span:
        """A child span the caller ends (it may outlive the request: a settlement)."""
        span = self.tracer.start_span(name, context=self.context, kind=SpanKind.INTERNAL)
        if attributes:
            span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        return span

    @contextlib.contextmanager
    def child(self, name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
        span = self.start(name, attributes)
        try:
            yield span
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()

    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    def traceparent(self) -> str:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=self.context)
        return carrier.get(TRACEPARENT, "")

    def end(self, error: str | None = None) -> None:
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()


class _NoSpan:
    """What NO_TRACE hands out: accepts every span call, records nothing."""

    __slots__ = ()

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass

    def set_status(self, status: Any) -> None:
        pass

    def end(self) -> None:
        pass


NO_SPAN: Any = _NoSpan()


class _NoTrace:
    __slots__ = ()

    def rename(self, name: str) -> None:
        pass

    def set(self, attributes: Mapping[str, Any]) -> None:
        pass

    def start(self, name: str, attributes: Mapping[str, Any] | None = None) -> Any:
        return NO_SPAN

    @contextlib.contextmanager
    def child(self, name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
        yield NO_SPAN

    def trace_id(self) -> str:
        return ""

    def traceparent(self) -> str:
        return ""

    def end(self, error: str | None = None) -> None:
        pass


NO_TRACE: Any = _NoTrace()
Trace = RequestTrace | _NoTrace


class Tracing:
    """The sidecar's tracer, or none. Built once at start-up (tracing settings need a restart)."""

    def __init__(self, tracer: trace.Tracer | None, provider: TracerProvider | None = None):
        self.tracer = tracer
        self.provider = provider

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    def request(self, *carriers: Mapping[str, str], name: str = "ext_proc") -> Any:
        """A request's trace, continuing the first carrier that holds a traceparent."""
        if self.tracer is None:
            return NO_TRACE
        parent = None
        for carrier in carriers:
            if TRACEPARENT in carrier:
                parent = _PROPAGATOR.extract(carrier)
                break
        return RequestTrace(self.tracer, parent, name)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # flushes the spans still batched


DISABLED = Tracing(None)


def from_settings(settings: TracingSettings, provider: TracerProvider | None = None) -> Tracing:
    """The tracer the settings ask for. `provider` (tests) replaces the OTLP exporter."""
    if not settings.enabled:
        return DISABLED
    if provider is None:
        try:
            provider = _otlp_provider(settings)
        except ImportError:
            log.error(
                "tracing.enabled is true but the OpenTelemetry SDK or its OTLP exporter is "
                "not installed (pip install 'extproc[tracing]'): no spans are exported"
            )
            return DISABLED
    return Tracing(provider.get_tracer("extproc"), provider)


def _otlp_provider(settings: TracingSettings) -> TracerProvider:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    exporter = (
        OTLPSpanExporter(endpoint=settings.otlp_endpoint)
        if settings.otlp_endpoint
        else OTLPSpanExporter()
    )
    # Batched on the SDK's own thread: exporting never waits on the event loop's requests.
    provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing on: OTLP to %s", settings.otlp_endpoint or "the OTEL_EXPORTER_OTLP_* default")
    return provider
