"""The ext_proc gRPC server: streams, health, config reload, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .access_log import AccessLogReceiver
from .admin.keys_service import KeyAdmin
from .admin.service import ConfigAdmin, QuotaAdmin
from .admin.v1 import config_pb2_grpc, keys_pb2_grpc, quota_pb2_grpc
from .backend_tokens import BackendTokens
from .config import (
    WORKER_ENV,
    AuditSettings,
    Config,
    ConfigError,
    Runtime,
    load_runtime,
    parse_address,
)
from .contract import (
    DOWNSTREAM_STAGE,
    OBSERVE_STAGE,
    STAGE_METADATA,
    STAGES,
    UPSTREAM_STAGE,
)
from .downstream import DownstreamStream
from .guard.llm import GuardClient
from .guard.pipeline import Guardrails
from .keys.directory import KeyDirectory
from .keys.settings import make_directory
from .observer import ObservedStream
from .quota.budgets import Budgets, moved_teams
from .quota.service import QuotaService
from .quota.store import StoreUnavailable
from .services import Services
from .streams import RELEASED
from .telemetry import tracing as tracing_mod
from .telemetry.audit import AuditLog, AuditTrail
from .telemetry.exposition import MetricsServer
from .telemetry.metrics import CONFIG_RELOADS, EXT_PROC_STREAMS, PHASE_SECONDS, process_exited
from .tokens import TokenCounter
from .upstream import UpstreamStream

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("extproc.server")


SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


_PHASES = ("request_headers", "request_body", "response_headers", "response_body")
# The histogram children, looked up once: a message costs two clock reads and one observe.
_PHASE_TIMERS = {
    (stage, phase): PHASE_SECONDS.labels(stage, phase) for stage in STAGES for phase in _PHASES
}
_STREAM_GAUGES = {stage: EXT_PROC_STREAMS.labels(stage) for stage in STAGES}


class ExternalProcessor(ext_proc_grpc.ExternalProcessorServicer):
    def __init__(self, services: Services) -> None:
        self.services = services
        self.active = 0

    async def Process(self, request_iterator, context):
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        stage = metadata.get(STAGE_METADATA)
        stream: DownstreamStream | UpstreamStream | ObservedStream
        if stage == OBSERVE_STAGE:
            stream = ObservedStream(self.services)
        elif stage == UPSTREAM_STAGE:
            stream = UpstreamStream(self.services, metadata)
        else:
            stage = DOWNSTREAM_STAGE
            stream = DownstreamStream(self.services, metadata)
        gauge = _STREAM_GAUGES[stage]
        gauge.inc()
        self.active += 1
        try:
            async for request in request_iterator:
                started = time.perf_counter()
                try:
                    # The observer answers nothing: Envoy neither waits for it nor reads it.
                    answer = await stream.handle(request)
                except Exception:
                    # A bug must cost one request, not the process or the other streams.
                    log.exception("internal error while processing a stream")
                    stream.failed()  # reported as the gateway's error, not a cancellation
                    await context.abort(grpc.StatusCode.INTERNAL, "extproc internal error")
                timer = _PHASE_TIMERS.get((stage, request.WhichOneof("request")))
                if timer is not None:
                    timer.observe(time.perf_counter() - started)
                if answer is not None:
                    yield answer
                if stream.finished:
                    # Nothing more will come on this stream (the rest of the request needs no
                    # phase of this stage): close it now, so a long response does not hold it
                    # open; Envoy carries on without it.
                    break
        finally:
            self.active -= 1
            gauge.dec()
            # Also on cancellation (the client went away): settlement runs as its own task.
            stream.close()


def released_horizon(cfg: Config) -> float:
    """How long a released answer may take: the longest route timeout (0 is none: 10 min)."""
    return max((b.timeout_s or 600.0) for b in cfg.backends.values()) + 10.0


def build_runtime_parts(runtime: Runtime) -> tuple[Runtime, TokenCounter]:
    """The blocking part of (re)loading: tokenizer files are read here, off the event loop."""
    cfg = runtime.config
    overrides = {name: m.encoding for name, m in cfg.models.items() if m.encoding}
    counter = TokenCounter(
        cfg.sidecar.default_encoding, overrides, cfg.sidecar.count_budget_ms / 1000
    )
    wanted = {cfg.sidecar.default_encoding} | {counter.encoding_name_for(n) for n in cfg.models}
    # Loading an encoding takes most of a second: do it here, never on a request. An encoding
    # that cannot load is announced by the counter, and its counts become estimates.
    counter.preload(sorted(wanted))
    return runtime, counter


def build_services(
    runtime: Runtime,
    tokens: TokenCounter | None = None,
    quota: QuotaService | None = None,
    guard_client: GuardClient | None = None,
    tracing: tracing_mod.Tracing = tracing_mod.DISABLED,
    audit: AuditTrail | None = None,
    backend_tokens: BackendTokens | None = None,
    keys: KeyDirectory | None = None,
) -> Services:
    if tokens is None:
        runtime, tokens = build_runtime_parts(runtime)
    cfg = runtime.config
    # Keep the store (and its counters) across reloads unless its own settings changed.
    if quota is None or quota.settings != cfg.quota:
        quota = QuotaService.from_settings(cfg.quota)
    return Services(
        runtime=runtime,
        tokens=tokens,
        quota=quota,
        budgets=Budgets.of(cfg),
        guards=Guardrails.from_config(cfg, runtime.guard_keys),
        guard_client=guard_client or GuardClient(),
        backend_tokens=backend_tokens or BackendTokens(),
        tracing=tracing,
        audit=audit,
        keys=keys,
    )


def configure_audit(trail: AuditTrail, settings: AuditSettings) -> AuditLog | None:
    """Point the trail where the settings say; returns the log it retired (to be closed)."""
    path = worker_path(settings.path) if settings.path is not None else None
    try:
        return trail.configure(path, settings.max_bytes, settings.backups)
    except OSError as exc:
        raise ConfigError(
            [("observability.audit.path", f"cannot open {path}: {exc.strerror}")]
        ) from None


def worker_path(path: Path) -> Path:
    """Each worker process writes its own file (rotation is not safe across processes):
    audit.jsonl becomes audit-w0.jsonl, audit-w1.jsonl, ..."""
    worker = os.environ.get(WORKER_ENV)
    return path if worker is None else path.with_name(f"{path.stem}-w{worker}{path.suffix}")


class Sidecar:
    def __init__(
        self,
        config_path: str | os.PathLike[str],
        listen: str | None = None,
        tracer_provider: TracerProvider | None = None,  # tests: an in-memory exporter
    ) -> None:
        self.config_path = Path(config_path)
        runtime = load_runtime(self.config_path)
        self.listen = listen or runtime.config.sidecar.listen
        obs = runtime.config.observability
        self.audit_trail = AuditTrail()
        self.tracing = tracing_mod.from_settings(obs.tracing, tracer_provider)
        self.worker = os.environ.get(WORKER_ENV) is not None
        listen_metrics = obs.metrics.listen
        self.metrics_server = (
            MetricsServer(listen_metrics, reuse_port=self.worker) if listen_metrics else None
        )
        keys = runtime.config.keys
        # Run-time keys: one directory for the process's life (a reload that changes `keys`
        # is applied at the next restart: the directory's store and its polls stay).
        self.keys = (
            make_directory(keys, quota=runtime.config.quota, config_path=self.config_path)
            if keys.enabled
            else None
        )
        self.processor = ExternalProcessor(
            build_services(
                runtime, tracing=self.tracing, audit=self._audit(obs.audit), keys=self.keys
            )
        )
        self.health = health.aio.HealthServicer()
        self.access_log = AccessLogReceiver(lambda: self.processor.services)
        RELEASED.horizon_s = released_horizon(runtime.config)
        self.server: grpc.aio.Server | None = None
        self._mtime = self._stat()
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.bound_port: int | None = None

    def _audit(self, settings: AuditSettings) -> AuditTrail | None:
        configure_audit(self.audit_trail, settings)
        return self.audit_trail if self.audit_trail.log is not None else None

    def _stat(self) -> float | None:
        try:
            return self.config_path.stat().st_mtime_ns
        except OSError:
            return None

    @property
    def services(self) -> Services:
        return self.processor.services

    async def reload(self) -> tuple[bool, list[str]]:
        """Swap in a new config if it is valid; otherwise keep serving the old one.
        Returns whether it was applied, and every problem found when not."""
        async with self._reload_lock:  # a file change and a SIGHUP at once: one at a time
            try:
                # Parsing, secret files and tokenizer loads stay off the event loop.
                runtime, tokens = await asyncio.to_thread(
                    lambda: build_runtime_parts(load_runtime(self.config_path))
                )
            except ConfigError as exc:
                return _rejected(exc)
            old = self.processor.services
            try:
                # Opening files: off the loop. Streams keep writing to the current log.
                retired = await asyncio.to_thread(
                    configure_audit, self.audit_trail, runtime.config.observability.audit
                )
            except ConfigError as exc:
                return _rejected(exc)
            audit = self.audit_trail if self.audit_trail.log is not None else None
            # The first tokens of backends new to this config, before anything can use them.
            await old.backend_tokens.prepare(runtime)
            if runtime.config.keys != old.runtime.config.keys:
                log.warning("the keys section changed: it takes effect when the sidecar restarts")
            fresh = build_services(
                runtime, tokens, old.quota, old.guard_client, self.tracing, audit,
                old.backend_tokens, self.keys,
            )  # fmt: skip
            for team, before, after in moved_teams(old.budgets, fresh.budgets):
                log.warning(
                    "team %s moved from quota scope %s to %s (organization changed): its "
                    "counters, its users' and keys' start again from zero in their current "
                    "windows (docs/identities.md)",
                    team,
                    before,
                    after,
                )
            if fresh.quota is not old.quota:
                await self._warm_up_quota_store(fresh.quota)
            self.processor.services = fresh  # one assignment: a stream sees old or new, whole
            await fresh.backend_tokens.retire(runtime)  # the old config's, no longer served
            RELEASED.horizon_s = released_horizon(fresh.runtime.config)
            CONFIG_RELOADS.labels("applied").inc()
            if fresh.quota is not old.quota:
                # Streams admitted before the reload settle through the old service: what
                # fails there (its store is closed now) is retried by the new one.
                old.quota.hand_over_to(fresh.quota)
                await old.quota.drain()
                await old.quota.store.close()
            if retired is not None:
                await asyncio.to_thread(retired.close)  # nothing writes to it any more
            log.info("config reloaded from %s (sha256 %s)", self.config_path, runtime.digest[:12])
            return True, []

    async def _admin_reload(self) -> tuple[bool, list[str]]:
        """`extproc reload` lands on one worker: the supervisor passes it on to all of them."""
        result = await self.reload()
        if result[0] and self.worker:
            os.kill(os.getppid(), signal.SIGHUP)
        return result

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            mtime = self._stat()
            if mtime != self._mtime:
                self._mtime = mtime
                await self.reload()

    async def start(self) -> None:
        # A body message carries up to max_body_bytes, and its answer a rewritten copy.
        message_limit = 2 * self.services.runtime.config.sidecar.max_body_bytes + (1 << 20)
        options = [
            ("grpc.max_receive_message_length", message_limit),
            ("grpc.max_send_message_length", message_limit),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Workers share the address; a lone sidecar must fail loudly on a taken port
            # rather than silently share it with a stale process.
            ("grpc.so_reuseport", 1 if self.worker else 0),
        ]
        self.server = grpc.aio.server(options=options)
        ext_proc_grpc.add_ExternalProcessorServicer_to_server(self.processor, self.server)
        quota_pb2_grpc.add_QuotaAdminServicer_to_server(
            QuotaAdmin(lambda: self.processor.services, lambda: self.processor.active),
            self.server,
        )
        config_pb2_grpc.add_ConfigAdminServicer_to_server(
            ConfigAdmin(lambda: self.processor.services, self._admin_reload, str(self.config_path)),
            self.server,
        )
        keys_pb2_grpc.add_KeyAdminServicer_to_server(
            KeyAdmin(lambda: self.processor.services, self.keys), self.server
        )
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.access_log, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        host, port = parse_address(self.listen)
        target = host if port is None else f"{_bracket(host)}:{port}"
        self.bound_port = self.server.add_insecure_port(target)
        if port is not None and self.bound_port == 0:
            raise OSError(f"cannot listen on {self.listen}")
        await self.server.start()
        if self.metrics_server is not None:
            await self.metrics_server.start()
        await self._warm_up_quota_store(self.services.quota)
        if self.keys is not None:
            await self.keys.start()  # a store that does not answer is logged, not fatal
        # Before Envoy sends anything: a backend's identity token (a failed fetch is retried in
        # the background; its requests get a 503 that says why meanwhile).
        await self.services.backend_tokens.configure(self.services.runtime)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("extproc sidecar listening on %s", target if port is None else self.bound_port)

    async def _warm_up_quota_store(self, quota: QuotaService) -> None:
        try:
            await quota.store.warm_up()
        except StoreUnavailable as exc:
            # Not fatal: the failure policy applies per request until the store answers.
            log.error(
                "quota store unavailable at start-up (%s); failure_mode=%s applies until it "
                "answers",
                exc,
                quota.settings.failure_mode,
            )

    def _draining(self) -> bool:
        return bool(self.processor.active or (RELEASED.pending and self.access_log.streams))

    async def stop(self, grace: float) -> None:
        # Tell Envoy's health checker first so new streams go elsewhere, then drain.
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            # Keep serving while draining: Envoy's health check stops new streams coming here,
            # and an access log stream Envoy opens meanwhile (one per Envoy worker thread, at
            # its first entry) must still be accepted, or the entries of answers this process
            # released are lost. Wait for the ext_proc streams, then for those entries (they
            # come when each answer has been sent, while an Envoy is connected to send them),
            # then end everything left, the access log streams included.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    # Counts kept by every stream: polled once at shutdown, not signalled.
                    while self._draining():  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
            if RELEASED.pending:
                log.warning(
                    "%d answer(s) still unaccounted at shutdown: their reservations expire at "
                    "their estimate",
                    RELEASED.pending,
                )
            await self.server.stop(None)
        quota = self.processor.services.quota
        await quota.drain()  # settlements of the last requests
        await quota.store.close()
        await self.processor.services.guard_client.close()
        await self.processor.services.backend_tokens.close()
        if self.keys is not None:
            await self.keys.close()
        await asyncio.to_thread(self.audit_trail.close)  # every record on disk
        await asyncio.to_thread(self.tracing.shutdown)  # the spans still batched
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        process_exited(os.getpid())  # this worker's live gauges stop counting

    async def run(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        reloads: set[asyncio.Task] = set()

        def _on_sighup() -> None:
            task = asyncio.create_task(self.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, _on_sighup)
        interval = self.services.runtime.config.sidecar.reload_interval_s
        watcher = asyncio.create_task(self._watch(interval)) if interval > 0 else None
        await self._stopping.wait()
        grace = self.services.runtime.config.sidecar.grace_s
        log.info(
            "shutting down: draining %d active stream(s), up to %.0fs", self.processor.active, grace
        )
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self.stop(grace)


def _rejected(exc: ConfigError) -> tuple[bool, list[str]]:
    log.error("config reload rejected, still serving the previous config:\n%s", exc)
    CONFIG_RELOADS.labels("rejected").inc()
    return False, [f"{path or '<root>'}: {msg}" for path, msg in exc.problems]


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve(config_path: str, listen: str | None = None) -> int:
    sidecar = Sidecar(config_path, listen)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(sidecar.run())
    else:
        uvloop.run(sidecar.run())
    return 0
