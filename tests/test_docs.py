"""The README and docs/ say what the code does: every example in them is checked.

Every fenced block in README.md and docs/*.md carries a marker, an HTML comment on the line
right before it, saying how it is checked (or that it is not):

    <!-- check: config -->             yaml: a whole config file, loaded by extproc.config
                                       (duplicate keys refused) and rendered into an Envoy
                                       bootstrap
    <!-- check: config-fragment -->    yaml: a part of a config, merged into a small valid
                                       config (BASE below) and loaded; `id=NAME` lets an
                                       envoy-excerpt of the same page refer to it as `#NAME`
    <!-- check: envoy-excerpt CFG -->  yaml: `routes:` and `clusters:` as `extproc envoy`
                                       renders them for CFG (a repository path, or `#NAME`):
                                       each item is contained in the rendered one of its name
    <!-- check: python -->             python: run (cwd: the repository) and must exit 0
    <!-- check: commands -->           sh: each line's command exists with the flags it
                                       uses (`extproc ...` parsed by extproc's own parser,
                                       `make T` a Makefile target, `python -m M ...` parsed by
                                       M's parse_args, ...); repository paths must exist
    <!-- check: json -->               json: parses
    <!-- check: audit-record -->       json: an audit line with the fields a record has
    <!-- readme-example: ... -->       python: run against `extproc up` by tests/test_readme.py
    <!-- illustrative: WHY -->         not checked: a diagram, log lines, output

A block with no marker, an unknown one, or one for another language fails
test_every_block_is_checked_or_marked_illustrative. The tables that mirror a code catalogue are
checked too (metrics, config fields, the module map), and so is every relative link.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from extproc.config import Config, Limit, SecretRef, load_config, parse_config
from extproc.envoy_config import bootstrap, render_yaml, to_dict
from extproc.telemetry import metrics
from extproc.telemetry.report import RequestReport, prompt_fields
from extproc.usage import Usage

from .conftest import REPO, sha256_hex

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
README_LIMIT_BYTES = 12 * 1024  # a newcomer's five minutes

# What each marker checks, and the fence languages it may stand before.
KINDS: dict[str, set[str]] = {
    "config": {"yaml"},
    "config-fragment": {"yaml"},
    "envoy-excerpt": {"yaml"},
    "python": {"python"},
    "commands": {"sh", "bash", "shell"},
    "json": {"json"},
    "audit-record": {"json"},
    "readme-example": {"python"},  # tests/test_readme.py runs it (e2e)
    "quickstart-example": {"python"},  # tests/test_readme.py runs it against the quickstart
    "illustrative": set(),  # any language: not checked
}

# A fragment is merged into this: the names the pages use (backends openai and vllm, models
# gpt-4o and gpt-4o-mini) exist, nothing else does.
BASE: dict[str, Any] = {
    "teams": {"base-team": {"keys": [{"sha256": sha256_hex("sk-base")}]}},
    "backends": {
        "openai": {"url": "https://api.openai.com/v1"},
        "vllm": {"url": "http://10.0.0.7:8000/v1"},
    },
    "models": {
        "gpt-4o": {"targets": [{"backend": "openai"}]},
        "gpt-4o-mini": {"targets": [{"backend": "openai"}]},
    },
}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    kind: str | None  # the marker's kind; None: no marker
    args: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    def option(self, name: str) -> str | None:
        for arg in self.args:
            if arg.startswith(f"{name}="):
                return arg.split("=", 1)[1]
        return None


MARKER = re.compile(r"<!--\s*(check|illustrative|readme-example)\s*:?\s*(.*?)\s*-->\s*$", re.S)


def _marker(lines: list[str], fence: int) -> tuple[str | None, list[str]]:
    """The marker comment that ends on the line right before the fence (it may span lines)."""
    end = fence - 1
    while end >= 0 and not lines[end].strip():
        end -= 1
    if end < 0 or not lines[end].rstrip().endswith("-->"):
        return None, []
    start = end
    while start >= 0 and "<!--" not in lines[start]:
        start -= 1
    match = MARKER.search("\n".join(lines[start : end + 1]).strip())
    if match is None:
        return None, []
    what, rest = match.groups()
    if what == "check":
        words = rest.split()
        return (words[0], words[1:]) if words else (None, [])
    return what, [rest]


def blocks_of(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    out = []
    i = 0
    while i < len(lines):
        opening = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if opening is None:
            i += 1
            continue
        indent, lang = opening.groups()
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        text = "\n".join(line.removeprefix(indent) for line in lines[i + 1 : j]) + "\n"
        kind, args = _marker(lines, i)
        out.append(Block(page, i + 1, lang, text, kind, args))
        i = j + 1
    return out


BLOCKS = [block for page in PAGES for block in blocks_of(page)]


def of_kind(*kinds: str) -> list[Any]:
    return [pytest.param(b, id=b.where) for b in BLOCKS if b.kind in kinds]


def test_the_pages_exist() -> None:
    names = {p.name for p in DOCS.glob("*.md")}
    assert names >= {
        "architecture.md",
        "configuration.md",
        "quotas.md",
        "streaming.md",
        "failover.md",
        "guardrails.md",
        "observability.md",
        "operations.md",
        "dropin.md",
        "performance.md",
    }
    assert BLOCKS, "no fenced block found"


def test_every_block_is_checked_or_marked_illustrative() -> None:
    problems = []
    for b in BLOCKS:
        if b.kind is None:
            problems.append(f"{b.where}: no marker (<!-- check: KIND --> or <!-- illustrative -->)")
        elif b.kind not in KINDS:
            problems.append(f"{b.where}: unknown marker kind {b.kind!r} (known: {sorted(KINDS)})")
        elif KINDS[b.kind] and b.lang not in KINDS[b.kind]:
            problems.append(f"{b.where}: a {b.kind} marker before a ```{b.lang} block")
    assert not problems, "\n".join(problems)


# -- YAML: configs, fragments, Envoy excerpts ----------------------------------------------------


class _UniqueKeys(yaml.SafeLoader):
    pass


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    keys = [loader.construct_object(k, deep=True) for k, _ in node.value]
    twice = {k for k in keys if keys.count(k) > 1}
    if twice:
        raise yaml.constructor.ConstructorError(None, None, f"keys twice: {twice}", node.start_mark)
    return loader.construct_mapping(node, deep=True)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def merged(base: Any, part: Any) -> Any:
    if isinstance(base, dict) and isinstance(part, dict):
        out = dict(base)
        for key, value in part.items():
            out[key] = merged(base[key], value) if key in base else value
        return out
    return part


def fragment_config(block: Block) -> Config:
    part = yaml.load(block.text, Loader=_UniqueKeys)
    assert isinstance(part, dict) and part, f"{block.where}: a fragment is a non-empty mapping"
    return parse_config(merged(BASE, part), block.where)


@pytest.mark.parametrize("block", of_kind("config"))
def test_config_example_loads_and_renders(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(block.text)
    cfg = load_config(path)  # raises ConfigError, naming every field, when the page is wrong
    assert render_yaml(cfg)
    data = yaml.safe_load(block.text)
    for section, schema in devtool_sections().items():
        if data.get(section) is not None:
            schema.model_validate(data[section])


@pytest.mark.parametrize("block", of_kind("config-fragment"))
def test_config_fragment_is_valid_in_a_config(block: Block) -> None:
    cfg = fragment_config(block)
    assert render_yaml(cfg)


def _named(tree: Any, out: dict[tuple[str, str], list[dict]] | None = None) -> dict:
    """Every named item of the rendered bootstrap's `routes` and `clusters` lists."""
    out = {} if out is None else out
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in ("routes", "clusters") and isinstance(value, list):
                for item in value:
                    if isinstance(item, dict) and "name" in item:
                        out.setdefault((key, item["name"]), []).append(item)
            _named(value, out)
    elif isinstance(tree, list):
        for item in tree:
            _named(item, out)
    return out


def contains(actual: Any, expected: Any) -> bool:
    """`expected` is `actual` with keys left out (lists keep their length and order)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and contains(actual[k], v) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(contains(a, e) for a, e in zip(actual, expected, strict=True))
        )
    return actual == expected


def _config_for(block: Block, ref: str) -> Config:
    if ref.startswith("#"):
        named = [
            b for b in BLOCKS if b.page == block.page and b.option("id") == ref.removeprefix("#")
        ]
        assert len(named) == 1, f"{block.where}: no block with id={ref[1:]} on this page"
        source = named[0]
        if source.kind == "config-fragment":
            return fragment_config(source)
        return parse_config(yaml.safe_load(source.text), source.where)
    return load_config(REPO / ref)


@pytest.mark.parametrize("block", of_kind("envoy-excerpt"))
def test_envoy_excerpt_is_what_extproc_envoy_renders(block: Block) -> None:
    assert block.args, f"{block.where}: envoy-excerpt needs the config it is rendered from"
    rendered = _named(to_dict(bootstrap(_config_for(block, block.args[0]))))
    excerpt = yaml.safe_load(block.text)
    assert isinstance(excerpt, dict) and set(excerpt) <= {"routes", "clusters"}, block.where
    for key, items in excerpt.items():
        for item in items:
            candidates = rendered.get((key, item["name"]), [])
            assert candidates, f"{block.where}: `extproc envoy` renders no {key} {item['name']}"
            assert any(contains(c, item) for c in candidates), (
                f"{block.where}: {key} {item['name']} differs from the rendered one:\n"
                + yaml.safe_dump(candidates[0], sort_keys=False)
            )


# -- Python ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", of_kind("python"))
def test_python_example_runs(block: Block) -> None:
    run = subprocess.run(
        [sys.executable, "-c", block.text],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, f"{block.where}:\n{run.stderr}"


def test_the_readme_example_is_there_for_test_readme() -> None:
    from .test_readme import readme_example

    compile(readme_example(), "README.md", "exec")


# -- shell commands --------------------------------------------------------------------------------

REPO_DIRS = ("examples/", "envoy/", "docs/", "benchmarks/", "protos/", "tests/")


def _parse_with(parse: Any, argv: list[str], what: str) -> str | None:
    try:
        parse(argv)
    except SystemExit as exc:
        return f"`{what}` does not parse (exit {exc.code})"
    return None


def _extproc(argv: list[str]) -> str | None:
    from extproc.cli import build_parser

    return _parse_with(build_parser().parse_args, argv, "extproc " + shlex.join(argv))


def _make(argv: list[str]) -> str | None:
    makefile = (REPO / "Makefile").read_text()
    targets = [a for a in argv if "=" not in a and not a.startswith("-")]
    missing = [t for t in targets if not re.search(rf"^{re.escape(t)}:", makefile, re.M)]
    return f"no Makefile target {missing}" if missing or not targets else None


def _python(argv: list[str]) -> str | None:
    if len(argv) < 2 or argv[0] != "-m":
        return f"`python {shlex.join(argv)}`: only `python -m MODULE ...` is checked"
    module, rest = argv[1], argv[2:]
    if module == "pytest":
        return None if importlib.util.find_spec("pytest") else "pytest is not installed"
    parse = getattr(importlib.import_module(module), "parse_args", None)
    if parse is None:
        return f"{module} has no parse_args(argv) to check the flags with"
    return _parse_with(parse, rest, f"python -m {module} {shlex.join(rest)}")


def _docker(argv: list[str]) -> str | None:
    if argv[:1] != ["compose"] or argv[1:2] not in (["up"], ["down"], ["build"], ["logs"]):
        return f"`docker {shlex.join(argv)}`: only `docker compose up|down|build|logs`"
    return None if (REPO / "docker-compose.yml").is_file() else "no docker-compose.yml"


COMMANDS = {
    "extproc": _extproc,
    "make": _make,
    "python": _python,
    ".venv/bin/python": _python,
    "docker": _docker,
}


@pytest.mark.parametrize("block", of_kind("commands"))
def test_commands_exist_with_their_flags(block: Block) -> None:
    problems = []
    for n, line in enumerate(block.text.splitlines(), start=block.line + 1):
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        check = COMMANDS.get(argv[0])
        if check is None:
            problems.append(f"line {n}: no check for `{argv[0]}` (add one, or mark the block)")
            continue
        problem = check(argv[1:])
        if problem:
            problems.append(f"line {n}: {problem}")
        for arg in argv[1:]:
            if arg.startswith(REPO_DIRS) and not (REPO / arg).exists():
                problems.append(f"line {n}: {arg} does not exist")
    assert not problems, f"{block.where}:\n" + "\n".join(problems)


# -- JSON ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", of_kind("json", "audit-record"))
def test_json_example_parses(block: Block) -> None:
    json.loads(block.text)


@pytest.mark.parametrize("block", of_kind("audit-record"))
def test_audit_example_has_the_fields_a_record_has(block: Block) -> None:
    example = json.loads(block.text)
    report = RequestReport(started_at=0.0, team="a", model="m")
    report.prompt = prompt_fields(["x"], include_prompt=False)
    record = report.audit_record(Usage(1, 1, 2), 0.1, 0.01)
    assert example.keys() == record.keys()
    assert example["tokens"].keys() == record["tokens"].keys()


# -- tables that mirror the code -------------------------------------------------------------------


def table_after(page: Path, marker: str) -> list[list[str]]:
    """The rows (cells) of the markdown table right after `marker` (a comment or a heading)."""
    text = page.read_text()
    assert marker in text, f"{page.name} lost its {marker!r}"
    rows = []
    lines = text[text.index(marker) :].splitlines()[1:]
    while lines and not lines[0].startswith("|"):
        lines.pop(0)
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
        rows.append([c.strip() for c in cells])
    assert rows, f"{page.name}: no table after {marker!r}"
    return rows


def test_the_metrics_table_documents_every_metric_with_its_labels() -> None:
    documented = {
        row[0].strip("`"): {label.strip() for label in row[1].split(",") if label.strip()}
        for row in table_after(DOCS / "observability.md", "<!-- metrics-table:")
    }
    catalogue = {
        obj._name: set(obj._labelnames)
        for obj in vars(metrics).values()
        if isinstance(obj, MetricWrapperBase)
    }
    assert documented == catalogue


# Names the reference uses for the keys of the config's mappings.
PLACEHOLDERS = {
    "teams": "<team>",
    "backends": "<backend>",
    "models": "<model>",
    "guards": "<guard>",
    "prices": "<model>",
    "model_groups": "<group>",
    "jwt": "<issuer>",
    "organizations": "<org>",
    "users": "<user>",
}
# Limits are documented once, under teams.<team>.limits; every other list of limits (an
# organization's, a user's, a key's) is one row saying it takes the same fields.
LIMITS_DOCUMENTED_AT = "teams.<team>.limits"
REQUIRED = "required"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds (a secret reference is a value, not a section)."""
    candidates = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        candidates = list(typing.get_args(annotation))
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel) and c is not SecretRef:
            return c
    return None


def config_fields(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of the config, by its documented path, with its default."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = info.annotation
        section = _model_in(annotation)
        origin = typing.get_origin(annotation)
        if section is not None:
            out.update(config_fields(section, f"{path}."))
        elif origin is dict:
            value = typing.get_args(annotation)[1]
            key = f"{path}.{PLACEHOLDERS[name]}"
            if _model_in(value) is not None:
                out.update(config_fields(_model_in(value), f"{key}."))  # type: ignore[arg-type]
            else:
                out[key] = REQUIRED
        elif origin is list and _model_in(typing.get_args(annotation)[0]) is not None:
            item = _model_in(typing.get_args(annotation)[0])
            if item is Limit and path != LIMITS_DOCUMENTED_AT:
                out[path] = info.default
            else:
                out.update(config_fields(item, f"{path}[]."))  # type: ignore[arg-type]
        else:
            out[path] = REQUIRED if info.default is PydanticUndefined else info.default
    return out


def devtool_sections() -> dict[str, type[BaseModel]]:
    """Sections of the file that a development tool reads, not the gateway (the fake LLM's)."""
    try:
        from extproc.devtools.fake_llm.section import SECTION, FakeLLMSection
    except ImportError:  # the section is still part of the gateway's own schema
        return {}
    return {SECTION: FakeLLMSection}


def _documented_default(cell: str) -> Any:
    if cell == REQUIRED:
        return REQUIRED
    if cell == "unset":
        return None
    match = re.fullmatch(r"`(.*)`", cell)
    assert match, f"a default is `value`, unset or required, not {cell!r}"
    return yaml.safe_load(match.group(1))


def test_the_configuration_reference_lists_every_field_with_its_default() -> None:
    page = DOCS / "configuration.md"
    text = page.read_text()
    reference = text[text.index("## Reference") :]
    documented = {}
    for line in reference.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if line.startswith("| `") and len(cells) == 3:
            documented[cells[0].strip("`")] = _documented_default(cells[1])
    fields = config_fields()
    for section, schema in devtool_sections().items():
        fields.update(config_fields(schema, f"{section}."))
    assert sorted(documented) == sorted(fields), "docs/configuration.md's reference is off"
    wrong = {
        path: (documented[path], default)
        for path, default in fields.items()
        if documented[path] != (str(default) if isinstance(default, Path) else default)
    }
    assert not wrong, f"documented vs code defaults: {wrong}"


def test_the_module_map_lists_every_module() -> None:
    package = REPO / "extproc"
    rows = table_after(DOCS / "architecture.md", "<!-- module-map:")
    documented = {name for row in rows for name in re.findall(r"`([^`]+)`", row[0])}
    present = {p.name for p in package.glob("*.py") if p.name != "__init__.py"} | {
        f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()
    }
    assert documented == present, "the module map in docs/architecture.md is out of date"
    problems = []
    for row in rows:
        for pkg in re.findall(r"`([^`]+/)`", row[0]):
            named = set(re.findall(r"`([A-Za-z0-9_]+(?:\.py|/))`", row[1]))
            inside = {
                p.name if p.is_file() else f"{p.name}/"
                for p in (package / pkg).iterdir()
                if (p.suffix == ".py" and p.name != "__init__.py")
                or (p.is_dir() and any(p.glob("*.py")))
            }
            if named != inside:
                problems.append(f"{pkg}: documented {sorted(named)}, present {sorted(inside)}")
    assert not problems, "\n".join(problems)


# -- links and the README's shape ------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out: set[str] = set()
    seen: dict[str, int] = {}
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_every_relative_link_points_to_a_file_and_anchor_that_exist() -> None:
    problems = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                problems.append(f"{page.relative_to(REPO)}: {target}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{page.relative_to(REPO)}: {target}: no such heading")
    assert not problems, "\n".join(problems)


def test_the_readme_is_a_five_minute_read_that_links_every_page() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= README_LIMIT_BYTES, "the rest belongs in docs/"
    for page in DOCS.glob("*.md"):
        assert f"](docs/{page.name})" in readme, f"the README does not link docs/{page.name}"
