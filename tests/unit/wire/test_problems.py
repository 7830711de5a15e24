"""event_problem on events built by code: a wrongly typed or unencodable text is a problem.

Such an event would make the encoder fail on the whole batch it travels in;
event_problem names it instead of raising, and a pipeline drops it alone.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from predtrace.sidecar.pipeline import QueueConfig, QueuedExporter
from predtrace.sidecar.testing import InMemoryExporter
from predtrace.wire import (
    EventBatch,
    OutputSummary,
    PredictionEvent,
    decode_batch,
    encode_batch,
    event_problem,
)

from .test_codec import TEXT_FIELDS

IDS = [n for n, _ in TEXT_FIELDS]
BUILDS = [b for _, b in TEXT_FIELDS]


@pytest.mark.parametrize("odd", [5, b"x", None, ("x",)], ids=repr)
@pytest.mark.parametrize("build", BUILDS, ids=IDS)
def test_a_text_field_of_the_wrong_type_is_a_problem_not_an_error(
    build: Callable[[object], PredictionEvent], odd: object
) -> None:
    event = build(odd)
    if event.output is not None and not event.output.label:
        return  # an empty label (None) is no label: nothing to check
    problem = event_problem(event)
    assert problem == "text fields must be strings"


@pytest.mark.parametrize("build", BUILDS, ids=IDS)
def test_a_text_field_with_a_lone_surrogate_is_a_problem(
    build: Callable[[str], PredictionEvent],
) -> None:
    assert event_problem(build("a\ud800")) is not None
    assert event_problem(build("\udfff")) is not None
    fine = build("caf\u00e9 \U0001f600")  # any valid Unicode is fine
    assert event_problem(fine) is None
    decode_batch(encode_batch(EventBatch("p", 1, [fine])))


def test_a_pipeline_drops_alone_the_event_that_cannot_be_encoded() -> None:
    good = [PredictionEvent(prediction_id=f"e{i}") for i in range(4)]
    bad = [
        PredictionEvent(prediction_id="b0", output=OutputSummary(label=["cat"])),  # type: ignore[arg-type]
        PredictionEvent(prediction_id="b1", output=OutputSummary(label="\ud800")),
    ]
    exporter = InMemoryExporter()
    pipeline = QueuedExporter(exporter, QueueConfig(max_batch_size=10, schedule_delay=5.0))
    try:
        for event in [*good[:2], *bad, *good[2:]]:
            pipeline.emit(event)
        assert pipeline.force_flush(timeout=10)
        assert [e.prediction_id for e in exporter.events] == ["e0", "e1", "e2", "e3"]
        counters = pipeline.counters.snapshot()
        assert counters["dropped.invalid"] == 2 and "dropped.worker_error" not in counters
    finally:
        pipeline.shutdown(timeout=5)


def test_a_pipeline_drops_alone_an_event_its_check_cannot_read() -> None:
    # A processor's bug (an object that is no event): that event is invalid,
    # the rest of its batch is delivered.
    def garbage_for_e1(event: PredictionEvent) -> PredictionEvent:
        return "garbage" if event.prediction_id == "e1" else event  # type: ignore[return-value]

    exporter = InMemoryExporter()
    config = QueueConfig(max_batch_size=5, schedule_delay=5.0)
    pipeline = QueuedExporter(exporter, config, processors=[garbage_for_e1])
    try:
        for i in range(3):
            pipeline.emit(PredictionEvent(prediction_id=f"e{i}"))
        assert pipeline.force_flush(timeout=10)
        assert [e.prediction_id for e in exporter.events] == ["e0", "e2"]
        counters = pipeline.counters.snapshot()
        assert counters["dropped.invalid"] == 1 and pipeline.worker_errors == 0
    finally:
        pipeline.shutdown(timeout=5)
