"""Builders for tests and benchmarks of the collector: events, chained batches.

Public so that other components' tests (and the demo) can feed a collector
without re-implementing the producer side.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from predtrace.wire import (
    DeploymentRef,
    EventBatch,
    ModelRef,
    OutputSummary,
    PredictionEvent,
    batch_digest,
    encode_events_payload,
    gzip_bytes,
    new_prediction_id,
)


def make_events(
    count: int,
    *,
    trace_id: bytes = b"",
    model: tuple[str, str] = ("churn", "3"),
    alias: str = "",
    deployment: str = "churn-prod",
    image: str = "sha256:image-churn-3",
    timestamp_ns: int | None = None,
) -> list[PredictionEvent]:
    """``count`` well-formed events of one model and deployment."""
    ts = timestamp_ns if timestamp_ns is not None else time.time_ns()
    return [
        PredictionEvent(
            prediction_id=new_prediction_id(),
            trace_id=trace_id,
            span_id=(i + 1).to_bytes(8, "big") if trace_id else b"",
            timestamp_unix_nano=ts + i,
            duration_nanos=1_500_000,
            model=ModelRef(name=model[0], version=model[1], alias=alias),
            deployment=DeploymentRef(id=deployment, pod=f"{deployment}-pod", image_digest=image),
            endpoint="/predict",
            protocol="http",
            output=OutputSummary(label="stay", score=0.8),
            features={"tenure": float(i)},
        )
        for i in range(count)
    ]


@dataclass(slots=True)
class ChainedProducer:
    """Numbers batches and chains their digests like a real producer does.

    Example:
        >>> producer = ChainedProducer("edge-1")
        >>> body = producer.body(make_events(10))
    """

    producer_id: str
    seq: int = 0
    prev_digest: bytes = b""
    digests: dict[int, bytes] = field(default_factory=dict)

    def body(self, events: Sequence[PredictionEvent], *, compress: bool = False) -> bytes:
        """The next batch's wire bytes (seq + 1, chained to the previous one)."""
        self.seq += 1
        payload = encode_events_payload(
            EventBatch(
                producer_id=self.producer_id,
                seq=self.seq,
                events=list(events),
                batch_id=self.seq.to_bytes(16, "big"),
                created_at_unix_nano=time.time_ns(),
                prev_digest=self.prev_digest,
            )
        )
        self.prev_digest = batch_digest(payload)
        self.digests[self.seq] = self.prev_digest
        return gzip_bytes(payload) if compress else payload
