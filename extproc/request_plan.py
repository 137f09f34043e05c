"""What the downstream stage tells Envoy about an admitted request: a pure function of the
request, its target and the sidecar's settings, with no protobuf, no Envoy and no I/O.

The plan says which answer path the request is set on (observed, released to Envoy's access
log, or kept by this stage), the headers to set (the route, and for one backend its
credential), the body to send instead of the client's (rewritten, the provider's model name,
the stream's usage asked for), and the hand-over the finishing stage will read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from . import providers
from .contract import (
    ENDPOINT_HEADER,
    METADATA_NAMESPACE,
    POOL_HEADER,
    RATE_LIMIT_KEY,
    ROUTE_HEADER,
    TARGET_HEADER,
    Handover,
)
from .settlement import AnswerPath
from .wire.base import TOKENLESS
from .wire.openai import form
from .wire.openai.request import CHAT

if TYPE_CHECKING:
    from .config import ResolvedTarget, SidecarSettings
    from .identity import Identity
    from .wire.base import ParsedRequest, WireFormat


# Not frozen: a frozen dataclass costs ~1.5 µs more to build, on every request; neither is
# changed once built.
@dataclass(slots=True)
class Admitted:
    """A request that passed admission: who sent it, what it asks, what it was counted and
    reserved at. The finishing stage gets the parts it needs through the hand-over."""

    who: Identity
    request: ParsedRequest
    wire: WireFormat
    prompt_tokens: int
    max_output: int  # the most output it may produce, as reserved
    body_changed: bool = False  # a guard masked or rewrote the body
    response_guards: bool = False  # a response guard judges its answer
    pool: int = 0  # 1: a quota failover pinned it to the model's next pool
    reservation: str = ""  # the reservation's id; "" when nothing was reserved
    scope: str = ""  # the quota store's scope it was reserved in
    limits: tuple[str, ...] = ()  # the reservation's limit names, in order
    rate_headers: Mapping[str, str] | None = None  # x-ratelimit-* from the reservation
    started_at: float = 0.0  # wall clock: the finisher may run in another process
    traceparent: str = ""  # the request's span, for the finisher's child span
    audit: Mapping[str, Any] | None = None  # RequestReport.handover(), when auditing


@dataclass(slots=True)
class RequestPlan:
    observe: bool  # the stream observer is instantiated and follows a successful stream
    # A client of another API than OpenAI's chat completions is served as it speaks: its
    # backend's answer is in the client's API (routing.served_natively).
    native: bool
    # The request may have its backend store the answer for later calls (ownership.py).
    stores: bool
    release: bool  # the stage lets the request go with its body (AnswerPath.LOGGED)
    strip_usage: bool  # the gateway asked for the stream's usage: cut it from the client's
    set_headers: dict[str, str]
    remove_headers: list[str]
    body: bytes | None  # None: the client's body goes as it is
    handover: Handover
    metadata: dict[str, Any] = field(default_factory=dict)  # the request's dynamic metadata

    @property
    def path(self) -> AnswerPath:
        """The path as known before the answer: LOGGED when released, else decided by the
        answer's headers (settlement.answer_path)."""
        return AnswerPath.LOGGED if self.release else AnswerPath.NO_ANSWER


def plan(
    admitted: Admitted,
    target: ResolvedTarget | None,
    sidecar: SidecarSettings,
    adapted: bool = False,
    asks_usage: bool = True,
    native: bool = False,
    shared_records: bool = True,
) -> RequestPlan:
    """The plan for an admitted request. `target`: the one backend that can serve it (its route
    has no upstream stage), or None when Envoy chooses (a pool, a canary split). `adapted`:
    some backend of the model is not a plain OpenAI one (Runtime.adapted). `asks_usage`: every
    backend of the model takes a request for a stream's usage (Runtime.unasked_usage).
    `native`: a bridged API's client is served as it speaks (routing.served_natively).
    `shared_records`: every sidecar process sees the records of who owns a stored object (one
    process, or the Redis store: ownership.py).
    """
    request = admitted.request
    bridge = admitted.wire.bridge
    # A client of another API than OpenAI's (Anthropic's, ...): its answer always passes this
    # stage, to be translated or read as that API's. Bridged: not `native`: the request goes as
    # chat completions (wire/bridge.py), and from there as any OpenAI request does.
    foreign = bridge is not None
    native = foreign and native
    bridged = foreign and not native
    endpoint = request.endpoint.path
    body = request.body
    changed = admitted.body_changed
    remove_headers: list[str] = []
    if bridge is not None and bridged:
        body = bridge.request(request.endpoint, body)
        endpoint, changed = CHAT.path, True
        if request.stream and not asks_usage:
            # (Azure before 2024-09 refuses stream_options: its stream's usage is estimated.)
            body.pop("stream_options", None)
    # A backend that speaks another API: the request goes as that API's, and its answer is
    # translated here. Such a backend, or Azure's deployments, anywhere among the model's:
    # the sidecar sets the path and reads the answer (a translation, or Azure's errors made
    # OpenAI's), which never goes past it. (When Envoy chooses the backend, the upstream stage
    # adapts each attempt.)
    translated = target is not None and providers.translates(target.provider) and not native
    adapted = adapted or (target is not None and target.provider != "openai")
    # One backend, its answer accounted from Envoy's access log, no response guard: nothing of
    # the answer need pass the sidecar (the JSON answer's usage, or the usage report of a stream
    # whose client asked for one, reaches the access log through Envoy's usage filters).
    releasable = (
        target is not None
        and not adapted
        and not foreign
        # (Envoy's usage readers know chat's usage, not the input/output tokens of an image's
        # or a transcription's answer: those pass this stage.)
        and request.endpoint.operation not in TOKENLESS
        and sidecar.json_path == "access_log"
        and not admitted.response_guards
    )
    # A stream that brings its own usage report needs no stage to follow it when Envoy reads
    # the report: no observer on its response path (`stream_path: observe` keeps one, for the
    # chunk timings and an exact count of a stream cut short).
    envoy_reads = (
        releasable and request.stream and request.include_usage and sidecar.stream_path == "auto"
    )
    observe = (
        request.stream
        and not adapted
        and not foreign
        and not envoy_reads
        and not admitted.response_guards  # guards may change the stream: it goes inline
        and (
            sidecar.stream_path == "observe"
            or (sidecar.stream_path == "auto" and request.include_usage)
        )
    )
    stores = native and target is not None and shared_records
    if native and not stores:
        unstored = admitted.wire.unstored(body)
        if unstored is not None:
            # A Response stored by whichever backend Envoy picks, or recorded by one of several
            # sidecar processes that keep their records apart, could not be found again.
            body, changed = unstored, True
    set_headers = {ROUTE_HEADER: request.model}
    if target is not None:
        # This stage prepares the request for its one backend itself.
        set_headers[TARGET_HEADER] = target.backend
        if target.credential is not None:
            set_headers[target.auth_header] = target.credential
        if target.provider_model != request.model:
            body = {**body, "model": target.provider_model}
            changed = True
    if adapted:
        # The model's routes leave the path to the sidecar: each API has its own.
        if target is not None:
            set_headers[":path"] = providers.backend_path(target, endpoint, request.stream)
        else:
            set_headers[ENDPOINT_HEADER] = endpoint  # the upstream stage sets each attempt's
    elif bridged:
        # An OpenAI model's routes rewrite OpenAI's paths to the backend's.
        set_headers[":path"] = endpoint
    if translated:
        assert target is not None
        # Options of the provider's own API (Anthropic's betas) the client did not mean to send.
        remove_headers.extend(providers.provider(target.provider).strip_headers)
        # The provider's request names its model itself: the rewritten body is not needed.
        body_bytes: bytes | None = providers.request_body(
            target, request.body if not bridged else body, endpoint
        )
    elif request.form is not None:
        # A multipart body goes as the client sent it, but for the fields this stage changed.
        body_bytes = None
        if target is not None and target.provider_model != request.model:
            body_bytes = form.with_field(request.form, "model", target.provider_model)
        if admitted.body_changed and isinstance(request.body.get("prompt"), str):
            prompt = request.body["prompt"]  # (as a guard masked it)
            body_bytes = form.with_field(body_bytes or request.form, "prompt", prompt)
    else:
        body_bytes = orjson.dumps(body) if changed else None
    # (A translated stream always carries its usage: the relay cuts it when not asked for.)
    strip_usage = request.stream and not request.include_usage and not observe
    if strip_usage and not asks_usage:
        # (Azure before 2024-09 refuses stream_options: its stream's usage is estimated.)
        strip_usage = False
    if strip_usage and not translated:
        # Ask the backend for its usage report; the relay removes it again from what the
        # client sees, since the client did not ask for it.
        body_bytes = admitted.wire.with_usage_requested(body)
    if body_bytes is not None:
        # Envoy keeps the client's content-length for a mutated buffered body; the headers
        # are still held, so say the new length.
        set_headers["content-length"] = str(len(body_bytes))
    if admitted.pool:
        set_headers[POOL_HEADER] = str(admitted.pool)
    # With one backend, Envoy renders every header of the answer: nothing is left for this
    # stage to do once the request is sent, unless the answer must pass it (guards, an inline
    # stream, json_path: inline). Envoy's access log then brings every released request back
    # to be counted and (but for the streams the observer follows and finishes) settled.
    # (`json_path: inline` also keeps observed streams here until their headers: it is the
    # setting for an Envoy without the gateway's gRPC access log.)
    # (An observed stream has no response guard, so it is releasable whenever it is observed.)
    release = releasable and (observe or envoy_reads or not request.stream)
    handover = _handover(admitted, target, observe, release)
    data = handover.to_metadata()
    if admitted.rate_headers is not None:
        data[RATE_LIMIT_KEY] = dict(admitted.rate_headers)
    if admitted.pool:
        data["failover"] = "quota"
    return RequestPlan(
        observe=observe,
        native=native,
        stores=stores,
        release=release,
        strip_usage=strip_usage,
        set_headers=set_headers,
        remove_headers=remove_headers,
        body=body_bytes,
        handover=handover,
        metadata={METADATA_NAMESPACE: data},
    )


def _handover(
    admitted: Admitted, target: ResolvedTarget | None, observe: bool, release: bool
) -> Handover:
    request = admitted.request
    finisher: dict[str, Any] = {}
    if observe or release:
        # What the stage that finishes the request needs, in whichever sidecar process it
        # runs: the observer (a stream it follows) or the access log's reader.
        finisher = {
            "started_at": admitted.started_at,
            "reservation": admitted.reservation,
            "scope": admitted.scope,
            # Labels, in order, so a reload that changed the caller's limits is noticed.
            "limits": admitted.limits,
            "output_estimate": admitted.max_output,
            "output_cap": request.output_cap,
            "traceparent": admitted.traceparent,
        }
        if admitted.audit is not None:
            finisher.update(admitted.audit)
    # Also what Envoy renders into the answer's headers (RESPONSE_HEADER_KEYS): team, model
    # and, when one backend serves the request, the backend and its name for the model.
    who = admitted.who
    return Handover(
        team=who.team,
        organization=who.organization,
        user=who.user,
        key=who.key,
        model=request.model,
        endpoint=request.endpoint.path,
        wire=admitted.wire.name,
        stream=request.stream,
        prompt_tokens=admitted.prompt_tokens,
        observe=observe,
        # The answer goes to the client without this stage; Envoy's access log entry brings
        # its status (and a JSON answer's usage) to the sidecar (access_log.py).
        account=release,
        pool=admitted.pool,
        backend=target.backend if target is not None else "",
        provider_model=target.provider_model if target is not None else "",
        **finisher,
    )
