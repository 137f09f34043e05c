"""`extproc top`: the exposition summed per team or model, the table and its rates, the CLI."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from extproc import top
from extproc.telemetry import metrics
from extproc.top import Row, ScrapeError, Snapshot, render, summarize

from .conftest import QuietHandler, free_port, serving

ROOT = Path(__file__).resolve().parents[1]

# What a sidecar's /metrics looks like after some traffic (prometheus-client's text format):
# counters with their _total and _created samples, a histogram, gauges, and families top
# ignores. team "none": rejected before authentication; "unknown": a team the config dropped.
EXPOSITION = """\
# HELP extproc_requests_total LLM requests by team, model, outcome and HTTP status
# TYPE extproc_requests_total counter
extproc_requests_total{model="gpt-4o-mini",outcome="served",status="200",team="team-a"} 40.0
extproc_requests_total{model="gpt-4o",outcome="failed_over",status="200",team="team-a"} 2.0
extproc_requests_total{model="gpt-4o-mini",outcome="backend_error",status="502",team="team-a"} 3.0
extproc_requests_total{model="gpt-4o-mini",outcome="cancelled",status="0",team="team-a"} 1.0
extproc_requests_total{model="gpt-4o-mini",outcome="served",status="200",team="team-b"} 10.0
extproc_requests_total{model="gpt-4o-mini",outcome="quota_rejected",status="429",team="team-b"} 5.0
extproc_requests_total{model="gpt-4o",outcome="guard_blocked",status="403",team="team-b"} 2.0
extproc_requests_total{model="gpt-4o",outcome="error",status="503",team="team-b"} 1.0
extproc_requests_total{model="none",outcome="rejected",status="401",team="none"} 7.0
extproc_requests_total{model="gpt-4o-mini",outcome="served",status="200",team="unknown"} 1.0
# HELP extproc_requests_created LLM requests by team, model, outcome and HTTP status
# TYPE extproc_requests_created gauge
extproc_requests_created{model="gpt-4o-mini",outcome="served",status="200",team="team-a"} 1.7e+09
# HELP extproc_tokens_total Tokens by team, model, backend, type and source
# TYPE extproc_tokens_total counter
extproc_tokens_total{backend="fake",model="gpt-4o-mini",source="provider",team="team-a",type="input"} 1000.0
extproc_tokens_total{backend="fake",model="gpt-4o-mini",source="provider",team="team-a",type="cached_input"} 200.0
extproc_tokens_total{backend="fake",model="gpt-4o-mini",source="provider",team="team-a",type="output"} 500.0
extproc_tokens_total{backend="other",model="gpt-4o",source="estimate",team="team-a",type="input"} 100.0
extproc_tokens_total{backend="other",model="gpt-4o",source="estimate",team="team-a",type="output"} 50.0
extproc_tokens_total{backend="fake",model="gpt-4o-mini",source="provider",team="team-b",type="input"} 3000.0
extproc_tokens_total{backend="fake",model="gpt-4o-mini",source="provider",team="team-b",type="output"} 1500.0
extproc_tokens_total{backend="fake",model="gpt-4o-mini",source="estimate",team="unknown",type="input"} 10.0
extproc_tokens_total{backend="fake",model="gpt-4o-mini",source="estimate",team="unknown",type="output"} 5.0
# HELP extproc_cost_usd_total USD spent at the config's prices
# TYPE extproc_cost_usd_total counter
extproc_cost_usd_total{model="gpt-4o-mini",team="team-a"} 0.125
extproc_cost_usd_total{model="gpt-4o",team="team-a"} 0.5
extproc_cost_usd_total{model="gpt-4o-mini",team="team-b"} 0.25
# HELP extproc_failovers_total Requests served by another pool than the first
# TYPE extproc_failovers_total counter
extproc_failovers_total{backend="other",kind="retry",model="gpt-4o"} 2.0
extproc_failovers_total{backend="other",kind="quota",model="gpt-4o"} 1.0
# HELP extproc_guard_verdicts_total Guard decisions by guard, stage and action
# TYPE extproc_guard_verdicts_total counter
extproc_guard_verdicts_total{action="block",guard="pii",stage="request"} 2.0
# HELP extproc_ext_proc_phase_seconds Time the sidecar took to answer one ext_proc message
# TYPE extproc_ext_proc_phase_seconds histogram
extproc_ext_proc_phase_seconds_bucket{le="0.001",phase="request_body",stage="upstream"} 60.0
extproc_ext_proc_phase_seconds_bucket{le="0.01",phase="request_body",stage="upstream"} 70.0
extproc_ext_proc_phase_seconds_bucket{le="+Inf",phase="request_body",stage="upstream"} 72.0
extproc_ext_proc_phase_seconds_count{phase="request_body",stage="upstream"} 72.0
extproc_ext_proc_phase_seconds_sum{phase="request_body",stage="upstream"} 0.091
# HELP extproc_active_streams Streamed (SSE) answers being followed right now
# TYPE extproc_active_streams gauge
extproc_active_streams 4.0
# HELP extproc_ext_proc_streams Open ext_proc gRPC streams from Envoy, by stage
# TYPE extproc_ext_proc_streams gauge
extproc_ext_proc_streams{stage="upstream"} 9.0
"""  # noqa: E501 (exposition lines are as long as their labels)

TEAM_A = Row(
    requests=46,
    served=42,
    rejected=0,
    errors=3,
    input_tokens=1300,
    output_tokens=550,
    cost_usd=0.625,
)
TEAM_B = Row(
    requests=18,
    served=10,
    rejected=7,
    errors=1,
    input_tokens=3000,
    output_tokens=1500,
    cost_usd=0.25,
)
UNKNOWN = Row(requests=1, served=1, input_tokens=10, output_tokens=5)
NONE = Row(requests=7, rejected=7)


def cells(text: str) -> dict[str, list[str]]:
    """The table's rows by their first cell (columns are two or more spaces apart)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(("TEAM", "MODEL")))
    return {
        parts[0]: parts[1:]
        for parts in (re.split(r"\s{2,}", line.strip()) for line in lines[start:] if line)
    }


# -- summarize --------------------------------------------------------------------------------


def test_summarize_by_team() -> None:
    snap = summarize(EXPOSITION, "team")
    assert snap.by == "team"
    assert snap.rows == {"team-a": TEAM_A, "team-b": TEAM_B, "unknown": UNKNOWN, "none": NONE}
    assert snap.active_streams == 4
    assert snap.failovers == 3
    assert snap.total == Row(
        requests=72,
        served=53,
        rejected=14,
        errors=4,
        input_tokens=4310,
        output_tokens=2055,
        cost_usd=0.875,
    )
    # By tokens, not by requests (team-a has more) nor by name.
    assert [key for key, _ in snap.ordered()] == ["team-b", "team-a", "unknown", "none"]


def test_summarize_by_model() -> None:
    snap = summarize(EXPOSITION, "model")
    assert snap.rows == {
        "gpt-4o-mini": Row(
            requests=60,
            served=51,
            rejected=5,
            errors=3,
            input_tokens=4210,
            output_tokens=2005,
            cost_usd=0.375,
        ),
        "gpt-4o": Row(
            requests=5,
            served=2,
            rejected=2,
            errors=1,
            input_tokens=100,
            output_tokens=50,
            cost_usd=0.5,
        ),
        "none": NONE,
    }
    assert [key for key, _ in snap.ordered()] == ["gpt-4o-mini", "gpt-4o", "none"]


def test_summarize_empty_and_bad_input() -> None:
    assert summarize("", "team") == Snapshot(by="team")
    with pytest.raises(ValueError):
        summarize(EXPOSITION, "backend")
    with pytest.raises(ValueError):
        summarize("<html>not metrics</html>\n", "team")


def test_every_outcome_has_a_column_or_is_only_counted() -> None:
    columns = top.SERVED | top.REJECTED | top.ERRORS
    assert set(metrics.OUTCOMES) - columns == {"cancelled"}
    assert columns <= set(metrics.OUTCOMES)


# -- render -----------------------------------------------------------------------------------


def test_render_first_screen_has_no_rates() -> None:
    text = render(None, summarize(EXPOSITION, "team"), None)
    assert text.splitlines()[0] == (
        "active streams 4   failovers 3   requests 72 (-/s)"
        "   tokens 4,310 in / 2,055 out (-/s)   cost $0.8750"
    )
    table = cells(text)
    assert table["TEAM"] == [
        "REQUESTS",
        "REQ/S",
        "SERVED",
        "REJECTED",
        "ERRORS",
        "INPUT TOK",
        "OUTPUT TOK",
        "TOK/S",
        "COST USD",
    ]
    assert table["team-b"] == ["18", "-", "10", "7", "1", "3,000", "1,500", "-", "0.2500"]
    assert table["team-a"] == ["46", "-", "42", "0", "3", "1,300", "550", "-", "0.6250"]
    assert table["unknown"] == ["1", "-", "1", "0", "0", "10", "5", "-", "0.0000"]
    assert table["none"] == ["7", "-", "0", "7", "0", "0", "0", "-", "0.0000"]
    assert list(table) == ["TEAM", "team-b", "team-a", "unknown", "none"]


def test_render_rates_between_two_scrapes() -> None:
    before = summarize(EXPOSITION, "team")
    now = summarize(EXPOSITION, "team")
    now.rows["team-b"].requests += 4  # 2.0/s
    now.rows["team-b"].input_tokens += 600
    now.rows["team-b"].output_tokens += 400  # 1,000 tokens: 500.0/s
    now.rows["team-a"].requests += 1  # 0.5/s
    now.rows["team-a"].output_tokens += 100  # 50.0/s
    now.rows["team-c"] = Row(requests=3, served=3, input_tokens=15, output_tokens=5)  # new
    text = render(before, now, 2.0)
    assert "requests 80 (4.0/s)" in text
    assert "tokens 4,925 in / 2,560 out (560.0/s)" in text
    table = cells(text)
    assert table["team-b"] == ["22", "2.0", "10", "7", "1", "3,600", "1,900", "500.0", "0.2500"]
    assert table["team-a"][:2] == ["47", "0.5"]
    assert table["team-a"][7] == "50.0"
    assert table["team-c"][:2] == ["3", "1.5"]  # counted from zero
    assert table["team-c"][7] == "10.0"
    assert table["unknown"][1] == "0.0"
    assert table["none"][1] == "0.0"
    assert list(table) == ["TEAM", "team-b", "team-a", "team-c", "unknown", "none"]


def test_render_counter_reset_counts_from_zero() -> None:
    before = Snapshot(by="team", rows={"t": Row(requests=100, input_tokens=1000)})
    now = Snapshot(by="team", rows={"t": Row(requests=6, input_tokens=40)})  # restarted
    table = cells(render(before, now, 2.0))
    assert table["t"][1] == "3.0"
    assert table["t"][7] == "20.0"


def test_render_once_has_totals_only() -> None:
    text = render(None, summarize(EXPOSITION, "model"), None, rates=False)
    assert "/s" not in text
    table = cells(text)
    assert table["MODEL"] == [
        "REQUESTS",
        "SERVED",
        "REJECTED",
        "ERRORS",
        "INPUT TOK",
        "OUTPUT TOK",
        "COST USD",
    ]
    assert table["gpt-4o-mini"] == ["60", "51", "5", "3", "4,210", "2,005", "0.3750"]


def test_render_layout() -> None:
    snap = Snapshot(
        by="team",
        rows={"a": Row(requests=1, served=1, input_tokens=12, output_tokens=3, cost_usd=0.01)},
        active_streams=1,
    )
    assert render(None, snap, None, rates=False) == (
        "active streams 1   failovers 0   requests 1   tokens 12 in / 3 out   cost $0.0100\n"
        "\n"
        "TEAM  REQUESTS  SERVED  REJECTED  ERRORS  INPUT TOK  OUTPUT TOK  COST USD\n"
        "a            1       1         0       0         12           3    0.0100\n"
    )
    assert render(None, Snapshot(by="team"), None).endswith("(no requests yet)\n")


# -- the real metric objects ------------------------------------------------------------------


def _like(metric, registry: CollectorRegistry, **kwargs):
    """A metric with the catalogue's name, help and labels, in another registry."""
    kind = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[metric._type]
    return kind(
        metric._name,
        metric._documentation,
        metric._labelnames,
        registry=registry,
        **kwargs,
    )


def test_summarize_reads_what_prometheus_client_writes() -> None:
    registry = CollectorRegistry()
    requests = _like(metrics.REQUESTS, registry)
    tokens = _like(metrics.TOKENS, registry)
    cost = _like(metrics.COST, registry)
    failovers = _like(metrics.FAILOVERS, registry)
    phase = _like(metrics.PHASE_SECONDS, registry, buckets=metrics.PHASE_SECONDS._upper_bounds)
    verdicts = _like(metrics.GUARD_VERDICTS, registry)
    active = _like(metrics.ACTIVE_STREAMS, registry)

    requests.labels("acme", "team-a", "gpt-4o-mini", "served", "200", "openai").inc(5)
    requests.labels("acme", "team-a", "gpt-4o", "failed_over", "200", "openai").inc(1)
    requests.labels("acme", "team-a", "gpt-4o", "quota_rejected", "429", "openai").inc(2)
    requests.labels("none", "team-b", "gpt-4o-mini", "backend_error", "502", "openai").inc(3)
    requests.labels(metrics.NONE, metrics.NONE, metrics.NONE, "rejected", "401", "openai").inc(4)
    tokens.labels("acme", "team-a", "gpt-4o-mini", "fake", "input", "provider").inc(120)
    tokens.labels("acme", "team-a", "gpt-4o-mini", "fake", "cached_input", "provider").inc(30)
    tokens.labels("acme", "team-a", "gpt-4o-mini", "fake", "output", "provider").inc(45)
    tokens.labels("none", "team-b", "gpt-4o-mini", "fake", "input", "estimate").inc(7)
    cost.labels("acme", "team-a", "gpt-4o-mini").inc(0.375)
    failovers.labels("gpt-4o", "other", "retry").inc()
    phase.labels("upstream", "request_body").observe(0.002)
    verdicts.labels("pii", "request", "block").inc()
    active.set(2)

    text = generate_latest(registry).decode()
    assert "extproc_requests_total{" in text  # the shape top reads

    snap = summarize(text, "team")
    assert snap.rows == {
        "team-a": Row(
            requests=8,
            served=6,
            rejected=2,
            input_tokens=150,
            output_tokens=45,
            cost_usd=0.375,
        ),
        "team-b": Row(requests=3, errors=3, input_tokens=7),
        "none": Row(requests=4, rejected=4),
    }
    assert (snap.active_streams, snap.failovers) == (2, 1)
    by_model = summarize(text, "model")
    assert set(by_model.rows) == {"gpt-4o-mini", "gpt-4o", "none"}
    assert by_model.rows["gpt-4o"] == Row(requests=3, served=1, rejected=2)
    by_org = summarize(text, "organization")
    assert by_org.rows["acme"] == snap.rows["team-a"]
    assert by_org.rows["none"].requests == 7  # team-b's and the unauthenticated
    assert summarize(text, "user").rows == {}  # no metrics by user in this scrape


def test_summarize_by_user_reads_the_metrics_by_user() -> None:
    registry = CollectorRegistry()
    requests = _like(metrics.USER_REQUESTS, registry)
    tokens = _like(metrics.USER_TOKENS, registry)
    cost = _like(metrics.USER_COST, registry)
    requests.labels("acme", "team-a", "ann@acme.test", "served").inc(2)
    requests.labels("acme", "team-a", metrics.OTHER_USERS, "quota_rejected").inc(1)
    tokens.labels("acme", "team-a", "ann@acme.test", "input").inc(10)
    tokens.labels("acme", "team-a", "ann@acme.test", "reasoning_output").inc(4)
    cost.labels("acme", "team-a", "ann@acme.test").inc(0.5)
    snap = summarize(generate_latest(registry).decode(), "user")
    assert snap.rows == {
        "ann@acme.test": Row(requests=2, served=2, input_tokens=10, output_tokens=4, cost_usd=0.5),
        "other": Row(requests=1, rejected=1),
    }


# -- the loop ---------------------------------------------------------------------------------


def _fake_scrapes(monkeypatch: pytest.MonkeyPatch, answers: list[str | Exception]) -> None:
    pending = iter(answers)

    def fetch(url: str, timeout: float = 5.0) -> str:
        answer = next(pending)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(top, "fetch", fetch)


def test_loop_shows_rates_from_the_second_screen(monkeypatch: pytest.MonkeyPatch) -> None:
    later = EXPOSITION.replace(
        'outcome="served",status="200",team="team-b"} 10.0',
        'outcome="served",status="200",team="team-b"} 16.0',
    )
    _fake_scrapes(monkeypatch, [EXPOSITION, ScrapeError("cannot reach x: reset"), later])
    ticks = iter([100.0, 102.0, 104.0])
    out = io.StringIO()
    code = top.run(
        "http://x/metrics",
        interval=2,
        out=out,
        tty=False,
        sleep=lambda _s: None,
        clock=lambda: next(ticks),
        max_screens=3,
    )
    assert code == 0
    first, failed, second = out.getvalue().split("extproc top  ")[1:]
    assert cells(first)["team-b"][:2] == ["18", "-"]
    assert "! cannot reach x: reset (showing the last good scrape)" in failed
    assert cells(failed)["team-b"][:2] == ["18", "-"]
    # 6 more requests between the scrapes at 100 s and 104 s.
    assert cells(second)["team-b"][:2] == ["24", "1.5"]
    assert "\x1b[" not in out.getvalue()


def test_loop_on_a_tty_redraws_and_ctrl_c_exits_0(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_scrapes(monkeypatch, [EXPOSITION])

    def interrupted(_seconds: float) -> None:
        raise KeyboardInterrupt

    out = io.StringIO()
    assert top.run("http://x/metrics", out=out, tty=True, sleep=interrupted) == 0
    assert out.getvalue().startswith("\x1b[H")
    assert "\x1b[J" in out.getvalue()


def test_loop_first_scrape_failure_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_scrapes(monkeypatch, ["no metrics here {\n"])
    out, err = io.StringIO(), io.StringIO()
    assert top.run("http://x/metrics", once=True, out=out, err=err) == 1
    assert out.getvalue() == ""
    assert err.getvalue().startswith("extproc top: http://x/metrics did not answer with")
    assert err.getvalue().count("\n") == 1


def test_url_from_listen() -> None:
    assert top.url_from_listen("127.0.0.1:9464") == "http://127.0.0.1:9464/metrics"
    assert top.url_from_listen("0.0.0.0:9100") == "http://127.0.0.1:9100/metrics"
    assert top.url_from_listen("[::]:9100") == "http://[::1]:9100/metrics"
    assert top.url_from_listen("[fd00::5]:9100") == "http://[fd00::5]:9100/metrics"
    assert top.url_from_listen("metrics.local:80") == "http://metrics.local:80/metrics"


# -- end to end: `python -m extproc top` against a local /metrics -----------------------------


@pytest.fixture(scope="module")
def metrics_url() -> Iterator[str]:
    body = EXPOSITION.encode()

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            if self.path != "/metrics":
                self.send_error(404)
                return
            self.reply(200, body, "text/plain; version=0.0.4; charset=utf-8")

    for server in serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)):
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"


def run_top(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", "top", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")},
        timeout=30,
        check=False,
    )


def test_cli_once(metrics_url: str) -> None:
    proc = run_top("--url", metrics_url, "--once")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith("active streams 4   failovers 3   requests 72")
    table = cells(proc.stdout)
    assert table["team-b"] == ["18", "10", "7", "1", "3,000", "1,500", "0.2500"]
    assert list(table) == ["TEAM", "team-b", "team-a", "unknown", "none"]


def test_cli_once_by_model_from_config(metrics_url: str, tmp_path: Path) -> None:
    listen = metrics_url.removeprefix("http://").removesuffix("/metrics")
    config = {
        "teams": {"team-a": {"keys": [{"sha256": "0" * 64}]}},
        "backends": {"fake": {"url": "http://127.0.0.1:8081/v1"}},
        "models": {"gpt-4o-mini": {"targets": [{"backend": "fake"}]}},
        "observability": {"metrics": {"listen": listen}},
    }
    path = tmp_path / "top.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_top("--config", str(path), "--once", "--by", "model")
    assert proc.returncode == 0, proc.stderr
    assert cells(proc.stdout)["gpt-4o-mini"] == ["60", "51", "5", "3", "4,210", "2,005", "0.3750"]

    del config["observability"]
    path.write_text(yaml.safe_dump(config))
    proc = run_top("--config", str(path), "--once")
    assert proc.returncode == 2
    assert "observability.metrics.listen" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_unreachable_is_one_line_and_exit_1() -> None:
    url = f"http://127.0.0.1:{free_port()}/metrics"
    proc = run_top("--url", url, "--once")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == f"extproc top: cannot reach {url}: Connection refused\n"
