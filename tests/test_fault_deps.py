"""Faults of the gateway's dependencies, end to end: the openai SDK -> a real Envoy -> the
sidecar -> fake LLM processes this module owns, one as the backend and one as the guard model
(a Llama Guard), each killed, frozen (SIGSTOP, SIGCONT after) and slowed.

What every case checks: the client gets an answer in its API shape (OpenAI's error object,
the right status) or, for a stream cut after it started, an error from the SDK; within a bound
derived from the configured timeouts (a bound on hanging, generous for a shared machine, not a
performance figure); another stream in flight is not dropped; the sidecar still serves a normal
request afterwards; and the team's quota (memory store) is charged what the rules say, once.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from .conftest import free_port, sha256_hex
from .test_quota_e2e import Admin, wait_process_port

# Starts a real Envoy, Redis or Prometheus: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

MODEL = "m"  # served by the backend under test
SPARE = "spare"  # served by the other fake (the guard model's process), for bystander streams
GUARD_TIMEOUT_S = 0.5
CONNECT_TIMEOUT_S = 1.0
ROUTE_TIMEOUT_S = 1.5  # the backend's timeout_s: Envoy's route timeout for MODEL
SLACK_S = 5.0  # a shared 2-core machine: added to every bound
MAX_TOKENS = 8
TOKEN_LIMIT = 1_000_000
BYSTANDER_TOKENS = 10
BYSTANDER_TPS = 20  # 0.5 s: well within the route timeout
TEAMS = ("closed", "open", "plain", "steady")  # steady: bystanders and the checks after


# -- the processes ------------------------------------------------------------------------------


class FakeProcess:
    """One `extproc fake-llm` process on a fixed port: killed, frozen and started again."""

    def __init__(self, name: str, port: int, workdir: Path) -> None:
        self.name = name
        self.address = f"127.0.0.1:{port}"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "extproc", "fake-llm", "--listen", self.address,
                "--name", self.name, "--response-tokens", str(MAX_TOKENS)]  # fmt: skip
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        wait_process_port(self.proc, self.address)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def ensure_running(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)  # harmless when it runs
        else:
            self.start()

    def stop(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Deps:
    base_url: str
    admin: Admin
    log_path: Path
    stack: Any  # extproc.supervisor.Stack
    llm: FakeProcess  # the backend
    guard: FakeProcess  # the guard model, and the backend of SPARE


def config_for(ports: dict[str, int]) -> dict[str, Any]:
    llm, guard = f"http://127.0.0.1:{ports['llm']}", f"http://127.0.0.1:{ports['guard']}"
    llama = {"type": "llama_guard", "url": f"{guard}/v1", "model": "llama-guard-3-8b"}
    timeout_ms = int(GUARD_TIMEOUT_S * 1000)

    def team(name: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "keys": [{"sha256": sha256_hex(f"sk-{name}")}],
            "limits": [
                {"name": f"{name}-tokens", "window": "month", "tokens": TOKEN_LIMIT},
                {"name": f"{name}-requests", "window": "month", "requests": 100_000},
            ],
        }
        if name in ("closed", "open"):
            out["guardrails"] = {"request": [f"guard-{name}"]}
        return out

    return {
        "sidecar": {"listen": f"127.0.0.1:{ports['sidecar']}", "reload_interval_s": 0},
        "envoy": {
            "listen": f"127.0.0.1:{ports['envoy']}",
            "admin": f"127.0.0.1:{ports['admin']}",
            "access_log": True,  # status, flags and details of every answer, in the stack log
        },
        "quota": {"store": "memory"},
        "guards": {
            "guard-closed": {**llama, "timeout_ms": timeout_ms, "on_error": "block"},
            "guard-open": {**llama, "timeout_ms": timeout_ms, "on_error": "allow"},
        },
        "teams": {name: team(name) for name in TEAMS},
        "backends": {
            # Not ejected (passive health): one case's failures must not answer the next one.
            "llm": {
                "url": f"{llm}/v1",
                "connect_timeout_s": CONNECT_TIMEOUT_S,
                "timeout_s": ROUTE_TIMEOUT_S,
                "eject_after_failures": 1000,
            },
            "spare": {"url": f"{guard}/v1", "timeout_s": 30, "eject_after_failures": 1000},
        },
        "models": {
            MODEL: {"targets": [{"backend": "llm"}]},
            SPARE: {"targets": [{"backend": "spare"}]},
        },
    }


@pytest.fixture(scope="module")
def deps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deps]:
    from extproc.supervisor import Stack

    workdir = tmp_path_factory.mktemp("fault-deps")
    ports = {k: free_port() for k in ("sidecar", "envoy", "admin", "llm", "guard")}
    llm = FakeProcess("llm", ports["llm"], workdir)
    guard = FakeProcess("guard", ports["guard"], workdir)
    config = config_for(ports)
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = workdir / "stack.log"
    admin = Admin(config["sidecar"]["listen"])
    with open(log_path, "ab", buffering=0) as log:
        stack = Stack(path, workdir=workdir, stdout=log)
        try:
            llm.start()
            guard.start()
            stack.start()
            yield Deps(f"http://{config['envoy']['listen']}/v1", admin, log_path, stack, llm, guard)
        finally:
            admin.close()
            stack.stop(grace=10)
            llm.stop()
            guard.stop()
    code = stack.procs["sidecar"].returncode
    text = log_path.read_text(errors="replace")
    assert code == 0, (code, text[-3000:])  # never crashed: it drained and exited cleanly
    assert "Traceback" not in text, text[text.index("Traceback") - 500 :][:3000]  # no bug hit


@pytest.fixture(autouse=True)
def dependencies_up(deps: Deps) -> None:
    """Each case starts with both fakes running (a case before may have killed one)."""
    deps.llm.ensure_running()
    deps.guard.ensure_running()
    assert deps.stack.poll() is None, deps.stack.poll()


# -- requests -----------------------------------------------------------------------------------


@dataclass
class Result:
    seconds: float = 0.0
    status: int = 0  # 0: no HTTP answer
    body: Any = None  # an error answer's whole JSON body
    error: str = ""  # what the SDK raised
    exc: BaseException | None = None
    headers: dict[str, str] = field(default_factory=dict)
    text: str = ""
    chunks: int = 0  # chunks with content
    usage: Any = None
    max_tokens: int = MAX_TOKENS
    cut_at: float = 0.0  # monotonic time of the fault injected mid-stream
    ended: float = 0.0

    @property
    def reserved_prompt(self) -> int:
        """The sidecar's prompt estimate: the x-ratelimit headers say the counter right after
        this request's reservation (prompt + max_tokens), on a team reset just before."""
        remaining = int(self.headers["x-ratelimit-remaining-tokens"])
        return TOKEN_LIMIT - remaining - self.max_tokens


def ask(
    deps: Deps,
    team: str,
    content: str = "hello",
    *,
    model: str = MODEL,
    stream: bool = False,
    asked: bool = False,  # stream_options.include_usage: observed (else inline)
    max_tokens: int = MAX_TOKENS,
    headers: dict[str, str] | None = None,
    after: tuple[int, Callable[[], None]] | None = None,  # after N content chunks, call this
    timeout: float = 30.0,
) -> Result:
    res = Result(max_tokens=max_tokens)
    client = openai.OpenAI(
        base_url=deps.base_url, api_key=f"sk-{team}", max_retries=0, timeout=timeout
    )
    options = {"stream_options": {"include_usage": True}} if asked else {}
    started = time.monotonic()
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            max_tokens=max_tokens,
            stream=stream,
            # The fake answers max_tokens tokens (its default is MAX_TOKENS).
            extra_headers={"x-fake-response-tokens": str(max_tokens), **(headers or {})},
            **options,
        )
        res.status = raw.status_code
        res.headers = dict(raw.headers)
        if not stream:
            completion = raw.parse()
            res.text, res.usage = completion.choices[0].message.content or "", completion.usage
        else:
            for chunk in raw.parse():
                res.usage = chunk.usage or res.usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        res.text += choice.delta.content
                        res.chunks += 1
                        if after is not None and res.chunks == after[0]:
                            res.cut_at = time.monotonic()
                            after[1]()
    except openai.APIStatusError as err:
        res.status = err.status_code
        res.headers = dict(err.response.headers)
        try:
            res.body = err.response.json()
        except ValueError:
            res.body = err.response.text
        res.error, res.exc = f"{type(err).__name__}: {err}", err
    except Exception as err:  # a stream cut mid-way: whatever the SDK raises
        res.error, res.exc = f"{type(err).__module__}.{type(err).__name__}: {err}", err
    finally:
        client.close()
    res.ended = time.monotonic()
    res.seconds = res.ended - started
    return res


def envoy_entries(deps: Deps, team: str) -> list[dict[str, Any]]:
    """Envoy's access log lines (stdout, in the stack log) of a team's requests."""
    out = []
    for line in deps.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"team":"{team}"' in line.replace(" ", ""):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def describe(deps: Deps, res: Result, team: str) -> str:
    """For an assertion's message: what the client got, and Envoy's status, response flags and
    details for the team's last request (the log is flushed every second)."""
    time.sleep(1.2)
    keys = ("status", "flags", "details", "upstream", "duration_ms", "path")
    last = [{k: e.get(k) for k in keys} for e in envoy_entries(deps, team)[-1:]]
    return f"client: {res!r}\nenvoy: {last}"


def assert_openai_error(deps: Deps, res: Result, status: int, team: str) -> None:
    assert res.status == status, describe(deps, res, team)
    body = res.body
    shaped = (
        isinstance(body, dict)
        and set(body) == {"error"}
        and isinstance(body["error"], dict)
        and set(body["error"]) == {"message", "type", "param", "code"}
        and isinstance(body["error"]["message"], str)
        and body["error"]["message"] != ""
    )
    assert shaped, describe(deps, res, team)
    assert res.headers.get("content-type", "").startswith("application/json"), res.headers


def charged(deps: Deps, team: str) -> tuple[int, int]:
    """The team's used tokens and requests, once nothing is reserved any more."""
    usage = deps.admin.settled(team)
    return usage[f"{team}-tokens"].used, usage[f"{team}-requests"].used


def assert_still_serving(deps: Deps) -> None:
    """The sidecar (and Envoy) outlived the fault and serve a JSON answer and a stream."""
    assert deps.stack.poll() is None, deps.stack.poll()
    deps.llm.ensure_running()
    deps.guard.ensure_running()
    for stream in (False, True):
        res = ask(deps, "steady", stream=stream, asked=True)
        assert (res.status, res.error) == (200, ""), res
        assert res.text == "".join(f" tok{i}" for i in range(MAX_TOKENS)), res


@contextlib.contextmanager
def bystander(deps: Deps, model: str) -> Iterator[None]:
    """Another team's stream, to a healthy backend, in flight across the fault: it must end
    whole."""
    result: dict[str, Any] = {}
    first = threading.Event()

    def run() -> None:
        res = ask(
            deps,
            "steady",
            model=model,
            stream=True,
            max_tokens=BYSTANDER_TOKENS,
            headers={"x-fake-tokens-per-second": str(BYSTANDER_TPS)},
            after=(1, first.set),
        )
        result["res"] = res
        first.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    assert first.wait(10), "the bystander stream did not start"
    yield
    worker.join(30)
    res = result.get("res")
    assert res is not None, "the bystander stream hung"
    assert (res.status, res.error) == (200, ""), res
    assert res.text == "".join(f" tok{i}" for i in range(BYSTANDER_TOKENS)), res


# -- the guard model ----------------------------------------------------------------------------


GUARD_FAULTS = ("killed", "frozen", "slowed")


@contextlib.contextmanager
def guard_fault(deps: Deps, fault: str) -> Iterator[str]:
    """The guard model in the given state; yields the prompt to send."""
    if fault == "killed":
        deps.guard.kill()
        yield "hello"
    elif fault == "frozen":
        with deps.guard.frozen():
            yield "hello"
    else:
        yield "hello [[slow:3000]]"  # the fake guard answers 3 s late: past its timeout


@pytest.mark.parametrize("fault", GUARD_FAULTS)
@pytest.mark.parametrize("policy", ["closed", "open"])
def test_guard_model_fault(deps: Deps, fault: str, policy: str) -> None:
    """on_error: block answers 503 guard_unavailable, told apart from a policy block (nothing
    goes upstream, the reservation is released: a request, no tokens); on_error: allow serves
    the request (charged its usage). Either way within the guard's timeout."""
    team = policy
    deps.admin.reset(team)
    with bystander(deps, MODEL), guard_fault(deps, fault) as prompt:
        res = ask(deps, team, prompt, timeout=GUARD_TIMEOUT_S + 2 * SLACK_S)
    assert res.seconds < GUARD_TIMEOUT_S + SLACK_S, res
    if policy == "closed":
        assert_openai_error(deps, res, 503, team)
        assert res.body["error"]["code"] == "guard_unavailable:guard-closed", res
        assert res.body["error"]["type"] == "server_error", res
        assert charged(deps, team) == (0, 1)
    else:
        assert (res.status, res.error) == (200, ""), describe(deps, res, team)
        assert res.usage is not None
        assert charged(deps, team) == (res.usage.total_tokens, 1)
    assert_still_serving(deps)


# -- the backend --------------------------------------------------------------------------------


KINDS = {
    "json": {"stream": False},
    "inline": {"stream": True, "asked": False},
    "observed": {"stream": True, "asked": True},
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_backend_killed_before_the_request(deps: Deps, kind: str) -> None:
    """Nothing listens: Envoy's 503, in OpenAI's shape; a request counted, no tokens."""
    team = "plain"
    deps.admin.reset(team)
    deps.llm.kill()
    res = ask(deps, team, **KINDS[kind], timeout=CONNECT_TIMEOUT_S + 2 * SLACK_S)
    assert res.seconds < CONNECT_TIMEOUT_S + SLACK_S, res
    assert_openai_error(deps, res, 503, team)
    assert charged(deps, team) == (0, 1)
    assert_still_serving(deps)


@pytest.mark.parametrize("kind", list(KINDS))
def test_backend_frozen_hits_the_route_timeout(deps: Deps, kind: str) -> None:
    """The backend accepts (the kernel does) and never answers: Envoy's route timeout, 504 in
    OpenAI's shape; a request counted, no tokens."""
    team = "plain"
    deps.admin.reset(team)
    with bystander(deps, SPARE), deps.llm.frozen():
        res = ask(deps, team, **KINDS[kind], timeout=ROUTE_TIMEOUT_S + 2 * SLACK_S)
    assert res.seconds < ROUTE_TIMEOUT_S + SLACK_S, res
    assert_openai_error(deps, res, 504, team)
    assert charged(deps, team) == (0, 1)
    assert_still_serving(deps)


def test_backend_slower_than_the_route_timeout(deps: Deps) -> None:
    """The first token comes after the route timeout: 504 in OpenAI's shape, no tokens (the
    streams' paths for this 504 are those of the frozen backend's)."""
    team = "plain"
    deps.admin.reset(team)
    slow = {"x-fake-ttft-ms": str(int((ROUTE_TIMEOUT_S + 3) * 1000))}
    res = ask(deps, team, headers=slow, timeout=ROUTE_TIMEOUT_S + 2 * SLACK_S)
    assert res.seconds < ROUTE_TIMEOUT_S + SLACK_S, res
    assert_openai_error(deps, res, 504, team)
    assert charged(deps, team) == (0, 1)
    assert_still_serving(deps)


def test_backend_slow_within_the_route_timeout_is_served(deps: Deps) -> None:
    team = "plain"
    deps.admin.reset(team)
    res = ask(deps, team, headers={"x-fake-ttft-ms": str(int(ROUTE_TIMEOUT_S * 400))})
    assert (res.status, res.error) == (200, ""), res
    assert charged(deps, team) == (res.usage.total_tokens, 1)


def assert_cut_stream_charged(deps: Deps, res: Result, team: str, max_tokens: int) -> None:
    """A stream cut after it started: the prompt and what was delivered (the events the
    sidecar saw, at least what the client got), never more than the reservation."""
    tokens, requests = charged(deps, team)
    prompt = res.reserved_prompt
    assert prompt + res.chunks <= tokens <= prompt + max_tokens, (tokens, prompt, res)
    assert requests == 1


@pytest.mark.parametrize("kind", ["inline", "observed"])
def test_backend_slowed_mid_stream_hits_the_route_timeout(deps: Deps, kind: str) -> None:
    """A stream slower than the route timeout: Envoy cuts it after it started (no error body
    can follow the headers: Envoy resets the connection, flags UT); the SDK raises while
    iterating."""
    team = "plain"
    deps.admin.reset(team)
    max_tokens = 60  # 6 s at 10 tokens/s
    res = ask(
        deps,
        team,
        **KINDS[kind],
        max_tokens=max_tokens,
        headers={"x-fake-tokens-per-second": "10"},
        timeout=ROUTE_TIMEOUT_S + 2 * SLACK_S,
    )
    print(f"\nslowed {kind} stream cut by the route timeout: {res.error} after {res.chunks}")
    assert res.status == 200 and 0 < res.chunks < max_tokens, res
    # The SDK raised (today openai.APIConnectionError, "Connection error."): the client knows
    # the answer is incomplete.
    assert isinstance(res.exc, openai.APIError), res
    assert res.seconds < ROUTE_TIMEOUT_S + SLACK_S, res
    assert_cut_stream_charged(deps, res, team, max_tokens)
    assert_still_serving(deps)


@pytest.mark.parametrize("kind", ["inline", "observed"])
def test_backend_killed_mid_stream(deps: Deps, kind: str) -> None:
    """The backend dies after 3 chunks (Envoy: UPE, upstream_reset_after_response_started): the
    client's stream ends in an error from the SDK soon after; another stream (another backend)
    goes on; the team is charged the prompt and what was delivered."""
    team = "plain"
    deps.admin.reset(team)
    max_tokens = 100  # 5 s at 20 tokens/s: the kill comes long before the end
    with bystander(deps, SPARE):
        res = ask(
            deps,
            team,
            **KINDS[kind],
            max_tokens=max_tokens,
            headers={"x-fake-tokens-per-second": "20"},
            after=(3, deps.llm.kill),
            timeout=2 * SLACK_S,
        )
    print(f"\nbackend killed mid-{kind}-stream: {res.error} after {res.chunks} chunks")
    assert res.status == 200 and res.cut_at and 3 <= res.chunks < max_tokens, res
    # The SDK raised (today openai.APIConnectionError, "Connection error."): the client knows
    # the answer is incomplete.
    assert isinstance(res.exc, openai.APIError), res
    assert res.ended - res.cut_at < SLACK_S, res  # the error came, the client did not hang
    assert_cut_stream_charged(deps, res, team, max_tokens)
    assert_still_serving(deps)


# -- a backend that reports no usage (the charging rule: prompt + min(counted, max output)) ---


@pytest.mark.parametrize("kind", ["inline", "observed"])
def test_a_stream_without_usage_is_charged_at_most_its_max_output(deps: Deps, kind: str) -> None:
    """The sidecar counts the text itself (the fake's words are two tokens each for tiktoken,
    more than max_tokens), and charges at most what the request may produce: prompt + 5."""
    team = "plain"
    deps.admin.reset(team)
    res = ask(deps, team, **KINDS[kind], max_tokens=5, headers={"x-fake-no-usage": "1"})
    assert (res.status, res.error, res.usage) == (200, "", None), res
    assert res.text == " tok0 tok1 tok2 tok3 tok4"
    tokens, requests = charged(deps, team)
    assert (tokens, requests) == (res.reserved_prompt + 5, 1), res
