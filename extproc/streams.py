"""Per-stream timing of SSE responses: time to first token, gaps between chunks, tokens/s.

Constant memory per stream: a running count, sum and maximum, never a list of chunk times.
Each chunk also lands in the time-to-first-token and chunk-gap histograms. And the requests
in flight whose answer no stage of this process follows (Released).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from .telemetry.metrics import ACTIVE_STREAMS, CHUNK_GAP_SECONDS, TTFT_SECONDS, child


class StreamTiming:
    __slots__ = ("chunks", "first", "gap_hist", "last", "max_gap", "model", "started", "sum_gap")

    def __init__(self, started: float, model: str = "none") -> None:
        self.started = started  # perf_counter() when the request reached the sidecar
        self.model = model  # a metric label: a configured model name, or "unknown"
        self.first = 0.0
        self.last = 0.0
        self.chunks = 0
        self.sum_gap = 0.0
        self.max_gap = 0.0
        self.gap_hist: Any = None

    def chunk(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self.chunks == 0:
            self.first = now
            child(TTFT_SECONDS, self.model).observe(now - self.started)
            self.gap_hist = child(CHUNK_GAP_SECONDS, self.model)  # looked up once per stream
        else:
            gap = now - self.last
            self.sum_gap += gap
            if gap > self.max_gap:
                self.max_gap = gap
            self.gap_hist.observe(gap)
        self.last = now
        self.chunks += 1

    def as_metadata(self, output_tokens: int | None) -> dict[str, Any]:
        if self.chunks == 0:
            return {}
        out: dict[str, Any] = {
            "ttft_ms": round((self.first - self.started) * 1000, 3),
            "chunks": self.chunks,
            "max_gap_ms": round(self.max_gap * 1000, 3),
        }
        if self.chunks > 1:
            out["mean_gap_ms"] = round(self.sum_gap / (self.chunks - 1) * 1000, 3)
            duration = self.last - self.first
            if output_tokens and duration > 0:
                out["output_tokens_per_s"] = round(output_tokens / duration, 1)
        return out


class ActiveStreams:
    """How many SSE responses this process is following right now."""

    __slots__ = ("current", "total")

    def __init__(self) -> None:
        self.current = 0
        self.total = 0

    def opened(self) -> None:
        self.current += 1
        self.total += 1
        ACTIVE_STREAMS.inc()

    def closed(self) -> None:
        self.current -= 1
        ACTIVE_STREAMS.dec()


ACTIVE = ActiveStreams()


class Released:
    """Requests this process released whose access log entry has not come back yet: what a
    shutdown waits for. A hint, not a ledger: with several workers an entry may reach another
    process, and Envoy may drop one; so entries are matched oldest first, and a release older
    than the longest a request may take (`horizon_s`, the routes' longest timeout) is taken as
    lost rather than waited for."""

    def __init__(self) -> None:
        self._times: deque[float] = deque()
        self.horizon_s = 600.0

    def add(self) -> None:
        now = time.monotonic()
        while self._times and self._times[0] < now - self.horizon_s:
            self._times.popleft()  # lost: never let them pile up
        self._times.append(now)

    def done(self) -> None:
        if self._times:
            self._times.popleft()

    @property
    def pending(self) -> int:
        oldest = time.monotonic() - self.horizon_s
        while self._times and self._times[0] < oldest:
            self._times.popleft()
        return len(self._times)


RELEASED = Released()
