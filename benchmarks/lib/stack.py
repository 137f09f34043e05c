"""The process tree a benchmark measures: the fake LLM(s), the Envoy-only baseline, the floor
(the gateway's Envoy config in front of a do-nothing ext_proc server, when asked) and the
gateway's `extproc.supervisor.Stack` (and a redis-server when the scenario wants one), started
on free loopback ports and all stopped on exit."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import yaml

from benchmarks.lib.configs import (
    HOST,
    MODEL,
    Scenario,
    baseline_bootstrap,
    floor_bootstrap,
    floor_routing,
    floor_settings,
    free_port,
    gateway_config,
)
from extproc.config import load_config
from extproc.contract import TARGET_HEADER
from extproc.supervisor import Stack, envoy_binary, stop_process, wait_envoy_ready, wait_tcp

START_TIMEOUT_S = 60.0


def envoy_version() -> str:
    try:
        out = subprocess.run(
            [envoy_binary(), "--version"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return " ".join(out.split()) or "unknown"


def envoy_workers(admin: str) -> int | None:
    """The `--concurrency` a running Envoy reports on its admin endpoint."""
    try:
        with urllib.request.urlopen(f"http://{admin}/server_info", timeout=2) as resp:
            return int(json.load(resp)["command_line_options"]["concurrency"])
    except (OSError, ValueError, KeyError):
        return None


# Envoy's counters of its talk to the ext_proc server, summed over the downstream and upstream
# filters: streams, messages each way, gRPC access log entries.
EXT_PROC_COUNTERS = {
    "ext_proc.streams_started": "streams",
    "ext_proc.stream_msgs_sent": "messages_sent",
    "ext_proc.stream_msgs_received": "messages_received",
    "grpc_access_log.logs_written": "access_log_entries",
}


def ext_proc_counters(admin: str) -> dict[str, int] | None:
    """EXT_PROC_COUNTERS of a running Envoy (its admin endpoint), or None."""
    try:
        with urllib.request.urlopen(f"http://{admin}/stats?format=json", timeout=2) as resp:
            stats = json.load(resp)["stats"]
    except (OSError, ValueError, KeyError):
        return None
    totals = dict.fromkeys(EXT_PROC_COUNTERS.values(), 0)
    for stat in stats:
        name = stat.get("name", "")
        for suffix, key in EXT_PROC_COUNTERS.items():
            if name.endswith(suffix) and isinstance(stat.get("value"), int):
                totals[key] += stat["value"]
    return totals


def redis_binary() -> str | None:
    """Debian's redis-server (`make system-deps` installs it), or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    return "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None


@dataclass
class Targets:
    """The running processes: the fake LLM(s), the baseline Envoy and the gateway's Stack."""

    fake: subprocess.Popen
    baseline: subprocess.Popen
    stack: Stack
    urls: dict[str, str]
    admins: dict[str, str]
    # Processes only the gateway uses (redis) and ones both targets use besides the fake
    # (the failover scenario's failing backend).
    gateway_extra: dict[str, subprocess.Popen] = field(default_factory=dict)
    shared_extra: dict[str, subprocess.Popen] = field(default_factory=dict)
    # The floor target (`started(floor=True)`): its Envoy and the do-nothing ext_proc server.
    floor: dict[str, subprocess.Popen] = field(default_factory=dict)
    # What the floor server answers (configs.floor_settings): {"headers": routing headers,
    # "release": bool, "stream_path": the gateway's sidecar.stream_path, "response_guards"}.
    floor_settings: dict[str, object] = field(default_factory=dict)

    def pids(self, target: str) -> dict[str, int]:
        """The processes a target's requests go through (the fake is shared)."""
        shared = {name: proc.pid for name, proc in self.shared_extra.items()}
        if target == "baseline":
            return {"envoy": self.baseline.pid, **shared}
        if target == "floor":
            return {"envoy": self.floor["envoy"].pid, "floor": self.floor["server"].pid, **shared}
        return {
            "envoy": self.stack.procs["envoy"].pid,
            "sidecar": self.stack.procs["sidecar"].pid,
            **{name: proc.pid for name, proc in self.gateway_extra.items()},
            **shared,
        }

    def check(self) -> None:
        exited = self.stack.poll()
        others = {
            "baseline envoy": self.baseline,
            "fake-llm": self.fake,
            **self.gateway_extra,
            **self.shared_extra,
            **{f"floor {name}": proc for name, proc in self.floor.items()},
        }
        for name, proc in others.items():
            if exited is None and proc.poll() is not None:
                exited = (name, proc.returncode)
        if exited is not None:
            raise RuntimeError(f"a process exited during the benchmark: {exited}")


@contextlib.contextmanager
def started(
    workdir: Path,
    envoy_concurrency: int,
    fake_args: Sequence[str] = (),
    scenario: Scenario | None = None,
    floor: bool = False,
) -> Iterator[Targets]:
    """Fake LLM, baseline Envoy and gateway on free loopback ports; all stopped on exit.

    `floor`: also the floor target, a second Envoy on the gateway's own rendered bootstrap
    (other ports) whose sidecar cluster points at `benchmarks.lib.floor`, which sets only the
    routing headers the model's route matches, ends its stream where the sidecar does and
    switches a stream it keeps to STREAMED, deciding per request as the sidecar would with the
    gateway's config (`--release`, `--stream-path`, `--response-guards`).

    The fake runs with no time to first token and no pacing unless `fake_args` say otherwise;
    a request may set its own with the x-fake-* headers. The scenario may add a redis-server
    (the gateway's quota store) and a second fake that fails every request (priority 0 of the
    failover pool, in both targets' config).
    """
    scenario = scenario or Scenario()
    workdir.mkdir(parents=True, exist_ok=True)
    logs: list[TextIO] = []
    procs: list[subprocess.Popen] = []  # stopped in reverse order
    stack: Stack | None = None

    def log_file(name: str) -> TextIO:
        handle = (workdir / f"{name}.log").open("w", encoding="utf-8")
        logs.append(handle)
        return handle

    def spawn(name: str, argv: list[str]) -> subprocess.Popen:
        log = log_file(name)
        proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    def fake_llm(name: str, port: int, extra: Sequence[str]) -> subprocess.Popen:
        return spawn(
            name,
            [sys.executable, "-m", "extproc", "fake-llm", "--listen", f"{HOST}:{port}",
             "--ttft-ms", "0", "--tokens-per-second", "0", "--record-limit", "0", *extra],
        )  # fmt: skip

    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        fake_port = free_port()
        fake = fake_llm("fake-llm", fake_port, fake_args)
        wait_tcp(f"{HOST}:{fake_port}", deadline, fake)

        gateway_extra: dict[str, subprocess.Popen] = {}
        shared_extra: dict[str, subprocess.Popen] = {}
        redis_url = failing_port = None
        if scenario.quota == "redis":
            binary = redis_binary()
            if binary is None:
                raise RuntimeError("redis-server is not installed (`make system-deps`)")
            redis_port = free_port()
            (workdir / "redis").mkdir(exist_ok=True)
            gateway_extra["redis"] = spawn(
                "redis",
                [binary, "--port", str(redis_port), "--bind", HOST, "--save", "",
                 "--appendonly", "no", "--dir", str(workdir / "redis")],
            )  # fmt: skip
            wait_tcp(f"{HOST}:{redis_port}", deadline, gateway_extra["redis"])
            redis_url = f"redis://{HOST}:{redis_port}/0"
        if scenario.failover:
            failing_port = free_port()
            shared_extra["fake-failing"] = fake_llm(
                "fake-failing",
                failing_port,
                ["--fault", scenario.failover_fault, "--name", "failing"],
            )
            wait_tcp(f"{HOST}:{failing_port}", deadline, shared_extra["fake-failing"])

        config_path = workdir / "gateway.yaml"
        config = gateway_config(fake_port, scenario, redis_url, failing_port)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        cfg = load_config(config_path)

        base_listen, base_admin = f"{HOST}:{free_port()}", f"{HOST}:{free_port()}"
        base_path = workdir / "baseline-envoy.yaml"
        base_path.write_text(
            yaml.safe_dump(baseline_bootstrap(cfg, base_listen, base_admin), sort_keys=False)
        )
        baseline = spawn(
            "baseline-envoy",
            [envoy_binary(), "-c", str(base_path), "--disable-hot-restart",
             "--log-level", "warning", "--concurrency", str(envoy_concurrency)],
        )  # fmt: skip
        wait_envoy_ready(base_admin, deadline, baseline)

        floor_procs: dict[str, subprocess.Popen] = {}
        settings: dict[str, object] = {}
        urls, admins = {}, {}
        if floor:
            floor_listen, floor_admin = f"{HOST}:{free_port()}", f"{HOST}:{free_port()}"
            server = f"{HOST}:{free_port()}"
            doc = floor_bootstrap(cfg, floor_listen, floor_admin, server)
            routing = floor_routing(doc)
            settings = floor_settings(cfg, routing)
            target = routing.get(TARGET_HEADER)
            floor_procs["server"] = spawn(
                "floor-server",
                [sys.executable, "-m", "benchmarks.lib.floor", "--listen", server,
                 "--model", MODEL, *(["--target", target] if target else []),
                 *(["--release"] if settings["release"] else []),
                 "--stream-path", str(settings["stream_path"]),
                 *(["--response-guards"] if settings["response_guards"] else [])],
            )  # fmt: skip
            wait_tcp(server, deadline, floor_procs["server"])
            floor_path = workdir / "floor-envoy.yaml"
            floor_path.write_text(yaml.safe_dump(doc, sort_keys=False))
            # The gateway's Envoy command line (extproc.supervisor.Stack), on the same config.
            floor_procs["envoy"] = spawn(
                "floor-envoy",
                [envoy_binary(), "-c", str(floor_path), "--disable-hot-restart",
                 "--file-flush-interval-msec", "1000", "--log-level", "warning",
                 "--concurrency", str(envoy_concurrency)],
            )  # fmt: skip
            wait_envoy_ready(floor_admin, deadline, floor_procs["envoy"])
            urls["floor"], admins["floor"] = f"http://{floor_listen}", floor_admin

        stack = Stack(
            config_path,
            workdir=workdir,
            stdout=log_file("gateway"),
            envoy_concurrency=envoy_concurrency,
        )
        stack.start(timeout=max(1.0, deadline - time.monotonic()))
        yield Targets(
            fake=fake,
            baseline=baseline,
            stack=stack,
            urls={
                "baseline": f"http://{base_listen}",
                **urls,
                "gateway": f"http://{cfg.envoy.listen}",
            },
            admins={"baseline": base_admin, **admins, "gateway": cfg.envoy.admin},
            gateway_extra=gateway_extra,
            shared_extra=shared_extra,
            floor=floor_procs,
            floor_settings=settings,
        )
    finally:
        if stack is not None:
            stack.stop(grace=5)
        for proc in reversed(procs):
            stop_process(proc)
        for handle in logs:
            handle.close()
