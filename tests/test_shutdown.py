"""Graceful shutdown: a SIGTERM to the sidecar lets the streams in flight finish, and waits
for Envoy's access log entries of the answers it released (then ends those streams too)."""

from __future__ import annotations

import json
import signal
import threading
import time

import openai
import pytest
import yaml

from .conftest import free_port, sha256_hex

# Starts a real Envoy, Redis or Prometheus: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e


def test_sigterm_drains_in_flight_streams(tmp_path):
    from extproc.supervisor import Stack

    ports = {k: free_port() for k in ("sidecar", "envoy", "admin", "fake")}
    config = {
        "sidecar": {"listen": f"127.0.0.1:{ports['sidecar']}", "grace_s": 20},
        # The released answers' records prove they were accounted before the sidecar left.
        "observability": {"audit": {"path": str(tmp_path / "audit.jsonl")}},
        "envoy": {"listen": f"127.0.0.1:{ports['envoy']}", "admin": f"127.0.0.1:{ports['admin']}"},
        "teams": {"t": {"keys": [{"sha256": sha256_hex("sk-drain")}]}},
        "backends": {"fake": {"url": f"http://127.0.0.1:{ports['fake']}/v1"}},
        "models": {"gpt-4o-mini": {"targets": [{"backend": "fake"}]}},
        # ~1.5 s per stream: long enough to be in flight when the signal lands.
        "fake_llm": {
            "listen": f"127.0.0.1:{ports['fake']}",
            "tokens_per_second": 10,
            "response_tokens": 15,
        },
    }
    path = tmp_path / "drain.yaml"
    path.write_text(yaml.safe_dump(config))
    with open(tmp_path / "stack.log", "wb") as log:
        stack = Stack(path, workdir=tmp_path, stdout=log)
        stack.start()
        try:
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{ports['envoy']}/v1",
                api_key="sk-drain",
                max_retries=0,
                timeout=30,
            )
            results: list[str] = []
            errors: list[BaseException] = []
            first_chunk = threading.Barrier(4)
            answers: list[str] = []

            def ask_one() -> None:
                # Not streamed: released to Envoy with its body, accounted from the access log.
                try:
                    reply = client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": "drain"}]
                    )
                    answers.append(reply.choices[0].message.content or "")
                except BaseException as exc:
                    errors.append(exc)

            # One answer first, so Envoy's access log stream to the sidecar is open.
            ask_one()

            def stream_one() -> None:
                try:
                    parts = []
                    stream = client.chat.completions.create(
                        model="gpt-4o-mini",
                        messages=[{"role": "user", "content": "drain"}],
                        stream=True,
                    )
                    for i, chunk in enumerate(stream):
                        if i == 1:
                            first_chunk.wait(10)
                        if chunk.choices:
                            parts.append(chunk.choices[0].delta.content or "")
                    results.append("".join(parts))
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=stream_one) for _ in range(3)]
            threads.append(threading.Thread(target=ask_one))
            for t in threads:
                t.start()
            first_chunk.wait(10)  # every stream has started flowing (and the answer is due)
            sidecar = stack.procs["sidecar"]
            sidecar.send_signal(signal.SIGTERM)
            started = time.monotonic()
            for t in threads:
                t.join(30)
            assert not errors, errors
            expected = "".join(f" tok{i}" for i in range(15))
            assert results == [expected] * 3
            assert answers == [expected] * 2
            assert sidecar.wait(30) == 0
            # It left when the streams were done and the released answer accounted, not at the
            # grace deadline (the access log stream never ends by itself).
            assert time.monotonic() - started < 15
            assert "unaccounted at shutdown" not in (tmp_path / "stack.log").read_text()
            records = [json.loads(line) for line in (tmp_path / "audit.jsonl").open()]
            paths = sorted(r["path"] for r in records)
            assert paths == ["inline", "inline", "inline", "logged", "logged"], paths
        finally:
            stack.stop(grace=5)
