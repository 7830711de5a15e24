"""Registry stamping against a real MLflow tracking server: spans carry the training run."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from predtrace.middleware import MiddlewareConfig, MlflowResolver, PredictionRuntime, instrument_app
from predtrace.middleware.testing import call_asgi
from predtrace.sidecar.testing import InMemoryExporter

pytestmark = [pytest.mark.integration, pytest.mark.mlflow]
DIGEST = "sha256:" + "ab" * 32


def _post(base: str, path: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{base}/api/2.0/mlflow/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read() or b"{}")  # type: ignore[no-any-return]


def _register(base: str, name: str) -> tuple[str, str]:
    """A run, a registered model version from it (tagged with its digest) and an alias."""
    run = _post(base, "runs/create", {"experiment_id": "0", "run_name": "train", "start_time": 1})
    run_id = str(run["run"]["info"]["run_id"])  # type: ignore[index]
    _post(base, "registered-models/create", {"name": name})
    version = _post(
        base,
        "model-versions/create",
        {
            "name": name,
            "source": f"runs:/{run_id}/model",
            "run_id": run_id,
            "tags": [{"key": "predtrace.artifact_digest", "value": DIGEST}],
        },
    )
    number = str(version["model_version"]["version"])  # type: ignore[index]
    _post(base, "registered-models/alias", {"name": name, "alias": "champion", "version": number})
    return run_id, number


def test_resolves_version_and_alias_and_knows_what_is_missing(mlflow_server: str) -> None:
    run_id, number = _register(mlflow_server, "resolver-direct")
    resolver = MlflowResolver(mlflow_server)

    by_version = resolver.resolve("resolver-direct", number)
    assert by_version is not None
    assert by_version.run_id == run_id
    assert by_version.artifact_digest == DIGEST
    assert by_version.registry_model_id  # MLflow 3's model id, or models:/name/version

    assert resolver.resolve("resolver-direct", "@champion") == by_version
    assert resolver.resolve("resolver-direct", "999") is None
    assert resolver.resolve("no-such-model", "1") is None


async def test_spans_of_a_served_model_carry_its_mlflow_run(mlflow_server: str) -> None:
    run_id, number = _register(mlflow_server, "iris")
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    events = InMemoryExporter()
    app = FastAPI()

    @app.post("/v2/models/iris/infer")
    async def infer(body: dict[str, object]) -> dict[str, object]:
        return {"model_name": "iris", "model_version": number, "outputs": []}

    config = MiddlewareConfig(
        exporter=events,
        model_name="iris",
        model_version=number,
        resolver=MlflowResolver(mlflow_server),
        tracer_provider=provider,
        flush_tracer_provider=False,
    )
    runtime: PredictionRuntime = instrument_app(app, config)
    await runtime.astart()  # resolves the static model once, off the request path
    try:
        headers = [("content-type", "application/json")]
        started = time.monotonic()
        await call_asgi(app, "POST", "/v2/models/iris/infer", b'{"inputs": []}', headers)
        assert time.monotonic() - started < 30
        assert runtime.force_flush(5)
    finally:
        runtime.shutdown(5)
    (span,) = spans.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["predtrace.training.run_id"] == run_id
    (event,) = events.events
    assert event.model.artifact_digest == DIGEST
