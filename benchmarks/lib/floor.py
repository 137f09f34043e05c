"""The floor: a do-nothing ext_proc server in Python, for the benchmark's "floor" target.

The same Envoy and filter shape as the gateway (the gateway's own rendered bootstrap, its
sidecar cluster pointed here) talking to a Python gRPC server that does no work: no auth, no
token counting, no quota, no parsing. What the gateway costs above this floor is the sidecar's
own work; what the floor costs above Envoy alone is the price of any Python ext_proc server
behind this Envoy config.

It answers the messages the gateway's sidecar answers, in the same exchange, each with the
smallest answer of its kind:

- downstream stage (no stage metadata): request headers -> an empty headers answer; request
  body -> the routing headers the model's route matches (`--model`, and `--target` when the
  route also matches the one backend the sidecar prepared the request for) with
  clear_route_cache, the only change Envoy needs to route the request, and the request's
  path, decided per request (`FloorProcessor.plan`) as extproc/request_plan.py decides it:
  - released: the answer also sets `account: true` in the request's dynamic metadata (and
    `observe: true` when the stream observer follows it) and the stream ends there, as the
    sidecar does when it releases a request to Envoy: Envoy then sends the answer's access
    log entry here, and no response message. `--release` says the gateway releases what it
    can (one backend, `json_path: access_log`, no response guard): a JSON chat request (the
    chat benchmark's, whose answers are exactly those of before this decision existed), a
    stream whose client asked for usage with `--stream-path auto` (Envoy reads its usage
    report), and with `--stream-path observe` every stream (the observer follows it).
  - kept: every later message gets an empty answer, but for the response headers of an
    event stream (`content-type: text/event-stream`, not ending there), which switch the
    response body to STREAMED (extproc.protocol.STREAMED_RESPONSE) as the sidecar does for an
    inline stream (else Envoy's configured BUFFERED mode would hold the whole stream back),
    or to no body at all (OBSERVED_RESPONSE) for a successful stream the observer follows;
    then every chunk gets an empty answer: it passes unchanged.
- upstream stage: an empty answer to the request headers, then the stream ends (the sidecar
  ends it there when no body rewrite is needed).
- observer: reads and answers nothing (Envoy does not wait for it).
- the gRPC access log (envoy.service.accesslog.v3) and gRPC health checks: accepted, ignored.

The per-request decision reads the request body's raw bytes with two regular expressions
(STREAM_MARK, USAGE_MARK: `"stream": true`, `"include_usage": true`), not a JSON parser: a
search over the benchmark's ~100-byte bodies costs well under a microsecond, where parsing
would be work the floor is meant not to do. In a JSON string a quote is always escaped, so the
marks only match keys; they would also match those keys nested elsewhere in the body (say
under `metadata`), which no benchmark request has. What the floor cannot see from the body it
is told on its command line, from the gateway's config: `--release`, `--stream-path` (the
gateway's `sidecar.stream_path`) and `--response-guards` (a response guard keeps every stream
inline, with no observer).

Same gRPC library, server options and event loop (uvloop) as the sidecar (extproc/server.py).

    python -m benchmarks.lib.floor --listen 127.0.0.1:50051 --model gpt-4o-mini --target fake

(benchmarks/lib/stack.py adds `--release`, `--stream-path` and `--response-guards` from the
gateway's config: configs.floor_settings.)
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.contract import (
    ACCOUNT_KEY,
    METADATA_NAMESPACE,
    OBSERVE_KEY,
    OBSERVE_STAGE,
    ROUTE_HEADER,
    STAGE_METADATA,
    TARGET_HEADER,
    UPSTREAM_STAGE,
)
from extproc.protocol import (
    OBSERVED_RESPONSE,
    STREAMED_RESPONSE,
    common,
    passthrough,
    response_headers_response,
)

# The health check's service name (extproc.server.SERVICE_NAME; importing that module would
# load the whole sidecar into this process).
SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
# The sidecar's limit with its default max_body_bytes is larger; nothing here comes near it.
MESSAGE_LIMIT = 64 << 20
# The request body's marks the floor decides a request's path by (module docstring).
STREAM_MARK = re.compile(rb'"stream"\s*:\s*true')
USAGE_MARK = re.compile(rb'"include_usage"\s*:\s*true')
# The gateway's sidecar.stream_path values (extproc.config.SidecarSettings).
STREAM_PATHS = ("auto", "inline", "observe")


class FloorProcessor(ext_proc_grpc.ExternalProcessorServicer):
    """Every ext_proc stream answered with the least that keeps Envoy moving and routing."""

    def __init__(
        self,
        model: str,
        target: str | None,
        release: bool,
        stream_path: str = "auto",
        response_guards: bool = False,
    ) -> None:
        if stream_path not in STREAM_PATHS:
            raise ValueError(f"stream_path {stream_path!r}: one of {STREAM_PATHS}")
        headers = {ROUTE_HEADER: model}
        if target:
            headers[TARGET_HEADER] = target
        self.release = release
        self.stream_path = stream_path
        self.response_guards = response_guards
        # Built once: every request body gets one of these, by (released, observed).
        self.body_answers: dict[tuple[bool, bool], pb.ProcessingResponse] = {}
        for released in (False, True):
            for observed in (False, True):
                answer = pb.ProcessingResponse(
                    request_body=pb.BodyResponse(response=common(headers, clear_route_cache=True))
                )
                marks = {ACCOUNT_KEY: released, OBSERVE_KEY: observed}
                if any(marks.values()):
                    metadata = struct_pb2.Struct()
                    metadata.update({METADATA_NAMESPACE: {k: v for k, v in marks.items() if v}})
                    answer.dynamic_metadata.CopyFrom(metadata)
                self.body_answers[released, observed] = answer
        # The chat request's answer: the one this server gave every request body before it
        # decided per request.
        self.body_answer = self.body_answers[release, False]
        self.headers_answer = passthrough("request_headers")
        self.empty_headers_answer = passthrough("response_headers")
        self.streamed_answer = response_headers_response(mode_override=STREAMED_RESPONSE)
        self.observed_answer = response_headers_response(mode_override=OBSERVED_RESPONSE)

    def plan(self, body: bytes) -> tuple[bool, bool]:
        """(released, observed) for a request with this body, as extproc.request_plan.plan
        decides them for the benchmark's gateway (module docstring)."""
        if STREAM_MARK.search(body) is None:
            return self.release, False  # a JSON answer: released whenever releasable
        usage = USAGE_MARK.search(body) is not None
        # Envoy reads the usage report of a releasable stream whose client asked for one.
        envoy_reads = self.release and usage and self.stream_path == "auto"
        observed = (
            not envoy_reads
            and not self.response_guards
            and (self.stream_path == "observe" or (self.stream_path == "auto" and usage))
        )
        return self.release and (observed or envoy_reads), observed

    def response_headers_answer(self, message: Any, observed: bool) -> pb.ProcessingResponse:
        """The sidecar's mode switch for an answer it keeps (settlement.answer_path): an
        event stream goes STREAMED (inline), or past this stage when the observer follows it
        (a successful stream); anything else gets the empty answer (its body stays BUFFERED)."""
        if message.end_of_stream:
            return self.empty_headers_answer
        content_type = status = ""
        for header in message.headers.headers:
            key = header.key.lower()
            if key == "content-type":
                content_type = (header.raw_value or header.value.encode()).decode("latin-1")
            elif key == ":status":
                status = (header.raw_value or header.value.encode()).decode("latin-1")
        if content_type.split(";", 1)[0].strip().lower() != "text/event-stream":
            return self.empty_headers_answer
        if observed and status.isdigit() and 200 <= int(status) < 300:
            return self.observed_answer
        return self.streamed_answer

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        stage = next((v for k, v in context.invocation_metadata() if k == STAGE_METADATA), None)
        if stage == OBSERVE_STAGE:
            async for _ in request_iterator:
                pass
            return
        observed = False
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if stage == UPSTREAM_STAGE:
                yield self.headers_answer if kind == "request_headers" else passthrough(kind)
                if kind == "request_headers":
                    return
            elif kind == "request_headers":
                yield self.headers_answer
            elif kind == "request_body":
                released, observed = self.plan(request.request_body.body)
                yield self.body_answers[released, observed]
                if released:
                    return
            elif kind == "response_headers":
                yield self.response_headers_answer(request.response_headers, observed)
            else:
                yield passthrough(kind)


class IgnoredAccessLog(als_pb2_grpc.AccessLogServiceServicer):
    """Envoy's access log entries, read and dropped."""

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        async for _ in request_iterator:
            pass
        return als_pb2.StreamAccessLogsResponse()


async def serve(
    listen: str,
    model: str,
    target: str | None,
    release: bool,
    stream_path: str = "auto",
    response_guards: bool = False,
) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MESSAGE_LIMIT),
            ("grpc.max_send_message_length", MESSAGE_LIMIT),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.so_reuseport", 0),
        ]
    )
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(
        FloorProcessor(model, target, release, stream_path, response_guards), server
    )
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(IgnoredAccessLog(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(None)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lib.floor",
        description="A do-nothing ext_proc server: the benchmark's floor target.",
    )
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve gRPC on")
    parser.add_argument("--model", required=True, help=f"the {ROUTE_HEADER} header to set")
    parser.add_argument(
        "--target",
        default=None,
        help=f"the {TARGET_HEADER} header to set too (a one-backend model's route matches it)",
    )
    parser.add_argument(
        "--release",
        action="store_true",
        help="the gateway releases what it can (one backend, json_path: access_log, no response "
        "guard): end the stream after the body of a request it releases and mark the request "
        "for the access log, as the sidecar does",
    )
    parser.add_argument(
        "--stream-path",
        choices=STREAM_PATHS,
        default="auto",
        help="the gateway's sidecar.stream_path: which streams are released or observed",
    )
    parser.add_argument(
        "--response-guards",
        action="store_true",
        help="the gateway has a response guard: every stream stays inline, none is observed",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    coro = serve(
        args.listen, args.model, args.target, args.release, args.stream_path, args.response_guards
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the sidecar's own fallback
        asyncio.run(coro)
    else:
        uvloop.run(coro)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
