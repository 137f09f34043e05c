"""Every shipped example config is valid, secrets resolved, as `extproc check` sees it."""

from __future__ import annotations

import os
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


def test_the_providers_pages_whole_config_passes_check(tmp_path):
    """docs/providers.md's config with every provider, its secrets resolved, as `extproc check`
    sees it (an identity or AWS credentials are not needed to check: only to serve)."""
    from .test_docs import BLOCKS

    (block,) = [b for b in BLOCKS if b.kind == "config" and b.where.startswith("docs/providers.md")]
    path = tmp_path / "providers.yaml"
    path.write_text(block.text)
    env = {
        **os.environ,
        **dict.fromkeys(
            ("PLATFORM_TEAM_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"),
            "sk-test",
        ),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "extproc", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert ": OK (1 teams, 1 keys, 7 backends, 6 models)" in proc.stdout
