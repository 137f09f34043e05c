"""Metrics and the audit trail through the real Envoy, with the openai SDK as the client.

The sidecar runs as two workers (`sidecar.workers: 2`) on the same ports (SO_REUSEPORT),
quotas in Redis, metrics in one prometheus-client multiprocess directory: /metrics must give
the exact sums over both, and each worker writes its own audit file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from extproc.supervisor import Stack

from .conftest import BACKEND_A_SECRET, free_port, sha256_hex
from .redis_servers import RedisServer, redis_server_module  # noqa: F401

# Starts a real Envoy, Redis or Prometheus: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

MODEL = "gpt-4o-mini"
PROMPT_SECRET = "sk-proj-Abc123Def456Ghi789Jkl012Mno345"
EMAIL = "jane.doe@example.com"
RESPONSE_TOKENS = 8
PRICE_IN, PRICE_OUT, PRICE_REASONING = 1.5, 6.0, 12.0  # USD per million tokens


def telemetry_config(ports: dict[str, int], audit: Path, redis_url: str) -> dict[str, Any]:
    fake = f"http://127.0.0.1:{ports['fake']}/v1"
    return {
        "sidecar": {"listen": f"127.0.0.1:{ports['sidecar']}", "grace_s": 5, "workers": 2},
        "quota": {"store": "redis", "redis": {"url": redis_url}},
        "envoy": {
            "listen": f"127.0.0.1:{ports['envoy']}",
            "admin": f"127.0.0.1:{ports['admin']}",
            "access_log": False,
        },
        "teams": {
            "alpha": {"keys": [{"sha256": sha256_hex("sk-alpha")}]},
            "thinker": {"keys": [{"sha256": sha256_hex("sk-thinker")}]},
            "tight": {
                "keys": [{"sha256": sha256_hex("sk-tight")}],
                "limits": [{"name": "tiny", "window": "month", "tokens": 1}],
            },
        },
        "backends": {
            "fake": {"url": fake, "api_key": {"env": "TEST_BACKEND_A_KEY"}},
            "dead": {"url": f"http://127.0.0.1:{ports['dead']}/v1", "connect_timeout_s": 1},
        },
        "models": {
            MODEL: {"targets": [{"backend": "fake"}]},
            "broken": {"targets": [{"backend": "dead"}]},
            "pooled": {
                "targets": [
                    {"backend": "dead", "priority": 0},
                    {"backend": "fake", "priority": 1},
                ]
            },
        },
        "prices": {MODEL: {"input": PRICE_IN, "output": PRICE_OUT, "reasoning": PRICE_REASONING}},
        "guards": {"deny": {"type": "deny", "keywords": ["forbidden-word"]}},
        "guardrails": {"request": ["deny"]},
        "observability": {
            "metrics": {"listen": f"127.0.0.1:{ports['metrics']}"},
            "audit": {"path": str(audit), "max_bytes": 16384, "backups": 1000},
        },
        "fake_llm": {"listen": f"127.0.0.1:{ports['fake']}", "response_tokens": RESPONSE_TOKENS},
    }


@dataclass
class Telemetry:
    base_url: str
    metrics_url: str
    audit_dir: Path
    config: dict[str, Any]
    config_path: Path
    supervisor: subprocess.Popen
    multiproc: Path

    def client(self, key: str = "sk-alpha") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=20)

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    def audit_records(self) -> list[dict[str, Any]]:
        records = []
        for path in sorted(self.audit_dir.glob("audit*.jsonl*")):
            for line in path.read_text().splitlines():
                records.append(json.loads(line))
        return records


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and wanted <= set(lbls))


@contextlib.contextmanager
def telemetry_stack(tmp: Path, redis_url: str, **sidecar: Any) -> Iterator[Telemetry]:
    names = ("sidecar", "envoy", "admin", "fake", "dead", "metrics")
    ports = {k: free_port() for k in names}
    audit_dir = tmp / "audit"
    config = telemetry_config(ports, audit_dir / "audit.jsonl", redis_url)
    config["sidecar"].update(sidecar)
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    multiproc = tmp / "prom"
    multiproc.mkdir()
    (multiproc / "counter_1.db").write_bytes(b"stale")  # from an earlier run: emptied at start
    env = {"TEST_BACKEND_A_KEY": BACKEND_A_SECRET, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    os.environ["TEST_BACKEND_A_KEY"] = BACKEND_A_SECRET  # as the shared gateway sets it
    log_path = tmp / "stack.log"
    with open(log_path, "ab", buffering=0) as log:
        stack = Stack(path, workdir=tmp, env=env, stdout=log)
        try:
            stack.start()
            yield Telemetry(
                base_url=f"http://{config['envoy']['listen']}/v1",
                metrics_url=f"http://{config['observability']['metrics']['listen']}/metrics",
                audit_dir=audit_dir,
                config=config,
                config_path=path,
                supervisor=stack.procs["sidecar"],
                multiproc=multiproc,
            )
        finally:
            stack.stop(grace=10)
    tail = log_path.read_text(errors="replace")[-3000:]
    assert stack.procs["sidecar"].returncode == 0, tail


@pytest.fixture(scope="module")
def telemetry(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server_module: RedisServer,  # noqa: F811
) -> Iterator[Telemetry]:
    """The default paths (stream_path auto, json_path access_log)."""
    with telemetry_stack(tmp_path_factory.mktemp("telemetry"), redis_server_module.url) as t:
        yield t


@pytest.fixture
def observing_telemetry(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server_module: RedisServer,  # noqa: F811
) -> Iterator[Telemetry]:
    """stream_path: observe: the observer follows every stream (no response guard here)."""
    tmp = tmp_path_factory.mktemp("telemetry-observe")
    with telemetry_stack(tmp, redis_server_module.url, stream_path="observe") as t:
        yield t


def hello() -> list[dict[str, str]]:
    return [{"role": "user", "content": "Hello there"}]


@pytest.mark.parametrize("path", ["observed", "released"])
def test_a_known_sequence_gives_exact_counts_summed_over_two_processes(
    request: pytest.FixtureRequest, path: str
) -> None:
    # observed: stream_path observe, the observer follows the streams; released: the default,
    # a stream whose client asks for usage is released with its request (Envoy reads its usage
    # report).
    observed = path == "observed"
    telemetry: Telemetry = request.getfixturevalue(
        "observing_telemetry" if observed else "telemetry"
    )
    alpha = telemetry.client()
    first = alpha.chat.completions.create(model=MODEL, messages=hello())
    assert first.usage is not None
    prompt = first.usage.prompt_tokens  # the fake's count for this prompt
    assert first.usage.completion_tokens == RESPONSE_TOKENS
    for _ in range(2):
        alpha.chat.completions.create(model=MODEL, messages=hello())
    # Three streams. By default the first two, whose client asks for usage, are released with
    # their request (Envoy reads their usage report) and the third, whose client does not, is
    # relayed inline (the usage event cut). Under stream_path: observe the observer follows all
    # three; the third asks for usage too there, so that every count is the backend's.
    for n in range(3):
        asks = n < 2 or observed
        chunks = list(
            alpha.chat.completions.create(
                model=MODEL,
                messages=hello(),
                stream=True,
                **({"stream_options": {"include_usage": True}} if asks else {}),
            )
        )
        assert chunks
        if asks:
            assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == prompt
    with pytest.raises(openai.PermissionDeniedError):
        alpha.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "say forbidden-word"}]
        )
    with pytest.raises(openai.RateLimitError):
        telemetry.client("sk-tight").chat.completions.create(model=MODEL, messages=hello())
    with pytest.raises(openai.NotFoundError):
        alpha.chat.completions.create(model="no-such-model", messages=hello())
    with pytest.raises(openai.AuthenticationError):
        telemetry.client("sk-wrong").chat.completions.create(model=MODEL, messages=hello())
    with pytest.raises(openai.InternalServerError):
        alpha.chat.completions.create(model="broken", messages=hello())
    failed_over = alpha.chat.completions.with_raw_response.create(model="pooled", messages=hello())
    assert failed_over.headers["x-aigw-failover"] == "true"

    # Only the streams a stage of the sidecar follows are timed: three observed, or one inline.
    timed = 3 if observed else 1
    # Observed streams' tokens come from the observer when they end; released requests are
    # counted from Envoy's access log (batched): wait for both.
    deadline = time.monotonic() + 10
    while True:
        samples = telemetry.scrape()
        if (
            value(samples, "extproc_time_to_first_token_seconds_count", model=MODEL) == timed
            and total(samples, "extproc_requests_total") == 12
        ):
            break
        assert time.monotonic() < deadline, "the stream counts never arrived"
        time.sleep(0.1)
    samples = telemetry.scrape()
    if value(samples, "extproc_active_streams") != 0:  # the last observer may still be closing
        time.sleep(0.5)
        samples = telemetry.scrape()

    # Requests to one-backend models that left the downstream stage with their body came back
    # through Envoy's access log: the four JSON answers (served or failed) and the streams no
    # stage holds (observed: counted there, finished by the observer; released: counted and
    # settled there), and nothing else (Envoy's filter).
    entries = "extproc_access_log_entries_total"
    assert value(samples, entries, result="accounted") == 4 + (3 if observed else 2)
    assert value(samples, entries, result="ignored") == 0

    requests = "extproc_requests_total"
    # (No team here belongs to an organization.)
    served = {"organization": "none", "team": "alpha", "model": MODEL, "outcome": "served"}
    served["status"] = "200"
    assert value(samples, requests, **served, api="openai") == 6
    expected = {
        ("alpha", MODEL, "guard_blocked", "403"): 1,
        ("tight", MODEL, "quota_rejected", "429"): 1,
        # A model the config does not know is never a label value.
        ("alpha", "unknown", "rejected", "404"): 1,
        ("none", "none", "rejected", "401"): 1,
        ("alpha", "broken", "backend_error", "503"): 1,
        ("alpha", "pooled", "failed_over", "200"): 1,
    }
    for (team, model, outcome, status), count in expected.items():
        got = value(
            samples, requests, organization="none", team=team, model=model, outcome=outcome,
            status=status, api="openai",
        )  # fmt: skip
        assert got == count, (team, model, outcome, status, got)
    assert total(samples, requests) == 12

    tokens = "extproc_tokens_total"
    labels = {"team": "alpha", "model": MODEL, "backend": "fake", "source": "provider"}
    labels["organization"] = "none"
    assert value(samples, tokens, type="input", **labels) == 6 * prompt
    assert value(samples, tokens, type="output", **labels) == 6 * RESPONSE_TOKENS
    pooled = {**labels, "model": "pooled"}
    assert value(samples, tokens, type="output", **pooled) == RESPONSE_TOKENS
    assert total(samples, tokens, source="estimate") == 0
    cost = value(samples, "extproc_cost_usd_total", organization="none", team="alpha", model=MODEL)
    assert cost == pytest.approx(6 * (prompt * PRICE_IN + RESPONSE_TOKENS * PRICE_OUT) / 1e6)
    assert total(samples, "extproc_cost_usd_total", model="pooled") == 0  # no price: no cost

    assert (
        value(samples, "extproc_failovers_total", model="pooled", backend="fake", kind="retry") == 1
    )
    # A local guard that finds nothing records no verdict: the one block is the only one.
    verdicts = "extproc_guard_verdicts_total"
    assert value(samples, verdicts, guard="deny", stage="request", action="block") == 1
    assert total(samples, verdicts) == 1
    # Every request's headers, timed once in the downstream stage.
    phase = "extproc_ext_proc_phase_seconds_count"
    assert value(samples, phase, stage="downstream", phase="request_headers") == 12
    assert value(samples, "extproc_time_to_first_token_seconds_count", model=MODEL) == timed
    assert value(samples, "extproc_active_streams") == 0
    assert value(samples, "extproc_ext_proc_streams", stage="observe") == 0

    # Both workers served (Envoy's connections spread over them) and count in one directory.
    pids = {p.stem.rsplit("_", 1)[1] for p in telemetry.multiproc.glob("counter_*.db")}
    assert len(pids) == 2, pids

    records = telemetry.audit_records()
    assert len(records) == 12
    outcomes = Counter((r["team"], r["outcome"], r["status"]) for r in records)
    assert outcomes[("alpha", "served", 200)] == 6
    assert outcomes[("alpha", "failed_over", 200)] == 1
    assert outcomes[(None, "rejected", 401)] == 1
    blocked = next(r for r in records if r["outcome"] == "guard_blocked")
    assert blocked["decision"] == "blocked"
    assert blocked["error_code"] == "guard_blocked:deny"
    assert {"stage": "request", "guard": "deny", "action": "block"}.items() <= blocked["guards"][
        0
    ].items()
    served = [r for r in records if r["outcome"] == "served"]
    # Three JSON answers and three streams.
    paths = Counter((r["path"], r["stream"]) for r in served)
    if observed:
        assert paths == {("logged", False): 3, ("observed", True): 3}, paths
    else:
        assert paths == {("logged", False): 3, ("logged", True): 2, ("inline", True): 1}, paths
    # Chunk timings where a stage timed the chunks.
    for r in served:
        assert ("ttft_ms" in r) is (r["path"] != "logged"), r
    for r in served:
        assert r["tokens"]["input"] == prompt and r["tokens"]["output"] == RESPONSE_TOKENS
        assert r["backend"] == "fake"
        assert r["cost_usd"] == pytest.approx((prompt * PRICE_IN + 8 * PRICE_OUT) / 1e6)
        assert r["prompt_sha256"] == hashlib.sha256(orjson.dumps(["Hello there"])).hexdigest()
        assert "prompt" not in r  # include_prompt is off
    pooled_record = next(r for r in records if r["model"] == "pooled")
    assert pooled_record["failover"] == "retry" and pooled_record["attempts"] == 2


def test_reasoning_tokens_of_a_released_answer_are_counted_and_priced_apart(
    telemetry: Telemetry,
) -> None:
    """A JSON answer released to Envoy's access log: Envoy reads its reasoning tokens
    (completion_tokens_details) into the entry; they are counted and priced as reasoning."""
    answer = telemetry.client("sk-thinker").chat.completions.create(
        model=MODEL, messages=hello(), extra_headers={"x-fake-reasoning-tokens": "5"}
    )
    assert answer.usage is not None and answer.usage.completion_tokens == RESPONSE_TOKENS
    prompt = answer.usage.prompt_tokens
    expected_cost = (prompt * PRICE_IN + 3 * PRICE_OUT + 5 * PRICE_REASONING) / 1e6

    def counted() -> bool:
        samples = telemetry.scrape()
        tokens = {
            kind: total(samples, "extproc_tokens_total", team="thinker", type=kind)
            for kind in ("input", "output", "reasoning_output")
        }
        cost = total(samples, "extproc_cost_usd_total", team="thinker")
        return tokens == {"input": prompt, "output": 3, "reasoning_output": 5} and (
            abs(cost - expected_cost) < 1e-12
        )

    deadline = time.monotonic() + 10
    while not counted():
        assert time.monotonic() < deadline, telemetry.scrape()
        time.sleep(0.05)
    record = next(r for r in telemetry.audit_records() if r.get("team") == "thinker")
    assert record["tokens"]["reasoning_output"] == 5 and record["path"] == "logged"


def test_the_audit_trail_loses_nothing_under_load_and_holds_no_secret(
    telemetry: Telemetry,
) -> None:
    before = len(telemetry.audit_records())
    # The prompt itself is recorded now (masked): reload with include_prompt on.
    config = json.loads(json.dumps(telemetry.config))
    config["observability"]["audit"]["include_prompt"] = True
    tmp = telemetry.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(telemetry.config_path)
    time.sleep(1.0)  # both processes poll the file every 0.25 s

    n = 300

    def one(i: int) -> None:
        text = f"Load {i:04d}: my key is {PROMPT_SECRET}, mail {EMAIL}"
        telemetry.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=8
        )

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))
    deadline = time.monotonic() + 10
    while len(telemetry.audit_records()) < before + n and time.monotonic() < deadline:
        time.sleep(0.1)
    records = telemetry.audit_records()
    loads = [r for r in records if r.get("prompt") and r["prompt"][0].startswith("Load ")]
    assert len(loads) == n  # every request, exactly once
    assert sorted(r["prompt"][0][:9] for r in loads) == [f"Load {i:04d}" for i in range(n)]
    for r in loads:
        assert r["prompt"][0].endswith("my key is [SECRET], mail [EMAIL]"), r["prompt"]
    # Rotation happened (16 KiB files), and no file anywhere holds a secret.
    files = list(telemetry.audit_dir.glob("audit*.jsonl*"))
    assert len(files) > 2
    for path in files:
        raw = path.read_bytes()
        for secret in (PROMPT_SECRET, EMAIL, "sk-alpha", BACKEND_A_SECRET, sha256_hex("sk-alpha")):
            assert secret.encode() not in raw, (path, secret)


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the field after the state is the parent pid
            out.append(int(stat.parent.name))
    return out


def test_a_killed_worker_is_replaced_and_traffic_goes_on(telemetry: Telemetry) -> None:
    workers = children(telemetry.supervisor.pid)
    assert len(workers) == 2
    os.kill(workers[0], 9)
    deadline = time.monotonic() + 20
    while True:
        now = children(telemetry.supervisor.pid)
        if len(now) == 2 and workers[0] not in now:
            break
        assert time.monotonic() < deadline, f"no replacement worker: {now}"
        time.sleep(0.1)
    # The replacement binds the same port; Envoy's connections to the dead worker broke and
    # reconnect to live ones. Requests may need a moment while the new worker starts.
    client = telemetry.client()
    deadline = time.monotonic() + 20
    while True:
        try:
            client.chat.completions.create(model=MODEL, messages=hello())
            break
        except openai.APIError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    for _ in range(20):
        client.chat.completions.create(model=MODEL, messages=hello())
    assert telemetry.supervisor.poll() is None
    # The dead worker's live gauges were dropped: nothing is left "active".
    samples = telemetry.scrape()
    assert value(samples, "extproc_active_streams") == 0
    assert value(samples, "extproc_ext_proc_streams", stage="downstream") == 0
