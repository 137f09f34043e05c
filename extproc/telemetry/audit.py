"""The audit trail: one JSON line per LLM request, appended to a size-rotated file.

`AuditLog` owns the file and one daemon writer thread. Guarantees:

* Append-only JSON lines: each record is serialized (orjson, `default=str`) to exactly one
  '\\n'-terminated line, written whole. A line is never split across files, and a line torn by
  a failed write (or a crash) is cut off or terminated before anything else is appended.
* `write()` never blocks on I/O: it appends to an unbounded in-memory queue, so the event loop
  can call it on every request. The writer thread takes everything queued at once and writes it
  with one write(2) per file it lands in.
* No loss: a failed write (disk full, directory gone) is retried with backoff (0.1 s doubling to
  2 s), reopening the file, while records wait in memory. Only when more than `max_backlog`
  (100,000) records wait during such an outage are the oldest dropped, counted in `lost`.
  `close()` drains everything written before it and fsyncs.
* Rotation by size, as `logging.handlers.RotatingFileHandler` names files: `audit.jsonl` becomes
  `audit.jsonl.1`, `.1` becomes `.2`, ... up to `backups`; with `backups == 0` only the live file
  is kept; `max_bytes <= 0` never rotates. A file renamed or deleted from outside (logrotate) is
  reopened at `path`, as `WatchedFileHandler` does.

Log lines never include record contents: a record may carry a prompt.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections import deque
from contextlib import suppress
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("extproc.audit")

MAX_BACKLOG = 100_000
_LOG_EVERY = 5.0  # seconds between two error lines of the same kind
_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


def _serialize(record: dict[str, Any]) -> bytes | None:
    try:
        return orjson.dumps(record, default=str, option=_OPTIONS)
    except (orjson.JSONEncodeError, TypeError):
        pass
    # orjson refuses integers beyond 64 bits and lone surrogates; the stdlib takes both.
    try:
        return (json.dumps(record, default=str) + "\n").encode()
    except (ValueError, TypeError, RecursionError):
        return None  # e.g. a circular reference


class AuditLog:
    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int,
        backups: int,
        *,
        max_backlog: int = MAX_BACKLOG,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = max(0, backups)
        self.max_backlog = max_backlog
        self.written = 0  # lines on disk (flushed to the OS)
        self.errors = 0  # failed writes, fsyncs and unserializable records
        self.lost = 0  # records given up on
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer waits for records
        self._progress = threading.Condition(self._lock)  # flush() waits for the writer
        self._queue: deque[dict[str, Any]] = deque()
        self._accepted = 0  # records taken by write() ...
        self._done = 0  # ... and of those, written or lost
        self._closing = self._abandon = self._warned_closed = False
        # Writer-thread state only:
        self._pending: deque[bytes] = deque()  # serialized, not yet on disk
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._size = 0  # bytes of whole lines in the open file
        self._failing = False
        self._logged: dict[str, float] = {}
        self._open()  # a bad path fails at startup, not silently in the thread
        self._thread = threading.Thread(target=self._run, name="extproc-audit", daemon=True)
        self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            if not self._closing:
                self._queue.append(record)
                self._accepted += 1
                self._work.notify()
                return
            self.lost += 1
            warn, self._warned_closed = not self._warned_closed, True
        if warn:
            log.warning("audit log %s is closed; records written now are dropped", self.path)

    def flush(self, timeout: float = 10.0) -> bool:
        with self._lock:
            target = self._accepted
            return self._progress.wait_for(lambda: self._done >= target, timeout)

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closing = True
            self._work.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():  # an outage outlasted the timeout: stop retrying
            with self._lock:
                self._abandon = True
                self._work.notify()
            self._thread.join(1.0)

    def _run(self) -> None:
        delay = 0.0
        while True:
            with self._lock:
                if delay:  # records keep queueing during the backoff
                    self._work.wait_for(lambda: self._abandon, delay)
                else:
                    self._work.wait_for(lambda: self._queue or self._closing)
                batch, self._queue = self._queue, deque()
                closing, abandon = self._closing, self._abandon
            if abandon:
                unwritten = len(self._pending) + len(batch)
                self._count(lost=unwritten)
                log.error("audit log %s closed with %d records unwritten", self.path, unwritten)
                self._close_fd()
                return
            self._take(batch)
            try:
                self._drain()
            except Exception as e:
                with self._lock:
                    self.errors += 1
                reason = e if isinstance(e, OSError) else type(e).__name__
                self._log_limited(
                    "write",
                    "audit log write failed (%s); %d records waiting, retrying",
                    reason,
                    len(self._pending),
                )
                self._failing, delay = True, min(max(delay * 2, 0.1), 2.0)
                continue
            if self._failing:
                log.warning("audit log %s writable again after %d errors", self.path, self.errors)
                self._failing, delay = False, 0.0
            if closing:
                self._sync()
                return

    def _take(self, batch: deque[dict[str, Any]]) -> None:
        excess = len(self._pending) + len(batch) - self.max_backlog
        if self._failing and excess > 0:  # memory must stay bounded however long the outage
            from_pending = min(excess, len(self._pending))
            for _ in range(from_pending):
                self._pending.popleft()
            for _ in range(excess - from_pending):
                batch.popleft()
            self._count(lost=excess)
            self._log_limited(
                "lost",
                "audit backlog over %d records: oldest dropped, %d lost so far",
                self.max_backlog,
                self.lost,
            )
        for record in batch:
            line = _serialize(record)
            if line is None:
                with self._lock:
                    self.errors += 1
                self._log_limited("serialize", "audit record not serializable; marker written")
                line = b'{"audit_error":"unserializable record"}\n'
            self._pending.append(line)

    def _drain(self) -> None:
        pending = self._pending
        if pending:
            self._check_path()
        while pending:
            if self._fd is None:
                self._open()
            room = self.max_bytes - self._size if self.max_bytes > 0 else sys.maxsize
            parts: list[bytes] = []
            n = 0
            for line in pending:
                # An oversized line still goes whole, alone, into a fresh file.
                if n + len(line) > room and (n or self._size):
                    break
                parts.append(line)
                n += len(line)
            if not parts:
                self._rotate()
                continue
            self._write_all(b"".join(parts))
            self._size += n
            for _ in parts:
                pending.popleft()
            self._count(written=len(parts))

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            self._close_fd()  # reopened on retry; _open() cuts what this left half-written
            raise

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o640)
        try:
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino)
            if ident == self._ident and st.st_size > self._size:
                os.ftruncate(fd, self._size)  # a failed write left part of a line
            else:
                self._size = st.st_size
                if self._size and os.pread(fd, 1, self._size - 1) != b"\n":
                    os.write(fd, b"\n")  # a crash tore the last line: keep ours apart
                    self._size += 1
        except OSError:
            os.close(fd)
            raise
        self._fd, self._ident = fd, ident

    def _check_path(self) -> None:
        if self._fd is None:
            return
        try:
            st = os.stat(self.path)
            # Renamed, deleted or truncated from outside: follow the path, like logrotate expects.
            moved = (st.st_dev, st.st_ino) != self._ident or st.st_size < self._size
        except OSError:
            moved = True
        if moved:
            self._close_fd()

    def _rotate(self) -> None:
        self._close_fd()
        name = str(self.path)
        for i in range(self.backups, 0, -1):  # replacing the oldest deletes it
            with suppress(FileNotFoundError):
                os.replace(f"{name}.{i - 1}" if i > 1 else name, f"{name}.{i}")
        if not self.backups:
            with suppress(FileNotFoundError):
                os.unlink(name)
        self._open()

    def _sync(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as e:
                with self._lock:
                    self.errors += 1
                log.error("audit log fsync failed: %s", e)
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with suppress(OSError):
                os.close(fd)

    def _count(self, written: int = 0, lost: int = 0) -> None:
        with self._lock:
            self.written += written
            self.lost += lost
            self._done += written + lost
            self._progress.notify_all()

    def _log_limited(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._logged.get(key, -_LOG_EVERY) >= _LOG_EVERY:
            self._logged[key] = now
            log.error(msg, *args)


class AuditTrail:
    """Where the sidecar's records go, across config reloads: a stream that started under an
    older config still writes to the log configured now, never to one a reload closed."""

    def __init__(self) -> None:
        self.log: AuditLog | None = None

    def write(self, record: dict[str, Any]) -> None:
        current = self.log
        if current is not None:  # audit turned off since the stream started: nothing to keep
            current.write(record)

    def configure(self, path: Path | None, max_bytes: int, backups: int) -> AuditLog | None:
        """Point the trail at `path` (None: off). Returns the log it stopped using, for the
        caller to close off the event loop. Opens files: call it from a worker thread."""
        current = self.log
        if current is not None and path is not None and current.path == Path(path):
            # The same file: one writer only, whatever changed (rotation reads these live).
            current.max_bytes, current.backups = max_bytes, max(0, backups)
            return None
        self.log = AuditLog(path, max_bytes, backups) if path is not None else None
        return current

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
