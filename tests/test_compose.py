"""The docker compose deployment and its observability files, checked without a Docker engine.

- docker-compose.yml is validated by the compose tool itself (`docker compose config` or
  Debian's `docker-compose`, which needs no engine for `config`), and its structure and cross
  references (ports, hosts, mounted files, commands) are checked against the gateway config.
- The Grafana dashboard only queries metrics the sidecar registers (extproc/telemetry/metrics.py)
  or a small allow-list of Envoy's, with their real labels; promtool parses every expression.
- examples/compose/prometheus.yml passes `promtool check config`, and a real Prometheus scraping
  the test gateway with the same jobs sees the requests this test sends, and Envoy's metrics.

The tools come from Debian's packages (`make system-deps` installs the missing ones); a missing
tool fails these tests, it never skips them.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from extproc.cli import build_parser
from extproc.config import load_config, parse_address
from extproc.telemetry import metrics as catalogue

from .conftest import REPO, Gateway, free_port

# Starts a real Envoy, Redis or Prometheus: `pytest -m "not e2e"` leaves it out.
pytestmark = pytest.mark.e2e

COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_DIR = REPO / "examples" / "compose"
PROMETHEUS_YML = COMPOSE_DIR / "prometheus.yml"
DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "extproc.json"
DATASOURCES_DIR = COMPOSE_DIR / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDERS_DIR = COMPOSE_DIR / "grafana" / "provisioning" / "dashboards"

INSTALL_HINT = "run `make system-deps`: it installs the missing Debian packages"
SERVICES = {"redis", "fake-llm", "sidecar", "envoy", "prometheus", "grafana", "jaeger"}
GATEWAY_SERVICES = {"fake-llm", "sidecar", "envoy"}

# The Envoy metrics the dashboard may use, with their labels: what Envoy's /stats/prometheus
# exposes (test_prometheus_scrapes_the_gateway checks each one against a real Envoy).
ENVOY_METRICS: dict[str, set[str]] = {
    "envoy_cluster_outlier_detection_ejections_active": {"envoy_cluster_name"},
    "envoy_cluster_upstream_rq_retry": {"envoy_cluster_name"},
    "envoy_http_downstream_rq_xx": {"envoy_response_code_class", "envoy_http_conn_manager_prefix"},
}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series

# Dashboard panels that must exist (title prefix, case-insensitive) and what they must query.
REQUIRED_PANELS: dict[str, set[str]] = {
    "tokens per second by team": {"extproc_tokens_total"},
    "cost (usd": {"extproc_cost_usd_total"},
    "requests per second by outcome": {"extproc_requests_total"},
    "rejections": {"extproc_requests_total"},
    "ext_proc phase latency": {"extproc_ext_proc_phase_seconds_bucket"},
    "time to first token": {"extproc_time_to_first_token_seconds_bucket"},
    "failovers": {"extproc_failovers_total", "envoy_cluster_upstream_rq_retry"},
    "guard verdicts": {"extproc_guard_verdicts_total"},
    "guard call latency": {"extproc_guard_call_seconds_bucket"},
    "quota store latency": {"extproc_quota_store_seconds_bucket"},
    "quota store errors": {"extproc_quota_store_errors_total"},
    "answers accounted from envoy's access log": {"extproc_access_log_entries_total"},
    "active streams": {"extproc_active_streams"},
    "circuit state per backend": {"envoy_cluster_outlier_detection_ejections_active"},
}

# Grafana's variables, as the checks and the real Prometheus evaluate them.
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "5m",
    "team": ".*",
    "model": ".*",
}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: {INSTALL_HINT}")
    return path


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def docker_config() -> dict:
    """examples/docker.yaml, the gateway config every compose service runs."""
    return yaml.safe_load((REPO / "examples" / "docker.yaml").read_text())


# --- 1. docker-compose.yml ------------------------------------------------------------------


def compose_command() -> list[str]:
    """`docker compose` when the plugin works, else Debian's `docker-compose`: both validate a
    compose file (`config`) without a Docker engine."""
    if shutil.which("docker") and run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose") and run(["docker-compose", "version"]).returncode == 0:
        return ["docker-compose"]
    pytest.fail(f"neither `docker compose` nor `docker-compose` works: {INSTALL_HINT}")


def compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [*compose_command(), "-f", str(path), "--project-directory", str(REPO), "config", "-q"]
    return run(cmd, cwd=REPO)


def test_compose_file_is_valid(tmp_path):
    proc = compose_config(COMPOSE_FILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # The validator does validate: the same file with a dangling reference is refused.
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE_FILE.read_text()
    assert 'network_mode: "service:sidecar"' in text
    broken.write_text(
        text.replace('network_mode: "service:sidecar"', "network_mode: service:nosuch")
    )
    proc = compose_config(broken)
    assert proc.returncode != 0
    assert "nosuch" in proc.stdout + proc.stderr


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(host path, container path) of a service's bind mounts (short syntax)."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def named_volumes(service: dict) -> dict[str, str]:
    named = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if not source.startswith((".", "/")):
            named[source] = target
    return named


def published_ports(service: dict) -> set[int]:
    """The container ports a service publishes ("[ip:]host:container")."""
    return {int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports", [])}


def command_argv(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]


def test_compose_services_and_wiring():
    compose = load_compose()
    services = compose["services"]
    assert set(services) >= SERVICES

    # The gateway services run the image built from the Dockerfile; the others pin their tags.
    for name in GATEWAY_SERVICES:
        assert services[name]["build"] == ".", name
        assert services[name]["image"] == "extproc:dev", name
    for name in SERVICES - GATEWAY_SERVICES:
        image = services[name]["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: pin the image tag ({image})"
    assert services["jaeger"]["image"].startswith("jaegertracing/all-in-one:")
    assert services["redis"]["image"].startswith("redis:7")

    # Every command parses with extproc's own CLI, and uses examples/docker.yaml.
    parser = build_parser()
    fake_argv = command_argv(services["fake-llm"])
    assert fake_argv[:2] == ["extproc", "fake-llm"]
    fake_args = parser.parse_args(fake_argv[1:])
    sidecar_argv = command_argv(services["sidecar"])
    assert sidecar_argv[:2] == ["extproc", "serve"]
    assert parser.parse_args(sidecar_argv[1:]).config == "examples/docker.yaml"
    envoy_argv = command_argv(services["envoy"])
    assert envoy_argv[:2] == ["sh", "-c"]
    render, start = (shlex.split(part) for part in envoy_argv[2].split("&&"))
    assert render[:2] == ["extproc", "envoy"]
    render_args = parser.parse_args(render[1:])
    assert render_args.config == "examples/docker.yaml"
    assert start[:2] == ["exec", "envoy"]
    assert start[start.index("-c") + 1] == render_args.output  # Envoy runs what was rendered

    # Envoy shares the sidecar's network namespace: its ports are published by `sidecar`.
    assert services["envoy"]["network_mode"] == "service:sidecar"
    assert "ports" not in services["envoy"]
    assert services["envoy"]["depends_on"]["sidecar"]["condition"] == "service_healthy"

    cfg = docker_config()
    assert load_config(REPO / "examples" / "docker.yaml")  # valid, as `extproc check` sees it
    assert "fake_llm" not in cfg, "the fake LLM is its own service"
    sidecar_host, _ = parse_address(cfg["sidecar"]["listen"])
    assert sidecar_host == "127.0.0.1"  # Envoy reaches it over the shared loopback
    _, api_port = parse_address(cfg["envoy"]["listen"])
    _, admin_port = parse_address(cfg["envoy"]["admin"])
    metrics_host, metrics_port = parse_address(cfg["observability"]["metrics"]["listen"])
    assert metrics_host == "0.0.0.0"
    assert published_ports(services["sidecar"]) >= {api_port, admin_port}

    # The backend, the quota store and the trace collector are the compose services.
    backend = urlsplit(cfg["backends"]["fake"]["url"])
    assert backend.hostname == "fake-llm"
    assert fake_args.listen == ("0.0.0.0", backend.port)
    assert cfg["quota"]["store"] == "redis"
    assert urlsplit(cfg["quota"]["redis"]["url"]).hostname == "redis"
    assert cfg["observability"]["tracing"]["enabled"] is True
    otlp = urlsplit(cfg["observability"]["tracing"]["otlp_endpoint"])
    assert (otlp.hostname, otlp.port) == ("jaeger", 4317)
    assert "4317" in [str(p) for p in services["jaeger"].get("expose", [])]
    assert 16686 in published_ports(services["jaeger"])

    # Volumes: the audit log and tiktoken's cache survive restarts.
    sidecar_volumes = named_volumes(services["sidecar"])
    assert set(sidecar_volumes) <= set(compose["volumes"])
    audit_dir = str(Path(cfg["observability"]["audit"]["path"]).parent)
    assert audit_dir in sidecar_volumes.values(), "the audit log is not on a volume"
    cache = services["sidecar"].get("environment", {}).get("TIKTOKEN_CACHE_DIR")
    cache = cache or dockerfile_env()["TIKTOKEN_CACHE_DIR"]
    assert cache in sidecar_volumes.values()
    for service in services.values():
        assert set(named_volumes(service)) <= set(compose["volumes"] or {})

    # Health: the stack starts in order.
    for name in ("redis", "sidecar", "envoy", "fake-llm", "prometheus", "grafana"):
        assert "healthcheck" in services[name], name
    assert services["sidecar"]["depends_on"]["redis"]["condition"] == "service_healthy"
    sidecar_probe = " ".join(services["sidecar"]["healthcheck"]["test"])
    assert f":{metrics_port}/healthz" in sidecar_probe

    # Prometheus and Grafana mount the files under examples/compose.
    prometheus_mounts = dict(bind_mounts(services["prometheus"]))
    assert prometheus_mounts["./examples/compose/prometheus.yml"] == (
        "/etc/prometheus/prometheus.yml"
    )
    grafana_mounts = dict(bind_mounts(services["grafana"]))
    assert grafana_mounts["./examples/compose/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_target = grafana_mounts["./examples/compose/grafana/dashboards"]

    # Every file the compose mounts is in the repository.
    for name, service in services.items():
        for source, _ in bind_mounts(service):
            assert (REPO / source).exists(), f"{name} mounts {source}, which does not exist"

    # Grafana: admin password from the environment (a default for the demo), anonymous viewer,
    # the dashboards provider reads where the dashboards are mounted.
    env = services["grafana"]["environment"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:-[^}]+\}", env["GF_SECURITY_ADMIN_PASSWORD"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_target}/{DASHBOARD.name}"
    providers = [
        p
        for f in sorted(DASHBOARD_PROVIDERS_DIR.glob("*.yaml"))
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    assert [p["options"]["path"] for p in providers] == [dashboards_target]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("ENV "):
            key, _, value = line[4:].partition("=")
            env[key.strip()] = value.strip()
    return env


def test_dockerfile_serves_the_compose_config():
    text = (REPO / "Dockerfile").read_text()
    (cmd,) = [line for line in text.splitlines() if line.startswith("CMD ")]
    argv = json.loads(cmd[4:])
    assert argv[:2] == ["extproc", "serve"]
    assert build_parser().parse_args(argv[1:]).config == "examples/docker.yaml"
    assert "'.[tracing]'" in text  # examples/docker.yaml exports spans: the SDK must be there


def test_envoy_command_renders_a_valid_envoy_config(tmp_path):
    """What the envoy service runs: `extproc envoy` renders, and Envoy accepts the result."""
    argv = command_argv(load_compose()["services"]["envoy"])
    render = shlex.split(argv[2].split("&&")[0])
    output = tmp_path / "envoy.yaml"
    render[render.index("-o") + 1] = str(output)
    proc = run([sys.executable, "-m", "extproc", *render[1:]], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    envoy = shutil.which("envoy") or str(Path(sys.executable).with_name("envoy"))
    proc = run([envoy, "--mode", "validate", "-c", str(output)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rendered = output.read_text()
    assert "fake-llm" in rendered and "jaeger" in rendered  # the compose services' names


def datasources() -> dict[str, dict]:
    found = {}
    for f in sorted(DATASOURCES_DIR.glob("*.yaml")):
        for ds in yaml.safe_load(f.read_text())["datasources"]:
            found[ds["uid"]] = ds
    return found


def test_grafana_datasources():
    found = datasources()
    compose = load_compose()
    kinds = {ds["type"]: ds for ds in found.values()}
    assert set(kinds) >= {"prometheus", "jaeger"}
    prometheus = urlsplit(kinds["prometheus"]["url"])
    assert prometheus.hostname == "prometheus" and prometheus.port == 9090
    jaeger = urlsplit(kinds["jaeger"]["url"])
    assert jaeger.hostname == "jaeger" and jaeger.port == 16686
    for ds in found.values():
        assert urlsplit(ds["url"]).hostname in compose["services"]


# --- 2. the dashboard -----------------------------------------------------------------------


def extproc_series() -> dict[str, set[str]]:
    """Every series name the sidecar exposes, with its labels, from the registered metrics."""
    series: dict[str, set[str]] = {}
    for obj in vars(catalogue).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        (family,) = obj.describe()
        labels = set(obj._labelnames)
        if family.type == "counter":
            series[f"{family.name}_total"] = labels
        elif family.type == "histogram":
            series[f"{family.name}_bucket"] = labels | {"le"}
            series[f"{family.name}_sum"] = labels
            series[f"{family.name}_count"] = labels
        elif family.type == "gauge":
            series[family.name] = labels
        else:
            pytest.fail(f"{family.name}: unexpected metric type {family.type}")
    assert len(series) > 20 and "extproc_requests_total" in series
    return series


KNOWN_SERIES = {**extproc_series(), **ENVOY_METRICS}

PROMQL_FUNCTIONS = {
    "sum", "max", "min", "avg", "count", "topk", "bottomk", "quantile", "stddev",
    "rate", "irate", "increase", "delta", "deriv", "histogram_quantile", "label_replace",
    "clamp_min", "clamp_max", "abs", "round", "vector", "scalar", "absent", "sort_desc",
    "max_over_time", "min_over_time", "avg_over_time", "sum_over_time", "last_over_time",
}  # fmt: skip
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                   "unless", "bool", "offset"}  # fmt: skip

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_NUMBER = re.compile(r"(?<![A-Za-z0-9_:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|s|m|h|d|w|y)?")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def promql_problems(expr: str) -> tuple[set[str], list[str]]:
    """The metric names an expression queries, and what is wrong with it: unknown metrics or
    functions, labels (in matchers and in by/without/on/ignoring) the metrics do not have,
    outcomes that do not exist."""
    problems: list[str] = []
    metrics: set[str] = set()
    selectors = []
    for m in _SELECTOR.finditer(expr):
        name, body = m.group(1), m.group(2)
        if not name:
            problems.append(f"a selector without a metric name: {m.group(0)}")
            continue
        matchers, pos = [], 0
        while pos < len(body) and body[pos:].strip():
            mm = _MATCHER.match(body, pos)
            if mm is None:
                problems.append(f"cannot read the matchers {body!r}")
                break
            matchers.append(mm.groups()[:3])
            pos = mm.end()
        selectors.append((name, matchers))
    rest = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", expr)
    rest = _STRING.sub(" ", rest)
    rest = _RANGE.sub(" ", rest)
    groupings = [
        [g.strip() for g in m.group(2).split(",") if g.strip()] for m in _GROUPING.finditer(rest)
    ]
    rest = _GROUPING.sub(" ", rest)
    rest = _NUMBER.sub(" ", rest)
    for m in _IDENT.finditer(rest):
        ident = m.group(0)
        if re.match(r"\s*\(", rest[m.end() :]):
            if ident not in PROMQL_FUNCTIONS:
                problems.append(f"unknown function {ident}")
        elif ident not in PROMQL_KEYWORDS:
            metrics.add(ident)
    for name in sorted(metrics):
        if name not in KNOWN_SERIES:
            problems.append(f"unknown metric {name}")
    for name, matchers in selectors:
        if name not in KNOWN_SERIES:
            continue
        for label, op, value in matchers:
            if label not in KNOWN_SERIES[name] | TARGET_LABELS:
                problems.append(f"{name} has no label {label!r}")
            if label == "outcome" and not value.startswith("$"):
                values = value.split("|") if op in ("=~", "!~") else [value]
                problems += [f"no outcome {v!r}" for v in values if v not in catalogue.OUTCOMES]
    known = [KNOWN_SERIES[n] | TARGET_LABELS for n in metrics if n in KNOWN_SERIES]
    for labels in groupings:
        for label in labels:
            if not known or not all(label in k for k in known):
                problems.append(f"grouping by {label!r}, a label of none or not all of {metrics}")
    return metrics, problems


@pytest.mark.parametrize(
    "expr",
    [
        "sum(rate(extproc_nope_total[1m]))",  # unknown metric
        "sum(rate(extproc_requests[1m]))",  # a counter without its _total
        'sum(rate(extproc_requests_total{tenant="a"}[1m]))',  # unknown label
        "sum by (backend) (rate(extproc_requests_total[1m]))",  # grouping by a missing label
        "histogram_quantile(0.9, sum by (le) (rate(extproc_ext_proc_phase_seconds_sum[1m])))",
        'sum(rate(extproc_requests_total{outcome=~"served|blocked"}[1m]))',  # no such outcome
        "sum(envoy_cluster_upstream_cx_total)",  # not allow-listed
        "sumx(extproc_active_streams)",  # unknown function
        '{__name__="extproc_active_streams"}',  # no metric name to check
    ],
)
def test_promql_checker_catches(expr):
    assert promql_problems(expr)[1], expr


def dashboard_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels += panel.get("panels", [])  # a collapsed row holds its panels
    return panels


def dashboard_expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", query)
            assert m, f"variable {var['name']}: {query!r} is not label_values(selector, label)"
            exprs.append(f"count by ({m.group(2)}) ({m.group(1)})")
    return exprs


def substitute(expr: str) -> str:
    def value(m: re.Match) -> str:
        assert m.group(1) in GRAFANA_VARIABLES, f"unknown variable {m.group(0)} in {expr}"
        return GRAFANA_VARIABLES[m.group(1)]

    return _VARIABLE.sub(value, expr)


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_panels_and_queries(tmp_path):
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard_panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels), "panel ids repeat"
    prometheus_uid = next(uid for uid, ds in datasources().items() if ds["type"] == "prometheus")

    queried: dict[str, set[str]] = {}
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": prometheus_uid}
        names: set[str] = set()
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == prometheus_uid, panel["title"]
            metrics, problems = promql_problems(target["expr"])
            assert not problems, f"{panel['title']}: {target['expr']}: {problems}"
            names |= metrics
        queried[panel["title"].lower()] = names
    for prefix, needed in REQUIRED_PANELS.items():
        matches = [names for title, names in queried.items() if title.startswith(prefix)]
        assert matches, f"no panel titled {prefix!r}... in {sorted(queried)}"
        assert any(needed <= names for names in matches), (prefix, needed, matches)

    by_title = {p["title"].lower(): p for p in panels}
    tokens = next(p for t, p in by_title.items() if t.startswith("tokens per second by team"))
    token_exprs = " ".join(t["expr"] for t in tokens["targets"])
    assert 'type="input"' in token_exprs and 'type="output"' in token_exprs
    assert "team" in token_exprs.split("by (", 1)[1].split(")", 1)[0]
    rejections = next(p for t, p in by_title.items() if t.startswith("rejections"))
    rejected = " ".join(t["expr"] for t in rejections["targets"])
    for outcome in ("quota_rejected", "guard_blocked", "rejected", "error"):
        assert re.search(rf"outcome=~\"[^\"]*\b{outcome}\b", rejected), outcome
    for prefix in ("ext_proc phase latency", "time to first token"):
        panel = next(p for t, p in by_title.items() if t.startswith(prefix))
        exprs = " ".join(t["expr"] for t in panel["targets"])
        assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs
    circuit = next(p for t, p in by_title.items() if t.startswith("circuit state per backend"))
    assert "by (envoy_cluster_name)" in circuit["targets"][0]["expr"]

    # Template variables: team and model, from metrics that carry those labels.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"team", "model"} <= set(variables)
    for name in ("team", "model"):
        assert variables[name]["datasource"]["uid"] == prometheus_uid
    exprs = dashboard_expressions(dashboard)
    for expr in exprs[-len(dashboard["templating"]["list"]) :]:
        assert not promql_problems(expr)[1], expr
    used = " ".join(exprs)
    assert 'team=~"$team"' in used and 'model=~"$model"' in used

    # Prometheus' own parser (promtool) reads every expression, variables substituted.
    promtool = require_tool("promtool")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": substitute(e)}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    proc = run([promtool, "check", "rules", str(rules_file)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- 3. prometheus.yml ----------------------------------------------------------------------


def scrape_jobs(config: dict) -> dict[str, tuple[str, list[str]]]:
    """job name -> (metrics path, targets)."""
    return {
        job["job_name"]: (
            job.get("metrics_path", "/metrics"),
            [t for sc in job.get("static_configs", []) for t in sc["targets"]],
        )
        for job in config["scrape_configs"]
    }


def sidecar_jobs(config: dict) -> tuple[str, str]:
    """The names of the jobs scraping the sidecar's metrics and Envoy's stats."""
    cfg = docker_config()
    _, metrics_port = parse_address(cfg["observability"]["metrics"]["listen"])
    _, admin_port = parse_address(cfg["envoy"]["admin"])
    jobs = scrape_jobs(config)
    sidecar = [
        n for n, (p, t) in jobs.items() if p == "/metrics" and t == [f"sidecar:{metrics_port}"]
    ]
    envoy = [
        n
        for n, (p, t) in jobs.items()
        if p == "/stats/prometheus" and t == [f"sidecar:{admin_port}"]
    ]
    assert len(sidecar) == 1, f"one job must scrape sidecar:{metrics_port}/metrics: {jobs}"
    assert len(envoy) == 1, f"one job must scrape sidecar:{admin_port}/stats/prometheus: {jobs}"
    return sidecar[0], envoy[0]


def test_prometheus_config():
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    sidecar_jobs(config)
    assert "sidecar" in load_compose()["services"]
    promtool = require_tool("promtool")
    proc = run([promtool, "check", "config", str(PROMETHEUS_YML)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- 4. a real Prometheus scraping the gateway ----------------------------------------------


def prom_query(base: str, query: str) -> dict:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as err:  # a bad query: 400 with the error in the body
        return json.loads(err.read())


def prom_value(base: str, query: str) -> float | None:
    answer = prom_query(base, query)
    assert answer["status"] == "success", (query, answer)
    result = answer["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def wait_for(predicate, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} (Prometheus log: {log.read_text()[-2000:]})")
        time.sleep(0.25)


def test_prometheus_scrapes_the_gateway(gateway: Gateway, tmp_path):
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).exists():
        pytest.fail(f"prometheus not found: {INSTALL_HINT}")

    # The shipped scrape config, pointed at the test gateway, scraping every second.
    shipped = yaml.safe_load(PROMETHEUS_YML.read_text())
    sidecar_job, envoy_job = sidecar_jobs(shipped)
    retarget = {
        sidecar_job: gateway.config["observability"]["metrics"]["listen"],
        envoy_job: gateway.admin,
    }
    jobs = []
    for job in shipped["scrape_configs"]:
        if job["job_name"] in retarget:
            job = {**job, "static_configs": [{"targets": [retarget[job["job_name"]]]}]}
            jobs.append(job)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": jobs,
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_for(ready, 15, "Prometheus did not become ready", log)
        for job in (sidecar_job, envoy_job):
            wait_for(
                lambda job=job: prom_value(base, f'up{{job="{job}"}}') == 1,
                10,
                f"up{{job={job!r}}} is not 1",
                log,
            )

        served = 'sum(extproc_requests_total{team="team-a",model="gpt-4o-mini",outcome="served"})'
        before = prom_value(base, served) or 0.0
        client = openai.OpenAI(base_url=gateway.base_url, api_key="sk-team-a", max_retries=0)
        sent = 3
        for i in range(sent):
            reply = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"metrics {i}"}]
            )
            assert reply.choices[0].message.content
        wait_for(
            lambda: (prom_value(base, served) or 0.0) >= before + sent,
            30,
            f"{served} did not grow by {sent} from {before}",
            log,
        )
        tokens = 'sum(extproc_tokens_total{team="team-a",model="gpt-4o-mini",type="output"})'
        assert (prom_value(base, tokens) or 0) >= sent

        # The Envoy metrics the dashboard uses exist, with the labels the checks allow.
        for name, labels in ENVOY_METRICS.items():
            answer = prom_query(base, f'{name}{{job="{envoy_job}"}}')
            series = answer["data"]["result"]
            assert series, f"Envoy exposes no {name}"
            assert any(labels <= set(s["metric"]) for s in series), (name, series[:3])
        ejections = prom_query(base, "envoy_cluster_outlier_detection_ejections_active")
        clusters = {s["metric"]["envoy_cluster_name"] for s in ejections["data"]["result"]}
        assert "aigw-backend-fake-a" in clusters  # the dashboard's aigw-backend-.* matches

        # Every dashboard query runs on the real Prometheus; the traffic panels have data.
        dashboard = load_dashboard()
        for expr in dashboard_expressions(dashboard):
            answer = prom_query(base, substitute(expr))
            assert answer["status"] == "success", (expr, answer)
        for panel in dashboard_panels(dashboard):
            if panel["title"].lower().startswith(("tokens per second", "requests per second")):
                for target in panel["targets"]:
                    query = substitute(target["expr"])  # a rate needs a second sample
                    wait_for(
                        lambda query=query: prom_query(base, query)["data"]["result"],
                        10,
                        f"{panel['title']}: no data for {query}",
                        log,
                    )
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
