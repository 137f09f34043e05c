"""The one charging rule, the answer paths and who finishes each (extproc.settlement)."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from extproc import settlement
from extproc.quota.policy import Amounts
from extproc.settlement import AnswerPath, Finisher, answer_path, charge, counted_by
from extproc.usage import Usage

USAGE = Usage(100, 20, 120)
SSE = "text/event-stream; charset=utf-8"
JSON = "application/json"


@pytest.mark.parametrize(
    ("usage", "status", "complete", "expected"),
    [
        (USAGE, 200, True, Amounts(100, 20)),  # the answer's usage
        (None, 200, True, Amounts(0, 0)),  # a 2xx answer without usage (not JSON)
        (USAGE, 500, True, Amounts(0, 0)),  # the backend failed: it served nothing
        (None, 429, True, Amounts(0, 0)),
        (USAGE, 200, False, Amounts(100, 20)),  # a cut stream: what was delivered
        (USAGE, 500, False, Amounts(100, 20)),  # ... whatever its status said
        (None, 0, False, Amounts(7, 0)),  # no answer: the backend may have read the prompt
        (None, 200, False, Amounts(7, 0)),  # headers, then the client left
    ],
)
def test_the_charging_rule(
    usage: Usage | None, status: int, complete: bool, expected: Amounts
) -> None:
    assert charge(usage, status, complete, prompt=7) == expected


def headers(status: int, content_type: str) -> dict[str, str]:
    return {":status": str(status), "content-type": content_type}


@pytest.mark.parametrize(
    ("observe", "released", "status", "content_type", "end", "expected"),
    [
        (True, False, 200, SSE, False, AnswerPath.OBSERVED),
        (True, True, 200, SSE, False, AnswerPath.OBSERVED),
        (True, False, 200, SSE, True, AnswerPath.OBSERVED),  # headers end it: still the observer's
        (True, True, 429, JSON, False, AnswerPath.LOGGED),  # an error goes back to the log
        (True, False, 500, SSE, False, AnswerPath.INLINE),  # an error stream is not followed
        (False, True, 200, JSON, False, AnswerPath.LOGGED),
        (False, True, 200, SSE, False, AnswerPath.LOGGED),
        (False, False, 200, SSE, False, AnswerPath.INLINE),
        (False, False, 200, SSE, True, AnswerPath.READ),  # no body to follow
        (False, False, 200, JSON, False, AnswerPath.READ),
        (True, False, 200, JSON, False, AnswerPath.READ),
    ],
)
def test_the_answer_path(
    observe: bool, released: bool, status: int, content_type: str, end: bool, expected: AnswerPath
) -> None:
    assert answer_path(observe, released, headers(status, content_type), end) is expected


def test_every_path_is_settled_by_exactly_one_finisher() -> None:
    assert set(settlement.SETTLED_BY) == set(AnswerPath)
    assert settlement.SETTLED_BY[AnswerPath.OBSERVED] is Finisher.OBSERVER
    assert settlement.SETTLED_BY[AnswerPath.LOGGED] is Finisher.ACCESS_LOG
    # A released request is counted by the access log's reader even when the observer settles
    # it; any other by the downstream stage.
    assert counted_by(released=True) is Finisher.ACCESS_LOG
    assert counted_by(released=False) is Finisher.DOWNSTREAM


def test_the_finishers_named_in_the_table_exist() -> None:
    import extproc

    root = Path(extproc.__file__).parent
    for finisher in Finisher:
        module, _, name = finisher.value.partition(".")
        source = (root / f"{module}.py").read_text()
        leaf = name.rsplit(".", 1)[-1]
        assert re.search(rf"def {leaf}\(", source), finisher


def test_only_the_settlement_module_settles_or_finishes() -> None:
    """The quota store is settled, tokens counted and audit records written in one place: a
    finisher that did it alone could double-charge or drop a charge."""
    import extproc

    root = Path(extproc.__file__).parent
    calls = re.compile(r"\.(settle_soon|count_usage|audit_record|end_span)\(")
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "settlement.py"
        and path.parent.name != "quota"
        and calls.search(path.read_text())
    ]
    assert offenders == []


def test_the_architecture_doc_has_the_table() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
    for path in AnswerPath:
        if path is not AnswerPath.NO_ANSWER:
            assert f"`{path.value}`" in doc, path
    for finisher in Finisher:
        assert finisher.value in doc, finisher


def test_a_reader_of_the_hand_over_reads_every_key_the_writer_writes() -> None:
    """The finishers read only Handover.KEYS out of the request's metadata."""
    from extproc.contract import ACCOUNT_KEY, HANDOVER_KEY, OBSERVE_KEY, Handover

    full = Handover(
        team="t", model="m", endpoint="/v1/chat/completions", wire="other", stream=True,
        prompt_tokens=1, started_at=1.0, observe=True, account=True, reservation="r",
        limits=("l",), pool=1, output_estimate=2, output_cap=3, backend="b",
        provider_model="p", traceparent="tp", request_id="id", trace_id="tr",
        guards=({"guard": "g"},), prompt_sha256="h", prompt=("x",),
    )  # fmt: skip
    written = full.to_metadata()
    assert set(written) <= Handover.KEYS
    assert Handover.from_metadata({k: v for k, v in written.items() if k in Handover.KEYS}) == full
    # What Envoy reads itself are keys of their own; the rest is one string (HANDOVER_KEY).
    assert set(written) == {
        "team", "model", HANDOVER_KEY, OBSERVE_KEY, ACCOUNT_KEY, "backend", "provider_model"
    }  # fmt: skip
    assert isinstance(written[HANDOVER_KEY], str)
    # A sidecar from before the packing wrote every key on its own: still read.
    legacy = {**written, **orjson.loads(written.pop(HANDOVER_KEY))}
    assert set(legacy) <= Handover.KEYS
    assert Handover.from_metadata(legacy) == full
    # A packed string that is not JSON is ignored, not a crash (defaults, like an old writer).
    broken = Handover.from_metadata({"team": "t", "model": "m", HANDOVER_KEY: "{nope"})
    assert (broken.team, broken.reservation, broken.prompt_tokens) == ("t", "", 0)
