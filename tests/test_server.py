"""The sidecar on its own: a unix socket listener, gRPC health, and ext_proc over it."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import REPO


def test_serve_on_a_unix_socket(tmp_path):
    sock = tmp_path / "extproc.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "-c", str(REPO / "examples/quickstart.yaml"),
         "--listen", f"unix:{sock}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING

            headers = base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=":method", raw_value=b"GET"),
                    base_pb2.HeaderValue(key=":path", raw_value=b"/v1/models"),
                    base_pb2.HeaderValue(key="authorization", raw_value=b"Bearer sk-team-b"),
                ]
            )
            request = pb.ProcessingRequest(
                request_headers=pb.HttpHeaders(headers=headers, end_of_stream=True)
            )
            stub = pb_grpc.ExternalProcessorStub(channel)
            (reply,) = list(stub.Process(iter([request]), timeout=10))
            assert reply.immediate_response.status.code == 200
            assert b'"text-embedding-3-small"' in reply.immediate_response.body
            assert b'"gpt-4o"' not in reply.immediate_response.body
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
