"""The Envoy message helpers of extproc.protocol that other tests only use in passing."""

from __future__ import annotations

import enum
from typing import Any

import pytest
from google.protobuf import struct_pb2

from extproc.protocol import struct_dict, to_struct
from extproc.telemetry import metrics


class Stage(enum.StrEnum):
    DOWN = "downstream"


class Pool(enum.IntEnum):
    NEXT = 1


VALUES: list[dict[str, Any]] = [
    {},
    {"extproc": {"team": "a", "stream": False, "pool": 0, "started_at": 1733240000.125}},
    {"n": None, "t": True, "list": [1, "x", {"k": False}, [], {}], "empty": {}, "tuple": (1, 2)},
    {"guards": [{"guard": "pii", "counts": {"email": 2}}], "prompt": ["masked text"]},
    {"enum": Stage.DOWN, "int_enum": Pool.NEXT, "big": 10**15, "neg": -1.5, "uni": "こんにちは 🙂"},
]


@pytest.mark.parametrize("data", VALUES)
def test_to_struct_builds_what_struct_update_builds(data: dict[str, Any]) -> None:
    expected = struct_pb2.Struct()
    expected.update(data)
    assert to_struct(data) == expected
    assert to_struct(data).SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True
    )


def test_to_struct_round_trips_through_struct_dict() -> None:
    data = {"a": "x", "b": 2.0, "c": [True, None], "d": {"e": []}}
    assert struct_dict(to_struct(data)) == data


def test_to_struct_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(ValueError, match="not a JSON value: object"):
        to_struct({"x": object()})


def test_a_metric_child_is_looked_up_once_and_counts_as_labels_does() -> None:
    labels = ("none", "team-x", "model-y", "served", "200", "openai")
    child = metrics.child(metrics.REQUESTS, *labels)
    assert metrics.child(metrics.REQUESTS, *labels) is child
    before = metrics.REQUESTS.labels(*labels)._value.get()
    child.inc()
    assert metrics.REQUESTS.labels(*labels)._value.get() == before + 1
    # Another metric with the same label values is another child.
    assert metrics.child(metrics.COST, "none", "team-x", "model-y") is not child
