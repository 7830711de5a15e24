"""RELIABILITY row 23: fork after init (gunicorn --preload with uvicorn workers).

The parent built the runtime and queued events; the forked child gets a
working pipeline of its own, never exports the parent's queue, and makes
prediction ids that never collide with the parent's.
"""

from __future__ import annotations

import asyncio
import json
import os

from predtrace.middleware import MiddlewareConfig, instrument_app
from predtrace.middleware.testing import call_asgi
from predtrace.sidecar.pipeline import QueueConfig
from predtrace.sidecar.testing import InMemoryExporter

from .conftest import model_app

JSON = [("content-type", "application/json")]


async def _predict(app: object, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        response = await call_asgi(app, "POST", "/v2/models/m/infer", b'{"inputs": []}', JSON)  # type: ignore[arg-type]
        ids.append(response.header("x-prediction-id") or "")
    return ids


def _child(app: object, runtime: object, write_fd: int) -> None:
    try:
        ids = asyncio.run(_predict(app, 20))
        runtime.force_flush(10)  # type: ignore[attr-defined]
        exporter = runtime.config.exporter  # type: ignore[attr-defined]
        report = {"ids": ids, "exported": [e.prediction_id for e in exporter.events]}
        os.write(write_fd, json.dumps(report).encode())
    finally:
        os._exit(0)


def test_forked_child_has_its_own_pipeline_and_ids() -> None:
    exporter = InMemoryExporter()
    app = model_app()
    queue = QueueConfig(schedule_delay=600, max_batch_size=4096)  # nothing leaves on its own
    runtime = instrument_app(app, MiddlewareConfig(exporter=exporter, queue=queue))
    try:
        parent_ids = asyncio.run(_predict(app, 10))
        assert runtime.pipeline is not None and runtime.pipeline.queue_depth == 10
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            os.close(read_fd)
            _child(app, runtime, write_fd)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            report = json.loads(pipe.read())
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert runtime.force_flush(10)
    finally:
        runtime.shutdown(2)
    assert sorted(report["exported"]) == sorted(report["ids"])  # only the child's own events
    assert not set(report["ids"]) & set(parent_ids)
    assert sorted(e.prediction_id for e in exporter.events) == sorted(parent_ids)  # once each
