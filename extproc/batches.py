"""OpenAI's Files and Batch APIs through the gateway: a team's batches run on the backend that
serves their model, within the team's allow-list and quotas, and each team sees only its own
files and batches.

Every team reaches a backend with the gateway's one key, so the backend cannot tell them apart:
the gateway records who owns each file and batch (ownership.py) and passes a call on one only
for its owner. A batch's requests never pass the gateway one by one (the backend runs them),
so the gateway governs them where it can see them:

- The upload (`POST /v1/files`, purpose `batch`) is read whole: each line is checked as the
  endpoint's request would be (its model on the team's allow-list, one model for the file, a
  model one backend that runs batches serves alone, no guards for the team on it), counted
  (the prompt's tokens, the most output each line allows) and sent with the backend's name
  for the model. The counts are kept with the file's record. Other purposes are refused: a
  file the gateway cannot read is one it cannot govern.
- Creating the batch (`POST /v1/batches`) reserves the file's counts against the team's
  limits (tokens, USD, requests: one per line) for as long as a batch may run; a batch the
  backend refuses releases it.
- The reservation is settled once, at what the batch reports it used (its `usage`), the first
  time the gateway sees the batch finished (a retrieve, a cancel, a list); a batch that
  failed before it ran is released. One never seen finished is charged its reservation when
  that expires. The output and error files a batch names become its team's.
- Listing files or batches goes to the backend of the team's batches, the answer keeping
  only the team's own; `?model=` picks the backend when the team's models reach several.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson

from . import ownership, routing, settlement
from .errors import GatewayError, bad_request
from .quota.policy import Amounts, applicable
from .quota.service import requested_output
from .usage import Usage
from .wire.base import json_object
from .wire.openai import OPENAI, form
from .wire.openai import objects as wire_objects
from .wire.openai.request import CHAT, COMPLETIONS, EMBEDDINGS

if TYPE_CHECKING:
    from .config import ResolvedTarget, Runtime
    from .quota.service import Reservation
    from .services import Services
    from .telemetry.report import RequestReport
    from .wire import Endpoint, ParsedRequest

log = logging.getLogger("extproc.batches")

# The endpoints a batch's lines may call: those whose requests the gateway counts.
BATCH_ENDPOINTS = {e.path: e for e in (CHAT, COMPLETIONS, EMBEDDINGS)}
# A batch runs within its 24 h completion window, then finalizes: its reservation waits so
# long for the settle before it is charged at its estimate.
RESERVATION_TTL_S = 26 * 3600.0
NOTHING = Amounts(0, 0, requests=0)  # what a batch that never ran used
# How many requests' counting budgets (sidecar.count_budget_ms) an upload's lines share.
UPLOAD_COUNT_BUDGETS = 20


@dataclass(frozen=True, slots=True)
class Prepared:
    """Where the call goes (the backend's target, through its model's route, with its
    credential) and the body to send instead of the client's (None: the client's)."""

    target: ResolvedTarget
    body: bytes | None = None


class ObjectCall:
    """One call of the Files or Batch API: what it asks of the backend, and what the gateway
    does with the answer (records, settles, filters)."""

    __slots__ = ("endpoint", "file", "owner", "report", "reservation", "rt", "services", "team")

    def __init__(
        self,
        services: Services,
        rt: Runtime,
        team: str,
        endpoint: Endpoint,
        report: RequestReport,
        owner: ownership.Owner | None = None,
    ) -> None:
        self.services, self.rt, self.team, self.endpoint = services, rt, team, endpoint
        self.report = report
        self.owner = owner  # the object a call on one file or batch is about
        self.file: dict[str, Any] = {}  # an upload's counts, for its record
        self.reservation: Reservation | None = None  # a batch's, once created

    @property
    def reads_answer(self) -> bool:
        """The answer passes the sidecar (a file's content goes to the client untouched)."""
        return self.endpoint is not wire_objects.FILE_CONTENT

    # -- the request ------------------------------------------------------------------------

    async def upload(self, raw: bytes, boundary: str) -> Prepared:
        """A batch input file: read, checked and counted; sent with the backend's model names."""
        limit = self.rt.config.sidecar.max_body_bytes
        if len(raw) > limit:
            raise _too_large_file(limit)
        fields = form.fields(raw, boundary)
        purpose = fields.get("purpose")
        if not purpose:
            raise bad_request("you must provide a purpose", "missing_required_parameter", "purpose")
        if purpose != "batch":
            raise bad_request(
                f"This gateway stores files for batches only (purpose 'batch'), not '{purpose}'",
                "unsupported_purpose",
                "purpose",
            )
        content = form.file_content(raw, "file")
        if content is None:
            raise bad_request("you must provide a file", "missing_required_parameter", "file")
        model, url, lines = self._batch_lines(content)
        self.report.model, self.report.endpoint = model, self.endpoint.path
        target = self._target(model)
        default_output = self.rt.config.quota.default_max_tokens
        prompt = output = 0
        tokens = self.services.tokens
        # The whole file gets a few requests' counting time (past it, lines are estimated).
        deadline = time.perf_counter() + UPLOAD_COUNT_BUDGETS * tokens.budget_s
        for _, parsed in lines:
            left = max(0.0, deadline - time.perf_counter())
            counted = await OPENAI.count_prompt(tokens, parsed, team=self.team, budget=left)
            prompt += counted.tokens
            output += requested_output(parsed, default_output)
        self.file = {"url": url, "requests": len(lines), "prompt": prompt, "output": output}
        body = None
        if target.provider_model != model:
            rewritten = b"".join(
                line.with_model(target.provider_model) + b"\n" for line, _ in lines
            )
            body = form.with_file(raw, "file", rewritten)
        self.owner = ownership.Owner(self.team, model, target.backend)
        self.report.backend, self.report.provider_model = target.backend, target.provider_model
        return Prepared(target, body)

    def _batch_lines(
        self, content: bytes
    ) -> tuple[str, str, list[tuple[wire_objects.BatchLine, ParsedRequest]]]:
        """(the file's one model, its one url, each line with its request as parsed)."""
        models, urls = set(), set()
        lines = []
        for line in wire_objects.batch_lines(content):
            endpoint = BATCH_ENDPOINTS.get(line.url)
            if endpoint is None:
                raise bad_request(
                    f"Line {line.number} of the batch input file calls {line.url}: batches "
                    f"through this gateway call {', '.join(BATCH_ENDPOINTS)}",
                    "unsupported_batch_endpoint",
                    "file",
                )
            urls.add(line.url)
            try:
                parsed = OPENAI.parse(endpoint, orjson.dumps(line.body))
            except GatewayError as err:
                raise bad_request(
                    f"Line {line.number} of the batch input file: {err.message}",
                    err.code or "invalid_batch_file",
                    "file",
                ) from None
            if parsed.stream:
                raise bad_request(
                    f"Line {line.number} of the batch input file asks for a stream",
                    "invalid_batch_file",
                    "file",
                )
            if parsed.model not in models:
                routing.check_model(self.rt, self.team, parsed.model, endpoint)
                models.add(parsed.model)
            lines.append((line, parsed))
        if len(models) > 1 or len(urls) > 1:
            raise bad_request(
                "A batch input file calls one endpoint with one model: this one names "
                f"{', '.join(sorted(urls | models))}",
                "mixed_batch_file",
                "file",
            )
        return models.pop(), urls.pop(), lines

    async def create_batch(self, raw: bytes) -> Prepared:
        """The batch's file must be the team's, uploaded through the gateway (its counts are
        reserved against the team's limits for as long as the batch may run)."""
        body = json_object(raw)
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str) or not file_id:
            raise bad_request(
                "you must provide an input_file_id", "missing_required_parameter", "input_file_id"
            )
        store = self.services.quota.store
        file = await ownership.owned(store, ownership.FILE, file_id, self.team)
        self.report.model, self.report.endpoint = file.model, self.endpoint.path
        counts = file.data
        if "requests" not in counts:
            raise bad_request(
                f"The file {file_id} is not a batch input file uploaded through this gateway",
                "invalid_input_file",
                "input_file_id",
            )
        if body.get("endpoint") != counts.get("url"):
            raise bad_request(
                f"The file {file_id} holds requests to {counts.get('url')}: the batch's "
                "endpoint must be the same",
                "invalid_value",
                "endpoint",
            )
        if not self.rt.may_use(self.team, file.model):
            raise ownership.unknown(ownership.FILE, file_id)
        target = self._target(file.model)
        if target.backend != file.backend:
            raise ownership.unknown(ownership.FILE, file_id)
        specs = applicable(self.services.limits.get(self.team, ()), file.model)
        if specs:
            estimate = Amounts(
                int(counts.get("prompt", 0)),
                int(counts.get("output", 0)),
                requests=int(counts.get("requests", 1)),
            )
            self.reservation = await self.services.quota.reserve(
                self.rt.config, self.team, file.model, specs, estimate, RESERVATION_TTL_S
            )
        self.owner = file
        self.report.backend, self.report.provider_model = target.backend, target.provider_model
        return Prepared(target)

    def listing(self, query: str) -> Prepared:
        """A list of files or batches goes to the backend of the team's batches: the one
        backend that runs batches among its models', or the one `?model=` names."""
        model = _query_value(query, "model")
        if model is not None:
            return Prepared(self._target(model))
        backends: dict[str, ResolvedTarget] = {}
        for name in sorted(self.rt.team_models.get(self.team, ())):
            target = routing.fixed_target(self.rt, name)
            if target is not None and self._runs_batches(target):
                backends.setdefault(target.backend, target)
        if len(backends) != 1:
            raise bad_request(
                "Name a model whose backend to list (?model=): "
                + (
                    "none of your models runs batches through this gateway"
                    if not backends
                    else "your models' batches run on several backends"
                ),
                "model_required",
                "model",
            )
        (target,) = backends.values()
        return Prepared(routing.with_token(target, self.services.backend_tokens))

    def _target(self, model: str) -> ResolvedTarget:
        routing.visible_model(self.rt, self.team, model)
        target = routing.fixed_target(self.rt, model)
        if target is None or not self._runs_batches(target):
            raise bad_request(
                f"The model `{model}` does not run batches through this gateway",
                "batches_not_supported",
                "model",
            )
        request_guards, response_guards = self.services.guards.lists(self.team, model)
        if request_guards or response_guards:
            # A batch's requests and answers never pass the gateway: nothing could judge them.
            raise GatewayError(
                403,
                f"Batches are not run for the model `{model}`: guards apply to your team's "
                "requests to it, and a batch's requests and answers do not pass the gateway",
                "invalid_request_error",
                "batch_guarded",
                "model",
            )
        return routing.with_token(target, self.services.backend_tokens)

    def _runs_batches(self, target: ResolvedTarget) -> bool:
        backend = self.rt.config.backends.get(target.backend)
        return backend is not None and backend.runs_batches

    # -- the answer ---------------------------------------------------------------------------

    async def answered(self, status: int, raw: bytes) -> tuple[bytes | None, Usage | None]:
        """(the body the client gets instead of the backend's, None: the backend's; the usage
        of a batch this answer settled, to count once)."""
        store = self.services.quota.store
        operation = self.endpoint.operation
        if not 200 <= status < 300:
            if self.reservation is not None:
                # The backend created no batch: nothing will run.
                settlement.settle_batch(self.services, self.reservation, NOTHING)
            return None, None
        if operation is wire_objects.UPLOAD.operation:
            file_id = wire_objects.file_id(raw)
            if file_id is not None and self.owner is not None:
                owner = ownership.Owner(self.team, self.owner.model, self.owner.backend, self.file)
                await ownership.record(store, ownership.FILE, file_id, owner)
            return None, None
        if self.endpoint is wire_objects.FILE and self.owner is not None:
            return None, None  # (a delete is forgotten at the answer's headers)
        found = wire_objects.objects(raw)
        if operation is wire_objects.CREATE_BATCH.operation:
            batch = found[0] if found else {}
            batch_id = batch.get("id")
            if isinstance(batch_id, str) and self.owner is not None:
                data: dict[str, Any] = {}
                res = self.reservation
                if res is not None:
                    data = {"reservation": res.id, "limits": [s.name for s in res.specs]}
                owner = ownership.Owner(self.team, self.owner.model, self.owner.backend, data)
                await ownership.record(store, ownership.BATCH, batch_id, owner)
            elif self.reservation is not None:
                log.warning("a batch was created but its answer names no id: it is charged "
                            "its reservation when that expires")  # fmt: skip
            return None, None
        # A retrieve, a cancel or a list: the team's own objects only; finished batches settled.
        ids = [o.get("id") for o in found]
        kind = self.endpoint.kind
        owners: list[ownership.Owner | None] = [self.owner]
        if self.owner is None or len(found) != 1:
            owners = await ownership.owners(
                store, kind, [i if isinstance(i, str) else "" for i in ids]
            )
        kept, usage = [], None
        for obj, holder in zip(found, owners, strict=True):
            if holder is None or holder.team != self.team:
                continue
            kept.append(obj)
            if kind == ownership.BATCH:
                settled = await self._batch_seen(obj, holder)
                if settled is not None:
                    usage = _added(usage, settled)
        if operation is wire_objects.FILE_LIST.operation:
            return wire_objects.with_objects(raw, kept), usage
        return None, usage

    async def _batch_seen(self, batch: dict[str, Any], owner: ownership.Owner) -> Usage | None:
        """A batch of the team's in an answer: the files it made are the team's; finished, its
        reservation is settled at what it used (once, whichever sidecar sees it first)."""
        store = self.services.quota.store
        for field in ("output_file_id", "error_file_id"):
            file_id = batch.get(field)
            if isinstance(file_id, str) and file_id:
                made = ownership.Owner(self.team, owner.model, owner.backend)
                await ownership.record(store, ownership.FILE, file_id, made)
        batch_id = batch.get("id")
        if batch.get("status") not in wire_objects.FINAL or not isinstance(batch_id, str):
            return None
        if not await ownership.first_time(store, ownership.BATCH, batch_id):
            return None
        usage, amounts = _batch_usage(batch)
        reservation_id = owner.data.get("reservation")
        if isinstance(reservation_id, str) and reservation_id:
            quota = self.services.quota
            specs = applicable(self.services.limits.get(self.team, ()), owner.model)
            limits = tuple(str(n) for n in owner.data.get("limits", ()))
            reservation = quota.handed_over(
                self.rt.config, self.team, owner.model, reservation_id, limits, specs
            )
            if amounts is not None:
                settlement.settle_batch(self.services, reservation, amounts)
            # (No usage reported of a batch that ran: its reservation is charged as it stands,
            # when it expires.)
        self.report.model = owner.model
        return usage


def _batch_usage(batch: dict[str, Any]) -> tuple[Usage | None, Amounts | None]:
    """What a finished batch used: its `usage` and request counts; (None, zero) for one that
    ran nothing; (None, None) when it ran but reports no usage."""
    counts = batch.get("request_counts")
    ran = 0
    if isinstance(counts, dict):
        ran = sum(v for k, v in counts.items() if k in ("completed", "failed") and _count(v))
    reported = batch.get("usage")
    if not isinstance(reported, dict):
        if ran == 0 and isinstance(counts, dict):
            return None, NOTHING
        return None, None
    input_tokens, output_tokens = reported.get("input_tokens"), reported.get("output_tokens")
    if not isinstance(input_tokens, int) or not isinstance(output_tokens, int):
        return None, None
    if not (_count(input_tokens) and _count(output_tokens)):
        return None, None
    details_in = reported.get("input_tokens_details")
    details_out = reported.get("output_tokens_details")
    cached = details_in.get("cached_tokens", 0) if isinstance(details_in, dict) else 0
    reasoning = details_out.get("reasoning_tokens", 0) if isinstance(details_out, dict) else 0
    cached = cached if _count(cached) else 0
    reasoning = reasoning if _count(reasoning) else 0
    usage = Usage(
        input_tokens,
        output_tokens,
        input_tokens + output_tokens,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
    )
    amounts = Amounts(
        input_tokens,
        output_tokens,
        requests=ran,
        cached_input_tokens=cached,
        reasoning_tokens=reasoning,
    )
    return usage, amounts


def _added(a: Usage | None, b: Usage) -> Usage:
    if a is None:
        return b
    return Usage(
        a.prompt_tokens + b.prompt_tokens,
        a.completion_tokens + b.completion_tokens,
        a.total_tokens + b.total_tokens,
        cached_tokens=a.cached_tokens + b.cached_tokens,
        reasoning_tokens=a.reasoning_tokens + b.reasoning_tokens,
    )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _query_value(query: str, name: str) -> str | None:
    values = parse_qs(query).get(name)
    return values[0] if values else None


def _too_large_file(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"The file is larger than this gateway's limit of {limit} bytes (sidecar.max_body_bytes)",
        "invalid_request_error",
        "request_too_large",
    )
