"""One ext_proc stream = one HTTP request. These classes only orchestrate: each phase hands the
work to the module that owns it (identity, wire, tokens, routing, usage, sse)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from . import identity, protocol, request_plan, routing, settlement, wire
from .contract import (
    ATTEMPTS_HEADER,
    BACKEND_METADATA,
    METADATA_NAMESPACE,
    TEAM_HEADER,
    TOKEN_HEADERS,
    TOKEN_SOURCE_HEADER,
    P,
)
from .errors import GatewayError, bad_request, check_content_type, too_large
from .guard import pipeline as guard
from .guard.texts import Slot, conversation
from .quota.policy import Amounts, applicable
from .quota.service import requested_output
from .request_plan import Admitted
from .services import Services
from .settlement import AnswerPath, Finisher
from .sse import RelayedStream
from .streams import ACTIVE, RELEASED, StreamTiming
from .telemetry.report import (
    OFF_LOOP_CHARS,
    RequestReport,
    model_label,
    prompt_fields,
    verdict_entries,
)
from .telemetry.tracing import NO_TRACE, OPERATION
from .usage import Usage
from .wire import Endpoint, Operation, ParsedRequest, WireFormat

if TYPE_CHECKING:
    from .config import ResolvedTarget
    from .guard.pipeline import CompiledGuard
    from .guard.types import Verdict
    from .quota.policy import LimitSpec
    from .quota.service import Reservation

log = logging.getLogger("extproc.processor")


class DownstreamStream:
    """The HTTP filter stage: identity, validation, counting, the routing decision, usage."""

    __slots__ = (
        "backend",
        "closed",
        "endpoint",
        "following",
        "grpc_metadata",
        "known_backend",
        "max_output",
        "observe",
        "output_cap",
        "path",
        "pool",
        "prompt",
        "prompt_turns",
        "relay",
        "report",
        "request",
        "reservation",
        "response_guards",
        "route_span",
        "rt",
        "services",
        "started",
        "status",
        "stream_block_recorded",
        "strip_usage",
        "team",
        "timing",
        "trace",
        "usage",
        "wire",
    )

    def __init__(self, services: Services, grpc_metadata: Mapping[str, str] | None = None) -> None:
        self.services = services
        self.grpc_metadata = grpc_metadata or {}
        # One config for the whole request, even if a reload lands half-way through it.
        self.rt = services.runtime
        self.started = time.perf_counter()
        self.team: str | None = None
        self.endpoint: Endpoint | None = None
        # The client's API, from the request line; its error shape until then.
        self.wire: WireFormat = wire.DEFAULT
        self.request: ParsedRequest | None = None
        self.prompt: Any = None  # TokenCount of the prompt
        # The most output the request may produce (reserved; the cap of our own count).
        self.max_output: int | None = None
        # The most output the client allowed (the backend was told): the cap of our own count.
        self.output_cap: int | None = None
        self.backend: str | None = None
        self.status = 0
        self.relay: RelayedStream | None = None
        self.timing: StreamTiming | None = None
        self.following = False  # counted in ACTIVE until the stream ends
        self.reservation: Reservation | None = None
        self.strip_usage = False
        self.observe = False  # a stream the observer may follow instead of this stage
        # The answer's path as this stage knows it: LOGGED once the request is released with its
        # body (the access log's reader counts it; it or the observer settles it), OBSERVED
        # once the observer follows its answer, READ or INLINE when the answer passes here.
        self.path = AnswerPath.NO_ANSWER
        self.known_backend = False  # one backend serves the request: its headers are in metadata
        self.response_guards: tuple[CompiledGuard, ...] = ()
        self.prompt_turns: list[dict[str, str]] | None = None  # for judging the response
        self.stream_block_recorded = False
        self.closed = False
        self.pool = 0  # 1 when a quota failover pinned the request to the next pool
        # Reported when the stream closes; None for what is not an LLM call (GET /v1/models).
        self.report: RequestReport | None = RequestReport()
        self.trace: Any = NO_TRACE
        self.route_span: Any = None  # from the routing decision to the backend's answer
        self.usage: Usage | None = None

    async def handle(self, req: protocol.ProcessingRequest) -> protocol.ProcessingResponse:
        kind = req.WhichOneof("request")
        try:
            if kind == "request_headers":
                return self.on_request_headers(req.request_headers)
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
        return settlement.SETTLED_BY[self.path] is not Finisher.DOWNSTREAM

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
        log.info("rejected team=%s status=%s code=%s", self.team, err.status, err.code)
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

    def on_request_headers(self, msg: Any) -> protocol.ProcessingResponse:
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
        self.team = identity.authenticate(self.rt, headers)
        report.team = self.team
        self.wire, endpoint, model_id = wire.route(
            headers.get(":method", ""), headers.get(":path", "")
        )
        self.endpoint = endpoint
        if endpoint.operation in (Operation.LIST_MODELS, Operation.GET_MODEL):
            self.report = None  # not an LLM call: no request metric, no audit record
            self.trace.end()
        if endpoint.operation is Operation.LIST_MODELS:
            return protocol.immediate_response(200, routing.list_models_body(self.rt, self.team))
        if endpoint.operation is Operation.GET_MODEL:
            assert model_id is not None
            body = routing.retrieve_model_body(self.rt, self.team, model_id)
            return protocol.immediate_response(200, body)

        check_content_type(headers.get("content-type"))
        limit = self.rt.config.sidecar.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large(limit)
        if msg.end_of_stream:
            raise bad_request("The request has no body", "missing_body")

        remove = identity.spoofed_headers(headers) + identity.credentials_headers(headers)
        remove = [h for h in remove if h != TEAM_HEADER]
        if "accept-encoding" in headers:
            # The sidecar reads the answer (usage, response guards): a compressed body would
            # go uncounted and unguarded. Envoy or the client side may compress it again.
            remove.append("accept-encoding")
        return protocol.request_headers_response(protocol.common({TEAM_HEADER: self.team}, remove))

    async def on_request_body(self, msg: Any) -> protocol.ProcessingResponse:
        assert self.endpoint is not None and self.team is not None
        limit = self.rt.config.sidecar.max_body_bytes
        if len(msg.body) > limit:
            raise too_large(limit)
        parsed = self.wire.parse(self.endpoint, msg.body)
        report = self.report
        assert report is not None
        # The client's words, kept for the audit record only (metric labels use config names).
        report.model = parsed.model[:256]
        report.endpoint = self.endpoint.path
        report.stream = parsed.stream
        if self.trace is not NO_TRACE:
            self._trace_request(parsed, report.model)
        routing.check_model(self.rt, self.team, parsed.model, self.endpoint)
        self.request = parsed
        self.max_output = requested_output(parsed, self.rt.config.quota.default_max_tokens)
        self.output_cap = parsed.output_cap
        request_guards, self.response_guards = self.services.guards.lists(self.team, parsed.model)
        slots = self.wire.request_slots(self.endpoint, parsed.body) if request_guards else []
        # Local guards first, masking in place: what they remove never leaves the gateway.
        if request_guards:
            with self.trace.child("guards local", {"extproc.guard.stage": "request"}):
                verdicts = await guard.run_local_async(request_guards, slots)
        else:
            verdicts = []
        self._stop_if_blocked(verdicts, "request")
        counting = time.perf_counter()
        self.prompt = await self._count_prompt(parsed)
        counted_s = time.perf_counter() - counting
        self._check_prompt_size(request_guards, verdicts)
        external = await self._external_guards_and_reserve(parsed, request_guards, slots, verdicts)
        verdicts += external
        changed = any(v.action == "rewrite" for v in verdicts)
        if guard.apply_rewrites(external, slots):
            changed = True
            # The prompt the backend will get is the rewritten one: count and size it again.
            # One budget per request: the recount gets what the first count left.
            left = max(0.0, self.services.tokens.budget_s - counted_s)
            self.prompt = await self._count_prompt(parsed, left)
            self._check_prompt_size(request_guards, verdicts)
        self._record("request", verdicts)
        if self.trace is not NO_TRACE:
            self.trace.set({"extproc.prompt_tokens_estimate": self.prompt.tokens})
        audit = self.services.audit
        if audit is not None:
            slots = slots or self.wire.request_slots(self.endpoint, parsed.body)
            texts = [s.get() for s in slots]
            include = self.rt.config.observability.audit.include_prompt
            # Masking every PII kind costs ~0.1 ms per 1,000 characters: off the loop sooner.
            if sum(len(t) for t in texts) > (OFF_LOOP_CHARS // 8 if include else OFF_LOOP_CHARS):
                report.prompt = await asyncio.to_thread(prompt_fields, texts, include)
            else:
                report.prompt = prompt_fields(texts, include)
        if self.response_guards and any(not g.local for g in self.response_guards):
            # A response is judged in the context of the prompt (as the backend received it).
            slots = slots or self.wire.request_slots(self.endpoint, parsed.body)
            self.prompt_turns = conversation(slots)
        res = self.reservation
        admitted = Admitted(
            team=self.team,
            request=parsed,
            wire=self.wire,
            prompt_tokens=self.prompt.tokens,
            max_output=self.max_output,
            body_changed=changed,
            response_guards=bool(self.response_guards),
            pool=self.pool,
            reservation=res.id if res is not None else "",
            limits=tuple(spec.name for spec in res.specs) if res is not None else (),
            rate_headers=self.services.quota.rate_headers(res.specs, res.states)
            if res is not None
            else None,
            started_at=time.time() - (time.perf_counter() - self.started),
            traceparent=self.trace.traceparent() if self.trace is not NO_TRACE else "",
            audit=report.handover() if audit is not None else None,
        )
        target = routing.fixed_target(self.rt, parsed.model, self.pool)
        plan = request_plan.plan(admitted, target, self.rt.config.sidecar)
        self.observe, self.strip_usage = plan.observe, plan.strip_usage
        self.known_backend = target is not None
        route_attributes: dict[str, Any] = {
            "extproc.model": parsed.model,
            "extproc.pool": self.pool,
        }
        if target is not None:
            report.backend = target.backend
            report.provider_model = target.provider_model
            route_attributes["extproc.backend"] = target.backend
        if self.pool:
            report.failover = "quota"
        self.route_span = self.trace.start("route", route_attributes)
        answer = protocol.request_body_response(
            protocol.common(plan.set_headers, body=plan.body, clear_route_cache=True),
            dynamic_metadata=plan.metadata,
        )
        # Only now: a failure before this point is still this stage's to count and settle.
        self.path = plan.path
        if plan.release:
            RELEASED.add()
        return answer

    def _trace_request(self, parsed: ParsedRequest, model: str) -> None:
        assert self.endpoint is not None
        operation = OPERATION.get(self.endpoint.operation.value, self.endpoint.path)
        self.trace.rename(f"{operation} {model}")
        self.trace.set(
            {
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": model,
                **self.wire.span_attributes(parsed.body),
                "extproc.team": self.team,
                "extproc.stream": parsed.stream,
            }
        )

    async def _external_guards_and_reserve(
        self,
        parsed: ParsedRequest,
        guards: tuple[CompiledGuard, ...],
        slots: list[Slot],
        local: list[Verdict],
    ) -> list[Verdict]:
        """External guards and the quota reservation, at the same time: neither needs the
        other, and both may take a network round trip."""
        assert self.team is not None and self.prompt is not None and self.max_output is not None
        specs = applicable(self.services.limits.get(self.team, ()), parsed.model)
        reserve = None
        if specs:
            amounts = Amounts(self.prompt.tokens, self.max_output)
            reserve = self._reserve(parsed.model, specs, amounts)
        if not any(not g.local for g in guards):
            if reserve is not None:
                try:
                    self.reservation = await reserve
                except GatewayError:
                    self._record("request", local)  # the guards did run: keep their verdicts
                    raise
            return []
        reserving = None
        if reserve is not None:
            # Its own task, whose result is kept the moment it exists: if the client goes away
            # (this coroutine is cancelled) or a guard fails while a slow guard is asked, the
            # reservation is still found and released (see _reserved).
            reserving = asyncio.ensure_future(reserve)
            reserving.add_done_callback(self._reserved)
        verdicts = await guard.run_external(
            self.services.guard_client,
            guards,
            "request",
            self.team,
            parsed.model,
            slots,
            trace=self.trace,
        )
        if guard.first_block(verdicts) is not None:
            if reserving is not None:
                await asyncio.wait([reserving])
            # Nothing went upstream: release the reservation with no tokens used.
            settlement.release_unused(self.services, self.reservation, self.trace)
            self._stop_if_blocked([*local, *verdicts], "request")
        if reserving is not None:
            try:
                await reserving  # the 429 (or 503) of the reservation, if it failed
            except GatewayError:
                self._record("request", [*local, *verdicts])
                raise
        return verdicts

    async def _reserve(
        self, model: str, specs: tuple[LimitSpec, ...], amounts: Amounts
    ) -> Reservation | None:
        """Reserve; when a limit that lists this model is exhausted and the model allows it,
        pin the request to its next pool and reserve against the team-wide limits only."""
        assert self.team is not None
        quota, cfg = self.services.quota, self.rt.config
        try:
            with self.trace.child("quota reserve", {"extproc.limits": len(specs)}):
                return await quota.reserve(cfg, self.team, model, specs, amounts)
        except GatewayError as err:
            exhausted = (err.code or "").removeprefix("quota_exceeded:")
            scoped = {s.name for s in specs if s.scoped}
            model_cfg = cfg.models.get(model)
            if model_cfg is None or not model_cfg.quota_failover or exhausted not in scoped:
                raise
        self.pool = 1
        rest = tuple(s for s in specs if not s.scoped)
        if not rest:
            return None
        with self.trace.child("quota reserve", {"extproc.limits": len(rest), "extproc.pool": 1}):
            return await quota.reserve(cfg, self.team, model, rest, amounts)

    def _reserved(self, task: asyncio.Future[Reservation | None]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        self.reservation = task.result()
        if self.closed:
            # The stream ended before the request went anywhere: nothing was used.
            settlement.release_unused(self.services, self.reservation, self.trace)

    def _check_prompt_size(
        self, guards: tuple[CompiledGuard, ...], verdicts: list[Verdict]
    ) -> None:
        assert self.prompt is not None
        too_long = guard.prompt_too_long(guards, self.prompt.tokens)
        if too_long is not None:
            # Nothing goes upstream: a reservation already made is released unused.
            settlement.release_unused(self.services, self.reservation, self.trace)
            self._stop_if_blocked([*verdicts, too_long], "request")

    def _stop_if_blocked(self, verdicts: list[Verdict], stage: guard.Stage) -> None:
        block = guard.first_block(verdicts)
        if block is not None:
            self._record(stage, verdicts)
            raise guard.blocked(block, self.services.guards.block_status, stage)

    def _record(self, stage: guard.Stage, verdicts: list[Verdict]) -> None:
        model = self.request.model if self.request is not None else None
        guard.record(stage, self.team, model, verdicts)
        if self.report is not None and verdicts:
            self.report.guards.extend(verdict_entries(stage, verdicts))

    async def _count_prompt(self, parsed: ParsedRequest, budget: float | None = None) -> Any:
        # Never fails; a long prompt waits at most `budget` (default sidecar.count_budget_ms;
        # then the rest is estimated), in its team's queue for the tokenizer threads.
        return await self.wire.count_prompt(
            self.services.tokens, parsed, team=self.team, budget=budget
        )

    # -- response -----------------------------------------------------------------------------

    def on_response_headers(self, req: Any) -> protocol.ProcessingResponse:
        msg = req.response_headers
        headers = protocol.header_dict(msg.headers)
        self.status = int(headers.get(":status", "0") or 0)
        self.backend = protocol.answering_backend(req)
        # Team, model, rate limits (and the backend, when one serves the model) are rendered
        # by Envoy from the request's metadata; only what Envoy chose is added here.
        set_headers = {} if self.known_backend else self._backend_headers()
        attempts = headers.get("x-envoy-attempt-count", "1")
        report = self.report
        if report is not None:
            report.status = self.status
            report.backend = self.backend
            if not self.known_backend:
                report.provider_model = set_headers.get(f"{P}provider-model")
            report.attempts = int(attempts) if attempts.isdigit() else 1
        if not self.pool and attempts.isdigit() and int(attempts) > 1:
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
        elif path is AnswerPath.INLINE:
            if self.response_guards and self.endpoint is not None and 200 <= self.status < 300:
                find, holdback, owners = guard.stream_finder(self.response_guards)
                self.relay = self.wire.guarded_stream_relay(
                    self.endpoint, self.strip_usage, find, holdback, owners
                )
            else:
                self.relay = self.wire.stream_relay(self.strip_usage)
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
            if not msg.end_of_stream:
                if self.usage is None and self.relay.usage is not None:
                    # The backend's usage report, before [DONE]: settle and tell the access
                    # log now. A client may close at [DONE] (the openai SDK does), before the
                    # stream's last message is answered.
                    self.usage = self.relay.usage
                    self._settle(self.usage)
                    return protocol.response_body_response(
                        common, dynamic_metadata=self._stream_metadata(self.usage)
                    )
                return protocol.response_body_response(common)
            usage = self.usage = self._stream_usage()
            self._settle(usage)
            self._end_stream()
            return protocol.response_body_response(
                common, dynamic_metadata=self._stream_metadata(usage)
            )

        usage = self.usage = self._buffered_usage(msg.body)
        self._settle(usage)
        body = None
        if self.response_guards and 200 <= self.status < 300:
            # The tokens were spent (settled above) whatever the guards decide now.
            body = await self._guard_response(msg.body)
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

    async def _guard_response(self, raw: bytes) -> bytes | None:
        """Response guards on a buffered answer: the masked body, None if unchanged; a block
        raises (the answer is replaced by the error while its headers are still held)."""
        assert self.endpoint is not None and self.request is not None
        try:
            response = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        dropped = self.wire.drop_logprobs(response)
        slots = self.wire.answer_slots(self.endpoint, response)
        if not slots:
            return orjson.dumps(response) if dropped else None
        verdicts = await guard.run_local_async(self.response_guards, slots)
        self._stop_if_blocked(verdicts, "response")
        external = await guard.run_external(
            self.services.guard_client,
            self.response_guards,
            "response",
            self.team or "",
            self.request.model,
            slots,
            self.prompt_turns,
            trace=self.trace,
        )
        verdicts += external
        self._stop_if_blocked(verdicts, "response")
        changed = guard.apply_rewrites(external, slots) or dropped
        changed |= any(v.action == "rewrite" for v in verdicts)
        self._record("response", verdicts)
        return orjson.dumps(response) if changed else None

    def _record_stream_block(self, verdict: Verdict) -> None:
        if not self.stream_block_recorded:
            self.stream_block_recorded = True
            self._record("response", [verdict])
            if self.report is not None:
                # The stream was cut by the guard: the request ends as a block.
                self.report.code = f"guard_blocked:{verdict.guard}"

    def _settle(self, usage: Usage | None, complete: bool = True) -> None:
        prompt = self.prompt.tokens if self.prompt is not None else 0
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
        self.closed = True
        self._end_stream()
        report, self.report = self.report, None  # once
        if self.route_span is not None:
            self.route_span.end()  # no answer came
        settles = settlement.SETTLED_BY[self.path] is Finisher.DOWNSTREAM
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

    def _model_label(self) -> str:
        return model_label(self.rt.config, self.request.model if self.request else None)

    def _stream_usage(self) -> Usage | None:
        assert self.relay is not None
        if self.request is None or self.prompt is None:
            return self.relay.usage
        tokens, model = self.services.tokens, self.request.model
        return settlement.stream_usage(
            self.relay, self.prompt.tokens, tokens, model, self.output_cap
        )

    def _buffered_usage(self, raw: bytes) -> Usage | None:
        if self.request is None or not 200 <= self.status < 300:
            return None
        try:
            response = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("backend %s sent a 2xx body that is not JSON", self.backend)
            return None
        usage = self.wire.answer_usage(response)
        return usage or self._estimate(self.wire.answer_text(response))

    def _estimate(self, completion: str) -> Usage | None:
        if self.request is None or self.prompt is None:
            return None
        tokens, model = self.services.tokens, self.request.model
        return settlement.estimate(self.prompt.tokens, tokens, model, completion, self.output_cap)

    def _backend_headers(self) -> dict[str, str]:
        """The backend Envoy chose (a pooled or canary model) and the model name it got."""
        out: dict[str, str] = {}
        if self.request is not None and self.backend:
            out[f"{P}backend"] = self.backend
            target = self.rt.targets.get((self.request.model, self.backend))
            if target is not None:
                out[f"{P}provider-model"] = target.provider_model
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


class UpstreamStream:
    """The per-backend stage inside a cluster: credentials and model name for this attempt."""

    __slots__ = ("finished", "metadata", "rt", "target")

    def __init__(self, services: Services, metadata: Mapping[str, str]) -> None:
        self.rt = services.runtime
        self.metadata = metadata
        self.target: ResolvedTarget | None = None
        # True once the request's last phase for this stage is answered: the headers when
        # the body stays as it is, else the body. No response phase is ever sent here.
        self.finished = False

    def close(self) -> None:
        """Nothing to settle: the downstream stage owns the request's accounting."""

    def failed(self) -> None:
        """Nothing to report: the downstream stage reports the request."""

    async def handle(self, req: protocol.ProcessingRequest) -> protocol.ProcessingResponse:
        kind = req.WhichOneof("request")
        try:
            if kind == "request_headers":
                headers = protocol.header_dict(req.request_headers.headers)
                backend = self.metadata.get(BACKEND_METADATA)
                pooled = backend is None
                if pooled:
                    backend = protocol.host_backend(req)
                self.target = target = routing.upstream_target(self.rt, backend, headers)
                set_headers, remove = routing.upstream_header_mutation(
                    self.rt, target, headers, retriable=pooled
                )
                needs_body = target.provider_model != target.model
                self.finished = not needs_body
                if needs_body:
                    # The rewritten body has another length; Envoy only drops content-length
                    # itself when the body mode was BUFFERED from the start, not on override.
                    remove.append("content-length")
                return protocol.request_headers_response(
                    protocol.common(set_headers, remove),
                    mode_override=protocol.UPSTREAM_REWRITE_BODY if needs_body else None,
                )
            if kind == "request_body" and self.target is not None:
                self.finished = True
                body = routing.rewrite_model(req.request_body.body, self.target.provider_model)
                return protocol.request_body_response(protocol.common(body=body))
        except GatewayError as err:
            # This stage does not know the client's API: the default's error shape.
            body = wire.DEFAULT.error_body(err)
            return protocol.immediate_response(err.status, body, details="aigw_upstream")
        except orjson.JSONDecodeError:
            bad = bad_request("We could not parse the JSON body of your request", "invalid_json")
            body = wire.DEFAULT.error_body(bad)
            return protocol.immediate_response(bad.status, body, details="aigw_upstream")
        return protocol.passthrough(kind)
