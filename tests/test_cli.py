"""The command line: what an operator types, and the one-line answers to mistakes."""

from __future__ import annotations

import subprocess
import sys

from extproc.supervisor import Stack

from .conftest import REPO

QUICKSTART = REPO / "examples" / "quickstart.yaml"


def test_a_missing_workdir_is_created(tmp_path):
    workdir = tmp_path / "not" / "yet" / "there"
    stack = Stack(QUICKSTART, workdir=workdir)
    assert stack.workdir == workdir
    assert workdir.is_dir()


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
