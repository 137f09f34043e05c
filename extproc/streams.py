"""Per-stream timing of SSE responses: time to first token, gaps between chunks, tokens/s.

Constant memory per stream: a running count, sum and maximum, never a list of chunk times.
"""

from __future__ import annotations

import time
from typing import Any


class StreamTiming:
    __slots__ = ("chunks", "first", "last", "max_gap", "started", "sum_gap")

    def __init__(self, started: float) -> None:
        self.started = started  # perf_counter() when the request reached the sidecar
        self.first = 0.0
        self.last = 0.0
        self.chunks = 0
        self.sum_gap = 0.0
        self.max_gap = 0.0

    def chunk(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self.chunks == 0:
            self.first = now
        else:
            gap = now - self.last
            self.sum_gap += gap
            if gap > self.max_gap:
                self.max_gap = gap
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

    def closed(self) -> None:
        self.current -= 1


ACTIVE = ActiveStreams()
