"""PredictionTracingMiddleware in-process on FastAPI and Starlette: spans, ids, events.

Driven through the raw ASGI interface (``predtrace.middleware.testing.call_asgi``),
spans collected by the SDK's InMemorySpanExporter, events by InMemoryExporter.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from predtrace.middleware import (
    ConfigError,
    MiddlewareConfig,
    PredictionTracingMiddleware,
    current_prediction,
)
from predtrace.middleware import instrument_app as real_instrument_app
from predtrace.middleware.testing import call_asgi
from predtrace.sidecar.testing import InMemoryExporter
from predtrace.wire import Status

from .conftest import Instrument, fastapi_app, starlette_app

Tracing = tuple[TracerProvider, InMemorySpanExporter]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
BODY = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _headers(**extra: str) -> list[tuple[str, str]]:
    return [
        ("content-type", "application/json"),
        *((k.replace("_", "-"), v) for k, v in extra.items()),
    ]


APPS = {"fastapi": fastapi_app, "starlette": starlette_app}


@pytest.mark.parametrize("framework", APPS)
async def test_prediction_gets_server_span_event_and_id_header(
    framework: str, instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    app = APPS[framework]()
    runtime = instrument(app)
    response = await call_asgi(app, "POST", "/v2/models/iris/infer", _json(BODY), _headers())
    assert response.status == 200
    pid = response.header("x-prediction-id")
    assert pid is not None and uuid.UUID(pid).version == 7
    (span,) = tracing[1].get_finished_spans()
    assert span.name == "predict iris"
    assert span.kind is SpanKind.SERVER
    assert span.attributes is not None
    assert span.attributes["predtrace.prediction.id"] == pid
    assert span.attributes["predtrace.model.name"] == "iris"
    assert runtime.force_flush(5)
    (event,) = events.events
    assert event.prediction_id == pid
    assert event.trace_id == span.context.trace_id.to_bytes(16, "big")
    assert event.span_id == span.context.span_id.to_bytes(8, "big")
    assert (event.model.name, event.model.version) == ("iris", "7")  # served version
    assert (event.protocol, event.endpoint) == ("oip-v2-rest", "/v2/models/{name}/infer")
    assert (event.status, event.status_code) == (Status.OK, "200")
    assert len(event.input_fingerprint) == 32
    assert event.output is not None and event.output.score == 3.0


@pytest.mark.parametrize("framework", APPS)
async def test_other_routes_pass_through_untouched(
    framework: str, instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    app = APPS[framework]()
    runtime = instrument(app)
    response = await call_asgi(app, "GET", "/health")
    assert response.status == 200
    assert response.header("x-prediction-id") is None
    assert tracing[1].get_finished_spans() == ()
    runtime.force_flush(5)
    assert events.events == []


async def test_traceparent_makes_the_span_a_child_of_the_caller(
    instrument: Instrument, tracing: Tracing
) -> None:
    app = fastapi_app()
    instrument(app)
    await call_asgi(
        app, "POST", "/v2/models/iris/infer", _json(BODY), _headers(traceparent=TRACEPARENT)
    )
    (span,) = tracing[1].get_finished_spans()
    assert span.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert span.parent is not None and span.parent.span_id == 0xB7AD6B7169203331


async def test_handler_spans_are_children_of_the_prediction_span(
    instrument: Instrument, tracing: Tracing
) -> None:
    provider, exporter = tracing
    app = fastapi_app()

    @app.post("/v2/models/{name}/versions/{version}/infer", include_in_schema=False)
    async def unused() -> None:  # pragma: no cover - shadowed by the first route
        return None

    @app.post("/v1/models/{name}:explain")
    async def explain(name: str) -> dict[str, str]:
        with provider.get_tracer("model").start_as_current_span("inference"):
            return {"ok": name}

    instrument(app, routes=("POST /v1/models/{name}:explain",))
    await call_asgi(app, "POST", "/v1/models/iris:explain", b"{}", _headers())
    inner, outer = exporter.get_finished_spans()
    assert inner.name == "inference"
    assert inner.parent is not None and inner.parent.span_id == outer.context.span_id
    assert outer.name == "predict iris"


async def test_oip_body_id_wins_over_headers_and_is_echoed(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    app = fastapi_app()
    runtime = instrument(app)
    body = {"id": "req-42", **BODY}
    response = await call_asgi(
        app, "POST", "/v2/models/iris/infer", _json(body), _headers(x_request_id="hdr-1")
    )
    assert response.header("x-prediction-id") == "req-42"
    assert json.loads(response.body)["id"] == "req-42"
    runtime.force_flush(5)
    assert events.events[0].prediction_id == "req-42"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x_request_id": "hdr-1", "ce_id": "ce-1"}, "hdr-1"),
        ({"ce_id": "ce-1"}, "ce-1"),
        ({"x_request_id": "has spaces", "ce_id": "ce-2"}, "ce-2"),
    ],
)
async def test_caller_header_ids_are_honoured_in_order(
    headers: dict[str, str], expected: str, instrument: Instrument
) -> None:
    app = fastapi_app()
    instrument(app)
    response = await call_asgi(
        app, "POST", "/v2/models/iris/infer", _json(BODY), _headers(**headers)
    )
    assert response.header("x-prediction-id") == expected
    # The OIP response id agrees with the header: the app saw the id in the body.
    assert json.loads(response.body)["id"] == expected


async def test_generated_id_is_echoed_as_the_oip_response_id(instrument: Instrument) -> None:
    app = fastapi_app()
    instrument(app)
    response = await call_asgi(app, "POST", "/v2/models/iris/infer", _json(BODY), _headers())
    assert json.loads(response.body)["id"] == response.header("x-prediction-id")


async def test_echo_can_be_turned_off(instrument: Instrument) -> None:
    app = fastapi_app()
    instrument(app, oip_echo_id=False)
    response = await call_asgi(app, "POST", "/v2/models/iris/infer", _json(BODY), _headers())
    assert "id" not in json.loads(response.body)
    assert response.header("x-prediction-id") is not None


async def test_http_exception_5xx_sets_error_status_and_event_error(
    instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    app = fastapi_app()
    runtime = instrument(app)
    response = await call_asgi(app, "POST", "/v2/models/unavailable/infer", _json(BODY), _headers())
    assert response.status == 503
    (span,) = tracing[1].get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["http.response.status_code"] == 503
    runtime.force_flush(5)
    (event,) = events.events
    assert (event.status, event.status_code, event.error_type) == (Status.ERROR, "503", "503")


async def test_client_error_is_an_error_event_but_not_an_error_span(
    instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    app = fastapi_app()
    runtime = instrument(app)
    response = await call_asgi(app, "POST", "/v2/models/iris/infer", b"not json", _headers())
    assert response.status == 422
    (span,) = tracing[1].get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET
    runtime.force_flush(5)
    assert (events.events[0].status, events.events[0].status_code) == (Status.ERROR, "422")


async def test_exception_in_handler_is_recorded_by_type_only_and_reraised(
    instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    app = fastapi_app()
    runtime = instrument(app)
    with pytest.raises(RuntimeError):
        await call_asgi(app, "POST", "/v2/models/boom/infer", _json(BODY), _headers())
    (span,) = tracing[1].get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == "RuntimeError"
    assert span.events == ()  # no exception event: its message could carry input data
    runtime.force_flush(5)
    (event,) = events.events
    assert (event.status, event.status_code, event.error_type) == (
        Status.ERROR,
        "500",
        "RuntimeError",
    )


async def test_streaming_response_streams_and_span_ends_before_last_chunk(
    instrument: Instrument, tracing: Tracing
) -> None:
    exporter = tracing[1]
    seen_before_last: list[int] = []
    app = fastapi_app()
    instrument(app, routes=("POST /stream/{name}",))

    async def watching(scope: Any, receive: Any, send: Any) -> None:
        async def watch(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                seen_before_last.append(len(exporter.get_finished_spans()))
            await send(message)

        await app(scope, receive, watch)

    response = await call_asgi(watching, "POST", "/stream/s", b"", _headers())
    bodies = [m for m in response.messages if m["type"] == "http.response.body"]
    assert [m["body"] for m in bodies if m["body"]] == [b"chunk-0;", b"chunk-1;", b"chunk-2;"]
    assert seen_before_last == [1]  # the span was complete before the last body left


class _HalfAnswer:
    """An ASGI endpoint that starts a streamed answer and returns mid-body (a cut stream)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"chunk-0;", "more_body": True})


async def _slow_chunks() -> Any:
    for i in range(50):
        yield f"chunk-{i};".encode()
        await asyncio.sleep(0.01)  # the client's hang-up arrives between two chunks


@pytest.mark.parametrize("endpoint", ["raw", "streaming_response"])
async def test_a_streamed_answer_cut_short_is_recorded_as_incomplete_not_ok(
    instrument: Instrument, tracing: Tracing, events: InMemoryExporter, endpoint: str
) -> None:
    async def streaming(request: Request) -> StreamingResponse:
        return StreamingResponse(_slow_chunks())

    handler: Any = _HalfAnswer() if endpoint == "raw" else streaming
    app = Starlette(routes=[Route("/v2/models/{name}/infer", handler, methods=["POST"])])
    runtime = instrument(app)
    # call_asgi's client hangs up (http.disconnect) once the request body is read.
    response = await call_asgi(app, "POST", "/v2/models/m/infer", _json(BODY), _headers())
    bodies = [m for m in response.messages if m["type"] == "http.response.body"]
    assert response.status == 200 and bodies and all(m.get("more_body") for m in bodies)
    runtime.force_flush(5)
    (event,) = events.events
    assert (event.status, event.status_code, event.error_type) == (
        Status.ERROR,
        "200",
        "IncompleteResponse",
    )
    (span,) = tracing[1].get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR


async def test_handler_helper_names_model_and_records_allowed_data_only(
    instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    app = fastapi_app()
    runtime = instrument(
        app,
        feature_allowlist=frozenset({"tenure", "x"}),
        attribute_allowlist=frozenset({"tenant"}),
    )
    await call_asgi(app, "POST", "/v2/models/named/infer", _json(BODY), _headers())
    runtime.force_flush(5)
    (event,) = events.events
    assert (event.model.name, event.model.version, event.model.alias) == ("churn", "9", "champion")
    assert event.output is not None and (event.output.label, event.output.score) == ("stay", 0.75)
    assert event.features == {"tenure": 14.0, "x": 1.0}
    assert event.attributes == {"tenant": "acme"}
    (span,) = tracing[1].get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["predtrace.model.name"] == "churn"
    assert span.attributes["predtrace.model.version"] == "9"


async def test_unsampled_prediction_keeps_lineage_but_no_output_or_features(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    app = fastapi_app()
    runtime = instrument(app, sample_rate=0.0, feature_allowlist=frozenset({"x"}))
    await call_asgi(app, "POST", "/v2/models/named/infer", _json(BODY), _headers())
    runtime.force_flush(5)
    (event,) = events.events
    assert not event.sampled
    assert event.output is None and event.features == {}
    assert event.model.name == "churn" and len(event.input_fingerprint) == 32


async def test_sampling_is_deterministic_by_prediction_id(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    app = fastapi_app()
    runtime = instrument(app, sample_rate=0.5)
    ids = [f"req-{i}" for i in range(200)]
    for pid in ids * 2:
        await call_asgi(
            app, "POST", "/v2/models/iris/infer", _json({"id": pid, **BODY}), _headers()
        )
    runtime.force_flush(5)
    decisions: dict[str, set[bool]] = {}
    for event in events.events:
        decisions.setdefault(event.prediction_id, set()).add(event.sampled)
    assert all(len(d) == 1 for d in decisions.values())
    assert 60 < sum(d == {True} for d in decisions.values()) < 140


async def test_versioned_oip_route_and_kserve_route_give_model_identity(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    app = fastapi_app()
    runtime = instrument(app, model_alias="prod")
    await call_asgi(app, "POST", "/v2/models/iris/versions/5/infer", _json(BODY), _headers())
    await call_asgi(
        app, "POST", "/v1/models/mnist:predict", _json({"instances": [1, 2]}), _headers()
    )
    runtime.force_flush(5)
    oip, kserve = events.events
    assert (oip.model.name, oip.model.version, oip.model.alias) == ("iris", "5", "prod")
    assert (kserve.model.name, kserve.protocol) == ("mnist", "kserve-v1")
    assert kserve.output is not None and kserve.output.value == 2.0


async def test_static_model_identity_fills_what_the_route_does_not_say(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    app = fastapi_app()
    runtime = instrument(
        app,
        routes=("POST /stream/{name}",),
        builtin_routes=False,
        model_name="static",
        model_version="1",
        model_digest="sha256:" + "ab" * 32,
    )
    await call_asgi(app, "POST", "/stream/s", b"", _headers())
    await call_asgi(app, "POST", "/v2/models/iris/infer", _json(BODY), _headers())
    runtime.force_flush(5)
    (event,) = events.events  # builtin routes off: the OIP request is not a prediction
    assert (event.model.name, event.model.version) == ("s", "1")
    assert event.model.artifact_digest == "sha256:" + "ab" * 32


async def test_fingerprint_ignores_key_order_whitespace_and_request_id(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    app = fastapi_app()
    runtime = instrument(app)
    first = b'{"inputs": [{"name": "x", "data": [1, 2]}], "id": "a"}'
    second = b'{"id":"b","inputs":[{"data":[1,2],"name":"x"}]}'
    third = b'{"inputs":[{"data":[1,3],"name":"x"}]}'
    for body in (first, second, third):
        await call_asgi(app, "POST", "/v2/models/iris/infer", body, _headers())
    runtime.force_flush(5)
    prints = [e.input_fingerprint for e in events.events]
    assert prints[0] == prints[1] != prints[2]


async def test_body_sent_in_chunks_reaches_the_app_intact(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    app = fastapi_app()
    runtime = instrument(app, oip_echo_id=False)
    raw = _json({"id": "chunked", **BODY})
    response = await call_asgi(
        app, "POST", "/v2/models/iris/infer", [raw[:5], raw[5:20], raw[20:]], _headers()
    )
    assert response.status == 200 and json.loads(response.body)["id"] == "chunked"
    runtime.force_flush(5)
    assert events.events[0].prediction_id == "chunked"


async def test_body_over_the_bound_is_passed_on_but_not_fingerprinted(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    app = fastapi_app()
    runtime = instrument(app, max_body_bytes=16)
    raw = _json({"id": "big", **BODY})
    response = await call_asgi(
        app, "POST", "/v2/models/iris/infer", [raw[:10], raw[10:]], _headers()
    )
    assert response.status == 200 and json.loads(response.body)["id"] == "big"
    runtime.force_flush(5)
    (event,) = events.events
    # Not fingerprinted; the OIP id is still read, from the body's first bytes.
    assert event.input_fingerprint == b"" and event.prediction_id == "big"
    assert response.header("x-prediction-id") == "big"
    assert runtime.stats()["body_unread"] == 1


async def test_app_header_with_the_same_name_is_not_duplicated(instrument: Instrument) -> None:
    # (A framing header such as content-type is refused as id_header at startup.)
    async def infer(request: Request) -> Response:
        await request.body()
        return JSONResponse({"outputs": []}, headers={"x-served-id": "app-own"})

    app = Starlette(routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"])])
    instrument(app, id_header="x-served-id")
    response = await call_asgi(app, "POST", "/v2/models/iris/infer", _json(BODY), _headers())
    assert [k for k, _ in response.headers].count(b"x-served-id") == 1
    assert response.header("x-served-id") == "app-own"


def test_instrumenting_twice_or_a_non_starlette_app_fails_clearly(events: InMemoryExporter) -> None:
    app = fastapi_app()
    config = MiddlewareConfig(exporter=events)
    runtime = real_instrument_app(app, config)
    try:
        with pytest.raises(ConfigError, match="already instrumented"):
            real_instrument_app(app, config)
        with pytest.raises(ConfigError, match="Starlette or FastAPI"):
            real_instrument_app(object(), config)
    finally:
        runtime.shutdown(1)


async def test_disabled_middleware_is_a_pure_pass_through() -> None:
    app = fastapi_app()
    wrapped = PredictionTracingMiddleware(app, MiddlewareConfig(enabled=False))
    response = await call_asgi(wrapped, "POST", "/v2/models/iris/infer", _json(BODY), _headers())
    assert response.status == 200 and response.header("x-prediction-id") is None


async def test_an_app_that_fails_its_own_startup_still_fails_it(
    events: InMemoryExporter,
) -> None:
    # The middleware answers the lifespan only for an app that does not speak
    # it; one that reports its startup failed keeps its failure.
    async def failing(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no model file"})
        raise RuntimeError("no model file")

    wrapped = PredictionTracingMiddleware(failing, MiddlewareConfig(exporter=events))
    messages = [{"type": "lifespan.startup"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, str]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with pytest.raises(RuntimeError, match="no model file"):
        await wrapped({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert sent == [{"type": "lifespan.startup.failed", "message": "no model file"}]
    wrapped.runtime.shutdown(5)  # type: ignore[union-attr]


async def test_lifespan_starts_and_flushes_pipeline_and_tracer_provider(
    tracing: Tracing, events: InMemoryExporter
) -> None:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    provider, span_exporter = TracerProvider(), InMemorySpanExporter()
    provider.add_span_processor(BatchSpanProcessor(span_exporter, schedule_delay_millis=60_000))
    app = fastapi_app()
    runtime = real_instrument_app(app, MiddlewareConfig(exporter=events, tracer_provider=provider))
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, str]:
        return messages.pop(0)

    async def send(message: dict[str, str]) -> None:
        sent.append(message["type"])
        if message["type"] == "lifespan.startup.complete":
            await call_asgi(app, "POST", "/v2/models/iris/infer", _json(BODY), _headers())
            # Nothing exported yet: the batch processor and the queue wait.
            assert span_exporter.get_finished_spans() == ()

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert len(events.events) == 1  # flushed before shutdown.complete was sent
    assert len(span_exporter.get_finished_spans()) == 1
    assert runtime.stats()["exported"] == 1
    provider.shutdown()


@pytest.mark.parametrize("telemetry", [False, True])
async def test_app_failing_after_its_head_reaches_the_server_as_without_middleware(
    telemetry: bool, tracing: Tracing, events: InMemoryExporter
) -> None:
    # The head goes out before the error, as without the middleware (a server
    # then just closes the connection), and no second head follows it.
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("failed mid-response")

    config = MiddlewareConfig(exporter=events, tracer_provider=tracing[0], enabled=telemetry)
    app = PredictionTracingMiddleware(failing, config)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": _json(BODY), "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v2/models/iris/infer",
        "headers": [(b"content-type", b"application/json")],
    }
    with pytest.raises(RuntimeError, match="failed mid-response"):
        await app(scope, receive, send)
    assert [(m["type"], m["status"]) for m in sent] == [("http.response.start", 200)]
    if telemetry:
        app.runtime.force_flush(5)
        (event,) = events.events
        assert (event.status, event.error_type) == (Status.ERROR, "RuntimeError")


async def test_app_reading_past_the_body_gets_the_servers_next_message_once_id_is_echoed(
    tracing: Tracing, events: InMemoryExporter
) -> None:
    # The body is replayed once (with the OIP id added), then the server's
    # own receive follows: the original body must not come back a second time.
    seen: list[dict[str, Any]] = []

    async def reading(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await receive())
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    config = MiddlewareConfig(exporter=events, tracer_provider=tracing[0])
    app = PredictionTracingMiddleware(reading, config)
    response = await call_asgi(app, "POST", "/v2/models/iris/infer", _json(BODY), _headers())
    assert response.status == 200
    first, second = seen
    assert json.loads(first["body"])["id"] == response.header("x-prediction-id")
    assert second == {"type": "http.disconnect"}


@pytest.mark.parametrize("sample_rate", [0.0, 1.0])
async def test_the_version_the_oip_response_names_wins_over_the_configured_one(
    instrument: Instrument, events: InMemoryExporter, sample_rate: float
) -> None:
    # The configured version is what the deployment was meant to serve; the
    # response says what actually answered, sampled or not.
    app = fastapi_app()
    static = {"model_name": "iris", "model_version": "3", "model_id": "models:/iris/3"}
    runtime = instrument(app, sample_rate=sample_rate, **static)
    await call_asgi(app, "POST", "/v2/models/iris/infer", _json(BODY), _headers())
    await call_asgi(app, "POST", "/v2/models/iris/versions/5/infer", _json(BODY), _headers())
    runtime.force_flush(5)
    plain, routed = events.events
    assert (plain.model.name, plain.model.version) == ("iris", "7")
    assert plain.model.registry_model_id == "models:/iris/3"  # static fields fill the rest
    assert routed.model.version == "5"


async def test_the_served_version_is_read_from_a_response_larger_than_the_capture_bound(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    big_answer = {
        "model_name": "iris",
        "model_version": "7",
        "outputs": [{"name": "e", "shape": [5000], "datatype": "FP32", "data": [0.5] * 5000}],
    }

    async def infer(request: Request) -> Response:
        return JSONResponse(big_answer)

    app = Starlette(routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"])])
    runtime = instrument(app, model_name="iris", model_version="3", max_output_bytes=1024)
    response = await call_asgi(app, "POST", "/v2/models/iris/infer", _json(BODY), _headers())
    assert len(response.body) > 10 * 1024
    runtime.force_flush(5)
    (event,) = events.events
    assert event.model.version == "7"  # named in the response's head, past the 1 KiB bound


@pytest.mark.parametrize("served", ["root_path", "mount"])
async def test_prediction_is_recognised_under_a_root_path_or_a_mount(
    served: str, instrument: Instrument, events: InMemoryExporter
) -> None:
    # ASGI puts the root path in ``path`` too (uvicorn --root-path, Mount):
    # the routes are matched on what follows it, as Starlette's router does.
    app = fastapi_app()
    runtime = instrument(app)
    outer: Any = Starlette(routes=[Mount("/ml", app=app)])
    path = "/ml/v2/models/iris/infer"
    if served == "root_path":

        async def under_api(scope: Any, receive: Any, send: Any) -> None:
            await app({**scope, "root_path": "/api"}, receive, send)  # as uvicorn sets it

        outer, path = under_api, "/api/v2/models/iris/infer"
    response = await call_asgi(outer, "POST", path, _json(BODY), _headers())
    assert response.status == 200
    pid = response.header("x-prediction-id")
    assert pid is not None and json.loads(response.body)["id"] == pid
    runtime.force_flush(5)
    (event,) = events.events
    assert (event.prediction_id, event.endpoint) == (pid, "/v2/models/{name}/infer")
    assert event.model.name == "iris"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
async def test_utf16_or_utf32_body_reaches_the_app_as_sent_and_gets_the_same_answer(
    encoding: str, instrument: Instrument, events: InMemoryExporter
) -> None:
    # Valid JSON (RFC 8259 readers such as json.loads accept it): the OIP id
    # is spliced in as UTF-8, so such a body is left alone.
    raw = json.dumps(BODY).encode(encoding)
    bare = await call_asgi(fastapi_app(), "POST", "/v2/models/iris/infer", raw, _headers())
    app = fastapi_app()
    runtime = instrument(app)
    response = await call_asgi(app, "POST", "/v2/models/iris/infer", raw, _headers())
    assert bare.status == 200
    assert (response.status, response.body) == (bare.status, bare.body)
    pid = response.header("x-prediction-id")
    assert pid is not None
    runtime.force_flush(5)
    (event,) = events.events
    assert event.prediction_id == pid and event.status == Status.OK


HUGE = 10**400  # a valid JSON integer that no float can hold


@pytest.mark.parametrize("telemetry", [False, True], ids=["body-read", "fastapi-telemetry"])
async def test_a_request_feature_beyond_any_float_is_skipped_and_the_event_still_goes(
    telemetry: bool, instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    settings = {"tracer_provider": tracing[0], "metrics": False, "logs": False}
    app = fastapi_app(telemetry=settings if telemetry else None)
    runtime = instrument(app, feature_allowlist=frozenset({"x", "y"}))
    body = {"inputs": [{"name": "y", "data": [2.0]}, {"name": "x", "data": [HUGE]}]}
    response = await call_asgi(app, "POST", "/v2/models/iris/infer", _json(body), _headers())
    assert response.status == 200
    pid = response.header("x-prediction-id")
    assert pid is not None
    runtime.force_flush(5)
    (event,) = events.events
    assert (event.prediction_id, event.features) == (pid, {"y": 2.0})
    assert not any(k.startswith("error.") for k in runtime.stats())


@pytest.mark.parametrize(
    ("path", "answer"),
    [
        (
            "/v2/models/iris/infer",
            {"model_name": "iris", "outputs": [{"name": "score", "data": [HUGE]}]},
        ),
        ("/v1/models/iris:predict", {"predictions": [HUGE]}),
    ],
    ids=["oip", "kserve"],
)
async def test_an_output_beyond_any_float_gives_no_summary_and_the_event_still_goes(
    path: str, answer: dict[str, Any], tracing: Tracing, events: InMemoryExporter
) -> None:
    async def answering(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": _json(answer)})

    config = MiddlewareConfig(exporter=events, tracer_provider=tracing[0], sample_rate=1.0)
    app = PredictionTracingMiddleware(answering, config)
    headers = _headers(x_request_id="big-out")
    response = await call_asgi(app, "POST", path, b"{}", headers)
    assert response.status == 200 and response.header("x-prediction-id") == "big-out"
    assert app.runtime is not None and app.runtime.force_flush(5)
    (event,) = events.events
    assert (event.prediction_id, event.status, event.output) == ("big-out", Status.OK, None)
    assert not any(k.startswith("error.") for k in app.runtime.stats())


async def test_handler_recording_numbers_beyond_any_float_gets_no_error_and_the_event_goes(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    async def infer(request: Request) -> Response:
        await request.body()
        p = current_prediction()
        p.record_features({"big": HUGE, "y": 2.0})
        p.record_output(label="big", score=HUGE, value=HUGE)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"])])
    runtime = instrument(app, feature_allowlist=frozenset({"big", "y"}))
    response = await call_asgi(app, "POST", "/v2/models/iris/infer", _json(BODY), _headers())
    assert response.status == 200
    runtime.force_flush(5)
    (event,) = events.events
    assert event.features == {"y": 2.0}
    assert event.output is not None
    assert (event.output.label, event.output.score, event.output.value) == ("big", None, None)


async def test_response_headers_given_as_a_generator_all_reach_the_server(
    tracing: Tracing, events: InMemoryExporter
) -> None:
    # ASGI allows any iterable of headers, a one-shot generator included.
    app_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"2"),
        (b"set-cookie", b"s=1"),
    ]

    async def generating(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        headers = (header for header in app_headers)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})

    config = MiddlewareConfig(exporter=events, tracer_provider=tracing[0])
    app = PredictionTracingMiddleware(generating, config)
    body = _json({"id": "gen-1", **BODY})
    response = await call_asgi(app, "POST", "/v2/models/iris/infer", body, _headers())
    assert response.headers == [*app_headers, (b"x-prediction-id", b"gen-1")]


# starlette.testclient warns on import that it prefers httpx2 (not installed here).
@pytest.mark.filterwarnings("ignore::starlette.exceptions.StarletteDeprecationWarning")
def test_an_app_started_again_after_shutdown_exports_the_events_of_each_run(
    tracing: Tracing, events: InMemoryExporter
) -> None:
    from starlette.testclient import TestClient  # noqa: PLC0415 - imported under the filter above

    app = fastapi_app()
    config = MiddlewareConfig(exporter=events, tracer_provider=tracing[0])
    runtime = real_instrument_app(app, config)
    for run in range(2):  # e.g. one TestClient per test on a module-level app
        with TestClient(app) as client:
            response = client.post("/v2/models/iris/infer", json={"id": f"run-{run}", **BODY})
            assert response.status_code == 200
    assert [e.prediction_id for e in events.events] == ["run-0", "run-1"]
    stats = runtime.stats()
    assert (stats["enqueued"], stats["exported"], stats["dropped"]) == (2, 2, 0)  # counted on
