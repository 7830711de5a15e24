"""Request-path fixes: the id of a body over the bound, FastAPI telemetry's bound,
resolver cache poisoning, predictions nested in-process, routes declaring a protocol."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from predtrace.middleware import (
    ConfigError,
    MiddlewareConfig,
    ResolvedModel,
    RoutePattern,
    StaticResolver,
)
from predtrace.middleware import environment_variables as env
from predtrace.middleware._registry import ResolverCache
from predtrace.middleware.testing import call_asgi
from predtrace.sidecar.testing import InMemoryExporter

from .conftest import TELEMETRY_OFF, Instrument, fastapi_app, oip_answer

Tracing = tuple[TracerProvider, InMemorySpanExporter]
HEADERS = [("content-type", "application/json"), ("x-request-id", "hdr-7")]
INFER = "/v2/models/iris/infer"
BOUND = 256


def _big_body(**members: Any) -> bytes:
    """An OIP request well over BOUND bytes (and over the 4 KiB head)."""
    n = 2_000
    body = {**members, "inputs": [{"name": "x", "shape": [n], "datatype": "FP32", "data": [1] * n}]}
    return json.dumps(body).encode()


def _wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.002)


# -- F5: the caller's OIP id of a body over max_body_bytes ---------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["one-message", "several-messages"])
async def test_the_oip_id_of_a_body_over_the_bound_is_the_prediction_id(
    chunked: bool, instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    app = fastapi_app()
    runtime = instrument(app, max_body_bytes=BOUND)
    raw = _big_body(id="caller-42")
    body = [raw[:100], raw[100:300], raw[300:]] if chunked else raw
    response = await call_asgi(app, "POST", INFER, body, HEADERS)
    assert response.status == 200 and json.loads(response.body)["id"] == "caller-42"
    assert response.header("x-prediction-id") == "caller-42"
    runtime.force_flush(5)
    (event,) = events.events
    assert event.prediction_id == "caller-42"
    assert event.input_fingerprint == b""  # still not fingerprinted: over the bound
    (span,) = tracing[1].get_finished_spans()
    assert span.attributes["predtrace.prediction.id"] == "caller-42"
    assert runtime.stats()["body_unread"] == 1


async def test_an_id_far_from_the_start_of_a_big_body_is_not_looked_for(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    # Bounded: only the first bytes are scanned; then the header id, as before.
    app = fastapi_app()
    runtime = instrument(app, max_body_bytes=BOUND)
    raw = _big_body()
    raw = raw[:-1] + b', "id": "late-id"}'
    response = await call_asgi(app, "POST", INFER, raw, HEADERS)
    assert json.loads(response.body)["id"] == "late-id"
    assert response.header("x-prediction-id") == "hdr-7"
    runtime.force_flush(5)
    assert events.events[0].prediction_id == "hdr-7"


async def test_an_unusable_id_at_the_start_of_a_big_body_is_counted_and_replaced(
    instrument: Instrument,
) -> None:
    app = fastapi_app()
    runtime = instrument(app, max_body_bytes=BOUND)
    response = await call_asgi(app, "POST", INFER, _big_body(id="has space"), HEADERS)
    assert response.header("x-prediction-id") == "hdr-7"
    assert runtime.stats()["invalid_caller_id"] == 1


# -- F6: FastAPI's telemetry mode applies max_body_bytes too ------------------------


def _telemetry_app(provider: TracerProvider, *, reads_request: bool) -> FastAPI:
    if not reads_request:
        return fastapi_app(telemetry={"tracer_provider": provider, "metrics": False, "logs": False})
    app = FastAPI(telemetry={"tracer_provider": provider, "metrics": False, "logs": False})

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> dict[str, Any]:
        return oip_answer(name, json.loads(await request.body()))

    return app


@pytest.mark.parametrize("reads_request", [False, True], ids=["body-param", "request"])
async def test_fastapi_telemetry_mode_does_not_fingerprint_a_body_over_the_bound(
    reads_request: bool, instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    app = _telemetry_app(tracing[0], reads_request=reads_request)
    runtime = instrument(app, max_body_bytes=BOUND, feature_allowlist=frozenset({"x"}))
    response = await call_asgi(app, "POST", INFER, _big_body(id="caller-42"), HEADERS)
    assert response.status == 200
    assert response.header("x-prediction-id") == "caller-42"
    runtime.force_flush(5)
    (event,) = events.events
    assert event.input_fingerprint == b"" and event.features == {}
    assert event.prediction_id == "caller-42"  # as in plain mode (above)
    stats = runtime.stats()
    assert stats["body_unread"] == 1 and "fastapi_body_used" not in stats
    # Within the bound, the body FastAPI parsed is still fingerprinted.
    small = json.dumps({"id": "small-1", "inputs": [{"name": "x", "data": [1]}]}).encode()
    await call_asgi(app, "POST", INFER, small, HEADERS)
    runtime.force_flush(5)
    assert events.events[1].prediction_id == "small-1"
    assert len(events.events[1].input_fingerprint) == 32


async def test_fastapi_telemetry_mode_and_plain_mode_give_a_big_body_the_same_id(
    instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    plain, telemetry = fastapi_app(), _telemetry_app(tracing[0], reads_request=False)
    for app in (plain, telemetry):
        instrument(app, max_body_bytes=BOUND).force_flush(5)
    for raw in (_big_body(id="caller-9"), _big_body()[:-1] + b', "id": "late-id"}'):
        first = await call_asgi(plain, "POST", INFER, raw, HEADERS)
        second = await call_asgi(telemetry, "POST", INFER, raw, HEADERS)
        assert first.header("x-prediction-id") == second.header("x-prediction-id")


# -- F7: the registry resolver only sees models that served -------------------------


class CountingResolver:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def resolve(self, name: str, version: str) -> ResolvedModel | None:
        with self.lock:
            self.calls.append((name, version))
        return ResolvedModel(run_id=f"run-{name}") if name == "churn" else None


def _not_found_app() -> Starlette:
    async def infer(request: Request) -> Response:
        await request.body()
        name = request.path_params["name"]
        if name != "churn":
            return JSONResponse({"error": "model not found"}, status_code=404)
        return JSONResponse({"model_version": "3", "outputs": []})

    return Starlette(routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"])])


async def test_model_names_of_failed_predictions_are_not_sent_to_the_registry(
    instrument: Instrument, tracing: Tracing
) -> None:
    resolver = CountingResolver()
    app = _not_found_app()
    runtime = instrument(app, resolver=resolver)
    body, headers = b'{"inputs": []}', [("content-type", "application/json")]
    for i in range(40):
        response = await call_asgi(app, "POST", f"/v2/models/nosuch{i}/infer", body, headers)
        assert response.status == 404
    await call_asgi(app, "POST", "/v2/models/churn/infer", body, headers)
    assert runtime.resolver is not None
    _wait_until(lambda: runtime.resolver.peek("churn", "3") is not None)  # type: ignore[union-attr]
    assert resolver.calls == [("churn", "3")]
    await call_asgi(app, "POST", "/v2/models/churn/infer", body, headers)
    spans = tracing[1].get_finished_spans()
    assert spans[-1].attributes["predtrace.training.run_id"] == "run-churn"


def test_a_full_cache_evicts_unknown_models_first_then_the_least_recently_used() -> None:
    known = {(m, "1"): ResolvedModel(run_id=f"run-{m}") for m in ("a", "b", "c", "d")}
    cache = ResolverCache(StaticResolver(known), max_models=3)
    try:
        for name in ("a", "x", "b"):  # x: unknown to the registry
            cache.lookup(name, "1")
            _wait_until(
                lambda n=name: n not in {k[0] for k, v in cache._entries.items() if v is None}
            )
        cache.lookup("a", "1")  # a used again: b is now the least recently used known model
        cache.lookup("c", "1")  # evicts x, the unknown one, though a is older
        _wait_until(lambda: cache.lookup("c", "1") is not None)
        assert set(cache._entries) == {("a", "1"), ("b", "1"), ("c", "1")}
        cache.lookup("d", "1")  # no unknown one left: evicts b
        _wait_until(lambda: cache.lookup("d", "1") is not None)
        assert set(cache._entries) == {("a", "1"), ("c", "1"), ("d", "1")}
        assert cache.lookup("a", "1") == ResolvedModel(run_id="run-a")
        assert cache.overflow == 2
    finally:
        cache.close()


def test_a_cache_full_of_unknown_names_still_resolves_a_new_model() -> None:
    resolver = CountingResolver()
    cache = ResolverCache(resolver, max_models=8)
    try:
        for i in range(8):
            cache.lookup(f"nosuch{i}", "1")
        _wait_until(lambda: len(resolver.calls) == 8)
        _wait_until(lambda: all(v is not None for v in list(cache._entries.values())))
        cache.lookup("churn", "3")
        _wait_until(lambda: cache.lookup("churn", "3") is not None)
        assert cache.lookup("churn", "3") == ResolvedModel(run_id="run-churn")
    finally:
        cache.close()


# -- F8: a prediction called in-process from another one ----------------------------


async def test_a_prediction_nested_in_process_gets_its_own_span(
    instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    holder: dict[str, Any] = {}
    app = FastAPI(telemetry=TELEMETRY_OFF)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, body: dict[str, Any]) -> dict[str, Any]:
        if name == "ensemble":
            transport = httpx.ASGITransport(app=holder["app"])
            async with httpx.AsyncClient(transport=transport, base_url="http://in") as client:
                inner = await client.post("/v2/models/sub/infer", json={"inputs": []})
            return {"model_name": "ensemble", "outputs": inner.json()["outputs"]}
        return oip_answer(name, body)

    holder["app"] = app
    runtime = instrument(app)
    response = await call_asgi(
        app, "POST", "/v2/models/ensemble/infer", b'{"inputs": []}', HEADERS[:1]
    )
    runtime.force_flush(5)
    by_model = {e.model.name: e for e in events.events}
    outer, inner = by_model["ensemble"], by_model["sub"]
    assert outer.prediction_id == response.header("x-prediction-id") != inner.prediction_id
    assert outer.span_id != inner.span_id and outer.trace_id == inner.trace_id
    spans = {s.context.span_id.to_bytes(8, "big"): s for s in tracing[1].get_finished_spans()}
    outer_span, inner_span = spans[outer.span_id], spans[inner.span_id]
    assert outer_span.attributes["predtrace.prediction.id"] == outer.prediction_id
    assert outer_span.attributes["predtrace.model.name"] == "ensemble"
    assert inner_span.attributes["predtrace.prediction.id"] == inner.prediction_id
    assert inner_span.parent is not None
    assert inner_span.parent.span_id == outer_span.context.span_id


# -- F9: a route declares its protocol, in code or in PREDTRACE_ROUTES --------------


def test_route_text_may_name_its_protocol() -> None:
    assert RoutePattern.parse("POST /api/v2/models/{name}/infer oip-v2-rest") == RoutePattern(
        template="/api/v2/models/{name}/infer", protocol="oip-v2-rest"
    )
    assert RoutePattern.parse("/m/{name}:predict KSERVE-V1") == RoutePattern(
        template="/m/{name}:predict", protocol="kserve-v1"
    )
    assert RoutePattern.parse("put /x http") == RoutePattern(method="PUT", template="/x")
    assert RoutePattern.parse("GET /x") == RoutePattern(method="GET", template="/x")


@pytest.mark.parametrize("text", ["POST /x oip", "/x grpc", "POST /x oip-v2-rest extra"])
def test_an_unknown_route_protocol_fails_at_startup_naming_the_valid_ones(text: str) -> None:
    environ = {env.PREDTRACE_SIDECAR_TARGET: "127.0.0.1:4555", env.PREDTRACE_ROUTES: text}
    with pytest.raises(ConfigError) as info:
        MiddlewareConfig.from_env(environ)
    message = str(info.value)
    assert message.startswith("PREDTRACE_ROUTES: route")
    assert "oip-v2-rest, kserve-v1, http" in message
    with pytest.raises(ConfigError, match="oip-v2-rest, kserve-v1, http"):
        RoutePattern(template="/x", protocol="oip")


async def test_a_mounted_oip_server_declared_from_the_environment_is_read_as_oip(
    events: InMemoryExporter, tracing: Tracing
) -> None:
    from predtrace.middleware import instrument_app  # noqa: PLC0415

    config = MiddlewareConfig.from_env(
        {
            env.PREDTRACE_ROUTES: "POST /api/v2/models/{name}/infer oip-v2-rest",
            env.PREDTRACE_SAMPLE_RATE: "1",
        },
        exporter=events,
        tracer_provider=tracing[0],
    )
    app = Starlette(routes=[Mount("/api", app=fastapi_app())])
    runtime = instrument_app(app, config)
    try:
        body = b'{"id": "caller-9", "inputs": [{"name": "x", "data": [2]}]}'
        response = await call_asgi(app, "POST", "/api/v2/models/churn/infer", body, HEADERS)
        assert json.loads(response.body)["id"] == "caller-9"
        assert response.header("x-prediction-id") == "caller-9"
        runtime.force_flush(5)
        (event,) = events.events
        assert event.protocol == "oip-v2-rest" and event.prediction_id == "caller-9"
        assert (event.model.name, event.model.version) == ("churn", "7")  # from the answer
        assert event.output is not None and event.output.score == 2.0
    finally:
        runtime.shutdown(2)
