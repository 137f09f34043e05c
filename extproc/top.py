"""`extproc top`: live usage by team (or model), read from the sidecar's Prometheus endpoint.

Two pure functions do the work and a small loop drives them: `summarize` turns one scrape of
/metrics into a `Snapshot` (counters summed per team or model), `render` turns the previous and
the current snapshot into the table, the rates being the difference over the elapsed time.
The names read here are those of extproc/telemetry/metrics.py (a test keeps them in step);
this module does not import it, so the client registers no metric of its own.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

DEFAULT_URL = "http://127.0.0.1:9464/metrics"
BY = ("team", "model", "organization", "user")

REQUESTS = "extproc_requests_total"
TOKENS = "extproc_tokens_total"
COST = "extproc_cost_usd_total"
# By user: the metrics by user (observability.metrics.users), which have the same labels
# (outcome, type) as the above for what top reads.
USER_REQUESTS = "extproc_user_requests_total"
USER_TOKENS = "extproc_user_tokens_total"
USER_COST = "extproc_user_cost_usd_total"
FAILOVERS = "extproc_failovers_total"
ACTIVE_STREAMS = "extproc_active_streams"

# The `outcome` label of extproc_requests_total, by column. Other outcomes (cancelled) count
# in `requests` only.
SERVED = frozenset({"served", "failed_over"})
REJECTED = frozenset({"quota_rejected", "rejected", "guard_blocked"})
ERRORS = frozenset({"error", "backend_error"})
# The `type` label of extproc_tokens_total: `input` excludes the cached and cache-written parts
# and `output` the reasoning, so the input and output columns are their sums.
INPUT_TYPES = frozenset({"input", "cached_input", "cache_write_input"})
OUTPUT_TYPES = frozenset({"output", "reasoning_output"})


class ScrapeError(Exception):
    """The endpoint could not be read, or did not answer with a Prometheus exposition."""


@dataclass
class Row:
    requests: float = 0.0
    served: float = 0.0
    rejected: float = 0.0
    errors: float = 0.0
    input_tokens: float = 0.0
    output_tokens: float = 0.0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> float:
        return self.input_tokens + self.output_tokens

    def add(self, other: Row) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class Snapshot:
    """One scrape, summed per team (or model)."""

    by: str
    rows: dict[str, Row] = field(default_factory=dict)
    active_streams: float = 0.0
    failovers: float = 0.0

    @property
    def total(self) -> Row:
        total = Row()
        for row in self.rows.values():
            total.add(row)
        return total

    def ordered(self) -> list[tuple[str, Row]]:
        """Rows by tokens, then requests, descending; ties by name."""
        return sorted(self.rows.items(), key=lambda kv: (-kv[1].tokens, -kv[1].requests, kv[0]))


def summarize(text: str, by: str = "team") -> Snapshot:
    """Sum one /metrics exposition per team, model, organization or user (the label `by`
    names; users from the metrics by user)."""
    if by not in BY:
        raise ValueError(f"by must be one of {', '.join(BY)}, not {by!r}")
    snap = Snapshot(by=by)
    requests, tokens, cost = (
        (USER_REQUESTS, USER_TOKENS, USER_COST) if by == "user" else (REQUESTS, TOKENS, COST)
    )

    def row(labels: dict[str, str]) -> Row:
        key = labels.get(by) or "none"
        return snap.rows.setdefault(key, Row())

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if name == requests:
                r = row(labels)
                r.requests += value
                outcome = labels.get("outcome", "")
                if outcome in SERVED:
                    r.served += value
                elif outcome in REJECTED:
                    r.rejected += value
                elif outcome in ERRORS:
                    r.errors += value
            elif name == tokens:
                kind = labels.get("type", "")
                if kind in INPUT_TYPES:
                    row(labels).input_tokens += value
                elif kind in OUTPUT_TYPES:
                    row(labels).output_tokens += value
            elif name == cost:
                row(labels).cost_usd += value
            elif name == FAILOVERS:
                snap.failovers += value
            elif name == ACTIVE_STREAMS:
                snap.active_streams += value
    return snap


# -- rendering --------------------------------------------------------------------------------


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _usd(value: float) -> str:
    return f"{value:,.4f}"


def _delta(now: float, before: float) -> float:
    # A counter that went down was reset (the sidecar restarted): it counted up from zero.
    return now - before if now >= before else now


def _rates(now: Row, before: Row | None, elapsed: float | None) -> tuple[float, float] | None:
    """(requests/s, tokens/s) between two scrapes, or None on the first one."""
    if before is None or not elapsed or elapsed <= 0:
        return None
    return (
        _delta(now.requests, before.requests) / elapsed,
        _delta(now.tokens, before.tokens) / elapsed,
    )


def render(
    previous: Snapshot | None,
    current: Snapshot,
    elapsed: float | None,
    *,
    rates: bool = True,
) -> str:
    """The header line and the table. Rates come from `previous`, `elapsed` seconds earlier
    ("-" without one); `rates=False` leaves their columns out (a single scrape)."""
    total = current.total
    total_rates = None
    if previous is not None:
        total_rates = _rates(total, previous.total, elapsed)
    header = (
        f"active streams {_count(current.active_streams)}"
        f"   failovers {_count(current.failovers)}"
        f"   requests {_count(total.requests)}"
    )
    if rates:
        header += f" ({_rate(total_rates and total_rates[0])}/s)"
    header += f"   tokens {_count(total.input_tokens)} in / {_count(total.output_tokens)} out"
    if rates:
        header += f" ({_rate(total_rates and total_rates[1])}/s)"
    header += f"   cost ${_usd(total.cost_usd)}"

    columns = [current.by.upper(), "REQUESTS"]
    if rates:
        columns.append("REQ/S")
    columns += ["SERVED", "REJECTED", "ERRORS", "INPUT TOK", "OUTPUT TOK"]
    if rates:
        columns.append("TOK/S")
    columns.append("COST USD")

    table: list[list[str]] = [columns]
    for key, row in current.ordered():
        before = previous.rows.get(key, Row()) if previous is not None else None
        row_rates = _rates(row, before, elapsed)
        cells = [key, _count(row.requests)]
        if rates:
            cells.append(_rate(row_rates and row_rates[0]))
        cells += [
            _count(row.served),
            _count(row.rejected),
            _count(row.errors),
            _count(row.input_tokens),
            _count(row.output_tokens),
        ]
        if rates:
            cells.append(_rate(row_rates and row_rates[1]))
        cells.append(_usd(row.cost_usd))
        table.append(cells)

    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = [header, ""]
    for cells in table:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        lines.append("  ".join([first, *rest]).rstrip())
    if len(table) == 1:
        lines.append("(no requests yet)")
    return "\n".join(lines) + "\n"


# -- scraping and the loop --------------------------------------------------------------------


def fetch(url: str, timeout: float = 5.0) -> str:
    """The exposition text at `url`; ScrapeError (one line) on any failure."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        raise ScrapeError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        detail = getattr(reason, "strerror", None) or str(reason)
        raise ScrapeError(f"cannot reach {url}: {detail}") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, a malformed URL
        raise ScrapeError(f"cannot reach {url}: {exc or type(exc).__name__}") from None


def scrape(url: str, by: str, timeout: float = 5.0) -> Snapshot:
    text = fetch(url, timeout)
    try:
        return summarize(text, by)
    except ValueError as exc:
        raise ScrapeError(f"{url} did not answer with Prometheus metrics: {exc}") from None


def url_from_listen(listen: str) -> str:
    """http://HOST:PORT/metrics for a `observability.metrics.listen` address: a wildcard
    host (0.0.0.0, ::) is reached on the loopback."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


# Home, then each line erased to its end, then everything below: no flicker between screens.
_HOME = "\x1b[H"
_CLEAR_LINE = "\x1b[K"
_CLEAR_BELOW = "\x1b[J"


def run(
    url: str,
    *,
    by: str = "team",
    interval: float = 2.0,
    once: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
    tty: bool | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    max_screens: int | None = None,
) -> int:
    """Scrape and print until interrupted (or once). 0 on success or Ctrl-C, 1 when the
    endpoint cannot be read at first; later failures are shown and retried."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    tty = out.isatty() if tty is None else tty
    try:
        started = clock()
        current = scrape(url, by)
    except ScrapeError as exc:
        print(f"extproc top: {exc}", file=err)
        return 1
    if once:
        out.write(render(None, current, None, rates=False))
        out.flush()
        return 0

    previous: Snapshot | None = None
    previous_at = started
    screens = 0
    problem = ""
    try:
        while True:
            elapsed = started - previous_at if previous is not None else None
            stamp = datetime.now().strftime("%H:%M:%S")
            title = f"extproc top  {url}  by {by}, every {interval:g}s  {stamp}"
            if problem:
                title += f"\n! {problem} (showing the last good scrape)"
            screen = title + "\n" + render(previous, current, elapsed)
            if tty:
                body = screen.replace("\n", _CLEAR_LINE + "\n")
                out.write(_HOME + body + _CLEAR_BELOW)
            else:
                out.write(screen + "\n")
            out.flush()
            screens += 1
            if max_screens is not None and screens >= max_screens:
                return 0
            sleep(interval)
            at = clock()
            try:
                snap = scrape(url, by)
            except ScrapeError as exc:
                problem = str(exc)
                continue
            problem = ""
            previous, previous_at = current, started
            current, started = snap, at
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
            out.flush()
        return 0
