"""Shared builders for the wire tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from predtrace.wire import (
    DeploymentRef,
    EventBatch,
    ModelRef,
    OutputSummary,
    PredictionEvent,
    Status,
    new_prediction_id,
)


def full_event(i: int = 0) -> PredictionEvent:
    """An event with every field set."""
    return PredictionEvent(
        prediction_id=new_prediction_id(),
        trace_id=bytes(range(1, 17)),
        span_id=bytes(range(1, 9)),
        timestamp_unix_nano=1_800_000_000_000_000_000 + i,
        duration_nanos=1_234_567,
        model=ModelRef("churn", "3", "champion", "models:/churn/3", "sha256:ab", ""),
        additional_models=[ModelRef("scaler", "1", role="preprocessor")],
        deployment=DeploymentRef(
            "dep-1", "churn-svc", "prod", "pod-a", "node-1", "sha256:cd", "img"
        ),
        endpoint="/v2/models/churn/infer",
        protocol="oip-v2-rest",
        status=Status.OK,
        status_code="200",
        error_type="",
        input_fingerprint=b"\x01" * 32,
        output=OutputSummary(label="churn", score=0.91, value=None),
        features={"tenure": 12.0, "spend": 99.5},
        attributes={"tenant": "acme"},
        sampled=True,
    )


@pytest.fixture
def make_event() -> Callable[[int], PredictionEvent]:
    """Factory of events with every field set."""
    return full_event


@pytest.fixture
def batch() -> EventBatch:
    """A batch of three full events."""
    return EventBatch(
        producer_id="edge-7",
        seq=42,
        events=[full_event(i) for i in range(3)],
        batch_id=b"\x07" * 16,
        created_at_unix_nano=1_800_000_000_000_000_000,
        prev_digest=b"\x09" * 32,
    )
