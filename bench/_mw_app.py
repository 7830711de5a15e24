"""The FastAPI predict app of bench/middleware_overhead.py, one variant per process.

``BENCH_VARIANT`` picks the telemetry set-up (uvicorn imports ``_mw_app:app``):

- ``bare``: no telemetry;
- ``otel``: the stock OpenTelemetry set-up (SDK TracerProvider, BatchSpanProcessor,
  OTLP/HTTP exporter to ``BENCH_SINK``, FastAPIInstrumentor);
- ``predtrace``: the same SDK span export, plus ``instrument_app`` sending events
  to the collector at ``BENCH_SINK`` (direct mode);
- ``predtrace_events_only``: ``instrument_app`` without an SDK (no span is
  exported, the events are), to separate the middleware from span export;
- ``floor``: the same SDK span export behind ``FloorMiddleware``, a minimal
  hand-written middleware making one span per request (what one exported
  span costs, before any prediction work).

The in-process mode imports ``make_app`` and ``PredictRequest`` directly.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI
from opentelemetry.trace import SpanKind
from pydantic import BaseModel

TELEMETRY_OFF: dict[str, Any] = {"tracing": False, "metrics": False, "logs": False}


class Tensor(BaseModel):
    """One OIP v2 input tensor."""

    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class PredictRequest(BaseModel):
    """An OIP v2 inference request."""

    id: str | None = None
    inputs: list[Tensor]


class FloorMiddleware:
    """The floor: a hand-written pure ASGI middleware making one SDK span per request."""

    def __init__(self, app: Any, tracer: Any) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.tracer.start_as_current_span("predict", kind=SpanKind.SERVER):
            await self.app(scope, receive, send)


def make_app(telemetry: dict[str, Any] | None = None) -> FastAPI:
    """The predict app: OIP v2 ``infer`` on a pydantic-validated body."""
    app = FastAPI(telemetry=telemetry if telemetry is not None else TELEMETRY_OFF)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: PredictRequest) -> dict[str, Any]:
        score = sum(request.inputs[0].data) / 10.0
        return {
            "model_name": name,
            "model_version": "3",
            "id": request.id,
            "outputs": [{"name": "score", "shape": [1], "datatype": "FP32", "data": [score]}],
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _sdk(sink: str) -> Any:
    from opentelemetry import trace  # noqa: PLC0415
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{sink}/v1/traces")))
    trace.set_tracer_provider(provider)
    return provider


def _variant_app() -> FastAPI:
    variant = os.environ.get("BENCH_VARIANT", "bare")
    sink = os.environ.get("BENCH_SINK", "")
    app = make_app()
    if variant == "otel":
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor  # noqa: PLC0415

        FastAPIInstrumentor.instrument_app(app, tracer_provider=_sdk(sink))
    elif variant in ("predtrace", "predtrace_events_only"):
        from predtrace.middleware import MiddlewareConfig, instrument_app  # noqa: PLC0415

        if variant == "predtrace":
            _sdk(sink)
        config = MiddlewareConfig.from_env(os.environ)
        instrument_app(app, config)
    elif variant == "floor":
        app.add_middleware(FloorMiddleware, tracer=_sdk(sink).get_tracer("floor"))
    elif variant != "bare":
        raise SystemExit(f"unknown BENCH_VARIANT {variant!r}")
    return app


if os.environ.get("BENCH_VARIANT"):
    app = _variant_app()
