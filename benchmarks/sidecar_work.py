"""The sidecar's own work per request, in-process: no gRPC, no Envoy, no network.

    python -m benchmarks.sidecar_work [--requests 5000] [--runs 3] [--quota memory|none]
                                      [--profile]

One "request" is what the sidecar does for the headline chat request when its answer is
released to Envoy (one backend, `json_path: access_log`): the downstream stage's request
headers and body (authentication, parsing, counting, the reservation, the plan and the
protobuf answers, serialized), then the access log entry Envoy would send back (decoded from
bytes, with the usage Envoy's filter copied into it) through `access_log.account` (the
settlement, the metrics). The config is the chat benchmark's (`configs.gateway_config`).
Reported: microseconds per request (and of it, the access log entry's), median over runs; the
chat benchmark's sidecar CPU per request minus this is what gRPC and the event loop cost.
`--profile`: cProfile's top functions of one more run (cProfile slows it ~2x: read shares).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import time
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from benchmarks.lib.configs import API_KEY, MODEL, Scenario, gateway_config
from extproc import access_log, server
from extproc.config import build_runtime, parse_config
from extproc.contract import ACCOUNT_KEY, METADATA_NAMESPACE
from extproc.downstream import DownstreamStream
from extproc.services import Services

BODY = (
    b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hello"}],'
    b' "max_tokens": 8}'
)
USAGE = {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17, "token_source": "provider"}


def request_messages() -> tuple[bytes, bytes]:
    """The two ext_proc messages Envoy sends for the chat benchmark's request, serialized."""
    headers = {
        ":authority": "127.0.0.1:10000",
        ":path": "/v1/chat/completions",
        ":method": "POST",
        ":scheme": "http",
        "content-type": "application/json",
        "authorization": f"Bearer {API_KEY}",
        "content-length": str(len(BODY)),
        "x-forwarded-proto": "http",
        "x-request-id": "0f4c8a5e-6f1e-4d2a-9b8e-3c1f2a7d9e10",
    }
    head = pb.ProcessingRequest()
    for key, value in headers.items():
        head.request_headers.headers.headers.add(key=key, raw_value=value.encode())
    body = pb.ProcessingRequest()
    body.request_body.body = BODY
    body.request_body.end_of_stream = True
    return head.SerializeToString(), body.SerializeToString()


def log_entry(answer: pb.ProcessingResponse) -> bytes:
    """The access log entry of the released request, as Envoy sends it: the metadata the
    downstream stage set, the usage its filter copied, the status."""
    entry = accesslog_pb2.HTTPAccessLogEntry()
    metadata = entry.common_properties.metadata.filter_metadata[METADATA_NAMESPACE]
    metadata.CopyFrom(answer.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value)
    metadata.update(USAGE)
    entry.response.response_code.value = 200
    entry.response.response_body_bytes = 300
    entry.response.response_headers["content-type"] = "application/json"
    entry.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(1)
    return entry.SerializeToString()


async def one_request(services: Services, head: bytes, body: bytes) -> float:
    """One request through the downstream stage and its access log entry; returns the access
    log entry's share, in seconds."""
    stream = DownstreamStream(services, {})
    first = await stream.handle(pb.ProcessingRequest.FromString(head))
    second = await stream.handle(pb.ProcessingRequest.FromString(body))
    first.SerializeToString()
    raw = second.SerializeToString()
    stream.close()
    handover = second.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    if not handover[ACCOUNT_KEY].bool_value:
        raise RuntimeError("the request was not released: this measures the released path")
    entry = log_entry(pb.ProcessingResponse.FromString(raw))
    started = time.perf_counter()
    if not access_log.account(services, accesslog_pb2.HTTPAccessLogEntry.FromString(entry)):
        raise RuntimeError("the access log's reader did not account the entry")
    return time.perf_counter() - started


async def measure(services: Services, requests: int) -> tuple[float, float]:
    """Microseconds per request, and of it the access log entry's."""
    head, body = request_messages()
    for _ in range(min(500, requests)):  # warm: tokenizer caches, metric children
        await one_request(services, head, body)
    await asyncio.sleep(0.05)  # let the warm-up's settlements run
    logged = 0.0
    started = time.perf_counter()
    for i in range(requests):
        logged += await one_request(services, head, body)
        if i % 100 == 99:
            await asyncio.sleep(0)  # the settlements scheduled meanwhile, as in the sidecar
    total = time.perf_counter() - started
    return 1e6 * total / requests, 1e6 * logged / requests


def build(quota: str) -> Services:
    cfg = gateway_config(1, Scenario(quota=quota))
    return server.build_services(build_runtime(parse_config(cfg)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    services = build(args.quota)

    async def go() -> list[tuple[float, float]]:
        return [await measure(services, args.requests) for _ in range(args.runs)]

    samples = asyncio.run(go())
    result: dict[str, Any] = {
        "requests": args.requests,
        "runs": args.runs,
        "quota": args.quota,
        "us_per_request": round(statistics.median(s[0] for s in samples), 1),
        "us_access_log_entry": round(statistics.median(s[1] for s in samples), 1),
        "runs_us_per_request": [round(s[0], 1) for s in samples],
    }
    if args.profile:
        profiler = cProfile.Profile()

        async def profiled() -> None:
            profiler.enable()
            await measure(services, args.requests)
            profiler.disable()

        asyncio.run(profiled())
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        result["profile"] = out.getvalue()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quota", choices=("memory", "none"), default="memory")
    parser.add_argument("--profile", action="store_true", help="cProfile's top functions")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(
        f"sidecar work per request (in-process, quota {result['quota']}): "
        f"{result['us_per_request']} µs, "
        f"of which the access log entry {result['us_access_log_entry']} µs "
        f"(median of {result['runs']} x {result['requests']}; runs "
        f"{', '.join(map(str, result['runs_us_per_request']))})"
    )
    if "profile" in result:
        print(result["profile"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
