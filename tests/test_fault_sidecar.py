"""The sidecar as a dependency that fails: frozen, killed, killed with requests and streams in
flight, one of several workers killed. Envoy answers for it, in OpenAI's error shape with the
configured failure status (extproc/envoy_config.py `_local_reply`), within a bounded time."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from .conftest import free_port, sha256_hex
from .redis_servers import RedisServer, redis_server_module  # noqa: F401
from .test_quota_e2e import Admin, wait_process_port

# Starts a real Envoy, Redis or Prometheus: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

FAILURE_STATUS = 502
MESSAGE_TIMEOUT_MS = 500
# A bound on hanging, not a performance figure: the message timeout plus room for a loaded
# 2-core machine.
BOUND_S = MESSAGE_TIMEOUT_MS / 1000 + 4.0
SIDECAR_ERRORS = {"gateway_unavailable", "gateway_timeout"}


@dataclass
class Stack:
    workdir: Path
    config_path: Path
    base_url: str
    sidecar_listen: str
    procs: dict[str, subprocess.Popen]
    log_path: Path

    def client(self, timeout: float = 20.0, team: str = "t") -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url, api_key=f"sk-{team}", max_retries=0, timeout=timeout
        )

    @property
    def sidecar(self) -> subprocess.Popen:
        return self.procs["sidecar"]

    def restart_sidecar(self) -> None:
        """A new sidecar on the same address; returns once Envoy sends it requests again."""
        old = self.sidecar
        if old.poll() is None:
            old.kill()
        old.wait(10)
        log = self.log_path.open("ab", buffering=0)
        proc = subprocess.Popen(
            [sys.executable, "-m", "extproc", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
        )
        self.procs["sidecar"] = proc
        wait_process_port(proc, self.sidecar_listen)
        wait_serving(self)


def wait_serving(stack: Stack, timeout: float = 20.0) -> None:
    """Envoy's health check marks a sidecar that was down unhealthy; poll until it answers."""
    deadline = time.monotonic() + timeout
    client = stack.client(timeout=5, team="probe")
    while True:
        try:
            chat(client, "direct")
            return
        except openai.APIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def chat(client: openai.OpenAI, model: str, **extra: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], **extra
    )


RESERVATION_TTL_S = 2


def base_config(ports: dict[str, int], redis_url: str, workers: int = 1) -> dict[str, Any]:
    fake = f"127.0.0.1:{ports['fake']}"
    return {
        "sidecar": {
            "listen": f"127.0.0.1:{ports['sidecar']}",
            "failure_status": FAILURE_STATUS,
            "message_timeout_ms": MESSAGE_TIMEOUT_MS,
            "reload_interval_s": 0,
            "grace_s": 2,
            "workers": workers,
        },
        "envoy": {"listen": f"127.0.0.1:{ports['envoy']}", "admin": f"127.0.0.1:{ports['admin']}"},
        "teams": {
            "t": {
                "keys": [{"sha256": sha256_hex("sk-t")}],
                "limits": [{"name": "t-tokens", "window": "day", "tokens": 10_000_000}],
            },
            "probe": {"keys": [{"sha256": sha256_hex("sk-probe")}]},
        },
        # In Redis, so what a dead sidecar reserved outlives it; reservations left behind
        # expire (and are charged at their estimate) within seconds here.
        "quota": {
            "store": "redis",
            "redis": {"url": redis_url},
            "reservation_ttl_s": RESERVATION_TTL_S,
        },
        "backends": {"fake": {"url": f"http://{fake}/v1"}, "fake2": {"url": f"http://{fake}/v1"}},
        "models": {
            # One backend: the downstream stage prepares the request itself.
            "direct": {"targets": [{"backend": "fake"}]},
            # Two pools: each attempt passes the upstream stage too.
            "pooled": {
                "targets": [
                    {"backend": "fake", "priority": 0},
                    {"backend": "fake2", "priority": 1},
                ]
            },
        },
        "fake_llm": {"listen": fake, "response_tokens": 8, "ttft_ms": 1},
    }


def start_stack(workdir: Path, redis_url: str, workers: int = 1) -> Stack:
    from extproc.supervisor import Stack as Processes

    names = ("sidecar", "envoy", "admin", "fake")
    ports = {k: free_port() for k in names}
    config = base_config(ports, redis_url, workers)
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = workdir / "stack.log"
    with open(log_path, "ab", buffering=0) as log:
        processes = Processes(path, workdir=workdir, stdout=log)
        processes.start()
    stack = Stack(
        workdir=workdir,
        config_path=path,
        base_url=f"http://{config['envoy']['listen']}/v1",
        sidecar_listen=config["sidecar"]["listen"],
        procs=processes.procs,
        log_path=log_path,
    )
    stack.processes = processes  # type: ignore[attr-defined]
    return stack


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server_module: RedisServer,  # noqa: F811
) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("fault-sidecar"), redis_server_module.url)
    try:
        yield s
    finally:
        with contextlib.suppress(ProcessLookupError):
            s.sidecar.send_signal(signal.SIGCONT)
        s.processes.stop(grace=5)  # type: ignore[attr-defined]


@pytest.fixture
def healthy(stack: Stack) -> Iterator[Stack]:
    """Each test starts and ends with a sidecar that answers."""
    if stack.sidecar.poll() is not None:
        stack.restart_sidecar()
    yield stack
    with contextlib.suppress(ProcessLookupError):
        stack.sidecar.send_signal(signal.SIGCONT)
    if stack.sidecar.poll() is not None:
        stack.restart_sidecar()
    wait_serving(stack)


def assert_sidecar_error(exc: openai.APIStatusError, codes: set[str] = SIDECAR_ERRORS) -> None:
    assert exc.status_code == FAILURE_STATUS, exc
    assert exc.response.headers["content-type"] == "application/json"
    error = exc.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "server_error"
    assert error["code"] in codes, error
    assert exc.response.headers.get("retry-after") == "1"


# -- a frozen sidecar ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["direct", "pooled"])
def test_a_frozen_sidecar_is_answered_with_the_failure_status_after_the_message_timeout(
    healthy: Stack, model: str
) -> None:
    healthy.sidecar.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        chat(healthy.client(), model)
    elapsed = time.monotonic() - started
    assert_sidecar_error(caught.value, {"gateway_timeout"})
    assert MESSAGE_TIMEOUT_MS / 1000 * 0.9 <= elapsed < BOUND_S
    # A stream is refused alike: nothing of it had started.
    with pytest.raises(openai.APIStatusError) as caught:
        chat(healthy.client(), model, stream=True)
    assert_sidecar_error(caught.value, {"gateway_timeout"})
    healthy.sidecar.send_signal(signal.SIGCONT)
    assert chat(healthy.client(), model).choices[0].message.content


def test_a_slowed_sidecar_still_serves(healthy: Stack) -> None:
    """Paused for less than the message timeout, again and again: slower, never refused."""
    stop = threading.Event()

    def stutter() -> None:
        while not stop.is_set():
            healthy.sidecar.send_signal(signal.SIGSTOP)
            time.sleep(0.05)  # far under the message timeout, even if the sleep runs long
            healthy.sidecar.send_signal(signal.SIGCONT)
            time.sleep(0.05)

    thread = threading.Thread(target=stutter)
    thread.start()
    try:
        for model in ("direct", "pooled") * 3:
            assert chat(healthy.client(), model).choices[0].message.content
    finally:
        stop.set()
        thread.join()
        healthy.sidecar.send_signal(signal.SIGCONT)


# -- a killed sidecar ---------------------------------------------------------------------------


def test_a_killed_sidecar_is_answered_at_once_until_it_is_back(healthy: Stack) -> None:
    healthy.sidecar.kill()
    healthy.sidecar.wait(10)
    for model in ("direct", "pooled", "direct"):
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            chat(healthy.client(), model)
        assert_sidecar_error(caught.value, {"gateway_unavailable"})
        assert time.monotonic() - started < BOUND_S
    # Envoy's health check noticed; a new sidecar is taken back as soon as it answers.
    healthy.restart_sidecar()
    assert chat(healthy.client(), "pooled").choices[0].message.content


def test_requests_waiting_on_a_sidecar_that_dies_are_answered(healthy: Stack) -> None:
    healthy.sidecar.send_signal(signal.SIGSTOP)
    client = healthy.client()

    def one(model: str) -> openai.APIStatusError | None:
        try:
            chat(client, model)
        except openai.APIStatusError as exc:
            return exc
        return None

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, m) for m in ("direct", "pooled") * 3]
        time.sleep(0.2)  # the requests are now waiting for the frozen sidecar's answer
        healthy.sidecar.kill()
        results = [f.result(timeout=BOUND_S + 5) for f in futures]
    for exc in results:
        assert exc is not None
        assert_sidecar_error(exc)


# -- streams in flight --------------------------------------------------------------------------

SLOW_STREAM = {"x-fake-tokens-per-second": "40", "x-fake-response-tokens": "40"}


def test_streams_in_flight_when_the_sidecar_dies(healthy: Stack) -> None:
    """An observed stream (the client asked for usage) does not wait for the sidecar: it ends
    whole. An inline stream's chunks pass the sidecar: Envoy cannot add to an answer it has
    started, so it resets the stream, and the client's SDK raises."""
    client = healthy.client(timeout=BOUND_S + 5)
    observed = client.chat.completions.create(
        model="direct",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=SLOW_STREAM,
    )
    inline = client.chat.completions.create(
        model="direct",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        extra_headers=SLOW_STREAM,
    )
    observed_iter, inline_iter = iter(observed), iter(inline)
    next(observed_iter)
    next(inline_iter)
    healthy.sidecar.kill()
    started = time.monotonic()

    observed_chunks = list(observed_iter)
    assert observed_chunks[-1].usage is not None  # the stream ended whole, usage and all
    assert sum(len(c.choices) for c in observed_chunks) >= 39

    with pytest.raises((openai.APIError, openai.APIConnectionError)) as caught:
        for _ in inline_iter:
            pass
    # Cut, not completed: the transport reports an incomplete chunked answer.
    assert "incomplete" in str(caught.value).lower() or isinstance(
        caught.value, openai.APIConnectionError
    ), repr(caught.value)
    assert time.monotonic() - started < BOUND_S + 2


def test_a_stream_whose_sidecar_died_is_charged_once_at_its_estimate(healthy: Stack) -> None:
    """The sidecar that was to settle it is gone: its reservation, kept in Redis, expires and
    is charged at what was reserved (the prompt and max_tokens): over-counted, never lost, and
    once, whatever the new sidecar sees of the request afterwards."""
    admin = Admin(healthy.sidecar_listen)
    try:
        admin.reset("t")
        stream = healthy.client(timeout=BOUND_S + 5).chat.completions.create(
            model="direct",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=40,
            extra_headers=SLOW_STREAM,
        )
        chunks = iter(stream)
        next(chunks)
        reserved = admin.usage("t")["t-tokens"].reserved
        assert reserved > 40
        healthy.sidecar.kill()
        assert list(chunks)[-1].usage is not None  # the client got all of it
        healthy.restart_sidecar()
        deadline = time.monotonic() + RESERVATION_TTL_S + 10
        while (usage := admin.usage("t")["t-tokens"]).reserved:
            assert time.monotonic() < deadline, usage
            time.sleep(0.1)
        assert usage.used == reserved  # (wait_serving's requests are another team's)
    finally:
        admin.close()


# -- workers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workers(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server_module: RedisServer,  # noqa: F811
) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("fault-workers"), redis_server_module.url, workers=2)
    try:
        yield s
    finally:
        for pid in worker_pids(s):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        s.processes.stop(grace=5)  # type: ignore[attr-defined]


def worker_pids(stack: Stack) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(stack.sidecar.pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


def test_requests_on_a_killed_worker_are_answered_and_the_others_served(workers: Stack) -> None:
    wait_serving(workers)
    # (One worker serving does not mean both have started: on a loaded machine the second
    # may still be coming up.)
    deadline = time.monotonic() + 20
    while len(worker_pids(workers)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = worker_pids(workers)
    assert len(pids) == 2, pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    client = workers.client()
    results: list[Any] = []
    lock = threading.Lock()

    def one(model: str) -> None:
        try:
            outcome: Any = chat(client, model)
        except openai.APIStatusError as exc:
            outcome = exc
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=one, args=(m,)) for m in ("direct", "pooled") * 4]
    for t in threads:
        t.start()
    time.sleep(0.2)
    os.kill(pids[0], signal.SIGKILL)
    os.kill(pids[1], signal.SIGCONT)
    for t in threads:
        t.join(BOUND_S + 5)
    assert len(results) == len(threads)
    for outcome in results:
        # Answered by the live worker, or by Envoy for the dead one: never an empty answer.
        if isinstance(outcome, openai.APIStatusError):
            assert_sidecar_error(outcome)
        else:
            assert outcome.choices[0].message.content
    # The supervisor replaced the dead worker: every request is served again.
    deadline = time.monotonic() + 20
    while len(worker_pids(workers)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(worker_pids(workers)) == 2
    for _ in range(8):
        wait_serving(workers)
