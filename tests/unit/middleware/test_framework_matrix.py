"""The acceptance matrix of the middleware: app kind x the server-span owner.

App kinds: FastAPI and plain Starlette. Who owns the SERVER span: nobody (the
middleware starts ``predict {model}``), OpenTelemetry's FastAPIInstrumentor,
FastAPI's built-in telemetry (``FastAPI(telemetry={...})``), or
opentelemetry-instrumentation-asgi's ``OpenTelemetryMiddleware`` wrapped
around the whole app. FastAPIInstrumentor and built-in telemetry exist on
FastAPI only, so plain Starlette has two cells and FastAPI four.

Every cell is checked for: one server span per request carrying the
``predtrace.*`` attributes; W3C traceparent propagation; handler spans as
children of the server span; ERROR status on a 5xx; an exception in the
handler; streaming; the OIP v2 request id. Spans go
to a per-test SDK TracerProvider (never the global one) with an
InMemorySpanExporter; events to the in-memory exporter.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from predtrace.middleware import PredictionRuntime
from predtrace.middleware.testing import AsgiResponse, call_asgi
from predtrace.sidecar.testing import InMemoryExporter
from predtrace.wire import PredictionEvent, Status

from .conftest import Instrument, fastapi_app, starlette_app

Tracing = tuple[TracerProvider, InMemorySpanExporter]

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_SPAN_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_SPAN_ID:016x}-01"
HEADERS = [("content-type", "application/json")]
BODY = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}
STREAM_ROUTE = "POST /stream/{name}"
TRACED_ROUTE = "POST /v1/models/{name}:explain"
CHUNKS = [b"chunk-0;", b"chunk-1;", b"chunk-2;"]

# (app kind, who owns the server span); "none": the middleware starts its own.
CELLS = [
    ("fastapi", "none"),
    ("fastapi", "instrumentor"),
    ("fastapi", "builtin"),
    ("fastapi", "asgi"),
    ("starlette", "none"),
    ("starlette", "asgi"),
]


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _starlette_app() -> Starlette:
    """conftest's Starlette model server plus the streaming route FastAPI's has."""
    app = starlette_app()

    async def stream(request: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for chunk in CHUNKS:
                yield chunk

        return StreamingResponse(chunks(), media_type="text/plain")

    app.router.routes.append(Route("/stream/{name}", stream, methods=["POST"]))
    return app


def _add_traced_route(app: Starlette, provider: TracerProvider) -> None:
    """A handler that makes a span of its own (the model's work), on either app kind."""

    async def explain(request: Request) -> JSONResponse:
        with provider.get_tracer("model").start_as_current_span("inference"):
            return JSONResponse({"explained": request.path_params["name"]})

    app.router.routes.append(Route("/v1/models/{name}:explain", explain, methods=["POST"]))


@dataclass
class Cell:
    """One served app of the matrix: what to drive, and where its telemetry lands."""

    kind: str
    owner: str
    asgi: Any  # the ASGI callable the server would run
    runtime: PredictionRuntime | None
    exporter: InMemorySpanExporter
    events: InMemoryExporter
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def own_span(self) -> bool:
        """True when the middleware, not an instrumentation, makes the server span."""
        return self.owner == "none"

    def server_spans(self) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.kind is SpanKind.SERVER]

    def server_span(self) -> ReadableSpan:
        (span,) = self.server_spans()
        return span

    def flushed_events(self) -> list[PredictionEvent]:
        assert self.runtime is not None
        assert self.runtime.force_flush(5)
        return list(self.events.events)


def _build(
    kind: str,
    owner: str,
    tracing: Tracing,
    events: InMemoryExporter,
    instrument: Instrument | None,
) -> Cell:
    """Build the cell's app; ``instrument`` None gives the same app without predtrace."""
    provider, exporter = tracing
    app: Any
    if kind == "fastapi":
        telemetry = None  # conftest: built-in telemetry off
        if owner == "builtin":
            telemetry = {"tracer_provider": provider, "metrics": False, "logs": False}
        app = fastapi_app(telemetry=telemetry)
    else:
        app = _starlette_app()
    _add_traced_route(app, provider)
    cell = Cell(kind, owner, app, None, exporter, events)
    if owner == "instrumentor":
        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
        cell.cleanups.append(lambda: FastAPIInstrumentor.uninstrument_app(app))
    if instrument is not None:
        cell.runtime = instrument(app, routes=(STREAM_ROUTE, TRACED_ROUTE))
    if owner == "asgi":
        cell.asgi = OpenTelemetryMiddleware(app, tracer_provider=provider)
    return cell


@pytest.fixture(params=CELLS, ids=[f"{kind}-{owner}" for kind, owner in CELLS])
def cell(
    request: pytest.FixtureRequest,
    instrument: Instrument,
    tracing: Tracing,
    events: InMemoryExporter,
) -> Iterator[Cell]:
    kind, owner = request.param
    built = _build(kind, owner, tracing, events, instrument)
    try:
        yield built
    finally:
        for cleanup in built.cleanups:
            cleanup()


async def _post(cell: Cell, path: str, body: bytes, *extra: tuple[str, str]) -> AsgiResponse:
    return await call_asgi(cell.asgi, "POST", path, body, [*HEADERS, *extra])


def _ids(span: ReadableSpan) -> tuple[bytes, bytes]:
    return span.context.trace_id.to_bytes(16, "big"), span.context.span_id.to_bytes(8, "big")


# -- (a) one server span per request, with the predtrace attributes -------------------


async def test_each_request_gets_one_server_span_with_predtrace_attributes(cell: Cell) -> None:
    first = await _post(cell, "/v2/models/iris/infer", _json(BODY))
    second = await _post(cell, "/v2/models/iris/infer", _json(BODY))
    pids = [first.header("x-prediction-id"), second.header("x-prediction-id")]
    assert first.status == second.status == 200
    assert None not in pids and pids[0] != pids[1]

    spans = cell.server_spans()
    assert len(spans) == 2  # one per request: never a second server span
    by_pid = {}
    for span in spans:
        assert span.attributes is not None
        by_pid[span.attributes["predtrace.prediction.id"]] = span
        assert span.attributes["predtrace.model.name"] == "iris"
        assert span.attributes["predtrace.model.version"] == "7"  # the served version
        assert span.status.status_code is not StatusCode.ERROR
    assert sorted(by_pid) == sorted(pids)
    predict_spans = [s for s in cell.exporter.get_finished_spans() if s.name.startswith("predict")]
    if cell.own_span:
        assert {s.name for s in spans} == {"predict iris"}
    else:
        assert predict_spans == []  # the instrumentation's span was annotated instead

    events = cell.flushed_events()
    assert sorted(e.prediction_id for e in events) == sorted(pids)
    for event in events:
        assert (event.trace_id, event.span_id) == _ids(by_pid[event.prediction_id])
        assert (event.model.name, event.model.version) == ("iris", "7")
        assert (event.status, event.status_code) == (Status.OK, "200")


# -- (b) traceparent propagation ----------------------------------------------------------


async def test_traceparent_makes_the_server_span_a_child_of_the_remote_caller(cell: Cell) -> None:
    response = await _post(cell, "/v2/models/iris/infer", _json(BODY), ("traceparent", TRACEPARENT))
    assert response.status == 200
    server = cell.server_span()
    assert server.context.trace_id == TRACE_ID
    assert server.parent is not None
    assert server.parent.span_id == PARENT_SPAN_ID and server.parent.is_remote
    # Every span of the request (the instrumentation's send/receive ones too) is in it.
    assert {s.context.trace_id for s in cell.exporter.get_finished_spans()} == {TRACE_ID}
    (event,) = cell.flushed_events()
    assert (event.trace_id, event.span_id) == _ids(server)
    assert event.trace_id == TRACE_ID.to_bytes(16, "big")


async def test_handler_spans_are_children_of_the_server_span(cell: Cell) -> None:
    response = await _post(cell, "/v1/models/iris:explain", b"{}", ("traceparent", TRACEPARENT))
    assert response.status == 200
    server = cell.server_span()
    (inner,) = [s for s in cell.exporter.get_finished_spans() if s.name == "inference"]
    assert inner.parent is not None and inner.parent.span_id == server.context.span_id
    assert inner.context.trace_id == server.context.trace_id == TRACE_ID
    assert server.attributes is not None
    assert server.attributes["predtrace.prediction.id"] == response.header("x-prediction-id")


# -- (c) a 5xx answer ---------------------------------------------------------------------


async def test_5xx_answer_gives_error_span_and_error_event(cell: Cell) -> None:
    response = await _post(cell, "/v2/models/unavailable/infer", _json(BODY))
    assert response.status == 503
    pid = response.header("x-prediction-id")
    server = cell.server_span()
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["predtrace.prediction.id"] == pid
    assert server.attributes["predtrace.model.name"] == "unavailable"
    (event,) = cell.flushed_events()
    assert event.prediction_id == pid
    assert (event.status, event.status_code) == (Status.ERROR, "503")
    assert event.span_id == _ids(server)[1]


# -- (d) an exception in the handler ------------------------------------------------------


@dataclass
class Outcome:
    """What a server would see: the exception the app raised, and what it sent."""

    raised: type[BaseException] | None
    messages: list[dict[str, Any]]

    def without(self, header: bytes) -> list[tuple[Any, ...]]:
        """The messages, comparable, minus one response header."""
        comparable: list[tuple[Any, ...]] = []
        for m in self.messages:
            headers = sorted((k, v) for k, v in m.get("headers", []) if k != header)
            comparable.append((m["type"], m.get("status"), m.get("body"), headers))
        return comparable

    def header(self, name: bytes) -> bytes | None:
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        return next((v for k, v in start.get("headers", []) if k == name), None)


async def _outcome(app: Any, path: str) -> Outcome:
    sent: list[dict[str, Any]] = []

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        async def record(message: Any) -> None:
            sent.append(message)
            await send(message)

        await app(scope, receive, record)

    raised: type[BaseException] | None = None
    try:
        await call_asgi(recording, "POST", path, _json({"id": "req-boom", **BODY}), HEADERS)
    except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
        raised = type(exc)
    return Outcome(raised, sent)


async def test_exception_in_handler_gives_error_span_and_event_and_still_propagates(
    cell: Cell,
) -> None:
    # The same cell without predtrace, on spans of its own: the reference outcome.
    bare_tracing: Tracing = (TracerProvider(), InMemorySpanExporter())
    bare_tracing[0].add_span_processor(SimpleSpanProcessor(bare_tracing[1]))
    bare = _build(cell.kind, cell.owner, bare_tracing, InMemoryExporter(), None)
    try:
        expected = await _outcome(bare.asgi, "/v2/models/boom/infer")
    finally:
        for cleanup in bare.cleanups:
            cleanup()
    assert expected.raised is RuntimeError  # the server sees the error, after a 500

    got = await _outcome(cell.asgi, "/v2/models/boom/infer")
    assert got.raised is expected.raised
    assert got.without(b"x-prediction-id") == expected.without(b"x-prediction-id")
    assert [m.get("status") for m in got.messages if "status" in m] == [500]
    assert got.header(b"x-prediction-id") == b"req-boom"

    server = cell.server_span()
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["predtrace.prediction.id"] == "req-boom"
    assert server.attributes["predtrace.model.name"] == "boom"
    (event,) = cell.flushed_events()
    assert event.prediction_id == "req-boom"
    assert (event.status, event.status_code, event.error_type) == (
        Status.ERROR,
        "500",
        "RuntimeError",
    )
    assert event.span_id == _ids(server)[1]


# -- (e) streaming ------------------------------------------------------------------------


async def test_streaming_response_keeps_streaming_and_emits_the_event(cell: Cell) -> None:
    finished_before_last: list[int] = []
    inner = cell.asgi

    async def watching(scope: Any, receive: Any, send: Any) -> None:
        async def watch(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finished_before_last.append(len(cell.server_spans()))
            await send(message)

        await inner(scope, receive, watch)

    response = await call_asgi(watching, "POST", "/stream/s", b"", HEADERS)
    assert response.status == 200
    bodies = [m for m in response.messages if m["type"] == "http.response.body"]
    # Each chunk left in a message of its own, before the end of the body.
    assert [m["body"] for m in bodies if m["body"]] == CHUNKS
    assert all(m.get("more_body") for m in bodies[:-1])
    assert len(bodies) >= len(CHUNKS)
    pid = response.header("x-prediction-id")
    assert pid is not None

    server = cell.server_span()
    assert server.attributes is not None
    assert server.attributes["predtrace.prediction.id"] == pid
    if cell.own_span:
        assert finished_before_last == [1]  # ended before the last body message left
    (event,) = cell.flushed_events()
    assert event.prediction_id == pid
    assert (event.status, event.status_code) == (Status.OK, "200")
    assert (event.endpoint, event.model.name) == ("/stream/{name}", "s")
    assert event.span_id == _ids(server)[1]


# -- (f) OIP v2 request / response id -----------------------------------------------------


async def test_oip_body_id_is_the_prediction_id_header_and_response_id(cell: Cell) -> None:
    body = _json({"id": "req-77", **BODY})
    response = await _post(cell, "/v2/models/iris/infer", body, ("x-request-id", "hdr-1"))
    assert response.status == 200
    assert json.loads(response.body)["id"] == "req-77"
    assert response.header("x-prediction-id") == "req-77"  # the body id wins over headers
    server = cell.server_span()
    assert server.attributes is not None
    assert server.attributes["predtrace.prediction.id"] == "req-77"
    (event,) = cell.flushed_events()
    assert event.prediction_id == "req-77"


async def test_without_oip_body_id_the_response_id_agrees_with_the_header(cell: Cell) -> None:
    response = await _post(cell, "/v2/models/iris/infer", _json(BODY))
    assert response.status == 200
    pid = response.header("x-prediction-id")
    assert pid is not None
    answer = json.loads(response.body)
    if cell.owner == "builtin":
        # The body is FastAPI's, not re-read: nothing is echoed, nothing contradicts.
        assert "id" not in answer
    else:
        assert answer["id"] == pid  # the generated id was echoed into the request
    (event,) = cell.flushed_events()
    assert event.prediction_id == pid
