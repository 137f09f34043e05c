"""Every shipped example config is valid, secrets resolved, as `extproc check` sees it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_passes_check(path):
    proc = subprocess.run(
        [sys.executable, "-m", "extproc", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert ": OK (2 teams, 2 keys, 1 backends, 3 models)" in proc.stdout


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"quickstart.yaml", "docker.yaml"}
