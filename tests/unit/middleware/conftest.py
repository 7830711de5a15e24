"""Apps and fixtures shared by the middleware unit tests.

The same OIP v2 / KServe v1 model server is built with FastAPI and with plain
Starlette; the model name in the path selects the handler's behaviour.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from predtrace.middleware import MiddlewareConfig, PredictionRuntime, current_prediction
from predtrace.middleware import instrument_app as _instrument_app
from predtrace.sidecar.testing import InMemoryExporter

TELEMETRY_OFF: dict[str, Any] = {"tracing": False, "metrics": False, "logs": False}
FINGERPRINT_KEY = "unit-test-fingerprint-key"
PII = "4111-1111-1111-1111"


def oip_answer(name: str, body: dict[str, Any]) -> dict[str, Any]:
    """What the model returns: the score is the sum of the first input."""
    if name == "boom":
        raise RuntimeError(f"model failed on {PII}")
    if name == "unavailable":
        raise HTTPException(status_code=503, detail="model not loaded")
    if name == "named":
        p = current_prediction()
        p.set_model(name="churn", version="9", alias="champion")
        p.record_output(label="stay", score=0.75)
        p.record_features({"tenure": 14.0, "ssn": 123456789.0})
        p.set_attribute("tenant", "acme")
        p.set_attribute("email", "someone@example.com")
    inputs = body.get("inputs") or [{}]
    data = inputs[0].get("data") or [0]
    answer: dict[str, Any] = {
        "model_name": name,
        "model_version": "7",
        "outputs": [{"name": "score", "shape": [1], "datatype": "FP32", "data": [sum(data)]}],
    }
    if "id" in body:
        answer["id"] = body["id"]
    return answer


def fastapi_app(telemetry: dict[str, Any] | None = None) -> FastAPI:
    """The model server on FastAPI (built-in telemetry off unless given)."""
    app = FastAPI(telemetry=telemetry if telemetry is not None else TELEMETRY_OFF)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, body: dict[str, Any]) -> dict[str, Any]:
        return oip_answer(name, body)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_version(name: str, version: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = oip_answer(name, body)
        answer["model_version"] = version
        return answer

    @app.post("/v1/models/{name}:predict")
    def kserve(name: str, body: dict[str, Any]) -> dict[str, Any]:  # sync: runs in a thread
        return {"predictions": [len(body.get("instances", []))]}

    @app.post("/stream/{name}")
    async def stream(name: str) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"chunk-{i};".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def starlette_app() -> Starlette:
    """The same model server on plain Starlette."""

    async def infer(request: Request) -> Response:
        body = await request.json()
        try:
            return JSONResponse(oip_answer(request.path_params["name"], body))
        except HTTPException as exc:
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v2/models/{name}/infer", infer, methods=["POST"]),
            Route("/health", health),
        ]
    )


@pytest.fixture
def tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    """An SDK TracerProvider (not global) whose spans land in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def events() -> InMemoryExporter:
    """Where the middleware's events land."""
    return InMemoryExporter()


Instrument = Callable[..., PredictionRuntime]


@pytest.fixture
def instrument(
    tracing: tuple[TracerProvider, InMemorySpanExporter], events: InMemoryExporter
) -> Iterator[Instrument]:
    """``instrument(app, **config)``: instrument_app with test defaults; shut down after."""
    runtimes: list[PredictionRuntime] = []

    def make(app: Any, **overrides: Any) -> PredictionRuntime:
        settings: dict[str, Any] = {
            "exporter": events,
            "tracer_provider": tracing[0],
            "fingerprint_key": FINGERPRINT_KEY,
            "sample_rate": 1.0,
            "flush_tracer_provider": False,
            **overrides,
        }
        runtime = _instrument_app(app, MiddlewareConfig(**settings))
        runtimes.append(runtime)
        return runtime

    yield make
    for runtime in runtimes:
        runtime.shutdown(timeout=2.0)
