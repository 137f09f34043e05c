"""Real redis-server processes for tests: one server, or a three-node Redis Cluster.

Use from a test module with `pytest_plugins = ["tests.redis_servers"]` (or import the fixtures
by name). The fixtures fail, never skip, when redis-server or redis-cli is missing: the Makefile
installs them, so a skip would only hide a broken install.

PYTEST_DONT_REWRITE: test modules import helpers from here before pytest_plugins registers it,
and pytest would warn that it cannot rewrite the asserts of a module already imported.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

START_TIMEOUT_S = 10.0


def require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.fail(
            f"{program} not found on PATH: the Redis tests need a real server "
            "(`make system-deps` installs Debian's redis-server package, which has both "
            "redis-server and redis-cli)",
            pytrace=False,
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server on 127.0.0.1:<port>, without persistence, in its own directory."""

    def __init__(self, workdir: Path, port: int, extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.port = port
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"redis-{self.port}.log"

    def start(self) -> None:
        args = [
            require("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.ping():
                return
            time.sleep(0.01)
        self.stop()
        log = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def client(self) -> redis.Redis:
        """A synchronous client for checks from the test itself."""
        return redis.Redis(port=self.port, socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL: the server vanishes as in a crash; connections are reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case it was paused
            self.proc.kill()
            self.proc.wait(5)

    def restart(self) -> None:
        """Start again on the same port (empty: there is no persistence)."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing, like a hung server."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_server(workdir: Path, extra_args: tuple[str, ...] = ()) -> RedisServer:
    # A free port can be taken between probing and binding: try a few.
    for attempt in range(3):
        server = RedisServer(workdir, free_port(), extra_args)
        try:
            server.start()
            return server
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_server(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_server_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_server(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@dataclass
class RedisClusterNodes:
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return self.nodes[0].url


def cluster_state_ok(node: RedisServer) -> bool:
    try:
        with node.client() as client:
            info = client.execute_command("CLUSTER", "INFO")
    except redis.RedisError:
        return False
    if isinstance(info, bytes):
        info = info.decode()
    if isinstance(info, dict):
        return info.get("cluster_state") == "ok"
    return "cluster_state:ok" in str(info)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    """Three masters, no replicas; all 16384 slots covered."""
    cli = require("redis-cli")
    workdir = tmp_path_factory.mktemp("redis-cluster")
    cluster = RedisClusterNodes()
    try:
        for n in range(3):
            options = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(workdir / f"nodes-{n}.conf"),
                # The bus port defaults to port + 10000, which may be taken or beyond 65535.
                "--cluster-port", str(free_port()),
                "--cluster-node-timeout", "5000",
            )  # fmt: skip
            cluster.nodes.append(start_server(workdir, options))
        created = subprocess.run(
            [cli, "--cluster", "create",
             *(f"127.0.0.1:{port}" for port in cluster.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}")
        deadline = time.monotonic() + 30
        while not all(cluster_state_ok(node) for node in cluster.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        yield cluster
    finally:
        for node in cluster.nodes:
            node.stop()
