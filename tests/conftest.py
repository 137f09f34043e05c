"""Shared test plumbing: offline tokenizers, free ports, and a real gateway stack."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_TIKTOKEN = REPO.parent / "shared" / "tiktoken"

if "TIKTOKEN_CACHE_DIR" not in os.environ and SHARED_TIKTOKEN.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_TIKTOKEN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_hex(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


def wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(url)


@dataclass
class Gateway:
    base_url: str
    fake_a: str
    fake_b: str
    config_path: Path
    config: dict
    log_path: Path
    sidecar_listen: str
    admin: str

    def fake_requests(self, fake: str) -> list[dict]:
        with urllib.request.urlopen(f"{fake}/_fake/requests") as resp:
            return json.load(resp)

    def clear_fakes(self) -> None:
        for fake in (self.fake_a, self.fake_b):
            req = urllib.request.Request(f"{fake}/_fake/requests", method="DELETE")
            urllib.request.urlopen(req).close()

    def access_log(self) -> list[dict]:
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return entries

    def write_config(self, config: dict) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        tmp.replace(self.config_path)  # atomic: the watcher never reads half a file


BACKEND_A_SECRET = "secret-backend-a-0123456789"
BACKEND_B_SECRET = "secret-backend-b-9876543210"


def gateway_config(ports: dict[str, int]) -> dict:
    return {
        "sidecar": {
            "listen": f"127.0.0.1:{ports['sidecar']}",
            "max_body_bytes": 256 * 1024,
            "reload_interval_s": 0.2,
            "grace_s": 5,
        },
        "envoy": {
            "listen": f"127.0.0.1:{ports['envoy']}",
            "admin": f"127.0.0.1:{ports['admin']}",
        },
        "teams": {
            "team-a": {"keys": [{"sha256": sha256_hex("sk-team-a")}]},
            "team-b": {
                "keys": [{"env": "TEST_TEAM_B_KEY"}],
                "models": ["gpt-4o-mini", "text-embedding-3-small"],
            },
        },
        "backends": {
            "fake-a": {
                "url": f"http://127.0.0.1:{ports['fake_a']}/v1",
                "api_key": {"env": "TEST_BACKEND_A_KEY"},
            },
            "fake-b": {
                "url": f"http://localhost:{ports['fake_b']}",
                "api_key": {"env": "TEST_BACKEND_B_KEY"},
                "auth_header": "api-key",
            },
            "dead": {"url": f"http://127.0.0.1:{ports['dead']}/v1", "connect_timeout_s": 1},
        },
        "models": {
            "gpt-4o-mini": {"targets": [{"backend": "fake-a"}]},
            "gpt-4o": {"targets": [{"backend": "fake-a", "model": "fake-gpt-4o"}]},
            "llama-8b": {
                "targets": [{"backend": "fake-b", "model": "meta-llama/Llama-3.1-8B-Instruct"}]
            },
            "canary": {
                "targets": [
                    {"backend": "fake-a", "model": "canary-stable", "weight": 80},
                    {"backend": "fake-b", "model": "canary-next", "weight": 20},
                ]
            },
            "dead-model": {"targets": [{"backend": "dead"}]},
            "text-embedding-3-small": {"type": "embedding", "targets": [{"backend": "fake-a"}]},
        },
        "fake_llm": {"listen": f"127.0.0.1:{ports['fake_a']}", "response_tokens": 8},
        "observability": {"metrics": {"listen": f"127.0.0.1:{ports['metrics']}"}},
    }


@contextlib.contextmanager
def running_gateway(
    tmp: Path, edit: Callable[[dict], None] | None = None, **sidecar: Any
) -> Iterator[Gateway]:
    """The gateway of gateway_config (with these `sidecar` settings, then changed by `edit`) and
    its second fake backend, on free ports; stopped on exit, and checked to have stopped
    cleanly."""
    from extproc.supervisor import Stack

    names = ("sidecar", "envoy", "admin", "fake_a", "fake_b", "dead", "metrics")
    ports = {k: free_port() for k in names}
    config = gateway_config(ports)
    config["sidecar"].update(sidecar)
    if edit is not None:
        edit(config)
    config_path = tmp / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = tmp / "stack.log"
    env = {
        "TEST_TEAM_B_KEY": "sk-team-b",
        "TEST_BACKEND_A_KEY": BACKEND_A_SECRET,
        "TEST_BACKEND_B_KEY": BACKEND_B_SECRET,
    }
    os.environ.update(env)
    with open(log_path, "ab", buffering=0) as log:
        fake_b = subprocess.Popen(
            [sys.executable, "-m", "extproc", "fake-llm", "--name", "fake-b",
             "--listen", f"127.0.0.1:{ports['fake_b']}", "--response-tokens", "8"],
            stdout=log, stderr=log,
        )  # fmt: skip
        stack = Stack(config_path, workdir=tmp, env=env, stdout=log)
        try:
            wait_http(f"http://127.0.0.1:{ports['fake_b']}/healthz")
            stack.start()
            yield Gateway(
                base_url=f"http://127.0.0.1:{ports['envoy']}/v1",
                fake_a=f"http://127.0.0.1:{ports['fake_a']}",
                fake_b=f"http://127.0.0.1:{ports['fake_b']}",
                config_path=config_path,
                config=config,
                log_path=log_path,
                sidecar_listen=config["sidecar"]["listen"],
                admin=config["envoy"]["admin"],
            )
        finally:
            stack.stop(grace=10)
            fake_b.terminate()
            fake_b.wait(10)
    codes = {name: proc.returncode for name, proc in stack.procs.items()}
    # A graceful shutdown: every process ended by SIGTERM exits cleanly (Envoy: 0).
    assert codes.get("sidecar") == 0, (codes, log_path.read_text(errors="replace")[-3000:])
    assert codes.get("fake-llm") == 0, codes


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("gateway")) as gw:
        yield gw


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A test server's request handler: `reply` sends a whole answer; nothing is logged."""

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def serving(server: Any) -> Iterator[Any]:
    """A socketserver (http.server's) serving on a thread of its own until the generator is
    closed: `yield from serving(server)` in a fixture."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
