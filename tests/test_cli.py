"""The command line: what an operator types, and the one-line answers to mistakes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from extproc.config import ConfigError
from extproc.supervisor import Stack, envoy_workers, machine_cpus

from .conftest import REPO

QUICKSTART = REPO / "examples" / "quickstart.yaml"


def test_a_missing_workdir_is_created(tmp_path):
    workdir = tmp_path / "not" / "yet" / "there"
    stack = Stack(QUICKSTART, workdir=workdir)
    assert stack.workdir == workdir
    assert workdir.is_dir()


def test_up_starts_the_fake_llm_its_section_describes(tmp_path):
    stack = Stack(QUICKSTART, workdir=tmp_path)
    assert stack.fake_llm is not None
    assert stack.fake_llm.arguments() == [
        "fake-llm", "--listen", "127.0.0.1:8081", "--ttft-ms", "20.0",
        "--tokens-per-second", "200.0", "--response-tokens", "24",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("cpus", "sidecars", "workers"),
    [(1, 1, 1), (2, 1, 1), (4, 1, 2), (8, 1, 4), (8, 6, 2), (8, 8, 1), (16, 4, 8)],
)
def test_envoy_gets_the_cores_the_sidecar_leaves_at_most_half(
    cpus: int, sidecars: int, workers: int
) -> None:
    assert envoy_workers(cpus, sidecars) == workers


def test_up_chooses_envoys_workers_and_says_so(tmp_path, caplog):
    with caplog.at_level("INFO", logger="extproc.up"):
        stack = Stack(QUICKSTART, workdir=tmp_path)
    assert stack.envoy_concurrency == envoy_workers(machine_cpus(), 1)
    assert f"Envoy gets {stack.envoy_concurrency} worker thread(s)" in caplog.text
    assert Stack(QUICKSTART, workdir=tmp_path, envoy_concurrency=3).envoy_concurrency == 3


def test_up_names_the_fake_llm_field_it_refuses(tmp_path):
    config = yaml.safe_load(QUICKSTART.read_text())
    config["fake_llm"]["response_tokens"] = "many"
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as info:
        Stack(path, workdir=tmp_path)
    assert info.value.problems == [
        (
            "fake_llm.response_tokens",
            "Input should be a valid integer, unable to parse string as an integer",
        )
    ]


def test_a_workdir_that_cannot_be_created_is_said_in_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "extproc", "up", "-c", str(QUICKSTART), "--workdir",
         str(blocker / "sub")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("extproc up: cannot use ") and "a-file/sub" in lines[0]
