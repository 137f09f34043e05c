"""The guard lists of a config, compiled, and running them on a request or a response.

Order of work on a request: the local guards (deny, pii, max_prompt_tokens) in their listed
order, on the sidecar's event loop (they are regexes over the prompt: microseconds); then every
external guard at once, concurrently with the quota reservation (the caller gathers them).
External guards see the prompt after the local guards masked it, so no PII a mask guard
removed ever leaves the gateway, not even to a safety model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import orjson

from ..config import stage_guards
from ..errors import GatewayError
from ..telemetry.metrics import GUARD_ERRORS, GUARD_SECONDS, GUARD_VERDICTS, child
from ..telemetry.tracing import NO_TRACE
from .detectors import PII_KINDS, DenyList, count_kinds, detector, find_all, known_kinds, mask
from .llm import GuardClient, GuardEndpoint
from .texts import Slot, conversation
from .types import GuardUnavailable, SafetyReply, Span, Verdict

if TYPE_CHECKING:
    from ..config import Config, Guard

log = logging.getLogger("extproc.guard")
audit = logging.getLogger("extproc.audit")

Stage = Literal["request", "response"]
LOCAL = ("pii", "deny", "max_prompt_tokens")


@dataclass(frozen=True, slots=True)
class CompiledGuard:
    name: str
    spec: Guard
    deny: DenyList | None = None
    kinds: tuple[str, ...] = ()
    endpoint: GuardEndpoint | None = None

    @property
    def local(self) -> bool:
        return self.spec.type in LOCAL

    @property
    def max_length(self) -> int:
        """The longest text this guard's detectors match (a stream's hold-back)."""
        if self.deny is not None:
            return self.deny.max_length
        return max((detector(k).max_length for k in self.kinds), default=0)

    def spans(self, text: str) -> list[Span]:
        if self.deny is not None:
            return self.deny.find(text)
        return find_all(text, self.kinds)


def compile_guard(name: str, spec: Guard, api_key: str | None) -> CompiledGuard:
    if spec.type == "deny":
        return CompiledGuard(name, spec, deny=DenyList(spec.patterns, spec.keywords))
    if spec.type == "pii":
        return CompiledGuard(name, spec, kinds=tuple(spec.entities or PII_KINDS))
    if spec.url is not None:
        endpoint = GuardEndpoint(
            url=spec.url.rstrip("/"),
            model=spec.model,
            api_key=api_key,
            timeout_s=spec.timeout_ms / 1000,
        )
        return CompiledGuard(name, spec, endpoint=endpoint)
    return CompiledGuard(name, spec)


@dataclass(slots=True)
class Guardrails:
    """One config's guards: built with each (re)load, swapped in with the rest of Services."""

    guards: dict[str, CompiledGuard]
    block_status: int
    # (team, model) -> guards per stage, computed on first use
    _lists: dict[tuple[str, str], tuple[tuple[CompiledGuard, ...], ...]] = field(
        default_factory=dict
    )
    _cfg: Config | None = None

    @classmethod
    def from_config(cls, cfg: Config, keys: dict[str, str]) -> Guardrails:
        guards = {name: compile_guard(name, g, keys.get(name)) for name, g in cfg.guards.items()}
        return cls(guards, cfg.guardrails.block_status, _cfg=cfg)

    def lists(self, team: str, model: str) -> tuple[tuple[CompiledGuard, ...], ...]:
        """(request guards, response guards) for a team's request to a model: the team's own
        lists or the defaults, then the model's, each guard once."""
        hit = self._lists.get((team, model))
        if hit is not None:
            return hit
        cfg = self._cfg
        assert cfg is not None
        out = [tuple(self.guards[n] for n in names) for names in stage_guards(cfg, team, model)]
        result = (out[0], out[1])
        self._lists[(team, model)] = result
        return result


# -- verdicts -----------------------------------------------------------------------------------


def blocked(verdict: Verdict, status: int, stage: Stage) -> GatewayError:
    what = "request" if stage == "request" else "response"
    if verdict.unavailable:
        # A guard that could not be asked (on_error: block) judged nothing: the client should
        # retry, not rewrite its prompt, so it is told apart from a policy block.
        return GatewayError(
            503,
            f"This {what} could not be checked by the gateway's content policy (guard "
            f"'{verdict.guard}' is unavailable); retry shortly.",
            "server_error",
            f"guard_unavailable:{verdict.guard}",
            headers=(("retry-after", "1"),),
        )
    return GatewayError(
        status,
        f"This {what} was blocked by the gateway's content policy (guard '{verdict.guard}').",
        "invalid_request_error",
        f"guard_blocked:{verdict.guard}",
    )


def run_local(guards: Sequence[CompiledGuard], slots: list[Slot]) -> list[Verdict]:
    """Deny and pii guards, in order, masking in place. The first block ends the run (its
    verdict is last). max_prompt_tokens is the caller's: it needs the count after masking."""
    verdicts: list[Verdict] = []
    for guard in guards:
        if guard.spec.type not in ("pii", "deny"):
            continue
        verdict = _local(guard, slots)
        if verdict is not None:
            verdicts.append(verdict)
            if verdict.action == "block":
                break
    return verdicts


# Local guards cost ~0.1 ms per 1,000 characters (all PII kinds and a deny list): above this
# much text they run on a worker thread, so one long prompt does not stall every other stream.
OFF_LOOP_CHARS = 16 * 1024


async def run_local_async(guards: Sequence[CompiledGuard], slots: list[Slot]) -> list[Verdict]:
    if not guards:
        return []
    if sum(len(s.get()) for s in slots) > OFF_LOOP_CHARS:
        return await asyncio.to_thread(run_local, guards, slots)
    return run_local(guards, slots)


def _local(guard: CompiledGuard, slots: list[Slot]) -> Verdict | None:
    if guard.deny is not None:
        for slot in slots:
            label = guard.deny.first_match(slot.get())
            if label is not None:
                return Verdict("block", guard.name, reason=f"matched {label}")
        return None
    counts: dict[str, int] = {}
    found: list[tuple[Slot, list[Span]]] = []
    for slot in slots:
        spans = find_all(slot.get(), guard.kinds)
        if spans:
            found.append((slot, spans))
            for kind, n in count_kinds(spans).items():
                counts[kind] = counts.get(kind, 0) + n
    if not found:
        return None
    if guard.spec.action == "block":
        return Verdict("block", guard.name, reason="sensitive data", counts=counts)
    for slot, spans in found:
        slot.set(mask(slot.get(), spans))
    return Verdict("rewrite", guard.name, reason="masked", counts=counts)


def prompt_too_long(guards: Sequence[CompiledGuard], tokens: int) -> Verdict | None:
    for guard in guards:
        limit = guard.spec.max_tokens
        if guard.spec.type == "max_prompt_tokens" and limit is not None and tokens > limit:
            return Verdict("block", guard.name, reason=f"{tokens} prompt tokens > {limit}")
    return None


async def run_external(
    client: GuardClient,
    guards: Sequence[CompiledGuard],
    stage: Stage,
    team: str,
    model: str,
    slots: list[Slot],
    prompt: list[dict[str, str]] | None = None,
    trace: Any = NO_TRACE,
) -> list[Verdict]:
    """Every external guard at once, on the same texts. For a response, `prompt` is the
    request's conversation, so a safety model judges the answer in its context."""
    external = [g for g in guards if not g.local]
    if not external:
        return []
    texts = [s.get() for s in slots]
    judged = conversation(slots)
    if prompt is not None:
        judged = [*prompt, *judged]
    calls = [
        _timed(g, stage, trace, _external(client, g, stage, team, model, texts, judged))
        for g in external
    ]
    return list(await asyncio.gather(*calls))


async def _timed(
    guard: CompiledGuard, stage: Stage, trace: Any, call: Awaitable[Verdict]
) -> Verdict:
    """One guard call, in the guard-call histogram and as a child span of the request."""
    span = trace.start(f"guard {guard.name}", {"extproc.guard.type": guard.spec.type})
    started = time.perf_counter()
    try:
        verdict = await call
    except BaseException:
        span.end()
        raise
    child(GUARD_SECONDS, guard.name, stage).observe(time.perf_counter() - started)
    if verdict.unavailable:
        child(GUARD_ERRORS, guard.name, _error_reason(verdict.reason)).inc()
    span.set_attributes({"extproc.guard.action": verdict.action, "extproc.guard.stage": stage})
    if verdict.reason:
        span.set_attribute("extproc.guard.reason", verdict.reason)
    span.end()
    return verdict


UNAVAILABLE = "unavailable: "


def _masked(text: str) -> str:
    return mask(text, find_all(text, known_kinds())) if text else text


def _error_reason(reason: str) -> str:
    """A bounded label from a GuardUnavailable's message."""
    detail = reason.removeprefix(UNAVAILABLE)
    if detail.startswith("timeout"):
        return "timeout"
    if detail.startswith("connection"):
        return "connect"
    if detail.startswith("HTTP"):
        return "http_status"
    return "bad_reply"


async def _external(
    client: GuardClient,
    guard: CompiledGuard,
    stage: Stage,
    team: str,
    model: str,
    texts: list[str],
    judged: list[dict[str, str]],
) -> Verdict:
    spec, ep = guard.spec, guard.endpoint
    assert ep is not None
    judge: Literal["user", "agent"] = "user" if stage == "request" else "agent"
    try:
        if spec.type == "webhook":
            payload = {"stage": stage, "team": team, "model": model, "texts": texts}
            action, reason, categories, rewritten = await client.webhook(ep, payload)
            if action == "rewrite" and (rewritten is None or len(rewritten) != len(texts)):
                raise GuardUnavailable("rewrite with the wrong number of texts")
            # A webhook's words may quote the text it judged: they reach logs, spans and the
            # audit trail only with every PII and secret kind masked.
            categories = tuple(_masked(c) for c in categories)
            return Verdict(action, guard.name, _masked(reason), categories, rewritten)
        reply: SafetyReply
        if spec.type == "llama_guard":
            reply = await client.llama_guard(ep, judged, judge, mode=spec.mode)
        elif spec.type == "nemoguard":
            if stage == "request":
                reply = await client.nemoguard(ep, judged, None, judge)
            else:
                answer = "\n".join(texts)
                context = judged[: len(judged) - _trailing_assistant(judged)]
                reply = await client.nemoguard(ep, context, answer, judge)
        else:
            reply = await client.moderation(ep, texts)
    except GuardUnavailable as exc:
        action = "block" if spec.on_error == "block" else "allow"
        log.warning("guard %s unavailable (%s): on_error=%s", guard.name, exc, spec.on_error)
        return Verdict(action, guard.name, reason=f"{UNAVAILABLE}{exc}", unavailable=True)
    if reply.safe:
        return Verdict("allow", guard.name)
    if spec.categories is not None and not set(reply.categories) & set(spec.categories):
        return Verdict(
            "allow",
            guard.name,
            reason="unsafe in unblocked categories",
            categories=reply.categories,
        )
    return Verdict("block", guard.name, reason="unsafe", categories=reply.categories)


def _trailing_assistant(turns: list[dict[str, str]]) -> int:
    return 1 if turns and turns[-1]["role"] == "assistant" else 0


def apply_rewrites(verdicts: Sequence[Verdict], slots: list[Slot]) -> bool:
    """The first rewrite in list order wins: several rewriters judged the same texts at once,
    and their answers cannot be combined."""
    for verdict in verdicts:
        if verdict.action == "rewrite" and verdict.texts is not None:
            for slot, text in zip(slots, verdict.texts, strict=True):
                slot.set(text)
            return True
    return False


def first_block(verdicts: Sequence[Verdict]) -> Verdict | None:
    return next((v for v in verdicts if v.action == "block"), None)


class VerdictCounts:
    """Guard verdicts of this process since start, by guard and action (GetStats shows them;
    issue 7's metrics export them)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, verdicts: Sequence[Verdict]) -> None:
        for v in verdicts:
            key = f"{v.guard}:{v.action}"
            self.counts[key] = self.counts.get(key, 0) + 1


VERDICTS = VerdictCounts()


def record(stage: Stage, team: str | None, model: str | None, verdicts: Sequence[Verdict]) -> None:
    """Count the verdicts, and write the audit line of a decision: what was decided and why,
    as one JSON object, never the text itself."""
    VERDICTS.add(verdicts)
    for v in verdicts:
        child(GUARD_VERDICTS, v.guard, stage, v.action).inc()
    acted = [v for v in verdicts if v.action != "allow" or v.reason]
    if not acted or not audit.isEnabledFor(logging.INFO):
        return
    line = {
        "stage": stage,
        "team": team,
        "model": model,
        "verdicts": [
            {
                "guard": v.guard,
                "action": v.action,
                "reason": v.reason,
                "categories": list(v.categories),
                "counts": v.counts,
            }
            for v in acted
        ],
    }
    audit.info("guard decision %s", orjson.dumps(line).decode())


def stream_finder(
    guards: Sequence[CompiledGuard],
) -> tuple[Callable[[str], list[Span]], int, dict[str, CompiledGuard]]:
    """One finder over every local response guard (for the stream masker), its hold-back, and
    which guard each span kind belongs to. PII spans keep their kind (the mask reads
    "[EMAIL]"); a deny span's kind is "<guard>:<label>" (it blocks, it is never shown)."""
    local = [g for g in guards if g.spec.type in ("pii", "deny")]
    holdback = max((g.max_length for g in local), default=0)
    owners: dict[str, CompiledGuard] = {}
    for guard in local:
        for kind in guard.kinds:
            owners.setdefault(kind, guard)

    def find(text: str) -> list[Span]:
        spans: list[Span] = []
        for guard in local:
            if guard.deny is not None:
                for s in guard.deny.find(text):
                    kind = f"{guard.name}:{s.kind}"
                    owners.setdefault(kind, guard)
                    spans.append(Span(s.start, s.end, kind))
            else:
                spans += find_all(text, guard.kinds)
        return _without_overlaps(spans)

    return find, holdback, owners


def _without_overlaps(spans: list[Span]) -> list[Span]:
    spans.sort(key=lambda s: (s.start, -(s.end - s.start)))
    out: list[Span] = []
    for span in spans:
        if not out or span.start >= out[-1].end:
            out.append(span)
    return out
