"""With a server span already there: FastAPIInstrumentor, and FastAPI's built-in telemetry.

The middleware then adds its attributes to that span instead of starting its
own, and (with FastAPI's telemetry) fingerprints the body FastAPI parsed
instead of reading it a second time.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from predtrace.middleware.testing import call_asgi
from predtrace.sidecar.testing import InMemoryExporter

from .conftest import Instrument, fastapi_app, starlette_app

Tracing = tuple[TracerProvider, InMemorySpanExporter]
BODY = json.dumps({"id": "req-7", "inputs": [{"name": "x", "data": [1.0, 2.0]}]}).encode()
HEADERS = [("content-type", "application/json")]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _server_spans(exporter: InMemorySpanExporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]


@pytest.mark.parametrize("order", ["predtrace_first", "instrumentor_first"])
async def test_annotates_fastapi_instrumentor_server_span_instead_of_adding_one(
    order: str, instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    provider, exporter = tracing
    app = fastapi_app()
    if order == "instrumentor_first":
        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
        runtime = instrument(app)
    else:
        runtime = instrument(app)
        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    try:
        response = await call_asgi(
            app, "POST", "/v2/models/iris/infer", BODY, [*HEADERS, ("traceparent", TRACEPARENT)]
        )
    finally:
        FastAPIInstrumentor.uninstrument_app(app)
    assert response.header("x-prediction-id") == "req-7"
    (server,) = _server_spans(exporter)
    assert not any(s.name.startswith("predict") for s in exporter.get_finished_spans())
    assert server.attributes is not None
    assert server.attributes["predtrace.prediction.id"] == "req-7"
    assert server.attributes["predtrace.model.name"] == "iris"
    assert server.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    runtime.force_flush(5)
    (event,) = events.events
    assert event.span_id == server.context.span_id.to_bytes(8, "big")


async def test_instrumentor_span_gets_error_status_on_5xx(
    instrument: Instrument, tracing: Tracing
) -> None:
    provider, exporter = tracing
    app = fastapi_app()
    instrument(app)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    try:
        response = await call_asgi(app, "POST", "/v2/models/unavailable/infer", BODY, HEADERS)
    finally:
        FastAPIInstrumentor.uninstrument_app(app)
    assert response.status == 503
    (server,) = _server_spans(exporter)
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["predtrace.model.name"] == "unavailable"


def _native_app(provider: TracerProvider) -> FastAPI:
    return fastapi_app(telemetry={"tracer_provider": provider, "metrics": False, "logs": False})


async def test_annotates_fastapi_builtin_telemetry_span_and_uses_its_parsed_body(
    instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    provider, exporter = tracing
    app = _native_app(provider)
    runtime = instrument(app)
    response = await call_asgi(
        app, "POST", "/v2/models/iris/infer", BODY, [*HEADERS, ("traceparent", TRACEPARENT)]
    )
    assert response.status == 200
    assert response.header("x-prediction-id") == "req-7"  # the OIP body id, from FastAPI's parse
    (server,) = _server_spans(exporter)
    assert server.name == "POST /v2/models/{name}/infer"  # FastAPI's span, not a second one
    assert not any(s.name.startswith("predict") for s in exporter.get_finished_spans())
    assert server.attributes is not None
    assert server.attributes["predtrace.prediction.id"] == "req-7"
    assert server.attributes["predtrace.model.name"] == "iris"
    assert server.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    runtime.force_flush(5)
    (event,) = events.events
    assert event.span_id == server.context.span_id.to_bytes(8, "big")
    assert runtime.stats()["fastapi_body_used"] == 1
    assert "body_unread" not in runtime.stats()

    # The same body through a plain app gives the same fingerprint: one canonical form.
    plain = fastapi_app()
    plain_events = InMemoryExporter()
    plain_runtime = instrument(plain, exporter=plain_events)
    await call_asgi(plain, "POST", "/v2/models/iris/infer", BODY, HEADERS)
    plain_runtime.force_flush(5)
    assert plain_events.events[0].input_fingerprint == event.input_fingerprint != b""


async def test_builtin_telemetry_without_id_uses_generated_id_in_header_and_event(
    instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    provider, exporter = tracing
    app = _native_app(provider)
    runtime = instrument(app)
    body = json.dumps({"inputs": [{"name": "x", "data": [1.0]}]}).encode()
    response = await call_asgi(
        app, "POST", "/v2/models/iris/infer", body, [*HEADERS, ("x-request-id", "hdr-9")]
    )
    assert response.header("x-prediction-id") == "hdr-9"
    runtime.force_flush(5)
    assert events.events[0].prediction_id == "hdr-9"
    (server,) = _server_spans(exporter)
    assert server.attributes is not None and server.attributes["predtrace.prediction.id"] == "hdr-9"


async def test_builtin_telemetry_route_reading_the_body_itself_gets_it_copied_on_the_way(
    instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    builtin = {"tracer_provider": tracing[0], "metrics": False, "logs": False}
    app = FastAPI(telemetry=builtin)  # not the conftest app: its infer parses a model

    @app.post("/v1/models/{name}:raw")
    async def raw(name: str, request: Request) -> dict[str, Any]:
        return {"bytes": len(await request.body())}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> dict[str, Any]:
        body = await request.json()  # FastAPI parses nothing: the handler does
        return {"model_name": name, "model_version": "5", "id": body.get("id"), "outputs": []}

    runtime = instrument(app, routes=("POST /v1/models/{name}:raw",))
    body = b'{"a": 1, "b": [2, 3]}'
    response = await call_asgi(app, "POST", "/v1/models/m:raw", body, HEADERS)
    assert json.loads(response.body) == {"bytes": len(body)}  # the app read it all
    oip = json.dumps({"id": "req-31", "inputs": []}).encode()
    response = await call_asgi(app, "POST", "/v2/models/iris/infer", oip, HEADERS)
    assert response.header("x-prediction-id") == "req-31"  # the body id, from the copy
    runtime.force_flush(5)
    first, second = events.events
    assert second.prediction_id == "req-31" and second.model.version == "5"
    assert runtime.stats()["fastapi_body_copied"] == 2
    assert "fastapi_body_missing" not in runtime.stats()

    # The same fingerprints as when the middleware reads the body first.
    plain = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})
    plain.post("/v1/models/{name}:raw")(raw)
    plain.post("/v2/models/{name}/infer")(infer)

    plain_events = InMemoryExporter()
    plain_runtime = instrument(plain, exporter=plain_events, routes=("POST /v1/models/{name}:raw",))
    await call_asgi(plain, "POST", "/v1/models/m:raw", body, HEADERS)
    await call_asgi(plain, "POST", "/v2/models/iris/infer", oip, HEADERS)
    plain_runtime.force_flush(5)
    assert [e.input_fingerprint for e in plain_events.events] == [
        first.input_fingerprint,
        second.input_fingerprint,
    ]
    assert first.input_fingerprint != b""


async def test_builtin_telemetry_route_never_reading_the_body_counts_it_missing(
    instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    app = _native_app(tracing[0])

    @app.post("/v1/models/{name}:ignore")
    async def ignore(name: str) -> dict[str, Any]:
        return {"ok": True}

    runtime = instrument(app, routes=("POST /v1/models/{name}:ignore",))
    response = await call_asgi(app, "POST", "/v1/models/m:ignore", b'{"a": 1}', HEADERS)
    assert response.status == 200
    runtime.force_flush(5)
    assert events.events[0].input_fingerprint == b""
    assert runtime.stats()["fastapi_body_missing"] == 1


@pytest.mark.parametrize(
    "order", ["predtrace_alone", "predtrace_first", "instrumentor_first", "starlette"]
)
async def test_500_sent_by_server_error_middleware_carries_the_prediction_id(
    order: str, instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    provider, exporter = tracing
    app: Any = starlette_app() if order == "starlette" else fastapi_app()
    if order == "instrumentor_first":
        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    runtime = instrument(app)
    if order == "predtrace_first":
        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/v2/models/boom/infer", content=BODY, headers=HEADERS)
    finally:
        if order in ("predtrace_first", "instrumentor_first"):
            FastAPIInstrumentor.uninstrument_app(app)
    assert response.status_code == 500
    assert response.text == "Internal Server Error"  # the app's own 500, unchanged
    assert response.headers["x-prediction-id"] == "req-7"
    runtime.force_flush(5)
    (event,) = events.events
    assert (event.prediction_id, event.status_code, event.error_type) == (
        "req-7",
        "500",
        "RuntimeError",
    )
    if order in ("predtrace_first", "instrumentor_first"):
        (server,) = _server_spans(exporter)
        assert server.attributes is not None
        assert server.attributes["predtrace.prediction.id"] == "req-7"


async def test_the_500_handler_sees_what_the_router_wrote_in_the_scope_when_the_id_is_echoed(
    instrument: Instrument,
) -> None:
    # Starlette's 500 handler (like an outer OTel middleware reading
    # scope["route"]) runs outside the middleware: the app must get the
    # server's own scope, not a copy, when the OIP id is added to the body.
    def build() -> Starlette:
        async def infer(request: StarletteRequest) -> Response:
            await request.json()
            raise RuntimeError("model failed")

        async def on_error(request: StarletteRequest, exc: Exception) -> Response:
            route = getattr(request.scope.get("route"), "path", None)
            seen = {"name": request.path_params.get("name"), "route": route}
            return JSONResponse(seen, status_code=500)

        return Starlette(
            routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"])],
            exception_handlers={Exception: on_error},
        )

    async def post(app: Any) -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            body = json.dumps({"inputs": [{"name": "x", "data": [1.0]}]}).encode()  # no id
            return await client.post("/v2/models/churn/infer", content=body, headers=HEADERS)

    bare = await post(build())
    app = build()
    instrument(app)
    response = await post(app)
    assert bare.json() == {"name": "churn", "route": "/v2/models/{name}/infer"}
    assert (response.status_code, response.json()) == (500, bare.json())
    assert response.headers["x-prediction-id"]
