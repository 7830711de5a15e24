"""Conversion between event dataclasses and protobuf messages."""

from __future__ import annotations

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
        (
            event_pb2.PredictionEvent(prediction_id="p", features={"a": float("inf")}),
            "finite",
        ),
    ],
)
def test_invalid_messages_raise_wire_error(msg: event_pb2.PredictionEvent, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        event_from_proto(msg)
