"""Prediction ids and non-finite numbers: one rule on every path an event takes.

An id the query API could never look up (``CALLER_ID_RE``) is refused alone,
with the same reason, by the sidecar's intake (packed maps kept as maps, maps
made objects, protobuf events) and by the collector's ingest (fast rows and
the precise path). A NaN or infinite feature value is left out and such an
output number left unset on all of them, so no stored event carries one.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from predtrace.collector._ingest_rows import prepare
from predtrace.sidecar._config import DeploymentConfig, RedactionConfig
from predtrace.sidecar._intake import Intake
from predtrace.sidecar._processors import default_processors
from predtrace.v1 import event_pb2
from predtrace.wire import (
    CALLER_ID_RE,
    DecodeLimits,
    OutputSummary,
    PredictionEvent,
    event_from_map,
    event_from_proto,
)
from predtrace.wire._problems import PREDICTION_ID_RULE

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REPORTED_IDS = ["order 42", "  padded", "tab\tid", "line\nbreak", "ctl\x01id", "café-7"]
ids = (
    st.text(min_size=1, max_size=256)
    | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7F), min_size=1, max_size=256)
    | st.sampled_from([*REPORTED_IDS, "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "a/b?c#d", "x"])
)
numbers = st.floats(allow_nan=True, allow_infinity=True)
features = st.dictionaries(st.text("abcxyz", min_size=1, max_size=4), numbers, max_size=4)


class _Spool:
    class config:  # the attribute the intake reads
        max_record_bytes = 1 << 20


def _intakes() -> tuple[Intake, Intake]:
    """One intake that keeps plain maps as maps, one that makes every item an object."""
    processors = default_processors(
        DeploymentConfig(id="dep-9"), RedactionConfig(allow_features=("*",))
    )
    maps = Intake(_Spool(), processors)  # type: ignore[arg-type] - the intake reads only config
    objects = Intake(_Spool(), [lambda e, p=p: p(e) for p in processors])  # type: ignore[arg-type, misc] - a fake spool; processors without on_map
    assert maps._map_processors is not None
    assert objects._map_processors is None
    return maps, objects


def _event_map(pid: str, feats: dict[str, float], score: float | None) -> dict[int, Any]:
    output: dict[int, Any] = {1: "churn"}
    if score is not None:
        output[2] = score
    return {1: pid, 15: output, 16: feats}


def _sidecar_outcomes(raw: dict[int, Any]) -> list[tuple[list[bytes], list[tuple[int, str]]]]:
    """(spooled bytes, rejections) of one event on each of the intake's paths."""
    maps, objects = _intakes()
    proto = event_pb2.PredictionEvent(
        prediction_id=raw[1],
        output=event_pb2.OutputSummary(**{"label": "churn", "score": raw[15].get(2)}),
        features=raw[16],
    )
    outcomes = []
    for intake, item in (
        (maps, msgpack.unpackb(msgpack.packb(raw), strict_map_key=False)),
        (objects, msgpack.unpackb(msgpack.packb(raw), strict_map_key=False)),
        (objects, event_from_proto(proto)),
    ):
        payloads, rejected = intake._prepare([item])
        outcomes.append((payloads, [(r.index, r.reason) for r in rejected]))
    return outcomes


def _collector_outcome(raw: dict[int, Any]) -> tuple[list[tuple[object, ...]], list[str]]:
    body = msgpack.packb({0: [1, 0], 1: "edge-7", 2: 1, 6: [raw]}, use_bin_type=True)
    prepared = prepare(body, DecodeLimits(), 99)
    return prepared.record.rows, [r.reason for r in prepared.rejected]


def _no_nan(text: str) -> Any:
    """JSON text read back, failing on NaN or Infinity."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in a stored column")

    return json.loads(text, parse_constant=refuse)


@FAST
@given(ids, features, numbers | st.none())
@example("order 42", {"x": math.nan}, math.inf)
@example("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", {"x": math.nan, "a": 1.5}, math.nan)
def test_every_path_refuses_the_same_ids_and_leaves_out_the_same_numbers(
    pid: str, feats: dict[str, float], score: float | None
) -> None:
    raw = _event_map(pid, feats, score)
    findable = CALLER_ID_RE.fullmatch(pid) is not None
    finite = {k: v for k, v in feats.items() if math.isfinite(v)}
    kept_score = score if score is not None and math.isfinite(score) else None

    outcomes = _sidecar_outcomes(raw)
    rows, reasons = _collector_outcome(raw)
    if not findable:
        assert all(o == ([], [(0, PREDICTION_ID_RULE)]) for o in outcomes), outcomes
        assert (rows, reasons) == ([], [PREDICTION_ID_RULE])
        return
    for payloads, rejected in outcomes:
        assert rejected == []
        [event] = [event_from_map(msgpack.unpackb(p, strict_map_key=False)) for p in payloads]
        assert (event.prediction_id, event.features) == (pid, finite)
        assert event.output == OutputSummary(label="churn", score=kept_score)
    assert outcomes[0][0] == outcomes[1][0]  # a kept map spools its event's bytes
    assert reasons == []
    [row] = rows
    assert row[0] == pid
    assert (row[27], row[28], row[29]) == ("churn", kept_score, None)
    assert (_no_nan(row[30]) if row[30] is not None else {}) == finite


@pytest.mark.parametrize("pid", REPORTED_IDS, ids=repr)
def test_the_reported_unqueryable_ids_are_refused_on_every_path(pid: str) -> None:
    raw = _event_map(pid, {"x": 1.0}, 0.5)
    for payloads, rejected in _sidecar_outcomes(raw):
        assert (payloads, rejected) == ([], [(0, PREDICTION_ID_RULE)])
    assert _collector_outcome(raw) == ([], [PREDICTION_ID_RULE])
    assert _collector_outcome({**raw, 1: "order-42"})[1] == []


def test_a_nan_feature_of_an_event_built_by_code_is_left_out_by_the_collector() -> None:
    # The intake spools an object's NaN as it is; the collector leaves it out.
    _, objects = _intakes()
    event = PredictionEvent("p-1", features={"x": math.nan, "a": 2.0})
    [payload], rejected = objects._prepare([event])
    assert rejected == []
    rows, reasons = _collector_outcome(msgpack.unpackb(payload, strict_map_key=False))
    assert reasons == []
    assert _no_nan(rows[0][30]) == {"a": 2.0}
