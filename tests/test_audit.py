"""The audit trail writer: real files in tmp_path, real threads, real rotation."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from extproc.telemetry.audit import AuditLog


def chronological(path: Path) -> list[Path]:
    """The live file and its rotations, oldest first (.N ... .2, .1, live)."""
    rotated = [p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()]
    rotated.sort(key=lambda p: int(p.suffix[1:]), reverse=True)
    return [*rotated, *([path] if path.exists() else [])]


def lines(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def read_all(path: Path) -> list[dict[str, Any]]:
    return [r for f in chronological(path) for r in lines(f)]


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_lines_are_json_in_order(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "audit.jsonl"  # parents are created
    audit = AuditLog(path, max_bytes=1 << 20, backups=3)
    records = [
        {"seq": i, "model": "gpt-4o", "tokens": {"in": i, "out": 2 * i}, "ok": i % 2 == 0}
        for i in range(100)
    ]
    for r in records:
        audit.write(r)
    audit.close()
    assert lines(path) == records
    assert (audit.written, audit.errors, audit.lost) == (100, 0, 0)
    assert audit.path == path


def test_no_loss_under_load(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    max_bytes = 64 * 1024
    audit = AuditLog(path, max_bytes=max_bytes, backups=1000)

    def produce(p: int) -> None:
        for i in range(5000):
            audit.write({"producer": f"t{p}", "seq": i, "route": "chat", "tokens": i * 3})

    async def task(p: int) -> None:
        for i in range(200):
            audit.write({"producer": f"a{p}", "seq": i, "route": "chat", "tokens": i * 3})
            if i % 10 == 0:
                await asyncio.sleep(0)

    async def tasks() -> None:
        await asyncio.gather(*(task(p) for p in range(50)))

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(8)]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join()
    audit.close()

    files = chronological(path)
    assert len(files) > 10  # rotation did happen
    seen: Counter[tuple[str, int]] = Counter()
    last: dict[str, int] = {}
    for f in files:
        data = f.read_bytes()
        assert len(data) <= max_bytes or data.count(b"\n") == 1
        for r in lines(f):
            key = r["producer"]
            assert r["seq"] > last.get(key, -1)  # each producer's order survives rotation
            last[key] = r["seq"]
            seen[key, r["seq"]] += 1
    expected = {(f"t{p}", i) for p in range(8) for i in range(5000)}
    expected |= {(f"a{p}", i) for p in range(50) for i in range(200)}
    assert set(seen) == expected
    assert max(seen.values()) == 1
    assert (audit.written, audit.errors, audit.lost) == (50_000, 0, 0)


@pytest.mark.parametrize("backups", [2, 0])
def test_rotation_keeps_only_backups(tmp_path: Path, backups: int) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=1000, backups=backups)
    for i in range(200):
        audit.write({"seq": i, "pad": "x" * 50})
        if i % 7 == 0:
            audit.flush()  # many small batches as well as big ones
    audit.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.jsonl"] + [f"audit.jsonl.{i}" for i in range(1, backups + 1)]
    per_file = [[r["seq"] for r in lines(f)] for f in chronological(path)]
    assert all(per_file)
    assert all(f.stat().st_size <= 1000 for f in chronological(path))
    assert per_file[-1][-1] == 199  # newest in the live file
    kept = [s for seqs in per_file for s in seqs]
    assert kept == list(range(kept[0], 200))  # .2 older than .1 older than live, no gaps


def test_oversized_record_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=200, backups=5)
    big = {"seq": 1, "prompt": "y" * 5000}
    audit.write({"seq": 0})
    audit.write(big)
    audit.write({"seq": 2})
    audit.close()
    assert [lines(f) for f in chronological(path)] == [[{"seq": 0}], [big], [{"seq": 2}]]


def test_close_drains_and_later_writes_are_counted_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=256 * 1024, backups=100)
    for i in range(10_000):
        audit.write({"seq": i})
    audit.close()
    assert [r["seq"] for r in read_all(path)] == list(range(10_000))
    with caplog.at_level(logging.WARNING, logger="extproc.audit"):
        audit.write({"seq": "late"})
        audit.write({"seq": "later"})
    assert audit.lost == 2
    assert len([r for r in caplog.records if r.name == "extproc.audit"]) == 1
    audit.close()  # idempotent
    assert audit.flush(timeout=0.1)
    assert audit.written == 10_000


def test_flush_puts_everything_before_it_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=1 << 20, backups=1)
    for i in range(100):
        audit.write({"seq": i})
    assert audit.flush()
    assert len(lines(path)) == 100
    for i in range(100, 150):
        audit.write({"seq": i})
    assert audit.flush()
    assert [r["seq"] for r in lines(path)] == list(range(150))
    audit.close()


def test_outage_then_recovery_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logs = tmp_path / "logs"
    path = logs / "audit.jsonl"
    audit = AuditLog(path, max_bytes=4096, backups=1000)
    secret = "my-secret-prompt"
    with caplog.at_level(logging.INFO, logger="extproc.audit"):
        for i in range(100):
            audit.write({"seq": i, "prompt": secret})
        assert audit.flush()
        # The directory turns into a regular file: every open() and stat() under it fails.
        logs.rename(tmp_path / "logs-before")
        logs.write_text("not a directory")
        for i in range(100, 200):
            audit.write({"seq": i, "prompt": secret})
        wait_until(lambda: audit.errors > 0)
        assert not audit.flush(timeout=0.05)
        logs.unlink()
        logs.mkdir()
        for i in range(200, 300):
            audit.write({"seq": i, "prompt": secret})
        assert audit.flush(timeout=10)
        audit.close()
    before = read_all(tmp_path / "logs-before" / "audit.jsonl")
    after = read_all(path)
    assert sorted(r["seq"] for r in before + after) == list(range(300))
    assert [r["seq"] for r in after] == list(range(100, 300))
    assert audit.errors > 0 and audit.lost == 0 and audit.written == 300
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    assert secret not in caplog.text


def test_outage_backlog_is_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    logs = tmp_path / "logs"
    path = logs / "audit.jsonl"
    audit = AuditLog(path, max_bytes=1 << 20, backups=2, max_backlog=100)
    audit.write({"seq": -1})
    assert audit.flush()
    logs.rename(tmp_path / "logs-before")
    logs.write_text("not a directory")
    with caplog.at_level(logging.ERROR, logger="extproc.audit"):
        for i in range(500):
            audit.write({"seq": i, "prompt": "secret"})
        wait_until(lambda: audit.lost == 400)
    logs.unlink()
    logs.mkdir()
    assert audit.flush(timeout=10)
    audit.close()
    assert [r["seq"] for r in lines(path)] == list(range(400, 500))  # the newest are kept
    assert audit.lost == 400 and audit.written == 101
    assert "secret" not in caplog.text


class Odd:
    def __str__(self) -> str:
        return "odd!"


def test_unserializable_values_are_written_as_str(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=1 << 20, backups=1)
    loop: dict[str, Any] = {"seq": 3}
    loop["self"] = loop
    audit.write({"seq": 0, "tags": {"a"}, "obj": Odd(), 7: "int key"})
    audit.write({"seq": 1, "huge": 2**70})  # beyond orjson's 64-bit integers
    audit.write({"seq": 2, "text": "lone \udc80 surrogate"})
    audit.write(loop)  # cannot be serialized at all: a marker line keeps the count visible
    audit.write({"seq": 4})
    audit.close()
    got = lines(path)
    assert got[0] == {"seq": 0, "tags": "{'a'}", "obj": "odd!", "7": "int key"}
    assert got[1] == {"seq": 1, "huge": 2**70}
    assert got[2] == {"seq": 2, "text": "lone \udc80 surrogate"}
    assert got[3] == {"audit_error": "unserializable record"}
    assert got[4] == {"seq": 4}
    assert audit.errors == 1 and audit.lost == 0


def test_write_never_blocks_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = AuditLog._write_all

    def slow(self: AuditLog, data: bytes) -> None:
        time.sleep(0.2)  # a slow disk
        real(self, data)

    monkeypatch.setattr(AuditLog, "_write_all", slow)
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=1 << 30, backups=1)

    async def burst() -> float:
        start = time.perf_counter()
        for i in range(10_000):
            audit.write({"seq": i, "route": "chat"})
        return time.perf_counter() - start

    assert asyncio.run(burst()) < 1.0  # typically ~10 ms
    assert not audit.flush(timeout=0.01)
    audit.close()
    assert [r["seq"] for r in lines(path)] == list(range(10_000))


def test_external_rotation_and_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"seq": 0}\n{"torn')  # a crash mid-line in an earlier run
    audit = AuditLog(path, max_bytes=1 << 20, backups=1)
    audit.write({"seq": 1})
    assert audit.flush()
    path.rename(tmp_path / "moved.jsonl")  # logrotate's way: rename, expect a new file
    audit.write({"seq": 2})
    audit.close()
    assert (tmp_path / "moved.jsonl").read_bytes().splitlines()[1:] == [b'{"torn', b'{"seq":1}']
    assert lines(path) == [{"seq": 2}]
