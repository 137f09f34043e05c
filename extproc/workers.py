"""Several sidecar processes on one address: `sidecar.workers: N` makes `extproc serve` a small
supervisor of N worker processes.

Each worker is a whole sidecar (`extproc serve` with EXTPROC_WORKER=i in its environment)
bound to the same gRPC and metrics addresses with SO_REUSEPORT; the kernel hands each new
connection from Envoy to one of them (the rendered Envoy config opens enough connections to
spread, see envoy_config.CONNECTIONS_PER_WORKER).

Shared between workers: the quota counters (Redis; a memory store is refused at load), the
metrics (prometheus-client's multiprocess directory, emptied here at start). Per worker: the
audit file (audit-wN.jsonl), guard HTTP sessions, tokenizers, the config (each reloads the
file itself; SIGHUP to the supervisor reaches all of them; `extproc reload` lands on one,
which passes it to the supervisor as a SIGHUP: Sidecar._admin_reload).

A worker that dies is started again (its live gauges dropped first); one that keeps dying at
start-up stops the whole group, so a broken deployment fails loudly instead of flapping.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .config import WORKER_ENV, load_config
from .telemetry.metrics import MULTIPROC_ENV, process_exited

log = logging.getLogger("extproc.workers")

# A worker that exits this soon after its start counts as failing to start.
EARLY_EXIT_S = 5.0
MAX_EARLY_EXITS = 3


def metrics_dir() -> Path:
    """The multiprocess directory: the operator's (emptied: stale files from an earlier run
    would add their counts), or a fresh one."""
    configured = os.environ.get(MULTIPROC_ENV)
    if not configured:
        return Path(tempfile.mkdtemp(prefix="extproc-metrics-"))
    path = Path(configured)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    return path


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the worker, before exec: a supervisor killed outright (SIGKILL) takes its workers
    with it, instead of leaving them serving the port beside the next group."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Workers:
    def __init__(self, config_path: str, listen: str | None, count: int, grace_s: float) -> None:
        self.config_path = config_path
        self.grace_s = grace_s  # read at start: the file may be broken by the time we stop
        self.listen = listen
        self.count = count
        self.procs: dict[int, subprocess.Popen] = {}
        self.started: dict[int, float] = {}
        self.early_exits = 0
        self.stopping = False
        self.dir = metrics_dir()
        self.own_dir = not os.environ.get(MULTIPROC_ENV)

    def _spawn(self, index: int) -> None:
        argv = [sys.executable, "-m", "extproc", "serve", "--config", self.config_path]
        if self.listen:
            argv += ["--listen", self.listen]
        env = {**os.environ, WORKER_ENV: str(index), MULTIPROC_ENV: str(self.dir)}
        self.procs[index] = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        self.started[index] = time.monotonic()
        log.info("worker %d started (pid %d)", index, self.procs[index].pid)

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, lambda *_: self._signal_all(signal.SIGHUP))
        for i in range(self.count):
            self._spawn(i)
        try:
            while not self.stopping:
                self._reap()
                time.sleep(0.2)
        finally:
            code = self._stop()
        return code

    def _on_stop(self, _signum: int, _frame: object) -> None:
        self.stopping = True

    def _reap(self) -> None:
        for index, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None or self.stopping:
                continue
            # Its live gauges (active streams) stop counting.
            process_exited(proc.pid, str(self.dir))
            lived = time.monotonic() - self.started[index]
            log.error("worker %d (pid %d) exited with %s after %.1fs", index, proc.pid, code, lived)
            if lived < EARLY_EXIT_S:
                self.early_exits += 1
                if self.early_exits >= MAX_EARLY_EXITS:
                    log.error("workers keep failing at start-up: stopping the sidecar")
                    self.stopping = True
                    return
            else:
                self.early_exits = 0
            self._spawn(index)

    def _stop(self) -> int:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + 5
        codes = []
        for proc in self.procs.values():
            try:
                codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
            process_exited(proc.pid, str(self.dir))
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        # A worker still starting when the SIGTERM came dies of it before its handler exists:
        # stopped as asked, not a failure.
        failed = self.early_exits >= MAX_EARLY_EXITS or any(
            c not in (0, -signal.SIGTERM) for c in codes
        )
        return 1 if failed else 0


def serve_workers(config_path: str, listen: str | None, count: int) -> int:
    grace = load_config(config_path).sidecar.grace_s
    return Workers(config_path, listen, count, grace).run()
