"""RELIABILITY row 22 under real uvicorn: SIGTERM with a full queue.

uvicorn re-raises SIGTERM once its shutdown is done, so atexit hooks never
run: whatever is still buffered then is lost. The middleware flushes its own
queue and the app's SDK TracerProvider in the lifespan shutdown, so no event
and no span is lost; with a collector that stalls, it gives up at its deadline,
logs what it dropped, and the process still exits.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from predtrace.middleware.testing import RecordingCollector, run_uvicorn, serve_collector

pytestmark = pytest.mark.integration

EXAMPLE = str(Path(__file__).resolve().parents[3] / "examples" / "fastapi_server")
BODY = {"inputs": [{"name": "petal_width", "shape": [1], "datatype": "FP32", "data": [1.5]}]}


def _env(url: str, **extra: str) -> dict[str, str]:
    return {
        "PREDTRACE_COLLECTOR_URL": url,
        "PREDTRACE_FINGERPRINT_KEY": "reliability-test-key",
        # Nothing leaves before shutdown: the flush at SIGTERM must carry all of it.
        "PREDTRACE_EXPORT_DELAY": "600",
        "PREDTRACE_QUEUE_SIZE": "5000",
        "PREDTRACE_BATCH_SIZE": "5000",
        "OTEL_EXPORTER_OTLP_ENDPOINT": url,
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
        "OTEL_BSP_MAX_QUEUE_SIZE": "5000",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "5000",
        **extra,
    }


def _send(url: str, n: int) -> list[str]:
    with httpx.Client(base_url=url) as client:
        ids = []
        for _ in range(n):
            response = client.post("/v2/models/iris/infer", json=BODY)
            assert response.status_code == 200
            ids.append(response.headers["x-prediction-id"])
    return ids


def test_sigterm_loses_no_event_and_no_span() -> None:
    with serve_collector() as collector:
        with run_uvicorn(
            "app:app", app_dir=EXAMPLE, env=_env(collector.url), ready_path="/v2/health/ready"
        ) as server:
            ids = _send(server.url, 300)
            assert collector.snapshot_ids() == []  # still queued in the server
            code, err = server.terminate()
        assert code == -15, err  # uvicorn re-raised SIGTERM: no atexit hook ran
        assert sorted(collector.snapshot_ids()) == sorted(ids)
        # The app's own spans (FastAPI's), flushed by predtrace at shutdown.
        assert collector.server_spans.count("POST /v2/models/{name}/infer") == 300


def test_sigterm_with_a_stalled_collector_exits_at_the_deadline_and_logs_the_drop() -> None:
    with serve_collector(RecordingCollector(hang=True)) as collector:
        env = _env(
            collector.url,
            PREDTRACE_SHUTDOWN_TIMEOUT="1",
            PREDTRACE_COLLECTOR_TIMEOUT="1",
            OTEL_EXPORTER_OTLP_TIMEOUT="1",
        )
        with run_uvicorn(
            "app:app", app_dir=EXAMPLE, env=env, ready_path="/v2/health/ready"
        ) as server:
            _send(server.url, 50)
            code, err = server.terminate(timeout=60)
        assert code == -15, err
        summary = re.search(r"predtrace shutdown: (\d+) events exported, (\d+) dropped", err)
        assert summary is not None, err
        assert (int(summary.group(1)), int(summary.group(2))) == (0, 50)
        assert collector.snapshot_ids() == []
