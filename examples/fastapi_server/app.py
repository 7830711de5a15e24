"""A FastAPI model server speaking Open Inference Protocol v2, traced by predtrace.

Run it (direct mode: events go straight to a collector):

    PREDTRACE_COLLECTOR_URL=http://127.0.0.1:8700 \\
    PREDTRACE_FINGERPRINT_KEY=change-me-to-a-long-secret \\
    PREDTRACE_MODEL_VERSION=3 \\
    uvicorn --app-dir examples/fastapi_server app:app --port 8000

or point ``PREDTRACE_SIDECAR_TARGET=127.0.0.1:4555`` at a sidecar instead.
When ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set the app also exports its spans
over OTLP/HTTP with the standard SDK setup (the OTLP exporter comes with the
``sidecar`` extra); predtrace flushes that provider
in the lifespan shutdown, so a SIGTERM loses neither events nor spans.
"""

from __future__ import annotations

import math
import os
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from predtrace.middleware import MiddlewareConfig, current_prediction, instrument_app


def _setup_opentelemetry() -> None:
    """The stock SDK setup, only when an OTLP endpoint is configured."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return
    from opentelemetry import trace  # noqa: PLC0415 - optional part of the example

    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )
    except ModuleNotFoundError:
        raise SystemExit(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed: "
            'pip install -e ".[demo,sidecar]"'
        ) from None
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


class Tensor(BaseModel):
    """One OIP v2 input tensor."""

    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferRequest(BaseModel):
    """The OIP v2 inference request."""

    id: str | None = None
    inputs: list[Tensor]


WEIGHTS = {"sepal_length": 0.4, "sepal_width": -0.9, "petal_length": 1.3, "petal_width": 1.7}

_setup_opentelemetry()
app = FastAPI(title="iris (OIP v2)")
runtime = instrument_app(app, MiddlewareConfig.from_env(os.environ))


@app.get("/v2/health/ready")
async def ready() -> dict[str, bool]:
    """OIP v2 readiness."""
    return {"ready": True}


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: InferRequest) -> dict[str, Any]:
    """Score the inputs with a tiny logistic model."""
    if name != "iris":
        raise HTTPException(status_code=404, detail=f"unknown model {name}")
    values = {t.name: t.data[0] for t in request.inputs if t.data}
    z = sum(WEIGHTS.get(k, 0.0) * v for k, v in values.items()) - 4.0
    score = 1.0 / (1.0 + math.exp(-z))
    label = "virginica" if score >= 0.5 else "versicolor"
    prediction = current_prediction()
    prediction.record_output(label=label, score=score)
    prediction.record_features(values)  # only allow-listed names leave (PREDTRACE_FEATURES)
    return {
        "model_name": name,
        "model_version": os.environ.get("PREDTRACE_MODEL_VERSION", "1"),
        "id": request.id,
        "outputs": [
            {"name": "label", "shape": [1], "datatype": "BYTES", "data": [label]},
            {"name": "score", "shape": [1], "datatype": "FP32", "data": [score]},
        ],
    }
