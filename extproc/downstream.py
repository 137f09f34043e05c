"""The downstream stage: one ext_proc stream of Envoy's HTTP filter = one HTTP request.

It only coordinates. The request's headers: identity.py (the team) and wire (the client's API
and endpoint). Its body: admission.py (validation, guards, count, reserve), then
request_plan.py (what Envoy is told). The answer: settlement.answer_path (who follows it), the
wire format's relay or JSON reader (usage), response guards (guard/answer.py). The end:
settlement.py (who settles, what is charged, the finish).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from . import identity, ownership, protocol, providers, request_plan, routing, settlement, wire
from .admission import Admission
from .batches import ObjectCall
from .contract import (
    ATTEMPTS_HEADER,
    JWT_NAMESPACE,
    METADATA_NAMESPACE,
    ROUTE_HEADER,
    TARGET_HEADER,
    TEAM_HEADER,
    TOKEN_HEADERS,
    TOKEN_SOURCE_HEADER,
    P,
)
from .errors import GatewayError, bad_request, check_content_type, too_large
from .guard import answer as answer_guards
from .guard import pipeline as guard
from .settlement import AnswerPath, Finisher
from .streams import ACTIVE, RELEASED, StreamTiming
from .telemetry.report import RequestReport, model_label
from .telemetry.tracing import NO_TRACE
from .wire import Operation
from .wire.base import TOKENLESS
from .wire.bridge import BridgedStream
from .wire.bridge import client_answer as bridge_answer
from .wire.openai import OPENAI, form
from .wire.openai.request import CHAT

if TYPE_CHECKING:
    from .config import ResolvedTarget
    from .guard.types import Verdict
    from .identity import Identity
    from .quota.service import Reservation
    from .request_plan import Admitted
    from .services import Services
    from .sse import RelayedStream
    from .usage import Usage
    from .wire import Endpoint, WireFormat

log = logging.getLogger("extproc.downstream")

_BAD_ANSWER = GatewayError(
    502, "The provider's answer could not be read", "server_error", "bad_provider_answer"
)


class DownstreamStream:
    """The HTTP filter stage: identity, admission, the plan, the answer's usage, the finish."""

    __slots__ = (
        "admission",
        "admitted",
        "answering",
        "api_headers",
        "backend",
        "deleting",
        "following",
        "form_boundary",
        "grpc_metadata",
        "known_backend",
        "native",
        "objects",
        "observe",
        "path",
        "provider",
        "provider_headers",
        "relay",
        "report",
        "retry_after",
        "route_span",
        "rt",
        "services",
        "started",
        "status",
        "stores",
        "stream_block_recorded",
        "strip_usage",
        "timing",
        "trace",
        "usage",
        "who",
        "wire",
    )

    def __init__(self, services: Services, grpc_metadata: Mapping[str, str] | None = None) -> None:
        self.services = services
        self.grpc_metadata = grpc_metadata or {}
        # One config for the whole request, even if a reload lands half-way through it.
        self.rt = services.runtime
        self.started = time.perf_counter()
        self.who: Identity | None = None  # the caller (identity.py), once authenticated
        # The client's API, from the request line; its error shape until then.
        self.wire: WireFormat = wire.DEFAULT
        self.admission: Admission | None = None  # from the request body on
        self.admitted: Admitted | None = None  # once admission passed
        self.backend: str | None = None
        self.status = 0
        self.relay: RelayedStream | None = None
        self.timing: StreamTiming | None = None
        self.following = False  # counted in ACTIVE until the stream ends
        self.strip_usage = False
        self.observe = False  # a stream the observer may follow instead of this stage
        # The answer's path as this stage knows it: LOGGED once the request is released with its
        # body (the access log's reader counts it; it or the observer settles it), OBSERVED
        # once the observer follows its answer, READ or INLINE when the answer passes here.
        self.path = AnswerPath.NO_ANSWER
        self.known_backend = False  # one backend serves the request: its headers are in metadata
        # A bridged API's client served as it speaks (RequestPlan.native): its backend's answer,
        # not Envoy's own reply, is in the client's API as it is.
        self.native = False
        self.stores = False  # the backend may store the answer for later calls (ownership.py)
        self.api_headers: list[str] = []  # the client's headers of its API's own (anthropic-*)
        self.deleting: tuple[str, str] | None = None  # (kind, id) of a stored object it deletes
        self.objects: ObjectCall | None = None  # a call of the Files or Batch API (batches.py)
        self.form_boundary: str | None = None  # a multipart body's, from its Content-Type
        self.provider = "openai"  # the API of the one backend: another's answer is translated
        self.provider_headers: Mapping[str, str] = {}  # its answer's headers, when translated
        # The target that answers: the one backend, or the one Envoy chose (known then).
        self.answering: ResolvedTarget | None = None
        self.retry_after = ""  # the backend's, for an answer the stage replaces
        self.stream_block_recorded = False
        # Reported when the stream closes; None for what is not an LLM call (GET /v1/models).
        self.report: RequestReport | None = RequestReport()
        self.trace: Any = NO_TRACE
        self.route_span: Any = None  # from the routing decision to the backend's answer
        self.usage: Usage | None = None

    @property
    def reservation(self) -> Reservation | None:
        # Read from the admission each time: a reservation may arrive after a cancellation.
        return self.admission.reservation if self.admission is not None else None

    async def handle(self, req: protocol.ProcessingRequest) -> protocol.ProcessingResponse:
        kind = req.WhichOneof("request")
        try:
            if kind == "request_headers":
                return await self.on_request_headers(req.request_headers, req.metadata_context)
            if kind == "request_body":
                return await self.on_request_body(req.request_body)
            if kind == "response_headers":
                return self.on_response_headers(req)
            if kind == "response_body":
                return await self.on_response_body(req.response_body)
        except GatewayError as err:
            return self.reject(err)
        # Trailers are not requested; answering keeps Envoy moving if a config asks for them.
        return protocol.passthrough(kind)

    @property
    def finished(self) -> bool:
        """No message will come after the last answer: the observer (at the response headers)
        or the access log's reader and the observer (with the request body) took it over."""
        return self.path in settlement.HANDED_OVER

    def failed(self) -> None:
        """The sidecar failed this stream (a bug): Envoy answers with the failure status."""
        if self.report is not None:
            self.report.status = self.rt.config.sidecar.failure_status
            self.report.code = "internal_error"

    def reject(self, err: GatewayError) -> protocol.ProcessingResponse:
        if self.relay is not None:
            # A stream has begun: an immediate response can no longer replace it. (A buffered
            # response's headers are still held, so a response guard can replace that one.)
            log.warning("error after the response started: %s", err)
            return protocol.passthrough("response_body")
        # The message may quote client input (a key fingerprint): log the code, not the text.
        team = self.who.team if self.who is not None else None
        log.info("rejected team=%s status=%s code=%s", team, err.status, err.code)
        if self.report is not None:
            self.report.status = err.status
            self.report.code = err.code or err.type
        return protocol.immediate_response(
            err.status,
            self.wire.error_body(err),
            headers=dict(err.headers),
            details=f"aigw_{err.code or err.type}",
        )

    # -- request ------------------------------------------------------------------------------

    async def on_request_headers(
        self, msg: Any, metadata: Any = None
    ) -> protocol.ProcessingResponse:
        headers = protocol.header_dict(msg.headers)
        report = self.report
        assert report is not None
        report.request_id = headers.get("x-request-id", "")[:128]
        tracing = self.services.tracing
        if tracing.enabled:
            # Envoy's span is the parent (its traceparent in the gRPC metadata); else the
            # client's, from the request headers.
            self.trace = tracing.request(self.grpc_metadata, headers)
            report.trace_id = self.trace.trace_id()
        verified = None
        if metadata is not None and JWT_NAMESPACE in metadata.filter_metadata:
            verified = protocol.struct_dict(metadata.filter_metadata[JWT_NAMESPACE])
        path = wire.normalized(headers.get(":path", ""))
        # The client's API from its path on: a refusal of its key is in its error shape.
        self.wire = wire.speaking(path)
        report.api = self.wire.name
        self.who = who = identity.authenticate(self.rt, headers, verified, self.services.keys)
        team = who.team
        report.identify(who)
        self.wire, endpoint, model_id = wire.route(headers.get(":method", ""), path)
        if endpoint.operation in (Operation.LIST_MODELS, Operation.GET_MODEL):
            self.report = None  # not an LLM call: no request metric, no audit record
            self.trace.end()
        if endpoint.operation is Operation.LIST_MODELS:
            return protocol.immediate_response(200, routing.list_models_body(self.rt, who))
        if endpoint.operation is Operation.GET_MODEL:
            assert model_id is not None
            body = routing.retrieve_model_body(self.rt, who, model_id)
            return protocol.immediate_response(200, body)
        if endpoint.operation is Operation.STORED:
            assert model_id is not None
            return await self._stored_call(endpoint, model_id, headers)
        if endpoint.operation is Operation.LIST_STORED:
            return self._list_call(endpoint, headers)

        check_content_type(headers.get("content-type"), endpoint.form)
        if endpoint.form:
            # The body is read with the boundary the backend will use (wire/openai/form.py).
            self.form_boundary = form.boundary(headers.get("content-type"))
        limit = self.rt.config.sidecar.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large(limit)
        if msg.end_of_stream:
            raise bad_request("The request has no body", "missing_body")
        if endpoint.operation in (Operation.UPLOAD, Operation.BATCH):
            objects = self.objects = ObjectCall(self.services, self.rt, who, endpoint, report)
            return protocol.request_headers_response(
                protocol.common({}, self._client_headers(headers, objects))
            )
        self.admission = Admission(
            self.services, self.rt, self.wire, endpoint, who, report, self.trace
        )

        prefix = self.wire.own_header_prefix
        # The client API's own headers, for a backend that speaks it (removed at the plan when
        # the request is translated).
        self.api_headers = [h for h in headers if prefix and h.startswith(prefix)]
        remove = self._client_headers(headers)
        if "accept-encoding" in headers:
            # The sidecar reads the answer (usage, response guards): a compressed body would
            # go uncounted and unguarded. Envoy or the client side may compress it again.
            remove.append("accept-encoding")
        return protocol.request_headers_response(protocol.common({TEAM_HEADER: team}, remove))

    async def on_request_body(self, msg: Any) -> protocol.ProcessingResponse:
        if self.objects is not None and self.objects.endpoint.operation in (
            Operation.UPLOAD,
            Operation.BATCH,
        ):
            return await self._object_body(self.objects, msg.body)
        if self.admission is None:
            # A call on a stored object, answered at its headers: its body (a cancel's) goes on.
            return protocol.passthrough("request_body")
        assert self.report is not None
        if self.form_boundary is not None:
            form.check_opening(msg.body, self.form_boundary)
        if self.admission.endpoint.operation is Operation.COUNT_TOKENS:
            return await self._count_tokens(msg.body)
        admitted = await self.admission.admit(msg.body, self.started)
        self.admitted = admitted
        model, pool, report = admitted.request.model, admitted.pool, self.report
        target = routing.fixed_target(self.rt, model, pool)
        if target is not None and target.token_from is not None:
            target = routing.with_token(target, self.services.backend_tokens)
        self.answering = target
        guarded_stream = admitted.request.stream and admitted.response_guards
        plan = request_plan.plan(
            admitted,
            target,
            self.rt.config.sidecar,
            model in self.rt.adapted,
            model not in self.rt.unasked_usage,
            routing.served_natively(self.rt, model, target, self.wire, guarded_stream),
            self.rt.config.records_shared,
        )
        self.observe, self.strip_usage, self.native = plan.observe, plan.strip_usage, plan.native
        self.stores = plan.stores
        self.known_backend = target is not None
        route_attributes: dict[str, Any] = {"extproc.model": model, "extproc.pool": pool}
        if target is not None:
            self.provider = report.provider = target.provider
            report.backend = target.backend
            report.provider_model = target.provider_model
            route_attributes["extproc.backend"] = target.backend
        if pool:
            report.failover = "quota"
        self.route_span = self.trace.start("route", route_attributes)
        answer = protocol.request_body_response(
            protocol.common(
                plan.set_headers,
                plan.remove_headers if plan.native else plan.remove_headers + self.api_headers,
                body=plan.body,
                clear_route_cache=True,
            ),
            dynamic_metadata=plan.metadata,
        )
        # Only now: a failure before this point is still this stage's to count and settle.
        self.path = plan.path
        if plan.release:
            RELEASED.add()
        return answer

    async def _stored_call(
        self, endpoint: Endpoint, object_id: str, headers: dict[str, str]
    ) -> protocol.ProcessingResponse:
        """A call on a stored object (a Response, a file, a batch) goes, as the client sent it,
        to the backend that stores it: only for the team that owns it (ownership.py), whose
        model still routes there."""
        assert self.who is not None and self.report is not None
        report = self.report
        report.endpoint = endpoint.path
        kind = endpoint.kind
        owner = await ownership.owned(self.services.quota.store, kind, object_id, self.who.team)
        report.model = owner.model
        target = routing.fixed_target(self.rt, owner.model)
        if (
            target is None
            or target.backend != owner.backend
            or not self.who.may_use(self.rt, owner.model)
        ):
            # The config changed since: the gateway no longer reaches it for this team.
            raise ownership.unknown(kind, object_id)
        if target.token_from is not None:
            target = routing.with_token(target, self.services.backend_tokens)
        set_headers = self._routed(target, owner.model)
        if owner.model in self.rt.adapted:
            # (Its routes leave the path to the sidecar; the query string goes as it came.)
            raw = headers.get(":path", "")
            set_headers[":path"] = target.base_path + raw.removeprefix("/v1")
        if headers.get(":method") == "DELETE":
            self.deleting = (kind, object_id)
        objects = None
        if kind in (ownership.FILE, ownership.BATCH):
            objects = ObjectCall(self.services, self.rt, self.who, endpoint, report, owner)
            self.objects = objects
        return protocol.request_headers_response(
            protocol.common(
                set_headers, self._client_headers(headers, objects), clear_route_cache=True
            )
        )

    def _list_call(
        self, endpoint: Endpoint, headers: dict[str, str]
    ) -> protocol.ProcessingResponse:
        """A list of files or batches: from the backend of the team's batches, the answer
        keeping only the team's own (batches.py)."""
        assert self.who is not None and self.report is not None
        self.report.endpoint = endpoint.path
        objects = self.objects = ObjectCall(self.services, self.rt, self.who, endpoint, self.report)
        prepared = objects.listing(headers.get(":path", ""))
        set_headers = self._routed(prepared.target, prepared.target.model)
        if prepared.path is not None:
            set_headers[":path"] = prepared.path
        return protocol.request_headers_response(
            protocol.common(
                set_headers, self._client_headers(headers, objects), clear_route_cache=True
            )
        )

    async def _object_body(self, objects: ObjectCall, raw: bytes) -> protocol.ProcessingResponse:
        """An upload's or a batch's body, read and checked before it goes on (batches.py)."""
        if objects.endpoint.operation is Operation.UPLOAD:
            assert self.form_boundary is not None
            prepared = await objects.upload(raw, self.form_boundary)
        else:
            prepared = await objects.create_batch(raw)
        set_headers = self._routed(prepared.target, prepared.target.model)
        if prepared.body is not None:
            set_headers["content-length"] = str(len(prepared.body))
        if prepared.content_type is not None:
            set_headers["content-type"] = prepared.content_type
        return protocol.request_body_response(
            protocol.common(set_headers, body=prepared.body, clear_route_cache=True)
        )

    def _routed(self, target: ResolvedTarget, model: str) -> dict[str, str]:
        """The headers that send the call to the target's backend, through the model's route,
        with the backend's credential; the target is the one that answers."""
        assert self.report is not None
        self.answering, self.known_backend = target, True
        self.provider = self.report.provider = target.provider
        self.report.backend, self.report.provider_model = target.backend, target.provider_model
        set_headers = {ROUTE_HEADER: model, TARGET_HEADER: target.backend}
        if target.credential is not None:
            set_headers[target.auth_header] = target.credential
        return set_headers

    @staticmethod
    def _client_headers(headers: Mapping[str, str], objects: ObjectCall | None = None) -> list[str]:
        """What of the client's headers never goes on: its credentials, the gateway's own; for
        a Files or Batch API call whose answer the gateway reads, its accept-encoding (a
        compressed answer could not be read)."""
        remove = identity.spoofed_headers(headers) + identity.credentials_headers(headers)
        remove = [h for h in remove if h != TEAM_HEADER]
        if objects is not None and objects.reads_answer and "accept-encoding" in headers:
            remove.append("accept-encoding")
        return remove

    async def _count_tokens(self, raw: bytes) -> protocol.ProcessingResponse:
        """The gateway answers a token count itself, with the count it reserves by: no model
        is asked (and none is charged)."""
        assert self.admission is not None and self.report is not None
        counted = await self.admission.count_only(raw)
        self.status = self.report.status = 200
        return protocol.immediate_response(
            200, self.wire.token_count_body(counted.tokens), details="aigw_token_count"
        )

    # -- response -----------------------------------------------------------------------------

    def on_response_headers(self, req: Any) -> protocol.ProcessingResponse:
        msg = req.response_headers
        headers = protocol.header_dict(msg.headers)
        self.status = int(headers.get(":status", "0") or 0)
        self.retry_after = headers.get("retry-after", "")
        if self.deleting is not None and 200 <= self.status < 300:
            ownership.forget_later(self.services.quota.store, *self.deleting)
        self.backend = protocol.answering_backend(req)
        # Team, model, rate limits (and the backend, when one serves the model) are rendered
        # by Envoy from the request's metadata; only what Envoy chose is added here.
        set_headers = {}
        if not self.known_backend:
            answering = self.answering = self._chosen()
            set_headers = self._backend_headers(answering)
            if answering is not None and answering.provider != self.provider:
                # Envoy chose among backends of several APIs: the answer is the chosen one's.
                self.provider = answering.provider
                if self.report is not None:
                    self.report.provider = answering.provider
        if not protocol.from_backend(req):
            self.native = False  # Envoy's own reply is OpenAI's (its local reply mappers)
        if self.provider != "openai" and not protocol.from_backend(req):
            # Envoy's own reply (a timeout, a reset) or the upstream stage's refusal: already
            # the gateway's OpenAI error, nothing of the provider's to translate.
            self.provider = "openai"
        if self.provider != "openai":
            self.provider_headers = headers  # what a translation may read (a token count)
            content_type = headers.get("content-type", "")
            if providers.is_stream(self.provider, content_type) and not settlement.is_event_stream(
                headers
            ):
                # (Bedrock's binary event stream: the client gets OpenAI's server-sent events.)
                headers["content-type"] = set_headers["content-type"] = "text/event-stream"
        attempts = headers.get("x-envoy-attempt-count", "1")
        report = self.report
        if report is not None:
            report.status = self.status
            report.backend = self.backend
            if not self.known_backend:
                report.provider_model = set_headers.get(f"{P}provider-model")
            report.attempts = int(attempts) if attempts.isdigit() else 1
        pool = self.admitted.pool if self.admitted is not None else 0
        if not pool and attempts.isdigit() and int(attempts) > 1:
            # Envoy retried this request on another pool: the client should know it happened.
            set_headers[f"{P}failover"] = "true"
            set_headers[ATTEMPTS_HEADER] = attempts
            if report is not None:
                report.failover = "retry"
        if self.route_span is not None:
            self.route_span.set_attributes(
                {
                    "extproc.backend": self.backend or "",
                    "extproc.attempts": int(attempts) if attempts.isdigit() else 1,
                    "http.response.status_code": self.status,
                }
            )
            self.route_span.end()
            self.route_span = None
        mode = None
        # Known now, and in the access log even when the response never completes.
        metadata = {METADATA_NAMESPACE: {"backend": self.backend or "", "status": self.status}}
        path = self.path = settlement.answer_path(self.observe, False, headers, msg.end_of_stream)
        if report is not None:
            report.path = path.value
        if path is AnswerPath.OBSERVED:
            # The observer follows the body from here on, without holding a chunk back; it
            # decided so on these same headers (it sees them first: the response path runs
            # the filters in reverse order).
            mode = protocol.OBSERVED_RESPONSE
        elif self.objects is not None and not self.objects.reads_answer:
            mode = protocol.OBSERVED_RESPONSE  # (a file's content: nothing to read)
        elif path is AnswerPath.INLINE:
            self.relay = self._stream_relay()
            self.timing = StreamTiming(self.started, self._model_label())
            self.following = True
            ACTIVE.opened()
            mode = protocol.STREAMED_RESPONSE
        return protocol.response_headers_response(
            protocol.common(set_headers) if set_headers else None,
            mode_override=mode,
            dynamic_metadata=metadata,
        )

    async def on_response_body(self, msg: Any) -> protocol.ProcessingResponse:
        if self.relay is not None:
            assert self.timing is not None
            self.timing.chunk()
            # The fast path: None relays the chunk untouched; bytes replace it (only when the
            # usage report the client did not ask for is being cut out).
            out = self.relay.feed(msg.body, msg.end_of_stream)
            common = protocol.common(body=out) if out is not None else None
            if self.relay.blocked is not None:
                self._record_stream_block(self.relay.blocked)
            if self.relay.error_code is not None and self.report is not None:
                # The backend failed the stream after it began (an error event): the request
                # ends as that error, not as served.
                self.report.code = f"provider_error:{self.relay.error_code}"
            if not msg.end_of_stream:
                if self.usage is None and (self.relay.usage is not None or self.relay.finished):
                    # The backend's usage report, or [DONE] without one: settle and tell the
                    # access log now, with the chunk that brings it. A client may close at
                    # [DONE] (the openai SDK does), before the stream's last message is
                    # answered; the access log then has no usage (seen in CI).
                    usage = self._stream_usage()
                    if usage is not None:
                        self.usage = usage
                        self._settle(usage)
                        return protocol.response_body_response(
                            common, dynamic_metadata=self._stream_metadata(usage)
                        )
                return protocol.response_body_response(common)
            if self.relay.usage is not None or self.usage is None:
                self.usage = self._stream_usage()  # (an estimate made at [DONE] stands)
            usage = self.usage
            self._settle(usage)
            self._end_stream()
            if self.native and self.relay.error_code is None:
                # (A native Responses stream names its Response in its first event.)
                self._remember(getattr(self.relay, "response_id", None))
            return protocol.response_body_response(
                common, dynamic_metadata=self._stream_metadata(usage)
            )

        raw = msg.body
        if self.objects is not None:
            body = await self.objects.answered(self.status, raw)
            if body is None:
                return protocol.response_body_response(None)
            replaced = protocol.common({"content-length": str(len(body))}, body=body)
            return protocol.response_body_response(replaced)
        answer = self._answer(raw)
        if isinstance(answer, protocol.ProcessingResponse):
            # A refusal or failure served no tokens; a generation the provider ended as
            # failed is charged what it reported spending (an incomplete answer).
            self._settle(self.usage, complete=self.usage is None)
            return answer  # the provider's error, in the client's shape and a status it knows
        body, openai_raw, reported = answer
        reader = wire.DEFAULT if openai_raw is not None else self.wire
        usage = self.usage = reported or self._buffered_usage(openai_raw or raw, reader)
        self._settle(usage)
        if self.native and 200 <= self.status < 300:
            self._remember(self.wire.stored_object(raw))
        admission = self.admission
        if admission is not None and admission.response_guards and 200 <= self.status < 300:
            # The tokens were spent (settled above) whatever the guards decide now.
            body = await answer_guards.judge(admission, body or raw) or body
        set_headers = {}
        if body is not None:
            set_headers["content-length"] = str(len(body))
        if usage is not None:
            counts = (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
            set_headers.update(zip(TOKEN_HEADERS, map(str, counts), strict=True))
            set_headers[TOKEN_SOURCE_HEADER] = usage.source
        return protocol.response_body_response(
            protocol.common(set_headers, body=body) if set_headers or body else None,
            dynamic_metadata=self._usage_metadata(usage),
        )

    def _remember(self, object_id: str | None) -> None:
        """The team owns the object its native answer had the backend store (ownership.py)."""
        admitted = self.admitted
        backend = self.backend or (self.answering.backend if self.answering else None)
        if object_id is None or admitted is None or not backend or not self.stores:
            return
        if admitted.request.body.get("store") is False:
            return
        owner = ownership.Owner(admitted.who.team, admitted.request.model, backend)
        ownership.remember(self.services.quota.store, ownership.RESPONSE, object_id, owner)

    def _native(self) -> bool:
        """The answer is in the client's API as it is: an OpenAI client's from an OpenAI-bodied
        backend, or a bridged client's from a backend that speaks its API."""
        bridge = self.wire.bridge
        if bridge is None:
            return self.provider == "openai"  # (Azure's errors are made OpenAI's)
        return self.native

    def _answer(
        self, raw: bytes
    ) -> tuple[bytes | None, bytes | None, Usage | None] | protocol.ProcessingResponse:
        """A whole answer as the client's: (its body, None when it is the backend's as it is;
        the answer as OpenAI's when the gateway reads it so, None when it reads the client's;
        the usage the provider reported, None: read it from the answer). A status the client
        does not know (a provider's 529, a translation that failed) is an immediate answer."""
        admitted = self.admitted
        if admitted is None or self._native():
            return None, None, None
        status, openai_raw, reported = self.status, raw, None
        if self.provider != "openai":
            # (A bridged client's answer from an OpenAI backend is already chat completions.)
            status, translated, reported = self._provider_answer(raw)
            if translated is not None:
                openai_raw = translated
        body: bytes | None = openai_raw if openai_raw is not raw else None
        bridge = self.wire.bridge
        if bridge is not None:
            try:
                body = bridge_answer(
                    self.wire, status, openai_raw, self._served(), admitted.request.body
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("backend %s sent a 2xx body that is not a chat completion",
                            self.backend)  # fmt: skip
                status, body, reported = 502, self.wire.error_body(_BAD_ANSWER), None
        if status != self.status and body is not None:
            # (529, Anthropic's "overloaded": 503, retriable for any OpenAI client; a failed
            # generation's 502, with what it spent.)
            self.usage = reported
            self.status = status
            if self.report is not None:
                self.report.status = status
            headers = {"retry-after": self.retry_after} if self.retry_after else None
            return protocol.immediate_response(
                status, body, headers=headers, details="aigw_provider_error"
            )
        return body, openai_raw if bridge is not None or body is not None else None, reported

    def _provider_answer(self, raw: bytes) -> tuple[int, bytes | None, Usage | None]:
        """A provider's whole answer in OpenAI's shape: (status, body, None when it is OpenAI's
        already; the usage the provider reported, None: read it from the answer)."""
        assert self.admitted is not None
        try:
            request = self.admitted.request
            endpoint = request.endpoint.path if self.wire.bridge is None else CHAT.path
            return providers.answer_and_usage(
                self.provider,
                self._served(),
                self.status,
                raw,
                endpoint,
                self.provider_headers,
                request.body.get("encoding_format"),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("backend %s sent a 2xx body that is not its API's JSON", self.backend)
            return 502, wire.DEFAULT.error_body(_BAD_ANSWER), None

    def _stream_relay(self) -> RelayedStream:
        """The relay of a stream that passes this stage. Every stream is read as OpenAI's
        chunks (usage, text, response guards), but one that is in the client's API as it is:
        a provider's events are made OpenAI's first, a bridged client's chunks made its own
        last (wire/bridge.py). A guarded stream is judged as chat chunks, but one in an API
        with a guarded relay of its own events, served natively (WireFormat.own_guarded_relay)."""
        admitted = self.admitted
        guards = self.admission.response_guards if self.admission is not None else ()
        guarded = bool(guards) and admitted is not None and 200 <= self.status < 300
        if admitted is None or (not guarded and self._native()):
            return self.wire.stream_relay(self.strip_usage)
        own_guarded = self.wire.own_guarded_relay
        if guarded and self._native() and own_guarded is not None:
            # The API's own events, judged as they are (Anthropic's: its text deltas masked).
            return own_guarded(*guard.stream_finder(guards))
        bridge = self.wire.bridge
        strip = self.strip_usage and bridge is None  # a bridge reads the usage chunk itself
        inner: RelayedStream
        if guarded:
            find, holdback, owners = guard.stream_finder(guards)
            endpoint = admitted.request.endpoint if bridge is None else CHAT
            inner = OPENAI.guarded_stream_relay(endpoint, strip, find, holdback, owners)
        else:
            inner = OPENAI.stream_relay(strip)
        if self.provider != "openai":
            # The provider's events become OpenAI's before the relay reads them.
            inner = providers.stream_relay(self.provider, self._served(), inner)
        if bridge is None:
            return inner
        prompt = self.admission.prompt_tokens if self.admission is not None else 0
        translator = bridge.stream(self._served(), prompt, admitted.request.body)
        return BridgedStream(inner, translator)

    def _record_stream_block(self, verdict: Verdict) -> None:
        if not self.stream_block_recorded and self.admission is not None:
            self.stream_block_recorded = True
            self.admission.record("response", [verdict])
            if self.report is not None:
                # The stream was cut by the guard: the request ends as a block.
                self.report.code = f"guard_blocked:{verdict.guard}"

    # -- the end ------------------------------------------------------------------------------

    def _settle(self, usage: Usage | None, complete: bool = True) -> None:
        prompt = self.admission.prompt_tokens if self.admission is not None else 0
        settlement.settle(
            self.services, self.reservation, usage, self.status, complete, prompt, self.trace
        )

    def _end_stream(self) -> None:
        if self.following:
            self.following = False
            ACTIVE.closed()

    def close(self) -> None:
        """The stream ended: finish the request unless another stage does (SETTLED_BY); an
        answer that never completed is charged what was delivered."""
        if self.admission is not None:
            self.admission.abandon()
        self._end_stream()
        report, self.report = self.report, None  # once
        if self.route_span is not None:
            self.route_span.end()  # no answer came
        settles = self.path not in settlement.HANDED_OVER
        if settles:
            if self.relay is not None and self.usage is None:
                # A stream cut short: the usage event never came, so count what was delivered.
                self.usage = self._stream_usage()
            self._settle(self.usage, complete=False)  # a no-op when the answer settled it
        if report is None:
            return
        if settlement.counted_by(self.path is AnswerPath.LOGGED) is Finisher.DOWNSTREAM:
            report.count_request(self.rt.config)
        if settles:
            timing = self.timing.as_metadata(None) if self.timing is not None else None
            duration = time.perf_counter() - self.started
            settlement.finish(self.services, report, self.usage, self.trace, duration, timing)
        elif self.trace is not NO_TRACE:
            # The request's span ends at the hand-over; the finisher's span is its child.
            if self.path is AnswerPath.LOGGED:
                self.trace.set(
                    {
                        "extproc.backend": report.backend,
                        "gen_ai.response.model": report.provider_model,
                    }
                )
            else:
                self.trace.set({"http.response.status_code": self.status})
            self.trace.end()

    # -- the answer's usage -------------------------------------------------------------------

    def _model_label(self) -> str:
        model = self.admitted.request.model if self.admitted is not None else None
        return model_label(self.rt.config, model)

    def _stream_usage(self) -> Usage | None:
        assert self.relay is not None
        admitted = self.admitted
        if admitted is None:
            return self.relay.usage
        return settlement.stream_usage(
            self.relay,
            admitted.prompt_tokens,
            self.services.tokens,
            admitted.request.model,
            admitted.request.output_cap,
        )

    def _buffered_usage(self, raw: bytes, reader: WireFormat) -> Usage | None:
        admitted = self.admitted
        if admitted is None or not 200 <= self.status < 300:
            return None
        if admitted.request.endpoint.operation in TOKENLESS and raw[:1] != b"{":
            # (Speech's audio, a transcription as text: no usage report to read.)
            return None
        try:
            response = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("backend %s sent a 2xx body that is not JSON", self.backend)
            return None
        usage = reader.answer_usage(response)
        if usage is not None:
            return usage
        completion = reader.answer_text(response)
        return settlement.estimate(
            admitted.prompt_tokens,
            self.services.tokens,
            admitted.request.model,
            completion,
            admitted.request.output_cap,
        )

    def _served(self) -> str:
        """The model that served a translated answer, as the answer names it: the provider's
        name for it, as an OpenAI backend's answer names its own."""
        assert self.admitted is not None
        answering = self.answering
        return answering.provider_model if answering is not None else self.admitted.request.model

    def _chosen(self) -> ResolvedTarget | None:
        """The target of the backend Envoy chose (a pooled or canary model)."""
        if self.admitted is None or not self.backend:
            return None
        return self.rt.targets.get((self.admitted.request.model, self.backend))

    def _backend_headers(self, answering: ResolvedTarget | None) -> dict[str, str]:
        """The backend Envoy chose and the model name it got."""
        out: dict[str, str] = {}
        if self.backend:
            out[f"{P}backend"] = self.backend
            if answering is not None:
                out[f"{P}provider-model"] = answering.provider_model
        return out

    def _stream_metadata(self, usage: Usage | None) -> dict[str, Any]:
        assert self.timing is not None
        metadata = self._usage_metadata(usage)
        metadata[METADATA_NAMESPACE].update(
            self.timing.as_metadata(usage.completion_tokens if usage else None)
        )
        return metadata

    def _usage_metadata(self, usage: Usage | None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "backend": self.backend or "",
            "status": self.status,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 3),
        }
        if usage is not None:
            data.update(usage.as_metadata())
        return {METADATA_NAMESPACE: data}
