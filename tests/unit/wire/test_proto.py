"""Conversion between event dataclasses and protobuf messages."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from predtrace.v1 import event_pb2
from predtrace.wire import (
    ModelRef,
    OutputSummary,
    PredictionEvent,
    Status,
    WireError,
    event_from_proto,
    event_to_proto,
)


def test_full_event_round_trips_through_protobuf(
    make_event: Callable[[int], PredictionEvent],
) -> None:
    event = make_event(0)
    assert event_from_proto(event_to_proto(event)) == event


def test_minimal_event_round_trips_with_no_output() -> None:
    event = PredictionEvent(prediction_id="p")
    back = event_from_proto(event_to_proto(event))
    assert back == event
    assert back.output is None


def test_empty_model_and_deployment_are_still_present_in_the_message() -> None:
    msg = event_to_proto(PredictionEvent(prediction_id="p"))
    assert msg.HasField("model")
    assert msg.HasField("deployment")
    assert not msg.HasField("output")


def test_empty_maps_and_nested_models_survive_the_round_trip() -> None:
    event = PredictionEvent(
        prediction_id="p",
        additional_models=[ModelRef("scaler", "1", role="preprocessor"), ModelRef()],
        output=OutputSummary(label="", value=0.0),
        status=Status.ERROR,
        attributes={"k": "v"},
    )
    assert event_from_proto(event_to_proto(event)) == event


def test_unknown_status_number_reads_as_unset() -> None:
    msg = event_pb2.PredictionEvent(prediction_id="p")
    msg.status = 9  # type: ignore[assignment]  # proto3 enums are open
    assert event_from_proto(msg).status is Status.UNSET


def test_protobuf_bytes_decode_to_the_same_event(
    make_event: Callable[[int], PredictionEvent],
) -> None:
    event = make_event(0)
    wire = event_to_proto(event).SerializeToString()
    assert event_from_proto(event_pb2.PredictionEvent.FromString(wire)) == event


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        (event_pb2.PredictionEvent(), "prediction_id is required"),
        (event_pb2.PredictionEvent(prediction_id="p", trace_id=b"x"), "trace_id must be 16"),
        (event_pb2.PredictionEvent(prediction_id="p", span_id=b"x"), "span_id must be 8"),
        (event_pb2.PredictionEvent(prediction_id="p" * 300), "longer than 256"),
    ],
)
def test_invalid_messages_raise_wire_error(msg: event_pb2.PredictionEvent, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        event_from_proto(msg)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=repr)
def test_non_finite_features_are_left_out_and_the_event_kept(bad: float) -> None:
    # NaN is the usual missing-value marker: the value goes, not the event.
    msg = event_pb2.PredictionEvent(prediction_id="p", features={"a": bad, "b": 2.5, "c": bad})
    event = event_from_proto(msg)
    assert event.features == {"b": 2.5}
    only_bad = event_pb2.PredictionEvent(prediction_id="p", features={"a": bad})
    assert event_from_proto(only_bad).features == {}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=repr)
def test_non_finite_output_numbers_are_left_unset_and_the_event_kept(bad: float) -> None:
    output = event_pb2.OutputSummary(label="churn", score=bad, value=bad)
    event = event_from_proto(event_pb2.PredictionEvent(prediction_id="p", output=output))
    assert event.output == OutputSummary(label="churn", score=None, value=None)
    mixed = event_pb2.OutputSummary(score=0.25, value=bad)
    event = event_from_proto(event_pb2.PredictionEvent(prediction_id="p", output=mixed))
    assert event.output == OutputSummary(score=0.25)
