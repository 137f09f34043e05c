"""Token counting through the real stack: prompts that used to fail or stall a request.

tiktoken's regex fails on a million whitespace characters, and BPE on one 4 MB word takes
seconds (longer than Envoy waits for the sidecar, sidecar.message_timeout_ms): counting must
never fail a request, stop at sidecar.count_budget_ms, and share its threads between teams.
The openai SDK -> Envoy -> the sidecar (its own stack here: 8 MiB bodies) -> the fake LLM.
"""

from __future__ import annotations

import random
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.tokens import TokenCounter

from .conftest import free_port, sha256_hex
from .test_quota_e2e import running_stack

# Starts a real Envoy, Redis or Prometheus: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

MODEL = "gpt-4o-mini"
TEAM_B_LIMIT = 10_000_000
# Random bytes made letters (and, for "words", about one in six a space): cheap to build.
_LETTERS = bytes(ord("a") + i % 26 for i in range(256))
_WORDS = bytes(32 if i < 43 else ord("a") + i % 26 for i in range(256))


def random_text(size: int, table: bytes, seed: int) -> str:
    return random.Random(seed).randbytes(size).translate(table).decode()


@dataclass
class Counting:
    base_url: str
    metrics_url: str
    log_path: Path

    def chat(self, key: str, content: str) -> int:
        """The HTTP status of one chat request (the SDK raises on anything but 2xx)."""
        return self.chat_headers(key, content)[0]

    def chat_headers(self, key: str, content: str) -> tuple[int, dict[str, str]]:
        client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=30)
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=4
            )
        except openai.APIStatusError as err:
            return err.status_code, dict(err.response.headers)
        return raw.status_code, dict(raw.headers)

    def estimates(self) -> dict[str, float]:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
        return {
            s.labels["reason"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "extproc_token_count_estimates_total"
        }


@pytest.fixture(scope="module")
def counting(tmp_path_factory) -> Iterator[Counting]:
    tmp = tmp_path_factory.mktemp("counting")
    ports = {k: free_port() for k in ("sidecar", "envoy", "admin", "fake", "metrics")}
    config = {
        # The default message timeout (2 s) and count budget (0.5 s).
        "sidecar": {
            "listen": f"127.0.0.1:{ports['sidecar']}",
            "max_body_bytes": 8 * 1024 * 1024,
            "grace_s": 2,
        },
        "envoy": {"listen": f"127.0.0.1:{ports['envoy']}", "admin": f"127.0.0.1:{ports['admin']}"},
        "teams": {
            "team-a": {"keys": [{"sha256": sha256_hex("sk-count-a")}]},
            # A limit, so its answers say what was reserved: the prompt's count, plus 4.
            "team-b": {
                "keys": [{"sha256": sha256_hex("sk-count-b")}],
                "limits": [{"window": "day", "tokens": TEAM_B_LIMIT}],
            },
        },
        "backends": {"fake": {"url": f"http://127.0.0.1:{ports['fake']}/v1"}},
        "models": {MODEL: {"targets": [{"backend": "fake"}]}},
        "fake_llm": {"listen": f"127.0.0.1:{ports['fake']}", "response_tokens": 4},
        "observability": {"metrics": {"listen": f"127.0.0.1:{ports['metrics']}"}},
    }
    with running_stack(tmp, config) as gw:
        yield Counting(
            base_url=gw.base_url,
            metrics_url=f"http://127.0.0.1:{ports['metrics']}/metrics",
            log_path=gw.log_path,
        )
    # (running_stack checked the sidecar exited 0.) Counting never failed a request: no stream
    # ended in the sidecar's error boundary.
    assert "internal error" not in gw.log_path.read_text(errors="replace")


def test_whitespace_prompts_are_answered_with_an_estimate(counting: Counting) -> None:
    before = counting.estimates()
    assert counting.chat("sk-count-a", " " * 1_000_000) == 200
    assert counting.chat("sk-count-a", "\t" * 1_000_000) == 200
    assert counting.chat("sk-count-a", "x" + " " * 1_000_000 + "y") == 200
    after = counting.estimates()
    # Each count was cut inside its run of whitespace: marked as not exact.
    assert after["hard_cut"] - before.get("hard_cut", 0) == 3


def test_a_huge_word_is_answered(counting: Counting) -> None:
    # 4.1 MB of one random word: about 5 s of BPE as one piece, past Envoy's 2 s.
    assert counting.chat("sk-count-a", random_text(4_100_000, _LETTERS, seed=1)) == 200


def test_one_teams_huge_prompts_do_not_starve_another_team(counting: Counting) -> None:
    huge = random_text(3_000_000, _WORDS, seed=2)
    medium = random_text(120_000, _WORDS, seed=3)
    with ThreadPoolExecutor(9) as pool:
        team_a = [pool.submit(counting.chat, "sk-count-a", huge) for _ in range(8)]
        time.sleep(0.5)
        team_b = pool.submit(counting.chat_headers, "sk-count-b", medium)
        status, headers = team_b.result()
        assert status == 200
        assert [f.result() for f in team_a] == [200] * 8
    # Team B's prompt was counted exactly, not estimated at the budget's end: it was served
    # between team A's pieces, not after them (what it reserved is its exact count + 4).
    exact = TokenCounter().count_chat(MODEL, [{"role": "user", "content": medium}])
    assert exact.exact
    reserved = TEAM_B_LIMIT - int(headers["x-ratelimit-remaining-tokens"])
    assert reserved == exact.tokens + 4
