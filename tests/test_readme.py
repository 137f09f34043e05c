"""The README's two promises: `extproc up` serves the quickstart, and its example runs."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from .conftest import REPO, free_port

# Starts a real Envoy, Redis or Prometheus: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- readme-example: quickstart.*?-->\n```python\n(.*?)```", text, re.S)
    assert match, "the README lost its quickstart example"
    return match.group(1)


def quickstart_examples() -> list[tuple[str, str]]:
    """The docs' examples marked to run against `make run`'s quickstart."""
    from .test_docs import BLOCKS

    found = [(b.where, b.text) for b in BLOCKS if b.kind == "quickstart-example"]
    assert found, "the docs lost their quickstart examples"
    return found


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_serves_the_quickstart_and_the_readme_example_runs(tmp_path):
    config = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    ports = {k: free_port() for k in ("envoy", "admin", "sidecar", "fake", "metrics")}
    # The same file with free ports, so the test never collides with a running `make run`.
    config["envoy"].update(
        listen=f"127.0.0.1:{ports['envoy']}", admin=f"127.0.0.1:{ports['admin']}"
    )
    config["sidecar"]["listen"] = f"127.0.0.1:{ports['sidecar']}"
    config["observability"]["metrics"]["listen"] = f"127.0.0.1:{ports['metrics']}"
    config["fake_llm"]["listen"] = f"127.0.0.1:{ports['fake']}"
    config["backends"]["fake"]["url"] = f"http://127.0.0.1:{ports['fake']}/v1"
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    with open(tmp_path / "up.log", "wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "extproc", "up", "-c", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "extproc is up" not in (tmp_path / "up.log").read_text():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "extproc up never became ready"
            time.sleep(0.1)

        code = readme_example().replace("127.0.0.1:10000", f"127.0.0.1:{ports['envoy']}")
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines[0].startswith(" tok0 tok1")
        assert "completion_tokens=24" in lines[0]
        assert lines[1].startswith(" tok0 tok1")
        assert lines[2] == "['gpt-4o-mini', 'gpt-4o', 'text-embedding-3-small']"
        # The docs' examples of the other client APIs, against the same quickstart.
        for where, example in quickstart_examples():
            code = example.replace("127.0.0.1:10000", f"127.0.0.1:{ports['envoy']}")
            run = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
            )
            assert run.returncode == 0, f"{where}:\n{run.stderr}"
            assert run.stdout.startswith(" tok0 tok1"), f"{where}:\n{run.stdout}"
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(30)
    assert code == 0, (tmp_path / "up.log").read_text()
    for port in ports.values():
        assert not port_open(port), f"something still listens on {port} after Ctrl-C"
