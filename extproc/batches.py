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

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import orjson

from . import ownership, routing, settlement
from .errors import GatewayError, bad_request
from .identity import Identity
from .quota.policy import Amounts
from .quota.service import requested_output
from .telemetry.report import RequestReport
from .usage import Usage
from .wire.base import Operation, file_references, json_object
from .wire.openai import OPENAI, form
from .wire.openai import objects as wire_objects
from .wire.openai.answer import count_of, io_usage
from .wire.openai.request import CHAT, COMPLETIONS, EMBEDDINGS

if TYPE_CHECKING:
    from .config import ResolvedTarget, Runtime
    from .quota.service import Reservation
    from .services import Services
    from .tokens import TokenCounter
    from .wire import Endpoint, ParsedRequest

log = logging.getLogger("extproc.batches")

# The endpoints a batch's lines may call: those whose requests the gateway counts.
BATCH_ENDPOINTS = {e.path: e for e in (CHAT, COMPLETIONS, EMBEDDINGS)}
# A batch runs within its 24 h completion window, but is settled only when the gateway sees it
# finished: its reservation waits as long as its record lasts, then is charged at its estimate
# (a settle after that could add nothing to it).
RESERVATION_TTL_S = ownership.TTL_S
# The upload's form fields passed on besides `purpose` and `file` (OpenAI's file expiry).
_EXPIRY_FIELDS = ("expires_after[anchor]", "expires_after[seconds]")
# A list's limits as OpenAI sets them, and the page the gateway asks the backend for, whose
# objects of the team's fill the client's page (each one's owner is looked up: a bounded page).
_MOST = {"file": 10_000, "batch": 100}
_DEFAULT_LIMIT = {"file": 10_000, "batch": 20}
_ASKED = {"file": 1_000, "batch": 100}
NOTHING = Amounts(0, 0, requests=0)  # what a batch that never ran used
# Uploads are read one at a time, on a thread of their own: a big one never takes the threads
# the guards, the audit and /metrics share, and never holds the event loop.
_READER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-upload")
# How many requests' counting budgets (sidecar.count_budget_ms) an upload's lines share.
UPLOAD_COUNT_BUDGETS = 20


@dataclass(frozen=True, slots=True)
class Prepared:
    """Where the call goes (the backend's target, through its model's route, with its
    credential), the body to send instead of the client's (None: the client's) and its
    Content-Type, and the path instead of the client's (None: the client's)."""

    target: ResolvedTarget
    body: bytes | None = None
    content_type: str | None = None
    path: str | None = None


@dataclass(frozen=True, slots=True)
class _Upload:
    """A batch input file as the gateway read it."""

    model: str
    counts: dict[str, Any]  # kept with the file's record: what a batch of it reserves
    lines: list[wire_objects.BatchLine]
    filename: str
    fields: list[tuple[str, str]]  # the form's other fields passed on (the file's expiry)


class ObjectCall:
    """One call of the Files or Batch API: what it asks of the backend, and what the gateway
    does with the answer (records, settles, filters)."""

    __slots__ = (
        "endpoint",
        "file",
        "limit",
        "owner",
        "report",
        "reservation",
        "rt",
        "services",
        "team",
        "who",
    )

    def __init__(
        self,
        services: Services,
        rt: Runtime,
        who: Identity,
        endpoint: Endpoint,
        report: RequestReport,
        owner: ownership.Owner | None = None,
    ) -> None:
        self.services, self.rt, self.endpoint = services, rt, endpoint
        self.who, self.team = who, who.team
        self.report = report
        self.owner = owner  # the object a call on one file or batch is about
        self.file: dict[str, Any] = {}  # an upload's counts, for its record
        self.reservation: Reservation | None = None  # a batch's, once created
        self.limit = 0  # a list's page size, as the client asked
        self.check_shared()

    @property
    def reads_answer(self) -> bool:
        """The answer passes the sidecar (a file's content goes to the client untouched)."""
        return self.endpoint is not wire_objects.FILE_CONTENT

    # -- the request ------------------------------------------------------------------------

    async def upload(self, raw: bytes, boundary: str) -> Prepared:
        """A batch input file: read, checked and counted off the event loop; what goes to the
        backend is built anew from what the gateway read (its lines, with the backend's name
        for the model), never the client's bytes, which a backend might read otherwise."""
        limit = self.rt.config.sidecar.max_body_bytes
        if len(raw) > limit:
            raise _too_large_file(limit)
        loop = asyncio.get_running_loop()
        upload = await loop.run_in_executor(_READER, self._read_upload, raw, boundary)
        self.report.model, self.report.endpoint = upload.model, self.endpoint.path
        target = self._target(upload.model)
        self.file = upload.counts
        content_type, body = await loop.run_in_executor(
            _READER, _rebuilt, upload, target.provider_model
        )
        self.owner = ownership.Owner(self.team, upload.model, target.backend)
        return Prepared(target, body, content_type)

    def _read_upload(self, raw: bytes, boundary: str) -> _Upload:
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
        unknown = sorted(set(fields) - {"purpose", *_EXPIRY_FIELDS})
        if unknown:
            raise bad_request(
                f"Unknown parameter: '{unknown[0]}'.", "unknown_parameter", unknown[0]
            )
        part = form.file_part(raw, "file")
        if part is None:
            raise bad_request("you must provide a file", "missing_required_parameter", "file")
        filename, content = part
        model, url, lines = self._batch_lines(content)
        tokens = self.services.tokens
        default_output = self.rt.config.quota.default_max_tokens
        prompt = output = 0
        # The whole file gets a few requests' counting time, well within the time Envoy waits
        # for the body's answer; past it, the rest is estimated.
        sidecar = self.rt.config.sidecar
        budget = min(UPLOAD_COUNT_BUDGETS * tokens.budget_s, sidecar.message_timeout_ms / 4000)
        deadline = time.perf_counter() + budget
        for _, parsed in lines:
            left = max(0.0, deadline - time.perf_counter())
            prompt += _count_line(tokens, parsed, left)
            output += requested_output(parsed, default_output)
        counts = {"url": url, "requests": len(lines), "prompt": prompt, "output": output}
        expiry = [(k, fields[k]) for k in _EXPIRY_FIELDS if k in fields]
        return _Upload(
            model, counts, [line for line, _ in lines], filename or "batch.jsonl", expiry
        )

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
            uncountable = _uncountable(line.body)
            if uncountable is not None:
                raise bad_request(
                    f"Line {line.number} of the batch input file holds {uncountable}: a batch "
                    "through this gateway carries text only, whose tokens it counts before the "
                    "batch runs",
                    "unsupported_batch_content",
                    "file",
                )
            if parsed.model not in models:
                routing.check_model(self.rt, self.who, parsed.model, endpoint)
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
        if not self.who.may_use(self.rt, file.model):
            raise ownership.unknown(ownership.FILE, file_id)
        target = self._target(file.model)
        if target.backend != file.backend:
            raise ownership.unknown(ownership.FILE, file_id)
        budgets = self.services.budgets
        specs = budgets.applicable(self.who, file.model)
        if specs:
            estimate = Amounts(
                int(counts.get("prompt", 0)),
                int(counts.get("output", 0)),
                requests=int(counts.get("requests", 1)),
            )
            self.reservation = await self.services.quota.reserve(
                self.rt.config,
                budgets.scope(self.team),
                file.model,
                specs,
                estimate,
                RESERVATION_TTL_S,
                who=self.who,
            )
        self.owner = file
        # What the gateway read goes on (a key given twice is read once, as here).
        return Prepared(target, orjson.dumps(body))

    def listing(self, raw_path: str) -> Prepared:
        """A list of files or batches goes to the backend of the team's batches: the one
        backend that runs batches among its models', or the one `?model=` names. It asks for
        the largest page, which the answer's filter fills the client's from."""
        path, _, query = raw_path.partition("?")
        params = parse_qsl(query, keep_blank_values=True)
        model = next((v for k, v in params if k == "model"), None)
        kind = self.endpoint.kind
        limit = next((v for k, v in params if k == "limit"), None)
        self.limit = _DEFAULT_LIMIT[kind]
        if limit is not None:
            if not limit.isdigit() or not 1 <= int(limit) <= _MOST[kind]:
                raise bad_request(
                    f"Invalid 'limit': must be between 1 and {_MOST[kind]}",
                    "invalid_value",
                    "limit",
                )
            self.limit = int(limit)
        # (`model` is the gateway's parameter, not the backend's.)
        passed = [(k, v) for k, v in params if k not in ("model", "limit")]
        passed.append(("limit", str(_ASKED[kind])))
        new_path = f"{path}?{urlencode(passed)}"
        if model is not None:
            return Prepared(self._target(model), path=new_path)
        backends: dict[str, ResolvedTarget] = {}
        for name in sorted(routing.usable_models(self.rt, self.who)):
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
        return Prepared(routing.with_token(target, self.services.backend_tokens), path=new_path)

    def check_shared(self) -> None:
        """Records kept per sidecar process would be found by one process in N: refused."""
        if not self.rt.config.records_shared:
            raise GatewayError(
                503,
                "Files and batches need a gateway whose sidecar processes share their records "
                "(one worker, or quota.store: redis)",
                "server_error",
                "records_not_shared",
            )

    def _target(self, model: str) -> ResolvedTarget:
        routing.visible_model(self.rt, self.who, model)
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

    async def answered(self, status: int, raw: bytes) -> bytes | None:
        """The body the client gets instead of the backend's (None: the backend's): a list
        holding the team's own objects only. Records what the answer created; settles the
        finished batches it shows."""
        store = self.services.quota.store
        endpoint = self.endpoint
        if not 200 <= status < 300:
            if self.reservation is not None:
                # The backend created no batch: nothing will run.
                settlement.settle_batch(self.services, self.reservation, NOTHING)
            return None
        if endpoint is wire_objects.FILE:
            return None  # (a delete is forgotten at the answer's headers)
        found = wire_objects.objects(raw)
        if found is None:
            if self.reservation is not None:
                log.warning("a batch's creation was answered with what is not JSON: it is "
                            "charged its reservation when that expires")  # fmt: skip
            raise GatewayError(
                502, "The backend's answer could not be read", "server_error", "bad_backend_answer"
            )
        if endpoint is wire_objects.UPLOAD or endpoint is wire_objects.CREATE_BATCH:
            created = found[0].get("id") if found else None
            if isinstance(created, str) and created and self.owner is not None:
                data: dict[str, Any] = self.file
                if endpoint is wire_objects.CREATE_BATCH:
                    res = self.reservation
                    # With who created it: its settlement charges their budgets.
                    data = (
                        {
                            "reservation": res.id,
                            "scope": res.scope,
                            "limits": [s.label for s in res.specs],
                            "user": self.who.user,
                            "key": self.who.key,
                        }
                        if res
                        else {}
                    )
                owner = ownership.Owner(self.team, self.owner.model, self.owner.backend, data)
                await ownership.record(store, endpoint.kind, created, owner)
            elif self.reservation is not None:
                log.warning("a batch was created but its answer names no id: it is charged "
                            "its reservation when that expires")  # fmt: skip
            return None
        # A retrieve, a cancel or a list: the team's own objects only; finished batches settled.
        owners: list[ownership.Owner | None] = [self.owner]
        if self.owner is None or len(found) != 1:
            ids = [o.get("id") for o in found]
            owners = await ownership.owners(
                store, endpoint.kind, [i if isinstance(i, str) else "" for i in ids]
            )
        kept = []
        for obj, holder in zip(found, owners, strict=True):
            if holder is None or holder.team != self.team:
                continue
            kept.append(obj)
            if endpoint.kind == ownership.BATCH:
                await self._batch_seen(obj, holder)
        if endpoint.operation is Operation.LIST_STORED:
            return wire_objects.with_objects(raw, kept, self.limit)
        return None

    async def _batch_seen(self, batch: dict[str, Any], owner: ownership.Owner) -> None:
        """A batch of the team's in an answer, finished: the files it made are the team's, and
        it is settled at what it used (once, whichever sidecar sees it first). (Its files
        exist once it is finished: a batch in progress needs nothing.)"""
        store = self.services.quota.store
        batch_id = batch.get("id")
        if batch.get("status") not in wire_objects.FINAL or not isinstance(batch_id, str):
            return
        if not await ownership.first_time(store, ownership.BATCH, batch_id):
            return
        for field in ("output_file_id", "error_file_id"):
            file_id = batch.get(field)
            if isinstance(file_id, str) and file_id:
                made = ownership.Owner(self.team, owner.model, owner.backend)
                await ownership.record(store, ownership.FILE, file_id, made)
        usage, amounts = _batch_usage(batch)
        reservation = None
        reservation_id = owner.data.get("reservation")
        if isinstance(reservation_id, str) and reservation_id:
            reservation = settlement.reservation_of(
                self.services,
                team=self.team,
                user=str(owner.data.get("user") or ""),
                key=str(owner.data.get("key") or ""),
                model=owner.model,
                reservation=reservation_id,
                limits=tuple(str(n) for n in owner.data.get("limits", ())),
                scope=str(owner.data.get("scope") or ""),
            )
        # Its own report: the batch's tokens are counted under its model, in its audit record.
        report = RequestReport(
            team=self.team,
            organization=self.who.organization,
            user=str(owner.data.get("user") or ""),
            key=str(owner.data.get("key") or ""),
            model=owner.model,
            endpoint=wire_objects.CREATE_BATCH.path,
            backend=owner.backend,
            provider="openai",
            status=200,
            request_id=batch_id[:128],
            path="batch",
        )
        status = batch.get("status")
        if status in ("failed", "expired"):
            report.code = f"provider_error:batch_{status}"  # (its audit record says how it ended)
        elif status == "cancelled":
            report.code = "batch_cancelled"
        settlement.finish_batch(self.services, report, reservation, usage, amounts)


def _batch_usage(batch: dict[str, Any]) -> tuple[Usage | None, Amounts | None]:
    """What a finished batch used: its `usage` and request counts; (None, zero) for one that
    ran nothing; (None, None) when it ran but reports no usage."""
    counts = batch.get("request_counts")
    ran = 0
    if isinstance(counts, dict):
        ran = sum(count_of(counts.get(k)) or 0 for k in ("completed", "failed"))
    reported = batch.get("usage")
    if not isinstance(reported, dict):
        if ran == 0 and isinstance(counts, dict):
            return None, NOTHING
        return None, None
    # (Both counts, or nothing read: a batch's usage names its input and its output; io_usage
    # reads nothing without the input's.)
    usage = io_usage(reported) if count_of(reported.get("output_tokens")) is not None else None
    if usage is None:
        return None, None
    amounts = Amounts(
        usage.prompt_tokens,
        usage.completion_tokens,
        requests=ran,
        cached_input_tokens=usage.cached_tokens,
        reasoning_tokens=usage.reasoning_tokens,
    )
    return usage, amounts


def _rebuilt(upload: _Upload, model: str) -> tuple[str, bytes]:
    """The upload as the backend gets it: a form of the gateway's own, its lines as read, with
    the backend's name for the model."""
    lines = b"".join(line.with_model(model) + b"\n" for line in upload.lines)
    return form.build([("purpose", "batch"), *upload.fields], [("file", upload.filename, lines)])


def _count_line(tokens: TokenCounter, parsed: ParsedRequest, budget: float) -> int:
    """A line's prompt tokens, counted as the endpoint's request is (in this thread)."""
    body, model = parsed.body, parsed.model
    if parsed.endpoint is CHAT:
        tools = body.get("tools") if isinstance(body.get("tools"), list) else None
        return tokens.count_chat(model, body["messages"], tools, budget=budget).tokens
    if parsed.endpoint is COMPLETIONS:
        return tokens.count_prompt(model, body["prompt"], budget=budget).tokens
    return tokens.count_embedding_input(model, body["input"], budget=budget).tokens


def _uncountable(body: dict[str, Any]) -> str | None:
    """What of a line's request the gateway cannot count before it runs (an image, audio, a
    file: their tokens depend on what the backend makes of them), or a file by id (it could be
    another team's); None when it is text only."""
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                return f"a content part of type '{kind}'"
    if file_references(body):
        return "a file by id"
    return None


def _too_large_file(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"The file is larger than this gateway's limit of {limit} bytes (sidecar.max_body_bytes)",
        "invalid_request_error",
        "request_too_large",
    )
