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
  clear_route_cache, the only change Envoy needs to route the request. With `--release`, that
  answer also sets `account: true` in the request's dynamic metadata and ends the stream, as
  the sidecar does when it releases a request to Envoy (one backend, `json_path:
  access_log`): Envoy then sends the answer's access log entry here, and no response message.
  Without it, every later message (response headers, body, trailers) gets an empty answer.
- upstream stage: an empty answer to the request headers, then the stream ends (the sidecar
  ends it there when no body rewrite is needed).
- observer: reads and answers nothing (Envoy does not wait for it).
- the gRPC access log (envoy.service.accesslog.v3) and gRPC health checks: accepted, ignored.

Same gRPC library, server options and event loop (uvloop) as the sidecar (extproc/server.py).

    python -m benchmarks.lib.floor --listen 127.0.0.1:50051 --model gpt-4o-mini --target fake
"""

from __future__ import annotations

import argparse
import asyncio
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
    OBSERVE_STAGE,
    ROUTE_HEADER,
    STAGE_METADATA,
    TARGET_HEADER,
    UPSTREAM_STAGE,
)
from extproc.protocol import common, passthrough

# The health check's service name (extproc.server.SERVICE_NAME; importing that module would
# load the whole sidecar into this process).
SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
# The sidecar's limit with its default max_body_bytes is larger; nothing here comes near it.
MESSAGE_LIMIT = 64 << 20


class FloorProcessor(ext_proc_grpc.ExternalProcessorServicer):
    """Every ext_proc stream answered with the least that keeps Envoy moving and routing."""

    def __init__(self, model: str, target: str | None, release: bool) -> None:
        headers = {ROUTE_HEADER: model}
        if target:
            headers[TARGET_HEADER] = target
        # Built once: every request body gets this same answer.
        self.body_answer = pb.ProcessingResponse(
            request_body=pb.BodyResponse(response=common(headers, clear_route_cache=True))
        )
        self.release = release
        if release:
            metadata = struct_pb2.Struct()
            metadata.update({METADATA_NAMESPACE: {ACCOUNT_KEY: True}})
            self.body_answer.dynamic_metadata.CopyFrom(metadata)
        self.headers_answer = passthrough("request_headers")

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        stage = next((v for k, v in context.invocation_metadata() if k == STAGE_METADATA), None)
        if stage == OBSERVE_STAGE:
            async for _ in request_iterator:
                pass
            return
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if stage == UPSTREAM_STAGE:
                yield self.headers_answer if kind == "request_headers" else passthrough(kind)
                if kind == "request_headers":
                    return
            elif kind == "request_headers":
                yield self.headers_answer
            elif kind == "request_body":
                yield self.body_answer
                if self.release:
                    return
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


async def serve(listen: str, model: str, target: str | None, release: bool) -> None:
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
        FloorProcessor(model, target, release), server
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
        help="end the stream after the request body and mark the request for the access log, "
        "as the sidecar does for a request it releases to Envoy",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    coro = serve(args.listen, args.model, args.target, args.release)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the sidecar's own fallback
        asyncio.run(coro)
    else:
        uvloop.run(coro)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
