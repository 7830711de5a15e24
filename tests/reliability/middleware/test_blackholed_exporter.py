"""RELIABILITY rows 2 and 21: a black-holed exporter and a burst of 10x the queue.

The request path never waits for the exporter (if it did, these tests would
deadlock: the exporter is released only after every request was answered),
every answer is byte for byte the one the app gives without telemetry (the
added ``x-prediction-id`` aside), memory stays bounded by the queue size, and
every drop is counted exactly.
"""

from __future__ import annotations

import json
import threading

from predtrace.middleware import MiddlewareConfig, instrument_app
from predtrace.middleware.testing import call_asgi
from predtrace.sidecar.pipeline import ExportResult, OutgoingBatch, QueueConfig

from .conftest import model_app

QUEUE = 64
JSON = [("content-type", "application/json")]
BATCH = 16


class BlackHole:
    """Blocks inside export until released; keeps what it finally got."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.delivered: list[str] = []

    def export(self, batch: OutgoingBatch) -> ExportResult:
        self.entered.set()
        self.release.wait(30)
        self.delivered.extend(e.prediction_id for e in batch.events)
        return ExportResult(len(batch.events))

    def shutdown(self, timeout: float) -> None:
        self.release.set()


async def test_burst_of_ten_times_the_queue_is_answered_while_export_hangs() -> None:
    hole = BlackHole()
    plain = model_app()  # the same app without telemetry: what every answer must equal
    app = model_app()
    queue = QueueConfig(max_queue_size=QUEUE, max_batch_size=BATCH, schedule_delay=0.01)
    runtime = instrument_app(app, MiddlewareConfig(exporter=hole, queue=queue))
    assert runtime.pipeline is not None
    try:
        first = await call_asgi(app, "POST", "/v2/models/m/infer", b'{"id": "first"}', JSON)
        assert hole.entered.wait(10)  # the worker now hangs inside export with one batch
        ids = []
        for i in range(QUEUE * 10):
            body = json.dumps({"id": f"b-{i}"}).encode()
            response = await call_asgi(app, "POST", "/v2/models/m/infer", body, JSON)
            expected = await call_asgi(plain, "POST", "/v2/models/m/infer", body, JSON)
            assert response.status == expected.status == 200
            assert response.body == expected.body
            headers = [(k, v) for k, v in response.headers if k != b"x-prediction-id"]
            assert headers == expected.headers
            ids.append(response.header("x-prediction-id"))
            assert runtime.pipeline.queue_depth <= QUEUE  # bounded at every step
        stats = runtime.stats()
        assert stats["dropped.queue_full"] == QUEUE * 10 - QUEUE  # exact: oldest dropped
        hole.release.set()
        assert runtime.force_flush(10)
        # Liveness: the newest events survived and a fresh one goes through.
        await call_asgi(app, "POST", "/v2/models/m/infer", b'{"id": "after"}', JSON)
        assert runtime.force_flush(10)
    finally:
        runtime.shutdown(5)
    assert first.status == 200
    assert hole.delivered == ["first", *ids[-QUEUE:], "after"]
    final = runtime.stats()
    assert final["enqueued"] == final["exported"] + final["dropped"]
