"""Response-side helpers: bounded capture, served model, output summary."""

from __future__ import annotations

from predtrace.middleware._outputs import (
    ResponseCapture,
    is_json,
    response_id,
    served_model,
    summarise,
)
from predtrace.wire import OutputSummary


def test_capture_keeps_chunks_up_to_the_bound_then_nothing() -> None:
    capture = ResponseCapture(limit=10)
    capture.add(b'{"a":')
    capture.add(b"1}")
    assert capture.parsed() == {"a": 1}
    capture.add(b"x" * 10)
    assert capture.overflowed and capture.parsed() is None


def test_capture_of_invalid_json_gives_none() -> None:
    capture = ResponseCapture(limit=100)
    capture.add(b"<html>")
    assert capture.parsed() is None


def test_json_content_types_are_recognised() -> None:
    assert is_json([(b"content-type", b"application/json; charset=utf-8")])
    assert is_json([(b"content-type", b"application/problem+json")])
    assert not is_json([(b"content-type", b"text/event-stream")])
    assert not is_json([])


def test_served_model_and_response_id_are_read_from_oip_answers() -> None:
    answer = {"model_name": "iris", "model_version": "4", "id": "r1"}
    assert served_model(answer) == ("iris", "4")
    assert response_id(answer) == "r1"
    assert served_model({"model_version": 4}) == ("", "")
    assert served_model([1]) == ("", "")


def test_oip_summary_picks_label_score_and_value_by_name_and_type() -> None:
    answer = {
        "outputs": [
            {"name": "predicted_label", "data": ["cat"]},
            {"name": "probability", "data": [[0.9, 0.1]]},
            {"name": "embedding", "data": [0.5, 0.7]},
        ]
    }
    assert summarise(answer, "oip-v2-rest") == OutputSummary(label="cat", score=0.9, value=0.5)
    assert summarise({"outputs": [{"name": "x", "data": []}]}, "oip-v2-rest") is None


def test_summary_bounds_labels_and_ignores_non_finite_numbers() -> None:
    long_label = {"outputs": [{"name": "label", "data": ["x" * 10_000]}]}
    summary = summarise(long_label, "oip-v2-rest")
    assert summary is not None and summary.label is not None and len(summary.label) == 256
    assert summarise({"outputs": [{"name": "v", "data": [float("inf")]}]}, "oip-v2-rest") is None


def test_kserve_summary_uses_the_first_prediction() -> None:
    assert summarise({"predictions": [[3.5, 1.0]]}, "kserve-v1") == OutputSummary(value=3.5)
    assert summarise({"predictions": ["spam"]}, "kserve-v1") == OutputSummary(label="spam")
    assert summarise({"predictions": []}, "kserve-v1") is None
    assert summarise({"outputs": []}, "http") is None
