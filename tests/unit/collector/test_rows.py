"""The ingest fast path: store rows built straight from msgpack event maps."""

from __future__ import annotations

import copy
import json
from typing import Any

import msgpack
import pytest

from predtrace.collector._ingest_rows import prepare
from predtrace.collector.store import event_problem, fast_prediction_row, prediction_row
from predtrace.collector.store._rows import json_text
from predtrace.wire import (
    DecodeLimits,
    DeploymentRef,
    ModelRef,
    OutputSummary,
    PredictionEvent,
    Status,
    WireError,
    event_from_map,
    event_to_map,
)

MAX_ID = 256


def _event(**changes: Any) -> PredictionEvent:
    event = PredictionEvent(
        prediction_id="0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        trace_id=bytes(range(1, 17)),
        span_id=bytes(range(1, 9)),
        timestamp_unix_nano=1_800_000_000_000_000_000,
        duration_nanos=1_234_567,
        model=ModelRef("churn", "3", "champion", "models:/churn/3", "sha256:ab", ""),
        deployment=DeploymentRef("dep-1", "churn-svc", "prod", "pod-a", "node-1", "sha256:cd", "i"),
        endpoint="/v2/models/churn/infer",
        protocol="oip-v2-rest",
        status=Status.OK,
        status_code="200",
        input_fingerprint=b"\x01" * 32,
        output=OutputSummary(label="churn", score=0.91),
        features={"tenure": 12.0, "spend": 99.5},
        attributes={"region": "eu"},
        sampled=True,
    )
    for name, value in changes.items():
        setattr(event, name, value)
    return event


def _slow_row(raw: object) -> tuple[object, ...] | None:
    """The precise path's row, or None when it rejects the event."""
    try:
        event = event_from_map(raw)
    except WireError:
        return None
    if event_problem(event) is not None:
        return None
    return prediction_row(event, "edge-7", 42, 99)


PLAIN_EVENTS = [
    _event(),
    PredictionEvent("only-an-id"),
    _event(output=None, features={}, attributes={}, sampled=False),
    _event(output=OutputSummary()),
    _event(output=OutputSummary(label=None, score=None, value=3.5)),
    _event(status=Status.ERROR, error_type="ValueError", status_code="500"),
    _event(trace_id=b"", span_id=b"", input_fingerprint=b""),
    _event(deployment=DeploymentRef(service="svc", namespace="ns")),
    _event(deployment=DeploymentRef(service="svc")),
    _event(deployment=DeploymentRef(namespace="ns-without-service")),
    _event(model=ModelRef("m", "", "prod", role="primary")),
    _event(timestamp_unix_nano=2**63 - 1, duration_nanos=0),
]


@pytest.mark.parametrize("event", PLAIN_EVENTS, ids=range(len(PLAIN_EVENTS)))
def test_fast_row_equals_the_precise_path_row(event: PredictionEvent) -> None:
    raw = event_to_map(event)
    fast = fast_prediction_row(raw, "edge-7", 42, 99, MAX_ID)
    assert fast is not None
    assert fast == prediction_row(event, "edge-7", 42, 99)
    assert fast == _slow_row(raw)


def _raw(key: int, value: object) -> dict[int, Any]:
    raw = event_to_map(_event())
    raw[key] = value
    return raw


OFF_PATH = {
    "not a map": ["a list"],
    "missing id": {2: b""},
    "id too long": _raw(1, "x" * (MAX_ID + 1)),
    "short trace id": _raw(2, b"\x01" * 15),
    "timestamp past int64": _raw(4, 2**63),
    "negative duration": _raw(5, -1),
    "bool status": _raw(11, True),
    "unknown status": _raw(11, 7),
    "NUL in endpoint": _raw(9, "/a\x00b"),
    "NUL in attribute value": _raw(17, {"k": "v\x00"}),
    "NUL in feature name": _raw(16, {"f\x00": 1.0}),
    "NUL in output label": _raw(15, {1: "a\x00"}),
    "int feature": _raw(16, {"f": 1}),
    "nan feature": _raw(16, {"f": float("nan")}),
    "int score": _raw(15, {2: 1}),
    "additional models": _raw(7, [{1: "scaler", 6: "preprocessor"}]),
    "model not a map": _raw(6, "churn"),
    "deployment value not text": _raw(8, {1: 5}),
    "fingerprint as text": _raw(14, "ab"),
    "id as bytes": _raw(1, b"0190a1b2"),
    "endpoint as bytes": _raw(9, b"/v2"),
    "model role not text": _raw(6, {1: "churn", 6: 7}),
    "feature name not text": _raw(16, {7: 1.0}),
    "attribute value not text": _raw(17, {"k": 5}),
    "attribute name not text": _raw(17, {b"k": "v"}),
    "label not text": _raw(15, {1: 0}),
    "nil label": _raw(15, {1: None}),
    "additional models nil": _raw(7, None),
    "additional models zero": _raw(7, 0),
    "additional models empty map": _raw(7, {}),
}


@pytest.mark.parametrize("raw", OFF_PATH.values(), ids=OFF_PATH.keys())
def test_fast_row_leaves_doubtful_maps_to_the_precise_path(raw: object) -> None:
    assert fast_prediction_row(copy.deepcopy(raw), "edge-7", 42, 99, MAX_ID) is None


def test_prepare_mixes_fast_rows_precise_rows_and_rejections_in_order() -> None:
    plain, extra = _event(), _event(prediction_id="with-extra-model")
    extra.additional_models = [ModelRef("scaler", "1", role="preprocessor")]
    nul = event_to_map(_event(prediction_id="nul"))
    nul[9] = "/a\x00b"
    events = [event_to_map(plain), {2: b"x" * 16}, event_to_map(extra), nul, "not a map"]
    body = msgpack.packb({0: [1, 0], 1: "edge-7", 2: 42, 6: events}, use_bin_type=True)
    prepared = prepare(body, DecodeLimits(), 99)
    assert prepared.record.rows == [
        prediction_row(plain, "edge-7", 42, 99),
        prediction_row(extra, "edge-7", 42, 99),
    ]
    assert [r.index for r in prepared.rejected] == [1, 3, 4]
    assert "prediction_id is required" in prepared.rejected[0].reason
    assert prepared.rejected[1].prediction_id == "nul"
    assert "NUL" in prepared.rejected[1].reason
    assert prepared.record.rejected == 3


@pytest.mark.parametrize(
    "value",
    [
        {"age": 42.0, "tenure": 1e16, "tiny": 5e-324, "neg": -0.0},
        {"country": "Côte d'Ivoire", "quote": 'say "hi"\n', "emoji": "\U0001f600"},
        [{"name": "ranker", "version": "2"}],
    ],
)
def test_json_columns_read_back_to_the_same_values(value: object) -> None:
    text = json_text(value)
    assert isinstance(text, str)
    assert json.loads(text) == value


def test_json_columns_escape_what_utf8_cannot_hold() -> None:
    # A lone surrogate cannot come off the wire (msgpack strings are UTF-8),
    # but a row built any other way must still store, not raise.
    text = json_text({"k": "\ud800"})
    assert json.loads(text) == {"k": "\ud800"}
    assert text.isascii()


def test_an_all_zero_trace_id_is_stored_as_none_not_as_an_id_no_one_can_look_up() -> None:
    zeros = event_to_map(_event(prediction_id="zeros", trace_id=bytes(16), span_id=bytes(8)))
    assert fast_prediction_row(zeros, "edge-7", 42, 99, MAX_ID) is None  # the precise path's
    body = msgpack.packb({0: [1, 0], 1: "edge-7", 2: 42, 6: [zeros]}, use_bin_type=True)
    (row,) = prepare(body, DecodeLimits(), 99).record.rows
    assert row == prediction_row(
        _event(prediction_id="zeros", trace_id=b"", span_id=b""), "edge-7", 42, 99
    )
    assert row[1] is None and row[2] is None
