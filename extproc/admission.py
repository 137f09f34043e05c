"""Admission of one request body: is it valid, may this team use this model, what do the
guards say, how many tokens is the prompt, is there quota for it. What passes becomes an
`Admitted` (request_plan.py turns it into what Envoy is told); what does not raises the
GatewayError the client gets.

The team was identified with the request's headers (identity.py). External guards and the
reservation run at the same time, since both may take a network round trip; a reservation
that completes after the client went away is released unused (abandon).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from . import ownership, providers, routing, settlement
from .errors import GatewayError, bad_request, not_found, too_large
from .guard import pipeline as guard
from .guard.texts import conversation
from .quota.policy import Amounts
from .quota.service import requested_output
from .request_plan import Admitted
from .telemetry.report import OFF_LOOP_CHARS, prompt_fields, verdict_entries
from .telemetry.tracing import NO_TRACE, OPERATION
from .wire.openai.request import CHAT

if TYPE_CHECKING:
    from .config import ResolvedTarget, Runtime
    from .guard.pipeline import CompiledGuard
    from .guard.texts import Slot
    from .guard.types import Verdict
    from .identity import Identity
    from .quota.policy import LimitSpec
    from .quota.service import Reservation
    from .services import Services
    from .telemetry.report import RequestReport
    from .tokens import TokenCount
    from .wire import Endpoint, ParsedRequest, WireFormat


class Admission:
    """One request's admission, and what the rest of the request needs of it: the reservation
    (which may arrive after the stream is gone), the response guards, the prompt's turns."""

    __slots__ = (
        "abandoned",
        "endpoint",
        "max_output",
        "pool",
        "prompt",
        "prompt_turns",
        "report",
        "request",
        "reservation",
        "response_guards",
        "rt",
        "services",
        "team",
        "trace",
        "who",
        "wire",
    )

    def __init__(
        self,
        services: Services,
        rt: Runtime,
        wire: WireFormat,
        endpoint: Endpoint,
        who: Identity,
        report: RequestReport,
        trace: Any,
    ) -> None:
        self.services, self.rt, self.wire, self.endpoint = services, rt, wire, endpoint
        self.who, self.team, self.report, self.trace = who, who.team, report, trace
        self.request: ParsedRequest | None = None
        self.prompt: TokenCount | None = None
        self.max_output = 0  # the most output the request may produce (reserved)
        self.pool = 0  # 1 when a quota failover pinned the request to the next pool
        self.reservation: Reservation | None = None
        self.response_guards: tuple[CompiledGuard, ...] = ()
        self.prompt_turns: list[dict[str, str]] | None = None  # for judging the response
        self.abandoned = False

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.tokens if self.prompt is not None else 0

    def abandon(self) -> None:
        """The stream ended: a reservation still on its way is released unused (_reserved)."""
        self.abandoned = True

    def _parsed(self, raw: bytes) -> ParsedRequest:
        limit = self.rt.config.sidecar.max_body_bytes
        if len(raw) > limit:
            raise too_large(limit)
        endpoint, report = self.endpoint, self.report
        parsed = self.wire.parse(endpoint, raw)
        # The client's words, kept for the audit record only (metric labels use config names).
        report.model = parsed.model[:256]
        report.endpoint = endpoint.path
        report.stream = parsed.stream
        if self.trace is not NO_TRACE:
            self._trace_request(parsed, report.model)
        routing.check_model(self.rt, self.who, parsed.model, endpoint)
        return parsed

    async def count_only(self, raw: bytes) -> TokenCount:
        """A request that asks for its prompt's size only (nothing goes to a model): the body
        checked and counted, as a request to the model would be; nothing is reserved."""
        parsed = self.request = self._parsed(raw)
        self.prompt = await self._count_prompt(parsed)
        return self.prompt

    async def admit(self, raw: bytes, started: float) -> Admitted:
        """`started`: the request's start, on the perf_counter clock."""
        endpoint, report = self.endpoint, self.report
        parsed = self._parsed(raw)
        default_output = self.rt.config.quota.default_max_tokens
        request_guards, self.response_guards = self.services.guards.lists(self.team, parsed.model)
        bridge = self.wire.bridge
        chat: dict[str, Any] | None = None
        guarded_stream = parsed.stream and bool(self.response_guards)
        target = routing.fixed_target(self.rt, parsed.model)
        native = routing.served_natively(self.rt, parsed.model, target, self.wire, guarded_stream)
        references = False
        if b"file_id" in raw or b"previous_response_id" in raw or b"\\u" in raw:
            # A byte search first: most requests name no stored object, and are not walked.
            # (A key may be spelled with escapes, "file\\u005fid": such a body is walked.)
            references = await self._check_references(parsed, native, target)
        if bridge is not None and not native:
            # Served as chat completions (request_plan.py): what chat cannot carry is refused
            # now, before anything is reserved; the request sent is translated again after the
            # guards, which may rewrite it.
            chat = bridge.request(endpoint, parsed.body)
        adapted = self.rt.adapted.get(parsed.model)
        translated = [t for t in adapted if providers.translates(t.provider)] if adapted else ()
        if bridge is not None and chat is None:
            translated = []  # the one backend speaks the client's API: nothing to translate
        if translated:
            # What a provider that may serve it cannot do as asked is refused before anything
            # is reserved (in a failover pool: any of them, whichever answers).
            for target in translated:
                if chat is not None:
                    providers.check(target, chat, CHAT.path)
                else:
                    providers.check(target, parsed.body, endpoint.path)
            # A request that sets no maximum asks the provider for the backend's (and an
            # OpenAI backend beside it for the usual default).
            others = len(self.rt.config.models[parsed.model].targets) > len(translated)
            default_output = max(
                *(t.max_tokens for t in translated), default_output if others else 1
            )
        self.request = parsed
        self.max_output = requested_output(parsed, default_output)
        slots = self.wire.request_slots(endpoint, parsed.body) if request_guards else []
        # Local guards first, masking in place: what they remove never leaves the gateway.
        if request_guards:
            with self.trace.child("guards local", {"extproc.guard.stage": "request"}):
                verdicts = await guard.run_local_async(request_guards, slots)
        else:
            verdicts = []
        self.stop_if_blocked(verdicts, "request")
        counting = time.perf_counter()
        prompt = self.prompt = await self._count_prompt(parsed)
        counted_s = time.perf_counter() - counting
        self._check_prompt_size(request_guards, verdicts)
        external = await self._external_guards_and_reserve(parsed, request_guards, slots, verdicts)
        verdicts += external
        changed = references or any(v.action == "rewrite" for v in verdicts)
        if guard.apply_rewrites(external, slots):
            changed = True
            # The prompt the backend will get is the rewritten one: count and size it again.
            # One budget per request: the recount gets what the first count left.
            left = max(0.0, self.services.tokens.budget_s - counted_s)
            prompt = self.prompt = await self._count_prompt(parsed, left)
            self._check_prompt_size(request_guards, verdicts)
        self.record("request", verdicts)
        if self.trace is not NO_TRACE:
            self.trace.set({"extproc.prompt_tokens_estimate": prompt.tokens})
        audit = self.services.audit
        if audit is not None:
            slots = slots or self.wire.request_slots(endpoint, parsed.body)
            texts = [s.get() for s in slots]
            include = self.rt.config.observability.audit.include_prompt
            # Masking every PII kind costs ~0.1 ms per 1,000 characters: off the loop sooner.
            if sum(len(t) for t in texts) > (OFF_LOOP_CHARS // 8 if include else OFF_LOOP_CHARS):
                report.prompt = await asyncio.to_thread(prompt_fields, texts, include)
            else:
                report.prompt = prompt_fields(texts, include)
        if self.response_guards and any(not g.local for g in self.response_guards):
            # A response is judged in the context of the prompt (as the backend received it).
            slots = slots or self.wire.request_slots(endpoint, parsed.body)
            self.prompt_turns = conversation(slots)
        res = self.reservation
        return Admitted(
            who=self.who,
            request=parsed,
            wire=self.wire,
            prompt_tokens=prompt.tokens,
            max_output=self.max_output,
            body_changed=changed,
            response_guards=bool(self.response_guards),
            pool=self.pool,
            reservation=res.id if res is not None else "",
            scope=res.scope if res is not None else "",
            limits=tuple(spec.label for spec in res.specs) if res is not None else (),
            rate_headers=self.services.quota.rate_headers(res.specs, res.states)
            if res is not None
            else None,
            # Wall clock: the stage that finishes the request may run in another process.
            started_at=time.time() - (time.perf_counter() - started),
            traceparent=self.trace.traceparent() if self.trace is not NO_TRACE else "",
            audit=report.handover() if audit is not None else None,
        )

    async def _check_references(
        self, parsed: ParsedRequest, native: bool, target: ResolvedTarget | None
    ) -> bool:
        """A request that builds on stored objects (a previous_response_id, a file by id) goes
        on only to the backend that stores them, as it is, for the team that owns them
        (ownership.py): any other team's, or one the gateway did not record, is a 404. True
        when it names any: its body then goes as the gateway read it (a key the client gave
        twice, which a backend might read the other way, is sent once)."""
        references = self.wire.stored_references(parsed.body)
        if not references or (self.wire.bridge is not None and not native):
            return False  # (a translated request refuses them itself: chat keeps no state)
        shared = self.rt.config.records_shared
        for kind, object_id in references:
            param = "previous_response_id" if kind == ownership.RESPONSE else "file_id"
            if target is None or not shared:
                raise bad_request(
                    f"{param} needs a model one backend serves, and a gateway whose sidecar "
                    "processes share their records (one worker, or quota.store: redis)",
                    "unsupported_parameter",
                    param,
                )
            store = self.services.quota.store
            try:
                owner: ownership.Owner | None = await ownership.owned(
                    store, kind, object_id, self.team
                )
            except GatewayError as err:
                if err.status != 404:
                    raise
                owner = None
            if owner is None or owner.backend != target.backend:
                if kind == ownership.RESPONSE:
                    # (As OpenAI words an unknown previous response.)
                    raise not_found(
                        f"Previous response with id '{object_id}' not found.",
                        "previous_response_not_found",
                        param,
                    )
                raise ownership.unknown(kind, object_id)
        return True

    def stop_if_blocked(self, verdicts: list[Verdict], stage: guard.Stage) -> None:
        block = guard.first_block(verdicts)
        if block is not None:
            self.record(stage, verdicts)
            raise guard.blocked(block, self.services.guards.block_status, stage)

    def record(self, stage: guard.Stage, verdicts: list[Verdict]) -> None:
        """Guard verdicts, request or response side: the metrics and the request's report."""
        model = self.request.model if self.request is not None else None
        guard.record(stage, self.team, model, verdicts)
        if verdicts:
            self.report.guards.extend(verdict_entries(stage, verdicts))

    def _trace_request(self, parsed: ParsedRequest, model: str) -> None:
        operation = OPERATION.get(self.endpoint.operation.value, self.endpoint.path)
        self.trace.rename(f"{operation} {model}")
        self.trace.set(
            {
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": model,
                **self.wire.span_attributes(parsed.body),
                "extproc.team": self.team,
                "extproc.organization": self.who.organization or None,
                "enduser.id": self.who.user or None,
                "extproc.api": self.wire.name,
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
        specs = self.services.budgets.applicable(self.who, parsed.model)
        reserve = None
        if specs:
            amounts = Amounts(self.prompt_tokens, self.max_output)
            reserve = self._reserve(parsed.model, specs, amounts)
        if not any(not g.local for g in guards):
            if reserve is not None:
                try:
                    self.reservation = await reserve
                except GatewayError:
                    self.record("request", local)  # the guards did run: keep their verdicts
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
            self.stop_if_blocked([*local, *verdicts], "request")
        if reserving is not None:
            try:
                await reserving  # the 429 (or 503) of the reservation, if it failed
            except GatewayError:
                self.record("request", [*local, *verdicts])
                raise
        return verdicts

    async def _reserve(
        self, model: str, specs: tuple[LimitSpec, ...], amounts: Amounts
    ) -> Reservation | None:
        """Reserve; when a limit that lists this model is exhausted and the model allows it,
        pin the request to its next pool and reserve against the limits of all models only."""
        quota, cfg = self.services.quota, self.rt.config
        scope = self.services.budgets.scope(self.team)
        try:
            with self.trace.child("quota reserve", {"extproc.limits": len(specs)}):
                return await quota.reserve(cfg, scope, model, specs, amounts, who=self.who)
        except GatewayError as err:
            exhausted = (err.code or "").removeprefix("quota_exceeded:")
            scoped = {s.label for s in specs if s.scoped}
            model_cfg = cfg.models.get(model)
            if model_cfg is None or not model_cfg.quota_failover or exhausted not in scoped:
                raise
        self.pool = 1
        rest = tuple(s for s in specs if not s.scoped)
        if not rest:
            return None
        with self.trace.child("quota reserve", {"extproc.limits": len(rest), "extproc.pool": 1}):
            return await quota.reserve(cfg, scope, model, rest, amounts, who=self.who)

    def _reserved(self, task: asyncio.Future[Reservation | None]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        self.reservation = task.result()
        if self.abandoned:
            # The stream ended before the request went anywhere: nothing was used.
            settlement.release_unused(self.services, self.reservation, self.trace)

    def _check_prompt_size(
        self, guards: tuple[CompiledGuard, ...], verdicts: list[Verdict]
    ) -> None:
        too_long = guard.prompt_too_long(guards, self.prompt_tokens)
        if too_long is not None:
            # Nothing goes upstream: a reservation already made is released unused.
            settlement.release_unused(self.services, self.reservation, self.trace)
            self.stop_if_blocked([*verdicts, too_long], "request")

    async def _count_prompt(self, parsed: ParsedRequest, budget: float | None = None) -> TokenCount:
        # Never fails; a long prompt waits at most `budget` (default sidecar.count_budget_ms;
        # then the rest is estimated), in its team's queue for the tokenizer threads.
        return await self.wire.count_prompt(
            self.services.tokens, parsed, team=self.team, budget=budget
        )
