"""The sidecar on its own: a unix socket listener, gRPC health, and ext_proc over it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import grpc
import yaml
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

            models = _models_of_team_b(channel)
            assert "text-embedding-3-small" in models
            assert "gpt-4o" not in models
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def _models_of_team_b(channel: grpc.Channel) -> set[str]:
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
    (reply,) = list(pb_grpc.ExternalProcessorStub(channel).Process(iter([request]), timeout=10))
    assert reply.immediate_response.status.code == 200
    return {m["id"] for m in json.loads(reply.immediate_response.body)["data"]}


def test_reload_by_admin_api_and_sighup_without_file_watching(tmp_path):
    config = yaml.safe_load((REPO / "examples/quickstart.yaml").read_text())
    config["sidecar"]["reload_interval_s"] = 0  # only `extproc reload` and SIGHUP
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    sock = tmp_path / "extproc.sock"
    address = f"unix:{sock}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "-c", str(path), "--listen", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def reload() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "extproc", "reload", "--address", address],
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with grpc.insecure_channel(address) as channel:
            assert "gpt-4o" not in _models_of_team_b(channel)
            config["teams"]["team-b"]["models"].append("gpt-4o")
            path.write_text(yaml.safe_dump(config))
            time.sleep(0.5)
            assert "gpt-4o" not in _models_of_team_b(channel)  # nobody asked for a reload

            done = reload()
            assert done.returncode == 0, done.stderr
            assert "applied" in done.stdout
            assert "gpt-4o" in _models_of_team_b(channel)

            path.write_text(path.read_text().replace("team-b:", "team-b:\n    colour: blue", 1))
            refused = reload()
            assert refused.returncode == 1
            assert "rejected" in refused.stderr and "teams.team-b.colour" in refused.stderr
            assert "gpt-4o" in _models_of_team_b(channel)  # the previous config serves

            config["teams"]["team-b"]["models"].remove("gpt-4o")
            path.write_text(yaml.safe_dump(config))
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "gpt-4o" in _models_of_team_b(channel):
                assert time.monotonic() < deadline, "SIGHUP did not reload"
                time.sleep(0.05)
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
